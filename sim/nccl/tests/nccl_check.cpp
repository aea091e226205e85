// Checks of the simulated NCCL (sim/nccl/) on the fake ncsim of sim/blas/tests/fake_ncsim.cpp ("device memory"
// is host memory; work queued on a stream runs at fake_sync(), on the calling thread). The parent makes a
// unique id and forks one process per rank; each rank runs the same script of collectives and compares every
// result with a reference computed here, independently of the library:
//   - all-reduce, reduce (every root), broadcast (every root), all-gather, reduce-scatter, in f32 and bf16,
//     out of place and in place, with counts that need several steps of a small slot (NC_SIM_NCCL_SLOT_BYTES);
//     f32 sums in rank order, bf16 sums rounded to bf16 at every hop (docs/simulated-gpu.md);
//   - a group of reduces to different roots, queued at ncclGroupEnd and not before;
//   - refusals: ncclMax, an int32 sum, a root out of range, a made-up communicator, an unimplemented entry
//     point, a unique id not made by ncclGetUniqueId;
//   - ranks whose calls differ get ncclInvalidUsage as their asynchronous error, and ncclCommAbort from another
//     thread releases the stream they block;
//   - a peer that exits while the others wait: ncclRemoteError naming it, then abort releases them.
// Prints "N checks, F failed" last; exits non-zero on a failure.
//
// Build (tests/tests/sim_nccl.rs): the fake driver as libcuda.so.1, the stand-in as libnccl.so.2, and this file
// linked against both.
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdarg>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "../../blas/tests/fake_ncsim.h"
#include "../nccl_abi.h"

extern "C" {
ncclResult_t ncclGetUniqueId(ncclUniqueId*);
ncclResult_t ncclCommInitRank(ncclComm_t*, int, ncclUniqueId, int);
ncclResult_t ncclAllReduce(const void*, void*, size_t, ncclDataType_t, ncclRedOp_t, ncclComm_t, cudaStream_t);
ncclResult_t ncclReduce(const void*, void*, size_t, ncclDataType_t, ncclRedOp_t, int, ncclComm_t, cudaStream_t);
ncclResult_t ncclBroadcast(const void*, void*, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t);
ncclResult_t ncclAllGather(const void*, void*, size_t, ncclDataType_t, ncclComm_t, cudaStream_t);
ncclResult_t ncclReduceScatter(const void*, void*, size_t, ncclDataType_t, ncclRedOp_t, ncclComm_t, cudaStream_t);
ncclResult_t ncclGroupStart();
ncclResult_t ncclGroupEnd();
ncclResult_t ncclCommAbort(ncclComm_t);
ncclResult_t ncclCommDestroy(ncclComm_t);
ncclResult_t ncclCommGetAsyncError(ncclComm_t, ncclResult_t*);
const char* ncclGetLastError(ncclComm_t);
ncclResult_t ncclSend(const void*, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t);
}

namespace {

int g_checks = 0, g_failed = 0;
int g_rank = -1;

void check(bool ok, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
void check(bool ok, const char* fmt, ...) {
    g_checks++;
    if (ok) return;
    g_failed++;
    if (g_failed > 20) return;
    char what[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    fprintf(stderr, "rank %d: FAILED: %s\n", g_rank, what);
}

constexpr int NRANKS = 3;
cudaStream_t const STREAM = reinterpret_cast<cudaStream_t>(0x5);

// A value that differs by rank and element, with low bits set so the order of a sum matters in f32 and bf16.
float input(int rank, size_t i, int salt) {
    uint32_t h = uint32_t(rank * 7919 + salt * 104729) ^ uint32_t(i * 2654435761u);
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    h ^= h >> 15;
    return (float(h % 200001) - 100000.0f) / 1024.0f + 1.0f / float(1 + rank);
}

// The reference bf16 rounding, written here from its definition (nearest even on the 16 bits dropped).
uint16_t ref_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    uint32_t low = u & 0xffffu, high = u >> 16;
    if (low > 0x8000u || (low == 0x8000u && (high & 1u))) high++;
    return uint16_t(high);
}
float ref_f32(uint16_t h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// Element i of the sum over ranks of input(r, i, salt), in the stand-in's documented order and precision.
float ref_sum_f32(size_t i, int salt) {
    volatile float acc = input(0, i, salt);
    for (int r = 1; r < NRANKS; r++) acc = acc + input(r, i, salt);
    return acc;
}
uint16_t ref_sum_bf16(size_t i, int salt) {
    uint16_t acc = ref_bf16(input(0, i, salt));
    for (int r = 1; r < NRANKS; r++) acc = ref_bf16(ref_f32(acc) + ref_f32(ref_bf16(input(r, i, salt))));
    return acc;
}

// A device buffer of n elements of the type, filled with input(rank, offset + i, salt).
void* filled(size_t n, bool bf16, int rank, int salt, size_t offset = 0) {
    void* p = fake_alloc(n * (bf16 ? 2 : 4));
    for (size_t i = 0; i < n; i++) {
        float v = input(rank, offset + i, salt);
        if (bf16) {
            uint16_t h = ref_bf16(v);
            std::memcpy(static_cast<char*>(p) + 2 * i, &h, 2);
        } else {
            std::memcpy(static_cast<char*>(p) + 4 * i, &v, 4);
        }
    }
    return p;
}

// Element i of a device buffer as raw bits (f32 or bf16).
uint32_t bits(const void* p, size_t i, bool bf16) {
    if (bf16) {
        uint16_t h;
        std::memcpy(&h, static_cast<const char*>(p) + 2 * i, 2);
        return h;
    }
    uint32_t u;
    std::memcpy(&u, static_cast<const char*>(p) + 4 * i, 4);
    return u;
}
uint32_t input_bits(int rank, size_t i, int salt, bool bf16) {
    float v = input(rank, i, salt);
    if (bf16) return ref_bf16(v);
    uint32_t u;
    std::memcpy(&u, &v, 4);
    return u;
}
uint32_t sum_bits(size_t i, int salt, bool bf16) {
    if (bf16) return ref_sum_bf16(i, salt);
    float v = ref_sum_f32(i, salt);
    uint32_t u;
    std::memcpy(&u, &v, 4);
    return u;
}

// Counts every element of `p` against `want(i)`; one check per buffer (the first wrong element named).
template <class F>
void expect_all(const char* what, const void* p, size_t n, bool bf16, F want) {
    size_t wrong = 0, first = 0;
    for (size_t i = 0; i < n; i++)
        if (bits(p, i, bf16) != want(i) && wrong++ == 0) first = i;
    check(wrong == 0, "%s (%s): %zu of %zu elements wrong, first at %zu: 0x%x, want 0x%x", what, bf16 ? "bf16" : "f32",
          wrong, n, first, wrong ? bits(p, first, bf16) : 0, wrong ? want(first) : 0);
}

void run_and_expect_success(ncclResult_t r, const char* what) {
    check(r == ncclSuccess, "%s returned %d", what, int(r));
}

// The collectives of one type, out of place and in place. Counts span several 4096-byte slots.
void collectives(ncclComm_t comm, int rank, bool bf16) {
    const ncclDataType_t t = bf16 ? ncclBfloat16 : ncclFloat32;
    const size_t n = 2500, e = bf16 ? 2 : 4;
    int salt = bf16 ? 100 : 0;
    // all-reduce: out of place, then in place
    void* send = filled(n, bf16, rank, salt);
    void* recv = fake_alloc(n * e);
    run_and_expect_success(ncclAllReduce(send, recv, n, t, ncclSum, comm, STREAM), "ncclAllReduce");
    check(fake_pending() == 1, "the all-reduce is queued, not run, until the stream runs");
    fake_sync();
    expect_all("all-reduce", recv, n, bf16, [&](size_t i) { return sum_bits(i, salt, bf16); });
    expect_all("all-reduce leaves sendbuff", send, n, bf16, [&](size_t i) { return input_bits(rank, i, salt, bf16); });
    run_and_expect_success(ncclAllReduce(send, send, n, t, ncclSum, comm, STREAM), "ncclAllReduce in place");
    fake_sync();
    expect_all("all-reduce in place", send, n, bf16, [&](size_t i) { return sum_bits(i, salt, bf16); });
    // reduce to each root, in place: the root gets the sum, the others keep their input
    for (int root = 0; root < NRANKS; root++) {
        int s = salt + 1 + root;
        void* buf = filled(n, bf16, rank, s);
        run_and_expect_success(ncclReduce(buf, buf, n, t, ncclSum, root, comm, STREAM), "ncclReduce");
        fake_sync();
        if (rank == root)
            expect_all("reduce at the root", buf, n, bf16, [&](size_t i) { return sum_bits(i, s, bf16); });
        else
            expect_all("reduce elsewhere", buf, n, bf16, [&](size_t i) { return input_bits(rank, i, s, bf16); });
        fake_free(buf);
    }
    // broadcast from each root: in place, and out of place into a poisoned buffer
    for (int root = 0; root < NRANKS; root++) {
        int s = salt + 10 + root;
        void* buf = filled(n, bf16, rank, s);
        void* out = fake_alloc(n * e);
        run_and_expect_success(ncclBroadcast(buf, buf, n, t, root, comm, STREAM), "ncclBroadcast in place");
        run_and_expect_success(ncclBroadcast(buf, out, n, t, root, comm, STREAM), "ncclBroadcast");
        fake_sync();
        expect_all("broadcast in place", buf, n, bf16, [&](size_t i) { return input_bits(root, i, s, bf16); });
        expect_all("broadcast", out, n, bf16, [&](size_t i) { return input_bits(root, i, s, bf16); });
        fake_free(buf);
        fake_free(out);
    }
    // all-gather: out of place, and in place (sendbuff = recvbuff + rank * count)
    {
        int s = salt + 20;
        void* mine = filled(n, bf16, rank, s, size_t(rank) * n);
        void* all = fake_alloc(NRANKS * n * e);
        run_and_expect_success(ncclAllGather(mine, all, n, t, comm, STREAM), "ncclAllGather");
        void* inplace = fake_alloc(NRANKS * n * e);
        void* own = filled(n, bf16, rank, s, size_t(rank) * n);
        std::memcpy(static_cast<char*>(inplace) + rank * n * e, own, n * e);
        run_and_expect_success(
            ncclAllGather(static_cast<char*>(inplace) + rank * n * e, inplace, n, t, comm, STREAM),
            "ncclAllGather in place");
        fake_sync();
        auto want = [&](size_t i) { return input_bits(int(i / n), i, s, bf16); };
        expect_all("all-gather", all, NRANKS * n, bf16, want);
        expect_all("all-gather in place", inplace, NRANKS * n, bf16, want);
    }
    // reduce-scatter: out of place, and in place (recvbuff = sendbuff + rank * count)
    {
        int s = salt + 30;
        void* send_all = filled(NRANKS * n, bf16, rank, s);
        void* out = fake_alloc(n * e);
        run_and_expect_success(ncclReduceScatter(send_all, out, n, t, ncclSum, comm, STREAM), "ncclReduceScatter");
        void* inplace = filled(NRANKS * n, bf16, rank, s);
        void* mine = static_cast<char*>(inplace) + rank * n * e;
        run_and_expect_success(ncclReduceScatter(inplace, mine, n, t, ncclSum, comm, STREAM),
                               "ncclReduceScatter in place");
        fake_sync();
        auto want = [&](size_t i) { return sum_bits(size_t(rank) * n + i, s, bf16); };
        expect_all("reduce-scatter", out, n, bf16, want);
        expect_all("reduce-scatter in place", mine, n, bf16, want);
    }
}

// A group of reduces to every root, then one broadcast: nothing runs before ncclGroupEnd.
void group(ncclComm_t comm, int rank) {
    const size_t n = 700;
    std::vector<void*> bufs;
    run_and_expect_success(ncclGroupStart(), "ncclGroupStart");
    for (int root = 0; root < NRANKS; root++) {
        bufs.push_back(filled(n, false, rank, 40 + root));
        run_and_expect_success(ncclReduce(bufs.back(), bufs.back(), n, ncclFloat32, ncclSum, root, comm, STREAM),
                               "ncclReduce in a group");
    }
    check(fake_pending() == 0, "nothing is queued inside a group");
    run_and_expect_success(ncclGroupEnd(), "ncclGroupEnd");
    check(fake_pending() == 1, "a group is queued as one piece of work (%d)", fake_pending());
    fake_sync();
    for (int root = 0; root < NRANKS; root++) {
        int s = 40 + root;
        if (rank == root)
            expect_all("grouped reduce at its root", bufs[root], n, false, [&](size_t i) { return sum_bits(i, s, false); });
        else
            expect_all("grouped reduce elsewhere", bufs[root], n, false,
                       [&](size_t i) { return input_bits(rank, i, s, false); });
    }
    check(ncclGroupEnd() == ncclInvalidUsage, "ncclGroupEnd without a group is refused");
}

void refusals(ncclComm_t comm) {
    void* a = fake_alloc(64);
    check(ncclAllReduce(a, a, 4, ncclFloat32, ncclMax, comm, STREAM) == ncclInvalidArgument, "ncclMax is refused");
    check(ncclAllReduce(a, a, 4, ncclInt32, ncclSum, comm, STREAM) == ncclInvalidArgument, "an int32 sum is refused");
    check(ncclBroadcast(a, a, 4, ncclFloat32, NRANKS, comm, STREAM) == ncclInvalidArgument, "root out of range");
    check(ncclAllReduce(a, a, 4, ncclFloat32, ncclSum, reinterpret_cast<ncclComm_t>(a), STREAM) == ncclInvalidArgument,
          "a made-up communicator is refused");
    check(ncclSend(a, 4, ncclFloat32, 0, comm, STREAM) == ncclInvalidUsage, "an unimplemented entry point is refused");
    check(fake_pending() == 0, "no refused call was queued");
    ncclUniqueId bogus;
    std::memset(&bogus, 7, sizeof bogus);
    ncclComm_t c = nullptr;
    check(ncclCommInitRank(&c, 2, bogus, 0) == ncclInvalidArgument, "a made-up unique id is refused");
    fake_free(a);
}

// Polls `comm`'s asynchronous error every 20 ms, `tries` times at most, until there is one: it must be `want`,
// with a last error that contains `says` (`who`: whose error, for the check's line).
void expect_async_error(ncclComm_t comm, int tries, ncclResult_t want, const char* says, const char* who) {
    ncclResult_t err = ncclSuccess;
    for (int i = 0; i < tries && err == ncclSuccess; i++) {
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
        ncclCommGetAsyncError(comm, &err);
    }
    check(err == want, "%s: asynchronous error %d, want %d", who, int(err), int(want));
    check(std::strstr(ncclGetLastError(comm), says) != nullptr, "%s: the error says '%s': %s", who, says,
          ncclGetLastError(comm));
}

// Ranks 0 and 1 broadcast from different roots: both get ncclInvalidUsage naming the calls; an abort from
// another thread releases the blocked stream. Rank 2 stays out (it checks the same from the other side below).
void mismatch(ncclComm_t comm, int rank) {
    void* a = fake_alloc(64);
    run_and_expect_success(ncclBroadcast(a, a, 16, ncclFloat32, rank, comm, STREAM), "ncclBroadcast (mismatched)");
    std::atomic<bool> released{false};
    std::thread aborter([&] {
        expect_async_error(comm, 300, ncclInvalidUsage, "collectives differ", "ranks whose calls differ");
        check(!released.load(), "the mismatched broadcast did not complete");
        run_and_expect_success(ncclCommAbort(comm), "ncclCommAbort");
    });
    fake_sync();  // blocks until the abort
    released = true;
    aborter.join();
    check(ncclCommDestroy(comm) == ncclInvalidArgument, "an aborted communicator is dead");
}

// Rank 2 of the second communicator exits without taking part; ranks 0 and 1 see ncclRemoteError naming it.
void dead_peer(ncclComm_t comm, int rank) {
    if (rank == 2) {
        printf("rank 2: %d checks, %d failed (leaving without the last all-reduce)\n", g_checks, g_failed);
        fflush(stdout);
        _exit(g_failed ? 1 : 0);
    }
    void* a = fake_alloc(64);
    run_and_expect_success(ncclAllReduce(a, a, 16, ncclFloat32, ncclSum, comm, STREAM), "ncclAllReduce");
    std::thread aborter([&] {
        expect_async_error(comm, 500, ncclRemoteError, "rank 2", "a peer that exited");
        ncclCommAbort(comm);
    });
    fake_sync();
    aborter.join();
}

int rank_main(int rank, ncclUniqueId id, ncclUniqueId id2) {
    g_rank = rank;
    ncclComm_t comm = nullptr;
    run_and_expect_success(ncclCommInitRank(&comm, NRANKS, id, rank), "ncclCommInitRank");
    if (!comm) return 1;
    collectives(comm, rank, false);
    collectives(comm, rank, true);
    group(comm, rank);
    refusals(comm);
    if (rank < 2) {
        mismatch(comm, rank);
    } else {
        // the other side of the mismatch: rank 2 broadcasts from root 0 and is released by its own abort
        void* a = fake_alloc(64);
        ncclBroadcast(a, a, 16, ncclFloat32, 0, comm, STREAM);
        std::thread aborter([&] {
            std::this_thread::sleep_for(std::chrono::milliseconds(1500));
            ncclCommAbort(comm);
        });
        fake_sync();
        aborter.join();
    }
    ncclComm_t comm2 = nullptr;
    run_and_expect_success(ncclCommInitRank(&comm2, NRANKS, id2, rank), "ncclCommInitRank (second)");
    dead_peer(comm2, rank);
    printf("rank %d: %d checks, %d failed\n", rank, g_checks, g_failed);
    fflush(stdout);
    return g_failed ? 1 : 0;
}

}  // namespace

int main() {
    setenv("NC_SIM_NCCL_SLOT_BYTES", "4096", 1);
    ncclUniqueId id, id2;
    if (ncclGetUniqueId(&id) != ncclSuccess || ncclGetUniqueId(&id2) != ncclSuccess) {
        printf("0 checks, 1 failed (ncclGetUniqueId)\n");
        return 1;
    }
    std::vector<pid_t> children;
    for (int r = 0; r < NRANKS; r++) {
        pid_t pid = fork();
        if (pid == 0) _exit(rank_main(r, id, id2));
        children.push_back(pid);
    }
    int failed_ranks = 0;
    for (pid_t pid : children) {
        int status = 0;
        waitpid(pid, &status, 0);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) failed_ranks++;
    }
    printf("%d ranks, %d failed\n", NRANKS, failed_ranks);
    return failed_ranks ? 1 : 0;
}
