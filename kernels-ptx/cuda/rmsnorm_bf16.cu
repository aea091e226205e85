// Weightless rmsnorm over rows for the bf16 engine: f32 or bf16 input rows, f32 statistics, bf16 output (the
// cast to bf16 fused into the norm, so the normalized row is written once, already in the GEMMs' input type),
// and the backward from the saved bf16 output with the gradient written in f32 or bf16, optionally added in.
//
// Launch: `row_dims(rows, ROW_THREADS)`, one block per row (any blockDim.x that is a multiple of 32, up to
// 1024). Rows are read with 16-byte vector loads (8 bf16, or two float4 of f32) when every row start is
// 16-byte aligned (the base pointers are and dim % 8 == 0: true for every model width), else with scalar loads;
// the second pass re-reads the row (from L1/L2). Sums are f32: per-thread partials, warp shuffles, one shared
// slot per warp. Row offsets are 64-bit. The math is core/src/backend/cpu/norm.rs's on the widened values; a
// bf16 store is round-to-nearest-even of the f32 result (__float2bfloat16_rn), as BF16_CONTRACT.md says.

#include <cuda_bf16.h>
#include <stddef.h>
#include <stdint.h>
#include "block_reduce.cuh"

typedef __nv_bfloat16 bf16;
#include "bf16_io.cuh"

// ---- forward: y = bf16(x rstd), rstd = 1 / sqrtf(mean(x^2) + eps) kept in f32 for the backward.

template <typename In>
__device__ void rmsnorm_forward(const In* x, bf16* y, float* rstd, int rows, int dim, float eps) {
    int row = blockIdx.x;
    if (row >= rows) return;
    const In* xr = x + (size_t)row * dim;
    bf16* yr = y + (size_t)row * dim;
    bool vec = dim % 8 == 0 && aligned16(x) && aligned16(y);
    float ss = 0.0f;
    if (vec) {
        for (int c = threadIdx.x * 8; c < dim; c += blockDim.x * 8) {
            float v[8];
            load8(xr + c, v);
            for (int k = 0; k < 8; k++) ss += v[k] * v[k];
        }
    } else {
        for (int c = threadIdx.x; c < dim; c += blockDim.x) {
            float v = load1(xr + c);
            ss += v * v;
        }
    }
    ss = block_sum(ss);
    // 1/sqrtf (both correctly rounded) rather than rsqrtf, as rmsnorm.cu and the CPU do.
    float s = 1.0f / sqrtf(ss / (float)dim + eps);
    if (threadIdx.x == 0) rstd[row] = s;
    if (vec) {
        for (int c = threadIdx.x * 8; c < dim; c += blockDim.x * 8) {
            float v[8];
            load8(xr + c, v);
            for (int k = 0; k < 8; k++) v[k] = v[k] * s;
            store8(yr + c, v);
        }
    } else {
        for (int c = threadIdx.x; c < dim; c += blockDim.x) store1(yr + c, load1(xr + c) * s);
    }
}

// (const f32* x, bf16* y, f32* rstd, i32 rows, i32 dim, f32 eps): the residual stream (f32) normalized to bf16.
extern "C" __global__ void nc_rmsnorm_forward_f32_bf16(const float* x, bf16* y, float* rstd, int rows, int dim,
                                                       float eps) {
    rmsnorm_forward(x, y, rstd, rows, dim, eps);
}
// (const bf16* x, bf16* y, f32* rstd, i32 rows, i32 dim, f32 eps): a bf16 residual stream normalized to bf16.
extern "C" __global__ void nc_rmsnorm_forward_bf16_bf16(const bf16* x, bf16* y, float* rstd, int rows, int dim,
                                                        float eps) {
    rmsnorm_forward(x, y, rstd, rows, dim, eps);
}

// ---- backward: g = rstd (dy - y mean(dy y)) from the saved bf16 output y and f32 rstd (y = x r and
// dr/dx = -r^3 x / dim give this); dx = g, or dx = dx + g when accumulate != 0 (the residual stream adds the
// norm's gradient to the one flowing past it). A bf16 dx stores round(g) or round(dx + g) with the sum in f32.

template <typename Dy, typename Dx>
__device__ void rmsnorm_backward(const bf16* y, const float* rstd, const Dy* dy, Dx* dx, int rows, int dim,
                                 int accumulate) {
    int row = blockIdx.x;
    if (row >= rows) return;
    size_t off = (size_t)row * dim;
    const bf16* yr = y + off;
    const Dy* dyr = dy + off;
    Dx* dxr = dx + off;
    bool vec = dim % 8 == 0 && aligned16(y) && aligned16(dy) && aligned16(dx);
    float dot = 0.0f;
    if (vec) {
        for (int c = threadIdx.x * 8; c < dim; c += blockDim.x * 8) {
            float a[8], b[8];
            load8(yr + c, a);
            load8(dyr + c, b);
            for (int k = 0; k < 8; k++) dot += a[k] * b[k];
        }
    } else {
        for (int c = threadIdx.x; c < dim; c += blockDim.x) dot += load1(yr + c) * load1(dyr + c);
    }
    float mean_dyy = block_sum(dot) / (float)dim;
    float s = rstd[row];
    if (vec) {
        for (int c = threadIdx.x * 8; c < dim; c += blockDim.x * 8) {
            float a[8], b[8], g[8];
            load8(yr + c, a);
            load8(dyr + c, b);
            if (accumulate) load8(dxr + c, g);
            for (int k = 0; k < 8; k++) {
                float gk = s * (b[k] - a[k] * mean_dyy);
                g[k] = accumulate ? g[k] + gk : gk;
            }
            store8(dxr + c, g);
        }
    } else {
        for (int c = threadIdx.x; c < dim; c += blockDim.x) {
            float g = s * (load1(dyr + c) - load1(yr + c) * mean_dyy);
            store1(dxr + c, accumulate ? load1(dxr + c) + g : g);
        }
    }
}

// (const bf16* y, const f32* rstd, const Dy* dy, Dx* dx, i32 rows, i32 dim, i32 accumulate), for the four
// combinations of dy and dx storage (the name says which).
extern "C" __global__ void nc_rmsnorm_backward_dy_bf16_dx_f32(const bf16* y, const float* rstd, const bf16* dy, float* dx,
                                                        int rows, int dim, int accumulate) {
    rmsnorm_backward(y, rstd, dy, dx, rows, dim, accumulate);
}
extern "C" __global__ void nc_rmsnorm_backward_dy_bf16_dx_bf16(const bf16* y, const float* rstd, const bf16* dy, bf16* dx,
                                                         int rows, int dim, int accumulate) {
    rmsnorm_backward(y, rstd, dy, dx, rows, dim, accumulate);
}
extern "C" __global__ void nc_rmsnorm_backward_dy_f32_dx_f32(const bf16* y, const float* rstd, const float* dy, float* dx,
                                                       int rows, int dim, int accumulate) {
    rmsnorm_backward(y, rstd, dy, dx, rows, dim, accumulate);
}
extern "C" __global__ void nc_rmsnorm_backward_dy_f32_dx_bf16(const bf16* y, const float* rstd, const float* dy, bf16* dx,
                                                        int rows, int dim, int accumulate) {
    rmsnorm_backward(y, rstd, dy, dx, rows, dim, accumulate);
}
