// The part of NVIDIA's cuBLAS / cuBLASLt 13 C API that nc resolves (core/src/backend/cuda/libs.rs), declared
// with the numeric values of the CUDA 13 headers (the same values cudarc's `cuda-13000` bindings carry), so
// the simulated libraries (cublas.cpp, cublaslt.cpp) and their tests (tests/) agree on one set of facts.
// Nothing here is NVIDIA's header text: only the names, the enum values and the struct layouts the ABI fixes.
#pragma once
#include <cstddef>
#include <cstdint>

#define NCSIM_BLAS_EXPORT extern "C" __attribute__((visibility("default")))

// cublasStatus_t (cublas_api.h), shared by cuBLASLt.
enum : int {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_ALLOC_FAILED = 3,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_ARCH_MISMATCH = 8,
    CUBLAS_STATUS_MAPPING_ERROR = 11,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_INTERNAL_ERROR = 14,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
};

// cublasOperation_t.
enum : int { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, CUBLAS_OP_C = 2, CUBLAS_OP_CONJG = 3 };

// cublasMath_t (a mode, optionally or'ed with the DISALLOW_REDUCED_PRECISION_REDUCTION flag).
enum : int {
    CUBLAS_DEFAULT_MATH = 0,
    CUBLAS_TENSOR_OP_MATH = 1,
    CUBLAS_PEDANTIC_MATH = 2,
    CUBLAS_TF32_TENSOR_OP_MATH = 3,
    CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION = 16,
};

// cudaDataType_t (the two nc stores GEMM operands in, and the one it does not).
enum : int { CUDA_R_32F = 0, CUDA_R_16F = 2, CUDA_R_16BF = 14 };

// cublasComputeType_t.
enum : int {
    CUBLAS_COMPUTE_16F = 64,
    CUBLAS_COMPUTE_32F = 68,
    CUBLAS_COMPUTE_32F_PEDANTIC = 69,
    CUBLAS_COMPUTE_32F_FAST_16F = 74,
    CUBLAS_COMPUTE_32F_FAST_16BF = 75,
    CUBLAS_COMPUTE_32F_FAST_TF32 = 77,
};

// cublasLtMatmulDescAttributes_t (the ones the simulated library implements).
enum : int {
    CUBLASLT_MATMUL_DESC_COMPUTE_TYPE = 0,
    CUBLASLT_MATMUL_DESC_SCALE_TYPE = 1,
    CUBLASLT_MATMUL_DESC_POINTER_MODE = 2,
    CUBLASLT_MATMUL_DESC_TRANSA = 3,
    CUBLASLT_MATMUL_DESC_TRANSB = 4,
    CUBLASLT_MATMUL_DESC_TRANSC = 5,
    CUBLASLT_MATMUL_DESC_FILL_MODE = 6,
    CUBLASLT_MATMUL_DESC_EPILOGUE = 7,
};

// cublasLtPointerMode_t, cublasLtEpilogue_t (default only), cublasFillMode_t (full only), cublasLtOrder_t.
enum : int { CUBLASLT_POINTER_MODE_HOST = 0, CUBLASLT_POINTER_MODE_DEVICE = 1 };
enum : int { CUBLASLT_EPILOGUE_DEFAULT = 1 };
enum : int { CUBLAS_FILL_MODE_FULL = 2 };
enum : int { CUBLASLT_ORDER_COL = 0, CUBLASLT_ORDER_ROW = 1 };

// cublasLtMatrixLayoutAttribute_t.
enum : int {
    CUBLASLT_MATRIX_LAYOUT_TYPE = 0,
    CUBLASLT_MATRIX_LAYOUT_ORDER = 1,
    CUBLASLT_MATRIX_LAYOUT_ROWS = 2,
    CUBLASLT_MATRIX_LAYOUT_COLS = 3,
    CUBLASLT_MATRIX_LAYOUT_LD = 4,
    CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT = 5,
    CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET = 6,
    CUBLASLT_MATRIX_LAYOUT_PLANE_OFFSET = 7,
};

// cublasLtMatmulPreferenceAttributes_t.
enum : int {
    CUBLASLT_MATMUL_PREF_SEARCH_MODE = 0,
    CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES = 1,
    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES = 5,
    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES = 6,
    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES = 7,
    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES = 8,
};

// Opaque handles: pointers to the libraries' own structs.
typedef struct NcsimCublasHandle* cublasHandle_t;
typedef struct NcsimLtHandle* cublasLtHandle_t;
typedef struct NcsimLtDesc* cublasLtMatmulDesc_t;
typedef struct NcsimLtLayout* cublasLtMatrixLayout_t;
typedef struct NcsimLtPref* cublasLtMatmulPreference_t;
typedef void* cudaStream_t;

// cublasLtMatmulAlgo_t and cublasLtMatmulHeuristicResult_t: layouts fixed by the ABI.
struct cublasLtMatmulAlgo_t {
    uint64_t data[8];
};
struct cublasLtMatmulHeuristicResult_t {
    cublasLtMatmulAlgo_t algo;
    size_t workspaceSize;
    int state;
    float wavesCount;
    int reserved[4];
};

// cuBLAS (libcublas.so.13): what blas.rs calls.
NCSIM_BLAS_EXPORT int cublasCreate_v2(cublasHandle_t* handle);
NCSIM_BLAS_EXPORT int cublasDestroy_v2(cublasHandle_t handle);
NCSIM_BLAS_EXPORT int cublasGetVersion_v2(cublasHandle_t handle, int* version);
NCSIM_BLAS_EXPORT int cublasSetStream_v2(cublasHandle_t handle, cudaStream_t stream);
NCSIM_BLAS_EXPORT int cublasSetMathMode(cublasHandle_t handle, int mode);
NCSIM_BLAS_EXPORT int cublasSgemm_v2(cublasHandle_t handle, int transa, int transb, int m, int n, int k,
                                     const float* alpha, const float* A, int lda, const float* B, int ldb,
                                     const float* beta, float* C, int ldc);

// cuBLASLt (libcublasLt.so.13): what blas_lt.rs calls.
NCSIM_BLAS_EXPORT size_t cublasLtGetVersion(void);
NCSIM_BLAS_EXPORT int cublasLtCreate(cublasLtHandle_t* handle);
NCSIM_BLAS_EXPORT int cublasLtDestroy(cublasLtHandle_t handle);
NCSIM_BLAS_EXPORT int cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* desc, int compute_type, int scale_type);
NCSIM_BLAS_EXPORT int cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t desc);
NCSIM_BLAS_EXPORT int cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t desc, int attr, const void* buf,
                                                     size_t size);
NCSIM_BLAS_EXPORT int cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* layout, int type, uint64_t rows,
                                                 uint64_t cols, int64_t ld);
NCSIM_BLAS_EXPORT int cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t layout);
NCSIM_BLAS_EXPORT int cublasLtMatrixLayoutSetAttribute(cublasLtMatrixLayout_t layout, int attr, const void* buf,
                                                       size_t size);
NCSIM_BLAS_EXPORT int cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* pref);
NCSIM_BLAS_EXPORT int cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t pref);
NCSIM_BLAS_EXPORT int cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t pref, int attr,
                                                           const void* buf, size_t size);
NCSIM_BLAS_EXPORT int cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc,
                                                     cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                                                     cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t d,
                                                     cublasLtMatmulPreference_t pref, int requested,
                                                     cublasLtMatmulHeuristicResult_t* results, int* returned);
NCSIM_BLAS_EXPORT int cublasLtMatmul(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc, const void* alpha,
                                     const void* A, cublasLtMatrixLayout_t a_layout, const void* B,
                                     cublasLtMatrixLayout_t b_layout, const void* beta, const void* C,
                                     cublasLtMatrixLayout_t c_layout, void* D, cublasLtMatrixLayout_t d_layout,
                                     const cublasLtMatmulAlgo_t* algo, void* workspace, size_t workspace_bytes,
                                     cudaStream_t stream);
