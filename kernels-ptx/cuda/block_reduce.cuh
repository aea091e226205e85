// Warp and block reductions shared by the kernels (rmsnorm, rmsnorm_bf16, rotary_qknorm, cross_entropy,
// attention, optim, newton_schulz): one copy, so the reductions the CPU twin mirrors are written once.
//
// Included by each .cu that uses it, inside that file (the PTX build compiles each .cu alone, the emulator
// includes several .cu files in one translation unit, each in a namespace of its own). So there is no include
// guard on purpose: every including file needs its own copy in its own namespace. A source stamp covers this
// header too (build_ptx.sh: the FNV-1a 64 of the .cu followed by its quoted includes), so a change here makes
// every including module's PTX stale until it is rebuilt.

#include <math.h>

// The two operations the reductions combine with.
struct ReduceAdd {
    template <class T>
    __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct ReduceMax {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// `Op` over the 32 lanes of a warp by butterfly shuffles, the result in every lane.
template <class Op, class T>
__device__ __forceinline__ T warp_reduce(T v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = Op()(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) { return warp_reduce<ReduceAdd>(v); }
__device__ __forceinline__ double warp_sum(double v) { return warp_reduce<ReduceAdd>(v); }
__device__ __forceinline__ float warp_max(float v) { return warp_reduce<ReduceMax>(v); }

// `Op` of v over the block, returned to every thread (blockDim.x a multiple of 32, up to 1024): each warp's
// result in `partial` (the caller's 32 floats of shared memory), then every warp reduces those (`identity` past
// the last warp). The trailing barrier lets the caller reduce again at once without racing on `partial`.
template <class Op>
__device__ __forceinline__ float block_reduce(float v, float identity, float* partial) {
    int lane = threadIdx.x & 31;
    int n_warps = (blockDim.x + 31) >> 5;
    v = warp_reduce<Op>(v);
    if (lane == 0) partial[threadIdx.x >> 5] = v;
    __syncthreads();
    v = warp_reduce<Op>(lane < n_warps ? partial[lane] : identity);
    __syncthreads();
    return v;
}

// Sum and max of v over the block, returned to every thread; each has its own shared memory (the race
// checker's reports name it: block_sum::partial, block_max::partial).
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    return block_reduce<ReduceAdd>(v, 0.0f, partial);
}
__device__ float block_max(float v) {
    __shared__ float partial[32];
    return block_reduce<ReduceMax>(v, -INFINITY, partial);
}

// Sum of v over the block in f64, written to *out by thread 0, for a kernel that reduces once at its end: one
// barrier and no trailing one. Warp sums in shared memory, then the first warp shuffles those: the order of
// additions depends only on blockDim.x, so the result is deterministic.
__device__ __forceinline__ void block_sum_f64_to(double v, double* out) {
    __shared__ double warp_sums[32];
    int lane = threadIdx.x & 31;
    int warp = threadIdx.x >> 5;
    int n_warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = warp_sum(lane < n_warps ? warp_sums[lane] : 0.0);
        if (lane == 0) *out = v;
    }
}
