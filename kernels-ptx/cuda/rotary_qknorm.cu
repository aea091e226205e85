// Rotary embedding then QK-norm (weightless rmsnorm over each head), fused, for the bf16 engine; and the
// backward through both. The model's order (nanochat/SPEC.md, core/src/model/attention.rs): q and k from their
// projections, rotary (half-split), then rmsnorm over the head dim; the normalized q and k are what attention
// reads and what the backward saves. Here the rotated value stays in f32 registers (it is not rounded to bf16
// between the two steps); only the normalized output is stored, in bf16, and rstd in f32.
//
// Layout: x (rows = batch t, heads, head_dim) row-major; row r sits at position p = pos0 + r % t; the table holds
// cos then sin, each (max_pos, head_dim / 2), f32. A null table skips the rotation: the kernels are then the
// per-head rmsnorm (QK-norm alone).
//
// Launch: `qknorm_dims(rows * heads)`: one warp per (row, head), QKNORM_WARPS (8) warps per block. head_dim is
// even and <= 256: lane l owns the pairs (j, j + D/2) for j in {2l, 2l + 1, 64 + 2l, 65 + 2l} (those < D/2),
// kept in registers between the sum and the scaling. Lanes read consecutive pairs, so a warp's loads of one
// half-row are one contiguous span (128 or 256 bytes at D = 128): 4-byte bf16x2 / 8-byte float2 accesses when
// D/2 is even and the pointers are aligned, scalar ones otherwise. No block barrier: a warp past the last row
// just returns. Offsets are 64-bit.

#include <cuda_bf16.h>
#include <stddef.h>
#include <stdint.h>
#include "block_reduce.cuh"

typedef __nv_bfloat16 bf16;
#include "bf16_io.cuh"

#define QKNORM_WARPS 8
#define QKNORM_MAX_HEAD_DIM 256

// Two consecutive elements (p aligned to their joint size).
__device__ __forceinline__ void load2(const float* p, float v[2]) {
    float2 a = *reinterpret_cast<const float2*>(p);
    v[0] = a.x, v[1] = a.y;
}
__device__ __forceinline__ void load2(const bf16* p, float v[2]) {
    unsigned u = *reinterpret_cast<const unsigned*>(p);
    v[0] = __uint_as_float(u << 16), v[1] = __uint_as_float(u & 0xffff0000u);  // widening a bf16 is exact
}
__device__ __forceinline__ void store2(float* p, const float v[2]) { *reinterpret_cast<float2*>(p) = make_float2(v[0], v[1]); }
__device__ __forceinline__ void store2(bf16* p, const float v[2]) {
    *reinterpret_cast<unsigned*>(p) = (unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(v[0])) |
                                      ((unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(v[1])) << 16);
}

// Elements j0 and j0 + 1 of p (those with index < half): vectorized when allowed, else one by one. Dead slots
// read as 0.
template <typename T>
__device__ __forceinline__ void load_pair(const T* p, int j0, int half, bool vec, float v[2]) {
    v[0] = 0.0f, v[1] = 0.0f;
    if (vec) {
        if (j0 < half) load2(p + j0, v);  // half even and j0 even: j0 + 1 < half too
    } else {
        if (j0 < half) v[0] = load1(p + j0);
        if (j0 + 1 < half) v[1] = load1(p + j0 + 1);
    }
}
template <typename T>
__device__ __forceinline__ void store_pair(T* p, int j0, int half, bool vec, const float v[2]) {
    if (vec) {
        if (j0 < half) store2(p + j0, v);
    } else {
        if (j0 < half) store1(p + j0, v[0]);
        if (j0 + 1 < half) store1(p + j0 + 1, v[1]);
    }
}

__device__ __forceinline__ bool aligned(const void* p, unsigned bytes) { return ((uintptr_t)p & (bytes - 1)) == 0; }

// ---- forward: r = rotary(x) (skipped with a null table); rstd = 1 / sqrtf(mean(r^2) + eps); y = bf16(r rstd).
// The rotation is the CPU's: (a, b) = (x[j], x[j + D/2]) become (a c + b s, -a s + b c).

template <typename In>
__device__ void rotary_qknorm_forward(const In* x, bf16* y, float* rstd, const float* table, int rows, int t,
                                      int heads, int head_dim, int pos0, int max_pos, float eps) {
    size_t unit = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);  // r * heads + h
    if (unit >= (size_t)rows * heads) return;
    int lane = threadIdx.x & 31;
    int half = head_dim / 2;
    size_t p = (size_t)pos0 + (unit / heads) % (size_t)t;
    const float* cos_row = table ? table + p * half : table;
    const float* sin_row = table ? table + (size_t)max_pos * half + p * half : table;
    const In* xh = x + unit * head_dim;
    bf16* yh = y + unit * head_dim;
    bool vec = half % 2 == 0 && aligned(x, 2 * sizeof(In)) && aligned(y, 4) && aligned(table, 8);

    float r1[2][2], r2[2][2];  // [k][e]: the pair j = 64 k + 2 lane + e
    float ss = 0.0f;
    for (int k = 0; k < 2; k++) {
        int j0 = 64 * k + 2 * lane;
        float a[2], b[2];
        load_pair(xh, j0, half, vec, a);
        load_pair(xh + half, j0, half, vec, b);
        if (table) {
            float c[2], s[2];
            load_pair(cos_row, j0, half, vec, c);
            load_pair(sin_row, j0, half, vec, s);
            for (int e = 0; e < 2; e++) {
                r1[k][e] = a[e] * c[e] + b[e] * s[e];
                r2[k][e] = -a[e] * s[e] + b[e] * c[e];
            }
        } else {
            for (int e = 0; e < 2; e++) r1[k][e] = a[e], r2[k][e] = b[e];
        }
        for (int e = 0; e < 2; e++) ss += r1[k][e] * r1[k][e] + r2[k][e] * r2[k][e];  // dead slots are 0
    }
    ss = warp_sum(ss);
    float s = 1.0f / sqrtf(ss / (float)head_dim + eps);
    if (lane == 0) rstd[unit] = s;
    for (int k = 0; k < 2; k++) {
        int j0 = 64 * k + 2 * lane;
        float o1[2] = {r1[k][0] * s, r1[k][1] * s};
        float o2[2] = {r2[k][0] * s, r2[k][1] * s};
        store_pair(yh, j0, half, vec, o1);
        store_pair(yh + half, j0, half, vec, o2);
    }
}

// (const In* x, bf16* y, f32* rstd, const f32* table, i32 rows, i32 t, i32 heads, i32 head_dim, i32 pos0,
// i32 max_pos, f32 eps); In is f32 or bf16 (the name says which: the projection GEMM's output type).
extern "C" __global__ void nc_rotary_qknorm_forward_f32(const float* x, bf16* y, float* rstd, const float* table,
                                                        int rows, int t, int heads, int head_dim, int pos0,
                                                        int max_pos, float eps) {
    rotary_qknorm_forward(x, y, rstd, table, rows, t, heads, head_dim, pos0, max_pos, eps);
}
extern "C" __global__ void nc_rotary_qknorm_forward_bf16(const bf16* x, bf16* y, float* rstd, const float* table,
                                                         int rows, int t, int heads, int head_dim, int pos0,
                                                         int max_pos, float eps) {
    rotary_qknorm_forward(x, y, rstd, table, rows, t, heads, head_dim, pos0, max_pos, eps);
}

// ---- backward: from dy (the gradient of the normalized y), the saved bf16 y and f32 rstd:
// g = rstd (dy - y mean(dy y)) is the gradient of r (as rmsnorm_backward); then the transpose rotation
// (the rotation by the opposite angle, the CPU's rotary_backward): (g1, g2) become (g1 c - g2 s, g1 s + g2 c),
// computed as the CPU does, (g1 c + g2 (-s), -g1 (-s) + g2 c). dx (the gradient of the projection's output)
// is written, not added.

template <typename Dy, typename Dx>
__device__ void rotary_qknorm_backward(const bf16* y, const float* rstd, const Dy* dy, Dx* dx, const float* table,
                                       int rows, int t, int heads, int head_dim, int pos0, int max_pos) {
    size_t unit = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (unit >= (size_t)rows * heads) return;
    int lane = threadIdx.x & 31;
    int half = head_dim / 2;
    size_t p = (size_t)pos0 + (unit / heads) % (size_t)t;
    const float* cos_row = table ? table + p * half : table;
    const float* sin_row = table ? table + (size_t)max_pos * half + p * half : table;
    size_t off = unit * head_dim;
    bool vec = half % 2 == 0 && aligned(y, 4) && aligned(dy, 2 * sizeof(Dy)) && aligned(dx, 2 * sizeof(Dx)) &&
               aligned(table, 8);

    float y1[2][2], y2[2][2], d1[2][2], d2[2][2];
    float dot = 0.0f;
    for (int k = 0; k < 2; k++) {
        int j0 = 64 * k + 2 * lane;
        load_pair(y + off, j0, half, vec, y1[k]);
        load_pair(y + off + half, j0, half, vec, y2[k]);
        load_pair(dy + off, j0, half, vec, d1[k]);
        load_pair(dy + off + half, j0, half, vec, d2[k]);
        for (int e = 0; e < 2; e++) dot += y1[k][e] * d1[k][e] + y2[k][e] * d2[k][e];
    }
    float mean_dyy = warp_sum(dot) / (float)head_dim;
    float s = rstd[unit];
    for (int k = 0; k < 2; k++) {
        int j0 = 64 * k + 2 * lane;
        float o1[2], o2[2];
        float c[2], sn[2];
        if (table) {
            load_pair(cos_row, j0, half, vec, c);
            load_pair(sin_row, j0, half, vec, sn);
        }
        for (int e = 0; e < 2; e++) {
            float g1 = s * (d1[k][e] - y1[k][e] * mean_dyy);
            float g2 = s * (d2[k][e] - y2[k][e] * mean_dyy);
            if (table) {
                float ns = -sn[e];
                o1[e] = g1 * c[e] + g2 * ns;
                o2[e] = -g1 * ns + g2 * c[e];
            } else {
                o1[e] = g1, o2[e] = g2;
            }
        }
        store_pair(dx + off, j0, half, vec, o1);
        store_pair(dx + off + half, j0, half, vec, o2);
    }
}

// (const bf16* y, const f32* rstd, const Dy* dy, Dx* dx, const f32* table, i32 rows, i32 t, i32 heads,
// i32 head_dim, i32 pos0, i32 max_pos), for the four storages of dy and dx (the name says which).
extern "C" __global__ void nc_rotary_qknorm_backward_dy_f32_dx_f32(const bf16* y, const float* rstd, const float* dy,
                                                                  float* dx, const float* table, int rows, int t,
                                                                  int heads, int head_dim, int pos0, int max_pos) {
    rotary_qknorm_backward(y, rstd, dy, dx, table, rows, t, heads, head_dim, pos0, max_pos);
}
extern "C" __global__ void nc_rotary_qknorm_backward_dy_f32_dx_bf16(const bf16* y, const float* rstd, const float* dy,
                                                                   bf16* dx, const float* table, int rows, int t,
                                                                   int heads, int head_dim, int pos0, int max_pos) {
    rotary_qknorm_backward(y, rstd, dy, dx, table, rows, t, heads, head_dim, pos0, max_pos);
}
extern "C" __global__ void nc_rotary_qknorm_backward_dy_bf16_dx_f32(const bf16* y, const float* rstd, const bf16* dy,
                                                                   float* dx, const float* table, int rows, int t,
                                                                   int heads, int head_dim, int pos0, int max_pos) {
    rotary_qknorm_backward(y, rstd, dy, dx, table, rows, t, heads, head_dim, pos0, max_pos);
}
extern "C" __global__ void nc_rotary_qknorm_backward_dy_bf16_dx_bf16(const bf16* y, const float* rstd, const bf16* dy,
                                                                    bf16* dx, const float* table, int rows, int t,
                                                                    int heads, int head_dim, int pos0, int max_pos) {
    rotary_qknorm_backward(y, rstd, dy, dx, table, rows, t, heads, head_dim, pos0, max_pos);
}
