// Checks emu.h's launch machinery itself, which the kernel tests only use: every (block, thread) of a 3-D
// launch runs once with the right blockIdx / threadIdx / blockDim / gridDim; launch_params unpacks a
// cuLaunchKernel-style argument array by the kernel's parameter types (the simulated driver's path);
// threads that return early drop out of the barriers the others still meet; launches from several OS
// threads at once (the driver's streams) each get their own results; the access check (emu_race.h) sees
// every global access of a kernel and nothing else. Built and run by run.sh.
#include "emu.h"
#include "emu_tc.h"
#define NC_EMU 1
namespace fa {
#include "flash_attention.cu"
}
#include <mutex>
#include <string>
#include <thread>

static int failures = 0;
static void report(const char* what, long bad, long total) {
    if (bad) failures++;
    std::printf("%-58s %s %ld of %ld wrong\n", what, bad ? "FAIL" : "ok  ", bad, total);
}

// ---- indices of a 3-D launch ---------------------------------------------------------------------------------
struct Seen {
    unsigned count, tx, ty, tz, bx, by, bz, dim_ok;
};
extern "C" __global__ void launch_indices(Seen* seen) {
    unsigned b = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    unsigned t = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    Seen& s = seen[b * blockDim.x * blockDim.y * blockDim.z + t];
    s.count++;
    s.tx = threadIdx.x, s.ty = threadIdx.y, s.tz = threadIdx.z;
    s.bx = blockIdx.x, s.by = blockIdx.y, s.bz = blockIdx.z;
    s.dim_ok = blockDim.x == 8 && blockDim.y == 4 && blockDim.z == 2 && gridDim.x == 3 && gridDim.y == 2 && gridDim.z == 2;
    __syncthreads();  // a barrier across the three dimensions of the block
}
static void indices() {
    const unsigned blocks = 3 * 2 * 2, threads = 8 * 4 * 2;
    std::vector<Seen> seen(blocks * threads, Seen{});
    launch(launch_indices, dim3{3, 2, 2}, dim3{8, 4, 2}, seen.data());
    long bad = 0;
    for (unsigned b = 0; b < blocks; b++)
        for (unsigned t = 0; t < threads; t++) {
            const Seen& s = seen[b * threads + t];
            bool ok = s.count == 1 && s.tx == t % 8 && s.ty == (t / 8) % 4 && s.tz == t / 32 && s.bx == b % 3 &&
                      s.by == (b / 3) % 2 && s.bz == b / 6 && s.dim_ok;
            bad += !ok;
        }
    report("3-D grid and block: each thread once, indices and dims", bad, blocks * threads);
}

// ---- launch_params ------------------------------------------------------------------------------------------
struct Table {
    float scale[4];
    int offset;
};
extern "C" __global__ void launch_unpacked(float* out, const int* in, unsigned long long n, double add,
                                           const __grid_constant__ Table table, unsigned char flag) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = (float)(in[i] * table.scale[i % 4] + table.offset + add) + (flag == 7 ? 0.5f : 0.0f);
}
static void params() {
    unsigned long long n = 300;
    std::vector<float> out(n, -1.0f);
    std::vector<int> in(n);
    for (unsigned long long i = 0; i < n; i++) in[i] = int(i) - 100;
    float* out_p = out.data();
    const int* in_p = in.data();
    double add = 0.25;
    Table table{{1.0f, -2.0f, 3.0f, 0.5f}, 1000};
    unsigned char flag = 7;
    void* args[] = {&out_p, &in_p, &n, &add, &table, &flag};
    launch_params("launch_unpacked", launch_unpacked, dim3{3}, dim3{128}, args);
    long bad = 0;
    for (unsigned long long i = 0; i < n; i++)
        bad += out[i] != (float)(in[i] * table.scale[i % 4] + table.offset + add) + 0.5f;
    report("launch_params: pointers, u64, f64, struct by value, u8", bad, (long)n);
}

// ---- threads that return before a barrier ----------------------------------------------------------------------
// Threads >= 40 return at once; the others meet at two barriers (the returned ones no longer count, as on the
// device) and read each other's values through shared memory.
extern "C" __global__ void launch_early_exit(float* out) {
    __shared__ float s[40];
    int t = threadIdx.x;
    if (t >= 40) return;
    s[t] = (float)t;
    __syncthreads();
    float v = s[39 - t];
    __syncthreads();
    out[blockIdx.x * 40 + t] = v;
}
static void early_exit() {
    std::vector<float> out(2 * 40, -1.0f);
    launch(launch_early_exit, dim3{2}, dim3{128}, out.data());
    long bad = 0;
    for (int b = 0; b < 2; b++)
        for (int t = 0; t < 40; t++) bad += out[b * 40 + t] != (float)(39 - t);
    report("threads returning early leave the barriers", bad, 80);
}

// ---- launches from several OS threads at once ------------------------------------------------------------------
extern "C" __global__ void launch_reverse(const float* in, float* out, int n) {
    __shared__ float tile[256];
    int base = blockIdx.x * 256, t = threadIdx.x;
    tile[t] = base + t < n ? in[base + t] : 0.0f;
    __syncthreads();
    if (base + 255 - t < n) out[base + 255 - t] = tile[t];
}
static void concurrent() {
    const int callers = 3, n = 256 * 20, rounds = 20;
    std::vector<std::vector<float>> in(callers, std::vector<float>(n)), out(callers, std::vector<float>(n));
    for (int c = 0; c < callers; c++)
        for (int i = 0; i < n; i++) in[c][i] = float(c * 100000 + i);
    std::vector<long> bad(callers, 0);
    std::vector<std::thread> ts;
    for (int c = 0; c < callers; c++)
        ts.emplace_back([&, c] {
            for (int r = 0; r < rounds; r++) {
                std::fill(out[c].begin(), out[c].end(), -1.0f);
                launch(launch_reverse, dim3{n / 256}, dim3{256}, (const float*)in[c].data(), out[c].data(), n);
                for (int i = 0; i < n; i++) bad[c] += out[c][i] != in[c][(i / 256) * 256 + 255 - i % 256];
            }
        });
    for (auto& t : ts) t.join();
    long total = 0;
    for (long b : bad) total += b;
    report("3 OS threads launching at once, 20 launches each", total, (long)callers * n * rounds);
}

// ---- the access check (emu_set_access_check) -----------------------------------------------------------------
// Sums each block's slice of `in` into out[block]; with `past_end` the last block reads one element more.
extern "C" __global__ void launch_sum(const float* in, float* out, int n, int past_end) {
    __shared__ float partial[64];
    int per = n / gridDim.x, first = blockIdx.x * per, t = threadIdx.x;
    int end = first + per + (past_end && blockIdx.x == gridDim.x - 1 ? 1 : 0);
    float acc = 0.0f;
    for (int i = first + t; i < end; i += 64) acc += in[i];
    partial[t] = acc;
    __syncthreads();
    if (t == 0) {
        float sum = 0.0f;
        for (int k = 0; k < 64; k++) sum += partial[k];
        out[blockIdx.x] = sum;
    }
}
struct Seen2 {
    std::mutex m;
    const char *in_lo, *in_hi, *out_lo, *out_hi;
    long in_reads = 0, out_writes = 0, other = 0;
    std::string other_kernel;
    const char* other_addr = nullptr;
};
static Seen2 g_seen;
static void record(const void* addr, size_t bytes, int is_write, const char* kernel, EmuAccessPassed*) {
    auto* p = static_cast<const char*>(addr);
    std::lock_guard<std::mutex> lock(g_seen.m);
    if (!is_write && p >= g_seen.in_lo && p + bytes <= g_seen.in_hi)
        g_seen.in_reads++;
    else if (is_write && p >= g_seen.out_lo && p + bytes <= g_seen.out_hi)
        g_seen.out_writes++;
    else
        g_seen.other++, g_seen.other_kernel = kernel, g_seen.other_addr = p;
}
static void access_check() {
    const int n = 1000, blocks = 4;
    std::vector<float> buf(n + 1, 1.0f), out(blocks);  // buf[n] exists, so the planted read stays harmless
    for (int past_end : {0, 1}) {
        g_seen.in_lo = (const char*)buf.data(), g_seen.in_hi = (const char*)(buf.data() + n);
        g_seen.out_lo = (const char*)out.data(), g_seen.out_hi = (const char*)(out.data() + blocks);
        g_seen.in_reads = g_seen.out_writes = g_seen.other = 0;
        emu_set_access_check(record);
        launch(launch_sum, dim3{blocks}, dim3{64}, (const float*)buf.data(), out.data(), n, past_end);
        emu_set_access_check(nullptr);
        bool ok = g_seen.in_reads == n && g_seen.out_writes == blocks &&
                  (past_end ? g_seen.other == 1 && g_seen.other_kernel == "launch_sum" &&
                                  g_seen.other_addr == (const char*)(buf.data() + n)
                            : g_seen.other == 0);
        if (!ok) failures++;
        std::printf("%-58s %s %ld reads in, %ld writes out, %ld elsewhere\n",
                    past_end ? "access check sees the planted read past the end" : "access check: every global access, no other",
                    ok ? "ok  " : "FAIL", g_seen.in_reads, g_seen.out_writes, g_seen.other);
    }
}

// The pass cache (emu_race.h): a check that says which range it passed is asked again only for accesses
// outside the ranges its OS thread remembers, or after its epoch counter changed.
static std::atomic<uint64_t> g_epoch{0};
static bool g_bump_epoch = false;  // every check ends every remembered range
static void record_passing(const void* addr, size_t bytes, int is_write, const char* kernel, EmuAccessPassed* passed) {
    record(addr, bytes, is_write, kernel, nullptr);
    auto* p = static_cast<const char*>(addr);
    if (p >= g_seen.in_lo && p + bytes <= g_seen.in_hi) *passed = {uintptr_t(g_seen.in_lo), uintptr_t(g_seen.in_hi)};
    if (p >= g_seen.out_lo && p + bytes <= g_seen.out_hi)
        *passed = {uintptr_t(g_seen.out_lo), uintptr_t(g_seen.out_hi)};
    if (g_bump_epoch) g_epoch.fetch_add(1);
}
static void access_check_cached() {
    const int n = 1000, blocks = 4;
    std::vector<float> buf(n + 1, 1.0f), out(blocks);
    for (int mode = 0; mode < 2; mode++) {  // 0: the cache answers; 1: the epoch moves at every check
        g_seen.in_lo = (const char*)buf.data(), g_seen.in_hi = (const char*)(buf.data() + n);
        g_seen.out_lo = (const char*)out.data(), g_seen.out_hi = (const char*)(out.data() + blocks);
        g_seen.in_reads = g_seen.out_writes = g_seen.other = 0;
        g_bump_epoch = mode == 1;
        g_epoch.fetch_add(1);  // as a free between launches: what earlier launches passed is forgotten
        emu_set_access_check(record_passing, &g_epoch);
        launch(launch_sum, dim3{blocks}, dim3{64}, (const float*)buf.data(), out.data(), n, 1);
        emu_set_access_check(nullptr);
        // Each block's OS thread asks once for `in` (blocks may share an OS thread, so at most `blocks`).
        bool calls_ok = mode == 0 ? g_seen.in_reads >= 1 && g_seen.in_reads <= blocks && g_seen.out_writes >= 1 &&
                                        g_seen.out_writes <= blocks
                                  : g_seen.in_reads == n && g_seen.out_writes == blocks;
        bool ok = calls_ok && g_seen.other == 1 &&
                  g_seen.other_addr == (const char*)(buf.data() + n);
        if (!ok) failures++;
        std::printf("%-58s %s %ld checks of %d reads in, %ld of %d writes out, %ld elsewhere\n",
                    mode == 0 ? "pass cache: one check per range, past-end read seen"
                              : "pass cache: a new epoch makes every access checked",
                    ok ? "ok  " : "FAIL", g_seen.in_reads, n, g_seen.out_writes, blocks, g_seen.other);
    }
}

// A real kernel with cp.async, ldmatrix and mma: every access the access check sees lies in one of the
// buffers the launch passed (cp.async's global reads included), so a driver's bounds check has no false alarm.
struct Ranges {
    std::mutex m;
    std::vector<std::pair<const char*, const char*>> ok;
    long inside = 0, outside = 0;
};
static Ranges g_ranges;
static void in_ranges(const void* addr, size_t bytes, int, const char*, EmuAccessPassed*) {
    auto* p = static_cast<const char*>(addr);
    std::lock_guard<std::mutex> lock(g_ranges.m);
    bool in = false;
    for (auto& r : g_ranges.ok) in = in || (p >= r.first && p + bytes <= r.second);
    (in ? g_ranges.inside : g_ranges.outside)++;
}
static void access_check_flash() {
    const int T = 70, H = 2, D = 64;
    std::vector<__nv_bfloat16> q((size_t)T * H * D), k(q.size()), v(q.size()), o(q.size());
    for (size_t i = 0; i < q.size(); i++) q[i] = k[i] = v[i] = __float2bfloat16_rn(float(i % 17) / 17.0f);
    std::vector<float> lse((size_t)H * T);
    auto range = [](const auto& vec) {
        return std::make_pair((const char*)vec.data(), (const char*)(vec.data() + vec.size()));
    };
    g_ranges.ok = {range(q), range(k), range(v), range(o), range(lse)};
    emu_set_access_check(in_ranges);
    launch(fa::nc_flash_forward_d64_bf16, dim3{(T + 63) / 64, (unsigned)H, 1}, dim3{FLASH_THREADS},
           (const __nv_bfloat16*)q.data(), (const __nv_bfloat16*)k.data(), (const __nv_bfloat16*)v.data(), o.data(),
           lse.data(), 1, T, T, H, H, 0, 0.125f);
    emu_set_access_check(nullptr);
    bool ok = g_ranges.inside > 0 && g_ranges.outside == 0;
    if (!ok) failures++;
    std::printf("%-58s %s %ld in the launch's buffers, %ld elsewhere\n", "access check on flash forward (cp.async reads)",
                ok ? "ok  " : "FAIL", g_ranges.inside, g_ranges.outside);
}

int main() {
    indices();
    params();
    early_exit();
    concurrent();
    if (emu_race_instrumented()) {
        access_check();
        access_check_cached();
        access_check_flash();
    } else {
        failures++;
        std::printf("access check needs -fsanitize=thread (see run.sh): FAIL\n");
    }
    failures += emu_race_summary();  // run.sh runs every program in race mode
    std::printf("%d failures\n", failures);
    return failures != 0;
}
