// Speed of the emulator (emu.h) on the launches a small training step makes: time per launch of real kernels
// at the shapes the CUDA backend uses for a depth-4, width-256 model with batch 4 x 128 tokens. Not a test (run.sh
// builds test*.cpp only); BENCHMARKS.md records its output. Build and run (NC_SIM_THREADS picks the pool):
//   g++ -std=c++20 -O2 -pthread -Ishim -I. -I../cuda bench.cpp -o /tmp/emu_bench && /tmp/emu_bench
#include "emu.h"
#include "emu_tc.h"
namespace ew {
#include "elementwise.cu"
}
namespace rms {
#include "rmsnorm.cu"
}
namespace ce {
#include "cross_entropy.cu"
}
#define NC_EMU 1
namespace fa {
#include "flash_attention.cu"
}
#include <time.h>
#include <functional>
#include <random>

// Best of `reps` runs of `body`: CPU milliseconds of the whole process (all pool threads), which a loaded
// machine disturbs less than wall time.
static double cpu_ms() {
    timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}
static double best_ms(int reps, const std::function<void()>& body) {
    double best = 1e30;
    for (int i = 0; i < reps; i++) {
        double t0 = cpu_ms();
        body();
        best = std::min(best, cpu_ms() - t0);
    }
    return best;
}

int main() {
    const int B = 4, T = 128, d = 256, H = 2, D = 128, vocab = 8192, rows = B * T;
    std::mt19937 rng(1);
    std::normal_distribution<float> nd(0, 1);
    std::vector<float> x((size_t)rows * 4 * d), y(x.size()), rstd(rows), logits((size_t)rows * vocab), loss(rows);
    for (auto& v : x) v = nd(rng);
    for (auto& v : logits) v = nd(rng);
    std::vector<int> targets(rows);
    for (int i = 0; i < rows; i++) targets[i] = i * 7 % vocab;
    std::vector<__nv_bfloat16> q((size_t)rows * H * D), k(q.size()), v(q.size()), o(q.size());
    for (auto* t : {&q, &k, &v})
        for (auto& e : *t) e = __float2bfloat16_rn(nd(rng));
    std::vector<float> lse((size_t)B * H * T);
    unsigned long long n = x.size();
    std::printf("emu bench: %u OS threads; model shapes B %d T %d d %d heads %d x %d vocab %d\n", emu_pool().threads, B, T,
                d, H, D, vocab);
    std::printf("%-52s %10s %14s\n", "launch", "CPU ms", "ns / thread");
    auto row = [&](const char* what, double ms, double threads) {
        std::printf("%-52s %10.2f %14.1f\n", what, ms, ms * 1e6 / threads);
    };
    unsigned ew_blocks = (unsigned)((n + 255) / 256);
    row("relu2 forward, n = B T 4d (2048 x 256 threads)",
        best_ms(5, [&] { launch(ew::nc_relu2_forward_f32, dim3{ew_blocks}, dim3{256}, (const float*)x.data(), y.data(), n); }),
        256.0 * ew_blocks);
    row("rmsnorm forward, 512 rows x 256 (512 x 256 threads)", best_ms(5, [&] {
            launch(rms::nc_rmsnorm_forward_f32, dim3{(unsigned)rows}, dim3{256}, (const float*)x.data(), y.data(), rstd.data(),
                   rows, d, 1e-6f);
        }),
        256.0 * rows);
    row("softcap cross entropy + grad, 512 rows x 8192", best_ms(3, [&] {
            launch(ce::nc_softcap_cross_entropy_f32, dim3{(unsigned)rows}, dim3{256}, logits.data(), (const int*)targets.data(),
                   loss.data(), rows, vocab, 15.0f, 1.0f / rows, 1);
        }),
        256.0 * rows);
    dim3 fgrid{(unsigned)(T + 63) / 64, (unsigned)H, (unsigned)B};
    row("flash forward d128, B 4 T 128 H 2 (16 x 128 threads)", best_ms(3, [&] {
            launch(fa::nc_flash_forward_d128_bf16, fgrid, dim3{FLASH_THREADS}, (const __nv_bfloat16*)q.data(),
                   (const __nv_bfloat16*)k.data(), (const __nv_bfloat16*)v.data(), o.data(), lse.data(), B, T, T, H, H, 0,
                   0.088f);
        }),
        128.0 * fgrid.x * fgrid.y * fgrid.z);
    return 0;
}
