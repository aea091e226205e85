// libcublas.so.13 of the simulated GPU: the cuBLAS entry points nc resolves (core/src/backend/cuda/libs.rs,
// used by blas.rs for the strict-f32 GEMMs), as NVIDIA's documentation specifies them, running on the
// simulated device of sim/driver/ through sim/include/ncsim.h.
//
// Build (scripts/sim.sh): g++ -std=c++20 -O2 -shared -fPIC -Isim/include sim/blas/cublas.cpp
//                         -o target/sim/libcublas.so.13
// (no other flags or files: gemm.h, device.h and blas_api.h beside this file are included by relative path).
//
// Behaviour worth knowing (docs/simulated-gpu-blas.md says more):
// - Version 13.0.2 (130002), so nc's major-version check passes.
// - Pointer mode is host (the default; nc never sets another): alpha and beta are read during the call.
// - Math modes: CUBLAS_DEFAULT_MATH and CUBLAS_PEDANTIC_MATH compute in f32; CUBLAS_TF32_TENSOR_OP_MATH rounds
//   the inputs to TF32 first (then f32 accumulation, as gemm.h documents); the deprecated
//   CUBLAS_TENSOR_OP_MATH is refused (not implemented). The DISALLOW_REDUCED_PRECISION_REDUCTION flag is
//   accepted and changes nothing (no reduced-precision reduction is ever used).
// - Every GEMM is queued on the handle's stream (cublasSetStream_v2; the legacy default stream otherwise) and
//   runs asynchronously; cublasDestroy_v2 does not synchronize (nc does not rely on it: mod.rs says so).
#include <mutex>

#include "device.h"

namespace {

struct CublasHandle {
    static constexpr uint64_t MAGIC = 0x6e6373696d626c73;  // "ncsimbls"
    uint64_t magic = MAGIC;
    cudaStream_t stream = nullptr;
    int math_mode = CUBLAS_DEFAULT_MATH;
    int device = -1;  // the device whose context was current at create (destroy_in_wrong_context)
};

constexpr int VERSION = 130002;

constexpr const char* LIBRARY = "cuBLAS";
Registry<CublasHandle> handles;

bool ranges_overlap(const Access& x, const Access& y) {
    auto x0 = reinterpret_cast<uintptr_t>(x.ptr), y0 = reinterpret_cast<uintptr_t>(y.ptr);
    return x0 < y0 + y.bytes && y0 < x0 + x.bytes;
}

bool valid_op(int op) {
    return op == CUBLAS_OP_N || op == CUBLAS_OP_T || op == CUBLAS_OP_C;
}

}  // namespace

NCSIM_BLAS_EXPORT int cublasCreate_v2(cublasHandle_t* handle) {
    return create_handle("cublasCreate_v2", handles, handle);
}

NCSIM_BLAS_EXPORT int cublasDestroy_v2(cublasHandle_t handle) {
    return destroy_handle("cublasDestroy_v2", handles, handle, LIBRARY);
}

NCSIM_BLAS_EXPORT int cublasGetVersion_v2(cublasHandle_t handle, int* version) {
    (void)handle;  // the version does not depend on the handle
    if (!version) return refuse(CUBLAS_STATUS_INVALID_VALUE, "cublasGetVersion_v2", "version is NULL");
    *version = VERSION;
    return CUBLAS_STATUS_SUCCESS;
}

NCSIM_BLAS_EXPORT int cublasSetStream_v2(cublasHandle_t handle, cudaStream_t stream) {
    int status = 0;
    CublasHandle* h = live_handle(handles, handle, LIBRARY, "cublasSetStream_v2", &status);
    if (!h) return status;
    h->stream = stream;
    return CUBLAS_STATUS_SUCCESS;
}

NCSIM_BLAS_EXPORT int cublasSetMathMode(cublasHandle_t handle, int mode) {
    const char* call = "cublasSetMathMode";
    int status = 0;
    CublasHandle* h = live_handle(handles, handle, LIBRARY, call, &status);
    if (!h) return status;
    int base = mode & ~CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION;
    if (base == CUBLAS_TENSOR_OP_MATH)
        return refuse(CUBLAS_STATUS_NOT_SUPPORTED, call,
                      "mode = CUBLAS_TENSOR_OP_MATH (deprecated) is not implemented by the simulated cuBLAS");
    if (base != CUBLAS_DEFAULT_MATH && base != CUBLAS_PEDANTIC_MATH && base != CUBLAS_TF32_TENSOR_OP_MATH)
        return refuse(CUBLAS_STATUS_INVALID_VALUE, call, "mode = %d is not a cublasMath_t", mode);
    h->math_mode = base;
    return CUBLAS_STATUS_SUCCESS;
}

// C = alpha op(A) op(B) + beta C, column-major, f32 (cuBLAS's documented argument checks first).
NCSIM_BLAS_EXPORT int cublasSgemm_v2(cublasHandle_t handle, int transa, int transb, int m, int n, int k,
                                     const float* alpha, const float* A, int lda, const float* B, int ldb,
                                     const float* beta, float* C, int ldc) {
    const char* call = "cublasSgemm_v2";
    int status = 0;
    CublasHandle* h = live_handle(handles, handle, LIBRARY, call, &status);
    if (!h) return status;
    if (!valid_op(transa)) return refuse(CUBLAS_STATUS_INVALID_VALUE, call, "transa = %d is not an operation", transa);
    if (!valid_op(transb)) return refuse(CUBLAS_STATUS_INVALID_VALUE, call, "transb = %d is not an operation", transb);
    if (m < 0 || n < 0 || k < 0)
        return refuse(CUBLAS_STATUS_INVALID_VALUE, call, "m = %d, n = %d, k = %d: none may be negative", m, n, k);
    // For real f32 data, op C (conjugate transpose) is the transpose.
    bool ta = transa != CUBLAS_OP_N, tb = transb != CUBLAS_OP_N;
    int a_rows = ta ? k : m, b_rows = tb ? n : k;
    if (lda < std::max(1, a_rows))
        return refuse(CUBLAS_STATUS_INVALID_VALUE, call, "lda = %d < max(1, rows of A = %d)", lda, a_rows);
    if (ldb < std::max(1, b_rows))
        return refuse(CUBLAS_STATUS_INVALID_VALUE, call, "ldb = %d < max(1, rows of B = %d)", ldb, b_rows);
    if (ldc < std::max(1, m))
        return refuse(CUBLAS_STATUS_INVALID_VALUE, call, "ldc = %d < max(1, m = %d)", ldc, m);
    if (!alpha || !beta) return refuse(CUBLAS_STATUS_INVALID_VALUE, call, "alpha or beta is NULL");
    const Ncsim* sim = ncsim(call);
    if (!sim) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;

    Gemm g;
    g.m = m, g.n = n, g.k = k, g.batch = 1;
    g.alpha = *alpha, g.beta = *beta;  // host pointer mode: read now, the caller may reuse them at once
    g.a = Operand{A, Elem::F32, lda, 0, ta};
    g.b = Operand{B, Elem::F32, ldb, 0, tb};
    g.c = C, g.c_type = Elem::F32, g.ldc = ldc;
    g.d = C, g.d_type = Elem::F32, g.ldd = ldc;
    g.tf32 = h->math_mode == CUBLAS_TF32_TENSOR_OP_MATH;

    Access accesses[4];
    int count = 0;
    bool reads_ab = g.alpha != 0.0f && k > 0;
    if (reads_ab) {
        accesses[count++] = {A, span_bytes(a_rows, ta ? m : k, lda, 1, 0, Elem::F32), 0, "cublasSgemm_v2 A"};
        accesses[count++] = {B, span_bytes(b_rows, tb ? k : n, ldb, 1, 0, Elem::F32), 0, "cublasSgemm_v2 B"};
    }
    size_t c_bytes = span_bytes(m, n, ldc, 1, 0, Elem::F32);
    if (g.beta != 0.0f) accesses[count++] = {C, c_bytes, 0, "cublasSgemm_v2 C"};
    accesses[count++] = {C, c_bytes, 1, "cublasSgemm_v2 C"};
    for (int i = 0; i < count; i++) {
        if (!accesses[i].ptr) return refuse(CUBLAS_STATUS_INVALID_VALUE, call, "%s is NULL", accesses[i].what);
        if (reinterpret_cast<uintptr_t>(accesses[i].ptr) % 4 != 0)
            return refuse(CUBLAS_STATUS_EXECUTION_FAILED, call,
                          "%s = %p is not 4-byte aligned (a GPU faults: misaligned address)", accesses[i].what,
                          accesses[i].ptr);
    }
    for (int i = 0; reads_ab && i < 2; i++) {
        if (ranges_overlap(accesses[i], accesses[count - 1]))
            return refuse(CUBLAS_STATUS_INVALID_VALUE, call,
                          "C overlaps %s: the result would depend on the GPU's tiling (undefined)", accesses[i].what);
    }
    return submit(*sim, call, g, accesses, count, h->stream);
}
