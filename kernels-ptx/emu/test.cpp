// Runs every kernel of ../cuda on the CPU through emu.h and compares with double-precision references (the
// attention gradients against central differences of the reference forward). Not a substitute for a GPU run:
// it checks indexing, masking, tiling and barrier placement, not timing, memory ordering or the device math
// library. Build and run with ./run.sh (g++ >= 12, C++20).
#include "emu.h"
#include <random>
#include <string>
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

// Double-precision naive attention.
struct Shape { int B, Tq, Tk, H, Hkv, Dh, pos0; };
static void ref_forward(const Shape& s, const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
                        std::vector<double>& out, std::vector<double>& lse) {
    int g = s.H / s.Hkv;
    double scale = 1 / std::sqrt((double)s.Dh);
    out.assign((size_t)s.B * s.Tq * s.H * s.Dh, 0);
    lse.assign((size_t)s.B * s.H * s.Tq, 0);
    for (int b = 0; b < s.B; b++)
        for (int h = 0; h < s.H; h++)
            for (int i = 0; i < s.Tq; i++) {
                int kh = h / g, n = s.pos0 + i + 1;
                std::vector<double> sc(n);
                double mx = -1e300;
                for (int j = 0; j < n; j++) {
                    double d = 0;
                    for (int c = 0; c < s.Dh; c++)
                        d += (double)q[(((size_t)b * s.Tq + i) * s.H + h) * s.Dh + c] * k[(((size_t)b * s.Tk + j) * s.Hkv + kh) * s.Dh + c];
                    sc[j] = d * scale;
                    mx = std::max(mx, sc[j]);
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
    attention({2, 19, 19, 4, 2, 8, 0});     // GQA, partial tiles
    attention({1, 40, 40, 2, 1, 16, 0});    // two key tiles, group 2
    attention({1, 3, 50, 2, 2, 12, 47});    // KV-cache decode chunk, D not a multiple of 8
    attention({2, 1, 37, 3, 1, 16, 36});    // one token decode
    attention({1, 70, 70, 2, 2, 6, 0});     // D = 6 (padded to 8), 3 key tiles
    attention({1, 33, 33, 1, 1, 128, 0});   // full head dim
    attention({1, 5, 5, 2, 2, 5, 0});       // odd D
    printf("%d failures\n", failures);
    return failures != 0;
}
