// Unique ids, communicators, errors and the version.
//
// A unique id names a shared-memory segment: a 16-byte tag, then "/ncsim-nccl-<pid>-<counter>-<nonce>"
// (NUL-terminated). ncclCommInitRank maps it (segment.cpp) and returns when every rank has joined, as NCCL's
// does. ncclCommAbort makes this process's blocked and queued work of the communicator return at once (the
// buffers then hold whatever they held); ncclCommDestroy waits for the communicator's queued work to finish
// first, as NCCL's (which finalizes first) does. Either way the handle is dead afterwards: any later call with
// it is refused, naming it.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "state.h"

namespace nccl {

static const char ID_TAG[16] = "ncsim-nccl-id1";

static std::mutex g_comms_mutex;
static std::vector<Comm*> g_comms;  // live communicators
// ncclGetLastError(NULL)'s text: the last refusal in this process.
static std::mutex g_last_mutex;
static char g_last_error[1024];

static void vrefuse_line(const char* fmt, va_list ap) {
    char line[1024];
    std::vsnprintf(line, sizeof line, fmt, ap);
    std::fprintf(stderr, "nc-sim NCCL: %s\n", line);
    std::fflush(stderr);
    std::lock_guard<std::mutex> lock(g_last_mutex);
    std::snprintf(g_last_error, sizeof g_last_error, "%s", line);
}

ncclResult_t refuse(ncclResult_t code, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vrefuse_line(fmt, ap);
    va_end(ap);
    return code;
}

const char* result_name(ncclResult_t r) {
    static const char* names[] = {"ncclSuccess",      "ncclUnhandledCudaError", "ncclSystemError",
                                  "ncclInternalError", "ncclInvalidArgument",   "ncclInvalidUsage",
                                  "ncclRemoteError",  "ncclInProgress",         "ncclTimeout"};
    return r >= 0 && r < ncclNumResults ? names[r] : "unknown ncclResult_t";
}

Comm* live_comm(ncclComm_t handle, const char* call) {
    auto* c = reinterpret_cast<Comm*>(handle);
    {
        std::lock_guard<std::mutex> lock(g_comms_mutex);
        if (c && std::find(g_comms.begin(), g_comms.end(), c) != g_comms.end()) return c;
    }
    refuse(ncclInvalidArgument, "%s: communicator %p is not a live communicator (never initialized, destroyed or "
           "aborted)", call, static_cast<void*>(handle));
    return nullptr;
}

void set_async_error(Comm* c, ncclResult_t code, const char* fmt, ...) {
    char text[768];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    int expected = ncclSuccess;
    // the first error stays, as NCCL's does
    if (!c->async_error.compare_exchange_strong(expected, code)) return;
    {
        std::lock_guard<std::mutex> lock(c->m);
        c->last_error = text;
    }
    std::fprintf(stderr, "nc-sim NCCL: rank %d: asynchronous error %s: %s\n", c->rank, result_name(code), text);
    std::fflush(stderr);
}

}  // namespace nccl

using namespace nccl;

NCCL_API ncclResult_t ncclGetVersion(int* version) {
    if (!version) return refuse(ncclInvalidArgument, "ncclGetVersion: version is NULL");
    *version = NCSIM_NCCL_VERSION;
    return ncclSuccess;
}

NCCL_API const char* ncclGetErrorString(ncclResult_t result) {
    switch (result) {
        case ncclSuccess: return "no error";
        case ncclUnhandledCudaError: return "unhandled cuda error (run with NCCL_DEBUG=INFO for details)";
        case ncclSystemError: return "unhandled system error (run with NCCL_DEBUG=INFO for details)";
        case ncclInternalError: return "internal error - please report this issue to the NCCL developers";
        case ncclInvalidArgument: return "invalid argument (run with NCCL_DEBUG=WARN for details)";
        case ncclInvalidUsage: return "invalid usage (run with NCCL_DEBUG=WARN for details)";
        case ncclRemoteError: return "remote process exited or there was a network error";
        case ncclInProgress: return "NCCL operation in progress";
        case ncclTimeout: return "NCCL operation timed out";
        default: return "unknown result code";
    }
}

// The text of the last error: of `comm` when it has an asynchronous one, else the last refusal in this process.
NCCL_API const char* ncclGetLastError(ncclComm_t comm) {
    static thread_local std::string copy;
    auto* c = reinterpret_cast<Comm*>(comm);
    bool live = false;
    {
        std::lock_guard<std::mutex> lock(g_comms_mutex);
        live = c && std::find(g_comms.begin(), g_comms.end(), c) != g_comms.end();
    }
    if (live) {
        std::lock_guard<std::mutex> lock(c->m);
        if (!c->last_error.empty()) return (copy = c->last_error).c_str();
    }
    std::lock_guard<std::mutex> lock(g_last_mutex);
    return (copy = g_last_error).c_str();
}

NCCL_API ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
    if (!id) return refuse(ncclInvalidArgument, "ncclGetUniqueId: uniqueId is NULL");
    static std::atomic<unsigned> counter{0};
    std::random_device rd;
    unsigned long long nonce = (unsigned long long)rd() << 32 ^ rd() ^
                               (unsigned long long)std::chrono::steady_clock::now().time_since_epoch().count();
    std::memset(id->internal, 0, sizeof id->internal);
    std::memcpy(id->internal, ID_TAG, sizeof ID_TAG);
    std::snprintf(id->internal + sizeof ID_TAG, sizeof id->internal - sizeof ID_TAG, "/ncsim-nccl-%d-%u-%llx",
                  int(getpid()), counter.fetch_add(1), nonce);
    return ncclSuccess;
}

NCCL_API ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank) {
    const char* call = "ncclCommInitRank";
    if (!comm) return refuse(ncclInvalidArgument, "%s: comm is NULL", call);
    if (nranks < 1 || nranks > MAX_RANKS)
        return refuse(ncclInvalidArgument, "%s: nranks %d: the simulated NCCL takes 1 to %d ranks", call, nranks,
                      MAX_RANKS);
    if (rank < 0 || rank >= nranks)
        return refuse(ncclInvalidArgument, "%s: rank %d is not in [0, %d)", call, rank, nranks);
    if (std::memcmp(id.internal, ID_TAG, sizeof ID_TAG) != 0 || id.internal[sizeof id.internal - 1] != 0)
        return refuse(ncclInvalidArgument, "%s: the unique id was not made by the simulated NCCL's "
                      "ncclGetUniqueId (every rank must get rank 0's id, byte for byte)", call);
    if (!faults_valid()) return ncclInvalidArgument;
    const Ncsim* sim = ncsim(call);
    if (!sim) return ncclUnhandledCudaError;
    auto* c = new Comm();
    c->rank = rank;
    c->nranks = nranks;
    c->device = std::max(0, sim->current_device());
    if (ncclResult_t r = segment_join(c, id.internal + sizeof ID_TAG)) {
        delete c;
        return r;
    }
    {
        std::lock_guard<std::mutex> lock(g_comms_mutex);
        g_comms.push_back(c);
    }
    *comm = reinterpret_cast<ncclComm_t>(c);
    return ncclSuccess;
}

// Takes `c` out of the live list (later calls with it are refused); false when it was not live.
static bool retire(Comm* c) {
    std::lock_guard<std::mutex> lock(g_comms_mutex);
    auto it = std::find(g_comms.begin(), g_comms.end(), c);
    if (it == g_comms.end()) return false;
    g_comms.erase(it);
    return true;
}

// Closes the communicator once no collective of it runs (queued ones then do nothing) and unmaps its segment.
static void close_when_idle(Comm* c) {
    std::unique_lock<std::mutex> lock(c->m);
    c->cv.wait(lock, [&] { return !c->running; });
    c->closed = true;
    segment_unmap(c);
}

NCCL_API ncclResult_t ncclCommAbort(ncclComm_t comm) {
    Comm* c = live_comm(comm, "ncclCommAbort");
    if (!c) return ncclInvalidArgument;
    retire(c);
    c->aborted.store(true);
    segment_wake_all(c);
    close_when_idle(c);
    return ncclSuccess;
}

NCCL_API ncclResult_t ncclCommDestroy(ncclComm_t comm) {
    Comm* c = live_comm(comm, "ncclCommDestroy");
    if (!c) return ncclInvalidArgument;
    retire(c);
    {
        // finalize: the queued collectives run first (an abort from another thread ends the wait)
        std::unique_lock<std::mutex> lock(c->m);
        c->cv.wait(lock, [&] { return c->finished == c->queued || c->aborted.load(); });
    }
    close_when_idle(c);
    return ncclSuccess;
}

NCCL_API ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* asyncError) {
    Comm* c = live_comm(comm, "ncclCommGetAsyncError");
    if (!c) return ncclInvalidArgument;
    if (!asyncError) return refuse(ncclInvalidArgument, "ncclCommGetAsyncError: asyncError is NULL");
    *asyncError = ncclResult_t(c->async_error.load());
    return ncclSuccess;
}

// The queries of one of a live communicator's fields: *out = c->*field. `out_name` names the parameter.
static ncclResult_t query(ncclComm_t comm, const char* call, int* out, const char* out_name, int Comm::*field) {
    Comm* c = live_comm(comm, call);
    if (!c) return ncclInvalidArgument;
    if (!out) return refuse(ncclInvalidArgument, "%s: %s is NULL", call, out_name);
    *out = c->*field;
    return ncclSuccess;
}

NCCL_API ncclResult_t ncclCommCount(ncclComm_t comm, int* count) {
    return query(comm, "ncclCommCount", count, "count", &Comm::nranks);
}

NCCL_API ncclResult_t ncclCommUserRank(ncclComm_t comm, int* rank) {
    return query(comm, "ncclCommUserRank", rank, "rank", &Comm::rank);
}

NCCL_API ncclResult_t ncclCommCuDevice(ncclComm_t comm, int* device) {
    return query(comm, "ncclCommCuDevice", device, "device", &Comm::device);
}
