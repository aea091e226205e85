// A CPU emulation of the CUDA subset the kernels of ../cuda use, fast enough to run nc's real kernels in a
// simulated GPU: the threads of a block are fibers (emu_fiber.h) that switch only at barriers
// (__syncthreads, __syncwarp, emu_tc.h's warp-wide tensor-core operations) and at a shuffle whose partner's
// value is not there yet, so a thread that meets no barrier runs start to finish with no switch; the blocks of a launch run on a small pool of OS
// threads (NC_SIM_THREADS, default the core count; the launching thread is one of them).
//
// The launch API (used by the tests here and by the simulated driver, sim/driver/):
//   launch(kernel, grid, block, args...)              kernel(args...) on every thread of every block; returns
//                                                     when the whole grid has run.
//   launch_named(name, kernel, grid, block, args...)  the same, with the name race reports give the kernel.
//   launch_params(name, kernel, grid, block, params)  the same, with the arguments unpacked from a
//                                                     cuLaunchKernel-style `void** params` (params[i] points
//                                                     at argument i, of the type kernel's i-th parameter has).
// Concurrent launches from several OS threads (one per simulated stream) are allowed: each caller runs
// blocks of its own launch and the pool's workers take blocks from the oldest launch.
//
// Shared memory: `__shared__` is `static thread_local`, so every OS thread of the pool (and every launching
// thread) has its own copy and a block owns it while it runs. Shared memory is not cleared between blocks
// (nor is it on the device); the race mode (emu_race.h) reports a read of bytes the block did not write.
// Per-block state (blockIdx, blockDim, gridDim, the warp exchange arrays) is per OS thread as well, and the
// scheduler sets threadIdx before every switch to a fiber.
//
// Race mode (NC_SIM_RACE=1, or emu_race_enable(true)), see emu_race.h: for code compiled with
// -fsanitize=thread (and linked without libtsan: emu_race.h defines the hooks), a shared-memory access that
// races with another thread's in the same barrier interval is reported with the kernel, block, interval,
// threads and shared variable, as is a read of a cp.async destination before its wait_group; threads
// between barriers run in a shuffled order. emu_race_reports() counts the reports so far; a caller that
// wants a race to fail a launch compares it before and after.
//
// Access check (emu_set_access_check(fn), emu_race.h): for code compiled with -fsanitize=thread, fn(addr,
// bytes, is_write, kernel) sees every access a kernel makes outside shared memory and its own stack (its
// global memory, cp.async's reads included), on the thread running it: the hook for a bounds checker.
//
// For the simulated driver: compile the kernels' translation units with (besides the usual flags)
//   -fsanitize=thread --param=tsan-instrument-func-entry-exit=0
// and link WITHOUT -fsanitize (no libtsan): the hooks come from emu_race.h. Without -fsanitize=thread the
// kernels run a little faster, and race mode and the access check see nothing (emu_race_instrumented()
// says which). Shared memory is thread_local, so in a dlopen'ed library a kernel finds its shared arrays
// through __tls_get_addr (general-dynamic TLS; not measured there, bench.cpp measures an executable).
//
// cp.async (emu_tc.h) lands each 16-byte copy at a random legal time between its issue and the wait_group
// that covers it: at one of the issuing thread's later barriers, or at the wait.
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dlfcn.h>
#include <math.h>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "emu_fiber.h"

using std::max;
using std::min;
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct float4 {
    float x, y, z, w;
};
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
struct EmuBlock;
struct EmuRaceBlock;  // emu_race.h
// The emulator's per-OS-thread state, in one thread_local: in the simulated driver the kernels live in a
// dlopen'ed library, where each thread_local variable costs a call to __tls_get_addr per function that uses
// it, and a barrier touched three of them (perf: ~15% of a step). One struct is one call per function.
struct EmuTls {
    dim3 thread_idx, block_idx, block_dim, grid_dim;
    EmuBlock* block = nullptr;              // the block this OS thread is running
    EmuRaceBlock* race_active = nullptr;    // what the hooks consult (emu_race.h)
};
inline thread_local EmuTls emu_tls;
// The same state, for code that runs on a fiber (the kernels and the emulator functions they call): found from
// the fiber's stack (emu_fiber.h's EmuFiberTop), without a thread_local lookup. Off a fiber, emu_tls itself.
__attribute__((no_sanitize_thread, always_inline)) inline EmuTls& emu_here() {
    EmuFiberTop* top = emu_fiber_top();
    return top ? *static_cast<EmuTls*>(emu_quiet_load(&top->owner)) : emu_tls;
}
// What kernel code reads as threadIdx, blockIdx, blockDim and gridDim: a copy, loaded without the access hook
// (emu_quiet_load). Read-only; the emulator sets the fields of emu_tls.
__attribute__((no_sanitize_thread, always_inline)) inline dim3 emu_quiet_dim3(const dim3& d) {
    return dim3{emu_quiet_load(&d.x), emu_quiet_load(&d.y), emu_quiet_load(&d.z)};
}
#define threadIdx (emu_quiet_dim3(emu_here().thread_idx))
#define blockIdx (emu_quiet_dim3(emu_here().block_idx))
#define blockDim (emu_quiet_dim3(emu_here().block_dim))
#define gridDim (emu_quiet_dim3(emu_here().grid_dim))
#define emu_block (emu_tls.block)
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static thread_local
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(n)
#define __grid_constant__

// Functions of the emulator that code compiled with -fsanitize=thread calls must not be instrumented
// themselves (their own accesses are not the kernel's, and the hooks would recurse).
#define EMU_RT __attribute__((no_sanitize_thread))
// The same for a test's host-side reference code, which the hooks would only slow down.
#define EMU_HOST_ONLY __attribute__((no_sanitize_thread))

// ---- a growable array for the scheduler's state --------------------------------------------------------------
// Not std::vector: in a translation unit compiled with -fsanitize=thread every std::vector member function is
// instrumented, and g++ does not inline an instrumented function into an uninstrumented (EMU_RT) one, so each
// element access of the scheduler was an out-of-line call that called a hook that looked up a thread_local
// (in the simulated driver, where the kernels live in a dlopen'ed library, __tls_get_addr): about half of a
// barrier-heavy kernel's time (perf, rmsnorm). These members are EMU_RT and inline into the scheduler.
// Elements are default-constructed at allocation and moved when the array grows.
template <class T>
struct EmuVec {
    T* p = nullptr;
    size_t n = 0, cap = 0;
    EmuVec() = default;
    EmuVec(const EmuVec&) = delete;
    EmuVec& operator=(const EmuVec&) = delete;
    EMU_RT EmuVec(EmuVec&& o) noexcept : p(o.p), n(o.n), cap(o.cap) { o.p = nullptr, o.n = o.cap = 0; }
    EMU_RT EmuVec& operator=(EmuVec&& o) noexcept {
        T* q = p;
        p = o.p, n = o.n, cap = o.cap;
        o.p = q, o.n = 0;
        return *this;
    }
    EMU_RT ~EmuVec() { delete[] p; }
    EMU_RT T& operator[](size_t i) { return p[i]; }
    EMU_RT T* data() { return p; }
    EMU_RT T* begin() { return p; }
    EMU_RT T* end() { return p + n; }
    EMU_RT size_t size() const { return n; }
    EMU_RT bool empty() const { return n == 0; }
    EMU_RT T& back() { return p[n - 1]; }
    EMU_RT void pop_back() { n--; }
    EMU_RT void clear() { n = 0; }
    EMU_RT void reserve(size_t want) {
        if (want <= cap) return;
        T* q = new T[want];
        for (size_t i = 0; i < n; i++) q[i] = static_cast<T&&>(p[i]);
        delete[] p;
        p = q;
        cap = want;
    }
    EMU_RT void push_back(const T& v) {
        if (n == cap) reserve(cap ? 2 * cap : 8);
        p[n++] = v;
    }
    EMU_RT void resize(size_t m) {  // shrinking keeps the elements' storage; growing default-assigns the new ones
        reserve(m);
        for (size_t i = n; i < m; i++) p[i] = T{};
        n = m;
    }
    EMU_RT void assign(size_t m, const T& v) {
        reserve(m);
        for (size_t i = 0; i < m; i++) p[i] = v;
        n = m;
    }
};

// ---- per-thread and per-block state -------------------------------------------------------------------------
// One 16-byte cp.async copy in flight (emu_tc.h): issued into commit group `group`; lands after `delay` more
// barriers of the issuing thread (UINT32_MAX: at the wait that completes its group).
struct EmuCopy {
    void* dst;
    const void* src;  // nullptr: zero fill
    uint64_t group;
    uint32_t delay;
    bool landed;
};

// A fiber: a stack and a saved context. It runs CUDA threads one after another (emu_fiber_main) until one of
// them blocks at a barrier; that thread keeps the fiber until it ends, and a fresh fiber starts the next
// thread. So a kernel with no barrier runs a whole block on one fiber without a single switch.
struct EmuFiber {
    EmuContext ctx;
    EmuStack stack;
};

struct EmuThread {
    // WAIT_SHFL_VALUE: at a shuffle, for the partner's value; WAIT_SHFL_TAKEN: at a shuffle, for the partner
    // to take this lane's previous value before it is replaced (emu_shfl_xor).
    enum State : uint8_t { NOT_STARTED, RUNNING, READY, WAIT_BLOCK, WAIT_WARP, WAIT_SHFL_VALUE, WAIT_SHFL_TAKEN, DONE };
    EmuFiber* fiber = nullptr;  // the fiber running this thread, from its start to its end
    dim3 idx;
    unsigned linear = 0;
    State state = NOT_STARTED;
    unsigned tc_ops = 0;              // warp-collective tensor-core operations issued (emu_tc.h's slot parity)
    unsigned shfl_written = 0;        // shuffles issued: values this lane has offered
    unsigned shfl_taken = 0;          // of those, how many its partner has read
    unsigned shfl_mask = 0;           // the lane mask of its last shuffle (its partner: lane ^ mask)
    uint64_t shfl_out = 0;            // the bits of its last value, until the partner has taken them
    uint64_t shfl_in = 0;             // the partner's value, handed over while this lane waited
    EmuVec<EmuCopy> copies;           // cp.async copies issued and not yet completed by a wait
    uint64_t open_group = 0;          // the group cp.async copies join until the next commit
    uint64_t waited_group = 0;        // groups < waited_group are complete
    unsigned syncthreads_calls = 0, syncwarp_calls = 0, cp_wait_calls = 0;  // for emu_race.h's planted bugs
};

// The operands a warp's lanes exchange for one tensor-core operation (emu_tc.h), two alternating per warp.
struct EmuTcSlot {
    uint32_t a[32][4];
    uint32_t b[32][2];
    const void* addr[32];
    bool decoded;      // af and bt hold this operation's A and B (the first lane past the barrier fills them)
    float af[16][16];  // A[row][k]
    float bt[8][16];   // B[k][n], stored as [n][k]
};

struct EmuBlock {
    void (*call)(void*) = nullptr;  // runs the kernel with its arguments
    void* call_ctx = nullptr;
    const char* kernel_name = nullptr;
    EmuTls* tls = nullptr;  // the emu_tls of the OS thread running this block (the scheduler's, off the fibers)
    unsigned n = 0, n_warps = 0;
    dim3 shape{0, 0, 0};  // the block dimensions the threads' idx were computed for
    EmuVec<EmuThread> threads;
    EmuVec<unsigned> ready;  // ring of runnable thread indices
    unsigned ready_head = 0, ready_count = 0;
    unsigned live = 0, block_arrived = 0;
    uint64_t block_syncs = 0;  // __syncthreads completed in this block: the barrier interval of a report
    EmuVec<unsigned> warp_live, warp_arrived;
    EmuVec<unsigned> warp_shfl_waiting;  // lanes waiting at a shuffle (emu_shfl_exchange), per warp
    EmuVec<uint8_t> warp_orders;  // the warp barrier under way is a __syncwarp (orders memory; emu_race.h)
    EmuVec<EmuTcSlot> tc;  // [warp * 2 + parity]
    uint64_t rng = 0;
    uint64_t launch_id = 0;
    bool shuffle = false;  // race mode: threads start, and run after a barrier, in a random order
    unsigned next_start = 0, start_at = 0, start_step = 1;  // threads start at start_at, then + step (mod n)
    EmuThread* cur = nullptr;
    EmuContext scheduler;
    EmuVec<EmuFiber*> free_fibers;  // owned
    EmuFiber* fresh = nullptr;  // a fiber about to run emu_fiber_main for the first time
    EmuFiber* dead = nullptr;   // a fiber that has run out of threads, for the scheduler to take back
    EmuRaceBlock* race = nullptr;   // set in race mode (emu_race.h)
    EmuRaceBlock* hooks = nullptr;  // set in race mode or with an access check: what the hooks consult
    EMU_RT ~EmuBlock() {
        for (EmuFiber* f : free_fibers) delete f;
    }
};

EMU_RT inline uint64_t emu_rand(EmuBlock& b) {  // splitmix64
    uint64_t z = (b.rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

[[noreturn]] inline void emu_fatal(const char* what) {
    std::fprintf(stderr, "emu: %s\n", what);
    std::abort();
}

// Parses a whole number in [lo, hi] from environment variable `var`; unset gives `fallback`, anything else
// a message naming the variable and the fallback used.
inline long emu_env_number(const char* var, long lo, long hi, long fallback) {
    const char* s = std::getenv(var);
    if (!s || !*s) return fallback;
    char* end = nullptr;
    long v = std::strtol(s, &end, 10);
    if (*end != '\0' || v < lo || v > hi) {
        std::fprintf(stderr, "emu: %s=%s is not a whole number in %ld..%ld; using %ld\n", var, s, lo, hi, fallback);
        return fallback;
    }
    return v;
}

#include "emu_race.h"

// ---- scheduling -------------------------------------------------------------------------------------------
EMU_RT inline void emu_make_ready(EmuBlock& b, unsigned t) {
    b.threads[t].state = EmuThread::READY;
    unsigned slot = b.ready_head + b.ready_count++;  // a ring of n: no division (a barrier makes n of these)
    b.ready[slot >= b.n ? slot - b.n : slot] = t;
}
// Makes the threads in `state` among [first, end) ready, in index order or (race mode) a random rotation and
// direction of it, so that the order between barriers changes from interval to interval.
EMU_RT inline void emu_release(EmuBlock& b, EmuThread::State state, unsigned first, unsigned end) {
    unsigned count = end - first, start = 0, step = 1;
    if (b.shuffle && count > 1) {
        start = unsigned(emu_rand(b) % count);
        step = (emu_rand(b) & 1) ? 1 : count - 1;
    }
    for (unsigned i = 0, j = start; i < count; i++, j = j + step >= count ? j + step - count : j + step)
        if (b.threads[first + j].state == state) emu_make_ready(b, first + j);
}
EMU_RT inline void emu_release_block(EmuBlock& b) {
    b.block_arrived = 0;
    b.block_syncs++;
    for (unsigned w = 0; w < b.n_warps; w++) b.warp_arrived[w] = 0;
    emu_race_block_barrier(b);
    emu_release(b, EmuThread::WAIT_BLOCK, 0, b.n);
}
EMU_RT inline void emu_release_warp(EmuBlock& b, unsigned w) {
    b.warp_arrived[w] = 0;
    if (b.warp_orders[w]) emu_race_warp_barrier(b, w);
    emu_release(b, EmuThread::WAIT_WARP, w * 32, b.n < w * 32 + 32 ? b.n : w * 32 + 32);  // not std::min: EmuVec
}

EMU_RT inline void emu_cp_land(EmuCopy& c) {
    if (c.landed) return;
    if (c.src)
        std::memcpy(c.dst, c.src, 16);
    else
        std::memset(c.dst, 0, 16);
    c.landed = true;
}
// Before a thread gives the CPU away: the cp.async copies whose random delay has run out land now.
EMU_RT inline void emu_cp_tick(EmuThread& th) {
    EmuCopy* c = th.copies.data();
    for (size_t i = 0, n = th.copies.size(); i < n; i++) {
        if (c[i].landed || c[i].delay == UINT32_MAX) continue;
        if (c[i].delay == 0)
            emu_cp_land(c[i]);
        else
            c[i].delay--;
    }
}

// The fiber to run next, with b.cur and threadIdx set for its thread: a released thread's fiber, else a
// fresh fiber for the next thread not started yet; null when neither exists.
EMU_RT inline void emu_fiber_main();
EMU_RT inline EmuFiber* emu_next_fiber(EmuBlock& b) {
    if (b.ready_count > 0) {
        EmuThread& th = b.threads[b.ready[b.ready_head]];
        b.ready_head = b.ready_head + 1 == b.n ? 0 : b.ready_head + 1;
        b.ready_count--;
        th.state = EmuThread::RUNNING;
        b.cur = &th;
        b.tls->thread_idx = th.idx;
        return th.fiber;
    }
    if (b.next_start < b.n) {
        if (b.free_fibers.empty()) {
            b.free_fibers.push_back(new EmuFiber);
            b.free_fibers.back()->stack.top()->owner = b.tls;  // a block's fibers run only on its OS thread
        }
        EmuFiber* f = b.free_fibers.back();
        b.free_fibers.pop_back();
        emu_context_make(f->ctx, f->stack.lo(), f->stack.size(), emu_fiber_main);
        b.fresh = f;
        return f;
    }
    return nullptr;
}

// A thread at a barrier gives the CPU to the next runnable fiber (itself, when its own arrival released it
// first; the scheduler when nothing can run); returns when the thread has been released and picked.
EMU_RT inline void emu_yield(EmuBlock& b, EmuThread& th) {
    EmuFiber* me = th.fiber;
    EmuFiber* next = emu_next_fiber(b);
    if (next == me) return;
    emu_context_switch(me->ctx, next ? next->ctx : b.scheduler);
}

EMU_RT inline void emu_arrive_block(EmuBlock& b) {
    EmuThread& th = *b.cur;
    emu_cp_tick(th);
    th.state = EmuThread::WAIT_BLOCK;
    if (++b.block_arrived == b.live) emu_release_block(b);
    emu_yield(b, th);
}
// A warp-wide barrier: a __syncwarp (orders_memory) or the synchronisation inside a shuffle or a tensor-core
// operation, which makes the lanes wait for each other but does not order their memory accesses.
EMU_RT inline void emu_arrive_warp(EmuBlock& b, bool orders_memory) {
    EmuThread& th = *b.cur;
    emu_cp_tick(th);
    unsigned w = th.linear / 32;
    th.state = EmuThread::WAIT_WARP;
    b.warp_orders[w] = orders_memory;
    if (++b.warp_arrived[w] == b.warp_live[w]) emu_release_warp(b, w);
    emu_yield(b, th);
}

EMU_RT inline void emu_shfl_partner_exit(EmuBlock& b, EmuThread& gone);
// A thread that has returned from the kernel: the barriers it no longer takes part in may now be complete.
EMU_RT inline void emu_thread_exit(EmuBlock& b, EmuThread& th) {
    unsigned w = th.linear / 32;
    th.state = EmuThread::DONE;
    th.fiber = nullptr;
    b.live--;
    b.warp_live[w]--;
    emu_shfl_partner_exit(b, th);
    if (b.block_arrived > 0 && b.block_arrived == b.live) emu_release_block(b);
    if (b.warp_arrived[w] > 0 && b.warp_arrived[w] == b.warp_live[w]) emu_release_warp(b, w);
}

// The body of every fiber: starts threads in turn and runs each until it returns; a thread that blocks at a
// barrier keeps this fiber (the call below returns only when that thread ends). When no thread is left to
// start, the fiber hands itself to the scheduler to be reused.
EMU_RT inline void emu_fiber_main() {
    EmuTls& tls = emu_here();
    EmuBlock& b = *tls.block;
    EmuFiber* me = b.fresh;
    while (b.next_start < b.n) {
        b.next_start++;
        unsigned t = b.start_at;  // the next in a rotation of 0..n-1, forwards or backwards (step 1 or n - 1)
        b.start_at = t + b.start_step >= b.n ? t + b.start_step - b.n : t + b.start_step;
        EmuThread& th = b.threads[t];
        th.fiber = me;
        th.state = EmuThread::RUNNING;
        th.tc_ops = th.shfl_written = th.shfl_taken = th.shfl_mask = 0;
        th.copies.clear();
        th.open_group = th.waited_group = 0;
        th.syncthreads_calls = th.syncwarp_calls = th.cp_wait_calls = 0;
        b.cur = &th;
        tls.thread_idx = th.idx;
        tls.race_active = b.hooks;  // the kernel's accesses are checked (emu_race.h), the emulator's are not
        b.call(b.call_ctx);
        tls.race_active = nullptr;
        emu_thread_exit(b, b.threads[t]);
    }
    b.dead = me;
    emu_context_switch(me->ctx, b.scheduler);
    emu_fatal("a finished fiber was resumed");
}

// The n-th call of a thread does nothing when a test plants that bug (emu_race.h).
EMU_RT inline bool emu_planted_skip(unsigned& calls, int plant) { return plant >= 0 && calls++ == (unsigned)plant; }
EMU_RT inline void __syncthreads() {
    EmuTls& tls = emu_here();
    EmuHooksOff off(tls);
    EmuBlock& b = *tls.block;
    if (!emu_planted_skip(b.cur->syncthreads_calls, emu_plant_skip_syncthreads)) emu_arrive_block(b);
}
EMU_RT inline void __syncwarp(unsigned = 0xffffffffu) {
    EmuTls& tls = emu_here();
    EmuHooksOff off(tls);
    EmuBlock& b = *tls.block;
    if (!emu_planted_skip(b.cur->syncwarp_calls, emu_plant_skip_syncwarp)) emu_arrive_warp(b, true);
}
// A shuffle without a warp barrier: each lane waits only for its partner (dataflow), so most lanes pass most
// shuffles without giving the CPU away (a warp_sum's five shuffles: ~110 fiber switches per warp instead of
// 192). A lane offers its value (shfl_out) and takes its partner's: at once when the partner has offered this
// shuffle's value, else it waits and the partner hands the value over when it offers it. A lane offers its
// next value only once its partner has taken the previous one (else it waits), so one value per lane is
// enough. Values pass between partners, so lane t ^ mask must use the same mask as lane t (the kernels'
// reductions use one mask per shuffle): a shuffle where partners' masks differ is not emulated and stops the
// run. A partner that has returned (or does
// not exist) leaves its last value, as undefined on the device as here.
EMU_RT inline void emu_shfl_wait(EmuBlock& b, EmuThread& th, EmuThread::State state) {
    th.state = state;
    b.warp_shfl_waiting[th.linear / 32]++;
    emu_yield(b, th);
}
EMU_RT inline void emu_shfl_wake(EmuBlock& b, unsigned t) {
    b.warp_shfl_waiting[t / 32]--;
    emu_make_ready(b, t);
}
EMU_RT inline void emu_shfl_partner_exit(EmuBlock& b, EmuThread& gone) {
    unsigned first = gone.linear & ~31u, end = b.n < first + 32 ? b.n : first + 32;  // not std::min: EmuVec
    for (unsigned u = first; u < end && b.warp_shfl_waiting[first / 32] > 0; u++) {
        EmuThread& th = b.threads[u];
        bool waits_on_it = (th.linear ^ th.shfl_mask) == gone.linear;
        if (th.state == EmuThread::WAIT_SHFL_VALUE && waits_on_it) {
            th.shfl_in = gone.shfl_out;
            emu_shfl_wake(b, u);
        } else if (th.state == EmuThread::WAIT_SHFL_TAKEN && waits_on_it) {
            emu_shfl_wake(b, u);
        }
    }
}
[[noreturn]] EMU_RT inline void emu_shfl_nonuniform(EmuBlock& b, unsigned lane, unsigned mask, unsigned other) {
    std::fprintf(stderr, "emu: kernel %s: lanes %u and %u shuffle with different xor masks (%u and %u); the emulator "
                 "needs one mask per shuffle across the warp\n", b.kernel_name, lane, lane ^ mask, mask, other);
    std::abort();
}
EMU_RT inline uint64_t emu_shfl_exchange(EmuBlock& b, EmuThread& th, uint64_t bits, unsigned mask) {
    unsigned t = th.linear;
    if (th.shfl_taken < th.shfl_written) {  // the partner of the last shuffle has not taken that value yet
        unsigned reader = t ^ th.shfl_mask;
        if (reader < b.n && b.threads[reader].state != EmuThread::DONE) emu_shfl_wait(b, th, EmuThread::WAIT_SHFL_TAKEN);
    }
    unsigned k = th.shfl_written++;  // this is the lane's shuffle number k
    th.shfl_out = bits;
    th.shfl_mask = mask;
    unsigned p = t ^ mask;
    if (p >= b.n) return 0;  // no such lane
    EmuThread& partner = b.threads[p];
    if (partner.state == EmuThread::DONE) return partner.shfl_out;
    if (partner.state == EmuThread::WAIT_SHFL_VALUE && partner.shfl_written == k + 1) {  // it waits for this value
        if (partner.shfl_mask != mask) emu_shfl_nonuniform(b, t, mask, partner.shfl_mask);
        partner.shfl_in = bits;
        th.shfl_taken = k + 1;
        emu_shfl_wake(b, p);
    }
    if (partner.shfl_written == k + 1) {  // its value of shuffle k is there: take it
        if (partner.shfl_mask != mask) emu_shfl_nonuniform(b, t, mask, partner.shfl_mask);
        partner.shfl_taken = k + 1;
        if (partner.state == EmuThread::WAIT_SHFL_TAKEN) emu_shfl_wake(b, p);
        return partner.shfl_out;
    }
    if (partner.shfl_written > k + 1) emu_shfl_nonuniform(b, t, mask, partner.shfl_mask);
    emu_shfl_wait(b, th, EmuThread::WAIT_SHFL_VALUE);
    return th.shfl_in;
}
template <class T>
EMU_RT inline T emu_shfl_xor(T v, int off) {
    EmuTls& tls = emu_here();
    EmuHooksOff hooks_off(tls);
    EmuBlock& b = *tls.block;
    EmuThread& th = *b.cur;
    emu_cp_tick(th);  // a shuffle is one of the thread's synchronisation points (cp.async landing times)
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    bits = emu_shfl_exchange(b, th, bits, unsigned(off & 31));
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}
EMU_RT inline float __shfl_xor_sync(unsigned, float v, int off) { return emu_shfl_xor(v, off); }
EMU_RT inline double __shfl_xor_sync(unsigned, double v, int off) { return emu_shfl_xor(v, off); }

// Runs every thread of block `bi` to its end on the calling OS thread.
EMU_RT inline void emu_run_block(EmuBlock& b, dim3 bi) {
    emu_tls.block_idx = bi;
    b.live = b.n;
    b.block_arrived = 0;
    b.block_syncs = 0;
    b.ready_head = 0;
    b.ready_count = 0;
    b.next_start = 0;
    b.start_at = 0;
    b.start_step = 1;
    if (b.shuffle && b.n > 1) {  // a random rotation and direction of the thread order
        b.start_at = unsigned(emu_rand(b) % b.n);
        b.start_step = (emu_rand(b) & 1) ? 1 : b.n - 1;
    }
    for (unsigned w = 0; w < b.n_warps; w++) {
        b.warp_live[w] = b.n - 32 * w < 32 ? b.n - 32 * w : 32;  // not std::min: see EmuVec
        b.warp_arrived[w] = 0;
        b.warp_shfl_waiting[w] = 0;
    }
    for (unsigned t = 0; t < b.n; t++) {  // a lane not started yet has offered no shuffle value in this block
        b.threads[t].state = EmuThread::NOT_STARTED;
        b.threads[t].shfl_written = b.threads[t].shfl_taken = 0;
    }
    b.cur = nullptr;
    emu_race_block_start(b);
    while (EmuFiber* f = emu_next_fiber(b)) {
        emu_context_switch(b.scheduler, f->ctx);
        if (b.dead) {
            b.free_fibers.push_back(b.dead);
            b.dead = nullptr;
        }
    }
    if (b.live != 0) {
        unsigned at_block = 0, at_warp = 0;
        for (unsigned t = 0; t < b.n; t++) {
            at_block += b.threads[t].state == EmuThread::WAIT_BLOCK;
            at_warp += b.threads[t].state == EmuThread::WAIT_WARP ||
                       b.threads[t].state == EmuThread::WAIT_SHFL_VALUE ||
                       b.threads[t].state == EmuThread::WAIT_SHFL_TAKEN;
        }
        std::fprintf(stderr,
                     "emu: kernel %s block (%u,%u,%u) deadlocked: %u threads wait at __syncthreads, %u at a warp "
                     "barrier (__syncwarp, a shuffle or a tensor-core op), %u have returned\n",
                     b.kernel_name, bi.x, bi.y, bi.z, at_block, at_warp, b.n - b.live);
        std::abort();
    }
    emu_race_block_end(b);
}

// ---- the pool and launches -----------------------------------------------------------------------------------
struct EmuJob {
    void (*call)(void*);
    void* call_ctx;
    const char* name;
    dim3 grid, block;
    unsigned total = 0, next = 0, done = 0;  // blocks: in the grid, handed out, finished (under the pool's lock)
    uint64_t seed = 0;
    uint64_t id = 0;  // the process's launch count at this launch
};

struct EmuPool {
    std::mutex m;
    std::condition_variable work, finished;
    std::vector<EmuJob*> jobs;  // launches with blocks not yet handed out, oldest first
    unsigned threads = 1;       // OS threads running blocks, the launching thread included
    std::atomic<uint64_t> launches{0};
};

// This OS thread's block state, reused from block to block (its fiber stacks included).
EMU_RT inline EmuBlock& emu_this_block() {
    static thread_local EmuBlock block;
    return block;
}

// Takes the next block of `job` (the lock held); false when all are handed out.
inline bool emu_take_block(EmuPool& pool, EmuJob& job, unsigned& index) {
    if (job.next >= job.total) return false;
    index = job.next++;
    if (job.next == job.total) pool.jobs.erase(std::find(pool.jobs.begin(), pool.jobs.end(), &job));
    return true;
}

EMU_RT inline void emu_run_job_block(EmuJob& job, unsigned index) {
    EmuBlock& b = emu_this_block();
    unsigned n = job.block.x * job.block.y * job.block.z;
    if (b.n != n || b.threads.size() < n) {
        b.n = n;
        b.n_warps = (n + 31) / 32;
        b.threads.resize(n);
        b.ready.assign(n, 0);
        b.warp_live.assign(b.n_warps, 0);
        b.warp_arrived.assign(b.n_warps, 0);
        b.warp_shfl_waiting.assign(b.n_warps, 0);
        b.warp_orders.assign(b.n_warps, 0);
        b.tc.resize(b.n_warps * 2);
    }
    if (b.shape.x != job.block.x || b.shape.y != job.block.y || b.shape.z != job.block.z) {
        // Each thread's index, once per block shape rather than once per thread start (three divisions).
        for (unsigned t = 0; t < n; t++) {
            b.threads[t].linear = t;
            b.threads[t].idx = {t % job.block.x, (t / job.block.x) % job.block.y, t / (job.block.x * job.block.y)};
        }
        b.shape = job.block;
    }
    b.tls = &emu_tls;
    b.call = job.call;
    b.call_ctx = job.call_ctx;
    b.kernel_name = job.name;
    b.rng = job.seed ^ (0x2545f4914f6cdd1dull * (index + 1));
    b.launch_id = job.id;
    b.shuffle = emu_race_enabled();
    dim3 bi{index % job.grid.x, (index / job.grid.x) % job.grid.y, index / (job.grid.x * job.grid.y)};
    emu_tls.block_dim = job.block;
    emu_tls.grid_dim = job.grid;
    emu_block = &b;
    emu_run_block(b, bi);
    emu_block = nullptr;
}

inline void emu_worker_main(EmuPool* pool) {
    std::unique_lock<std::mutex> lock(pool->m);
    for (;;) {
        pool->work.wait(lock, [&] { return !pool->jobs.empty(); });
        EmuJob& job = *pool->jobs.front();
        unsigned index;
        if (!emu_take_block(*pool, job, index)) continue;
        lock.unlock();
        emu_run_job_block(job, index);
        lock.lock();
        if (++job.done == job.total) pool->finished.notify_all();
    }
}

inline EmuPool& emu_pool() {
    static EmuPool* pool = [] {
        auto* p = new EmuPool;  // never destroyed: its workers may outlive static destruction
        unsigned cores = std::max(1u, std::thread::hardware_concurrency());
        p->threads = (unsigned)emu_env_number("NC_SIM_THREADS", 1, 256, cores);
        for (unsigned i = 1; i < p->threads; i++) std::thread(emu_worker_main, p).detach();
        return p;
    }();
    return *pool;
}

// Resident launches: every block of the grid at once, each on an OS thread of its own (kept for later
// launches), for kernels whose blocks wait on blocks of other processes (the simulated driver's P2P ring): a
// GPU keeps such a kernel's few blocks resident together, while the pool above runs a few blocks at a time.
struct EmuResidentWorker {
    std::mutex m;
    std::condition_variable cv;
    EmuJob* job = nullptr;
    unsigned index = 0;
};
inline std::mutex emu_resident_m;
inline std::vector<EmuResidentWorker*> emu_resident_idle;

inline void emu_resident_main(EmuResidentWorker* w) {
    std::unique_lock<std::mutex> lock(w->m);
    for (;;) {
        w->cv.wait(lock, [&] { return w->job != nullptr; });
        EmuJob* job = w->job;
        unsigned index = w->index;
        lock.unlock();
        emu_run_job_block(*job, index);
        lock.lock();
        w->job = nullptr;
        {
            std::lock_guard<std::mutex> idle(emu_resident_m);
            emu_resident_idle.push_back(w);
        }
        EmuPool& pool = emu_pool();
        std::lock_guard<std::mutex> done(pool.m);
        if (++job->done == job->total) pool.finished.notify_all();  // the last touch of *job
    }
}

// Blocks 1.. on resident workers, block 0 on the calling thread.
inline void emu_launch_resident(EmuJob& job) {
    for (unsigned i = 1; i < job.total; i++) {
        EmuResidentWorker* w = nullptr;
        {
            std::lock_guard<std::mutex> lock(emu_resident_m);
            if (!emu_resident_idle.empty()) {
                w = emu_resident_idle.back();
                emu_resident_idle.pop_back();
            }
        }
        if (!w) {
            w = new EmuResidentWorker;  // never destroyed, as the pool's workers
            std::thread(emu_resident_main, w).detach();
        }
        std::lock_guard<std::mutex> lock(w->m);
        w->job = &job;
        w->index = i;
        w->cv.notify_one();
    }
    emu_run_job_block(job, 0);
    EmuPool& pool = emu_pool();
    std::unique_lock<std::mutex> lock(pool.m);
    job.done++;
    pool.finished.wait(lock, [&] { return job.done == job.total; });
}

// Runs call(call_ctx) as every thread of every block of the grid; returns when all have finished. `resident`:
// every block at once (emu_launch_resident).
inline void emu_launch(const char* name, void (*call)(void*), void* call_ctx, dim3 grid, dim3 block,
                       bool resident = false) {
    unsigned n = block.x * block.y * block.z;
    if (n == 0 || n > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0) {
        std::fprintf(stderr, "emu: kernel %s launched with grid (%u,%u,%u) block (%u,%u,%u): the block must have "
                             "1..1024 threads and the grid at least one block\n",
                     name, grid.x, grid.y, grid.z, block.x, block.y, block.z);
        std::abort();
    }
    EmuPool& pool = emu_pool();
    EmuJob job;
    job.call = call;
    job.call_ctx = call_ctx;
    job.name = name;
    job.grid = grid;
    job.block = block;
    job.total = grid.x * grid.y * grid.z;
    job.id = pool.launches.fetch_add(1) + 1;
    job.seed = emu_race_seed() + 0x9e3779b97f4a7c15ull * job.id;
    if (resident) return emu_launch_resident(job);
    std::unique_lock<std::mutex> lock(pool.m);
    pool.jobs.push_back(&job);
    pool.work.notify_all();
    unsigned index;
    while (emu_take_block(pool, job, index)) {
        lock.unlock();
        emu_run_job_block(job, index);
        lock.lock();
        job.done++;
    }
    pool.finished.wait(lock, [&] { return job.done == job.total; });
}

// The name race reports and errors give a kernel launched without one: its symbol where the dynamic
// symbol table has it (link with -rdynamic), else its address.
inline const char* emu_kernel_name(const void* fn) {
    static thread_local char buf[256];
    Dl_info info;
    if (fn && dladdr(fn, &info) && info.dli_sname) {
        int status = 0;
        char* pretty = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
        if (status != 0 || !pretty) return info.dli_sname;
        std::snprintf(buf, sizeof buf, "%s", pretty);
        std::free(pretty);
        return buf;
    }
    std::snprintf(buf, sizeof buf, "kernel@%p", fn);
    return buf;
}

template <class F, class... A>
void launch_named_as(bool resident, const char* name, F f, dim3 grid, dim3 block, A... args) {
    // Every thread calls the kernel with its own copies of the arguments. Not instrumented: reading the
    // captured arguments on the launching thread's stack is not the kernel's access.
    auto run = [&]() EMU_RT { f(args...); };
    using Run = decltype(run);
    emu_launch(name, [](void* r) { (*static_cast<Run*>(r))(); }, &run, grid, block, resident);
}
template <class F, class... A>
void launch_named(const char* name, F f, dim3 grid, dim3 block, A... args) {
    launch_named_as(false, name, f, grid, block, args...);
}
template <class F, class... A>
void launch(F f, dim3 grid, dim3 block, A... args) {
    const void* fn = nullptr;
    if constexpr (std::is_pointer_v<F>) fn = reinterpret_cast<const void*>(f);
    launch_named(emu_kernel_name(fn), f, grid, block, args...);
}
template <class... P, size_t... I>
void emu_launch_params(bool resident, const char* name, void (*kernel)(P...), dim3 grid, dim3 block, void** params,
                       std::index_sequence<I...>) {
    launch_named_as(resident, name, kernel, grid, block, *static_cast<std::remove_cv_t<P>*>(params[I])...);
}
// `resident`: every block at once (emu_launch_resident).
template <class... P>
void launch_params(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, void** params,
                   bool resident = false) {
    emu_launch_params(resident, name, kernel, grid, block, params, std::index_sequence_for<P...>{});
}

// The round-to-nearest intrinsics: one IEEE operation each (g++ in ISO C++ mode without -march contracts
// nothing, so these are exactly what the device computes).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
// Vector types and bit casts the bf16 kernels use (16-byte loads of 8 bf16, 8-byte stores of 4).
struct __align__(16) uint4 { unsigned x, y, z, w; };
struct __align__(8) uint2 { unsigned x, y; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
