// Token embedding lookup and its scatter-add backward.
//
// Launch: `row_dims(n, ROW_THREADS)`, one block per token row; the threads of a block stride over the d
// columns of that row, so consecutive threads touch consecutive addresses (coalesced). Row offsets are
// 64-bit: ids * d reaches V * d (65536 * 3328 > 2^31 for the largest presets).

#include <stddef.h>

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
// up to f32 rounding (the contract says so). Distinct ids never collide.
extern "C" __global__ void nc_embedding_backward_f32(const int* ids, const float* dout, float* dwte, int n, int d) {
    int i = blockIdx.x;
    if (i >= n) return;
    const float* src = dout + (size_t)i * d;
    float* dst = dwte + (size_t)ids[i] * d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        atomicAdd(dst + c, src[c]);
    }
}
