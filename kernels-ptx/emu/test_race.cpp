// The race mode's own checks (emu_race.h): planted bugs that it must report, in small kernels written here and
// in the real kernels of ../cuda with one barrier or one cp.async wait removed at run time (emu_race.h's
// emu_plant_skip_* make the n-th __syncthreads / __syncwarp / wait_group of every thread do nothing, which is
// the same as deleting that call from the source). Each planted case must give at least one report, and the
// first report must name the kernel, the barrier interval and what raced; the same launch without the plant
// must give none. Needs -fsanitize=thread (run.sh); without it every planted case fails.
#include "emu.h"
#include "emu_tc.h"
namespace ce {
#include "cross_entropy.cu"
}
namespace rms {
#include "rmsnorm.cu"
}
namespace att {
#include "attention.cu"
}
// flash_attention.cu reuses some of attention.cu's tile names with its own values
#undef FWD_BQ
#undef FWD_BK
#undef DQ_BQ
#undef DQ_BK
#undef DKV_BK
#undef DKV_BQ
#define NC_EMU 1
namespace fa {
#include "flash_attention.cu"
}
#include <functional>
#include <random>
#include <string>

static int failures = 0;
static std::mt19937 rng(11);
static std::vector<float> randv(size_t n) {
    std::normal_distribution<float> d(0, 1);
    std::vector<float> v(n);
    for (auto& x : v) x = d(rng);
    return v;
}

// Runs `body` in race mode. planted: at least one report, the first containing every string of `says`, and
// each string of `some_says` in one of the reports printed; otherwise: no report.
static void expect(const std::string& what, bool planted, const std::function<void()>& body,
                   const std::vector<std::string>& says, const std::vector<std::string>& some_says = {}) {
    emu_race_clear();
    uint64_t before = emu_race_reports();
    body();
    emu_plant_skip_syncthreads = emu_plant_skip_syncwarp = emu_plant_skip_cp_wait = -1;
    uint64_t n = emu_race_reports() - before;
    std::vector<std::string> msgs = emu_race_messages();
    bool ok = planted ? n > 0 && !msgs.empty() : n == 0;
    if (planted && ok) {
        for (const std::string& s : says)
            if (msgs[0].find(s) == std::string::npos) ok = false;
        for (const std::string& s : some_says)
            if (std::none_of(msgs.begin(), msgs.end(), [&](const std::string& m) { return m.find(s) != std::string::npos; }))
                ok = false;
    }
    if (!ok) failures++;
    std::printf("%-58s %s %llu reports%s%s\n", what.c_str(), ok ? "ok  " : "FAIL", (unsigned long long)n,
                msgs.empty() ? "" : "; first: ", msgs.empty() ? "" : msgs[0].c_str());
}

// ---- small kernels with the bug in the source ------------------------------------------------------------
// Reverses 64 values through shared memory: the barrier between the writes and the reads is the point.
extern "C" __global__ void race_reverse(const float* in, float* out, int with_barrier) {
    __shared__ float tile[64];
    int t = threadIdx.x;
    tile[t] = in[blockIdx.x * 64 + t];
    if (with_barrier) __syncthreads();
    out[blockIdx.x * 64 + t] = tile[63 - t];
}
// Reads a neighbour's value, then overwrites its own slot: without the second barrier the write can land
// before the neighbour has read (a write after read).
extern "C" __global__ void race_overwrite(float* out, int with_barrier) {
    __shared__ float s[64];
    int t = threadIdx.x;
    s[t] = (float)t;
    __syncthreads();
    float v = s[63 - t];
    if (with_barrier) __syncthreads();
    s[t] = 2 * v;
    __syncthreads();
    out[blockIdx.x * 64 + t] = s[t];
}
// Reads shared memory no thread wrote (it holds whatever the last block left there).
extern "C" __global__ void race_uninit(float* out, int write_first) {
    __shared__ float s[64];
    if (write_first) s[threadIdx.x] = 1.0f;
    __syncthreads();
    out[threadIdx.x] = s[threadIdx.x];
}
// Each thread copies 16 bytes into shared memory with cp.async and reads them back, with or without the
// wait_group between.
extern "C" __global__ void race_cp_early(const uint16_t* src, uint16_t* out, int wait_first) {
    __shared__ __align__(16) uint16_t tile[64][8];
    int t = threadIdx.x;
    emu_cp_async_16(tile[t], src + 8 * (blockIdx.x * 64 + t), true);
    emu_cp_async_commit();
    if (wait_first) emu_cp_async_wait(0);
    __syncthreads();
    out[blockIdx.x * 64 + t] = tile[t][3];
    emu_cp_async_wait(0);
}

// One warp; lane 0 and lane 31 meet at a shuffle, which makes every lane arrive before any goes on but does
// not order memory: only a __syncwarp does. So whatever order the lanes run in, the accesses after the
// shuffle follow those before it, and each kind of race shows as itself. kind 0: lane 0 writes, lane 31
// reads; 1: lane 31 reads, lane 0 writes; 2: lane 0 writes, lane 1 writes.
extern "C" __global__ void race_in_warp(float* out, int kind, int with_syncwarp) {
    __shared__ float s[32];
    int t = threadIdx.x;
    s[t] = 0.0f;
    __syncthreads();  // all written: no read below is of unwritten memory
    float before = 0.0f;
    if (t == 0 && kind != 1) s[31] = 5.0f;
    if (t == 31 && kind == 1) before = s[31];
    float x = __shfl_xor_sync(0xffffffffu, (float)t, 1);
    if (with_syncwarp) __syncwarp();
    if (t == 31 && kind == 0) out[0] = s[31] + x;
    if (t == 0 && kind == 1) s[31] = 6.0f;
    if (t == 1 && kind == 2) s[31] = 7.0f;
    out[1 + t] = before + x;
}

static void small_kernels() {
    std::vector<float> in = randv(3 * 64), out(3 * 64);
    const char* kinds[] = {"read after write", "write after read", "write after write"};
    const char* says[] = {"", "", "writes a byte that thread 0 wrote"};  // kinds 0 and 1: either side (below)
    // A shuffle makes a lane wait only for its partner (emu.h), so thread 31 may pass its shuffle before thread 0
    // reaches its own: the race between their accesses to s[31] is reported from whichever side comes second.
    for (int kind = 0; kind < 3; kind++)
        for (int with : {1, 0})
            expect(std::string(with ? "in a warp, with __syncwarp: " : "planted: in a warp, after a shuffle: ") + kinds[kind],
                   !with, [&] { launch(race_in_warp, dim3{2}, dim3{32}, out.data(), kind, with); },
                   {"kernel race_in_warp", "barrier interval 1", kind == 2 ? says[kind] : "a byte that thread",
                    "race_in_warp::s"},
                   {kind == 2 ? says[kind] : "thread 0", kind == 2 ? says[kind] : "thread 31"});
    for (int with : {1, 0})
        expect(with ? "reverse through shared, with __syncthreads" : "planted: reverse without __syncthreads", !with,
               [&] { launch(race_reverse, dim3{3}, dim3{64}, (const float*)in.data(), out.data(), with); },
               {"kernel race_reverse", "barrier interval 0", "race_reverse::tile"});
    for (int with : {1, 0})
        expect(with ? "read then overwrite, with __syncthreads" : "planted: overwrite before the others read", !with,
               [&] { launch(race_overwrite, dim3{2}, dim3{64}, out.data(), with); },
               {"kernel race_overwrite", "barrier interval 1", "race_overwrite::s"},
               {"writes a byte that thread"});  // threads t and 63 - t are in different warps
    for (int with : {1, 0})
        expect(with ? "shared memory written before it is read" : "planted: read of unwritten shared memory", !with,
               [&] { launch(race_uninit, dim3{2}, dim3{64}, out.data(), with); },
               {"kernel race_uninit", "no thread of this block has written"});
    std::vector<uint16_t> src(3 * 64 * 8), got(3 * 64);
    for (size_t i = 0; i < src.size(); i++) src[i] = uint16_t(1 + i % 1000);
    for (int with : {1, 0})
        expect(with ? "cp.async read after its wait_group" : "planted: cp.async tile read before the wait", !with,
               [&] { launch(race_cp_early, dim3{3}, dim3{64}, (const uint16_t*)src.data(), got.data(), with); },
               {"kernel race_cp_early", "cp.async is still copying"});
    // With the race mode off, the same read before the wait sees what shared memory held before the copy
    // in most threads (a copy lands early only at one of its thread's barriers, with probability 1/32 at this
    // one): the numbers are wrong, as they may be on the device.
    emu_race_enable(false);
    launch(race_cp_early, dim3{3}, dim3{64}, (const uint16_t*)src.data(), got.data(), 0);
    emu_race_enable(true);
    int stale = 0;
    for (int i = 0; i < 3 * 64; i++) stale += got[i] != src[8 * i + 3];
    bool ok = stale > 0;
    if (!ok) failures++;
    std::printf("%-58s %s %d of %d reads stale\n", "cp.async read before the wait gives stale data", ok ? "ok  " : "FAIL",
                stale, 3 * 64);
}

// ---- real kernels with a barrier or a wait removed --------------------------------------------------------
static void real_kernels() {
    int rows = 3, vocab = 500;
    std::vector<float> logits = randv((size_t)rows * vocab), loss(rows);
    std::vector<int> targets = {4, 77, 499};
    for (int plant : {-1, 0}) {
        auto l = logits;
        expect(plant < 0 ? "cross entropy as written" : "planted: cross entropy without block_max's first barrier",
               plant >= 0, [&] {
                   emu_plant_skip_syncthreads = plant;
                   launch(ce::nc_softcap_cross_entropy_f32, dim3{(unsigned)rows}, dim3{256}, l.data(),
                          (const int*)targets.data(), loss.data(), rows, vocab, 15.0f, 1.0f, 1);
               },
               {"kernel nc_softcap_cross_entropy_f32", "barrier interval 0", "ce::block_max::partial"});
    }
    int dim = 300;
    std::vector<float> x = randv((size_t)rows * dim), y(x.size()), rstd(rows);
    for (int plant : {-1, 0})
        expect(plant < 0 ? "rmsnorm forward as written" : "planted: rmsnorm forward without block_sum's first barrier",
               plant >= 0, [&] {
                   emu_plant_skip_syncthreads = plant;
                   launch(rms::nc_rmsnorm_forward_f32, dim3{(unsigned)rows}, dim3{128}, (const float*)x.data(), y.data(),
                          rstd.data(), rows, dim, 1e-6f);
               },
               {"kernel nc_rmsnorm_forward_f32", "barrier interval 0", "rms::block_sum::partial"});
    int B = 1, T = 20, H = 2, Hkv = 1, Dh = 16;
    std::vector<float> q = randv((size_t)B * T * H * Dh), k = randv((size_t)B * T * Hkv * Dh), v = randv(k.size());
    std::vector<float> out(q.size()), lse((size_t)B * H * T);
    for (int plant : {-1, 0})
        expect(plant < 0 ? "f32 attention forward as written" : "planted: f32 attention forward without its first __syncwarp",
               plant >= 0, [&] {
                   emu_plant_skip_syncwarp = plant;
                   launch(att::nc_attention_forward_f32, dim3{(unsigned)(T + 15) / 16, (unsigned)H, (unsigned)B}, dim3{128},
                          (const float*)q.data(), (const float*)k.data(), (const float*)v.data(), out.data(), lse.data(), B,
                          T, T, H, Hkv, Dh, 0, 0.25f);
               },
               {"kernel nc_attention_forward_f32", "nc_attention_forward_f32::ps"});
    // Flash attention (tensor cores, cp.async): the barrier after the first tiles land, then the first wait.
    int D = 64;
    std::vector<__nv_bfloat16> qb((size_t)T * H * D), kb((size_t)T * Hkv * D), vb(kb.size()), ob(qb.size());
    for (auto* t : {&qb, &kb, &vb})
        for (auto& e : *t) e = __float2bfloat16_rn(std::normal_distribution<float>(0, 1)(rng));
    auto flash = [&] {
        launch(fa::nc_flash_forward_d64_bf16, dim3{1, (unsigned)H, 1}, dim3{FLASH_THREADS}, (const __nv_bfloat16*)qb.data(),
               (const __nv_bfloat16*)kb.data(), (const __nv_bfloat16*)vb.data(), ob.data(), lse.data(), 1, T, T, H, Hkv, 0,
               0.125f);
    };
    expect("flash forward as written", false, flash, {});
    expect("planted: flash forward without the barrier after Q/K land", true, [&] {
        emu_plant_skip_syncthreads = 0;
        flash();
    }, {"kernel nc_flash_forward_d64_bf16", "barrier interval 0"});
    expect("planted: flash forward reading Q/K before their wait", true, [&] {
        emu_plant_skip_cp_wait = 0;
        flash();
    }, {"kernel nc_flash_forward_d64_bf16", "cp.async is still copying"});
}

int main() {
    if (!emu_race_instrumented()) {
        std::printf("race checks need -fsanitize=thread (see run.sh): FAIL\n1 failures\n");
        return 1;
    }
    emu_race_enable(true);
    small_kernels();
    real_kernels();
    std::printf("%d failures\n", failures);
    return failures != 0;
}
