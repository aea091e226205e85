// Newton-Schulz's normalization X = G / (||G||_F + eps) on the device, so the device optimizer
// (core/src/optim/device.rs) never reads a norm back to the host inside a step. Two kernels of the engine's
// own (the model's kernels live in kernels-ptx/); compiled to ns_norm.ptx by build.sh next to this file
// with the pinned nvcc 13.0, and checked in.
//
// Arithmetic, chosen to equal the host path it replaces bit for bit: the per-block f64 partials of
// nc_sum_squares_f64 (kernels-ptx/cuda/optim.cu) are added in block order starting from 0, as
// CudaBackend::sum_squares adds them on the host; the square root is taken in f64 and rounded to f32; the
// add and the divide are IEEE f32; the scale is one rounded multiply, as nc_axpby_f32 with b = 0.

// (const f64* partials, i32 blocks, f32 eps, f32* inv): inv[0] = 1 / (f32(sqrt(sum partials)) + eps).
// Launch one block of one thread (the sum of at most 1024 partials is nothing next to a GEMM).
extern "C" __global__ void nc_inverse_norm_f32(const double* partials, int blocks, float eps, float* inv) {
    if (blockIdx.x != 0 || threadIdx.x != 0) {
        return;
    }
    double total = 0.0;
    for (int i = 0; i < blocks; ++i) {
        total = __dadd_rn(total, partials[i]);
    }
    float norm = __double2float_rn(__dsqrt_rn(total));
    inv[0] = __fdiv_rn(1.0f, __fadd_rn(norm, eps));
}

// (const f32* x, const f32* s, f32* y, u64 n): y[i] = s[0] * x[i]. Grid-stride; launch as the elementwise
// kernels (256 threads, up to 2^20 blocks).
extern "C" __global__ void nc_scale_by_scalar_f32(const float* x, const float* s, float* y, unsigned long long n) {
    const float a = s[0];
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        y[i] = __fmul_rn(a, x[i]);
    }
}
