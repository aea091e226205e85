// Elementwise kernels over flat f32 arrays: fill, residual add, relu^2 forward/backward, softcap.
//
// Every kernel here is launched with `elementwise_dims(n)` (256 threads per block, at most 2^20 blocks) and
// walks the array with a grid-stride loop, so any n (up to 2^64) is covered whatever the grid size. Indices
// are 64-bit: activations of the big presets exceed 2^31 elements. The math mirrors
// core/src/backend/cpu/elementwise.rs and loss.rs (softcap) operation for operation.

#include <stddef.h>

// The first index of this thread and the grid-wide stride, both 64-bit (blockIdx.x * blockDim.x alone
// would be computed in 32 bits).
__device__ __forceinline__ size_t grid_start() {
    return (size_t)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ size_t grid_stride() {
    return (size_t)gridDim.x * blockDim.x;
}

// x[i] = value for i < n. Grid-stride, one store per element (zeroing grads, initialising buffers).
extern "C" __global__ void nc_fill_f32(float* x, unsigned long long n, float value) {
    for (size_t i = grid_start(); i < n; i += grid_stride()) {
        x[i] = value;
    }
}

// x[i] += y[i] for i < n (the residual add). Grid-stride; x and y must not overlap partially.
extern "C" __global__ void nc_add_inplace_f32(float* x, const float* y, unsigned long long n) {
    for (size_t i = grid_start(); i < n; i += grid_stride()) {
        x[i] += y[i];
    }
}

// h[i] = relu(u[i])^2 (the MLP activation). Grid-stride; the square of the clamped value, as the CPU does.
extern "C" __global__ void nc_relu2_forward_f32(const float* u, float* h, unsigned long long n) {
    for (size_t i = grid_start(); i < n; i += grid_stride()) {
        float r = fmaxf(u[i], 0.0f);
        h[i] = r * r;
    }
}

// dh[i] *= 2 relu(u[i]), in place: the incoming grad of h becomes the grad of u. Grid-stride; the factor is
// formed first (2 * relu(u)) and then multiplied in, the CPU's order of rounding.
extern "C" __global__ void nc_relu2_backward_f32(const float* u, float* dh, unsigned long long n) {
    for (size_t i = grid_start(); i < n; i += grid_stride()) {
        dh[i] = dh[i] * (2.0f * fmaxf(u[i], 0.0f));
    }
}

// z[i] = cap tanh(z[i] / cap), in place (generation wants the capped logits). Grid-stride; precise tanhf
// (no fast-math), a true division by cap as the CPU does.
extern "C" __global__ void nc_softcap_f32(float* z, unsigned long long n, float cap) {
    for (size_t i = grid_start(); i < n; i += grid_stride()) {
        z[i] = cap * tanhf(z[i] / cap);
    }
}
