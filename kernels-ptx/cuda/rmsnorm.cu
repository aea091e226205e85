// Weightless rmsnorm over rows (the residual stream, and per head for QK-norm), forward and backward.
//
// Launch: `row_dims(rows, ROW_THREADS)`, one block per row. A row is at most a few thousand floats, so one
// block reads it with coalesced strided loops, reduces in f32 (warp shuffles, then one shared-memory slot
// per warp) and writes it back; the row is re-read from global for the output pass (it is still in L1/L2).
// Row offsets are 64-bit (rows * dim exceeds 2^31 for big batches). Mirrors core/src/backend/cpu/norm.rs.

#include <stddef.h>
#include "block_reduce.cuh"

// y = x rstd, rstd = 1 / sqrt(mean(x^2) + eps), saved per row for the backward. One block per row.
// 1/sqrtf (both correctly rounded) rather than rsqrtf, to agree with the CPU's 1 / sqrt to the last bit
// as often as possible.
extern "C" __global__ void nc_rmsnorm_forward_f32(const float* x, float* y, float* rstd, int rows, int dim,
                                                  float eps) {
    int row = blockIdx.x;
    if (row >= rows) return;
    const float* xr = x + (size_t)row * dim;
    float* yr = y + (size_t)row * dim;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) ss += xr[c] * xr[c];
    ss = block_sum(ss);
    float s = 1.0f / sqrtf(ss / (float)dim + eps);
    if (threadIdx.x == 0) rstd[row] = s;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) yr[c] = xr[c] * s;
}

// g = rstd (dy - y mean(dy y)), from the saved output y and rstd (y = x r, dr/dx = -r^3 x / dim gives this);
// dx = g, or dx += g when accumulate != 0 (the residual stream adds the norm's grad to the grad flowing past
// it). One block per row; y and dy are read twice, the second time from cache.
extern "C" __global__ void nc_rmsnorm_backward_f32(const float* y, const float* rstd, const float* dy, float* dx,
                                                   int rows, int dim, int accumulate) {
    int row = blockIdx.x;
    if (row >= rows) return;
    size_t off = (size_t)row * dim;
    const float* yr = y + off;
    const float* dyr = dy + off;
    float* dxr = dx + off;
    float dot = 0.0f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) dot += yr[c] * dyr[c];
    float mean_dyy = block_sum(dot) / (float)dim;
    float s = rstd[row];
    if (accumulate) {
        for (int c = threadIdx.x; c < dim; c += blockDim.x) dxr[c] += s * (dyr[c] - yr[c] * mean_dyy);
    } else {
        for (int c = threadIdx.x; c < dim; c += blockDim.x) dxr[c] = s * (dyr[c] - yr[c] * mean_dyy);
    }
}
