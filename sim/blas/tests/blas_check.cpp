// Checks of the simulated cuBLAS / cuBLASLt (sim/blas/) against references written here, independently of
// gemm.h, on the fake ncsim of fake_ncsim.h. Run by tests/tests/sim_blas.rs; prints one line per failure and
// a summary, exits non-zero on any failure. `blas_check --bench` instead times nc-sized GEMMs (no checks).
//
// The references:
// - `reference_ordered`: the order and rounding gemm.h documents (f32 accumulator from 0, p = 0..k-1, product
//   rounded then added; alpha * acc, then + beta * C only when beta != 0; the output rounded to bf16 nearest
//   even). The simulated libraries must match it to the bit.
// - `reference_f64`: the exact product in double; the result must lie within the f32 accumulation error
//   bound (k + 2) * 2^-24 * (|alpha| sum |a b| + |beta c|), plus half an output ulp. This catches a wrong
//   index mapping whatever the order, and is what NVIDIA's definition promises up to rounding.
// Compiled with -ffp-contract=off so the references round every product as written.
#include <dlfcn.h>
#include <unistd.h>

#include <chrono>
#include <ctime>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "../blas_api.h"
#include "fake_ncsim.h"

namespace {

int failures = 0;
int checks = 0;

#define CHECK(cond, ...)                                      \
    do {                                                      \
        checks++;                                             \
        if (!(cond)) {                                        \
            failures++;                                       \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);       \
            printf(__VA_ARGS__);                              \
            printf("\n");                                     \
        }                                                     \
    } while (0)

// --- number formats, written without gemm.h's bit tricks -------------------------------------------------

float bits_to_f32(uint32_t bits) {
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint32_t f32_bits(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    return bits;
}

float bf16_value(uint16_t h) {
    return bits_to_f32(uint32_t(h) << 16);
}

// Round to the bf16 neighbour nearer in value; on a tie the one with an even last mantissa bit.
uint16_t bf16_nearest_even(float x) {
    if (std::isnan(x)) return 0x7fff;
    uint32_t bits = f32_bits(x);
    uint16_t down = uint16_t(bits >> 16);  // toward zero
    if ((bits & 0xffff) == 0) return down;
    uint16_t up = uint16_t(down + 1);  // away from zero (into inf past the largest finite)
    double d_down = std::fabs(double(x) - double(bf16_value(down)));
    double d_up = std::fabs(double(bf16_value(up)) - double(x));
    if (d_down < d_up) return down;
    if (d_up < d_down) return up;
    return (down & 1) ? up : down;
}

// TF32: 10 mantissa bits, nearest, ties away from zero.
float tf32_nearest_away(float x) {
    if (!std::isfinite(x)) return x;
    uint32_t bits = f32_bits(x);
    uint32_t down = bits & ~0x1fffu;
    uint32_t up = down + 0x2000u;
    double d_down = std::fabs(double(x) - double(bits_to_f32(down)));
    double d_up = std::fabs(double(bits_to_f32(up)) - double(x));
    return bits_to_f32(d_up <= d_down ? up : down);
}

uint64_t rng_state = 0x9e3779b97f4a7c15ull;
float random_unit() {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return float(int64_t(rng_state >> 40) % 2001 - 1000) / 997.0f;
}

// --- matrices in fake device memory ---------------------------------------------------------------------

// A stored column-major batch: rows x cols, leading dimension ld, batch stride (elements).
struct Mat {
    int type = CUDA_R_32F;
    int64_t rows = 0, cols = 0, ld = 0, batch = 1, stride = 0;
    void* dev = nullptr;
    size_t elements = 0;

    size_t esize() const { return type == CUDA_R_16BF ? 2 : 4; }
    float get(int64_t b, int64_t r, int64_t c) const {
        size_t i = size_t(b * stride + r + c * ld);
        if (type == CUDA_R_16BF) return bf16_value(static_cast<uint16_t*>(dev)[i]);
        return static_cast<float*>(dev)[i];
    }
    void set(int64_t b, int64_t r, int64_t c, float v) {
        size_t i = size_t(b * stride + r + c * ld);
        if (type == CUDA_R_16BF)
            static_cast<uint16_t*>(dev)[i] = bf16_nearest_even(v);
        else
            static_cast<float*>(dev)[i] = v;
    }
    std::vector<uint8_t> bytes() const {
        auto* p = static_cast<uint8_t*>(dev);
        return std::vector<uint8_t>(p, p + elements * esize());
    }
};

// `gap` extra elements between batch matrices and `pad` extra rows of leading dimension, so a library that
// ignores ld or the stride reads (or writes) the wrong elements.
Mat make_mat(int type, int64_t rows, int64_t cols, int64_t batch, int64_t pad, int64_t gap, bool fill) {
    Mat m;
    m.type = type, m.rows = rows, m.cols = cols, m.ld = rows + pad, m.batch = batch;
    m.stride = batch > 1 ? m.ld * cols + gap : 0;
    m.elements = size_t((batch - 1) * m.stride + m.ld * cols);
    m.dev = fake_alloc(m.elements * m.esize());
    if (fill)
        for (int64_t b = 0; b < batch; b++)
            for (int64_t c = 0; c < cols; c++)
                for (int64_t r = 0; r < rows; r++) m.set(b, r, c, random_unit());
    return m;
}

// --- references -----------------------------------------------------------------------------------------

struct Problem {
    bool ta = false, tb = false;
    int64_t m = 0, n = 0, k = 0, batch = 1;
    float alpha = 1, beta = 0;
    bool tf32 = false;
};

float op_at(const Mat& x, bool trans, int64_t b, int64_t r, int64_t c) {
    return trans ? x.get(b, c, r) : x.get(b, r, c);
}

// D (as the library must store it) from A, B and C's values before the call.
float reference_ordered(const Problem& p, const Mat& a, const Mat& b, const Mat& c, int64_t bi, int64_t i,
                        int64_t j) {
    float acc = 0.0f;
    for (int64_t q = 0; q < p.k; q++) {
        float x = op_at(a, p.ta, bi, i, q), y = op_at(b, p.tb, bi, q, j);
        if (p.tf32) x = tf32_nearest_away(x), y = tf32_nearest_away(y);
        float prod = x * y;
        acc = acc + prod;
    }
    float v = p.alpha * acc;
    if (p.beta != 0.0f) {
        float old = p.beta * c.get(bi, i, j);
        v = v + old;
    }
    return v;
}

// The exact value in double, and the bound on |f32 result - exact| before output rounding.
void reference_f64(const Problem& p, const Mat& a, const Mat& b, const Mat& c, int64_t bi, int64_t i, int64_t j,
                   double* exact, double* bound) {
    double sum = 0, abs_sum = 0;
    for (int64_t q = 0; q < p.k; q++) {
        double x = op_at(a, p.ta, bi, i, q), y = op_at(b, p.tb, bi, q, j);
        sum += x * y;
        abs_sum += std::fabs(x * y);
    }
    double old = p.beta != 0.0f ? double(p.beta) * c.get(bi, i, j) : 0.0;
    *exact = double(p.alpha) * sum + old;
    *bound = double(p.k + 2) * std::ldexp(1.0, -24) * (std::fabs(p.alpha) * abs_sum + std::fabs(old));
}

// Compares D after the call with both references; elements of D outside the matrices (ld padding, batch
// gaps) must be untouched. `c_before` is C's contents before the call (C may be D itself).
void compare(const char* label, const Problem& p, const Mat& a, const Mat& b, const Mat& c_before, const Mat& d,
             const std::vector<uint8_t>& d_bytes_before) {
    int reported = 0;
    for (int64_t bi = 0; bi < p.batch; bi++) {
        for (int64_t j = 0; j < p.n; j++) {
            for (int64_t i = 0; i < p.m; i++) {
                float want = reference_ordered(p, a, b, c_before, bi, i, j);
                float got = d.get(bi, i, j);
                if (d.type == CUDA_R_16BF) want = bf16_value(bf16_nearest_even(want));
                double exact, bound;
                reference_f64(p, a, b, c_before, bi, i, j, &exact, &bound);
                double out_ulp = d.type == CUDA_R_16BF ? std::ldexp(std::fabs(exact) + bound, -8)
                                                       : std::ldexp(std::fabs(exact) + bound, -24);
                bool same_bits = f32_bits(got) == f32_bits(want);
                bool within = std::fabs(double(got) - exact) <= bound * 1.001 + out_ulp;
                if ((!same_bits || !within) && reported++ < 3)
                    CHECK(false, "%s: D[batch %ld](%ld,%ld) = %.9g, ordered reference %.9g, exact %.9g (bound %.3g)",
                          label, long(bi), long(i), long(j), got, want, exact, bound + out_ulp);
                checks++;
            }
        }
    }
    // Untouched: every byte of D not inside one of the batch's matrices.
    std::vector<uint8_t> after = d.bytes();
    std::vector<bool> inside(d.elements, false);
    for (int64_t bi = 0; bi < d.batch; bi++)
        for (int64_t j = 0; j < d.cols; j++)
            for (int64_t i = 0; i < d.rows; i++) inside[size_t(bi * d.stride + i + j * d.ld)] = true;
    for (size_t e = 0; e < d.elements; e++) {
        if (inside[e]) continue;
        bool same = memcmp(&after[e * d.esize()], &d_bytes_before[e * d.esize()], d.esize()) == 0;
        if (!same) {
            CHECK(false, "%s: D element %zu (outside the matrices: ld padding or batch gap) was written", label, e);
            break;
        }
    }
}

// A copy of a Mat's device bytes in a fresh allocation (C's values before an in-place call).
Mat snapshot(const Mat& x) {
    Mat s = x;
    s.dev = fake_alloc(x.elements * x.esize());
    memcpy(s.dev, x.dev, x.elements * x.esize());
    return s;
}

// --- cuBLASLt helpers -----------------------------------------------------------------------------------

cublasLtMatrixLayout_t layout_of(const Mat& x) {
    cublasLtMatrixLayout_t l = nullptr;
    int s = cublasLtMatrixLayoutCreate(&l, x.type, uint64_t(x.rows), uint64_t(x.cols), x.ld);
    CHECK(s == CUBLAS_STATUS_SUCCESS, "cublasLtMatrixLayoutCreate: %d", s);
    if (x.batch > 1) {
        int32_t count = int32_t(x.batch);
        int64_t stride = x.stride;
        s = cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, 4);
        CHECK(s == 0, "batch count: %d", s);
        s = cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, 8);
        CHECK(s == 0, "stride: %d", s);
    }
    return l;
}

cublasLtMatmulDesc_t desc_of(int compute, int ta, int tb) {
    cublasLtMatmulDesc_t d = nullptr;
    int s = cublasLtMatmulDescCreate(&d, compute, CUDA_R_32F);
    CHECK(s == 0, "cublasLtMatmulDescCreate: %d", s);
    s = cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_TRANSA, &ta, 4);
    CHECK(s == 0, "transa: %d", s);
    s = cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_TRANSB, &tb, 4);
    CHECK(s == 0, "transb: %d", s);
    return d;
}

cublasLtHandle_t lt = nullptr;
void* workspace = nullptr;
constexpr size_t WORKSPACE = 32 << 20;

// The heuristic's one algorithm for `desc` on these layouts, with the workspace limit of 32 MiB, as nc asks
// for it: the heuristic's status; the algorithm in `result`, how many it found in `found`.
int heuristic(cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t la, cublasLtMatrixLayout_t lb,
              cublasLtMatrixLayout_t lc, cublasLtMatrixLayout_t ld, cublasLtMatmulHeuristicResult_t* result,
              int* found) {
    cublasLtMatmulPreference_t pref = nullptr;
    cublasLtMatmulPreferenceCreate(&pref);
    uint64_t limit = WORKSPACE;
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &limit, 8);
    int s = cublasLtMatmulAlgoGetHeuristic(lt, desc, la, lb, lc, ld, pref, 1, result, found);
    cublasLtMatmulPreferenceDestroy(pref);
    return s;
}

// Heuristic and matmul, as nc calls them; returns the matmul's status.
int lt_matmul(cublasLtMatmulDesc_t desc, const Mat& a, const Mat& b, const Mat& c, const Mat& d, float alpha,
              float beta, void* stream = nullptr) {
    cublasLtMatrixLayout_t la = layout_of(a), lb = layout_of(b), lc = layout_of(c), ld = layout_of(d);
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    int s = heuristic(desc, la, lb, lc, ld, &result, &found);
    if (s == 0) {
        CHECK(found == 1 && result.state == 0 && result.workspaceSize <= WORKSPACE, "heuristic: %d found", found);
        s = cublasLtMatmul(lt, desc, &alpha, a.dev, la, b.dev, lb, &beta, c.dev, lc, d.dev, ld, &result.algo,
                           workspace, WORKSPACE, stream);
    }
    for (auto l : {la, lb, lc, ld}) cublasLtMatrixLayoutDestroy(l);
    return s;
}

const char* type_label(int t) {
    return t == CUDA_R_16BF ? "bf16" : "f32";
}

// --- the checks -----------------------------------------------------------------------------------------

// Every transpose, padded ld, batch with gaps, alpha/beta (beta = 0 over NaN poison), C == D and C != D, for
// the three type combinations nc uses; tile edges (m, n not multiples of 8 and 6; m > 128 and n > 96 cross
// the packing panels; one shape is split over threads).
void lt_matches_references() {
    struct Types {
        int ab, cd;
    } types[] = {{CUDA_R_16BF, CUDA_R_16BF}, {CUDA_R_16BF, CUDA_R_32F}, {CUDA_R_32F, CUDA_R_32F}};
    struct Shape {
        int64_t m, n, k;
    } shapes[] = {{13, 7, 19}, {1, 1, 1}, {131, 100, 9}, {200, 300, 80}};
    for (Types t : types) {
        for (Shape sh : shapes) {
            for (int ta = 0; ta < 2; ta++) {
                for (int tb = 0; tb < 2; tb++) {
                    for (int variant = 0; variant < 4; variant++) {
                        // variant: 0 plain; 1 padded ld, batch 3, beta 0.5, C == D; 2 alpha -1.5, beta 0 over
                        // poison, batch 2, C != D; 3 beta 2, C != D, padded.
                        // The bigger shapes once per transpose: 131 x 100 crosses the packing panels; 200 x 300
                        // x 80 (batch 2) is large enough to be split over threads (NC_SIM_BLAS_THREADS).
                        if (sh.m == 131 && variant != 1) continue;
                        if (sh.m == 200 && variant != 2) continue;
                        Problem p;
                        p.ta = ta, p.tb = tb, p.m = sh.m, p.n = sh.n, p.k = sh.k;
                        p.batch = variant == 1 ? 3 : variant == 2 ? 2 : 1;
                        p.alpha = variant == 2 ? -1.5f : 1.0f;
                        p.beta = variant == 1 ? 0.5f : variant == 3 ? 2.0f : 0.0f;
                        int64_t pad = variant == 1 || variant == 3 ? 3 : 0, gap = 5;
                        Mat a = make_mat(t.ab, ta ? p.k : p.m, ta ? p.m : p.k, p.batch, pad, gap, true);
                        Mat b = make_mat(t.ab, tb ? p.n : p.k, tb ? p.k : p.n, p.batch, pad + 1, gap, true);
                        bool in_place = variant == 1;
                        Mat c = make_mat(t.cd, p.m, p.n, p.batch, pad, gap, p.beta != 0.0f);
                        Mat d = in_place ? c : make_mat(t.cd, p.m, p.n, p.batch, pad, gap, false);
                        Mat c_before = snapshot(c);
                        std::vector<uint8_t> d_before = d.bytes();
                        cublasLtMatmulDesc_t desc = desc_of(CUBLAS_COMPUTE_32F, ta, tb);
                        int s = lt_matmul(desc, a, b, c, d, p.alpha, p.beta);
                        char label[160];
                        snprintf(label, sizeof label, "cublasLtMatmul %s->%s m=%ld n=%ld k=%ld op=%c%c batch=%ld "
                                 "alpha=%g beta=%g %s", type_label(t.ab), type_label(t.cd), long(p.m), long(p.n),
                                 long(p.k), ta ? 'T' : 'N', tb ? 'T' : 'N', long(p.batch), p.alpha, p.beta,
                                 in_place ? "C==D" : "C!=D");
                        CHECK(s == 0, "%s: status %d", label, s);
                        fake_sync();
                        compare(label, p, a, b, c_before, d, d_before);
                        cublasLtMatmulDescDestroy(desc);
                        for (void* x : {a.dev, b.dev, c.dev, c_before.dev}) fake_free(x);
                        if (!in_place) fake_free(d.dev);
                    }
                }
            }
        }
    }
}

cublasHandle_t blas = nullptr;

// cublasSgemm_v2: transposes, padded lds, alpha and beta (beta = 0 over NaN poison), strict and TF32 math.
void sgemm_matches_references() {
    for (int math : {CUBLAS_DEFAULT_MATH, CUBLAS_TF32_TENSOR_OP_MATH}) {
        CHECK(cublasSetMathMode(blas, math) == 0, "cublasSetMathMode %d", math);
        for (int ta = 0; ta < 2; ta++) {
            for (int tb = 0; tb < 2; tb++) {
                for (int variant = 0; variant < 2; variant++) {
                    Problem p;
                    p.ta = ta, p.tb = tb, p.m = 11, p.n = 14, p.k = 23, p.tf32 = math == CUBLAS_TF32_TENSOR_OP_MATH;
                    p.alpha = variant ? 0.75f : 1.0f;
                    p.beta = variant ? -1.0f : 0.0f;
                    int64_t pad = variant ? 2 : 0;
                    Mat a = make_mat(CUDA_R_32F, ta ? p.k : p.m, ta ? p.m : p.k, 1, pad, 0, true);
                    Mat b = make_mat(CUDA_R_32F, tb ? p.n : p.k, tb ? p.k : p.n, 1, pad, 0, true);
                    Mat c = make_mat(CUDA_R_32F, p.m, p.n, 1, pad + 1, 0, p.beta != 0.0f);
                    Mat c_before = snapshot(c);
                    std::vector<uint8_t> before = c.bytes();
                    int s = cublasSgemm_v2(blas, ta, tb, int(p.m), int(p.n), int(p.k), &p.alpha,
                                           static_cast<float*>(a.dev), int(a.ld), static_cast<float*>(b.dev),
                                           int(b.ld), &p.beta, static_cast<float*>(c.dev), int(c.ld));
                    char label[128];
                    snprintf(label, sizeof label, "cublasSgemm_v2 %s op=%c%c alpha=%g beta=%g",
                             p.tf32 ? "tf32" : "f32", ta ? 'T' : 'N', tb ? 'T' : 'N', p.alpha, p.beta);
                    CHECK(s == 0, "%s: status %d", label, s);
                    fake_sync();
                    if (p.tf32) {
                        // TF32 inputs: the ordered reference rounds them; the f64 bound is the TF32 one.
                        Problem exact = p;
                        exact.tf32 = true;
                        int bad = 0;
                        for (int64_t j = 0; j < p.n; j++)
                            for (int64_t i = 0; i < p.m; i++)
                                if (f32_bits(c.get(0, i, j)) != f32_bits(reference_ordered(exact, a, b, c_before, 0, i, j)))
                                    bad++;
                        CHECK(bad == 0, "%s: %d elements differ from the TF32 ordered reference", label, bad);
                    } else {
                        compare(label, p, a, b, c_before, c, before);
                    }
                    for (void* x : {a.dev, b.dev, c.dev, c_before.dev}) fake_free(x);
                }
            }
        }
    }
    CHECK(cublasSetMathMode(blas, CUBLAS_DEFAULT_MATH) == 0, "back to default math");
}

// A 1 x 1 bf16 GEMM whose f32 sum is `x`: the bf16 output as stored.
uint16_t bf16_of_sum(float first, float second) {
    Mat a = make_mat(CUDA_R_16BF, 1, 2, 1, 0, 0, false), b = make_mat(CUDA_R_16BF, 2, 1, 1, 0, 0, false);
    Mat d = make_mat(CUDA_R_16BF, 1, 1, 1, 0, 0, false);
    // A = [first, second] (exact in bf16 by choice), B = [1, 1]: D = round(first + second).
    a.set(0, 0, 0, first), a.set(0, 0, 1, second), b.set(0, 0, 0, 1.0f), b.set(0, 1, 0, 1.0f);
    CHECK(a.get(0, 0, 0) == first && a.get(0, 0, 1) == second, "inputs %g %g not exact in bf16", first, second);
    cublasLtMatmulDesc_t desc = desc_of(CUBLAS_COMPUTE_32F, 0, 0);
    int s = lt_matmul(desc, a, b, d, d, 1.0f, 0.0f);
    CHECK(s == 0, "bf16 rounding GEMM: status %d", s);
    fake_sync();
    uint16_t out = static_cast<uint16_t*>(d.dev)[0];
    cublasLtMatmulDescDestroy(desc);
    for (void* x : {a.dev, b.dev, d.dev}) fake_free(x);
    return out;
}

// Output rounding to bf16, nearest even, with the expected bits worked out by hand (bf16 has 7 stored
// mantissa bits: its ulp at 1 is 2^-7 = 0.0078125, bits 0x3F80 is 1.0).
void bf16_output_rounding() {
    CHECK(bf16_of_sum(1.0f, 0x1p-8f) == 0x3f80, "1 + 2^-8 (a tie) must round to even 1.0 (0x3F80)");
    CHECK(bf16_of_sum(1.0078125f, 0x1p-8f) == 0x3f82, "1 + 3 * 2^-8 (a tie) must round to even 0x3F82");
    CHECK(bf16_of_sum(1.0f, 0x1.04p-8f) == 0x3f81, "1 + a bit more than 2^-8 must round up to 0x3F81");
    CHECK(bf16_of_sum(-1.0f, -0x1p-8f) == 0xbf80, "-(1 + 2^-8) must round to even -1.0 (0xBF80)");
    CHECK(bf16_of_sum(0x1p127f, 0x1.fep127f) == 0x7f80, "an f32 overflow must be +inf (0x7F80)");
    CHECK(bf16_of_sum(0x1.fep127f, 0x1p119f) == 0x7f80, "max bf16 + half its ulp (a tie) must round to even: +inf");
    CHECK(bf16_of_sum(0x1.fep127f, 0x1p112f) == 0x7f7f, "max bf16 + a little stays max (0x7F7F)");
}

// beta = 0 never reads C (it may be unallocated, or NaN poison); the declared accesses say exactly what is
// read and written; the GEMM runs on the stream, after the call returns, with alpha and beta as they were at
// the call; the trace names the shape.
void beta_zero_declarations_async_trace() {
    Mat a = make_mat(CUDA_R_16BF, 4, 5, 2, 0, 0, true);  // op T: 5 x 4 -> m = 5, k = 4
    Mat b = make_mat(CUDA_R_16BF, 4, 3, 2, 0, 0, true);
    Mat d = make_mat(CUDA_R_32F, 5, 3, 2, 0, 0, false);
    cublasLtMatmulDesc_t desc = desc_of(CUBLAS_COMPUTE_32F, 1, 0);
    cublasLtMatrixLayout_t la = layout_of(a), lb = layout_of(b), ld = layout_of(d);
    cublasLtMatmulHeuristicResult_t r{};
    int found = 0;
    CHECK(heuristic(desc, la, lb, ld, ld, &r, &found) == 0, "heuristic");
    float alpha = 1.0f, beta = 0.0f;
    // C is an address no allocation holds: with beta = 0 it must be neither checked nor read.
    const void* nowhere = reinterpret_cast<const void*>(uintptr_t(0x1000));
    int violations = fake_violations(), traces = fake_trace_count();
    void* stream = reinterpret_cast<void*>(uintptr_t(0x5000));
    int s = cublasLtMatmul(lt, desc, &alpha, a.dev, la, b.dev, lb, &beta, nowhere, ld, d.dev, ld, &r.algo,
                           workspace, WORKSPACE, stream);
    CHECK(s == 0, "beta = 0 with an unallocated C: status %d", s);
    CHECK(fake_violations() == violations, "beta = 0: C was range-checked");
    CHECK(fake_pending() == 1, "the GEMM must be queued, not run in the call (%d pending)", fake_pending());
    CHECK(fake_last_stream() == stream, "queued on stream %p, not the caller's %p", fake_last_stream(), stream);
    alpha = 100.0f;  // the caller reuses its scalars at once: the queued GEMM must not see this
    uint32_t poison;
    memcpy(&poison, d.dev, 4);
    CHECK(poison == 0xffffffffu, "D changed before the stream ran");
    // Declared: A read, B read, D written, the workspace written; C not at all.
    int n = fake_last_access_count();
    bool a_read = false, b_read = false, d_written = false, c_seen = false, ws_written = false;
    for (int i = 0; i < n; i++) {
        const void* ptr;
        size_t bytes;
        int w;
        fake_last_access(i, &ptr, &bytes, &w);
        a_read |= ptr == a.dev && bytes == a.elements * 2 && !w;
        b_read |= ptr == b.dev && bytes == b.elements * 2 && !w;
        d_written |= ptr == d.dev && bytes == d.elements * 4 && w;
        ws_written |= ptr == workspace && bytes == r.workspaceSize && w;
        c_seen |= ptr == nowhere;
    }
    CHECK(a_read && b_read && d_written && !c_seen && n == 4 && (ws_written == (r.workspaceSize > 0)),
          "declared accesses: A read %d, B read %d, D written %d, workspace %d, C %d, count %d", a_read, b_read,
          d_written, ws_written, c_seen, n);
    CHECK(fake_trace_count() == traces + 1 &&
              std::string(fake_trace_line(traces)) == "gemm: bf16 m=5 n=3 k=4 batch=2 op=TN out=f32",
          "trace line: '%s'", fake_trace_count() > traces ? fake_trace_line(traces) : "(none)");
    fake_sync();
    Problem p;
    p.ta = true, p.m = 5, p.n = 3, p.k = 4, p.batch = 2, p.alpha = 1.0f, p.beta = 0.0f;
    Mat poison_before = make_mat(CUDA_R_32F, 5, 3, 2, 0, 0, false);
    compare("beta = 0, async, alpha reused", p, a, b, d, d, poison_before.bytes());
    for (auto l : {la, lb, ld}) cublasLtMatrixLayoutDestroy(l);
    cublasLtMatmulDescDestroy(desc);
    for (void* x : {a.dev, b.dev, d.dev, poison_before.dev}) fake_free(x);
}

// Device pointer mode: alpha and beta are read from device memory when the GEMM runs on its stream, so a
// value written there after the call (but before the stream runs) is the one used; both are declared reads.
void device_pointer_mode() {
    Problem p;
    p.m = 6, p.n = 5, p.k = 7, p.alpha = -2.0f, p.beta = 0.25f;
    Mat a = make_mat(CUDA_R_16BF, 6, 7, 1, 0, 0, true), b = make_mat(CUDA_R_16BF, 7, 5, 1, 0, 0, true);
    Mat c = make_mat(CUDA_R_32F, 6, 5, 1, 0, 0, true), d = make_mat(CUDA_R_32F, 6, 5, 1, 0, 0, false);
    auto* scalars = static_cast<float*>(fake_alloc(8));
    scalars[0] = 1.0f, scalars[1] = 0.0f;
    cublasLtMatmulDesc_t desc = desc_of(CUBLAS_COMPUTE_32F, 0, 0);
    int mode = CUBLASLT_POINTER_MODE_DEVICE;
    CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_POINTER_MODE, &mode, 4) == 0, "pointer mode");
    cublasLtMatrixLayout_t la = layout_of(a), lb = layout_of(b), lc = layout_of(c), ld = layout_of(d);
    std::vector<uint8_t> d_before = d.bytes();
    int s = cublasLtMatmul(lt, desc, &scalars[0], a.dev, la, b.dev, lb, &scalars[1], c.dev, lc, d.dev, ld, nullptr,
                           nullptr, 0, nullptr);
    CHECK(s == 0, "device pointer mode: status %d", s);
    bool alpha_read = false, beta_read = false;
    for (int i = 0; i < fake_last_access_count(); i++) {
        const void* ptr;
        size_t bytes;
        int w;
        fake_last_access(i, &ptr, &bytes, &w);
        alpha_read |= ptr == &scalars[0] && bytes == 4 && !w;
        beta_read |= ptr == &scalars[1] && bytes == 4 && !w;
    }
    CHECK(alpha_read && beta_read, "device pointer mode: alpha and beta must be declared reads");
    scalars[0] = p.alpha, scalars[1] = p.beta;  // the stream has not run yet: these are the values it uses
    fake_sync();
    compare("device pointer mode", p, a, b, c, d, d_before);
    for (auto l : {la, lb, lc, ld}) cublasLtMatrixLayoutDestroy(l);
    cublasLtMatmulDescDestroy(desc);
    for (void* x : {a.dev, b.dev, c.dev, d.dev, static_cast<void*>(scalars)}) fake_free(x);
}

// Captures what a call prints on stderr.
struct StderrCapture {
    int saved = -1;
    FILE* file = nullptr;
    StderrCapture() {
        fflush(stderr);
        file = tmpfile();
        saved = dup(2);
        dup2(fileno(file), 2);
    }
    std::string finish() {
        fflush(stderr);
        dup2(saved, 2);
        close(saved);
        std::string text;
        rewind(file);
        char buf[512];
        while (fgets(buf, sizeof buf, file)) text += buf;
        fclose(file);
        return text;
    }
};

// Runs `call`, expects `status` and a stderr line naming `entry` and containing `mention`.
template <class F>
void expect_refusal(const char* label, int status, const char* entry, const char* mention, F call) {
    StderrCapture capture;
    int got = call();
    std::string text = capture.finish();
    CHECK(got == status, "%s: status %d, want %d (stderr: %s)", label, got, status, text.c_str());
    CHECK(text.find(entry) != std::string::npos && text.find(mention) != std::string::npos,
          "%s: stderr must name %s and '%s', got: %s", label, entry, mention, text.c_str());
}

// Arguments the real libraries reject, with the statuses they document.
void rejections() {
    Mat a = make_mat(CUDA_R_16BF, 8, 4, 1, 0, 0, true), b = make_mat(CUDA_R_16BF, 4, 6, 1, 0, 0, true);
    Mat d = make_mat(CUDA_R_16BF, 8, 6, 1, 0, 0, false);
    Mat b32 = make_mat(CUDA_R_32F, 4, 6, 1, 0, 0, true), a32 = make_mat(CUDA_R_32F, 8, 4, 1, 0, 0, true);
    Mat d32 = make_mat(CUDA_R_32F, 8, 6, 1, 0, 0, false);
    cublasLtMatmulDesc_t nn = desc_of(CUBLAS_COMPUTE_32F, 0, 0), tn = desc_of(CUBLAS_COMPUTE_32F, 1, 0);
    const int INVALID = CUBLAS_STATUS_INVALID_VALUE, UNSUPPORTED = CUBLAS_STATUS_NOT_SUPPORTED;
    const char* MM = "cublasLtMatmulAlgoGetHeuristic";  // lt_matmul stops at the heuristic's refusal

    Mat short_ld = a;
    short_ld.ld = 7;  // ld < rows = 8
    expect_refusal("ld < rows", INVALID, MM, "ld = 7", [&] { return lt_matmul(nn, short_ld, b, d, d, 1, 0); });
    expect_refusal("bf16 x f32", UNSUPPORTED, MM, "CUDA_R_32F", [&] { return lt_matmul(nn, a, b32, d, d, 1, 0); });
    expect_refusal("f32 inputs into bf16", UNSUPPORTED, MM, "not a supported",
                   [&] { return lt_matmul(nn, a32, b32, d, d, 1, 0); });
    expect_refusal("C type != D type", UNSUPPORTED, MM, "C CUDA_R_32F",
                   [&] { return lt_matmul(nn, a, b, d32, d, 1, 0); });
    expect_refusal("transposed A disagrees with B", INVALID, MM, "shapes disagree",
                   [&] { return lt_matmul(tn, a, b, d, d, 1, 0); });
    Mat batched = make_mat(CUDA_R_16BF, 8, 4, 2, 0, 0, true);
    expect_refusal("batch counts disagree", INVALID, MM, "batch counts",
                   [&] { return lt_matmul(nn, batched, b, d, d, 1, 0); });
    expect_refusal("16F compute", UNSUPPORTED, "cublasLtMatmulDescCreate", "computeType = 64", [&] {
        cublasLtMatmulDesc_t x = nullptr;
        return cublasLtMatmulDescCreate(&x, CUBLAS_COMPUTE_16F, CUDA_R_16F);
    });
    cublasLtMatmulDesc_t bf16_scale = nullptr;
    cublasLtMatmulDescCreate(&bf16_scale, CUBLAS_COMPUTE_32F, CUDA_R_16BF);
    expect_refusal("bf16 scale type", UNSUPPORTED, MM, "scale type CUDA_R_16BF",
                   [&] { return lt_matmul(bf16_scale, a, b, d, d, 1, 0); });
    int relu = 2;
    expect_refusal("epilogue", UNSUPPORTED, "cublasLtMatmulDescSetAttribute", "epilogue 2",
                   [&] { return cublasLtMatmulDescSetAttribute(nn, CUBLASLT_MATMUL_DESC_EPILOGUE, &relu, 4); });
    int64_t wide = 1;
    expect_refusal("transa of the wrong size", INVALID, "cublasLtMatmulDescSetAttribute", "sizeInBytes = 8",
                   [&] { return cublasLtMatmulDescSetAttribute(nn, CUBLASLT_MATMUL_DESC_TRANSA, &wide, 8); });
    cublasLtMatrixLayout_t l = nullptr;
    cublasLtMatrixLayoutCreate(&l, CUDA_R_16BF, 8, 4, 8);
    int32_t row = CUBLASLT_ORDER_ROW;
    expect_refusal("row-major order", UNSUPPORTED, "cublasLtMatrixLayoutSetAttribute", "order 1",
                   [&] { return cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_ORDER, &row, 4); });
    int32_t small = 2;
    expect_refusal("a batch count of the wrong size", INVALID, "cublasLtMatrixLayoutSetAttribute", "sizeInBytes = 2",
                   [&] { return cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &small, 2); });
    cublasLtMatrixLayoutDestroy(l);
    expect_refusal("a destroyed layout", INVALID, "cublasLtMatrixLayoutSetAttribute", "not a live",
                   [&] { return cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &small, 4); });

    // The heuristic: requested count, workspace limit honoured, algorithms checked by the matmul.
    cublasLtMatrixLayout_t la = layout_of(a), lb = layout_of(b), ld = layout_of(d);
    cublasLtMatmulPreference_t pref = nullptr;
    cublasLtMatmulPreferenceCreate(&pref);
    cublasLtMatmulHeuristicResult_t r[4]{};
    int found = -1;
    expect_refusal("requestedAlgoCount 0", INVALID, MM, "requestedAlgoCount = 0",
                   [&] { return cublasLtMatmulAlgoGetHeuristic(lt, nn, la, lb, ld, ld, pref, 0, r, &found); });
    // Default preference: no workspace allowed, so only algorithms that need none.
    CHECK(cublasLtMatmulAlgoGetHeuristic(lt, nn, la, lb, ld, ld, pref, 4, r, &found) == 0 && found >= 1,
          "heuristic with the default preference");
    for (int i = 0; i < found; i++) CHECK(r[i].workspaceSize == 0, "algo %d needs %zu bytes > limit 0", i, r[i].workspaceSize);
    uint64_t limit = WORKSPACE;
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &limit, 8);
    CHECK(cublasLtMatmulAlgoGetHeuristic(lt, nn, la, lb, ld, ld, pref, 1, r, &found) == 0 && found == 1 &&
              r[0].workspaceSize > 0 && r[0].workspaceSize <= WORKSPACE,
          "with a 32 MiB limit the best algorithm uses workspace (%zu bytes)", r[0].workspaceSize);
    float one = 1, zero = 0;
    auto matmul = [&](const void* A, const void* D, const cublasLtMatmulAlgo_t* algo, size_t ws_bytes) {
        return cublasLtMatmul(lt, nn, &one, A, la, b.dev, lb, &zero, D, ld, const_cast<void*>(D), ld, algo,
                              workspace, ws_bytes, nullptr);
    };
    expect_refusal("workspace smaller than the algorithm's", INVALID, "cublasLtMatmul", "workspaceSizeInBytes = 1024",
                   [&] { return matmul(a.dev, d.dev, &r[0].algo, 1024); });
    cublasLtMatmulAlgo_t garbage{};
    expect_refusal("an algo not from the heuristic", INVALID, "cublasLtMatmul", "algo",
                   [&] { return matmul(a.dev, d.dev, &garbage, WORKSPACE); });
    // Alignment: the heuristic assumed 256-byte pointers (the default); A 2 bytes in is refused.
    Mat a_big = make_mat(CUDA_R_16BF, 8 * 4 + 1, 1, 1, 0, 0, true);
    const void* a_shifted = static_cast<char*>(a_big.dev) + 2;
    expect_refusal("A less aligned than promised", UNSUPPORTED, "cublasLtMatmul", "2-byte aligned",
                   [&] { return matmul(a_shifted, d.dev, &r[0].algo, WORKSPACE); });
    uint32_t two = 2;
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &two, 4);
    CHECK(cublasLtMatmulAlgoGetHeuristic(lt, nn, la, lb, ld, ld, pref, 1, r, &found) == 0, "heuristic, align 2");
    CHECK(matmul(a_shifted, d.dev, &r[0].algo, WORKSPACE) == 0, "A 2-byte aligned, as promised, must run");
    const void* a_odd = static_cast<char*>(a_big.dev) + 1;
    expect_refusal("bf16 A at an odd address", CUBLAS_STATUS_EXECUTION_FAILED, "cublasLtMatmul", "misaligned",
                   [&] { return matmul(a_odd, d.dev, &r[0].algo, WORKSPACE); });
    // D overlapping A; in place with C's layout different from D's.
    // (A inside D: D keeps the 256-byte alignment the algorithm assumes, A the 2 it was promised.)
    Mat shared = make_mat(CUDA_R_16BF, 8 * 6, 1, 1, 0, 0, true);
    const void* inside = static_cast<uint16_t*>(shared.dev) + 8;
    expect_refusal("D overlaps A", INVALID, "cublasLtMatmul", "D overlaps A",
                   [&] { return matmul(inside, shared.dev, &r[0].algo, WORKSPACE); });
    Mat d_padded = make_mat(CUDA_R_16BF, 8, 6, 1, 1, 0, true);
    cublasLtMatrixLayout_t lc_padded = layout_of(d_padded), ld_short = nullptr;
    cublasLtMatrixLayoutCreate(&ld_short, CUDA_R_16BF, 8, 6, 8);
    expect_refusal("in place with different layouts", INVALID, "cublasLtMatmul", "Cdesc", [&] {
        return cublasLtMatmul(lt, nn, &one, a.dev, la, b.dev, lb, &one, d_padded.dev, lc_padded, d_padded.dev,
                              ld_short, &r[0].algo, workspace, WORKSPACE, nullptr);
    });
    // An operand past the end of its allocation: the driver's range check (here the fake's) stops it.
    int violations = fake_violations();
    Mat a_short = make_mat(CUDA_R_16BF, 8, 3, 1, 0, 0, true);  // 8 x 3, used as 8 x 4
    expect_refusal("A past its allocation", CUBLAS_STATUS_EXECUTION_FAILED, "cublasLtMatmul", "A",
                   [&] { return matmul(a_short.dev, d.dev, &r[0].algo, WORKSPACE); });
    CHECK(fake_violations() == violations + 1, "the range check must have fired once");
    expect_refusal("a stream the driver refuses", CUBLAS_STATUS_EXECUTION_FAILED, "cublasLtMatmul", "stream", [&] {
        return cublasLtMatmul(lt, nn, &one, a.dev, la, b.dev, lb, &zero, d.dev, ld, d.dev, ld, &r[0].algo,
                              workspace, WORKSPACE, FAKE_BAD_STREAM);
    });
    CHECK(fake_pending() == 1, "only the one valid GEMM above is queued (%d)", fake_pending());
    fake_sync();

    // cuBLAS.
    float* A = static_cast<float*>(a32.dev);
    float* B = static_cast<float*>(b32.dev);
    float* C = static_cast<float*>(d32.dev);
    const char* SG = "cublasSgemm_v2";
    expect_refusal("lda < m", INVALID, SG, "lda = 7",
                   [&] { return cublasSgemm_v2(blas, 0, 0, 8, 6, 4, &one, A, 7, B, 4, &zero, C, 8); });
    expect_refusal("lda < k (A transposed)", INVALID, SG, "lda = 3",
                   [&] { return cublasSgemm_v2(blas, 1, 0, 8, 6, 4, &one, A, 3, B, 4, &zero, C, 8); });
    expect_refusal("ldb < k", INVALID, SG, "ldb = 3",
                   [&] { return cublasSgemm_v2(blas, 0, 0, 8, 6, 4, &one, A, 8, B, 3, &zero, C, 8); });
    expect_refusal("ldc < m", INVALID, SG, "ldc = 5",
                   [&] { return cublasSgemm_v2(blas, 0, 0, 8, 6, 4, &one, A, 8, B, 4, &zero, C, 5); });
    expect_refusal("negative n", INVALID, SG, "n = -1",
                   [&] { return cublasSgemm_v2(blas, 0, 0, 8, -1, 4, &one, A, 8, B, 4, &zero, C, 8); });
    expect_refusal("transa 7", INVALID, SG, "transa = 7",
                   [&] { return cublasSgemm_v2(blas, 7, 0, 8, 6, 4, &one, A, 8, B, 4, &zero, C, 8); });
    expect_refusal("a destroyed handle", CUBLAS_STATUS_NOT_INITIALIZED, SG, "not a live", [&] {
        cublasHandle_t h = nullptr;
        cublasCreate_v2(&h);
        cublasDestroy_v2(h);
        return cublasSgemm_v2(h, 0, 0, 8, 6, 4, &one, A, 8, B, 4, &zero, C, 8);
    });
    expect_refusal("math mode 99", INVALID, "cublasSetMathMode", "mode = 99",
                   [&] { return cublasSetMathMode(blas, 99); });
    CHECK(fake_pending() == 0, "refused calls must queue nothing (%d queued)", fake_pending());

    cublasLtMatmulPreferenceDestroy(pref);
    for (auto x : {la, lb, ld, lc_padded, ld_short}) cublasLtMatrixLayoutDestroy(x);
    for (auto x : {nn, tn, bf16_scale}) cublasLtMatmulDescDestroy(x);
    for (void* x : {a.dev, b.dev, d.dev, b32.dev, a32.dev, d32.dev, batched.dev, a_big.dev, shared.dev,
                    d_padded.dev, a_short.dev})
        fake_free(x);
}

void versions() {
    int v = 0;
    CHECK(cublasGetVersion_v2(blas, &v) == 0 && v / 10000 == 13, "cuBLAS version %d is not 13.x", v);
    CHECK(cublasLtGetVersion() / 10000 == 13, "cuBLASLt version %zu is not 13.x", cublasLtGetVersion());
}

// GFLOP/s of nc-sized GEMMs (single thread, the stream worker's): not a test, a measurement.
void bench() {
    struct Case {
        int64_t m, n, k;
        int ta, tb, type;
    } cases[] = {{768, 256, 256, 0, 0, CUDA_R_16BF}, {768, 256, 256, 1, 0, CUDA_R_16BF},
                 {768, 256, 256, 0, 1, CUDA_R_16BF}, {256, 768, 256, 0, 0, CUDA_R_32F},
                 {2048, 768, 256, 0, 0, CUDA_R_16BF}};
    for (const Case& c : cases) {
        Mat a = make_mat(c.type, c.ta ? c.k : c.m, c.ta ? c.m : c.k, 1, 0, 0, true);
        Mat b = make_mat(c.type, c.tb ? c.n : c.k, c.tb ? c.k : c.n, 1, 0, 0, true);
        Mat d = make_mat(c.type, c.m, c.n, 1, 0, 0, false);
        cublasLtMatmulDesc_t desc = desc_of(CUBLAS_COMPUTE_32F, c.ta, c.tb);
        int reps = 5;
        // Wall time, and the process's CPU time (every GEMM thread's): on a shared machine the second says
        // what the code does, the first what the machine gave it.
        timespec cpu0, cpu1;
        clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &cpu0);
        auto start = std::chrono::steady_clock::now();
        for (int i = 0; i < reps; i++) {
            lt_matmul(desc, a, b, d, d, 1.0f, 0.0f);
            fake_sync();
        }
        double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &cpu1);
        double cpu = double(cpu1.tv_sec - cpu0.tv_sec) + 1e-9 * double(cpu1.tv_nsec - cpu0.tv_nsec);
        double flop = 2.0 * double(c.m * c.n * c.k) * reps;
        printf("%s m=%ld n=%ld k=%ld op=%c%c: %.2f ms per GEMM, %.2f GFLOP/s wall, %.2f GFLOP/s per CPU second\n",
               type_label(c.type), long(c.m), long(c.n), long(c.k), c.ta ? 'T' : 'N', c.tb ? 'T' : 'N',
               s / reps * 1e3, flop / s / 1e9, flop / cpu / 1e9);
        cublasLtMatmulDescDestroy(desc);
        for (void* x : {a.dev, b.dev, d.dev}) fake_free(x);
    }
}

}  // namespace

int main(int argc, char** argv) {
    CHECK(cublasCreate_v2(&blas) == 0, "cublasCreate_v2");
    CHECK(cublasLtCreate(&lt) == 0, "cublasLtCreate");
    workspace = fake_alloc(WORKSPACE);
    if (argc > 1 && std::string(argv[1]) == "--bench") {
        bench();
        return 0;
    }
    versions();
    lt_matches_references();
    sgemm_matches_references();
    bf16_output_rounding();
    beta_zero_declarations_async_trace();
    device_pointer_mode();
    rejections();
    CHECK(cublasLtDestroy(lt) == 0 && cublasDestroy_v2(blas) == 0, "destroy");
    printf("%d checks, %d failed\n", checks, failures);
    return failures == 0 ? 0 : 1;
}
