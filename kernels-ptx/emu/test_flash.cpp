// Runs the tensor-core flash attention kernels (../cuda/flash_attention.cu, compiled here with NC_EMU so the
// mma / ldmatrix / cp.async calls go to emu_tc.h) on the CPU and compares them with attention in double
// precision on the same bf16-rounded inputs, and with its exact derivatives.
//
// Tolerances, per element, from the roundings the kernels make (u = 2^-8, bf16's unit roundoff):
//   out  : u |out| (the bf16 store) + u sum_j p_j |v_j| (P rounded to bf16 before P V); f32 accumulation and
//          the exp2 in f32 add ~1e-6 relative, covered by a 10% margin and 1e-6 absolute.
//   lse  : 1e-5 (1 + |lse|): f32 sums and logs only.
//   delta: 1e-5 sum_c |dout_c out_c| (f32 sum of bf16 products; checked against the kernel's own bf16 out).
//   dv   : u |dv| + u sum_i p_ij |dout_i|  (P rounded for P^T dO).
//   dq,dk: u |want| + scale sum_j u p_ij (|dp_ij| + 2.5 A_i) |k_j| (resp. sum_i ... |q_i|), with
//          A_i = sum_c |dout_ic| (|out_ic| + sum_j p_ij |v_jc|): dS = P (dP - D) is rounded to bf16 (u p (|dP| + |D|),
//          |D| <= A), and D is formed from the kernel's bf16 out, whose error (the out bound above) moves D by up
//          to 1.1 u A_i, which dS carries times p_ij.
// The error a kernel bug makes (a wrong fragment index, a missing mask or rescale) is O(1) relative, far above
// these bounds; the observed errors sit well under them (the table prints worst error / bound).
#include "emu.h"
#include "emu_tc.h"
#define NC_EMU 1
namespace fa {
#include "flash_attention.cu"
}
#include <random>
#include <string>

static std::mt19937 rng(1234);
static int failures = 0;
static const double U = 1.0 / 256;  // bf16 unit roundoff

using bf16 = __nv_bfloat16;
struct Tensor {
    std::vector<bf16> bits;
    std::vector<double> val;  // the exact values of bits
};
static Tensor rand_bf16(size_t n, float sd) {
    std::normal_distribution<float> d(0, sd);
    Tensor t;
    t.bits.resize(n);
    t.val.resize(n);
    for (size_t i = 0; i < n; i++) {
        t.bits[i] = __float2bfloat16_rn(d(rng));
        t.val[i] = __bfloat162float(t.bits[i]);
    }
    return t;
}
static std::vector<double> widen(const std::vector<bf16>& v) {
    std::vector<double> r(v.size());
    for (size_t i = 0; i < v.size(); i++) r[i] = __bfloat162float(v[i]);
    return r;
}

// worst |got - want| / bound over the elements; fails at >= 1 (or on a NaN).
static void check(const std::string& what, const std::vector<double>& got, const std::vector<double>& want,
                  const std::vector<double>& bound) {
    double worst = 0;
    size_t at = 0;
    for (size_t i = 0; i < want.size(); i++) {
        double e = std::fabs(got[i] - want[i]) / bound[i];
        if (!(e <= worst)) worst = e, at = i;
    }
    bool ok = worst < 1.0;
    if (!ok) failures++;
    printf("%-58s %s worst err/bound %.3f at %zu (got %.6g want %.6g)\n", what.c_str(), ok ? "ok  " : "FAIL", worst, at,
           want.empty() ? 0.0 : got[at], want.empty() ? 0.0 : want[at]);
}

struct Shape {
    int B, Tq, Tk, H, Hkv, D, pos0;
};
static size_t qi(const Shape& s, int b, int i, int h, int c) { return (((size_t)b * s.Tq + i) * s.H + h) * s.D + c; }
static size_t ki(const Shape& s, int b, int j, int h, int c) { return (((size_t)b * s.Tk + j) * s.Hkv + h) * s.D + c; }
static size_t li(const Shape& s, int b, int h, int i) { return ((size_t)b * s.H + h) * s.Tq + i; }

// Double-precision attention: out, lse, and for each (row, column) sum_j p_j |v_j| (the P-rounding scale).
struct Ref {
    std::vector<double> out, lse, pv_abs;
};
EMU_HOST_ONLY static Ref reference(const Shape& s, const Tensor& q, const Tensor& k, const Tensor& v) {
    Ref r;
    r.out.assign((size_t)s.B * s.Tq * s.H * s.D, 0);
    r.pv_abs.assign(r.out.size(), 0);
    r.lse.assign((size_t)s.B * s.H * s.Tq, 0);
    double scale = 1 / std::sqrt((double)s.D);
    int group = s.H / s.Hkv;
    for (int b = 0; b < s.B; b++)
        for (int h = 0; h < s.H; h++)
            for (int i = 0; i < s.Tq; i++) {
                int kh = h / group, n = s.pos0 + i + 1;
                std::vector<double> sc(n);
                double mx = -1e300, sum = 0;
                for (int j = 0; j < n; j++) {
                    double d = 0;
                    for (int c = 0; c < s.D; c++) d += q.val[qi(s, b, i, h, c)] * k.val[ki(s, b, j, kh, c)];
                    sc[j] = d * scale;
                    mx = std::max(mx, sc[j]);
                }
                for (int j = 0; j < n; j++) sum += std::exp(sc[j] - mx);
                r.lse[li(s, b, h, i)] = mx + std::log(sum);
                for (int j = 0; j < n; j++) {
                    double p = std::exp(sc[j] - mx) / sum;
                    for (int c = 0; c < s.D; c++) {
                        r.out[qi(s, b, i, h, c)] += p * v.val[ki(s, b, j, kh, c)];
                        r.pv_abs[qi(s, b, i, h, c)] += p * std::fabs(v.val[ki(s, b, j, kh, c)]);
                    }
                }
            }
    return r;
}

static std::string name(const char* what, const Shape& s) {
    char buf[200];
    snprintf(buf, sizeof buf, "%s B%d Tq%d Tk%d H%d Hkv%d D%d pos0 %d", what, s.B, s.Tq, s.Tk, s.H, s.Hkv, s.D, s.pos0);
    return buf;
}

static void forward(const Shape& s, const bf16* q, const bf16* k, const bf16* v, bf16* out, float* lse) {
    float scale = 1 / std::sqrt((float)s.D);
    dim3 grid{(unsigned)((s.Tq + FWD_BQ - 1) / FWD_BQ), (unsigned)s.H, (unsigned)s.B};
    auto kernel = s.D == 128 ? fa::nc_flash_forward_d128_bf16 : fa::nc_flash_forward_d64_bf16;
    launch(kernel, grid, dim3{FLASH_THREADS, 1, 1}, q, k, v, out, lse, s.B, s.Tq, s.Tk, s.H, s.Hkv, s.pos0, scale);
}

// The backward (training shape) on the forward's own bf16 out and f32 lse, against the exact derivatives of
// the double-precision attention: P = softmax, dP = dout v^T, D = rowsum(P dP), dS = P (dP - D),
// dq = scale dS k, dk = scale dS^T q, dv = P^T dout. (test.cpp checks these formulas against central
// differences for the f32 kernels; here they are the reference.)
static void backward(const Shape& s, const Tensor& q, const Tensor& k, const Tensor& v, const Ref& r,
                     const std::vector<bf16>& out, const std::vector<float>& lse) {
    int T = s.Tq, group = s.H / s.Hkv;
    double scale = 1 / std::sqrt((double)s.D);
    Tensor dout = rand_bf16(q.val.size(), 1.0f);
    std::vector<float> delta(lse.size(), 7.0f);
    std::vector<bf16> dq(q.val.size(), __float2bfloat16_rn(7.0f)), dk(k.val.size(), __float2bfloat16_rn(7.0f)),
        dv(k.val.size(), __float2bfloat16_rn(7.0f));
    unsigned tiles = (unsigned)((T + 63) / 64);
    bool d128 = s.D == 128;
    launch(d128 ? fa::nc_flash_backward_dq_d128_bf16 : fa::nc_flash_backward_dq_d64_bf16, dim3{tiles, (unsigned)s.H, (unsigned)s.B},
           dim3{FLASH_THREADS, 1, 1}, (const bf16*)q.bits.data(), (const bf16*)k.bits.data(), (const bf16*)v.bits.data(),
           (const bf16*)out.data(), (const bf16*)dout.bits.data(), (const float*)lse.data(), delta.data(), dq.data(), s.B, T, s.H,
           s.Hkv, (float)scale);
    launch(d128 ? fa::nc_flash_backward_dkdv_d128_bf16 : fa::nc_flash_backward_dkdv_d64_bf16,
           dim3{tiles, (unsigned)s.Hkv, (unsigned)s.B}, dim3{FLASH_THREADS, 1, 1}, (const bf16*)q.bits.data(),
           (const bf16*)k.bits.data(), (const bf16*)v.bits.data(), (const bf16*)dout.bits.data(), (const float*)lse.data(),
           (const float*)delta.data(), dk.data(), dv.data(), s.B, T, s.H, s.Hkv, (float)scale);

    std::vector<double> wq(dq.size(), 0), wk(dk.size(), 0), wv(dv.size(), 0), bq(dq.size(), 0), bk(dk.size(), 0),
        bv(dv.size(), 0), wdelta(delta.size()), bdelta(delta.size());
    std::vector<double> out_val = widen(out);
    for (int b = 0; b < s.B; b++)
        for (int h = 0; h < s.H; h++)
            for (int i = 0; i < T; i++) {
                int kh = h / group, n = i + 1;
                double lse_i = r.lse[li(s, b, h, i)], D = 0, A = 0, dk_d = 0, dk_b = 0;
                for (int c = 0; c < s.D; c++) {
                    size_t o = qi(s, b, i, h, c);
                    dk_d += dout.val[o] * out_val[o];
                    dk_b += std::fabs(dout.val[o] * out_val[o]);
                    A += std::fabs(dout.val[o]) * (std::fabs(r.out[o]) + r.pv_abs[o]);
                }
                wdelta[li(s, b, h, i)] = dk_d;
                bdelta[li(s, b, h, i)] = 1e-5 * dk_b + 1e-7;
                std::vector<double> p(n), dp(n);
                for (int j = 0; j < n; j++) {
                    double sc = 0, d = 0;
                    for (int c = 0; c < s.D; c++) {
                        sc += q.val[qi(s, b, i, h, c)] * k.val[ki(s, b, j, kh, c)];
                        d += dout.val[qi(s, b, i, h, c)] * v.val[ki(s, b, j, kh, c)];
                    }
                    p[j] = std::exp(sc * scale - lse_i);
                    dp[j] = d;
                    D += p[j] * d;
                }
                for (int j = 0; j < n; j++) {
                    double ds = p[j] * (dp[j] - D);
                    double e = U * p[j] * (std::fabs(dp[j]) + 2.5 * A);  // the error dS may carry
                    for (int c = 0; c < s.D; c++) {
                        size_t iq = qi(s, b, i, h, c), ik = ki(s, b, j, kh, c);
                        wq[iq] += scale * ds * k.val[ik];
                        wk[ik] += scale * ds * q.val[iq];
                        wv[ik] += p[j] * dout.val[iq];
                        bq[iq] += scale * e * std::fabs(k.val[ik]);
                        bk[ik] += scale * e * std::fabs(q.val[iq]);
                        bv[ik] += U * p[j] * std::fabs(dout.val[iq]);
                    }
                }
            }
    auto finish = [](std::vector<double>& bound, const std::vector<double>& want) {
        for (size_t i = 0; i < bound.size(); i++) bound[i] = 1.1 * (U * std::fabs(want[i]) + bound[i]) + 1e-6;
    };
    finish(bq, wq);
    finish(bk, wk);
    finish(bv, wv);
    check("  flash delta", std::vector<double>(delta.begin(), delta.end()), wdelta, bdelta);
    check("  flash dq", widen(dq), wq, bq);
    check("  flash dk", widen(dk), wk, bk);
    check("  flash dv", widen(dv), wv, bv);
}

static void attention(const Shape& s) {
    // Scores spread N(0, 2^2): peaked enough that a masked or misplaced key shows.
    Tensor q = rand_bf16((size_t)s.B * s.Tq * s.H * s.D, 2.0f), k = rand_bf16((size_t)s.B * s.Tk * s.Hkv * s.D, 1.0f),
           v = rand_bf16((size_t)s.B * s.Tk * s.Hkv * s.D, 1.0f);
    Ref r = reference(s, q, k, v);
    std::vector<bf16> out(r.out.size(), __float2bfloat16_rn(123.0f));
    std::vector<float> lse(r.lse.size(), 123.0f);
    forward(s, q.bits.data(), k.bits.data(), v.bits.data(), out.data(), lse.data());
    std::vector<double> bound(r.out.size()), lse_got(lse.begin(), lse.end()), lse_bound(r.lse.size());
    for (size_t i = 0; i < bound.size(); i++) bound[i] = 1.1 * U * (std::fabs(r.out[i]) + r.pv_abs[i]) + 1e-6;
    for (size_t i = 0; i < lse_bound.size(); i++) lse_bound[i] = 1e-5 * (1 + std::fabs(r.lse[i]));
    check(name("flash fwd", s), widen(out), r.out, bound);
    check("  flash lse", lse_got, r.lse, lse_bound);
    if (s.Tq == s.Tk && s.pos0 == 0) backward(s, q, k, v, r, out, lse);
}

int main(int argc, char** argv) {
    // Shapes: T not a multiple of any tile (64-row query tiles, 64- and 32-key tiles, 16-row steps), one
    // and several kv heads, head_dim 64 and 128, decoding (q_pos0 > 0). The emulation pays an OS-thread
    // barrier per warp instruction, so the shapes are as small as covers the cases.
    attention({1, 70, 70, 2, 1, 128, 0});    // GQA 2:1, two query tiles (6 rows in the second), D 128
    attention({2, 45, 45, 3, 1, 64, 0});     // GQA 3:1, batch 2, D 64
    attention({1, 67, 67, 2, 2, 64, 0});     // no GQA, 3 rows past the first tile
    attention({1, 1, 70, 4, 2, 128, 69});    // KV-cache decode: one row at position 69
    attention({1, 5, 133, 2, 1, 64, 128});   // decode chunk: 5 rows from position 128, keys in 3 tiles
    attention({1, 64, 130, 1, 1, 128, 66});  // 64 rows from 66: the diagonal crosses two key tiles
    failures += emu_race_summary();  // run.sh runs every program in race mode
    printf("%d failures\n", failures);
    return failures != 0;
}
