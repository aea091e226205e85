//! Every op of the CPU backend against an independent f64 implementation (tests/common): forwards compared
//! directly, backwards against central finite differences of L = sum(cot * f(x)) in f64, over random
//! shapes and values (proptest). Attention shapes go past one 64-row tile so the tiling is exercised.

mod common;

use common::TestRng;
use nc_core::backend::cpu::{CpuBackend, CpuBuf, CpuIds};
use nc_core::backend::{AttnShape, Backend, Gemm, Heads, Rotation, View, ViewMut};
use nc_core::config::RMSNORM_EPS;
use proptest::prelude::*;

fn buf(v: &[f32]) -> CpuBuf {
    CpuBuf::f32(v.to_vec())
}
fn rand_vec(rng: &mut TestRng, n: usize, scale: f64) -> Vec<f32> {
    (0..n).map(|_| (rng.normal() * scale) as f32).collect()
}
fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}
fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Compare an f32 forward output with the f64 reference, relative to the output's largest entry.
fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (*g as f64 - w).abs() <= tol * scale,
            "{what}[{i}]: {g} vs reference {w} (scale {scale})"
        );
    }
}

/// The backward's `grad` (f32) of L(x) = cot . f(x) against central differences of the f64 forward:
/// along two random directions and at up to 12 single coordinates. `floor` is an absolute tolerance per
/// unit of direction norm, for ops whose grads can be tiny differences of O(1) f32 values (softmax).
fn check_grad_floor(
    what: &str,
    f: impl Fn(&[f64]) -> Vec<f64>,
    x: &[f32],
    cot: &[f64],
    grad: &[f32],
    rng: &mut TestRng,
    floor: f64,
) {
    let x64 = to64(x);
    let loss = |x: &[f64]| dot(cot, &f(x));
    let eps = 1e-5;
    let gscale = grad.iter().fold(0.0f64, |m, v| m.max((*v as f64).abs()));
    let fd_along = |u: &[f64]| {
        let p: Vec<f64> = x64.iter().zip(u).map(|(a, b)| a + eps * b).collect();
        let m: Vec<f64> = x64.iter().zip(u).map(|(a, b)| a - eps * b).collect();
        (loss(&p) - loss(&m)) / (2.0 * eps)
    };
    for _ in 0..2 {
        let u: Vec<f64> = (0..x.len()).map(|_| rng.normal()).collect();
        let analytic = dot(&to64(grad), &u);
        let fd = fd_along(&u);
        let unorm = dot(&u, &u).sqrt();
        assert!(
            (analytic - fd).abs() <= 1e-4 * fd.abs() + (1e-5 * gscale + floor) * unorm + 1e-9,
            "{what}: directional derivative {analytic:e} vs finite difference {fd:e}"
        );
    }
    for _ in 0..12.min(x.len()) {
        let i = rng.below(x.len());
        let mut u = vec![0.0; x.len()];
        u[i] = 1.0;
        let fd = fd_along(&u);
        let g = grad[i] as f64;
        assert!(
            (g - fd).abs() <= 1e-4 * fd.abs() + 1e-5 * gscale + floor + 1e-9,
            "{what}: d/dx[{i}] = {g:e}, finite difference {fd:e}"
        );
    }
}

fn check_grad(what: &str, f: impl Fn(&[f64]) -> Vec<f64>, x: &[f32], cot: &[f64], grad: &[f32], rng: &mut TestRng) {
    check_grad_floor(what, f, x, cot, grad, rng, 0.0)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn matmul_all_transposes(m in 1usize..40, n in 1usize..40, k in 1usize..70, a_t: bool, b_t: bool, acc: bool, seed: u64) {
        let be = CpuBackend::new();
        let mut rng = TestRng(seed);
        let a = rand_vec(&mut rng, m * k, 1.0);
        let b = rand_vec(&mut rng, k * n, 1.0);
        let c0 = rand_vec(&mut rng, m * n, 1.0);
        let (ab, bb, mut cb) = (buf(&a), buf(&b), buf(&c0));
        let shape = Gemm::nn(m, n, k).transposed(a_t, b_t).accumulating(acc);
        be.matmul(shape, View::all(&ab), View::all(&bb), ViewMut::all(&mut cb));
        let mut want = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = if acc { c0[i * n + j] as f64 } else { 0.0 };
                for p in 0..k {
                    let av = if a_t { a[p * m + i] } else { a[i * k + p] };
                    let bv = if b_t { b[j * k + p] } else { b[p * n + j] };
                    s += av as f64 * bv as f64;
                }
                want[i * n + j] = s;
            }
        }
        assert_close("matmul", &cb.0, &want, 1e-5);
    }

    #[test]
    fn rmsnorm_forward_backward(rows in 1usize..6, dim in 2usize..80, acc: bool, seed: u64) {
        let be = CpuBackend::new();
        let mut rng = TestRng(seed);
        let x = rand_vec(&mut rng, rows * dim, 2.0);
        let (xb, mut yb, mut rb) = (buf(&x), be.alloc(rows * dim), be.alloc(rows));
        be.rmsnorm_forward(View::all(&xb), rows, dim, RMSNORM_EPS, ViewMut::all(&mut yb), ViewMut::all(&mut rb));
        assert_close("rmsnorm", &yb.0, &common::rmsnorm(&to64(&x), dim), 1e-6);
        let cot = rand_vec(&mut rng, rows * dim, 1.0);
        let dx0 = rand_vec(&mut rng, rows * dim, 1.0);
        let mut dxb = buf(&dx0);
        be.rmsnorm_backward(View::all(&yb), View::all(&rb), View::all(&buf(&cot)), rows, dim, ViewMut::all(&mut dxb), acc);
        // With accumulate the op adds into what was there: take that back out before checking.
        let grad: Vec<f32> = if acc { dxb.0.iter().zip(&dx0).map(|(a, b)| a - b).collect() } else { dxb.0.clone() };
        check_grad("rmsnorm", |x| common::rmsnorm(x, dim), &x, &to64(&cot), &grad, &mut rng);
    }

    #[test]
    fn rotary_forward_backward(batch in 1usize..3, t in 1usize..10, heads in 1usize..4, half in 1usize..17, pos0 in 0usize..6, seed: u64) {
        let be = CpuBackend::new();
        let hd = 2 * half;
        let mut rng = TestRng(seed);
        let n = batch * t * heads * hd;
        let x = rand_vec(&mut rng, n, 1.0);
        let table = buf(&nc_core::model::init::rotary_table(pos0 + t, hd));
        let mut xb = buf(&x);
        let shape = Heads::new(batch, t, heads, hd).from_position(pos0);
        be.rotary(ViewMut::all(&mut xb), shape, View::all(&table), Rotation::Forward);
        assert_close("rotary", &xb.0, &common::rotary(&to64(&x), t, heads, hd, pos0), 1e-6);
        let cot = rand_vec(&mut rng, n, 1.0);
        let mut gb = buf(&cot);
        be.rotary(ViewMut::all(&mut gb), shape, View::all(&table), Rotation::Inverse);
        check_grad("rotary", |x| common::rotary(x, t, heads, hd, pos0), &x, &to64(&cot), &gb.0, &mut rng);
    }

    #[test]
    fn relu2_forward_backward(n in 1usize..300, seed: u64) {
        let be = CpuBackend::new();
        let mut rng = TestRng(seed);
        let u = rand_vec(&mut rng, n, 1.0);
        let mut hb = be.alloc(n);
        be.relu2_forward(View::all(&buf(&u)), ViewMut::all(&mut hb));
        let f = |x: &[f64]| x.iter().map(|&v| v.max(0.0).powi(2)).collect::<Vec<f64>>();
        assert_close("relu2", &hb.0, &f(&to64(&u)), 1e-6);
        let cot = rand_vec(&mut rng, n, 1.0);
        let mut gb = buf(&cot);
        be.relu2_backward(View::all(&buf(&u)), ViewMut::all(&mut gb));
        check_grad("relu2", f, &u, &to64(&cot), &gb.0, &mut rng);
    }

    #[test]
    fn softcap_cross_entropy_forward_backward(rows in 1usize..6, vocab in 2usize..300, scale in 0.1f32..3.0, seed: u64) {
        let be = CpuBackend::new();
        let mut rng = TestRng(seed);
        // Raw logits spread wide enough that the cap (15) bends them.
        let logits = rand_vec(&mut rng, rows * vocab, 12.0);
        let targets: Vec<i32> = (0..rows).map(|r| if r == 1 { -1 } else { rng.below(vocab) as i32 }).collect();
        let ids = CpuIds(targets.clone());
        let want = common::softcap_ce(&to64(&logits), vocab, &targets);
        let mut lb = buf(&logits);
        let mut losses = be.alloc(rows);
        be.softcap_cross_entropy(ViewMut::all(&mut lb), rows, vocab, 15.0, &ids, 0, ViewMut::all(&mut losses), None);
        // Losses relative to the largest, or 1 nat, whichever is larger (a loss of 1e-12 is f32 noise).
        let want_floor: Vec<f64> = want.iter().cloned().chain([1.0]).collect();
        let got_floor: Vec<f32> = losses.0.iter().cloned().chain([1.0]).collect();
        assert_close("softcap ce loss (forward only)", &got_floor, &want_floor, 1e-6);
        let mut lb = buf(&logits);
        be.softcap_cross_entropy(ViewMut::all(&mut lb), rows, vocab, 15.0, &ids, 0, ViewMut::all(&mut losses), Some(scale));
        let got_floor: Vec<f32> = losses.0.iter().cloned().chain([1.0]).collect();
        assert_close("softcap ce loss", &got_floor, &want_floor, 1e-6);
        let cot = vec![scale as f64; rows];
        // Softmax grads are differences of f32 probabilities: allow f32 rounding of O(1) values (x scale).
        let f = |x: &[f64]| common::softcap_ce(x, vocab, &targets);
        check_grad_floor("softcap ce", f, &logits, &cot, &lb.0, &mut rng, 1e-7 * scale as f64);
    }

    #[test]
    fn embedding_forward_backward(n in 1usize..40, vocab in 1usize..12, d in 1usize..20, seed: u64) {
        let be = CpuBackend::new();
        let mut rng = TestRng(seed);
        let wte = rand_vec(&mut rng, vocab * d, 1.0);
        let ids: Vec<i32> = (0..n).map(|_| rng.below(vocab) as i32).collect();
        let mut out = be.alloc(n * d);
        be.embedding_forward(&CpuIds(ids.clone()), n, View::all(&buf(&wte)), d, ViewMut::all(&mut out));
        let want: Vec<f64> = ids.iter().flat_map(|&i| to64(&wte[i as usize * d..(i as usize + 1) * d])).collect();
        assert_close("embedding", &out.0, &want, 0.0);
        let cot = rand_vec(&mut rng, n * d, 1.0);
        let g0 = rand_vec(&mut rng, vocab * d, 1.0);
        let mut gb = buf(&g0);
        be.embedding_backward(&CpuIds(ids.clone()), n, View::all(&buf(&cot)), d, ViewMut::all(&mut gb));
        let grad: Vec<f32> = gb.0.iter().zip(&g0).map(|(a, b)| a - b).collect();
        let f = |w: &[f64]| ids.iter().flat_map(|&i| w[i as usize * d..(i as usize + 1) * d].to_vec()).collect::<Vec<f64>>();
        check_grad("embedding", f, &wte, &to64(&cot), &grad, &mut rng);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn attention_forward_backward(batch in 1usize..3, t in 1usize..150, heads_kv in prop::sample::select(vec![(1usize, 1usize), (2, 2), (4, 2), (4, 1)]), d in prop::sample::select(vec![4usize, 8, 16]), seed: u64) {
        let be = CpuBackend::new();
        let (h, hkv) = heads_kv;
        let mut rng = TestRng(seed);
        let s = AttnShape::causal(batch, t, h, hkv, d);
        let q = rand_vec(&mut rng, s.q_len(), 1.0);
        let k = rand_vec(&mut rng, s.kv_len(), 1.0);
        let v = rand_vec(&mut rng, s.kv_len(), 1.0);
        let (qb, kb, vb) = (buf(&q), buf(&k), buf(&v));
        let (mut ob, mut lb) = (be.alloc(s.q_len()), be.alloc(s.lse_len()));
        be.attention_forward(s, View::all(&qb), View::all(&kb), View::all(&vb), ViewMut::all(&mut ob), ViewMut::all(&mut lb));
        let (q64, k64, v64) = (to64(&q), to64(&k), to64(&v));
        assert_close("attention", &ob.0, &common::attention(&q64, &k64, &v64, batch, t, h, hkv, d), 1e-5);
        let cot = rand_vec(&mut rng, s.q_len(), 1.0);
        let (mut dq, mut dk, mut dv) = (be.alloc(s.q_len()), be.alloc(s.kv_len()), be.alloc(s.kv_len()));
        // Garbage in the outputs first: the backward must write (=), not add.
        be.fill(ViewMut::all(&mut dq), 7.0);
        be.fill(ViewMut::all(&mut dk), 7.0);
        be.fill(ViewMut::all(&mut dv), 7.0);
        be.attention_backward(s, View::all(&qb), View::all(&kb), View::all(&vb), View::all(&ob), View::all(&lb), View::all(&buf(&cot)), ViewMut::all(&mut dq), ViewMut::all(&mut dk), ViewMut::all(&mut dv));
        let cot64 = to64(&cot);
        // O(1) inputs: grads that are exactly 0 in exact arithmetic (one visible key) come out as f32 noise.
        check_grad_floor("attention dq", |x| common::attention(x, &k64, &v64, batch, t, h, hkv, d), &q, &cot64, &dq.0, &mut rng, 1e-6);
        check_grad_floor("attention dk", |x| common::attention(&q64, x, &v64, batch, t, h, hkv, d), &k, &cot64, &dk.0, &mut rng, 1e-6);
        check_grad_floor("attention dv", |x| common::attention(&q64, &k64, x, batch, t, h, hkv, d), &v, &cot64, &dv.0, &mut rng, 1e-6);
    }

    /// The KV-cache shape (queries at positions q_pos0.., keys 0..tk) equals the last rows of full attention.
    #[test]
    fn attention_with_offset_matches_full(t in 2usize..140, tq_frac in 0.0f64..1.0, heads_kv in prop::sample::select(vec![(2usize, 1usize), (2, 2)]), seed: u64) {
        let be = CpuBackend::new();
        let (h, hkv, d) = (heads_kv.0, heads_kv.1, 8);
        let tq = 1 + ((t - 1) as f64 * tq_frac) as usize;
        let q_pos0 = t - tq;
        let mut rng = TestRng(seed);
        let full = AttnShape::causal(1, t, h, hkv, d);
        let q = rand_vec(&mut rng, full.q_len(), 1.0);
        let k = rand_vec(&mut rng, full.kv_len(), 1.0);
        let v = rand_vec(&mut rng, full.kv_len(), 1.0);
        let want = common::attention(&to64(&q), &to64(&k), &to64(&v), 1, t, h, hkv, d);
        let s = AttnShape { batch: 1, tq, tk: t, n_head: h, n_kv_head: hkv, head_dim: d, q_pos0 };
        let (mut ob, mut lb) = (be.alloc(s.q_len()), be.alloc(s.lse_len()));
        let qb = buf(&q[q_pos0 * h * d..]);
        be.attention_forward(s, View::all(&qb), View::all(&buf(&k)), View::all(&buf(&v)), ViewMut::all(&mut ob), ViewMut::all(&mut lb));
        assert_close("attention with offset", &ob.0, &want[q_pos0 * h * d..], 1e-5);
    }
}
