// libcublasLt.so.13 of the simulated GPU: the cuBLASLt entry points nc resolves (core/src/backend/cuda/libs.rs,
// used by blas_lt.rs for the bf16 GEMMs and optim_bf16.rs for the batched Newton-Schulz), as NVIDIA's
// documentation specifies them, running on the simulated device of sim/driver/ through sim/include/ncsim.h.
//
// Build (scripts/sim.sh): g++ -std=c++20 -O2 -shared -fPIC -Isim/include sim/blas/cublaslt.cpp
//                         -o target/sim/libcublasLt.so.13
// (no other flags or files: gemm.h, device.h and blas_api.h beside this file are included by relative path).
//
// What is implemented (anything else is refused with a stderr line, never ignored):
// - compute types CUBLAS_COMPUTE_32F, _32F_PEDANTIC and _32F_FAST_TF32 (f32 inputs rounded to TF32), scale
//   type CUDA_R_32F; A/B/C/D types bf16/bf16/bf16/bf16, bf16/bf16/f32/f32, f32/f32/f32/f32;
// - column-major layouts (ORDER_COL), any ld >= rows, strided batches (BATCH_COUNT, STRIDED_BATCH_OFFSET >= 0);
// - TRANSA/TRANSB N or T, the default epilogue, host or device pointer mode;
// - C == D (then their layouts must be equal) or C != D (same type, rows, cols, batch; ldc may differ, but
//   ldc = 0, the documented broadcast, is not implemented);
// - the heuristic: algorithm 1 (it asks for WORKSPACE_WANT bytes of workspace) when the preference's
//   workspace limit allows it, then algorithm 0 (no workspace); each records the minimum pointer alignments
//   the preference promised (256 bytes by default), and cublasLtMatmul refuses pointers less aligned.
// Checks the real library does not make, because on a GPU the result would be undefined: D overlapping A or
// B, C overlapping D other than exactly (in place), batches of D overlapping each other.
#include "device.h"

namespace {

constexpr size_t VERSION = 130002;

// Bytes of workspace algorithm 1 uses (as a split-K kernel would, for its partial sums).
constexpr uint64_t WORKSPACE_WANT = 1 << 20;
constexpr uint64_t ALGO_MAGIC = 0x6e6373696d6c7461;  // "ncsimlta"

struct LtHandle {
    int device = -1;  // the device whose context was current at create (destroy_in_wrong_context); every call
                      // says its stream, so the handle holds nothing else
};

struct LtDesc {
    int compute = CUBLAS_COMPUTE_32F;
    int scale_type = CUDA_R_32F;
    int pointer_mode = CUBLASLT_POINTER_MODE_HOST;
    int transa = CUBLAS_OP_N, transb = CUBLAS_OP_N;
};

struct LtLayout {
    int type = CUDA_R_32F;
    int order = CUBLASLT_ORDER_COL;
    uint64_t rows = 0, cols = 0;
    int64_t ld = 0;
    int32_t batch = 1;
    int64_t stride = 0;
};

struct LtPref {
    uint64_t max_workspace = 0;
    uint32_t align[4] = {256, 256, 256, 256};  // A, B, C, D
};

constexpr const char* LIBRARY = "cuBLASLt";
Registry<LtHandle> handles;
Registry<LtDesc> descs;
Registry<LtLayout> layouts;
Registry<LtPref> prefs;

// Reads an attribute value of exactly the documented size.
template <class T>
int read_attribute(const char* call, int attr, const void* buf, size_t size, T* out) {
    if (!buf) return refuse(CUBLAS_STATUS_INVALID_VALUE, call, "attribute %d: buf is NULL", attr);
    if (size != sizeof(T))
        return refuse(CUBLAS_STATUS_INVALID_VALUE, call, "attribute %d: sizeInBytes = %zu, the attribute has %zu",
                      attr, size, sizeof(T));
    std::memcpy(out, buf, sizeof(T));
    return CUBLAS_STATUS_SUCCESS;
}

bool supported_compute(int compute) {
    return compute == CUBLAS_COMPUTE_32F || compute == CUBLAS_COMPUTE_32F_PEDANTIC ||
           compute == CUBLAS_COMPUTE_32F_FAST_TF32;
}

const char* type_name(int type) {
    switch (type) {
        case CUDA_R_32F: return "CUDA_R_32F";
        case CUDA_R_16BF: return "CUDA_R_16BF";
        case CUDA_R_16F: return "CUDA_R_16F";
        default: return "another cudaDataType";
    }
}

Elem elem_of(int type) {
    return type == CUDA_R_16BF ? Elem::Bf16 : Elem::F32;
}

// The objects a matmul or heuristic query names.
struct MatmulObjects {
    LtDesc* desc = nullptr;
    LtLayout *a = nullptr, *b = nullptr, *c = nullptr, *d = nullptr;
};

// The problem the descriptor and layouts describe, checked as cublasLtMatmul and the heuristic check it.
struct Problem {
    Gemm g;  // sizes, types, ops, lds and strides; pointers and scalars are filled in by cublasLtMatmul
    int64_t a_rows, a_cols, b_rows, b_cols;
};

int check_layout(const char* call, const char* name, const LtLayout& l) {
    if (l.order != CUBLASLT_ORDER_COL)
        return refuse(CUBLAS_STATUS_NOT_SUPPORTED, call, "%s: order %d is not implemented (column-major only)", name,
                      l.order);
    if (l.rows > INT32_MAX || l.cols > INT32_MAX)
        return refuse(CUBLAS_STATUS_NOT_SUPPORTED, call, "%s: %" PRIu64 " x %" PRIu64 " is larger than implemented",
                      name, l.rows, l.cols);
    if (l.ld < std::max<int64_t>(1, int64_t(l.rows)))
        return refuse(CUBLAS_STATUS_INVALID_VALUE, call, "%s: ld = %" PRId64 " < max(1, rows = %" PRIu64 ")", name,
                      l.ld, l.rows);
    if (l.batch < 1) return refuse(CUBLAS_STATUS_INVALID_VALUE, call, "%s: batch count %d < 1", name, l.batch);
    if (l.stride < 0)
        return refuse(CUBLAS_STATUS_NOT_SUPPORTED, call, "%s: negative batch stride %" PRId64 " is not implemented",
                      name, l.stride);
    return CUBLAS_STATUS_SUCCESS;
}

int resolve(const char* call, const MatmulObjects& objects, Problem* out) {
    const LtDesc& desc = *objects.desc;
    const LtLayout &a = *objects.a, &b = *objects.b, &c = *objects.c, &d = *objects.d;
    if (!supported_compute(desc.compute))
        return refuse(CUBLAS_STATUS_NOT_SUPPORTED, call, "compute type %d is not implemented", desc.compute);
    if (desc.scale_type != CUDA_R_32F)
        return refuse(CUBLAS_STATUS_NOT_SUPPORTED, call, "scale type %s with an f32 compute type",
                      type_name(desc.scale_type));
    bool inputs_bf16 = a.type == CUDA_R_16BF && b.type == CUDA_R_16BF;
    bool inputs_f32 = a.type == CUDA_R_32F && b.type == CUDA_R_32F;
    bool types_ok = c.type == d.type && ((inputs_bf16 && (d.type == CUDA_R_16BF || d.type == CUDA_R_32F)) ||
                                         (inputs_f32 && d.type == CUDA_R_32F));
    if (!types_ok)
        return refuse(CUBLAS_STATUS_NOT_SUPPORTED, call, "types A %s, B %s, C %s, D %s: not a supported combination",
                      type_name(a.type), type_name(b.type), type_name(c.type), type_name(d.type));
    const char* names[4] = {"A layout", "B layout", "C layout", "D layout"};
    const LtLayout* all[4] = {&a, &b, &c, &d};
    for (int i = 0; i < 4; i++) {
        if (i == 2 && c.ld == 0 && c.rows > 0)
            return refuse(CUBLAS_STATUS_NOT_SUPPORTED, call, "C layout: ld = 0 (broadcast C) is not implemented");
        if (int status = check_layout(call, names[i], *all[i])) return status;
    }
    bool ta = desc.transa != CUBLAS_OP_N, tb = desc.transb != CUBLAS_OP_N;
    int64_t m = int64_t(d.rows), n = int64_t(d.cols);
    int64_t a_m = int64_t(ta ? a.cols : a.rows), k = int64_t(ta ? a.rows : a.cols);
    int64_t b_k = int64_t(tb ? b.cols : b.rows), b_n = int64_t(tb ? b.rows : b.cols);
    if (a_m != m || b_k != k || b_n != n || c.rows != d.rows || c.cols != d.cols)
        return refuse(CUBLAS_STATUS_INVALID_VALUE, call,
                      "shapes disagree: op(A) is %" PRId64 " x %" PRId64 " (transa %d), op(B) %" PRId64 " x %" PRId64
                      " (transb %d), C %" PRIu64 " x %" PRIu64 ", D %" PRIu64 " x %" PRIu64,
                      a_m, k, desc.transa, b_k, b_n, desc.transb, c.rows, c.cols, d.rows, d.cols);
    if (a.batch != d.batch || b.batch != d.batch || c.batch != d.batch)
        return refuse(CUBLAS_STATUS_INVALID_VALUE, call, "batch counts disagree: A %d, B %d, C %d, D %d", a.batch,
                      b.batch, c.batch, d.batch);
    Gemm& g = out->g;
    g.m = m, g.n = n, g.k = k, g.batch = d.batch;
    g.a = Operand{nullptr, elem_of(a.type), a.ld, a.stride, ta};
    g.b = Operand{nullptr, elem_of(b.type), b.ld, b.stride, tb};
    g.c_type = elem_of(c.type), g.ldc = c.ld, g.stride_c = c.stride;
    g.d_type = elem_of(d.type), g.ldd = d.ld, g.stride_d = d.stride;
    g.tf32 = desc.compute == CUBLAS_COMPUTE_32F_FAST_TF32 && inputs_f32;
    out->a_rows = int64_t(a.rows), out->a_cols = int64_t(a.cols);
    out->b_rows = int64_t(b.rows), out->b_cols = int64_t(b.cols);
    // Batches of D must not overlap (each would race with the next on a GPU).
    if (d.batch > 1 && m > 0 && n > 0 && uint64_t(d.stride) < (uint64_t(n) - 1) * uint64_t(d.ld) + uint64_t(m))
        return refuse(CUBLAS_STATUS_INVALID_VALUE, call,
                      "D's batch stride %" PRId64 " is smaller than one matrix (%" PRId64 " x %" PRId64 ", ld %" PRId64
                      "): the batches would overwrite each other",
                      d.stride, m, n, d.ld);
    return CUBLAS_STATUS_SUCCESS;
}

// The algorithms the heuristic offers for a preference, best first (there is always algorithm 0).
int candidate_algos(const LtPref& pref, cublasLtMatmulAlgo_t* out) {
    int count = 0;
    for (uint64_t id : {uint64_t(1), uint64_t(0)}) {
        uint64_t workspace = id == 1 ? WORKSPACE_WANT : 0;
        if (workspace > pref.max_workspace) continue;
        cublasLtMatmulAlgo_t algo{};
        algo.data[0] = ALGO_MAGIC;
        algo.data[1] = id;
        algo.data[2] = workspace;
        for (int i = 0; i < 4; i++) algo.data[3 + i] = pref.align[i];
        out[count++] = algo;
    }
    return count;
}

// The largest power of two (at most 256) dividing an address.
uint32_t alignment_of(const void* p) {
    auto a = reinterpret_cast<uintptr_t>(p);
    if (a == 0) return 256;
    uint32_t align = 1;
    while (align < 256 && a % (align * 2) == 0) align *= 2;
    return align;
}

template <class T>
T* lookup(Registry<T>& registry, const void* x, const char* call, const char* what, int* status) {
    T* found = registry.find(x);
    if (!found) *status = refuse(CUBLAS_STATUS_INVALID_VALUE, call, "%s %p is not a live object", what, x);
    return found;
}

// Destroys a live descriptor, layout or preference.
template <class T>
int destroy_object(Registry<T>& registry, const void* x, const char* call, const char* what) {
    if (!registry.remove(x)) return refuse(CUBLAS_STATUS_INVALID_VALUE, call, "%s %p is not live", what, x);
    delete static_cast<T*>(const_cast<void*>(x));
    return CUBLAS_STATUS_SUCCESS;
}

// The descriptor and the layouts of a matmul or heuristic query, checked live in this order (C's is D's when
// NULL); the first one that is not live is refused.
int lookup_matmul(const char* call, const void* desc, const void* a, const void* b, const void* c, const void* d,
                  MatmulObjects* out) {
    int status = 0;
    MatmulObjects& o = *out;
    o.desc = lookup(descs, desc, call, "descriptor", &status);
    o.a = o.desc ? lookup(layouts, a, call, "A layout", &status) : nullptr;
    o.b = o.a ? lookup(layouts, b, call, "B layout", &status) : nullptr;
    o.d = o.b ? lookup(layouts, d, call, "D layout", &status) : nullptr;
    o.c = !o.d ? nullptr : c ? lookup(layouts, c, call, "C layout", &status) : o.d;
    return status;
}

}  // namespace

NCSIM_BLAS_EXPORT size_t cublasLtGetVersion(void) {
    return VERSION;
}

NCSIM_BLAS_EXPORT int cublasLtCreate(cublasLtHandle_t* handle) {
    return create_handle("cublasLtCreate", handles, handle);
}

NCSIM_BLAS_EXPORT int cublasLtDestroy(cublasLtHandle_t handle) {
    return destroy_handle("cublasLtDestroy", handles, handle, LIBRARY);
}

NCSIM_BLAS_EXPORT int cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* desc, int compute_type, int scale_type) {
    const char* call = "cublasLtMatmulDescCreate";
    if (!desc) return refuse(CUBLAS_STATUS_INVALID_VALUE, call, "matmulDesc is NULL");
    if (!supported_compute(compute_type))
        return refuse(CUBLAS_STATUS_NOT_SUPPORTED, call, "computeType = %d is not implemented (32F, 32F_PEDANTIC, "
                      "32F_FAST_TF32 are)", compute_type);
    auto* d = descs.add(new LtDesc());
    d->compute = compute_type;
    d->scale_type = scale_type;
    *desc = reinterpret_cast<cublasLtMatmulDesc_t>(d);
    return CUBLAS_STATUS_SUCCESS;
}

NCSIM_BLAS_EXPORT int cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t desc) {
    return destroy_object(descs, desc, "cublasLtMatmulDescDestroy", "descriptor");
}

NCSIM_BLAS_EXPORT int cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t desc, int attr, const void* buf,
                                                     size_t size) {
    const char* call = "cublasLtMatmulDescSetAttribute";
    int status = 0;
    LtDesc* d = lookup(descs, desc, call, "descriptor", &status);
    if (!d) return status;
    int32_t v = 0;
    switch (attr) {
        case CUBLASLT_MATMUL_DESC_COMPUTE_TYPE:
        case CUBLASLT_MATMUL_DESC_SCALE_TYPE:
        case CUBLASLT_MATMUL_DESC_POINTER_MODE:
        case CUBLASLT_MATMUL_DESC_TRANSA:
        case CUBLASLT_MATMUL_DESC_TRANSB:
        case CUBLASLT_MATMUL_DESC_TRANSC:
        case CUBLASLT_MATMUL_DESC_FILL_MODE:
        case CUBLASLT_MATMUL_DESC_EPILOGUE:  // uint32_t in the headers: the same 4 bytes
            if ((status = read_attribute(call, attr, buf, size, &v))) return status;
            break;
        default:
            return refuse(CUBLAS_STATUS_NOT_SUPPORTED, call, "attribute %d is not implemented", attr);
    }
    switch (attr) {
        case CUBLASLT_MATMUL_DESC_COMPUTE_TYPE:
            if (!supported_compute(v)) return refuse(CUBLAS_STATUS_NOT_SUPPORTED, call, "compute type %d", v);
            d->compute = v;
            break;
        case CUBLASLT_MATMUL_DESC_SCALE_TYPE: d->scale_type = v; break;
        case CUBLASLT_MATMUL_DESC_POINTER_MODE:
            if (v != CUBLASLT_POINTER_MODE_HOST && v != CUBLASLT_POINTER_MODE_DEVICE)
                return refuse(CUBLAS_STATUS_NOT_SUPPORTED, call, "pointer mode %d is not implemented", v);
            d->pointer_mode = v;
            break;
        case CUBLASLT_MATMUL_DESC_TRANSA:
        case CUBLASLT_MATMUL_DESC_TRANSB:
            if (v != CUBLAS_OP_N && v != CUBLAS_OP_T && v != CUBLAS_OP_C)
                return refuse(CUBLAS_STATUS_INVALID_VALUE, call, "trans%c = %d is not an operation",
                              attr == CUBLASLT_MATMUL_DESC_TRANSA ? 'a' : 'b', v);
            (attr == CUBLASLT_MATMUL_DESC_TRANSA ? d->transa : d->transb) = v;
            break;
        case CUBLASLT_MATMUL_DESC_TRANSC:
            if (v != CUBLAS_OP_N) return refuse(CUBLAS_STATUS_NOT_SUPPORTED, call, "transc = %d (only N is)", v);
            break;
        case CUBLASLT_MATMUL_DESC_FILL_MODE:
            if (v != CUBLAS_FILL_MODE_FULL) return refuse(CUBLAS_STATUS_NOT_SUPPORTED, call, "fill mode %d", v);
            break;
        case CUBLASLT_MATMUL_DESC_EPILOGUE:
            if (v != CUBLASLT_EPILOGUE_DEFAULT)
                return refuse(CUBLAS_STATUS_NOT_SUPPORTED, call, "epilogue %d is not implemented (default only)", v);
            break;
    }
    return CUBLAS_STATUS_SUCCESS;
}

NCSIM_BLAS_EXPORT int cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* layout, int type, uint64_t rows,
                                                 uint64_t cols, int64_t ld) {
    if (!layout) return refuse(CUBLAS_STATUS_INVALID_VALUE, "cublasLtMatrixLayoutCreate", "matLayout is NULL");
    // Like the real library, the values are checked where they are used (heuristic, matmul).
    auto* l = layouts.add(new LtLayout());
    l->type = type, l->rows = rows, l->cols = cols, l->ld = ld;
    *layout = reinterpret_cast<cublasLtMatrixLayout_t>(l);
    return CUBLAS_STATUS_SUCCESS;
}

NCSIM_BLAS_EXPORT int cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t layout) {
    return destroy_object(layouts, layout, "cublasLtMatrixLayoutDestroy", "layout");
}

NCSIM_BLAS_EXPORT int cublasLtMatrixLayoutSetAttribute(cublasLtMatrixLayout_t layout, int attr, const void* buf,
                                                       size_t size) {
    const char* call = "cublasLtMatrixLayoutSetAttribute";
    int status = 0;
    LtLayout* l = lookup(layouts, layout, call, "layout", &status);
    if (!l) return status;
    switch (attr) {
        case CUBLASLT_MATRIX_LAYOUT_TYPE: {
            uint32_t v = 0;
            if ((status = read_attribute(call, attr, buf, size, &v))) return status;
            l->type = int(v);
            return 0;
        }
        case CUBLASLT_MATRIX_LAYOUT_ORDER: {
            int32_t v = 0;
            if ((status = read_attribute(call, attr, buf, size, &v))) return status;
            if (v != CUBLASLT_ORDER_COL)
                return refuse(CUBLAS_STATUS_NOT_SUPPORTED, call, "order %d is not implemented (column-major only)", v);
            l->order = v;
            return 0;
        }
        case CUBLASLT_MATRIX_LAYOUT_ROWS: return read_attribute(call, attr, buf, size, &l->rows);
        case CUBLASLT_MATRIX_LAYOUT_COLS: return read_attribute(call, attr, buf, size, &l->cols);
        case CUBLASLT_MATRIX_LAYOUT_LD: return read_attribute(call, attr, buf, size, &l->ld);
        case CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT: return read_attribute(call, attr, buf, size, &l->batch);
        case CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET: return read_attribute(call, attr, buf, size, &l->stride);
        case CUBLASLT_MATRIX_LAYOUT_PLANE_OFFSET: {
            int64_t v = 0;
            if ((status = read_attribute(call, attr, buf, size, &v))) return status;
            if (v != 0) return refuse(CUBLAS_STATUS_NOT_SUPPORTED, call, "plane offset %" PRId64, v);
            return 0;
        }
        default: return refuse(CUBLAS_STATUS_NOT_SUPPORTED, call, "attribute %d is not implemented", attr);
    }
}

NCSIM_BLAS_EXPORT int cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* pref) {
    if (!pref) return refuse(CUBLAS_STATUS_INVALID_VALUE, "cublasLtMatmulPreferenceCreate", "pref is NULL");
    *pref = reinterpret_cast<cublasLtMatmulPreference_t>(prefs.add(new LtPref()));
    return CUBLAS_STATUS_SUCCESS;
}

NCSIM_BLAS_EXPORT int cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t pref) {
    return destroy_object(prefs, pref, "cublasLtMatmulPreferenceDestroy", "preference");
}

NCSIM_BLAS_EXPORT int cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t pref, int attr,
                                                           const void* buf, size_t size) {
    const char* call = "cublasLtMatmulPreferenceSetAttribute";
    int status = 0;
    LtPref* p = lookup(prefs, pref, call, "preference", &status);
    if (!p) return status;
    switch (attr) {
        case CUBLASLT_MATMUL_PREF_SEARCH_MODE: {
            uint32_t v = 0;
            if ((status = read_attribute(call, attr, buf, size, &v))) return status;
            if (v != 0) return refuse(CUBLAS_STATUS_NOT_SUPPORTED, call, "search mode %u (best fit only)", v);
            return 0;
        }
        case CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES: return read_attribute(call, attr, buf, size, &p->max_workspace);
        case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES:
        case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES:
        case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES:
        case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES:
            return read_attribute(call, attr, buf, size, &p->align[attr - CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES]);
        default: return refuse(CUBLAS_STATUS_NOT_SUPPORTED, call, "attribute %d is not implemented", attr);
    }
}

NCSIM_BLAS_EXPORT int cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc,
                                                     cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                                                     cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t d,
                                                     cublasLtMatmulPreference_t pref, int requested,
                                                     cublasLtMatmulHeuristicResult_t* results, int* returned) {
    const char* call = "cublasLtMatmulAlgoGetHeuristic";
    int status = 0;
    if (!live_handle(handles, handle, LIBRARY, call, &status)) return status;
    if (requested <= 0) return refuse(CUBLAS_STATUS_INVALID_VALUE, call, "requestedAlgoCount = %d <= 0", requested);
    if (!results || !returned) return refuse(CUBLAS_STATUS_INVALID_VALUE, call, "a result pointer is NULL");
    *returned = 0;
    MatmulObjects o;
    if ((status = lookup_matmul(call, desc, a, b, c, d, &o))) return status;
    LtPref* pr = lookup(prefs, pref, call, "preference", &status);
    if (!pr) return status;
    Problem problem;
    if ((status = resolve(call, o, &problem))) return status;
    cublasLtMatmulAlgo_t algos[2];
    int count = std::min(candidate_algos(*pr, algos), requested);
    // Plausible figures: 128 x 128 output tiles spread over an H100's 132 SMs.
    int64_t tiles = ((problem.g.m + 127) / 128) * ((problem.g.n + 127) / 128) * problem.g.batch;
    for (int i = 0; i < count; i++) {
        results[i] = cublasLtMatmulHeuristicResult_t{};
        results[i].algo = algos[i];
        results[i].workspaceSize = size_t(algos[i].data[2]);
        results[i].state = CUBLAS_STATUS_SUCCESS;
        results[i].wavesCount = float(tiles) / 132.0f;
    }
    *returned = count;
    return CUBLAS_STATUS_SUCCESS;
}

namespace {

// Whether any matrix of one strided batch overlaps any matrix of another (exact per matrix for batches up
// to 64, the hull of each batch beyond).
bool batches_overlap(const void* x, size_t x_one, size_t x_stride, const void* y, size_t y_one, size_t y_stride,
                     int64_t batch) {
    auto x0 = reinterpret_cast<uintptr_t>(x), y0 = reinterpret_cast<uintptr_t>(y);
    auto hit = [](uintptr_t a, size_t a_len, uintptr_t b, size_t b_len) { return a < b + b_len && b < a + a_len; };
    if (batch > 64) return hit(x0, (batch - 1) * x_stride + x_one, y0, (batch - 1) * y_stride + y_one);
    for (int64_t i = 0; i < batch; i++)
        for (int64_t j = 0; j < batch; j++)
            if (hit(x0 + i * x_stride, x_one, y0 + j * y_stride, y_one)) return true;
    return false;
}

bool same_layout(const LtLayout& x, const LtLayout& y) {
    return x.type == y.type && x.order == y.order && x.rows == y.rows && x.cols == y.cols && x.ld == y.ld &&
           x.batch == y.batch && (x.batch == 1 || x.stride == y.stride);
}

// The algorithm a call runs: the caller's (checked to be one of ours), or, for algo == NULL, the implicit
// heuristic query with default preferences (no workspace) and the pointers' actual alignments.
int choose_algo(const char* call, const cublasLtMatmulAlgo_t* algo, const void* const ptrs[4],
                cublasLtMatmulAlgo_t* out) {
    if (algo) {
        if (algo->data[0] != ALGO_MAGIC || algo->data[1] > 1)
            return refuse(CUBLAS_STATUS_INVALID_VALUE, call,
                          "algo was not returned by cublasLtMatmulAlgoGetHeuristic (an uninitialized algo?)");
        *out = *algo;
        return CUBLAS_STATUS_SUCCESS;
    }
    LtPref implicit;
    for (int i = 0; i < 4; i++) implicit.align[i] = alignment_of(ptrs[i]);
    cublasLtMatmulAlgo_t algos[2];
    candidate_algos(implicit, algos);
    *out = algos[0];
    return CUBLAS_STATUS_SUCCESS;
}

}  // namespace

// D = alpha op(A) op(B) + beta C (see the file comment for what is implemented and checked).
NCSIM_BLAS_EXPORT int cublasLtMatmul(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc, const void* alpha,
                                     const void* A, cublasLtMatrixLayout_t a_layout, const void* B,
                                     cublasLtMatrixLayout_t b_layout, const void* beta, const void* C,
                                     cublasLtMatrixLayout_t c_layout, void* D, cublasLtMatrixLayout_t d_layout,
                                     const cublasLtMatmulAlgo_t* algo, void* workspace, size_t workspace_bytes,
                                     cudaStream_t stream) {
    const char* call = "cublasLtMatmul";
    int status = 0;
    if (!live_handle(handles, handle, LIBRARY, call, &status)) return status;
    MatmulObjects o;
    if ((status = lookup_matmul(call, desc, a_layout, b_layout, c_layout, d_layout, &o))) return status;
    const LtDesc* de = o.desc;
    const LtLayout *la = o.a, *lb = o.b, *lc = o.c, *ld = o.d;
    if (!alpha || !beta) return refuse(CUBLAS_STATUS_INVALID_VALUE, call, "alpha or beta is NULL");
    Problem problem;
    if ((status = resolve(call, o, &problem))) return status;
    Gemm& g = problem.g;
    const Ncsim* sim = ncsim(call);
    if (!sim) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (g.m == 0 || g.n == 0) return CUBLAS_STATUS_SUCCESS;

    bool device_scalars = de->pointer_mode == CUBLASLT_POINTER_MODE_DEVICE;
    if (device_scalars) {
        g.alpha_device = static_cast<const float*>(alpha);
        g.beta_device = static_cast<const float*>(beta);
    } else {
        std::memcpy(&g.alpha, alpha, 4);  // host pointer mode: read now, the caller may reuse them at once
        std::memcpy(&g.beta, beta, 4);
    }
    bool reads_ab = (device_scalars || g.alpha != 0.0f) && g.k > 0;
    bool reads_c = device_scalars || g.beta != 0.0f;
    g.a.ptr = reads_ab ? A : nullptr;
    g.b.ptr = reads_ab ? B : nullptr;
    g.c = reads_c ? C : nullptr;
    g.d = D;

    const void* ptrs[4] = {A, B, C, D};
    cublasLtMatmulAlgo_t chosen{};
    if ((status = choose_algo(call, algo, ptrs, &chosen))) return status;
    uint64_t need = chosen.data[2];
    if (workspace_bytes < need)
        return refuse(CUBLAS_STATUS_INVALID_VALUE, call, "workspaceSizeInBytes = %zu < the %" PRIu64
                      " bytes the algorithm needs", workspace_bytes, need);
    if (need > 0 && (!workspace || reinterpret_cast<uintptr_t>(workspace) % 256 != 0))
        return refuse(CUBLAS_STATUS_INVALID_VALUE, call, "workspace = %p is NULL or not 256-byte aligned", workspace);

    // Pointers: present where read or written, element-aligned, and as aligned as the algorithm assumes.
    const char* names[4] = {"A", "B", "C", "D"};
    bool used[4] = {reads_ab, reads_ab, reads_c, true};
    Elem types[4] = {g.a.type, g.b.type, g.c_type, g.d_type};
    for (int i = 0; i < 4; i++) {
        if (!used[i]) continue;
        if (!ptrs[i]) return refuse(CUBLAS_STATUS_INVALID_VALUE, call, "%s is NULL", names[i]);
        uint32_t have = alignment_of(ptrs[i]), want = uint32_t(chosen.data[3 + i]);
        if (have < elem_bytes(types[i]))
            return refuse(CUBLAS_STATUS_EXECUTION_FAILED, call,
                          "%s = %p is not aligned to its %zu-byte elements (a GPU faults: misaligned address)",
                          names[i], ptrs[i], elem_bytes(types[i]));
        if (have < want)
            return refuse(CUBLAS_STATUS_NOT_SUPPORTED, call,
                          "%s = %p is %u-byte aligned, the algorithm assumes %u (set "
                          "CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_%s_BYTES for the heuristic)",
                          names[i], ptrs[i], have, want, names[i]);
    }

    // The bytes each operand spans, one matrix and the whole batch.
    size_t one[4] = {span_bytes(problem.a_rows, problem.a_cols, la->ld, 1, 0, g.a.type),
                     span_bytes(problem.b_rows, problem.b_cols, lb->ld, 1, 0, g.b.type),
                     span_bytes(g.m, g.n, lc->ld, 1, 0, g.c_type), span_bytes(g.m, g.n, ld->ld, 1, 0, g.d_type)};
    int64_t strides[4] = {la->stride, lb->stride, lc->stride, ld->stride};
    size_t all[4];
    for (int i = 0; i < 4; i++) {
        all[i] = span_bytes(i < 2 ? (i == 0 ? problem.a_rows : problem.b_rows) : g.m,
                            i < 2 ? (i == 0 ? problem.a_cols : problem.b_cols) : g.n,
                            i == 0 ? la->ld : i == 1 ? lb->ld : i == 2 ? lc->ld : ld->ld, g.batch, strides[i], types[i]);
        if (used[i] && all[i] == 0)
            return refuse(CUBLAS_STATUS_INVALID_VALUE, call, "%s spans more bytes than any device memory", names[i]);
    }
    auto stride_bytes = [&](int i) { return size_t(strides[i]) * elem_bytes(types[i]); };
    if (C == D && !same_layout(*lc, *ld))
        return refuse(CUBLAS_STATUS_INVALID_VALUE, call, "C == D (in place) needs Cdesc equal to Ddesc");
    if (reads_c && C != D && batches_overlap(C, one[2], stride_bytes(2), D, one[3], stride_bytes(3), g.batch))
        return refuse(CUBLAS_STATUS_INVALID_VALUE, call, "C and D overlap without being the same matrix (undefined)");
    for (int i = 0; reads_ab && i < 2; i++) {
        if (batches_overlap(ptrs[i], one[i], stride_bytes(i), D, one[3], stride_bytes(3), g.batch))
            return refuse(CUBLAS_STATUS_INVALID_VALUE, call,
                          "D overlaps %s: the result would depend on the GPU's tiling (undefined)", names[i]);
    }

    Access accesses[7];
    int count = 0;
    const char* what_read[3] = {"cublasLtMatmul A", "cublasLtMatmul B", "cublasLtMatmul C"};
    for (int i = 0; i < 3; i++)
        if (used[i]) accesses[count++] = {ptrs[i], all[i], 0, what_read[i]};
    accesses[count++] = {D, all[3], 1, "cublasLtMatmul D"};
    if (need > 0) accesses[count++] = {workspace, size_t(need), 1, "cublasLtMatmul workspace"};
    if (device_scalars) {
        accesses[count++] = {alpha, 4, 0, "cublasLtMatmul alpha"};
        accesses[count++] = {beta, 4, 0, "cublasLtMatmul beta"};
    }
    return submit(*sim, call, g, accesses, count, stream);
}
