// The optimizer's work on the device: axpby and scale (Newton-Schulz's combinations, clipping), the sum of
// squares (norms for Newton-Schulz and for clipping), Muon's nesterov momentum and the AdamW step.
//
// The elementwise kernels are launched with `elementwise_dims(n)` (256 threads per block, at most 2^20
// blocks) and walk the arrays with 64-bit grid-stride loops, as elementwise.cu does. They compute the
// formulas of core/src/backend/optim_ops.rs in the same order, and every multiply, add, subtract and divide
// is written as its round-to-nearest intrinsic (__fmul_rn, __fadd_rn, __fsub_rn, __fdiv_rn): nvcc would
// otherwise contract a * x + b * y into an fma, which rounds once where the CPU rounds twice. The intrinsics
// are never contracted, so the optimizer's state comes out bit for bit equal to the CPU backend's (and a run
// resumed on the other backend continues the same numbers). sqrtf is correctly rounded (no fast-math, nvcc's
// default -prec-sqrt=true), as Rust's f32::sqrt is.

#include <stddef.h>
#include "block_reduce.cuh"

// The first index of this thread and the grid-wide stride, both 64-bit (blockIdx.x * blockDim.x alone
// would be computed in 32 bits).
__device__ __forceinline__ size_t grid_start() {
    return (size_t)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ size_t grid_stride() {
    return (size_t)gridDim.x * blockDim.x;
}

// y[i] = a x[i] + b y[i] for i < n; when b == 0 (also -0), y[i] = a x[i] without reading y, so a NaN or
// garbage in y does not survive (the optimizer uses it to overwrite a buffer). Grid-stride; the two products
// rounded, then their sum rounded, as the CPU does.
extern "C" __global__ void nc_axpby_f32(const float* x, float* y, unsigned long long n, float a, float b) {
    if (b == 0.0f) {
        for (size_t i = grid_start(); i < n; i += grid_stride()) {
            y[i] = __fmul_rn(a, x[i]);
        }
    } else {
        for (size_t i = grid_start(); i < n; i += grid_stride()) {
            y[i] = __fadd_rn(__fmul_rn(a, x[i]), __fmul_rn(b, y[i]));
        }
    }
}

// x[i] *= a for i < n, in place (gradient clipping, Newton-Schulz's normalisation). Grid-stride.
extern "C" __global__ void nc_scale_f32(float* x, unsigned long long n, float a) {
    for (size_t i = grid_start(); i < n; i += grid_stride()) {
        x[i] = __fmul_rn(x[i], a);
    }
}

// partial[blockIdx.x] = sum of (double)x[i]^2 over the elements this block visits. Launch with
// `sum_squares_dims(n)` (256 threads, at most 1024 blocks, so the caller's buffer of 1024 partials always
// suffices); any blockDim.x that is a multiple of 32, up to 1024, works. Each thread accumulates its
// grid-stride elements in f64, then the block reduces: warp shuffles on double, one shared slot per warp,
// and the first warp shuffles those. The square of an f32 is exact in f64 (24 + 24 significant bits), so
// whether nvcc fuses acc + v * v into an fma changes nothing. The order of additions is fixed for a given n
// (it depends only on the grid), so the result is deterministic; the host adds the partials in index order.
// f64 keeps a norm over 10^9 elements accurate to ~1e-7 relative whatever the order, where f32 would not.
extern "C" __global__ void nc_sum_squares_f64(const float* x, unsigned long long n, double* partial) {
    double acc = 0.0;
    for (size_t i = grid_start(); i < n; i += grid_stride()) {
        double v = (double)x[i];
        acc += v * v;
    }
    block_sum_f64_to(acc, &partial[blockIdx.x]);
}

// Muon's momentum with nesterov, for i < n: b = buf + (1 - mu)(g - buf); buf = b; update = g + mu (b - g).
// Grid-stride; 1 - mu is rounded once, as the CPU's per-element 1.0 - mu rounds to the same value.
extern "C" __global__ void nc_muon_momentum_f32(const float* g, float* buf, float* update, unsigned long long n,
                                                float mu) {
    float one_minus_mu = 1.0f - mu;
    for (size_t i = grid_start(); i < n; i += grid_stride()) {
        float gi = g[i];
        float bi = buf[i];
        float b = __fadd_rn(bi, __fmul_rn(one_minus_mu, __fsub_rn(gi, bi)));
        buf[i] = b;
        update[i] = __fadd_rn(gi, __fmul_rn(mu, __fsub_rn(b, gi)));
    }
}

// One AdamW step, for i < n: mi = m + (1 - beta1)(g - m); vi = v + (1 - beta2)(g g - v); m = mi; v = vi;
// p = p decay - (step mi) / (sqrtf(vi inv_bc2) + eps). The host computes decay = 1 - lr wd, step =
// lr / (1 - beta1^t) and inv_bc2 = 1 / (1 - beta2^t) once per step (optim_ops::AdamwStep). Grid-stride; a
// true division and a correctly rounded sqrtf, in the CPU's order.
extern "C" __global__ void nc_adamw_f32(float* p, const float* g, float* m, float* v, unsigned long long n,
                                        float beta1, float beta2, float eps, float decay, float step,
                                        float inv_bc2) {
    float one_minus_beta1 = 1.0f - beta1;
    float one_minus_beta2 = 1.0f - beta2;
    for (size_t i = grid_start(); i < n; i += grid_stride()) {
        float gi = g[i];
        float mi = __fadd_rn(m[i], __fmul_rn(one_minus_beta1, __fsub_rn(gi, m[i])));
        float vi = __fadd_rn(v[i], __fmul_rn(one_minus_beta2, __fsub_rn(__fmul_rn(gi, gi), v[i])));
        m[i] = mi;
        v[i] = vi;
        float denom = __fadd_rn(sqrtf(__fmul_rn(vi, inv_bc2)), eps);
        p[i] = __fsub_rn(__fmul_rn(p[i], decay), __fdiv_rn(__fmul_rn(step, mi), denom));
    }
}
