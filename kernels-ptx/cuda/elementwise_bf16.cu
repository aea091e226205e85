// Elementwise kernels with bf16 storage: the casts f32 <-> bf16, and relu^2 forward and backward with the cast
// to bf16 fused in.
//
// Why relu^2 is a kernel and not a GEMM epilogue: cuBLASLt's epilogues offer relu, gelu, bias and their
// gradients (DRELU, DGELU with a bitmask or aux input), but no relu^2 and no 2 relu(u) factor; and the forward
// needs both u (saved for the backward) and h = relu(u)^2 (the next GEMM's input), so even an epilogue that
// wrote h would leave u to be stored separately. One pass that reads u and writes h in bf16 costs 2 + 2 bytes an
// element (bf16 u) and is what the cast would cost anyway.
//
// Launch: `elementwise_dims(n.div_ceil(8))`: each thread handles 8 consecutive elements per step of a 64-bit
// grid-stride loop, through 16-byte loads/stores (8 bf16, or two float4) when every pointer is 16-byte aligned;
// the last n % 8 elements (or all of them, when a pointer is not aligned) go through a scalar grid-stride loop.
// A bf16 store is round-to-nearest-even of the f32 result; reading a bf16 is exact.

#include <cuda_bf16.h>
#include <stddef.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;
#include "bf16_io.cuh"

__device__ __forceinline__ size_t grid_start() { return (size_t)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ size_t grid_stride() { return (size_t)gridDim.x * blockDim.x; }

// The walk of every kernel here over n elements, grid-stride: when `aligned`, 8 consecutive elements a step
// (`eight(i)` takes i..i + 8, through 16-byte accesses) up to n rounded down to 8; then the rest (all of them when
// not aligned) one a step (`one(i)`).
template <typename Eight, typename One>
__device__ __forceinline__ void walk(unsigned long long n, bool aligned, Eight eight, One one) {
    size_t head = 0;
    if (aligned) {
        head = n / 8 * 8;
        for (size_t i = grid_start() * 8; i < head; i += grid_stride() * 8) eight(i);
    }
    for (size_t i = head + grid_start(); i < n; i += grid_stride()) one(i);
}

// ---- casts: dst[i] = src[i] converted (f32 -> bf16 rounds to nearest even, NaN stays NaN; bf16 -> f32 exact).

template <typename Src, typename Dst>
__device__ void cast(const Src* src, Dst* dst, unsigned long long n) {
    walk(
        n, aligned16(src) && aligned16(dst),
        [&](size_t i) {
            float v[8];
            load8(src + i, v);
            store8(dst + i, v);
        },
        [&](size_t i) { store1(dst + i, load1(src + i)); });
}

// (const f32* src, bf16* dst, u64 n)
extern "C" __global__ void nc_cast_f32_to_bf16(const float* src, bf16* dst, unsigned long long n) { cast(src, dst, n); }
// (const bf16* src, f32* dst, u64 n)
extern "C" __global__ void nc_cast_bf16_to_f32(const bf16* src, float* dst, unsigned long long n) { cast(src, dst, n); }

// ---- relu^2 forward: h[i] = bf16(relu(u[i])^2), the square of the clamped value as the CPU computes it.

template <typename In>
__device__ void relu2_forward(const In* u, bf16* h, unsigned long long n) {
    walk(
        n, aligned16(u) && aligned16(h),
        [&](size_t i) {
            float v[8];
            load8(u + i, v);
            for (int k = 0; k < 8; k++) {
                float r = fmaxf(v[k], 0.0f);
                v[k] = r * r;
            }
            store8(h + i, v);
        },
        [&](size_t i) {
            float r = fmaxf(load1(u + i), 0.0f);
            store1(h + i, r * r);
        });
}

// (const In* u, bf16* h, u64 n); In is the c_fc GEMM's output type (the name says which).
extern "C" __global__ void nc_relu2_forward_f32_to_bf16(const float* u, bf16* h, unsigned long long n) {
    relu2_forward(u, h, n);
}
extern "C" __global__ void nc_relu2_forward_bf16_to_bf16(const bf16* u, bf16* h, unsigned long long n) {
    relu2_forward(u, h, n);
}

// ---- relu^2 backward: du[i] = bf16(dh[i] (2 relu(u[i]))), the factor formed first and then multiplied in,
// the CPU's order of rounding. du may be dh itself (in place) when both are bf16: each element is read before
// it is written, by the same thread.

template <typename U, typename Dh>
__device__ void relu2_backward(const U* u, const Dh* dh, bf16* du, unsigned long long n) {
    walk(
        n, aligned16(u) && aligned16(dh) && aligned16(du),
        [&](size_t i) {
            float a[8], g[8];
            load8(u + i, a);
            load8(dh + i, g);
            for (int k = 0; k < 8; k++) g[k] = g[k] * (2.0f * fmaxf(a[k], 0.0f));
            store8(du + i, g);
        },
        [&](size_t i) { store1(du + i, load1(dh + i) * (2.0f * fmaxf(load1(u + i), 0.0f))); });
}

// (const U* u, const Dh* dh, bf16* du, u64 n): the name gives u's storage, then dh's.
extern "C" __global__ void nc_relu2_backward_u_bf16_dh_bf16(const bf16* u, const bf16* dh, bf16* du,
                                                            unsigned long long n) {
    relu2_backward(u, dh, du, n);
}
extern "C" __global__ void nc_relu2_backward_u_bf16_dh_f32(const bf16* u, const float* dh, bf16* du,
                                                           unsigned long long n) {
    relu2_backward(u, dh, du, n);
}
extern "C" __global__ void nc_relu2_backward_u_f32_dh_bf16(const float* u, const bf16* dh, bf16* du,
                                                           unsigned long long n) {
    relu2_backward(u, dh, du, n);
}
extern "C" __global__ void nc_relu2_backward_u_f32_dh_f32(const float* u, const float* dh, bf16* du,
                                                          unsigned long long n) {
    relu2_backward(u, dh, du, n);
}
