// The non-GEMM pieces of Muon's Newton-Schulz on tensor cores, batched over `batch` same-shape matrices, with
// nothing read back to the host: the Frobenius norms are computed and applied on the device.
//
// One Muon update of a batch of same-shape (rows x cols) matrices, n = rows cols elements each, the matrices'
// nesterov updates G contiguous as (batch, n) f32 (written by nc_muon_momentum_f32 per matrix, or any kernel):
//   1. nc_ns_sum_squares_f64: partial[b, j] = sum of G_b^2 over block j's elements, in f64.
//   2. nc_ns_normalize_bf16: X_b = bf16(G_b inv_b), inv_b = 1 / ((f32)sqrt(sum_j partial[b, j]) + eps), the
//      partials added in index order by every block (the same bits in each): the norm, its application and
//      the cast to bf16 in one pass.
//   3. The iteration, all GEMMs (cuBLASLt strided-batched, bf16 in and out, f32 compute), the quintic's a/b/c
//      folded into alpha/beta so no elementwise kernel runs inside it (wide orientation; a tall matrix uses
//      Y = X^T, see core/src/optim/device.rs):
//        A  = X X^T                    alpha 1, beta 0
//        B  = c (A A) + b A            alpha c, beta b, C = A (read), D = B
//        X' = B X + a X                alpha 1, beta a, C = X (read), D = X' (ping-pong buffer)
//   4. nc_muon_apply_bf16: p_b = -step X_b + p_b in f32 (the CPU's axpby(-step, X, 1, p) rounding), and the
//      bf16 working copy p_bf16_b = bf16(p_b). The parameters of the batch sit at a constant stride (the
//      same matrix of consecutive layers), so p and p_bf16 take a stride in elements.
//
// Launches: 1 and 2 with `ns_batched_dims(n, batch)` (grid (NS_PARTS, batch), 256 threads: NS_PARTS = 64
// blocks per matrix, each a 64-bit grid-stride loop over its matrix); 4 with `ns_apply_dims(n, batch)`. The
// f32 multiplies, adds and divides are round-to-nearest intrinsics (never contracted), so steps 2 and 4 are
// bit for bit the CPU's formulas given the same sum of squares.

#include <cuda_bf16.h>
#include <stddef.h>
#include <stdint.h>
#include "block_reduce.cuh"

typedef __nv_bfloat16 bf16;
#include "bf16_io.cuh"

#define NS_PARTS 64

__device__ __forceinline__ size_t block_start() { return (size_t)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ size_t block_stride() { return (size_t)gridDim.x * blockDim.x; }
__device__ __forceinline__ bool aligned(const void* p, unsigned bytes) { return ((uintptr_t)p & (bytes - 1)) == 0; }

// (const f32* g, u64 n, f64* partial): matrix b = blockIdx.y is g[b n .. (b + 1) n); block (j, b) writes
// partial[b gridDim.x + j] = sum over the elements i of matrix b with (i / blockDim.x) % gridDim.x == j of
// (f64)g^2. The square of an f32 is exact in f64; the per-thread, warp and block order is fixed, so the
// partials are deterministic. Any blockDim.x that is a multiple of 32 (<= 1024).
extern "C" __global__ void nc_ns_sum_squares_f64(const float* g, unsigned long long n, double* partial) {
    const float* x = g + (size_t)blockIdx.y * n;
    double acc = 0.0;
    for (size_t i = block_start(); i < n; i += block_stride()) {
        double v = (double)x[i];
        acc += v * v;
    }
    block_sum_f64_to(acc, &partial[(size_t)blockIdx.y * gridDim.x + blockIdx.x]);
}

// (const f32* g, u64 n, const f64* partial, i32 parts, f32 eps, bf16* x): for matrix b = blockIdx.y,
// total = partial[b parts] + ... + partial[b parts + parts - 1] (in that order, f64), norm = (f32)sqrt(total)
// (f64 sqrt, then rounded, as the CPU's `sum_squares(..).sqrt() as f32`), inv = 1 / (norm + eps) in f32, and
// x[b n + i] = bf16(g[b n + i] inv) (the f32 product rounded to bf16). parts is the sum's grid.x (NS_PARTS).
// 16-byte loads of g and 8-byte stores of 4 bf16 when aligned; a scalar tail.
extern "C" __global__ void nc_ns_normalize_bf16(const float* g, unsigned long long n, const double* partial, int parts,
                                                float eps, bf16* x) {
    __shared__ float inv_shared[1];  // an array: one slot, written by thread 0
    size_t b = blockIdx.y;
    if (threadIdx.x == 0) {
        double total = 0.0;
        for (int j = 0; j < parts; j++) total += partial[b * parts + j];
        float norm = (float)sqrt(total);
        inv_shared[0] = __fdiv_rn(1.0f, __fadd_rn(norm, eps));
    }
    __syncthreads();
    float inv = inv_shared[0];
    const float* src = g + b * n;
    bf16* dst = x + b * n;
    size_t head = 0;
    if (aligned(src, 16) && aligned(dst, 8)) {
        head = n / 4 * 4;
        for (size_t i = block_start() * 4; i < head; i += block_stride() * 4) {
            float4 v = *reinterpret_cast<const float4*>(src + i);
            *reinterpret_cast<uint2*>(dst + i) = make_uint2(pack_bf16x2(__fmul_rn(v.x, inv), __fmul_rn(v.y, inv)),
                                                            pack_bf16x2(__fmul_rn(v.z, inv), __fmul_rn(v.w, inv)));
        }
    }
    for (size_t i = head + block_start(); i < n; i += block_stride()) dst[i] = __float2bfloat16_rn(__fmul_rn(src[i], inv));
}

// (const bf16* x, u64 n, f32* p, u64 p_stride, bf16* p_bf16, u64 pb_stride, f32 a): for matrix b = blockIdx.y,
// with X = x + b n, P = p + b p_stride, Pb = p_bf16 + b pb_stride: P[i] = a X[i] + P[i] (the product rounded,
// then the sum: the CPU's axpby(a, X, 1, P), whose 1 P is exact), then Pb[i] = bf16(P[i]) unless p_bf16 is
// null. a is -lr shape_scale. Scalar accesses (the strides need not keep vector alignment); consecutive
// threads take consecutive elements, so the accesses coalesce.
extern "C" __global__ void nc_muon_apply_bf16(const bf16* x, unsigned long long n, float* p,
                                              unsigned long long p_stride, bf16* p_bf16, unsigned long long pb_stride,
                                              float a) {
    size_t b = blockIdx.y;
    const bf16* xb = x + b * n;
    float* pp = p + b * p_stride;
    bf16* pb = p_bf16 ? p_bf16 + b * pb_stride : p_bf16;
    for (size_t i = block_start(); i < n; i += block_stride()) {
        float v = __fadd_rn(__fmul_rn(a, __bfloat162float(xb[i])), pp[i]);
        pp[i] = v;
        if (pb) pb[i] = __float2bfloat16_rn(v);
    }
}
