// Rotary position embedding, half-split layout, in place; the same kernel does the backward with
// sin_sign = -1 (the rotation is orthogonal, its transpose is the rotation by the opposite angle).
//
// Launch: `elementwise_dims(rows * heads * head_dim / 2)`, grid-stride over the (row, head, j) pairs with
// 64-bit indices (B T H D/2 exceeds 2^31 only for huge batches, but the cost of being safe is nil). Each
// thread owns one pair (x[j], x[j + D/2]) and rewrites both, so no two threads touch the same element.
// Mirrors `rotary` in core/src/backend/cpu/norm.rs.

#include <stddef.h>

// x is (rows = batch t, heads, head_dim); row r sits at position p = pos0 + r % t. table holds cos then
// sin, each (max_pos, head_dim/2). For j < D/2: c = cos[p, j], s = sin_sign sin[p, j];
// (x1, x2) = (x[j], x[j + D/2]) become (x1 c + x2 s, -x1 s + x2 c).
extern "C" __global__ void nc_rotary_f32(float* x, const float* table, int rows, int t, int heads, int head_dim,
                                         int pos0, int max_pos, float sin_sign) {
    size_t half = (size_t)(head_dim / 2);
    size_t n = (size_t)rows * heads * half;
    const float* cos_table = table;
    const float* sin_table = table + (size_t)max_pos * half;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += (size_t)gridDim.x * blockDim.x) {
        size_t j = idx % half;
        size_t row_head = idx / half;  // r * heads + h
        size_t r = row_head / heads;
        size_t p = (size_t)pos0 + r % (size_t)t;
        float c = cos_table[p * half + j];
        float s = sin_sign * sin_table[p * half + j];
        float* xh = x + row_head * (size_t)head_dim;
        float x1 = xh[j];
        float x2 = xh[j + half];
        xh[j] = x1 * c + x2 * s;
        xh[j + half] = -x1 * s + x2 * c;
    }
}
