// The happens-before checker of race mode (NC_SIM_RACE=1). Every operation that declares accesses (kernels:
// their pointer parameters, `const T*` as a read and `T*` as a write of the rest of the allocation from the
// pointer on; copies and memsets: their exact ranges; cuBLAS / NCCL stand-ins: ncsim_declare_access) is checked,
// when it is queued, against the remembered accesses of other streams: two accesses to overlapping bytes, at
// least one a write, where the earlier one is not known to have happened before the later (its stream's entry
// in the later operation's vector clock is below its sequence number), are a race: both operations, both
// streams and the bytes are reported and the process ends with status 1. The verdict depends only on the order
// the host queued work in, not on how the workers happened to interleave; race_delay() additionally perturbs
// the interleaving so that a missing wait also shows up as wrong data.
#include "state.h"
#include <chrono>
#include <random>

namespace sim {

struct Record {
    uint64_t lo, hi;  // [lo, hi)
    bool write;
    int stream;
    uint64_t seq;
    std::string what;
};

static std::atomic<int> g_next_stream{0};
static std::map<uint64_t, std::vector<Record>> g_records;  // by allocation start (called under the enqueue lock)

int race_new_stream_id() { return g_next_stream.fetch_add(1); }

static uint64_t entry(const Clock& c, int stream) { return size_t(stream) < c.size() ? c[size_t(stream)] : 0; }

// Drops the records that every later operation is ordered after: those of stream k with seq <= floor[k], the
// smallest k-entry among the host's clock and the live streams' clocks (every operation queued later starts
// from one of those).
static void prune(std::vector<Record>& records) {
    if (records.size() < 256) return;
    Clock floor = sync_floor_locked();
    std::vector<Record> kept;
    for (Record& r : records)
        if (entry(floor, r.stream) < r.seq) kept.push_back(std::move(r));
    records.swap(kept);
}

void race_check(int stream_id, uint64_t seq, const Clock& clock, const std::string& what,
                const std::vector<Access>& accesses) {
    for (const Access& a : accesses) {
        if (a.bytes == 0) continue;
        Allocation alloc;
        if (!find_allocation(a.start, alloc) || !alloc.live) continue;
        std::vector<Record>& records = g_records[alloc.start];
        uint64_t lo = a.start, hi = a.start + a.bytes;
        for (const Record& r : records) {
            if (r.stream == stream_id || r.hi <= lo || hi <= r.lo || !(r.write || a.write)) continue;
            if (entry(clock, r.stream) >= r.seq) continue;  // happened before
            uint64_t olo = std::max(lo, r.lo), ohi = std::min(hi, r.hi);
            fault("RACE on device memory: bytes [0x%llx, 0x%llx) (offsets %llu..%llu of a %zu-byte allocation at 0x%llx) "
                  "are %s by \"%s\" (stream %d, op %llu) and %s by \"%s\" (stream %d, op %llu) with no happens-before "
                  "between them (no event recorded after the first and waited for before the second, and no host "
                  "synchronization)",
                  (unsigned long long)olo, (unsigned long long)ohi, (unsigned long long)(olo - alloc.start),
                  (unsigned long long)(ohi - alloc.start - 1), alloc.size, (unsigned long long)alloc.start,
                  r.write ? "written" : "read", r.what.c_str(), r.stream, (unsigned long long)r.seq,
                  a.write ? "written" : "read", what.c_str(), stream_id, (unsigned long long)seq);
        }
        records.push_back({lo, hi, a.write, stream_id, seq, what});
        prune(records);
    }
}

void race_forget(uint64_t start, size_t) { g_records.erase(start); }

bool race_unwaited_write_locked(uint64_t start, size_t bytes, const Clock& host, std::string& what) {
    Allocation alloc;
    if (!find_allocation(start, alloc) || !alloc.live) return false;
    auto it = g_records.find(alloc.start);
    if (it == g_records.end()) return false;
    for (const Record& r : it->second) {
        if (!r.write || r.hi <= start || start + bytes <= r.lo || entry(host, r.stream) >= r.seq) continue;
        what = "\"" + r.what + "\" (stream " + std::to_string(r.stream) + ", op " + std::to_string(r.seq) + ")";
        return true;
    }
    return false;
}

void race_delay() {
    static thread_local std::mt19937 rng(std::random_device{}());
    std::uniform_int_distribution<int> us(0, 2000);
    int d = us(rng);
    if (d > 1000) std::this_thread::sleep_for(std::chrono::microseconds(d - 1000));
}

}  // namespace sim
