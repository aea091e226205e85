// Runs cuda/p2p_ring.cu's kernels on the CPU (p2p_emu.h: every rank's blocks at once, a memory model that
// publishes unreleased stores late) for the cases read from stdin, and checks them against plain host
// reductions. comm/tests/p2p_emu.rs writes the cases, with the plan tables comm/src/p2p_plan.rs builds from
// schedule.rs (the tables the GPU gets), compiles this file with g++ and runs it; so CI runs the kernels with
// the real schedule.
//
// Input, whitespace-separated, per case:
//   case <label> <rs|ag|os> <f32|bf16> <ranks> <len> <offset> <blocks> <threads> <slots> <slot_bytes>
//        <region_bytes> <none|no_release|reused_flag|skipped_chunk> <iterations>
//   <ranks + 1 bounds offsets>
//   per rank: <ops> then 2 x ops u64 (the plan table; none for os)
//   for the bucket kinds rsb / agb (reduce-scatter / all-gather of several tensors of one span in one table,
//   as `p2p_plan::encode_pieces` builds it): then <len> owners, one per element (-1: in no tensor, never
//   touched); the bounds line is then unused
// Checks, every iteration with fresh data (the flags and epochs carry over, as on the GPU):
// - rs: each rank's own chunk is the f32 sum over ranks c+1, c+2, ..., c (schedule::sum_order), bit for bit
//   (bf16: that sum rounded once; the other elements of a bf16 buffer are untouched);
// - ag: every rank's buffer is every owner's chunk, bit for bit;
// - os: every rank holds the f32 sum in rank order 0, 1, ..., n-1 (rounded once for bf16), bit for bit;
// - no rank's error word is set (no wait timed out).
// A case with a planted bug passes when a check fails ("caught"), and fails when every check passes.
// Prints one line per case and "<n> failures" last; exits non-zero on a failure.
#include "p2p_emu.h"
#include <cuda_bf16.h>
#include <iostream>
#include <random>
#include <string>

namespace k {
#include "p2p_ring.cu"
}
using k::bf16;
using u64 = unsigned long long;

static int failures = 0;
static std::mt19937 rng(11);

struct Case {
    std::string label, kind, dtype, plant;
    int ranks = 0, iterations = 0;
    u64 len = 0, offset = 0, slot_bytes = 0, region_bytes = 0;
    unsigned blocks = 0, threads = 0;
    int slots = 0;
    std::vector<u64> bounds;
    std::vector<std::vector<u64>> plans;
    // bucket kinds: each element's owner (-1 outside every tensor)
    std::vector<long long> owner;
};

static bool read_case(Case& c) {
    std::string word;
    if (!(std::cin >> word)) return false;
    if (word != "case") {
        fprintf(stderr, "expected 'case', got '%s'\n", word.c_str());
        exit(2);
    }
    std::cin >> c.label >> c.kind >> c.dtype >> c.ranks >> c.len >> c.offset >> c.blocks >> c.threads >> c.slots >>
        c.slot_bytes >> c.region_bytes >> c.plant >> c.iterations;
    c.bounds.resize(c.ranks + 1);
    for (auto& b : c.bounds) std::cin >> b;
    c.plans.assign(c.ranks, {});
    if (c.kind != "os")
        for (auto& plan : c.plans) {
            u64 ops;
            std::cin >> ops;
            plan.resize(2 * ops);
            for (auto& w : plan) std::cin >> w;
        }
    if (c.kind == "rsb" || c.kind == "agb") {
        c.owner.resize(c.len);
        for (auto& o : c.owner) std::cin >> o;
        c.kind.pop_back();  // run as rs / ag, check against the owners
    }
    if (!std::cin) {
        fprintf(stderr, "malformed case %s\n", c.label.c_str());
        exit(2);
    }
    return true;
}

static bool is_recv(u64 word) { return (word & P2P_OP_RECV) != 0; }
static u64 sends(const std::vector<u64>& plan) {
    u64 n = 0;
    for (size_t i = 1; i < plan.size(); i += 2) n += !is_recv(plan[i]);
    return n;
}

// Planted "skipped chunk": rank 0's first send and rank 1's first receive (the same slice, chunk n-1 at step
// 0) leave the plans, consistently, so the protocol stays in step but that slice is never reduced.
static void skip_a_slice(Case& c) {
    auto drop_first = [](std::vector<u64>& plan, bool recv) {
        for (size_t i = 0; i < plan.size(); i += 2)
            if (is_recv(plan[i + 1]) == recv) {
                plan.erase(plan.begin() + i, plan.begin() + i + 2);
                return;
            }
    };
    drop_first(c.plans[0], false);
    drop_first(c.plans[1 % c.ranks], true);
}

static float bf16_round(float f) { return __bfloat162float(__float2bfloat16_rn(f)); }

// One case: returns whether every check passed.
template <class T>
static bool run_case(Case& c) {
    const int n = c.ranks;
    const u64 slots_bytes = (u64)c.blocks * c.slots * c.slot_bytes;
    // Each rank's IPC-shared areas: data (ring slots, then the one-shot regions), signal (flags).
    std::vector<std::vector<uint4>> data(n, std::vector<uint4>((slots_bytes + c.blocks * c.region_bytes) / 16 + 1));
    std::vector<std::vector<u64>> signal(n, std::vector<u64>(P2P_SIGNAL_U64S, 0));
    auto data_of = [&](int r) { return (char*)data[r].data(); };
    std::vector<u64> peers(2 * n);
    for (int r = 0; r < n; r++) peers[r] = (u64)(data_of(r) + slots_bytes), peers[n + r] = (u64)signal[r].data();
    std::vector<u64> send_seq(n, 0), recv_seq(n, 0), epoch(n, 1);
    if (c.plant == "skipped_chunk") skip_a_slice(c);
    g_plant_no_release = c.plant == "no_release";
    const bool reuse = c.plant == "reused_flag";
    bool all_ok = true;
    std::string why;
    for (int it = 0; it < c.iterations; it++) {
        // Fresh data each iteration; buffers start `offset` elements into their allocation (unaligned for 1).
        std::normal_distribution<float> d(0, 1);
        std::vector<std::vector<T>> store(n, std::vector<T>(c.len + c.offset + 8));
        std::vector<std::vector<float>> value(n, std::vector<float>(c.len));
        for (int r = 0; r < n; r++)
            for (u64 i = 0; i < c.len; i++) {
                float v = d(rng);
                if constexpr (sizeof(T) == 2) {
                    store[r][c.offset + i] = __float2bfloat16_rn(v);
                    v = __bfloat162float(store[r][c.offset + i]);
                } else {
                    store[r][c.offset + i] = v;
                }
                value[r][i] = v;
            }
        auto before = store;
        std::vector<std::vector<float>> work(n, std::vector<float>(c.len + 8));
        int last_step = n - 2;
        launch_ranks(n, c.blocks, c.threads, it == 1 ? 0 : -1, c.plant == "none" ? 20 : 100, [&](int r) {
            T* buf = store[r].data() + c.offset;
            int prev = (r + n - 1) % n, next = (r + 1) % n;
            const auto& plan = c.plans[r];
            if (c.kind == "rs") {
                if constexpr (sizeof(T) == 4)
                    k::nc_p2p_reduce_scatter_f32(plan.data(), plan.size() / 2, last_step, buf, buf, buf, data_of(r),
                                                 data_of(prev), signal[r].data(), signal[prev].data(),
                                                 signal[next].data(), send_seq[r], recv_seq[r], c.slots, c.slot_bytes,
                                                 prev, next, 2'000'000'000ull);
                else
                    k::nc_p2p_reduce_scatter_bf16(plan.data(), plan.size() / 2, last_step, buf, work[r].data(), buf,
                                                  data_of(r), data_of(prev), signal[r].data(), signal[prev].data(),
                                                  signal[next].data(), send_seq[r], recv_seq[r], c.slots,
                                                  c.slot_bytes, prev, next, 2'000'000'000ull);
            } else if (c.kind == "ag") {
                k::nc_p2p_all_gather(plan.data(), plan.size() / 2, (unsigned char*)buf, sizeof(T), data_of(r),
                                     data_of(prev), signal[r].data(), signal[prev].data(), signal[next].data(),
                                     send_seq[r], recv_seq[r], c.slots, c.slot_bytes, prev, next, 2'000'000'000ull);
            } else {
                if constexpr (sizeof(T) == 4)
                    k::nc_p2p_one_shot_f32(buf, buf, c.len, peers.data(), n, r, epoch[r], c.region_bytes,
                                           2'000'000'000ull);
                else
                    k::nc_p2p_one_shot_bf16(buf, buf, c.len, peers.data(), n, r, epoch[r], c.region_bytes,
                                            2'000'000'000ull);
            }
        });
        // The host side of a launch: the next launch starts after this one's last sequence number, unless the
        // planted bug reuses the flags' old values.
        for (int r = 0; r < n; r++) {
            u64 s = sends(c.plans[r]);
            if (!reuse) send_seq[r] += s, recv_seq[r] += c.plans[r].size() / 2 - s, epoch[r] += 1;
        }
        for (int r = 0; r < n && all_ok; r++)
            if (signal[r][P2P_ERROR_WORD] != 0) {
                char m[120];
                snprintf(m, sizeof m, "iteration %d: rank %d's error word %#llx (a wait timed out)", it, r,
                         signal[r][P2P_ERROR_WORD]);
                why = m, all_ok = false;
            }
        // References.
        auto got = [&](int r, u64 i) -> float {
            if constexpr (sizeof(T) == 2) return __bfloat162float(store[r][c.offset + i]);
            else return store[r][c.offset + i];
        };
        auto same = [](float a, float b) { return std::memcmp(&a, &b, 4) == 0; };
        for (int r = 0; r < n && all_ok; r++) {
            for (u64 i = 0; i < c.len && all_ok; i++) {
                int chunk = 0;
                if (!c.owner.empty()) chunk = (int)c.owner[i];
                else
                    while (!(i >= c.bounds[chunk] && i < c.bounds[chunk + 1])) chunk++;
                float want;
                bool check = true;
                if (chunk < 0) {
                    want = value[r][i];  // in no tensor of the bucket: untouched
                } else if (c.kind == "rs") {
                    if (chunk == r) {
                        want = value[(chunk + 1) % n][i];
                        for (int kk = 2; kk <= n; kk++) want = want + value[(chunk + kk) % n][i];
                        if (sizeof(T) == 2) want = bf16_round(want);
                    } else {
                        // f32 partials are unspecified; bf16 leaves them untouched.
                        check = sizeof(T) == 2;
                        want = value[r][i];
                    }
                } else if (c.kind == "ag") {
                    want = value[chunk][i];
                } else {
                    want = value[0][i];
                    for (int p = 1; p < n; p++) want = want + value[p][i];
                    if (sizeof(T) == 2) want = bf16_round(want);
                }
                if (check && !same(got(r, i), want)) {
                    char m[160];
                    snprintf(m, sizeof m, "iteration %d: rank %d element %llu (chunk %d) is %.9g, want %.9g", it, r,
                             i, chunk, got(r, i), want);
                    why = m, all_ok = false;
                }
            }
            // Nothing outside the buffer was written.
            for (u64 i = 0; i < c.offset && all_ok; i++)
                if (std::memcmp(&store[r][i], &before[r][i], sizeof(T)) != 0) why = "wrote before the buffer", all_ok = false;
            for (u64 i = c.offset + c.len; i < store[r].size() && all_ok; i++)
                if (std::memcmp(&store[r][i], &before[r][i], sizeof(T)) != 0) why = "wrote past the buffer", all_ok = false;
        }
        if (!all_ok) break;
    }
    g_plant_no_release = false;
    const bool planted = c.plant != "none";
    const bool pass = planted ? !all_ok : all_ok;
    if (!pass) failures++;
    if (planted)
        printf("%-60s %s %s\n", c.label.c_str(), pass ? "ok   planted bug caught:" : "FAIL planted bug NOT caught",
               why.c_str());
    else
        printf("%-60s %s %s\n", c.label.c_str(), pass ? "ok  " : "FAIL", why.c_str());
    fflush(stdout);
    return pass;
}

int main() {
    Case c;
    int cases = 0;
    while (read_case(c)) {
        cases++;
        if (c.dtype == "f32") run_case<float>(c);
        else run_case<bf16>(c);
        c = Case{};
    }
    printf("%d cases\n%d failures\n", cases, failures);
    return failures == 0 && cases > 0 ? 0 : 1;
}
