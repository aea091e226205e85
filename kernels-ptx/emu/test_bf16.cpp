// The bf16 engine's kernels on the CPU through emu.h (see test.cpp): rmsnorm with the cast fused, rotary +
// QK-norm, relu^2 and the casts, the bf16 embedding lookups and the deterministic embedding backward, the
// multi-tensor AdamW and Newton-Schulz's norm / apply. References are f64 (a bf16 output must be the
// round-to-nearest-even of a value within the stated tolerance of the f64 result) or, where the kernel is
// specified bit for bit (relu^2, casts, embedding backward, AdamW, Newton-Schulz's normalize and apply), the
// same float operations in the CPU's order. Each check runs the vectorized path (aligned pointers, lengths a
// multiple of the vector) and the scalar one (an odd length or a pointer offset by one element).
#include "emu.h"
#include <cuda_bf16.h>
#include <stddef.h>
#include <stdint.h>
#include <cfenv>
#include <random>
#include <string>
#include <tuple>
namespace rmsb {
#include "rmsnorm_bf16.cu"
}
namespace rq {
#include "rotary_qknorm.cu"
}
namespace ewb {
#include "elementwise_bf16.cu"
}
namespace emb {
#include "embedding.cu"
}
namespace am {
#include "adamw_multi.cu"
}
namespace ns {
#include "newton_schulz.cu"
}

typedef __nv_bfloat16 bf16;
static std::mt19937 rng(7);
static int failures = 0;
static dim3 D(unsigned x, unsigned y = 1, unsigned z = 1) { return dim3{x, y, z}; }

static std::vector<float> randv(size_t n, float s = 1.0f) {
    std::normal_distribution<float> d(0, s);
    std::vector<float> v(n);
    for (auto& x : v) x = d(rng);
    return v;
}

// Round to nearest even onto the bf16 grid (8 significant bits, f32's exponent range), written independently
// of the shim: scale so the kept bits are an integer, nearbyint (ties to even), scale back. NaN stays NaN.
static float ref_bf16(double f) {
    if (std::isnan(f)) return NAN;
    if (f == 0 || std::isinf(f)) return (float)f;
    int e = std::max(std::ilogb(f), -126);  // below 2^-126 the spacing is fixed at 2^-133
    double r = std::ldexp(std::nearbyint(std::ldexp(f, 7 - e)), e - 7);
    return (float)r;  // a value past the largest bf16 rounds to 2^128 here, which is inf as a float
}
static float widen(bf16 h) { return __bfloat162float(h); }
static std::vector<bf16> to_bf16(const std::vector<float>& v) {
    std::vector<bf16> o(v.size());
    for (size_t i = 0; i < v.size(); i++) o[i] = __float2bfloat16_rn(v[i]);
    return o;
}
static std::vector<float> widen(const std::vector<bf16>& v) {
    std::vector<float> o(v.size());
    for (size_t i = 0; i < v.size(); i++) o[i] = widen(v[i]);
    return o;
}

static void report(bool ok, const std::string& what, const char* fmt_detail) {
    if (!ok) failures++;
    printf("%-58s %s %s\n", what.c_str(), ok ? "ok  " : "FAIL", fmt_detail);
}

// got (f32) within tol (1 + |want|) of the f64 want.
static void check_f32(const std::string& what, const std::vector<float>& got, const std::vector<double>& want, double tol) {
    double worst = 0;
    size_t at = 0;
    for (size_t i = 0; i < want.size(); i++) {
        double e = std::fabs(got[i] - want[i]) / (tol * (1 + std::fabs(want[i])));
        if (!(e <= worst)) worst = e, at = i;
    }
    char buf[200];
    snprintf(buf, sizeof buf, "worst %.3g tol at %zu (got %g want %g)", worst, at, want.empty() ? 0.0 : got[at],
             want.empty() ? 0.0 : want[at]);
    report(worst <= 1.0, what, buf);
}

// Each bf16 got[i] is the rounding of some value within tol (1 + |want|) of want[i]: rounding is monotone, so
// got must lie between the roundings of the interval's ends.
static void check_bf16(const std::string& what, const std::vector<float>& got, const std::vector<double>& want, double tol) {
    size_t bad = 0, at = 0;
    for (size_t i = 0; i < want.size(); i++) {
        double e = tol * (1 + std::fabs(want[i]));
        bool ok = ref_bf16(want[i] - e) <= got[i] && got[i] <= ref_bf16(want[i] + e);
        if (!ok && bad++ == 0) at = i;
    }
    char buf[200];
    snprintf(buf, sizeof buf, "%zu of %zu off (first at %zu: got %.9g want %.9g)", bad, want.size(), at,
             want.empty() ? 0.0 : got[at], want.empty() ? 0.0 : want[at]);
    report(bad == 0, what, buf);
}

// Bit for bit (NaN matches NaN).
static void check_bits(const std::string& what, const std::vector<float>& got, const std::vector<float>& want) {
    size_t bad = 0, at = 0;
    for (size_t i = 0; i < want.size(); i++) {
        bool same = std::isnan(got[i]) ? std::isnan(want[i])
                                       : got[i] == want[i] && std::signbit(got[i]) == std::signbit(want[i]);
        if (!same && bad++ == 0) at = i;
    }
    char buf[200];
    snprintf(buf, sizeof buf, "%zu of %zu differ (first at %zu: got %.9g want %.9g)", bad, want.size(), at,
             want.empty() ? 0.0 : got[at], want.empty() ? 0.0 : want[at]);
    report(bad == 0, what, buf);
}

// ---- rmsnorm with the cast fused

template <typename In>
static void rmsnorm_case(int rows, int dim, bool offset) {
    const float eps = 1e-6f;
    std::string tag = std::string(sizeof(In) == 4 ? "f32" : "bf16") + " dim " + std::to_string(dim) + (offset ? " unaligned" : "");
    auto xf = randv((size_t)rows * dim + 1, 2);
    std::vector<In> xs(xf.size());
    for (size_t i = 0; i < xf.size(); i++) {
        if constexpr (sizeof(In) == 4) xs[i] = xf[i];
        else xs[i] = __float2bfloat16_rn(xf[i]), xf[i] = widen(xs[i]);
    }
    size_t o = offset ? 1 : 0;
    std::vector<bf16> y((size_t)rows * dim + 1);
    std::vector<float> rstd(rows, -1);
    if constexpr (sizeof(In) == 4)
        launch(rmsb::nc_rmsnorm_forward_f32_bf16, D(rows), D(128), (const float*)xs.data() + o, y.data() + o, rstd.data(), rows,
               dim, eps);
    else
        launch(rmsb::nc_rmsnorm_forward_bf16_bf16, D(rows), D(128), (const bf16*)xs.data() + o, y.data() + o, rstd.data(), rows,
               dim, eps);
    std::vector<double> wy((size_t)rows * dim), wr(rows);
    for (int r = 0; r < rows; r++) {
        double ss = 0;
        for (int c = 0; c < dim; c++) ss += (double)xf[o + r * dim + c] * xf[o + r * dim + c];
        wr[r] = 1 / std::sqrt(ss / dim + eps);
        for (int c = 0; c < dim; c++) wy[r * dim + c] = xf[o + r * dim + c] * wr[r];
    }
    std::vector<float> yv((size_t)rows * dim);
    for (size_t i = 0; i < yv.size(); i++) yv[i] = widen(y[o + i]);
    check_bf16("rmsnorm bf16 forward y " + tag, yv, wy, 1e-6);
    check_f32("  rmsnorm bf16 forward rstd", rstd, wr, 1e-6);

    // Backward from the saved bf16 y, dy in f32 and bf16, dx in f32 and bf16, written and accumulated.
    auto dyf = randv((size_t)rows * dim + 1);
    auto dyb = to_bf16(dyf);
    for (int dy_bf16 : {0, 1})
        for (int dx_bf16 : {0, 1})
            for (int acc : {0, 1}) {
                auto old = randv((size_t)rows * dim + 1);
                auto oldb = to_bf16(old);
                if (dx_bf16) old = widen(oldb);
                std::vector<double> want((size_t)rows * dim);
                for (int r = 0; r < rows; r++) {
                    double m = 0;
                    auto dyv = [&](int c) { return dy_bf16 ? (double)widen(dyb[o + r * dim + c]) : (double)dyf[o + r * dim + c]; };
                    for (int c = 0; c < dim; c++) m += (double)yv[r * dim + c] * dyv(c);
                    m /= dim;
                    for (int c = 0; c < dim; c++)
                        want[r * dim + c] = (acc ? old[o + r * dim + c] : 0.0) + rstd[r] * (dyv(c) - yv[r * dim + c] * m);
                }
                std::vector<float> got((size_t)rows * dim);
                const bf16* yp = y.data() + o;
                std::vector<float> dxf = old;
                std::vector<bf16> dxb = oldb;
                if (!dy_bf16 && !dx_bf16)
                    launch(rmsb::nc_rmsnorm_backward_dy_f32_dx_f32, D(rows), D(96), yp, (const float*)rstd.data(),
                           (const float*)dyf.data() + o, dxf.data() + o, rows, dim, acc);
                if (!dy_bf16 && dx_bf16)
                    launch(rmsb::nc_rmsnorm_backward_dy_f32_dx_bf16, D(rows), D(96), yp, (const float*)rstd.data(),
                           (const float*)dyf.data() + o, dxb.data() + o, rows, dim, acc);
                if (dy_bf16 && !dx_bf16)
                    launch(rmsb::nc_rmsnorm_backward_dy_bf16_dx_f32, D(rows), D(96), yp, (const float*)rstd.data(),
                           (const bf16*)dyb.data() + o, dxf.data() + o, rows, dim, acc);
                if (dy_bf16 && dx_bf16)
                    launch(rmsb::nc_rmsnorm_backward_dy_bf16_dx_bf16, D(rows), D(96), yp, (const float*)rstd.data(),
                           (const bf16*)dyb.data() + o, dxb.data() + o, rows, dim, acc);
                for (size_t i = 0; i < got.size(); i++) got[i] = dx_bf16 ? widen(dxb[o + i]) : dxf[o + i];
                std::string name = std::string("  rmsnorm bf16 backward dy ") + (dy_bf16 ? "bf16" : "f32") + " dx " +
                                   (dx_bf16 ? "bf16" : "f32") + (acc ? " accumulate" : "");
                if (dx_bf16) check_bf16(name, got, want, 1e-5);
                else check_f32(name, got, want, 1e-5);
            }
}

static void rmsnorm() {
    rmsnorm_case<float>(5, 1280, false);
    rmsnorm_case<float>(3, 1000, true);
    rmsnorm_case<bf16>(4, 64, false);
    rmsnorm_case<bf16>(3, 13, false);
}

// ---- rotary + QK-norm

struct Rope {
    int max_pos, half;
    std::vector<float> table;
};
static Rope rope(int head_dim, int max_pos) {
    Rope r{max_pos, head_dim / 2, std::vector<float>(2 * max_pos * (head_dim / 2))};
    for (int p = 0; p < max_pos; p++)
        for (int j = 0; j < r.half; j++) {
            double a = p / std::pow(10000.0, 2.0 * j / head_dim);
            r.table[p * r.half + j] = std::cos(a);
            r.table[max_pos * r.half + p * r.half + j] = std::sin(a);
        }
    return r;
}

// f64 forward of one (row, head): rotary (if table) then rmsnorm; returns y and writes rstd.
static std::vector<double> ref_rq(const double* x, int D, int p, const Rope* rp, double eps, double* rstd) {
    int half = D / 2;
    std::vector<double> r(x, x + D);
    if (rp)
        for (int j = 0; j < half; j++) {
            double c = rp->table[p * half + j], s = rp->table[rp->max_pos * half + p * half + j];
            r[j] = x[j] * c + x[j + half] * s;
            r[j + half] = -x[j] * s + x[j + half] * c;
        }
    double ss = 0;
    for (double v : r) ss += v * v;
    *rstd = 1 / std::sqrt(ss / D + eps);
    for (double& v : r) v *= *rstd;
    return r;
}

template <typename In, typename Dy, typename Dx>
static void rotary_qknorm_case(int B, int T, int H, int Dh, int pos0, bool with_table) {
    const float eps = 1e-6f;
    int rows = B * T, units = rows * H;
    Rope rp = rope(Dh, pos0 + T + 3);
    const float* table = with_table ? rp.table.data() : nullptr;
    auto xf = randv((size_t)units * Dh, 1.5);
    std::vector<In> xs(xf.size());
    for (size_t i = 0; i < xf.size(); i++) {
        if constexpr (sizeof(In) == 4) xs[i] = xf[i];
        else xs[i] = __float2bfloat16_rn(xf[i]), xf[i] = widen(xs[i]);
    }
    std::vector<bf16> y(xf.size());
    std::vector<float> rstd(units, -1);
    unsigned grid = (units + 7) / 8;
    if constexpr (sizeof(In) == 4)
        launch(rq::nc_rotary_qknorm_forward_f32, D(grid), D(256), (const float*)xs.data(), y.data(), rstd.data(), table, rows, T,
               H, Dh, pos0, rp.max_pos, eps);
    else
        launch(rq::nc_rotary_qknorm_forward_bf16, D(grid), D(256), (const bf16*)xs.data(), y.data(), rstd.data(), table, rows,
               T, H, Dh, pos0, rp.max_pos, eps);
    std::vector<double> wy(xf.size()), wr(units);
    for (int u = 0; u < units; u++) {
        std::vector<double> x(xf.begin() + (size_t)u * Dh, xf.begin() + (size_t)(u + 1) * Dh);
        auto r = ref_rq(x.data(), Dh, pos0 + (u / H) % T, with_table ? &rp : nullptr, eps, &wr[u]);
        std::copy(r.begin(), r.end(), wy.begin() + (size_t)u * Dh);
    }
    auto yv = widen(y);
    std::string tag = std::string(with_table ? "rotary+qknorm" : "qknorm alone") + " in " + (sizeof(In) == 4 ? "f32" : "bf16") +
                      " B" + std::to_string(B) + " T" + std::to_string(T) + " H" + std::to_string(H) + " D" +
                      std::to_string(Dh) + " pos0 " + std::to_string(pos0);
    check_bf16(tag + " y", yv, wy, 2e-6);
    check_f32("  rstd", rstd, wr, 1e-6);

    // Backward: the f64 formula on the saved bf16 y (norm backward, then the transpose rotation).
    auto dyf = randv(xf.size());
    std::vector<Dy> dys(xf.size());
    for (size_t i = 0; i < dyf.size(); i++) {
        if constexpr (sizeof(Dy) == 4) dys[i] = dyf[i];
        else dys[i] = __float2bfloat16_rn(dyf[i]), dyf[i] = widen(dys[i]);
    }
    std::vector<Dx> dx(xf.size());
    auto bwd = [&](auto kernel) {
        launch(kernel, D(grid), D(256), (const bf16*)y.data(), (const float*)rstd.data(), (const Dy*)dys.data(), dx.data(), table,
               rows, T, H, Dh, pos0, rp.max_pos);
    };
    if constexpr (sizeof(Dy) == 4 && sizeof(Dx) == 4) bwd(rq::nc_rotary_qknorm_backward_dy_f32_dx_f32);
    if constexpr (sizeof(Dy) == 4 && sizeof(Dx) == 2) bwd(rq::nc_rotary_qknorm_backward_dy_f32_dx_bf16);
    if constexpr (sizeof(Dy) == 2 && sizeof(Dx) == 4) bwd(rq::nc_rotary_qknorm_backward_dy_bf16_dx_f32);
    if constexpr (sizeof(Dy) == 2 && sizeof(Dx) == 2) bwd(rq::nc_rotary_qknorm_backward_dy_bf16_dx_bf16);
    int half = Dh / 2;
    std::vector<double> want(xf.size());
    for (int u = 0; u < units; u++) {
        size_t o = (size_t)u * Dh;
        int p = pos0 + (u / H) % T;
        double m = 0;
        for (int c = 0; c < Dh; c++) m += (double)yv[o + c] * dyf[o + c];
        m /= Dh;
        std::vector<double> g(Dh);
        for (int c = 0; c < Dh; c++) g[c] = rstd[u] * (dyf[o + c] - yv[o + c] * m);
        for (int j = 0; j < half; j++) {
            double c = with_table ? rp.table[p * half + j] : 1, s = with_table ? rp.table[rp.max_pos * half + p * half + j] : 0;
            want[o + j] = g[j] * c - g[j + half] * s;
            want[o + j + half] = g[j] * s + g[j + half] * c;
        }
    }
    std::vector<float> got(dx.size());
    for (size_t i = 0; i < dx.size(); i++) {
        if constexpr (sizeof(Dx) == 4) got[i] = dx[i];
        else got[i] = widen(dx[i]);
    }
    std::string name = std::string("  backward dy ") + (sizeof(Dy) == 4 ? "f32" : "bf16") + " dx " + (sizeof(Dx) == 4 ? "f32" : "bf16");
    if constexpr (sizeof(Dx) == 4) check_f32(name, got, want, 1e-5);
    else check_bf16(name, got, want, 1e-5);
}

// The backward is the gradient of the forward: central differences of L = sum(w y(x)) through the f64 forward,
// against the kernel's backward from the saved (bf16) y, so to bf16's precision.
static void rotary_qknorm_gradient() {
    int B = 1, T = 3, H = 2, Dh = 8, pos0 = 2, units = B * T * H;
    const float eps = 1e-6f;
    Rope rp = rope(Dh, pos0 + T);
    auto x = randv((size_t)units * Dh);
    auto w = randv(x.size());
    std::vector<bf16> y(x.size());
    std::vector<float> rstd(units), dx(x.size());
    launch(rq::nc_rotary_qknorm_forward_f32, D(1), D(256), (const float*)x.data(), y.data(), rstd.data(), (const float*)rp.table.data(),
           B * T, T, H, Dh, pos0, rp.max_pos, eps);
    launch(rq::nc_rotary_qknorm_backward_dy_f32_dx_f32, D(1), D(256), (const bf16*)y.data(), (const float*)rstd.data(),
           (const float*)w.data(), dx.data(), (const float*)rp.table.data(), B * T, T, H, Dh, pos0, rp.max_pos);
    std::vector<double> num(x.size());
    for (int u = 0; u < units; u++) {
        size_t o = (size_t)u * Dh;
        for (int c = 0; c < Dh; c++) {
            double f[2], r;
            for (int sgn = 0; sgn < 2; sgn++) {
                std::vector<double> xv(x.begin() + o, x.begin() + o + Dh);
                xv[c] += sgn ? -1e-4 : 1e-4;
                auto yv = ref_rq(xv.data(), Dh, pos0 + (u / H) % T, &rp, eps, &r);
                f[sgn] = 0;
                for (int k = 0; k < Dh; k++) f[sgn] += yv[k] * w[o + k];
            }
            num[o + c] = (f[0] - f[1]) / 2e-4;
        }
    }
    check_f32("rotary+qknorm backward vs central differences", dx, num, 2e-2);
}

static void rotary_qknorm() {
    rotary_qknorm_case<float, float, bf16>(2, 5, 3, 128, 4, true);   // the model's head dim, vector path
    rotary_qknorm_case<bf16, bf16, bf16>(2, 5, 3, 128, 4, true);
    rotary_qknorm_case<bf16, bf16, float>(1, 4, 2, 256, 0, true);   // the largest head dim: every pair slot
    rotary_qknorm_case<float, float, float>(2, 3, 3, 8, 7, true);   // D/2 = 4: most lanes idle
    rotary_qknorm_case<bf16, float, bf16>(1, 5, 2, 6, 1, true);     // D/2 odd: the scalar path
    rotary_qknorm_case<bf16, bf16, bf16>(2, 5, 3, 128, 0, false);   // null table: QK-norm alone
    rotary_qknorm_gradient();
}

// ---- relu^2 and the casts (bit for bit)

// relu with relu(-0) = +0 (the sign of a zero is not specified by the CPU's f32::max nor by fmaxf; the kernel's
// emulated fmaxf gives +0, and a -0 factor would only flip the sign of a zero gradient).
static float relu(float x) { return x > 0 ? x : 0.0f; }

static void relu2_and_casts() {
    for (size_t n : {1003ul, 4096ul}) {
        for (size_t o : {0ul, 1ul}) {
            std::string tag = " n " + std::to_string(n) + (o ? " unaligned" : "");
            auto uf = randv(n + 1);
            uf[o + 3] = -0.0f, uf[o + 4] = 0.0f;
            auto ub = to_bf16(uf);
            std::vector<bf16> h(n + 1);
            std::vector<float> want(n), got(n);
            launch(ewb::nc_relu2_forward_f32_to_bf16, D(2), D(64), (const float*)uf.data() + o, h.data() + o, (unsigned long long)n);
            for (size_t i = 0; i < n; i++) {
                float r = relu(uf[o + i]);
                want[i] = ref_bf16(r * r), got[i] = widen(h[o + i]);
            }
            check_bits("relu2 forward f32 -> bf16" + tag, got, want);
            launch(ewb::nc_relu2_forward_bf16_to_bf16, D(3), D(64), (const bf16*)ub.data() + o, h.data() + o, (unsigned long long)n);
            for (size_t i = 0; i < n; i++) {
                float r = relu(widen(ub[o + i]));
                want[i] = ref_bf16(r * r), got[i] = widen(h[o + i]);
            }
            check_bits("relu2 forward bf16 -> bf16" + tag, got, want);

            auto dhf = randv(n + 1);
            auto dhb = to_bf16(dhf);
            for (int u_bf16 : {0, 1})
                for (int dh_bf16 : {0, 1}) {
                    std::vector<bf16> du(n + 1);
                    auto U = [&](size_t i) { return u_bf16 ? widen(ub[i]) : uf[i]; };
                    auto G = [&](size_t i) { return dh_bf16 ? widen(dhb[i]) : dhf[i]; };
                    for (size_t i = 0; i < n; i++) want[i] = ref_bf16(G(o + i) * (2.0f * relu(U(o + i))));
                    unsigned long long nn = n;
                    if (u_bf16 && dh_bf16)
                        launch(ewb::nc_relu2_backward_u_bf16_dh_bf16, D(2), D(64), (const bf16*)ub.data() + o, (const bf16*)dhb.data() + o,
                               du.data() + o, nn);
                    if (u_bf16 && !dh_bf16)
                        launch(ewb::nc_relu2_backward_u_bf16_dh_f32, D(2), D(64), (const bf16*)ub.data() + o, (const float*)dhf.data() + o,
                               du.data() + o, nn);
                    if (!u_bf16 && dh_bf16)
                        launch(ewb::nc_relu2_backward_u_f32_dh_bf16, D(2), D(64), (const float*)uf.data() + o, (const bf16*)dhb.data() + o,
                               du.data() + o, nn);
                    if (!u_bf16 && !dh_bf16)
                        launch(ewb::nc_relu2_backward_u_f32_dh_f32, D(2), D(64), (const float*)uf.data() + o, (const float*)dhf.data() + o,
                               du.data() + o, nn);
                    for (size_t i = 0; i < n; i++) got[i] = widen(du[o + i]);
                    check_bits(std::string("relu2 backward u ") + (u_bf16 ? "bf16" : "f32") + " dh " + (dh_bf16 ? "bf16" : "f32") + tag, got,
                               want);
                }
            // In place (du = dh, both bf16).
            auto inplace = dhb;
            for (size_t i = 0; i < n; i++) want[i] = ref_bf16(widen(dhb[o + i]) * (2.0f * relu(widen(ub[o + i]))));
            launch(ewb::nc_relu2_backward_u_bf16_dh_bf16, D(2), D(64), (const bf16*)ub.data() + o, (const bf16*)inplace.data() + o,
                   inplace.data() + o, (unsigned long long)n);
            for (size_t i = 0; i < n; i++) got[i] = widen(inplace[o + i]);
            check_bits("relu2 backward in place" + tag, got, want);

            // Casts, with the special values: ties both ways, NaN, infinities, a subnormal, overflow to inf.
            auto src = randv(n + 1, 100);
            float specials[] = {1.00390625f /* 1 + 2^-8: tie, to even (1) */, 1.01171875f /* tie, up */, NAN, INFINITY,
                                -INFINITY, 1e-40f, -0.0f, 3.4e38f};
            for (size_t k = 0; k < 8; k++) src[o + 10 + k] = specials[k];
            std::vector<bf16> b(n + 1);
            launch(ewb::nc_cast_f32_to_bf16, D(2), D(64), (const float*)src.data() + o, b.data() + o, (unsigned long long)n);
            for (size_t i = 0; i < n; i++) want[i] = ref_bf16(src[o + i]), got[i] = widen(b[o + i]);
            check_bits("cast f32 -> bf16" + tag, got, want);
            std::vector<float> back(n + 1, 123.f);
            launch(ewb::nc_cast_bf16_to_f32, D(2), D(64), (const bf16*)b.data() + o, back.data() + o, (unsigned long long)n);
            std::vector<float> bv(back.begin() + o, back.begin() + o + n);
            check_bits("cast bf16 -> f32" + tag, bv, got);
        }
    }
}

// ---- embedding: bf16 lookups, and the deterministic backward from the inverse index

// The inverse index, a stable counting sort (as nc_kernels::EmbeddingIndex builds it).
struct Index {
    std::vector<int> order, seg_start, seg_id;
};
static Index inverse_index(const std::vector<int>& ids, int V) {
    std::vector<int> count(V + 1, 0);
    for (int id : ids) count[id + 1]++;
    for (int v = 0; v < V; v++) count[v + 1] += count[v];
    Index ix;
    ix.order.resize(ids.size());
    auto next = count;
    for (size_t i = 0; i < ids.size(); i++) ix.order[next[ids[i]]++] = (int)i;
    for (int v = 0; v < V; v++)
        if (count[v + 1] > count[v]) ix.seg_id.push_back(v), ix.seg_start.push_back(count[v]);
    ix.seg_start.push_back((int)ids.size());
    return ix;
}

static void embedding() {
    int V = 11, n = 29;
    for (int d : {64, 300}) {
        auto wf = randv((size_t)V * d);
        auto wb = to_bf16(wf);
        std::vector<int> ids(n);
        for (int i = 0; i < n; i++) ids[i] = (i * 7 + i / 5) % V;
        std::vector<float> out((size_t)n * d), want((size_t)n * d), got((size_t)n * d);
        std::vector<bf16> outb((size_t)n * d);
        launch(emb::nc_embedding_forward_bf16_f32, D(n), D(32), (const int*)ids.data(), (const bf16*)wb.data(), out.data(), n, d);
        for (int i = 0; i < n; i++)
            for (int c = 0; c < d; c++) want[(size_t)i * d + c] = widen(wb[(size_t)ids[i] * d + c]);
        check_bits("embedding forward bf16 -> f32 d " + std::to_string(d), out, want);
        launch(emb::nc_embedding_forward_bf16_bf16, D(n), D(32), (const int*)ids.data(), (const bf16*)wb.data(), outb.data(), n, d);
        check_bits("embedding forward bf16 -> bf16 d " + std::to_string(d), widen(outb), want);

        // Backward: values whose f32 sum depends on the order (1e8 next to small ones), so any other order than
        // the CPU's (positions ascending, added into the row) shows.
        auto dout = randv((size_t)n * d);
        for (size_t i = 0; i < dout.size(); i += 3) dout[i] *= 1e8f;
        auto doutb = to_bf16(dout);
        auto dw0 = randv((size_t)V * d);
        Index ix = inverse_index(ids, V);
        int segs = (int)ix.seg_id.size();
        for (int b16 : {0, 1}) {
            std::vector<float> wdw = dw0;
            for (int i = 0; i < n; i++)
                for (int c = 0; c < d; c++)
                    wdw[(size_t)ids[i] * d + c] += b16 ? widen(doutb[(size_t)i * d + c]) : dout[(size_t)i * d + c];
            std::vector<float> first;
            for (auto [threads, ytiles] : {std::pair<unsigned, unsigned>{128, 2}, {32, 1}, {64, 3}}) {
                auto dw = dw0;
                if (b16)
                    launch(emb::nc_embedding_backward_sorted_bf16, D(segs, ytiles), D(threads), (const int*)ix.order.data(),
                           (const int*)ix.seg_start.data(), (const int*)ix.seg_id.data(), segs, (const bf16*)doutb.data(), dw.data(), d);
                else
                    launch(emb::nc_embedding_backward_sorted_f32, D(segs, ytiles), D(threads), (const int*)ix.order.data(),
                           (const int*)ix.seg_start.data(), (const int*)ix.seg_id.data(), segs, (const float*)dout.data(), dw.data(), d);
                std::string name = std::string("embedding backward sorted ") + (b16 ? "bf16" : "f32") + " d " + std::to_string(d) +
                                   " block " + std::to_string(threads) + " x " + std::to_string(ytiles);
                check_bits(name + " = CPU order", dw, wdw);
                if (first.empty()) first = dw;
                else check_bits("  same bits as the first launch shape", dw, first);
            }
        }
        // The order matters for these values: summing the positions in reverse gives other bits somewhere (so the
        // check above can tell orders apart).
        std::vector<float> rev = dw0;
        for (int i = n - 1; i >= 0; i--)
            for (int c = 0; c < d; c++) rev[(size_t)ids[i] * d + c] += dout[(size_t)i * d + c];
        std::vector<float> fwd = dw0;
        for (int i = 0; i < n; i++)
            for (int c = 0; c < d; c++) fwd[(size_t)ids[i] * d + c] += dout[(size_t)i * d + c];
        size_t differ = 0;
        for (size_t i = 0; i < fwd.size(); i++) differ += fwd[i] != rev[i];
        report(differ > 0, "  embedding backward data is order-sensitive d " + std::to_string(d),
               (std::to_string(differ) + " elements differ between orders").c_str());
    }
}

// ---- multi-tensor AdamW (bit for bit against the CPU's float formula)

static void adamw_multi() {
    const float beta1 = 0.8f, beta2 = 0.95f, eps = 1e-10f;
    const int t = 3;
    // (n, offset in elements of every pointer, has a bf16 copy)
    std::vector<std::tuple<size_t, size_t, bool>> specs = {{1003, 0, true}, {5, 0, true}, {4096, 0, false}, {777, 1, true}};
    int count = (int)specs.size();
    struct State {
        std::vector<float> p, g, m, v;
        std::vector<bf16> pb;
    };
    std::vector<State> st(count), init;
    am::AdamwTable table;
    std::vector<float> poison(64, 42.0f);
    for (auto& e : table.t) e = {poison.data(), poison.data(), poison.data(), poison.data(), nullptr, 64, 0.5f, 1, 1, 0};
    for (int k = 0; k < count; k++) {
        auto [n, o, has_b] = specs[k];
        auto& s = st[k];
        s.p = randv(n + o), s.g = randv(n + o, 0.1f), s.m = randv(n + o, 0.05f), s.v = randv(n + o, 0.01f);
        for (auto& q : s.v) q = q * q;
        s.g[o] = 0, s.m[o] = 0, s.v[o] = 0;  // no gradient yet: 0 / (0 + eps)
        s.pb.assign(n + o, __float2bfloat16_rn(-7.0f));
        double lr = 0.004 * (k + 1), wd = k == 2 ? 0.1 : 0.0;
        table.t[k] = {s.p.data() + o,
                      s.g.data() + o,
                      s.m.data() + o,
                      s.v.data() + o,
                      has_b ? s.pb.data() + o : nullptr,
                      (unsigned long long)n,
                      (float)(1.0 - lr * wd),
                      (float)(lr / (1.0 - std::pow((double)beta1, t))),
                      (float)(1.0 / (1.0 - std::pow((double)beta2, t))),
                      0};
    }
    init = st;
    launch(am::nc_adamw_multi_f32, D(3, count), D(64), table, count, beta1, beta2, eps);
    for (int k = 0; k < count; k++) {
        auto [n, o, has_b] = specs[k];
        const auto& s0 = init[k];
        const auto& T = table.t[k];
        std::vector<float> wp(n), wm(n), wv(n), gp(n), gm(n), gv(n), gb(n), wb(n);
        for (size_t i = 0; i < n; i++) {
            float mi = s0.m[o + i] + (1.0f - beta1) * (s0.g[o + i] - s0.m[o + i]);
            float vi = s0.v[o + i] + (1.0f - beta2) * (s0.g[o + i] * s0.g[o + i] - s0.v[o + i]);
            float denom = std::sqrt(vi * T.inv_bc2) + eps;
            wp[i] = s0.p[o + i] * T.decay - T.step * mi / denom, wm[i] = mi, wv[i] = vi;
            wb[i] = has_b ? ref_bf16(wp[i]) : -7.0f;
            gp[i] = st[k].p[o + i], gm[i] = st[k].m[o + i], gv[i] = st[k].v[o + i], gb[i] = widen(st[k].pb[o + i]);
        }
        std::string tag = " tensor " + std::to_string(k) + " n " + std::to_string(n) + (o ? " unaligned" : "") + (has_b ? "" : " no copy");
        check_bits("adamw multi p" + tag, gp, wp);
        check_bits("  adamw multi m", gm, wm);
        check_bits("  adamw multi v", gv, wv);
        check_bits("  adamw multi p_bf16", gb, wb);
        if (o) check_bits("  adamw multi leaves the element before alone", {st[k].p[0]}, {init[k].p[0]});
    }
    check_bits("adamw multi: descriptors past count untouched", poison, std::vector<float>(64, 42.0f));
}

// ---- Newton-Schulz: batched sum of squares, normalize + cast, apply

static void newton_schulz() {
    for (auto [batch, n, parts, threads] : {std::tuple<int, size_t, int, unsigned>{3, 91, 4, 64}, {2, 5000, 6, 128}, {1, 3, 2, 32}}) {
        std::string tag = " batch " + std::to_string(batch) + " n " + std::to_string(n) + " parts " + std::to_string(parts);
        auto g = randv((size_t)batch * n, 0.3f);
        std::vector<double> partial((size_t)batch * parts + 1, -1.0), want_part((size_t)batch * parts + 1, -1.0);
        for (int b = 0; b < batch; b++) {
            for (int j = 0; j < parts; j++) want_part[(size_t)b * parts + j] = 0;
            for (size_t i = 0; i < n; i++) want_part[(size_t)b * parts + (i / threads) % parts] += (double)g[b * n + i] * g[b * n + i];
        }
        launch(ns::nc_ns_sum_squares_f64, D(parts, batch), D(threads), (const float*)g.data(), (unsigned long long)n, partial.data());
        double worst = 0;
        for (size_t j = 0; j < partial.size(); j++)
            worst = std::max(worst, std::fabs(partial[j] - want_part[j]) / std::max(1.0, std::fabs(want_part[j])));
        char buf[100];
        snprintf(buf, sizeof buf, "worst rel err %.3g", worst);
        report(worst <= 1e-13, "ns sum of squares" + tag, buf);

        // Normalize: bit for bit against the float formula from the kernel's partials, and the Frobenius norm
        // of the result is 1 to bf16's precision.
        for (size_t o : {0ul, 1ul}) {
            std::vector<bf16> x((size_t)batch * n + 1);
            // With o = 1 each matrix's output is one element past an aligned start (the scalar path).
            launch(ns::nc_ns_normalize_bf16, D(parts, batch), D(threads), (const float*)g.data(), (unsigned long long)n,
                   (const double*)partial.data(), parts, 1e-7f, x.data() + o);
            std::vector<float> want((size_t)batch * n), got((size_t)batch * n);
            for (int b = 0; b < batch; b++) {
                double total = 0;
                for (int j = 0; j < parts; j++) total += partial[(size_t)b * parts + j];
                float inv = 1.0f / ((float)std::sqrt(total) + 1e-7f);
                double fro = 0;
                for (size_t i = 0; i < n; i++) {
                    want[b * n + i] = ref_bf16(g[b * n + i] * inv), got[b * n + i] = widen(x[o + b * n + i]);
                    fro += (double)got[b * n + i] * got[b * n + i];
                }
                snprintf(buf, sizeof buf, "||X|| = %.6f", std::sqrt(fro));
                report(std::fabs(std::sqrt(fro) - 1) < 4e-3, "  ns normalized matrix " + std::to_string(b) + " has norm 1", buf);
            }
            check_bits("ns normalize -> bf16" + tag + (o ? " unaligned" : ""), got, want);
        }

        // Apply: p = a X + p on strided parameters, and their bf16 copies; the gaps between matrices untouched.
        size_t p_stride = n + 3, pb_stride = n + 5;
        auto xb = to_bf16(randv((size_t)batch * n));
        auto p = randv(p_stride * batch);
        auto p0 = p;
        std::vector<bf16> pb(pb_stride * batch, __float2bfloat16_rn(-9.0f));
        float a = -0.02f * 1.3f;
        launch(ns::nc_muon_apply_bf16, D(parts, batch), D(threads), (const bf16*)xb.data(), (unsigned long long)n, p.data(),
               (unsigned long long)p_stride, pb.data(), (unsigned long long)pb_stride, a);
        std::vector<float> wp = p0, wb(pb_stride * batch, -9.0f);
        for (int b = 0; b < batch; b++)
            for (size_t i = 0; i < n; i++) {
                float v = a * widen(xb[b * n + i]) + p0[b * p_stride + i];
                wp[b * p_stride + i] = v, wb[b * pb_stride + i] = ref_bf16(v);
            }
        check_bits("ns muon apply p (strided)" + tag, p, wp);
        check_bits("  ns muon apply p_bf16 (strided)", widen(pb), wb);
        auto p1 = p0;
        launch(ns::nc_muon_apply_bf16, D(parts, batch), D(threads), (const bf16*)xb.data(), (unsigned long long)n, p1.data(),
               (unsigned long long)p_stride, (bf16*)nullptr, (unsigned long long)0, a);
        check_bits("  ns muon apply without a copy", p1, wp);
    }
}

int main() {
    std::fesetround(FE_TONEAREST);
    rmsnorm();
    rotary_qknorm();
    relu2_and_casts();
    embedding();
    adamw_multi();
    newton_schulz();
    failures += emu_race_summary();  // run.sh runs every program in race mode
    printf("%d failures\n", failures);
    return failures != 0;
}
