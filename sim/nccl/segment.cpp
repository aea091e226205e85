// The shared-memory transport of one communicator: a POSIX shared-memory segment (its name in the unique id)
// that every rank maps, with a header of per-rank counters and one data slot per rank.
//
// The step protocol. A collective is cut into steps of at most one slot per rank. In step k, rank r
//   1. waits until every peer has finished step k-1 (`consumed` >= k-1): nobody still reads r's slot;
//   2. writes its contribution into its slot and the step's descriptor, then publishes `posted` = k;
//   3. waits until every peer has published step k, checks that all descriptors are equal (the same
//      collective, type, count and root on every rank: NCCL hangs or corrupts memory otherwise, the simulator
//      says so), reads what it needs from every slot, and publishes `consumed` = k.
// Waits sleep on futexes (shared between processes) with a 100 ms timeout, after which the waiter checks that
// the peer's process is still alive: a peer that is gone makes ncclCommGetAsyncError report ncclRemoteError
// naming it, and the wait goes on until ncclCommAbort, as a kernel spinning on a flag that never comes keeps
// its stream until the communicator is aborted.
#include <fcntl.h>
#include <linux/futex.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "state.h"

namespace nccl {

struct alignas(64) RankState {
    std::atomic<uint32_t> posted{0};
    std::atomic<uint32_t> consumed{0};
    std::atomic<int32_t> pid{0};
    StepDesc desc;
};

struct Segment {
    std::atomic<uint32_t> nranks{0};
    std::atomic<uint32_t> arrived{0};
    std::atomic<uint64_t> slot_bytes{0};
    RankState ranks[MAX_RANKS];
};

static_assert(std::atomic<uint32_t>::is_always_lock_free && std::atomic<uint64_t>::is_always_lock_free,
              "counters shared between processes must be lock-free");

constexpr size_t HEADER_BYTES = (sizeof(Segment) + 4095) / 4096 * 4096;
// How long ncclCommInitRank waits for every rank to join.
constexpr auto INIT_TIMEOUT = std::chrono::seconds(300);

// The slot size: 1 MiB, or NC_SIM_NCCL_SLOT_BYTES (a multiple of 64, at least 64 * MAX_RANKS; small ones make
// the stand-in's own test cut collectives into many steps).
static size_t configured_slot_bytes() {
    const char* v = std::getenv("NC_SIM_NCCL_SLOT_BYTES");
    if (!v || !*v) return size_t(1) << 20;
    char* end = nullptr;
    unsigned long long n = std::strtoull(v, &end, 10);
    if (*end || n % 64 || n < 64 * MAX_RANKS || n > (1ull << 30)) return 0;
    return size_t(n);
}

static void futex_wake(std::atomic<uint32_t>* word) {
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE, INT32_MAX, nullptr, nullptr, 0);
}

// Sleeps while *word == seen, at most 100 ms; true when it timed out.
static bool futex_wait(std::atomic<uint32_t>* word, uint32_t seen) {
    timespec ts{0, 100 * 1000 * 1000};
    long r = syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, seen, &ts, nullptr, 0);
    return r != 0 && errno == ETIMEDOUT;
}

// True when process `pid` has ended (gone, or a zombie nobody has reaped yet).
static bool process_gone(int32_t pid) {
    if (pid <= 0) return false;
    if (kill(pid, 0) != 0 && errno == ESRCH) return true;
    char path[64], state = 0;
    std::snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE* f = std::fopen(path, "r");
    if (!f) return false;
    // "pid (comm) S ...": the state follows the last ')'
    char line[512];
    size_t n = std::fread(line, 1, sizeof line - 1, f);
    std::fclose(f);
    line[n] = 0;
    if (const char* p = std::strrchr(line, ')')) state = p[1] == ' ' ? p[2] : 0;
    return state == 'Z' || state == 'X';
}

size_t slot_bytes(const Comm* c) {
    return c->segment->slot_bytes.load(std::memory_order_relaxed);
}

static unsigned char* slot_mut(const Comm* c, int rank) {
    return reinterpret_cast<unsigned char*>(c->segment) + HEADER_BYTES + size_t(rank) * slot_bytes(c);
}

const unsigned char* slot_of(const Comm* c, int rank) {
    return slot_mut(c, rank);
}

ncclResult_t segment_join(Comm* c, const char* name) {
    size_t slot = configured_slot_bytes();
    if (slot == 0)
        return refuse(ncclInvalidArgument, "ncclCommInitRank: NC_SIM_NCCL_SLOT_BYTES=%s: write a multiple of 64 "
                      "between %d and 2^30, or unset it (1 MiB)", std::getenv("NC_SIM_NCCL_SLOT_BYTES"),
                      64 * MAX_RANKS);
    size_t bytes = HEADER_BYTES + size_t(c->nranks) * slot;
    int fd = shm_open(name, O_CREAT | O_RDWR, 0600);
    if (fd < 0)
        return refuse(ncclSystemError, "ncclCommInitRank: rank %d: shm_open(%s): %s", c->rank, name,
                      std::strerror(errno));
    struct stat st {};
    if (fstat(fd, &st) != 0 || (size_t(st.st_size) < bytes && ftruncate(fd, off_t(bytes)) != 0)) {
        int e = errno;
        close(fd);
        return refuse(ncclSystemError, "ncclCommInitRank: rank %d: sizing the shared segment %s to %zu bytes: %s",
                      c->rank, name, bytes, std::strerror(e));
    }
    void* map = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (map == MAP_FAILED)
        return refuse(ncclSystemError, "ncclCommInitRank: rank %d: mapping %s: %s", c->rank, name,
                      std::strerror(errno));
    auto* s = static_cast<Segment*>(map);
    auto fail = [&](ncclResult_t code, const char* why, long a, long b) {
        munmap(map, bytes);
        shm_unlink(name);
        return refuse(code, "ncclCommInitRank: rank %d: %s (%ld, %ld)", c->rank, why, a, b);
    };
    uint32_t n = 0;
    if (!s->nranks.compare_exchange_strong(n, uint32_t(c->nranks)) && n != uint32_t(c->nranks))
        return fail(ncclInvalidUsage, "the ranks disagree on nranks (this rank's, another rank's)", c->nranks, n);
    uint64_t sb = 0;
    if (!s->slot_bytes.compare_exchange_strong(sb, slot) && sb != slot)
        return fail(ncclInvalidUsage, "the ranks disagree on NC_SIM_NCCL_SLOT_BYTES (this rank's, another's)",
                    long(slot), long(sb));
    int32_t pid = 0;
    if (!s->ranks[c->rank].pid.compare_exchange_strong(pid, int32_t(getpid())))
        return fail(ncclInvalidUsage, "two processes joined as this rank (pids)", long(getpid()), pid);
    s->arrived.fetch_add(1);
    futex_wake(&s->arrived);
    auto start = std::chrono::steady_clock::now();
    for (;;) {
        uint32_t seen = s->arrived.load();
        if (seen >= uint32_t(c->nranks)) break;
        if (futex_wait(&s->arrived, seen)) {
            for (int p = 0; p < c->nranks; p++)
                if (process_gone(s->ranks[p].pid.load()))
                    return fail(ncclRemoteError, "a rank's process ended during ncclCommInitRank (rank, pid)", p,
                                s->ranks[p].pid.load());
            if (std::chrono::steady_clock::now() - start > INIT_TIMEOUT)
                return fail(ncclSystemError, "not every rank joined within 300 s (joined, expected)", long(seen),
                            c->nranks);
        }
    }
    // every rank has it mapped: the name is no longer needed, and nothing is left in /dev/shm after a crash
    shm_unlink(name);
    c->segment = s;
    c->map_bytes = bytes;
    return ncclSuccess;
}

void segment_unmap(Comm* c) {
    if (c->segment) munmap(c->segment, c->map_bytes);
    c->segment = nullptr;
}

void segment_wake_all(Comm* c) {
    Segment* s = c->segment;
    if (!s) return;
    for (int p = 0; p < c->nranks; p++) {
        futex_wake(&s->ranks[p].posted);
        futex_wake(&s->ranks[p].consumed);
    }
}

// Waits until `word` (peer's counter) reaches `target`; false when the communicator was aborted. A peer whose
// process is gone is reported once as an asynchronous error (ncclRemoteError), and the wait goes on.
static bool wait_for(Comm* c, std::atomic<uint32_t>* word, uint32_t target, int peer, const StepDesc& desc) {
    bool reported = false;
    for (;;) {
        uint32_t seen = word->load(std::memory_order_acquire);
        if (int32_t(seen - target) >= 0) return true;
        if (c->aborted.load()) return false;
        if (futex_wait(word, seen) && !reported && process_gone(c->segment->ranks[peer].pid.load())) {
            set_async_error(c, ncclRemoteError,
                            "rank %d (pid %d) is gone: it ended while rank %d waited for it in collective #%llu "
                            "(%s)", peer, c->segment->ranks[peer].pid.load(), c->rank,
                            (unsigned long long)desc.collective, kind_name(desc.kind));
            reported = true;
        }
    }
}

static void describe(char* out, size_t size, const StepDesc& d) {
    std::snprintf(out, size, "#%llu %s of %llu %s, root %d", (unsigned long long)d.collective, kind_name(d.kind),
                  (unsigned long long)d.count, dtype_name(d.dtype), d.root);
}

bool step_post(Comm* c, const StepDesc& desc, void (*fill)(void* slot, void* arg), void* arg) {
    Segment* s = c->segment;
    const uint32_t k = c->step + 1;
    for (int p = 0; p < c->nranks; p++)
        if (p != c->rank && !wait_for(c, &s->ranks[p].consumed, k - 1, p, desc)) return false;
    if (fill) fill(slot_mut(c, c->rank), arg);
    s->ranks[c->rank].desc = desc;
    s->ranks[c->rank].posted.store(k, std::memory_order_release);
    futex_wake(&s->ranks[c->rank].posted);
    for (int p = 0; p < c->nranks; p++)
        if (p != c->rank && !wait_for(c, &s->ranks[p].posted, k, p, desc)) return false;
    for (int p = 0; p < c->nranks; p++) {
        if (std::memcmp(&s->ranks[p].desc, &desc, sizeof desc) == 0) continue;
        char mine[160], theirs[160];
        describe(mine, sizeof mine, desc);
        describe(theirs, sizeof theirs, s->ranks[p].desc);
        set_async_error(c, ncclInvalidUsage,
                        "the ranks' collectives differ: rank %d called %s, rank %d called %s (every rank must make "
                        "the same collective calls in the same order)", c->rank, mine, p, theirs);
        return false;
    }
    return true;
}

void step_done(Comm* c) {
    Segment* s = c->segment;
    c->step++;
    s->ranks[c->rank].consumed.store(c->step, std::memory_order_release);
    futex_wake(&s->ranks[c->rank].consumed);
}

void block_until_abort(Comm* c) {
    while (!c->aborted.load()) std::this_thread::sleep_for(std::chrono::milliseconds(20));
}

}  // namespace nccl
