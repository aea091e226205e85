// Streams and events. Each stream has a worker thread that runs its operations (kernels, copies, memsets,
// event records, waits, host functions, ncsim_enqueue'd work) in the order they were queued, asynchronously to
// the host. Ordering across streams:
//   - cuStreamWaitEvent: the waiting stream's later work starts after the work the event captured;
//   - the legacy default stream (handle 0 or CU_STREAM_LEGACY): work queued on it waits for all work queued
//     before on the context's blocking streams (created without CU_STREAM_NON_BLOCKING), and work queued on a
//     blocking stream waits for the legacy stream's earlier work, as the driver documents; non-blocking streams
//     (cudarc's) do not synchronize with it. The per-thread default stream is not simulated.
//   - host synchronization (stream, event, context synchronize; a successful query; copies that return only
//     when done) orders everything the host queues afterwards after the work it waited for.
// The same order is kept as vector clocks (one entry per stream, captured by events, merged by waits and host
// synchronizations) for the race checker (race.cpp); those are computed when work is queued, in host order.
// Stream objects are never freed (a destroyed stream stops its worker and is marked dead), so an event that
// captured a destroyed stream's work stays valid, as on the device.
#include "state.h"
#include <algorithm>
#include <chrono>
#include <set>

struct SimStream {
    SimContext* ctx = nullptr;
    bool legacy = false;
    bool blocking = true;
    unsigned flags = 0;
    int id = 0;  // index in the vector clocks
    bool alive = true;
    // The queue (under m).
    std::mutex m;
    std::condition_variable cv;
    struct Op {
        std::string what;
        std::function<void()> run;
        std::vector<std::pair<SimStream*, uint64_t>> waits;  // (stream, n): its first n ops must have run
        uint64_t seq = 0;
    };
    std::deque<Op> queue;
    bool stopping = false;
    std::thread worker;
    // Host-side order (under g_enqueue).
    uint64_t enqueued = 0;
    sim::Clock tail;
    // Progress (under g_progress).
    uint64_t completed = 0;
};

struct EventTime {
    std::chrono::steady_clock::time_point when{};
};

struct SimEvent {
    unsigned flags = 0;
    SimStream* stream = nullptr;  // of the last record; nullptr before the first
    uint64_t seq = 0;
    sim::Clock clock;
    std::shared_ptr<EventTime> time = std::make_shared<EventTime>();
};

namespace sim {

static std::mutex g_enqueue;  // host-side order: queues' seq numbers, clocks, stream lists
static std::mutex g_progress;
// Never destroyed: a process may exit (std::exit from another thread: nc's P2P watchdog when a peer died)
// while a host thread waits on it for a stream that will never finish, and glibc's destructor of a condition
// variable waits for its waiters, so a static one would hang the exit forever.
static std::condition_variable& g_progress_cv = *new std::condition_variable;
static Clock g_host_clock;
static std::map<SimContext*, std::vector<SimStream*>> g_context_streams;  // live streams, legacy included
static std::map<SimContext*, SimStream*> g_legacy;
static std::set<SimStream*> g_live_streams;
static std::set<SimEvent*> g_live_events;

void clock_merge(Clock& into, const Clock& from) {
    if (into.size() < from.size()) into.resize(from.size(), 0);
    for (size_t i = 0; i < from.size(); i++) into[i] = std::max(into[i], from[i]);
}

Clock sync_floor_locked() {
    Clock floor = g_host_clock;
    for (SimStream* s : g_live_streams) {
        if (floor.size() < s->tail.size()) floor.resize(s->tail.size(), 0);
        for (size_t i = 0; i < floor.size(); i++) floor[i] = std::min(floor[i], i < s->tail.size() ? s->tail[i] : 0);
    }
    return floor;
}

static void wait_progress(SimStream* s, uint64_t n) {
    std::unique_lock<std::mutex> lock(g_progress);
    g_progress_cv.wait(lock, [&] { return s->completed >= n; });
}

static bool done(SimStream* s, uint64_t n) {
    std::lock_guard<std::mutex> lock(g_progress);
    return s->completed >= n;
}

static void worker_loop(SimStream* s) {
    for (;;) {
        SimStream::Op op;
        {
            std::unique_lock<std::mutex> lock(s->m);
            s->cv.wait(lock, [&] { return !s->queue.empty() || s->stopping; });
            if (s->queue.empty()) return;
            op = std::move(s->queue.front());
            s->queue.pop_front();
        }
        for (auto& [other, n] : op.waits) wait_progress(other, n);
        if (config().race) race_delay();
        set_running(op.what.c_str());
        // After a kernel fault the device runs nothing more (inject.cpp); the op still completes, so that nothing
        // waiting for it hangs: the waiter gets the sticky error instead.
        if (op.run && sticky_error(context_device(s->ctx)) == CUDA_SUCCESS) op.run();
        set_running(nullptr);
        {
            std::lock_guard<std::mutex> lock(g_progress);
            s->completed = op.seq;
        }
        g_progress_cv.notify_all();
    }
}

// A new stream of `ctx` (called with g_enqueue held).
static SimStream* new_stream_locked(SimContext* ctx, bool legacy, unsigned flags) {
    SimStream* s = new SimStream;
    s->ctx = ctx;
    s->legacy = legacy;
    s->flags = flags;
    s->blocking = !legacy && !(flags & CU_STREAM_NON_BLOCKING);
    s->id = race_new_stream_id();
    s->tail = g_host_clock;
    s->worker = std::thread(worker_loop, s);
    g_context_streams[ctx].push_back(s);
    g_live_streams.insert(s);
    return s;
}

SimStream* legacy_stream(SimContext* ctx) {
    std::lock_guard<std::mutex> lock(g_enqueue);
    SimStream*& l = g_legacy[ctx];
    if (!l) l = new_stream_locked(ctx, true, 0);
    return l;
}

CUresult resolve_stream(const char* entry, CUstream handle, SimStream** out) {
    SimContext* ctx = nullptr;
    if (CUresult r = need_context(entry, &ctx)) return r;
    if (handle == nullptr || handle == SIM_STREAM_LEGACY) {
        *out = legacy_stream(ctx);
        return CUDA_SUCCESS;
    }
    if (handle == SIM_STREAM_PER_THREAD)
        return unsupported(entry, "the per-thread default stream (CU_STREAM_PER_THREAD) is not simulated");
    std::lock_guard<std::mutex> lock(g_enqueue);
    if (!g_live_streams.count(handle))
        return fail(CUDA_ERROR_INVALID_HANDLE, "%s: stream %p is not a live stream", entry, (void*)handle);
    if (handle->ctx != ctx)
        return fail(CUDA_ERROR_INVALID_CONTEXT, "%s: stream %p belongs to device %d, the current context is device %d",
                    entry, (void*)handle, context_device(handle->ctx), context_device(ctx));
    *out = handle;
    return CUDA_SUCCESS;
}

// Queues an operation (g_enqueue held): the legacy stream's implicit waits, the clocks, the race check.
static uint64_t enqueue_locked(SimStream* s, std::string what, std::function<void()> run,
                               const std::vector<Access>& accesses,
                               std::vector<std::pair<SimStream*, uint64_t>> waits = {}) {
    for (SimStream* b : g_context_streams[s->ctx]) {
        bool implicit = (s->legacy && b->blocking) || (s->blocking && b->legacy);
        if (b == s || !implicit || b->enqueued == 0) continue;
        waits.push_back({b, b->enqueued});
        clock_merge(s->tail, b->tail);
    }
    clock_merge(s->tail, g_host_clock);
    uint64_t seq = ++s->enqueued;
    if (s->tail.size() <= size_t(s->id)) s->tail.resize(size_t(s->id) + 1, 0);
    s->tail[size_t(s->id)] = seq;
    if (config().race && !accesses.empty()) race_check(s->id, seq, s->tail, what, accesses);
    SimStream::Op op;
    op.what = std::move(what);
    op.run = std::move(run);
    op.waits = std::move(waits);
    op.seq = seq;
    {
        std::lock_guard<std::mutex> lock(s->m);
        s->queue.push_back(std::move(op));
    }
    s->cv.notify_one();
    return seq;
}

CUresult enqueue(const char* entry, CUstream handle, std::string what, std::function<void()> run,
                 std::vector<Access> accesses, SimStream** resolved) {
    SimStream* s = nullptr;
    if (CUresult r = resolve_stream(entry, handle, &s)) return r;
    std::lock_guard<std::mutex> lock(g_enqueue);
    enqueue_locked(s, std::move(what), std::move(run), accesses);
    if (resolved) *resolved = s;
    return CUDA_SUCCESS;
}

CUresult host_wait_stream(SimStream* s, const char* why) {
    uint64_t n;
    Clock clock;
    {
        std::lock_guard<std::mutex> lock(g_enqueue);
        n = s->enqueued;
        clock = s->tail;
    }
    wait_progress(s, n);
    {
        std::lock_guard<std::mutex> lock(g_enqueue);
        clock_merge(g_host_clock, clock);
    }
    trace("sync", why);
    return sticky_error(context_device(s->ctx));
}

CUresult host_wait_context(SimContext* ctx, const char* why) {
    std::vector<std::pair<SimStream*, uint64_t>> targets;
    Clock clock;
    {
        std::lock_guard<std::mutex> lock(g_enqueue);
        for (SimStream* s : g_context_streams[ctx]) {
            targets.push_back({s, s->enqueued});
            clock_merge(clock, s->tail);
        }
    }
    for (auto& [s, n] : targets) wait_progress(s, n);
    {
        std::lock_guard<std::mutex> lock(g_enqueue);
        clock_merge(g_host_clock, clock);
    }
    trace("sync", why);
    return sticky_error(context_device(ctx));
}

bool host_unwaited_write(uint64_t start, size_t bytes, std::string& what) {
    std::lock_guard<std::mutex> lock(g_enqueue);
    return race_unwaited_write_locked(start, bytes, g_host_clock, what);
}

static void stop_stream(SimStream* s) {
    {
        std::lock_guard<std::mutex> lock(s->m);
        s->stopping = true;
    }
    s->cv.notify_one();
    s->worker.join();
}

void destroy_context_streams(SimContext* ctx) {
    std::vector<SimStream*> streams;
    {
        std::lock_guard<std::mutex> lock(g_enqueue);
        streams = g_context_streams[ctx];
    }
    for (SimStream* s : streams) {
        wait_progress(s, s->enqueued);
        stop_stream(s);
    }
}

static bool live_event(CUevent e) {
    std::lock_guard<std::mutex> lock(g_enqueue);
    return g_live_events.count(e) > 0;
}

}  // namespace sim

using namespace sim;

SIM_API CUresult cuStreamCreate(CUstream* out, unsigned flags) {
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    if (flags & ~CU_STREAM_NON_BLOCKING) return fail(CUDA_ERROR_INVALID_VALUE, "cuStreamCreate: flags 0x%x", flags);
    SimContext* ctx = nullptr;
    if (CUresult r = need_context("cuStreamCreate", &ctx)) return r;
    std::lock_guard<std::mutex> lock(g_enqueue);
    *out = new_stream_locked(ctx, false, flags);
    return CUDA_SUCCESS;
}

// Priorities do not change anything on the simulator (each stream has its own worker).
SIM_API CUresult cuStreamCreateWithPriority(CUstream* out, unsigned flags, int) { return cuStreamCreate(out, flags); }

// Waits for the stream's queued work, then stops its worker (the driver returns at once and releases the stream
// when its work is done; the observable order is the same).
SIM_API CUresult cuStreamDestroy_v2(CUstream handle) {
    SimStream* s = nullptr;
    if (handle == nullptr || handle == SIM_STREAM_LEGACY)
        return fail(CUDA_ERROR_INVALID_HANDLE, "cuStreamDestroy: the default stream cannot be destroyed");
    if (CUresult r = resolve_stream("cuStreamDestroy", handle, &s)) return r;
    uint64_t n;
    {
        std::lock_guard<std::mutex> lock(g_enqueue);
        n = s->enqueued;
        g_live_streams.erase(s);
        auto& list = g_context_streams[s->ctx];
        list.erase(std::remove(list.begin(), list.end(), s), list.end());
        s->alive = false;
    }
    wait_progress(s, n);
    stop_stream(s);
    return CUDA_SUCCESS;
}

SIM_API CUresult cuStreamSynchronize(CUstream handle) {
    SimStream* s = nullptr;
    if (CUresult r = resolve_stream("cuStreamSynchronize", handle, &s)) return r;
    return host_wait_stream(s, "cuStreamSynchronize");
}

SIM_API CUresult cuStreamQuery(CUstream handle) {
    SimStream* s = nullptr;
    if (CUresult r = resolve_stream("cuStreamQuery", handle, &s)) return r;
    uint64_t n;
    Clock clock;
    {
        std::lock_guard<std::mutex> lock(g_enqueue);
        n = s->enqueued;
        clock = s->tail;
    }
    if (!done(s, n)) return CUDA_ERROR_NOT_READY;
    std::lock_guard<std::mutex> lock(g_enqueue);
    clock_merge(g_host_clock, clock);
    return sticky_error(context_device(s->ctx));
}

SIM_API CUresult cuStreamGetCtx(CUstream handle, CUcontext* ctx) {
    SimStream* s = nullptr;
    if (!ctx) return CUDA_ERROR_INVALID_VALUE;
    if (CUresult r = resolve_stream("cuStreamGetCtx", handle, &s)) return r;
    *ctx = s->ctx;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuStreamGetFlags(CUstream handle, unsigned* flags) {
    SimStream* s = nullptr;
    if (!flags) return CUDA_ERROR_INVALID_VALUE;
    if (CUresult r = resolve_stream("cuStreamGetFlags", handle, &s)) return r;
    *flags = s->flags;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuLaunchHostFunc(CUstream handle, CUhostFn fn, void* data) {
    if (!fn) return CUDA_ERROR_INVALID_VALUE;
    return enqueue("cuLaunchHostFunc", handle, "host function", [fn, data] { fn(data); }, {});
}

SIM_API CUresult cuEventCreate(CUevent* out, unsigned flags) {
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    if (flags & CU_EVENT_INTERPROCESS) return unsupported("cuEventCreate", "CU_EVENT_INTERPROCESS (flags 0x%x)", flags);
    if (flags & ~3u) return fail(CUDA_ERROR_INVALID_VALUE, "cuEventCreate: flags 0x%x", flags);
    SimContext* ctx = nullptr;
    if (CUresult r = need_context("cuEventCreate", &ctx)) return r;
    SimEvent* e = new SimEvent;
    e->flags = flags;
    std::lock_guard<std::mutex> lock(g_enqueue);
    g_live_events.insert(e);
    *out = e;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuEventDestroy_v2(CUevent e) {
    std::lock_guard<std::mutex> lock(g_enqueue);
    if (!g_live_events.erase(e)) return fail(CUDA_ERROR_INVALID_HANDLE, "cuEventDestroy: %p is not a live event", (void*)e);
    delete e;  // a record still queued holds the shared time slot, not the event
    return CUDA_SUCCESS;
}

SIM_API CUresult cuEventRecord(CUevent e, CUstream handle) {
    if (!live_event(e)) return fail(CUDA_ERROR_INVALID_HANDLE, "cuEventRecord: %p is not a live event", (void*)e);
    SimStream* s = nullptr;
    if (CUresult r = resolve_stream("cuEventRecord", handle, &s)) return r;
    std::lock_guard<std::mutex> lock(g_enqueue);
    std::shared_ptr<EventTime> time = e->time;
    uint64_t seq = enqueue_locked(s, "event record", [time] { time->when = std::chrono::steady_clock::now(); }, {});
    e->stream = s;
    e->seq = seq;
    e->clock = s->tail;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuEventRecordWithFlags(CUevent e, CUstream handle, unsigned flags) {
    if (flags != 0) return unsupported("cuEventRecordWithFlags", "flags 0x%x", flags);
    return cuEventRecord(e, handle);
}

SIM_API CUresult cuStreamWaitEvent(CUstream handle, CUevent e, unsigned flags) {
    if (flags != 0) return fail(CUDA_ERROR_INVALID_VALUE, "cuStreamWaitEvent: flags 0x%x", flags);
    if (!live_event(e)) return fail(CUDA_ERROR_INVALID_HANDLE, "cuStreamWaitEvent: %p is not a live event", (void*)e);
    SimStream* s = nullptr;
    if (CUresult r = resolve_stream("cuStreamWaitEvent", handle, &s)) return r;
    std::lock_guard<std::mutex> lock(g_enqueue);
    if (!e->stream) return CUDA_SUCCESS;  // never recorded: nothing to wait for
    clock_merge(s->tail, e->clock);
    enqueue_locked(s, "wait event", nullptr, {}, {{e->stream, e->seq}});
    return CUDA_SUCCESS;
}

SIM_API CUresult cuEventQuery(CUevent e) {
    SimStream* s = nullptr;
    uint64_t n;
    Clock clock;
    {
        std::lock_guard<std::mutex> lock(g_enqueue);
        if (!g_live_events.count(e)) return fail(CUDA_ERROR_INVALID_HANDLE, "cuEventQuery: %p is not a live event", (void*)e);
        s = e->stream;
        n = e->seq;
        clock = e->clock;
    }
    if (s && !done(s, n)) return CUDA_ERROR_NOT_READY;
    std::lock_guard<std::mutex> lock(g_enqueue);
    clock_merge(g_host_clock, clock);
    return s ? sticky_error(context_device(s->ctx)) : CUDA_SUCCESS;
}

SIM_API CUresult cuEventSynchronize(CUevent e) {
    SimStream* s = nullptr;
    uint64_t n;
    Clock clock;
    {
        std::lock_guard<std::mutex> lock(g_enqueue);
        if (!g_live_events.count(e))
            return fail(CUDA_ERROR_INVALID_HANDLE, "cuEventSynchronize: %p is not a live event", (void*)e);
        s = e->stream;
        n = e->seq;
        clock = e->clock;
    }
    if (s) wait_progress(s, n);
    {
        std::lock_guard<std::mutex> lock(g_enqueue);
        clock_merge(g_host_clock, clock);
    }
    trace("sync", "cuEventSynchronize");
    return s ? sticky_error(context_device(s->ctx)) : CUDA_SUCCESS;
}

SIM_API CUresult cuEventElapsedTime(float* ms, CUevent start, CUevent end) {
    if (!ms) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lock(g_enqueue);
    if (!g_live_events.count(start) || !g_live_events.count(end))
        return fail(CUDA_ERROR_INVALID_HANDLE, "cuEventElapsedTime: not a live event");
    if ((start->flags | end->flags) & CU_EVENT_DISABLE_TIMING)
        return fail(CUDA_ERROR_INVALID_HANDLE, "cuEventElapsedTime: an event was created with CU_EVENT_DISABLE_TIMING");
    if (!start->stream || !end->stream)
        return fail(CUDA_ERROR_INVALID_HANDLE, "cuEventElapsedTime: an event was never recorded");
    if (!done(start->stream, start->seq) || !done(end->stream, end->seq)) return CUDA_ERROR_NOT_READY;
    std::lock_guard<std::mutex> progress(g_progress);
    *ms = std::chrono::duration<float, std::milli>(end->time->when - start->time->when).count();
    return CUDA_SUCCESS;
}
SIM_API CUresult cuEventElapsedTime_v2(float* ms, CUevent start, CUevent end) { return cuEventElapsedTime(ms, start, end); }
