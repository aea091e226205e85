// Token embedding lookup and its backward: the f32 lookup, the bf16 lookups (from the bf16 working copy of
// wte), the scatter-add backward with atomics (order not fixed), and the deterministic backward that sums each
// vocabulary row's gradient in a fixed order from an inverse index (no float atomics).
//
// Launch: `row_dims(n, ROW_THREADS)`, one block per token row (forward, atomic backward) or one block per
// distinct id (sorted backward); the threads of a block stride over the d columns of that row, so
// consecutive threads touch consecutive addresses (coalesced). Row offsets are 64-bit: ids * d reaches V * d
// (65536 * 3328 > 2^31 for the largest presets).

#include <cuda_bf16.h>
#include <stddef.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;
#include "bf16_io.cuh"

// out[i, :] = wte[ids[i], :] with wte (V, d). One block per row i; ids are assumed valid (the model checks
// them on the host). A plain copy: the row of wte is read once, coalesced.
extern "C" __global__ void nc_embedding_forward_f32(const int* ids, const float* wte, float* out, int n, int d) {
    int i = blockIdx.x;
    if (i >= n) return;
    const float* src = wte + (size_t)ids[i] * d;
    float* dst = out + (size_t)i * d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        dst[c] = src[c];
    }
}

// dwte[ids[i], :] += dout[i, :]. One block per row i. Repeated ids add into the same row from different
// blocks, hence atomicAdd; the order of those additions is not fixed, so the result is deterministic only
// up to f32 rounding (the contract says so). Distinct ids never collide. Superseded by
// nc_embedding_backward_sorted_f32 below (fixed order, no atomics); kept until the CUDA backend switches.
extern "C" __global__ void nc_embedding_backward_f32(const int* ids, const float* dout, float* dwte, int n, int d) {
    int i = blockIdx.x;
    if (i >= n) return;
    const float* src = dout + (size_t)i * d;
    float* dst = dwte + (size_t)ids[i] * d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        atomicAdd(dst + c, src[c]);
    }
}

// ---- bf16 lookups: out[i, :] = wte[ids[i], :] from the bf16 working copy of wte; the f32 output is exact,
// the bf16 output a plain copy. One block per row; 16-byte accesses (8 bf16) when d % 8 == 0 and the pointers
// are 16-byte aligned, scalar ones otherwise.

// 8 bf16 of a row into the output, 16-byte accesses: widened exactly into f32, or copied into bf16.
__device__ __forceinline__ void lookup8(const bf16* src, float* dst) {
    uint4 u = *reinterpret_cast<const uint4*>(src);
    unsigned w[4] = {u.x, u.y, u.z, u.w};
    float v[8];
    for (int k = 0; k < 4; k++) {
        v[2 * k] = __uint_as_float(w[k] << 16);  // a bf16 is the high half of the f32 with its bits
        v[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
    reinterpret_cast<float4*>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void lookup8(const bf16* src, bf16* dst) {
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
}
// One bf16 into the output (the scalar path).
__device__ __forceinline__ void lookup1(const bf16* src, float* dst) { *dst = __bfloat162float(*src); }
__device__ __forceinline__ void lookup1(const bf16* src, bf16* dst) { *dst = *src; }

template <typename Out>
__device__ void embedding_forward_bf16(const int* ids, const bf16* wte, Out* out, int n, int d) {
    int i = blockIdx.x;
    if (i >= n) return;
    const bf16* src = wte + (size_t)ids[i] * d;
    Out* dst = out + (size_t)i * d;
    if (d % 8 == 0 && aligned16(wte) && aligned16(out)) {
        for (int c = threadIdx.x * 8; c < d; c += blockDim.x * 8) lookup8(src + c, dst + c);
    } else {
        for (int c = threadIdx.x; c < d; c += blockDim.x) lookup1(src + c, dst + c);
    }
}

// (const i32* ids, const bf16* wte, f32* out, i32 n, i32 d)
extern "C" __global__ void nc_embedding_forward_bf16_f32(const int* ids, const bf16* wte, float* out, int n, int d) {
    embedding_forward_bf16(ids, wte, out, n, d);
}

// (const i32* ids, const bf16* wte, bf16* out, i32 n, i32 d)
extern "C" __global__ void nc_embedding_forward_bf16_bf16(const int* ids, const bf16* wte, bf16* out, int n, int d) {
    embedding_forward_bf16(ids, wte, out, n, d);
}

// ---- deterministic backward. The inverse index of the step's ids (built once per batch, on the host where
// the ids are formed: nc_kernels::EmbeddingIndex, a stable counting sort) lists, for each distinct id, the
// positions holding it in increasing order:
//   seg_id[s]                         the s-th distinct id (s < segments),
//   order[seg_start[s] .. seg_start[s + 1])   its positions, ascending (seg_start has segments + 1 entries).
// Blocks (s, *) own row seg_id[s] of dwte and are its only writers; each thread owns columns (block y takes
// columns y blockDim.x + threadIdx.x, striding by gridDim.y blockDim.x) and adds the positions' gradients into
// a register in the listed order: dwte[id, c] = ((dwte[id, c] + dout[p0, c]) + dout[p1, c]) + ...
// That is the CPU backend's order (it walks the positions in order, adding into the row), so the result is
// the same bits on every run, whatever the launch shape, and on both backends. Launch:
// `embedding_sorted_dims(segments, d)`: grid (segments, ceil(d / 256)), 256 threads, so even the most frequent
// id (a few percent of a batch) is spread over d / 256 blocks of one column per thread.

template <typename Dout>
__device__ __forceinline__ float grad_at(const Dout* dout, size_t i);
template <>
__device__ __forceinline__ float grad_at<float>(const float* dout, size_t i) { return dout[i]; }
template <>
__device__ __forceinline__ float grad_at<bf16>(const bf16* dout, size_t i) { return __bfloat162float(dout[i]); }

template <typename Dout>
__device__ void embedding_backward_sorted(const int* order, const int* seg_start, const int* seg_id, int segments,
                                          const Dout* dout, float* dwte, int d) {
    int s = blockIdx.x;
    if (s >= segments) return;
    float* dst = dwte + (size_t)seg_id[s] * d;
    int begin = seg_start[s], end = seg_start[s + 1];
    for (int c = blockIdx.y * blockDim.x + threadIdx.x; c < d; c += gridDim.y * blockDim.x) {
        float acc = dst[c];
        for (int k = begin; k < end; k++) acc += grad_at(dout, (size_t)order[k] * d + c);
        dst[c] = acc;
    }
}

// (const i32* order, const i32* seg_start, const i32* seg_id, i32 segments, const f32* dout, f32* dwte, i32 d)
extern "C" __global__ void nc_embedding_backward_sorted_f32(const int* order, const int* seg_start, const int* seg_id,
                                                            int segments, const float* dout, float* dwte, int d) {
    embedding_backward_sorted(order, seg_start, seg_id, segments, dout, dwte, d);
}
// (const i32* order, const i32* seg_start, const i32* seg_id, i32 segments, const bf16* dout, f32* dwte, i32 d)
extern "C" __global__ void nc_embedding_backward_sorted_bf16(const int* order, const int* seg_start, const int* seg_id,
                                                             int segments, const bf16* dout, float* dwte, int d) {
    embedding_backward_sorted(order, seg_start, seg_id, segments, dout, dwte, d);
}
