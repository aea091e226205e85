// The collectives: all-reduce, reduce, broadcast, all-gather and reduce-scatter, any data type for the ones
// that only move bytes, ncclFloat32 and ncclBfloat16 for the sums; ncclSum only. Each call is checked on the
// host (communicator, type, op, root, the device ranges it reads and writes), then queued on its stream
// through ncsim_enqueue: it runs on the stream's worker, in stream order, asynchronously to the caller, and
// holds that worker until every rank has taken part, as NCCL's kernel holds its stream. Calls between
// ncclGroupStart and ncclGroupEnd are queued at ncclGroupEnd, in call order, one piece of work per stream.
//
// Arithmetic (the same on every rank, so every rank gets the same bits, and the same from run to run):
// - ncclFloat32: element i is ((x_0 + x_1) + x_2) + ... in rank order, each addition rounded to f32 (the
//   library is built with -ffp-contract=off);
// - ncclBfloat16: the same order, as a ring passes a partial sum from rank to rank: each hop adds the next
//   rank's value in f32 and rounds the partial sum to bf16 (nearest even), so a sum of n values is rounded
//   n - 1 times. NCCL's own order and precision depend on its algorithm and topology; this is one of them.
// In place is allowed as NCCL allows it (all-reduce, reduce and broadcast with sendbuff == recvbuff;
// all-gather with sendbuff == recvbuff + rank * sendcount; reduce-scatter with recvbuff == sendbuff + rank *
// recvcount): every rank's contribution is copied into the shared segment before anything is written.
#include <cstdio>
#include <cstring>
#include <vector>

#include "ncsim_bf16.h"
#include "state.h"

namespace nccl {

const char* kind_name(int kind) {
    switch (kind) {
        case ALL_REDUCE: return "ncclAllReduce";
        case REDUCE: return "ncclReduce";
        case BROADCAST: return "ncclBroadcast";
        case ALL_GATHER: return "ncclAllGather";
        case REDUCE_SCATTER: return "ncclReduceScatter";
        default: return "?";
    }
}

const char* dtype_name(int dtype) {
    static const char* names[] = {"int8",  "uint8",   "int32",   "uint32", "int64",    "uint64",
                                  "float16", "float32", "float64", "bfloat16", "float8e4m3", "float8e5m2"};
    return dtype >= 0 && dtype < ncclNumTypes ? names[dtype] : "unknown type";
}

size_t dtype_bytes(int dtype) {
    static const size_t bytes[] = {1, 1, 4, 4, 8, 8, 2, 4, 8, 2, 1, 1};
    return dtype >= 0 && dtype < ncclNumTypes ? bytes[dtype] : 0;
}

// One queued collective.
struct Op {
    Comm* comm = nullptr;
    int kind = 0;
    const unsigned char* send = nullptr;
    unsigned char* recv = nullptr;
    size_t count = 0;  // elements: per rank for all-gather (sendcount) and reduce-scatter (recvcount)
    int dtype = 0;
    int root = -1;
    uint64_t index = 0;  // its number among the communicator's collective calls
    Fault fault = Fault::NONE;
    cudaStream_t stream = nullptr;
};

// One rank-order sum per element (see the top of the file): out[i] = the sum over ranks of slot_p[offset + i],
// with `add` the element type's addition.
template <class T, class Add>
static void sum_slots_as(const Comm* c, size_t offset_bytes, size_t len, unsigned char* out, Add add) {
    for (size_t i = 0; i < len; i++) {
        T acc;
        std::memcpy(&acc, slot_of(c, 0) + offset_bytes + sizeof(T) * i, sizeof(T));
        for (int p = 1; p < c->nranks; p++) {
            T x;
            std::memcpy(&x, slot_of(c, p) + offset_bytes + sizeof(T) * i, sizeof(T));
            acc = add(acc, x);
        }
        std::memcpy(out + sizeof(T) * i, &acc, sizeof(T));
    }
}

// out[i] = the sum over ranks of slot_p[offset + i], in rank order: f32 additions, or for bf16 each partial sum
// rounded to bf16 (nearest even; a NaN stays a quiet NaN of the same sign).
static void sum_slots(const Comm* c, size_t offset_bytes, size_t len, int dtype, unsigned char* out) {
    if (dtype == ncclFloat32) {
        sum_slots_as<float>(c, offset_bytes, len, out, [](float acc, float x) { return acc + x; });
    } else {
        sum_slots_as<uint16_t>(c, offset_bytes, len, out, [](uint16_t acc, uint16_t x) {
            return ncsim_bf16::f32_to_bf16_quiet_nan(ncsim_bf16::bf16_to_f32(acc) + ncsim_bf16::bf16_to_f32(x));
        });
    }
}

// step_post with a lambda filling this rank's slot.
template <class F>
static bool post(Comm* c, const StepDesc& d, F&& fill) {
    return step_post(
        c, d, [](void* slot, void* f) { (*static_cast<std::remove_reference_t<F>*>(f))(static_cast<unsigned char*>(slot)); },
        &fill);
}

// Runs one collective through the segment, step by step; false when it stopped (abort, or an error that
// keeps it from ever completing).
static bool execute(const Op& op) {
    Comm* c = op.comm;
    const size_t e = dtype_bytes(op.dtype);
    const int n = c->nranks, me = c->rank;
    StepDesc d;
    d.collective = op.index;
    d.kind = op.kind;
    d.dtype = op.dtype;
    d.count = op.count;
    d.root = op.root;
    // elements of one step: a slot's worth, for reduce-scatter a slot shared by the n destinations
    const size_t per = op.kind == REDUCE_SCATTER ? slot_bytes(c) / (e * n) : slot_bytes(c) / e;
    for (size_t off = 0; off < op.count; off += per) {
        const size_t len = std::min(per, op.count - off), bytes = len * e;
        bool ok = false;
        switch (op.kind) {
            case ALL_REDUCE:
            case REDUCE:
                ok = post(c, d, [&](unsigned char* slot) { std::memcpy(slot, op.send + off * e, bytes); });
                if (ok && (op.kind == ALL_REDUCE || me == op.root)) sum_slots(c, 0, len, op.dtype, op.recv + off * e);
                break;
            case BROADCAST:
                ok = post(c, d, [&](unsigned char* slot) {
                    if (me == op.root) std::memcpy(slot, op.send + off * e, bytes);
                });
                if (ok && (me != op.root || op.recv != op.send))
                    std::memcpy(op.recv + off * e, slot_of(c, op.root), bytes);
                break;
            case ALL_GATHER:
                ok = post(c, d, [&](unsigned char* slot) { std::memcpy(slot, op.send + off * e, bytes); });
                if (ok)
                    for (int p = 0; p < n; p++)
                        std::memmove(op.recv + (size_t(p) * op.count + off) * e, slot_of(c, p), bytes);
                break;
            case REDUCE_SCATTER:
                ok = post(c, d, [&](unsigned char* slot) {
                    for (int dst = 0; dst < n; dst++)
                        std::memcpy(slot + dst * per * e, op.send + (size_t(dst) * op.count + off) * e, bytes);
                });
                if (ok) sum_slots(c, me * per * e, len, op.dtype, op.recv + off * e);
                break;
        }
        if (!ok) return false;
        step_done(c);
    }
    return true;
}

// The injected faults that take effect on the stream, then the collective.
static void run_op(const Op& op) {
    Comm* c = op.comm;
    {
        std::lock_guard<std::mutex> lock(c->m);
        if (c->closed || c->aborted.load()) {
            c->finished++;
            c->cv.notify_all();
            return;
        }
        c->running = true;
    }
    if (op.fault == Fault::FAIL_ASYNC) {
        set_async_error(c, ncclSystemError, "collective call #%llu (%s) failed on the device: injected by "
                        "NC_SIM_NCCL_FAIL=%d:%llu:async", (unsigned long long)op.index, kind_name(op.kind), c->rank,
                        (unsigned long long)op.index);
        block_until_abort(c);
    } else if (op.fault == Fault::STUCK) {
        std::fprintf(stderr, "nc-sim NCCL: rank %d: collective call #%llu (%s) will never complete: injected by "
                     "NC_SIM_NCCL_STUCK\n", c->rank, (unsigned long long)op.index, kind_name(op.kind));
        block_until_abort(c);
    } else if (c->async_error.load() != ncclSuccess || !execute(op)) {
        // a communicator with an error never completes a collective again, until it is aborted
        block_until_abort(c);
    }
    {
        std::lock_guard<std::mutex> lock(c->m);
        c->running = false;
        c->finished++;
    }
    c->cv.notify_all();
}

static void run_batch(void* ctx) {
    auto* ops = static_cast<std::vector<Op>*>(ctx);
    for (const Op& op : *ops) run_op(op);
    delete ops;
}

// The device ranges an op reads and writes (count > 0): (pointer, bytes, is_write).
struct Range {
    const void* ptr;
    size_t bytes;
    int is_write;
};
static int ranges_of(const Op& op, Range out[2]) {
    const size_t e = dtype_bytes(op.dtype), n = size_t(op.comm->nranks), b = op.count * e;
    const bool root = op.comm->rank == op.root;
    int k = 0;
    switch (op.kind) {
        case ALL_REDUCE: out[k++] = {op.send, b, 0}, out[k++] = {op.recv, b, 1}; break;
        case REDUCE:
            out[k++] = {op.send, b, 0};
            if (root) out[k++] = {op.recv, b, 1};
            break;
        case BROADCAST:
            if (root) out[k++] = {op.send, b, 0};
            out[k++] = {op.recv, b, 1};
            break;
        case ALL_GATHER: out[k++] = {op.send, b, 0}, out[k++] = {op.recv, b * n, 1}; break;
        case REDUCE_SCATTER: out[k++] = {op.send, b * n, 0}, out[k++] = {op.recv, b, 1}; break;
    }
    return k;
}

// Queues `ops` (in order; one piece of work per run of ops on the same stream).
static ncclResult_t enqueue_ops(std::vector<Op>& ops, const char* call) {
    const Ncsim* sim = ncsim(call);
    if (!sim) return ncclUnhandledCudaError;
    size_t i = 0;
    while (i < ops.size()) {
        size_t j = i;
        auto* batch = new std::vector<Op>();
        for (; j < ops.size() && ops[j].stream == ops[i].stream; j++) {
            Range r[2];
            int k = ops[j].count ? ranges_of(ops[j], r) : 0;
            for (int x = 0; x < k; x++) sim->declare_access(r[x].ptr, r[x].bytes, r[x].is_write);
            std::lock_guard<std::mutex> lock(ops[j].comm->m);
            ops[j].comm->queued++;
            batch->push_back(ops[j]);
        }
        const char* what = batch->size() == 1 ? kind_name((*batch)[0].kind) : "NCCL group";
        if (int r = sim->enqueue(ops[i].stream, run_batch, batch, what)) {
            for (const Op& op : *batch) {
                std::lock_guard<std::mutex> lock(op.comm->m);
                op.comm->queued--;
            }
            delete batch;
            return refuse(ncclUnhandledCudaError, "%s: the simulated driver refused to queue on stream %p (CUresult "
                          "%d)", call, ops[i].stream, r);
        }
        i = j;
    }
    return ncclSuccess;
}

static thread_local int t_group_depth = 0;
static thread_local std::vector<Op> t_group;

// Checks a collective call, then queues it (or keeps it for ncclGroupEnd).
static ncclResult_t submit(Op op, ncclComm_t comm, ncclRedOp_t red, bool reduces) {
    const char* call = kind_name(op.kind);
    Comm* c = live_comm(comm, call);
    if (!c) return ncclInvalidArgument;
    op.comm = c;
    if (dtype_bytes(op.dtype) == 0)
        return refuse(ncclInvalidArgument, "%s: data type %d is not an ncclDataType_t", call, op.dtype);
    if (reduces && red != ncclSum)
        return refuse(ncclInvalidArgument, "%s: reduction op %d: the simulated NCCL implements ncclSum only", call,
                      int(red));
    if (reduces && op.dtype != ncclFloat32 && op.dtype != ncclBfloat16)
        return refuse(ncclInvalidArgument, "%s: the simulated NCCL sums ncclFloat32 and ncclBfloat16 only, not %s",
                      call, dtype_name(op.dtype));
    if ((op.kind == REDUCE || op.kind == BROADCAST) && (op.root < 0 || op.root >= c->nranks))
        return refuse(ncclInvalidArgument, "%s: root %d is not a rank of this communicator (0..%d)", call, op.root,
                      c->nranks - 1);
    const Ncsim* sim = ncsim(call);
    if (!sim) return ncclUnhandledCudaError;
    if (op.count) {
        Range r[2];
        int k = ranges_of(op, r);
        for (int x = 0; x < k; x++) {
            if (!r[x].ptr)
                return refuse(ncclInvalidArgument, "%s: %s is NULL", call, r[x].is_write ? "recvbuff" : "sendbuff");
            // the driver ends the process on a range outside device memory, naming the call and the allocation
            if (sim->check_range(r[x].ptr, r[x].bytes, r[x].is_write, call) != 0)
                return refuse(ncclInvalidArgument, "%s: %zu bytes at %p are not device memory", call, r[x].bytes,
                              r[x].ptr);
        }
    }
    op.index = ++c->calls;
    op.fault = fault_for(c->rank, op.index);
    if (op.fault == Fault::FAIL_NOW)
        return refuse(ncclSystemError, "rank %d: %s (collective call #%llu) failed: injected by NC_SIM_NCCL_FAIL=%d:%llu",
                      c->rank, call, (unsigned long long)op.index, c->rank, (unsigned long long)op.index);
    char detail[160];
    std::snprintf(detail, sizeof detail, "%s %s count=%zu root=%d rank=%d of %d", call, dtype_name(op.dtype), op.count,
                  op.root, c->rank, c->nranks);
    sim->trace("nccl", detail);
    if (t_group_depth > 0) {
        t_group.push_back(op);
        return ncclSuccess;
    }
    std::vector<Op> one{op};
    return enqueue_ops(one, call);
}

static Op make(int kind, const void* send, void* recv, size_t count, ncclDataType_t dtype, int root,
               cudaStream_t stream) {
    Op op;
    op.kind = kind;
    op.send = static_cast<const unsigned char*>(send);
    op.recv = static_cast<unsigned char*>(recv);
    op.count = count;
    op.dtype = int(dtype);
    op.root = root;
    op.stream = stream;
    return op;
}

}  // namespace nccl

using namespace nccl;

NCCL_API ncclResult_t ncclAllReduce(const void* sendbuff, void* recvbuff, size_t count, ncclDataType_t datatype,
                                    ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream) {
    return submit(make(ALL_REDUCE, sendbuff, recvbuff, count, datatype, -1, stream), comm, op, true);
}

NCCL_API ncclResult_t ncclReduce(const void* sendbuff, void* recvbuff, size_t count, ncclDataType_t datatype,
                                 ncclRedOp_t op, int root, ncclComm_t comm, cudaStream_t stream) {
    return submit(make(REDUCE, sendbuff, recvbuff, count, datatype, root, stream), comm, op, true);
}

NCCL_API ncclResult_t ncclBroadcast(const void* sendbuff, void* recvbuff, size_t count, ncclDataType_t datatype,
                                    int root, ncclComm_t comm, cudaStream_t stream) {
    return submit(make(BROADCAST, sendbuff, recvbuff, count, datatype, root, stream), comm, ncclSum, false);
}

// The legacy in-place broadcast.
NCCL_API ncclResult_t ncclBcast(void* buff, size_t count, ncclDataType_t datatype, int root, ncclComm_t comm,
                                cudaStream_t stream) {
    return submit(make(BROADCAST, buff, buff, count, datatype, root, stream), comm, ncclSum, false);
}

NCCL_API ncclResult_t ncclAllGather(const void* sendbuff, void* recvbuff, size_t sendcount, ncclDataType_t datatype,
                                    ncclComm_t comm, cudaStream_t stream) {
    return submit(make(ALL_GATHER, sendbuff, recvbuff, sendcount, datatype, -1, stream), comm, ncclSum, false);
}

NCCL_API ncclResult_t ncclReduceScatter(const void* sendbuff, void* recvbuff, size_t recvcount,
                                        ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm,
                                        cudaStream_t stream) {
    return submit(make(REDUCE_SCATTER, sendbuff, recvbuff, recvcount, datatype, -1, stream), comm, op, true);
}

NCCL_API ncclResult_t ncclGroupStart() {
    t_group_depth++;
    return ncclSuccess;
}

NCCL_API ncclResult_t ncclGroupEnd() {
    if (t_group_depth == 0) return refuse(ncclInvalidUsage, "ncclGroupEnd: no ncclGroupStart is open on this thread");
    if (--t_group_depth > 0) return ncclSuccess;
    std::vector<Op> ops;
    ops.swap(t_group);
    return enqueue_ops(ops, "ncclGroupEnd");
}
