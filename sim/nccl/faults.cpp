// Fault injection (off unless set; docs/simulated-gpu.md):
//   NC_SIM_NCCL_FAIL=R:N        the N-th collective call (1-based; all-reduce, reduce, broadcast, all-gather,
//                               reduce-scatter, counted per communicator) of rank R returns ncclSystemError
//                               at once, as a call NCCL refuses;
//   NC_SIM_NCCL_FAIL=R:N:async  that call is accepted, and when it runs on its stream it records ncclSystemError
//                               as the communicator's asynchronous error and never completes (until abort);
//   NC_SIM_NCCL_STUCK=R:N       that call never completes on rank R and reports nothing: a stuck peer.
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "state.h"

namespace nccl {

struct Injection {
    bool set = false;
    int rank = -1;
    unsigned long long call = 0;
    bool async = false;
};

// Parses "R:N" (and ":async" when allowed); false when malformed.
static bool parse(const char* v, bool allow_async, Injection& out) {
    if (!v || !*v) return true;
    int rank = -1, used = 0;
    unsigned long long call = 0;
    if (std::sscanf(v, "%d:%llu%n", &rank, &call, &used) != 2 || rank < 0 || call < 1) return false;
    const char* rest = v + used;
    bool async = false;
    if (allow_async && std::strcmp(rest, ":async") == 0)
        async = true;
    else if (*rest)
        return false;
    out = {true, rank, call, async};
    return true;
}

static bool g_valid = true;
static Injection g_fail, g_stuck;

static bool load() {
    bool ok = true;
    if (!parse(std::getenv("NC_SIM_NCCL_FAIL"), true, g_fail)) {
        refuse(ncclInvalidArgument, "NC_SIM_NCCL_FAIL=%s: write RANK:CALL (e.g. 1:3, the third collective call of "
               "rank 1 fails) or RANK:CALL:async, or unset it", std::getenv("NC_SIM_NCCL_FAIL"));
        ok = false;
    }
    if (!parse(std::getenv("NC_SIM_NCCL_STUCK"), false, g_stuck)) {
        refuse(ncclInvalidArgument, "NC_SIM_NCCL_STUCK=%s: write RANK:CALL (e.g. 1:3, the third collective call "
               "of rank 1 never completes), or unset it", std::getenv("NC_SIM_NCCL_STUCK"));
        ok = false;
    }
    return ok;
}

bool faults_valid() {
    static bool once = (g_valid = load(), true);
    (void)once;
    return g_valid;
}

Fault fault_for(int rank, uint64_t call) {
    if (!faults_valid()) return Fault::NONE;
    if (g_fail.set && g_fail.rank == rank && g_fail.call == call) return g_fail.async ? Fault::FAIL_ASYNC : Fault::FAIL_NOW;
    if (g_stuck.set && g_stuck.rank == rank && g_stuck.call == call) return Fault::STUCK;
    return Fault::NONE;
}

}  // namespace nccl
