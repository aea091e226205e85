// Softcap + cross-entropy over a chunk of lm_head logits, forward and backward fused, in place.
//
// Launch: `row_dims(rows, ROW_THREADS)`, one block per row of `vocab` logits (65536 for the presets, a
// 256 KiB row: one block streams it with coalesced strided loops). Two passes over global memory:
//   1. every thread keeps an online (running max, rescaled sum) of exp(z - max) over its columns, with
//      z = cap tanh(logit / cap) computed on the fly from the raw logits; a block max and a block sum
//      merge them (a max pass and a sum pass fused: one read of the row instead of two);
//   2. the row is rewritten: the gradient, or z itself.
// The sum leaves the target class out (`other`), so the loss is ln(1 + other / e_target), accurate when the
// prediction is confident and right (lse - z_target would cancel there), and the target's gradient is
// -other / sum exactly. Mirrors core/src/backend/cpu/loss.rs (which uses cap as the max: the same values up
// to rounding). Row offsets are 64-bit: rows * vocab exceeds 2^31.

#include <math.h>
#include <stddef.h>
#include "block_reduce.cuh"

__device__ __forceinline__ float softcap(float logit, float cap) {
    return cap * tanhf(logit / cap);
}

// For row r: z = cap tanh(logits / cap); losses[r] = logsumexp(z) - z[target], or 0 when target == -1.
// The row of logits becomes grad_scale (softmax(z) - onehot(target)) (1 - (z/cap)^2) when want_grad != 0
// (all zeros for an ignored target), else z. One block per row; every read of a logit precedes the
// barrier-separated pass that overwrites it (the target logit is read by all threads before pass 1's
// reductions), so the in-place rewrite never reads a value another thread already replaced.
extern "C" __global__ void nc_softcap_cross_entropy_f32(float* logits, const int* targets, float* losses, int rows,
                                                        int vocab, float cap, float grad_scale, int want_grad) {
    int row = blockIdx.x;
    if (row >= rows) return;
    float* x = logits + (size_t)row * vocab;
    int target = targets[row];

    if (target < 0) {
        // Ignored position: no loss, no gradient. Without a gradient the row still becomes z.
        if (threadIdx.x == 0) losses[row] = 0.0f;
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) x[j] = want_grad ? 0.0f : softcap(x[j], cap);
        return;
    }

    float z_target = softcap(x[target], cap);

    // Pass 1: per-thread running max m and sum of exp(z - m) over the non-target columns. A new max rescales
    // the sum (exp(-inf) = 0 covers the first element).
    float m = -INFINITY;
    float other = 0.0f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        float z = softcap(x[j], cap);
        if (z > m) {
            other *= expf(m - z);
            m = z;
        }
        if (j != target) other += expf(z - m);
    }
    // Merge: the row max (which includes the target), then every thread's sum brought to it. A thread with
    // no columns (vocab < blockDim) has m = -inf and other = 0, and contributes 0 * 0.
    float row_max = block_max(m);
    other = block_sum(m == -INFINITY ? 0.0f : other * expf(m - row_max));
    float e_target = expf(z_target - row_max);
    float sum = other + e_target;

    if (threadIdx.x == 0) {
        // ln(sum / e_target) = ln(1 + other / e_target); if e_target underflowed (only with a cap far above
        // the presets' 15) fall back to ln(sum) - (z_target - max).
        float shifted = z_target - row_max;
        losses[row] = shifted > -80.0f ? log1pf(other / e_target) : logf(sum) - shifted;
    }

    // Pass 2: rewrite the row. Each thread reads its own columns before writing them.
    if (want_grad) {
        float inv = 1.0f / sum;
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
            float z = softcap(x[j], cap);
            // p_target - 1 = -other / sum exactly, with no cancellation near p = 1.
            float dz = j == target ? -other * inv : expf(z - row_max) * inv;
            float c = z / cap;
            x[j] = grad_scale * dz * (1.0f - c * c);
        }
    } else {
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) x[j] = softcap(x[j], cap);
    }
}
