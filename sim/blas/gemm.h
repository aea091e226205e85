// The arithmetic of the simulated cuBLAS / cuBLASLt: one column-major (strided-batched) GEMM
//
//     D = alpha * op(A) op(B) + beta * C        op(A) is m x k, op(B) is k x n, C and D are m x n,
//
// on host-addressable memory (the simulated device's), as NVIDIA's documentation defines it. Header-only so
// that each library compiles it into its own .so (the build is one g++ call per library).
//
// The numbers, fixed so a test can predict them to the bit:
// - Inputs: bf16 widened to f32 exactly; f32 taken as is, or rounded to TF32 (10 mantissa bits, nearest, ties
//   away from zero, as cvt.rna.tf32.f32 does) when the caller asked for TF32 math.
// - Accumulation: one f32 accumulator per output element, starting at 0, adding the products
//   op(A)(i,p) * op(B)(p,j) for p = 0, 1, ..., k-1 in that order, each product rounded to f32 and then added
//   (no fused multiply-add: for bf16 inputs the product is exact, so this equals an FMA chain; for f32 inputs
//   it is one rounding more per term than a GPU's FFMA). A GPU's order differs (split-K, tensor-core
//   fragments): a test may rely on this order only to check the simulated library itself.
// - Epilogue: v = alpha * acc (f32), then, only when beta != 0, v = v + beta * C(i,j) (each step rounded to
//   f32); beta == 0 never reads C, so NaN poison there does not leak (BLAS semantics). alpha == 0 or k == 0
//   reads neither A nor B.
// - Output: f32 as is, or bf16 rounded to nearest even (NaN becomes the canonical bf16 NaN 0x7FFF).
//
// Speed: operands are packed into f32 panels (8-row slivers of op(A), 6-column slivers of op(B)), and an
// 8 x 6 register-blocked kernel written with GCC vector extensions (SSE2 on baseline x86-64, NEON on arm64)
// runs over them; the per-element accumulation order above is kept exactly (the vector lanes are different
// output elements, never different p). Large GEMMs split their column panels over a few threads
// (NC_SIM_BLAS_THREADS, default the hardware threads up to 8): each element is still one thread's sum in the
// order above, so results do not depend on the thread count.
#pragma once
// The order and rounding above must not change with the target's FMA support.
#pragma GCC optimize("fp-contract=off")
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ncsim_bf16.h"

namespace {

enum class Elem { F32, Bf16 };

size_t elem_bytes(Elem e) {
    return e == Elem::F32 ? 4 : 2;
}

const char* elem_name(Elem e) {
    return e == Elem::F32 ? "f32" : "bf16";
}

float round_to_tf32(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    if ((bits & 0x7f800000u) == 0x7f800000u) return f;  // inf and NaN unchanged
    bits = (bits + 0x1000u) & ~0x1fffu;                  // nearest, ties away from zero (sign-magnitude)
    std::memcpy(&f, &bits, 4);
    return f;
}

// One stored operand: element (r, c) of matrix `b` of the batch is at ptr + b*stride + r + c*ld (elements).
struct Operand {
    const void* ptr = nullptr;
    Elem type = Elem::F32;
    int64_t ld = 0;
    int64_t stride = 0;
    bool trans = false;  // op(X) = X^T
};

struct Gemm {
    int64_t m = 0, n = 0, k = 0, batch = 1;
    Operand a, b;
    const void* c = nullptr;  // read only when beta != 0
    Elem c_type = Elem::F32;
    int64_t ldc = 0, stride_c = 0;
    void* d = nullptr;
    Elem d_type = Elem::F32;
    int64_t ldd = 0, stride_d = 0;
    float alpha = 1, beta = 0;
    // Device pointer mode: alpha and beta are read from device memory when the work runs.
    const float* alpha_device = nullptr;
    const float* beta_device = nullptr;
    bool tf32 = false;  // round f32 inputs to TF32
};

float load(const void* base, Elem type, int64_t index) {
    if (type == Elem::F32) return static_cast<const float*>(base)[index];
    return ncsim_bf16::bf16_to_f32(static_cast<const uint16_t*>(base)[index]);
}

void store(void* base, Elem type, int64_t index, float v) {
    if (type == Elem::F32)
        static_cast<float*>(base)[index] = v;
    else
        static_cast<uint16_t*>(base)[index] = ncsim_bf16::f32_to_bf16_canonical_nan(v);
}

constexpr int MR = 8;      // rows of op(A) per register tile
constexpr int NR = 6;      // columns of op(B) per register tile
constexpr int64_t MC = 128; // rows of op(A) packed at once
constexpr int64_t NC = 96;  // columns of op(B) packed at once

// op(X)(row, col) of a stored operand whose batch matrix starts at `base`.
float operand_at(const Operand& x, const void* base, int64_t row, int64_t col) {
    int64_t index = x.trans ? col + row * x.ld : row + col * x.ld;
    return load(base, x.type, index);
}

// Rows [i0, i0 + rows) of op(X), all k columns, as slivers of W rows: out[s*k*W + p*W + r]. Rows past the end
// are zero (their results are never stored).
template <int W>
void pack_rows(const Operand& x, const void* base, int64_t i0, int64_t rows, int64_t k, bool tf32, float* out) {
    for (int64_t s = 0; s * W < rows; s++) {
        float* sliver = out + s * k * W;
        for (int r = 0; r < W; r++) {
            int64_t i = i0 + s * W + r;
            bool live = s * W + r < rows;
            for (int64_t p = 0; p < k; p++) {
                float v = live ? operand_at(x, base, i, p) : 0.0f;
                sliver[p * W + r] = tf32 ? round_to_tf32(v) : v;
            }
        }
    }
}

// Rows [i0, i0 + rows) of op(A) as slivers of MR rows.
void pack_a(const Operand& a, const void* base, int64_t i0, int64_t rows, int64_t k, bool tf32, float* out) {
    pack_rows<MR>(a, base, i0, rows, k, tf32, out);
}

// Columns [j0, j0 + cols) of op(B), all k rows, as slivers of NR columns: out[s*k*NR + p*NR + c]. The columns
// of op(B) are the rows of op(B)^T, which is the same stored matrix read with the other transpose.
void pack_b(const Operand& b, const void* base, int64_t j0, int64_t cols, int64_t k, bool tf32, float* out) {
    Operand b_transposed = b;
    b_transposed.trans = !b.trans;
    pack_rows<NR>(b_transposed, base, j0, cols, k, tf32, out);
}

typedef float v4f __attribute__((vector_size(16)));

// acc (MR x NR, column-major) = sum over p in order of a_sliver[p] (MR) times b_sliver[p] (NR). The 12
// accumulators are named so they stay in registers (an array of them is kept on the stack at -O2).
void kernel_8x6(int64_t k, const float* a_sliver, const float* b_sliver, float* acc) {
    v4f c00 = {0, 0, 0, 0}, c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    v4f c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (int64_t p = 0; p < k; p++) {
        v4f a0, a1;
        std::memcpy(&a0, a_sliver + p * MR, 16);
        std::memcpy(&a1, a_sliver + p * MR + 4, 16);
        const float* bp = b_sliver + p * NR;
        // Each product is rounded, then added: the documented order, whatever the target's FMA support.
#define NCSIM_COLUMN(j, lo, hi)              \
    {                                        \
        v4f bj = v4f{bp[j], bp[j], bp[j], bp[j]}; \
        v4f prod0 = a0 * bj, prod1 = a1 * bj; \
        lo = lo + prod0;                     \
        hi = hi + prod1;                     \
    }
        NCSIM_COLUMN(0, c00, c01)
        NCSIM_COLUMN(1, c10, c11)
        NCSIM_COLUMN(2, c20, c21)
        NCSIM_COLUMN(3, c30, c31)
        NCSIM_COLUMN(4, c40, c41)
        NCSIM_COLUMN(5, c50, c51)
#undef NCSIM_COLUMN
    }
    const v4f out[NR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
    std::memcpy(acc, out, sizeof out);
}

// D(i, j) from the accumulator: alpha * acc, plus beta * C(i, j) only when beta != 0.
void finish(const Gemm& g, const void* c_base, void* d_base, int64_t i, int64_t j, float acc, float alpha,
            float beta) {
    float v = alpha * acc;
    if (beta != 0.0f) {
        float old = beta * load(c_base, g.c_type, i + j * g.ldc);
        v = v + old;
    }
    store(d_base, g.d_type, i + j * g.ldd, v);
}

const void* offset(const void* base, Elem type, int64_t elements) {
    return static_cast<const char*>(base) + elements * int64_t(elem_bytes(type));
}

// Columns [j0, j0 + NC) of matrix `bi` of the batch (alpha != 0, k > 0), with this thread's packing panels.
void run_panel(const Gemm& g, int64_t bi, int64_t j0, float alpha, float beta) {
    thread_local std::vector<float> a_pack, b_pack;  // reused across calls on this thread
    const void* a_base = offset(g.a.ptr, g.a.type, bi * g.a.stride);
    const void* b_base = offset(g.b.ptr, g.b.type, bi * g.b.stride);
    const void* c_base = beta != 0.0f ? offset(g.c, g.c_type, bi * g.stride_c) : nullptr;
    void* d_base = const_cast<void*>(offset(g.d, g.d_type, bi * g.stride_d));
    const int64_t k = g.k;
    float acc[MR * NR];
    int64_t cols = std::min(NC, g.n - j0);
    int64_t b_slivers = (cols + NR - 1) / NR;
    b_pack.resize(size_t(b_slivers * k * NR));
    pack_b(g.b, b_base, j0, cols, k, g.tf32, b_pack.data());
    for (int64_t i0 = 0; i0 < g.m; i0 += MC) {
        int64_t rows = std::min(MC, g.m - i0);
        int64_t a_slivers = (rows + MR - 1) / MR;
        a_pack.resize(size_t(a_slivers * k * MR));
        pack_a(g.a, a_base, i0, rows, k, g.tf32, a_pack.data());
        for (int64_t sb = 0; sb < b_slivers; sb++) {
            for (int64_t sa = 0; sa < a_slivers; sa++) {
                kernel_8x6(k, a_pack.data() + sa * k * MR, b_pack.data() + sb * k * NR, acc);
                for (int jj = 0; jj < NR; jj++) {
                    int64_t j = j0 + sb * NR + jj;
                    if (j >= j0 + cols) break;
                    for (int ii = 0; ii < MR; ii++) {
                        int64_t i = i0 + sa * MR + ii;
                        if (i >= i0 + rows) break;
                        finish(g, c_base, d_base, i, j, acc[jj * MR + ii], alpha, beta);
                    }
                }
            }
        }
    }
}

// Threads one GEMM may use: NC_SIM_BLAS_THREADS, else the machine's hardware threads (at most 8). Each output
// element is computed by one thread in the fixed order above, so the thread count never changes a result.
int gemm_threads() {
    static const int threads = [] {
        int hardware = int(std::min(8u, std::max(1u, std::thread::hardware_concurrency())));
        const char* text = std::getenv("NC_SIM_BLAS_THREADS");
        if (!text || !*text) return hardware;
        char* end = nullptr;
        long v = std::strtol(text, &end, 10);
        if (*end != '\0' || v < 1 || v > 256) {
            std::fprintf(stderr, "nc simulated cuBLAS: NC_SIM_BLAS_THREADS=%s is not a thread count from 1 to 256; "
                                 "using %d\n", text, hardware);
            return hardware;
        }
        return int(v);
    }();
    return threads;
}

// GEMMs with fewer multiply-adds than this run on the stream's worker alone (a thread start costs more).
constexpr int64_t PARALLEL_MIN_MACS = int64_t(1) << 22;

// The whole (batched) GEMM: the stream's worker thread, helped by up to gemm_threads() - 1 more, each taking
// the next (batch matrix, column panel) until none is left.
void run_gemm(const Gemm& g) {
    float alpha = g.alpha_device ? *g.alpha_device : g.alpha;
    float beta = g.beta_device ? *g.beta_device : g.beta;
    if (alpha == 0.0f || g.k == 0) {
        // D = beta C (or 0): neither A nor B is read.
        for (int64_t bi = 0; bi < g.batch; bi++) {
            const void* c_base = beta != 0.0f ? offset(g.c, g.c_type, bi * g.stride_c) : nullptr;
            void* d_base = const_cast<void*>(offset(g.d, g.d_type, bi * g.stride_d));
            for (int64_t j = 0; j < g.n; j++)
                for (int64_t i = 0; i < g.m; i++) finish(g, c_base, d_base, i, j, 0.0f, 0.0f, beta);
        }
        return;
    }
    const int64_t panels = (g.n + NC - 1) / NC, items = g.batch * panels;
    std::atomic<int64_t> next{0};
    auto work = [&] {
        for (int64_t item = next++; item < items; item = next++) run_panel(g, item / panels, (item % panels) * NC, alpha, beta);
    };
    int64_t helpers = 0;
    if (g.m * g.n * g.k * g.batch >= PARALLEL_MIN_MACS) helpers = std::min<int64_t>(gemm_threads(), items) - 1;
    std::vector<std::thread> threads;
    for (int64_t t = 0; t < helpers; t++) threads.emplace_back(work);
    work();
    for (std::thread& t : threads) t.join();
}

}  // namespace
