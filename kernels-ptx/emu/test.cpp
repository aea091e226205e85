// Runs every kernel of ../cuda on the CPU through emu.h and compares with double-precision references (the
// attention gradients against central differences of the reference forward). Not a substitute for a GPU run:
// it checks indexing, masking, tiling and barrier placement, not timing, memory ordering or the device math
// library. Build and run with ./run.sh (g++ >= 12, C++20).
#include "emu.h"
#include <random>
#include <string>
#include <tuple>
namespace ew {
#include "elementwise.cu"
}
namespace emb {
#include "embedding.cu"
}
namespace rms {
#include "rmsnorm.cu"
}
namespace rot {
#include "rotary.cu"
}
namespace ce {
#include "cross_entropy.cu"
}
namespace att {
#include "attention.cu"
}
namespace opt {
#include "optim.cu"
}

static std::mt19937 rng(42);
static std::vector<float> randv(size_t n, float s = 1.0f) {
    std::normal_distribution<float> d(0, s);
    std::vector<float> v(n);
    for (auto& x : v) x = d(rng);
    return v;
}
static int failures = 0;
static void check(const char* what, const std::vector<float>& got, const std::vector<double>& want, double tol) {
    double worst = 0;
    size_t at = 0;
    for (size_t i = 0; i < want.size(); i++) {
        double e = std::fabs(got[i] - want[i]) / (std::max(tol, 1e-30) * (1 + std::fabs(want[i])));
        if (!(e <= worst)) worst = e, at = i;
    }
    bool ok = worst < 1.0;
    if (!ok) failures++;
    printf("%-50s %s worst err %.3g at %zu (got %g want %g)\n", what, ok ? "ok  " : "FAIL", worst * tol, at,
           want.empty() ? 0.0 : got[at], want.empty() ? 0.0 : want[at]);
}
static void check(const std::string& s, const std::vector<float>& g, const std::vector<double>& w, double t) { check(s.c_str(), g, w, t); }
static dim3 D(unsigned x, unsigned y = 1, unsigned z = 1) { return dim3{x, y, z}; }

static void elementwise() {
    size_t n = 1000;
    auto u = randv(n), y = randv(n);
    std::vector<double> want(n);
    auto x = u;
    launch(ew::nc_fill_f32, D(2), D(256), x.data(), (unsigned long long)n, 3.5f);
    for (auto& w : want) w = 3.5;
    check("fill (grid-stride, 2 blocks)", x, want, 1e-30);
    x = u;
    launch(ew::nc_add_inplace_f32, D(4), D(256), x.data(), (const float*)y.data(), (unsigned long long)n);
    for (size_t i = 0; i < n; i++) want[i] = (double)u[i] + y[i];
    check("add_inplace", x, want, 1e-7);
    launch(ew::nc_relu2_forward_f32, D(1), D(256), (const float*)u.data(), x.data(), (unsigned long long)n);
    for (size_t i = 0; i < n; i++) want[i] = u[i] > 0 ? (double)u[i] * u[i] : 0;
    check("relu2 forward", x, want, 1e-7);
    x = y;
    launch(ew::nc_relu2_backward_f32, D(3), D(256), (const float*)u.data(), x.data(), (unsigned long long)n);
    for (size_t i = 0; i < n; i++) want[i] = y[i] * 2.0 * std::max(0.0, (double)u[i]);
    check("relu2 backward", x, want, 1e-7);
    x = randv(n, 30);
    auto x0 = x;
    launch(ew::nc_softcap_f32, D(4), D(256), x.data(), (unsigned long long)n, 15.0f);
    for (size_t i = 0; i < n; i++) want[i] = 15 * std::tanh(x0[i] / 15.0);
    check("softcap", x, want, 1e-6);
}

static void embedding() {
    int V = 11, d = 300, n = 17;
    auto wte = randv((size_t)V * d);
    std::vector<int> ids(n);
    for (int i = 0; i < n; i++) ids[i] = (i * 7) % V;
    std::vector<float> out((size_t)n * d);
    std::vector<double> want((size_t)n * d);
    launch(emb::nc_embedding_forward_f32, D(n), D(256), (const int*)ids.data(), (const float*)wte.data(), out.data(), n, d);
    for (int i = 0; i < n; i++)
        for (int c = 0; c < d; c++) want[(size_t)i * d + c] = wte[(size_t)ids[i] * d + c];
    check("embedding forward", out, want, 1e-30);
    auto dout = randv((size_t)n * d);
    auto dw = randv((size_t)V * d);
    std::vector<double> wdw(dw.begin(), dw.end());
    for (int i = 0; i < n; i++)
        for (int c = 0; c < d; c++) wdw[(size_t)ids[i] * d + c] += dout[(size_t)i * d + c];
    launch(emb::nc_embedding_backward_f32, D(n), D(256), (const int*)ids.data(), (const float*)dout.data(), dw.data(), n, d);
    check("embedding backward (repeated ids)", dw, wdw, 1e-6);
}

static void rmsnorm() {
    for (int dim : {8, 128, 1000}) {
        int rows = 5;
        float eps = 1e-6f;
        auto x = randv((size_t)rows * dim, 2);
        std::vector<float> y(x.size()), rstd(rows);
        launch(rms::nc_rmsnorm_forward_f32, D(rows), D(256), (const float*)x.data(), y.data(), rstd.data(), rows, dim, eps);
        std::vector<double> wy(x.size()), wr(rows);
        for (int r = 0; r < rows; r++) {
            double ss = 0;
            for (int c = 0; c < dim; c++) ss += (double)x[r * dim + c] * x[r * dim + c];
            wr[r] = 1 / std::sqrt(ss / dim + eps);
            for (int c = 0; c < dim; c++) wy[r * dim + c] = x[r * dim + c] * wr[r];
        }
        check(("rmsnorm forward y dim " + std::to_string(dim)).c_str(), y, wy, 1e-6);
        check("rmsnorm forward rstd", rstd, wr, 1e-6);
        auto dy = randv(x.size());
        for (int acc : {0, 1}) {
            auto dx = randv(x.size());
            std::vector<double> wdx(x.size());
            for (int r = 0; r < rows; r++) {
                double m = 0;
                for (int c = 0; c < dim; c++) m += (double)y[r * dim + c] * dy[r * dim + c];
                m /= dim;
                for (int c = 0; c < dim; c++) {
                    size_t i = r * dim + c;
                    wdx[i] = (acc ? dx[i] : 0.0) + rstd[r] * (dy[i] - y[i] * m);
                }
            }
            launch(rms::nc_rmsnorm_backward_f32, D(rows), D(256), (const float*)y.data(), (const float*)rstd.data(),
                   (const float*)dy.data(), dx.data(), rows, dim, acc);
            check(acc ? "rmsnorm backward accumulate" : "rmsnorm backward", dx, wdx, 1e-5);
        }
    }
}

static void rotary() {
    int B = 2, T = 5, H = 3, Dh = 8, half = Dh / 2, max_pos = 20, pos0 = 4;
    std::vector<float> table(2 * max_pos * half);
    for (int p = 0; p < max_pos; p++)
        for (int j = 0; j < half; j++) {
            double a = p / std::pow(10000.0, 2.0 * j / Dh);
            table[p * half + j] = std::cos(a);
            table[max_pos * half + p * half + j] = std::sin(a);
        }
    auto x0 = randv((size_t)B * T * H * Dh);
    for (float sign : {1.0f, -1.0f}) {
        auto x = x0;
        std::vector<double> want(x.size());
        for (int r = 0; r < B * T; r++)
            for (int h = 0; h < H; h++)
                for (int j = 0; j < half; j++) {
                    int p = pos0 + r % T;
                    double c = table[p * half + j], s = sign * table[max_pos * half + p * half + j];
                    size_t o = ((size_t)r * H + h) * Dh;
                    double a = x0[o + j], b = x0[o + j + half];
                    want[o + j] = a * c + b * s;
                    want[o + j + half] = -a * s + b * c;
                }
        launch(rot::nc_rotary_f32, D(1), D(32), x.data(), (const float*)table.data(), B * T, T, H, Dh, pos0, max_pos, sign);
        check(sign > 0 ? "rotary forward (grid-stride)" : "rotary backward", x, want, 1e-6);
    }
}

static void cross_entropy() {
    for (int vocab : {7, 300, 5000}) {
        int rows = 4;
        float cap = 15, scale = 0.25f;
        auto l0 = randv((size_t)rows * vocab, 6);
        std::vector<int> tg = {0, -1, vocab - 1, vocab / 2};
        l0[3 * vocab + vocab / 2] = 200;  // a confident, right prediction: loss near 0
        for (int want_grad : {0, 1}) {
            auto l = l0;
            std::vector<float> loss(rows);
            launch(ce::nc_softcap_cross_entropy_f32, D(rows), D(256), l.data(), (const int*)tg.data(), loss.data(), rows,
                   vocab, cap, scale, want_grad);
            std::vector<double> wl(rows), wg(l.size());
            for (int r = 0; r < rows; r++) {
                std::vector<double> z(vocab);
                double mx = -1e300, s = 0;
                for (int j = 0; j < vocab; j++) z[j] = cap * std::tanh(l0[r * vocab + j] / (double)cap), mx = std::max(mx, z[j]);
                for (int j = 0; j < vocab; j++) s += std::exp(z[j] - mx);
                int t = tg[r];
                wl[r] = t < 0 ? 0 : mx + std::log(s) - z[t];
                for (int j = 0; j < vocab; j++) {
                    double c = z[j] / cap;
                    wg[r * vocab + j] = !want_grad ? z[j]
                                        : t < 0    ? 0
                                                   : scale * (std::exp(z[j] - mx) / s - (j == t)) * (1 - c * c);
                }
            }
            std::string v = " vocab " + std::to_string(vocab);
            if (!want_grad) check(("ce loss" + v).c_str(), loss, wl, 1e-6);
            check((want_grad ? "ce grad" : "ce z") + v, l, wg, 1e-6);
        }
    }
}

// Bit for bit against the same float operations in the same order (the CPU backend's optim_ops.rs); NaN
// matches NaN.
static void check_bits(const char* what, const std::vector<float>& got, const std::vector<float>& want) {
    size_t bad = 0, at = 0;
    for (size_t i = 0; i < want.size(); i++) {
        bool same = std::isnan(got[i]) ? std::isnan(want[i]) : got[i] == want[i] && std::signbit(got[i]) == std::signbit(want[i]);
        if (!same && bad++ == 0) at = i;
    }
    if (bad) failures++;
    printf("%-50s %s %zu of %zu differ (first at %zu: got %.9g want %.9g)\n", what, bad ? "FAIL" : "ok  ", bad, want.size(),
           at, want.empty() ? 0.0 : got[at], want.empty() ? 0.0 : want[at]);
}

// The optimizer kernels: the elementwise ones bit for bit against float references in the CPU's order (and
// to 1e-6 of a double reference, so the float reference is itself the formula), over n not a multiple of
// the block with small grids (the grid-stride loop); the sum of squares per block against double sums.
static void optim() {
    size_t n = 1000;
    auto x = randv(n), y0 = randv(n);
    float a = 0.75f, b = -1.3f;
    auto y = y0;
    std::vector<float> wf(n);
    std::vector<double> wd(n);
    launch(opt::nc_axpby_f32, D(2), D(256), (const float*)x.data(), y.data(), (unsigned long long)n, a, b);
    for (size_t i = 0; i < n; i++) wf[i] = a * x[i] + b * y0[i], wd[i] = (double)a * x[i] + (double)b * y0[i];
    check_bits("axpby (grid-stride, 2 blocks)", y, wf);
    check("  axpby vs double", y, wd, 1e-6);
    for (float zero : {0.0f, -0.0f}) {
        y.assign(n, NAN);
        launch(opt::nc_axpby_f32, D(3), D(256), (const float*)x.data(), y.data(), (unsigned long long)n, a, zero);
        for (size_t i = 0; i < n; i++) wf[i] = a * x[i];
        check_bits(zero == 0.0f && !std::signbit(zero) ? "axpby b = 0 (NaN y does not survive)" : "axpby b = -0 (NaN y)", y, wf);
    }
    y = y0;
    launch(opt::nc_scale_f32, D(1), D(256), y.data(), (unsigned long long)n, -0.37f);
    for (size_t i = 0; i < n; i++) wf[i] = y0[i] * -0.37f;
    check_bits("scale", y, wf);

    // Sum of squares: every block's partial against the double sum of exactly the elements it visits
    // (block b takes i with (i / blockDim) % grid == b), several block sizes, grids and a tail; the partials
    // past the grid stay untouched.
    for (auto [len, grid, threads] : {std::tuple<size_t, unsigned, unsigned>{5000, 3, 256}, {5000, 20, 256},
                                      {1000, 4, 256}, {777, 2, 96}, {31, 1, 64}, {0, 1, 256}}) {
        auto v = randv(len, 3);
        std::vector<double> part(grid + 2, -1.0), want(grid + 2, -1.0);
        for (unsigned g = 0; g < grid; g++) want[g] = 0;
        for (size_t i = 0; i < len; i++) want[(i / threads) % grid] += (double)v[i] * v[i];
        launch(opt::nc_sum_squares_f64, D(grid), D(threads), (const float*)v.data(), (unsigned long long)len, part.data());
        double worst = 0, total = 0, want_total = 0;
        for (unsigned g = 0; g < grid + 2; g++) {
            worst = std::max(worst, std::fabs(part[g] - want[g]) / std::max(1.0, std::fabs(want[g])));
            if (g < grid) total += part[g], want_total += want[g];
        }
        bool ok = worst <= 1e-13;
        if (!ok) failures++;
        printf("sum_squares n %-5zu grid %-2u block %-3u                 %s worst rel err %.3g (total %.17g want %.17g)\n",
               len, grid, threads, ok ? "ok  " : "FAIL", worst, total, want_total);
    }

    // Muon's momentum, mu 0.95 and an early-warmup 0.85.
    for (float mu : {0.95f, 0.85f}) {
        auto g = randv(n), buf0 = randv(n, 0.5f);
        auto buf = buf0;
        std::vector<float> upd(n, NAN), wb(n), wu(n);
        std::vector<double> wbd(n), wud(n);
        launch(opt::nc_muon_momentum_f32, D(3), D(128), (const float*)g.data(), buf.data(), upd.data(), (unsigned long long)n, mu);
        for (size_t i = 0; i < n; i++) {
            float bb = buf0[i] + (1.0f - mu) * (g[i] - buf0[i]);
            wb[i] = bb, wu[i] = g[i] + mu * (bb - g[i]);
            double bd = buf0[i] + (1.0 - (double)mu) * ((double)g[i] - buf0[i]);
            wbd[i] = bd, wud[i] = g[i] + (double)mu * (bd - g[i]);
        }
        check_bits(("muon momentum buf mu " + std::to_string(mu)).c_str(), buf, wb);
        check_bits("muon momentum update", upd, wu);
        check("  muon momentum vs double", upd, wud, 1e-6);
        check("  muon momentum buf vs double", buf, wbd, 1e-6);
    }

    // AdamW at step 3: lr 0.004, wd 0.01, betas (0.8, 0.95), eps 1e-10; host scalars as optim_ops computes.
    {
        double lr = 0.004, wdc = 0.01;
        int t = 3;
        float beta1 = 0.8f, beta2 = 0.95f, eps = 1e-10f;
        float decay = (float)(1.0 - lr * wdc);
        float step = (float)(lr / (1.0 - std::pow((double)beta1, t)));
        float inv_bc2 = (float)(1.0 / (1.0 - std::pow((double)beta2, t)));
        auto p0 = randv(n), g = randv(n, 0.1f), m0 = randv(n, 0.05f), v0 = randv(n, 0.01f);
        for (auto& q : v0) q = q * q;
        g[5] = 0, m0[5] = 0, v0[5] = 0;  // a parameter with no gradient yet: 0 / (0 + eps)
        auto p = p0, m = m0, v = v0;
        launch(opt::nc_adamw_f32, D(2), D(256), p.data(), (const float*)g.data(), m.data(), v.data(), (unsigned long long)n, beta1,
               beta2, eps, decay, step, inv_bc2);
        std::vector<float> wp(n), wm(n), wv(n);
        std::vector<double> wpd(n);
        for (size_t i = 0; i < n; i++) {
            float mi = m0[i] + (1.0f - beta1) * (g[i] - m0[i]);
            float vi = v0[i] + (1.0f - beta2) * (g[i] * g[i] - v0[i]);
            wm[i] = mi, wv[i] = vi;
            float denom = std::sqrt(vi * inv_bc2) + eps;
            wp[i] = p0[i] * decay - step * mi / denom;
            double md = m0[i] + (1.0 - beta1) * ((double)g[i] - m0[i]);
            double vd = v0[i] + (1.0 - beta2) * ((double)g[i] * g[i] - v0[i]);
            wpd[i] = p0[i] * (1.0 - lr * wdc) - lr / (1.0 - std::pow((double)beta1, t)) * md /
                     (std::sqrt(vd / (1.0 - std::pow((double)beta2, t))) + eps);
        }
        check_bits("adamw p", p, wp);
        check_bits("adamw m", m, wm);
        check_bits("adamw v", v, wv);
        check("  adamw p vs double", p, wpd, 1e-6);
    }
}

// Double-precision naive attention. Not instrumented for the race checks (EMU_HOST_ONLY: the central
// differences below call it thousands of times), hence raw pointers: std::vector's operator[] would not be
// inlined into it.
struct Shape { int B, Tq, Tk, H, Hkv, Dh, pos0; };
EMU_HOST_ONLY static void ref_forward(const Shape& s, const std::vector<float>& qv, const std::vector<float>& kv,
                                      const std::vector<float>& vv, std::vector<double>& outv, std::vector<double>& lsev) {
    int g = s.H / s.Hkv;
    double scale = 1 / std::sqrt((double)s.Dh);
    outv.assign((size_t)s.B * s.Tq * s.H * s.Dh, 0);
    lsev.assign((size_t)s.B * s.H * s.Tq, 0);
    const float *q = qv.data(), *k = kv.data(), *v = vv.data();
    double *out = outv.data(), *lse = lsev.data();
    std::vector<double> scv((size_t)s.pos0 + s.Tq);
    double* sc = scv.data();
    for (int b = 0; b < s.B; b++)
        for (int h = 0; h < s.H; h++)
            for (int i = 0; i < s.Tq; i++) {
                int kh = h / g, n = s.pos0 + i + 1;
                double mx = -1e300;
                for (int j = 0; j < n; j++) {
                    double d = 0;
                    for (int c = 0; c < s.Dh; c++)
                        d += (double)q[(((size_t)b * s.Tq + i) * s.H + h) * s.Dh + c] * k[(((size_t)b * s.Tk + j) * s.Hkv + kh) * s.Dh + c];
                    sc[j] = d * scale;
                    mx = sc[j] > mx ? sc[j] : mx;
                }
                double sum = 0;
                for (int j = 0; j < n; j++) sum += std::exp(sc[j] - mx);
                lse[((size_t)b * s.H + h) * s.Tq + i] = mx + std::log(sum);
                for (int j = 0; j < n; j++) {
                    double p = std::exp(sc[j] - mx) / sum;
                    for (int c = 0; c < s.Dh; c++)
                        out[(((size_t)b * s.Tq + i) * s.H + h) * s.Dh + c] += p * v[(((size_t)b * s.Tk + j) * s.Hkv + kh) * s.Dh + c];
                }
            }
}

static void attention(Shape s) {
    float scale = 1 / std::sqrt((float)s.Dh);
    auto q = randv((size_t)s.B * s.Tq * s.H * s.Dh), k = randv((size_t)s.B * s.Tk * s.Hkv * s.Dh),
         v = randv((size_t)s.B * s.Tk * s.Hkv * s.Dh);
    std::vector<double> wo, wl;
    ref_forward(s, q, k, v, wo, wl);
    std::vector<float> out(wo.size(), 123.f), lse(wl.size(), 123.f);
    launch(att::nc_attention_forward_f32, D((s.Tq + 15) / 16, s.H, s.B), D(128), (const float*)q.data(), (const float*)k.data(),
           (const float*)v.data(), out.data(), lse.data(), s.B, s.Tq, s.Tk, s.H, s.Hkv, s.Dh, s.pos0, scale);
    char name[200];
    snprintf(name, sizeof name, "attn fwd B%d Tq%d Tk%d H%d Hkv%d D%d pos0 %d", s.B, s.Tq, s.Tk, s.H, s.Hkv, s.Dh, s.pos0);
    check(name, out, wo, 1e-5);
    check("  lse", lse, wl, 1e-5);
    if (s.Tq != s.Tk) return;
    // Backward, against central differences of L = sum(out * w) in double through ref_forward.
    int T = s.Tq;
    auto dout = randv(out.size());
    std::vector<float> delta(wl.size(), 7.f), dq(q.size(), 7.f), dk(k.size(), 7.f), dv(v.size(), 7.f);
    launch(att::nc_attention_backward_delta_f32, D((s.B * T * s.H + 7) / 8), D(256), (const float*)out.data(),
           (const float*)dout.data(), delta.data(), s.B, T, s.H, s.Dh);
    std::vector<double> wd(delta.size());
    for (int b = 0; b < s.B; b++)
        for (int i = 0; i < T; i++)
            for (int h = 0; h < s.H; h++) {
                double a = 0;
                for (int c = 0; c < s.Dh; c++) {
                    size_t o = (((size_t)b * T + i) * s.H + h) * s.Dh + c;
                    a += (double)out[o] * dout[o];
                }
                wd[((size_t)b * s.H + h) * T + i] = a;
            }
    check("  delta", delta, wd, 1e-5);
    launch(att::nc_attention_backward_dkdv_f32, D((T + 31) / 32, s.Hkv, s.B), D(128), (const float*)q.data(), (const float*)k.data(),
           (const float*)v.data(), (const float*)lse.data(), (const float*)delta.data(), (const float*)dout.data(), dk.data(),
           dv.data(), s.B, T, s.H, s.Hkv, s.Dh, scale);
    launch(att::nc_attention_backward_dq_f32, D((T + 7) / 8, s.H, s.B), D(128), (const float*)q.data(), (const float*)k.data(),
           (const float*)v.data(), (const float*)lse.data(), (const float*)delta.data(), (const float*)dout.data(), dq.data(), s.B,
           T, s.H, s.Hkv, s.Dh, scale);
    auto numgrad = [&](std::vector<float>& x) {
        std::vector<double> gr(x.size());
        for (size_t i = 0; i < x.size(); i++) {
            float x0 = x[i];
            double eps = 1e-3;
            double f[2];
            for (int sgn = 0; sgn < 2; sgn++) {
                x[i] = x0 + (sgn ? -eps : eps);
                std::vector<double> o, l;
                ref_forward(s, q, k, v, o, l);
                double a = 0;
                for (size_t j = 0; j < o.size(); j++) a += o[j] * dout[j];
                f[sgn] = a;
            }
            x[i] = x0;
            gr[i] = (f[0] - f[1]) / (2 * eps);
        }
        return gr;
    };
    check("  dq", dq, numgrad(q), 1e-3);
    check("  dk", dk, numgrad(k), 1e-3);
    check("  dv", dv, numgrad(v), 1e-3);
}

int main(int argc, char** argv) {
    elementwise();
    embedding();
    rmsnorm();
    rotary();
    cross_entropy();
    optim();
    attention({2, 19, 19, 4, 2, 8, 0});     // GQA, partial tiles
    attention({1, 40, 40, 2, 1, 16, 0});    // two key tiles, group 2
    attention({1, 3, 50, 2, 2, 12, 47});    // KV-cache decode chunk, D not a multiple of 8
    attention({2, 1, 37, 3, 1, 16, 36});    // one token decode
    attention({1, 70, 70, 2, 2, 6, 0});     // D = 6 (padded to 8), 3 key tiles
    attention({1, 33, 33, 1, 1, 128, 0});   // full head dim
    attention({1, 5, 5, 2, 2, 5, 0});       // odd D
    failures += emu_race_summary();  // run.sh runs every program in race mode
    printf("%d failures\n", failures);
    return failures != 0;
}
