//! The CPU twin of the bf16 engine (`Precision::Bf16` on the CPU backend):
//! - which buffer is stored how (the precision scheme of ARCHITECTURE.md), pinned by name;
//! - its ops against the f64 references of tests/common with bf16-rounded expectations;
//! - its forward against an independent bf16 reference forward written here (f64 math, rounded to bf16 at
//!   each point where the engine stores bf16), which pins the forward's rounding points: the twin must be
//!   much closer to this reference than to the same reference with any one rounding point left out.

mod common;

use common::TestRng;
use nc_core::backend::bf16::{is_bf16, round_bf16};
use nc_core::backend::cpu::{CpuBackend, CpuBuf};
use nc_core::backend::{AttnShape, Backend, Gemm, Heads, Rotation, Storage, View, ViewMut};
use nc_core::config::{RMSNORM_EPS, ROPE_BASE};
use nc_core::model::{Gpt, Recompute};
use nc_core::plan::Precision;
use nc_core::ModelConfig;

fn rand_vec(rng: &mut TestRng, n: usize, scale: f64) -> Vec<f32> {
    (0..n).map(|_| (rng.normal() * scale) as f32).collect()
}
fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// One bf16 unit in the last place at the magnitude of `x`.
fn bf16_ulp(x: f64) -> f64 {
    let e = (x.abs().max(1e-30)).log2().floor();
    2f64.powf(e - 7.0)
}

/// A bf16 output: every value is bf16, equals the f32 op's result rounded (bit for bit), and is within one
/// bf16 ulp of the f64 reference rounded to bf16 (f32 vs f64 arithmetic can tip a value over a midpoint).
fn assert_bf16_output(what: &str, got: &[f32], f32_result: &[f32], reference: &[f64]) {
    assert_eq!(got.len(), reference.len(), "{what}: length");
    let scale = reference.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    for (i, ((&g, &f), &r)) in got.iter().zip(f32_result).zip(reference).enumerate() {
        assert!(is_bf16(g), "{what}[{i}] = {g} is not a bf16 value");
        assert_eq!(
            g.to_bits(),
            round_bf16(f).to_bits(),
            "{what}[{i}]: not the f32 result rounded"
        );
        let want = round_bf16(r as f32) as f64;
        assert!(
            (g as f64 - want).abs() <= bf16_ulp(r) + 1e-6 * scale,
            "{what}[{i}]: {g} vs reference {r} (rounded {want})"
        );
    }
}

/// Runs `op` writing into a buffer of `storage` holding `init`, and returns what it holds afterwards.
fn run_into(storage: Storage, init: &[f32], op: impl FnOnce(&CpuBackend, &mut CpuBuf)) -> Vec<f32> {
    let be = CpuBackend::new();
    let mut out = CpuBuf::with_storage(init.to_vec(), storage);
    op(&be, &mut out);
    out.0
}

#[test]
fn ops_into_bf16_match_rounded_references() {
    let mut rng = TestRng(7);
    // matmul y = x W^T (a linear layer), bf16 inputs as the engine feeds it, f32 accumulation
    let (n, din, dout) = (9, 40, 23);
    let x: Vec<f32> = rand_vec(&mut rng, n * din, 1.0)
        .iter()
        .map(|&v| round_bf16(v))
        .collect();
    let w: Vec<f32> = rand_vec(&mut rng, dout * din, 0.3)
        .iter()
        .map(|&v| round_bf16(v))
        .collect();
    let (xb, wb) = (CpuBuf::f32(x.clone()), CpuBuf::f32(w.clone()));
    let mm = |st: Storage| {
        run_into(st, &vec![0.0; n * dout], |be, o| {
            be.matmul(Gemm::nt(n, dout, din), View::all(&xb), View::all(&wb), ViewMut::all(o))
        })
    };
    let reference = common::linear(&to64(&x), &to64(&w), n, din, dout);
    assert_bf16_output("linear", &mm(Storage::Bf16), &mm(Storage::F32), &reference);

    // rmsnorm: y bf16, rstd stays f32 in its own buffer
    let (rows, dim) = (7, 48);
    let xs = rand_vec(&mut rng, rows * dim, 2.0);
    let xb = CpuBuf::f32(xs.clone());
    let norm = |st: Storage| {
        run_into(st, &vec![0.0; rows * dim], |be, y| {
            let mut rstd = be.alloc(rows);
            be.rmsnorm_forward(
                View::all(&xb),
                rows,
                dim,
                RMSNORM_EPS,
                ViewMut::all(y),
                ViewMut::all(&mut rstd),
            );
        })
    };
    assert_bf16_output(
        "rmsnorm",
        &norm(Storage::Bf16),
        &norm(Storage::F32),
        &common::rmsnorm(&to64(&xs), dim),
    );

    // rotary in place on a bf16 buffer (as on the q/k projections)
    let (batch, t, heads, hd) = (2, 5, 3, 8);
    let q: Vec<f32> = rand_vec(&mut rng, batch * t * heads * hd, 1.0)
        .iter()
        .map(|&v| round_bf16(v))
        .collect();
    let table = rotary_table(t, hd);
    let tb = CpuBuf::f32(table);
    let rot = |st: Storage| {
        run_into(st, &q, |be, x| {
            let table = View::all(&tb);
            be.rotary(
                ViewMut::all(x),
                Heads::new(batch, t, heads, hd),
                table,
                Rotation::Forward,
            )
        })
    };
    assert_bf16_output(
        "rotary",
        &rot(Storage::Bf16),
        &rot(Storage::F32),
        &common::rotary(&to64(&q), t, heads, hd, 0),
    );

    // attention output bf16 (lse f32)
    let s = AttnShape::causal(2, 11, 4, 2, 8);
    let qa: Vec<f32> = rand_vec(&mut rng, s.q_len(), 1.0)
        .iter()
        .map(|&v| round_bf16(v))
        .collect();
    let ka: Vec<f32> = rand_vec(&mut rng, s.kv_len(), 1.0)
        .iter()
        .map(|&v| round_bf16(v))
        .collect();
    let va: Vec<f32> = rand_vec(&mut rng, s.kv_len(), 1.0)
        .iter()
        .map(|&v| round_bf16(v))
        .collect();
    let (qb, kb, vb) = (
        CpuBuf::f32(qa.clone()),
        CpuBuf::f32(ka.clone()),
        CpuBuf::f32(va.clone()),
    );
    let att = |st: Storage| {
        run_into(st, &vec![0.0; s.q_len()], |be, o| {
            let mut lse = be.alloc(s.lse_len());
            be.attention_forward(
                s,
                View::all(&qb),
                View::all(&kb),
                View::all(&vb),
                ViewMut::all(o),
                ViewMut::all(&mut lse),
            );
        })
    };
    let reference = common::attention(&to64(&qa), &to64(&ka), &to64(&va), 2, 11, 4, 2, 8);
    assert_bf16_output("attention", &att(Storage::Bf16), &att(Storage::F32), &reference);

    // relu^2
    let u: Vec<f32> = rand_vec(&mut rng, 300, 2.0).iter().map(|&v| round_bf16(v)).collect();
    let ub = CpuBuf::f32(u.clone());
    let relu2 = |st: Storage| {
        run_into(st, &vec![0.0; 300], |be, h| {
            be.relu2_forward(View::all(&ub), ViewMut::all(h))
        })
    };
    let reference: Vec<f64> = u.iter().map(|&v| (v.max(0.0) as f64).powi(2)).collect();
    assert_bf16_output("relu2", &relu2(Storage::Bf16), &relu2(Storage::F32), &reference);

    // accumulating rmsnorm backward into a bf16 dx: round(old + new), the sum in f32
    let old: Vec<f32> = rand_vec(&mut rng, rows * dim, 1.0)
        .iter()
        .map(|&v| round_bf16(v))
        .collect();
    let dy = CpuBuf::f32(rand_vec(&mut rng, rows * dim, 1.0));
    let (mut yb, mut rb) = (CpuBackend::new().alloc(rows * dim), CpuBackend::new().alloc(rows));
    CpuBackend::new().rmsnorm_forward(
        View::all(&xb),
        rows,
        dim,
        RMSNORM_EPS,
        ViewMut::all(&mut yb),
        ViewMut::all(&mut rb),
    );
    let back = |st: Storage| {
        run_into(st, &old, |be, dx| {
            be.rmsnorm_backward(
                View::all(&yb),
                View::all(&rb),
                View::all(&dy),
                rows,
                dim,
                ViewMut::all(dx),
                true,
            )
        })
    };
    let (b16, b32) = (back(Storage::Bf16), back(Storage::F32));
    for (i, (&g, &f)) in b16.iter().zip(&b32).enumerate() {
        assert_eq!(
            g.to_bits(),
            round_bf16(f).to_bits(),
            "rmsnorm backward accumulate [{i}]"
        );
    }
}

/// cos then sin, (max_pos, hd/2) each, as the model's table (angles in f64, stored f32).
fn rotary_table(max_pos: usize, hd: usize) -> Vec<f32> {
    let half = hd / 2;
    let ang = |p: usize, j: usize| p as f64 / ROPE_BASE.powf(2.0 * j as f64 / hd as f64);
    let mut t = Vec::with_capacity(2 * max_pos * half);
    t.extend((0..max_pos).flat_map(|p| (0..half).map(move |j| ang(p, j).cos() as f32)));
    t.extend((0..max_pos).flat_map(|p| (0..half).map(move |j| ang(p, j).sin() as f32)));
    t
}

fn small_cfg() -> ModelConfig {
    // 2 layers, d 64, 4 heads of 16 (GQA 2 kv heads), vocab 97, T 16
    ModelConfig::new(2, 64, 4, 2, 16, 97, 16).unwrap()
}

/// Every buffer's storage under bf16, by name: the precision scheme of ARCHITECTURE.md.
#[test]
fn bf16_storage_of_every_buffer_is_the_documented_scheme() {
    let cfg = small_cfg();
    let m = Gpt::with_precision(CpuBackend::new(), cfg, 2, 16, Recompute::None, Precision::Bf16).unwrap();
    let f32_names = [
        "rstd1", "rstd_q", "rstd_k", "lse", "rstd2", "rstd0", "resid", "rstdf", "losses", "logits", "dresid", "master",
        "grads",
    ];
    for (name, st) in m.activation_storages() {
        let want = if f32_names.contains(&name) {
            Storage::F32
        } else {
            Storage::Bf16
        };
        assert_eq!(st, want, "{name}");
    }
    let (master, working) = m.allocated_weight_bytes();
    assert_eq!(master, 4 * cfg.num_params() as usize);
    assert_eq!(working, 2 * cfg.num_params() as usize);
    // and fp32 is all f32, with no working copy
    let m = Gpt::with_precision(CpuBackend::new(), cfg, 2, 16, Recompute::None, Precision::Fp32).unwrap();
    assert!(m.activation_storages().iter().all(|(_, st)| *st == Storage::F32));
    assert_eq!(m.allocated_weight_bytes().1, 0);
}

/// A forward's random inputs from seed `seed`: `random_params`, then `n` token ids and `n` targets.
fn random_case(cfg: &ModelConfig, n: usize, seed: u64) -> (Vec<f32>, Vec<u32>, Vec<i32>) {
    let mut rng = TestRng(seed);
    let params = random_params(cfg, &mut rng);
    let inputs = (0..n).map(|_| rng.below(cfg.vocab_size) as u32).collect();
    let targets = (0..n).map(|_| rng.below(cfg.vocab_size) as i32).collect();
    (params, inputs, targets)
}

/// Random non-zero weights (the real init zeroes lm_head and the c_proj's, which would hide half the model).
fn random_params(cfg: &ModelConfig, rng: &mut TestRng) -> Vec<f32> {
    let mut p = vec![0.0f32; cfg.num_params() as usize];
    for s in cfg.param_specs() {
        let std = if s.name.contains("wte") {
            1.0
        } else {
            1.0 / (s.cols as f64).sqrt()
        };
        for v in &mut p[s.range()] {
            *v = (rng.normal() * std) as f32;
        }
    }
    p
}

/// The rounding points of the bf16 forward, by name (each is where the engine stores a bf16 activation or
/// reads the bf16 working copy of a weight).
const POINTS: [&str; 11] = [
    "weights", "x0", "xn1", "q_proj", "k_proj", "v", "q_norm", "k_norm", "y", "xn2_u_h", "xf",
];

/// Points where the engine does NOT round: rotary and QK-norm are one fused op (rotary_qknorm.cu and the
/// twin's `rotary_qknorm_forward`), so the rotated q and k stay f32 until the norm's output is stored.
const NOT_POINTS: [&str; 2] = ["q_rot", "k_rot"];

/// The bf16 forward in f64, written from the precision scheme: values rounded to bf16 at every point of
/// `POINTS` but `variant`, and also at `variant` when it is one of `NOT_POINTS` (an extra rounding); the
/// residual stream, norm statistics, logits and loss in full precision. Per-token losses.
fn reference_losses(
    cfg: &ModelConfig,
    p: &[f32],
    b: usize,
    t: usize,
    inputs: &[u32],
    targets: &[i32],
    variant: &str,
) -> Vec<f64> {
    let r = |point: &str, v: Vec<f64>| -> Vec<f64> {
        if (point == variant) == POINTS.contains(&point) {
            v
        } else {
            v.into_iter().map(|x| round_bf16(x as f32) as f64).collect()
        }
    };
    // "xn2_u_h" covers the MLP's three stores: leaving any one out is checked as leaving the group out
    let p = r("weights", to64(p));
    let specs = cfg.param_specs();
    let get = |name: &str| &p[specs.iter().find(|s| s.name == name).unwrap().range()];
    let (d, h, hkv, hd, vocab) = (cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.vocab_size);
    let n = b * t;
    let wte = get("transformer.wte.weight");
    let emb: Vec<f64> = inputs
        .iter()
        .flat_map(|&i| wte[i as usize * d..][..d].to_vec())
        .collect();
    let mut x = r("x0", common::rmsnorm(&emb, d));
    for l in 0..cfg.n_layer {
        let w = |m: &str| get(&format!("transformer.h.{l}.{m}.weight"));
        let xn = r("xn1", common::rmsnorm(&x, d));
        let q = r("q_proj", common::linear(&xn, w("attn.c_q"), n, d, h * hd));
        let k = r("k_proj", common::linear(&xn, w("attn.c_k"), n, d, hkv * hd));
        let v = r("v", common::linear(&xn, w("attn.c_v"), n, d, hkv * hd));
        let q = r("q_rot", common::rotary(&q, t, h, hd, 0));
        let k = r("k_rot", common::rotary(&k, t, hkv, hd, 0));
        let q = r("q_norm", common::rmsnorm(&q, hd));
        let k = r("k_norm", common::rmsnorm(&k, hd));
        let y = r("y", common::attention(&q, &k, &v, b, t, h, hkv, hd));
        let o = common::linear(&y, w("attn.c_proj"), n, h * hd, d);
        x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        let xn = r("xn2_u_h", common::rmsnorm(&x, d));
        let u = r("xn2_u_h", common::linear(&xn, w("mlp.c_fc"), n, d, 4 * d));
        let hh = r("xn2_u_h", u.iter().map(|&u| u.max(0.0) * u.max(0.0)).collect());
        let o = common::linear(&hh, w("mlp.c_proj"), n, 4 * d, d);
        x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
    }
    let xf = r("xf", common::rmsnorm(&x, d));
    let logits = common::linear(&xf, get("lm_head.weight"), n, d, vocab);
    common::softcap_ce(&logits, vocab, targets)
}

fn distance(a: &[f32], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// The twin's per-token losses are far closer to the bf16 reference than to the reference with any one
/// rounding point left out or one extra (rounding the rotated q or k) added, so a point the twin skips, or
/// one it adds, shows; and they differ from the f32 model's (the rounding is real).
#[test]
fn twin_forward_has_exactly_the_reference_rounding_points() {
    let cfg = small_cfg();
    let (b, t) = (2, 16);
    let n = b * t;
    let (params, inputs, mut targets) = random_case(&cfg, n, 11);
    targets[5] = -1;

    let losses = |precision: Precision| {
        let mut m = Gpt::with_precision(CpuBackend::new(), cfg, b, t, Recompute::None, precision).unwrap();
        m.params_mut().copy_from_slice(&params);
        let mut out = vec![0.0f32; n];
        m.forward_losses(&inputs, &targets, &mut out).unwrap();
        out
    };
    let (twin, fp32) = (losses(Precision::Bf16), losses(Precision::Fp32));
    let full = reference_losses(&cfg, &params, b, t, &inputs, &targets, "");
    let near = distance(&twin, &full);
    let to_fp32 = distance(&fp32, &full);
    eprintln!("twin vs bf16 reference: {near:.3e}; f32 model vs bf16 reference: {to_fp32:.3e}");
    assert!(
        near * 10.0 < to_fp32,
        "the twin is not close to the bf16 reference: {near:e} vs {to_fp32:e}"
    );
    for variant in POINTS.iter().chain(&NOT_POINTS) {
        let other = reference_losses(&cfg, &params, b, t, &inputs, &targets, variant);
        let far = distance(&twin, &other);
        let how = if POINTS.contains(variant) { "without" } else { "adding" };
        eprintln!("  {how} {variant:8}: {far:.3e}");
        assert!(
            near * 4.0 < far,
            "{how} '{variant}' is not distinguishable: {near:e} vs {far:e}"
        );
    }
}

/// Grads stay f32 (accumulated in f32, not rounded): after a bf16 forward/backward they hold values no
/// bf16 can, and they track the f32 model's grads to bf16-level accuracy.
#[test]
fn twin_grads_are_f32_and_close_to_the_f32_models() {
    let cfg = small_cfg();
    let (b, t) = (2, 16);
    let (params, inputs, targets) = random_case(&cfg, b * t, 5);
    let grads = |precision: Precision| {
        let mut m = Gpt::with_precision(CpuBackend::new(), cfg, b, t, Recompute::Selective, precision).unwrap();
        m.params_mut().copy_from_slice(&params);
        m.zero_grads();
        m.forward_backward(&inputs, &targets, 1.0).unwrap();
        m.grads().to_vec()
    };
    let (g16, g32) = (grads(Precision::Bf16), grads(Precision::Fp32));
    let not_bf16 = g16.iter().filter(|&&g| !is_bf16(g)).count();
    assert!(
        not_bf16 > g16.len() / 2,
        "only {not_bf16} of {} grads are not bf16 values",
        g16.len()
    );
    for s in cfg.param_specs() {
        let (a, c) = (&g16[s.range()], &g32[s.range()]);
        let diff = a
            .iter()
            .zip(c)
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm = c.iter().map(|&y| (y as f64).powi(2)).sum::<f64>().sqrt();
        // bf16 keeps 8 significant bits: relative errors of a few 2^-8 after a whole model, not more
        assert!(
            diff <= 0.05 * norm,
            "{}: |g_bf16 - g_f32| = {diff:e}, |g_f32| = {norm:e}",
            s.name
        );
        assert!(diff > 0.0, "{}: bf16 grads equal the f32 ones", s.name);
    }
}

// ---- attention at a flash head_dim: P and dS rounded to bf16 where the device's flash kernels round them ----

/// Where the attention reference rounds to bf16 before a product, besides its bf16 outputs.
#[derive(Clone, Copy, Debug)]
struct FlashRounding {
    /// P before P V (forward) and P^T dout (dv).
    p: bool,
    /// dS before dS K (dq) and dS^T Q (dk).
    ds: bool,
}

/// Keys per tile of the flash forward kernel (FWD_BK in kernels-ptx/cuda/flash_attention.cu): P is rounded
/// relative to the running max of the keys up to the end of its tile.
const FLASH_KEY_TILE: usize = 64;

/// The scaled score of query row `i` (head `hh`) and key `j`, in f64, for `s` on bf16 inputs.
fn score(s: &AttnShape, q: &[f32], k: &[f32], b: usize, hh: usize, i: usize, j: usize) -> f64 {
    let d = s.head_dim;
    let kvh = hh / (s.n_head / s.n_kv_head);
    let qi = &q[((b * s.tq + i) * s.n_head + hh) * d..][..d];
    let kj = &k[((b * s.tk + j) * s.n_kv_head + kvh) * d..][..d];
    qi.iter().zip(kj).map(|(&x, &y)| x as f64 * y as f64).sum::<f64>() / (d as f64).sqrt()
}

fn round_if(round: bool, x: f64) -> f64 {
    if round {
        round_bf16(x as f32) as f64
    } else {
        x
    }
}

/// The flash forward in f64, written from the FlashAttention-2 algorithm: per 64-key tile, the running max
/// m over the keys so far, P = exp(s - m) (rounded to bf16 when `r.p`) times V added to the output rescaled
/// by exp(m_old - m), and the softmax sum l of the unrounded P; out = acc / l, rounded to bf16.
fn flash_forward_reference(s: &AttnShape, q: &[f32], k: &[f32], v: &[f32], r: FlashRounding) -> Vec<f32> {
    let d = s.head_dim;
    let mut out = vec![0.0f32; s.q_len()];
    for b in 0..s.batch {
        for hh in 0..s.n_head {
            let kvh = hh / (s.n_head / s.n_kv_head);
            for i in 0..s.tq {
                let visible = s.q_pos0 + i + 1;
                let (mut m, mut l, mut acc) = (f64::NEG_INFINITY, 0.0f64, vec![0.0f64; d]);
                for j0 in (0..visible).step_by(FLASH_KEY_TILE) {
                    let keys = j0..visible.min(j0 + FLASH_KEY_TILE);
                    let scores: Vec<f64> = keys.clone().map(|j| score(s, q, k, b, hh, i, j)).collect();
                    let m_new = scores.iter().fold(m, |a, &x| a.max(x));
                    let corr = (m - m_new).exp();
                    l *= corr;
                    acc.iter_mut().for_each(|a| *a *= corr);
                    for (j, &sc) in keys.zip(&scores) {
                        let p = (sc - m_new).exp();
                        l += p;
                        let vj = &v[((b * s.tk + j) * s.n_kv_head + kvh) * d..][..d];
                        let p = round_if(r.p, p);
                        acc.iter_mut().zip(vj).for_each(|(a, &x)| *a += p * x as f64);
                    }
                    m = m_new;
                }
                let o = &mut out[((b * s.tq + i) * s.n_head + hh) * d..][..d];
                o.iter_mut()
                    .zip(&acc)
                    .for_each(|(o, a)| *o = round_bf16((a / l) as f32));
            }
        }
    }
    out
}

/// The flash backward in f64 (training shape), from the given bf16 out and f32 lse: P = exp(s - lse),
/// dP = dout v^T, D = rowsum(dout * out), dS = P (dP - D) from the unrounded P; dv = P^T dout (P rounded when
/// `r.p`), dq = scale dS k and dk = scale dS^T q (dS rounded when `r.ds`); each rounded to bf16.
#[allow(clippy::too_many_arguments)]
fn flash_backward_reference(
    s: &AttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    dout: &[f32],
    r: FlashRounding,
) -> [Vec<f32>; 3] {
    let d = s.head_dim;
    let scale = 1.0 / (d as f64).sqrt();
    let (mut dq, mut dk, mut dv) = (
        vec![0.0f64; s.q_len()],
        vec![0.0f64; s.kv_len()],
        vec![0.0f64; s.kv_len()],
    );
    for b in 0..s.batch {
        for hh in 0..s.n_head {
            let kvh = hh / (s.n_head / s.n_kv_head);
            for i in 0..s.tq {
                let qrow = ((b * s.tq + i) * s.n_head + hh) * d;
                let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(&a, &c)| a as f64 * c as f64).sum::<f64>();
                let delta = dot(&o[qrow..][..d], &dout[qrow..][..d]);
                let lse_i = lse[(b * s.n_head + hh) * s.tq + i] as f64;
                for j in 0..=i {
                    let krow = ((b * s.tk + j) * s.n_kv_head + kvh) * d;
                    let p = (score(s, q, k, b, hh, i, j) - lse_i).exp();
                    let ds = p * (dot(&dout[qrow..][..d], &v[krow..][..d]) - delta);
                    let (p, ds) = (round_if(r.p, p), round_if(r.ds, ds));
                    for c in 0..d {
                        dv[krow + c] += p * dout[qrow + c] as f64;
                        dq[qrow + c] += scale * ds * k[krow + c] as f64;
                        dk[krow + c] += scale * ds * q[qrow + c] as f64;
                    }
                }
            }
        }
    }
    [dq, dk, dv].map(|x| x.iter().map(|&y| round_bf16(y as f32)).collect())
}

/// Checks every bf16 value of `got` is within one bf16 ulp (plus `floor`, for values that cancel to near 0) of
/// `want`'s, and returns how many differ at all.
fn differing(what: &str, got: &[f32], want: &[f32], floor: f64) -> usize {
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let diff = (g as f64 - w as f64).abs();
        assert!(
            diff <= bf16_ulp(w as f64) + floor,
            "{what}[{i}]: twin {g}, reference {w}"
        );
    }
    count_differing(got, want)
}

fn count_differing(got: &[f32], want: &[f32]) -> usize {
    got.iter().zip(want).filter(|(g, w)| g != w).count()
}

fn bf16_randn(rng: &mut TestRng, n: usize) -> Vec<f32> {
    rand_vec(rng, n, 1.0).iter().map(|&v| round_bf16(v)).collect()
}

/// At head_dim 64 (a flash kernel's) with every tensor bf16, the twin's attention rounds exactly where the
/// device's flash kernels round: P before P V in the forward (relative to the tile's running max), P before
/// P^T dout and dS before dS K, dS^T Q in the backward. Its bf16 outputs equal the f64 reference with those
/// rounding points bit for bit but for the rare value that f32 vs f64 arithmetic tips over a rounding
/// midpoint (at most 1%), while leaving out any one of them moves a large share (at least 10%: the rounded P
/// or dS is off by up to 2^-9 relative, about as much as the output's own rounding). Three key tiles, GQA,
/// T not a multiple of the tile, and a KV-cache decode shape (forward only).
#[test]
fn twin_attention_at_a_flash_head_dim_rounds_p_and_ds_as_the_flash_kernels() {
    let mut rng = TestRng(17);
    let both = FlashRounding { p: true, ds: true };
    let decode = AttnShape {
        tq: 3,
        tk: 150,
        q_pos0: 147,
        ..AttnShape::causal(1, 3, 2, 1, 64)
    };
    for s in [AttnShape::causal(1, 150, 2, 1, 64), decode] {
        let (q, k, v) = (
            bf16_randn(&mut rng, s.q_len()),
            bf16_randn(&mut rng, s.kv_len()),
            bf16_randn(&mut rng, s.kv_len()),
        );
        let be = CpuBackend::new();
        let bf = |x: &[f32]| CpuBuf::with_storage(x.to_vec(), Storage::Bf16);
        let (qb, kb, vb) = (bf(&q), bf(&k), bf(&v));
        let mut ob = CpuBuf::with_storage(vec![0.0; s.q_len()], Storage::Bf16);
        let mut lb = be.alloc(s.lse_len());
        be.attention_forward(
            s,
            View::all(&qb),
            View::all(&kb),
            View::all(&vb),
            ViewMut::all(&mut ob),
            ViewMut::all(&mut lb),
        );
        let n = s.q_len();
        let want = flash_forward_reference(&s, &q, &k, &v, both);
        let near = differing(&format!("{s:?} out"), &ob.0, &want, 0.0);
        let unrounded = flash_forward_reference(&s, &q, &k, &v, FlashRounding { p: false, ds: true });
        let far = count_differing(&ob.0, &unrounded);
        eprintln!("{s:?} out: {near} of {n} differ from the reference, {far} without P rounded");
        assert!(
            near * 100 <= n,
            "{s:?} out: {near} of {n} differ from the flash reference"
        );
        assert!(
            far * 10 >= n,
            "{s:?} out: P rounded or not is not distinguishable ({far} of {n})"
        );
        if s.q_pos0 > 0 {
            continue;
        }
        let dout = bf16_randn(&mut rng, s.q_len());
        let db = bf(&dout);
        let mut grads =
            [s.q_len(), s.kv_len(), s.kv_len()].map(|len| CpuBuf::with_storage(vec![0.0; len], Storage::Bf16));
        let [gq, gk, gv] = &mut grads;
        be.attention_backward(
            s,
            View::all(&qb),
            View::all(&kb),
            View::all(&vb),
            View::all(&ob),
            View::all(&lb),
            View::all(&db),
            ViewMut::all(gq),
            ViewMut::all(gk),
            ViewMut::all(gv),
        );
        let reference = |r| flash_backward_reference(&s, &q, &k, &v, &ob.0, &lb.0, &dout, r);
        let want = reference(both);
        let no_p = reference(FlashRounding { p: false, ds: true });
        let no_ds = reference(FlashRounding { p: true, ds: false });
        // (name, twin, reference, the variant that must differ). dq and dk sum terms that cancel, and a dS that
        // f32 vs f64 arithmetic tips over a rounding midpoint (dP - D cancels too) moves one term by 2^-8 of
        // itself: a small value may be off by that, below 1e-3 of the largest
        for (name, got, want, other, without) in [
            ("dq", &grads[0].0, &want[0], &no_ds[0], "dS"),
            ("dk", &grads[1].0, &want[1], &no_ds[1], "dS"),
            ("dv", &grads[2].0, &want[2], &no_p[2], "P"),
        ] {
            let floor = 1e-3 * want.iter().fold(0.0f64, |m, &x| m.max((x as f64).abs()));
            let near = differing(name, got, want, floor);
            let far = count_differing(got, other);
            let n = got.len();
            eprintln!("{name}: {near} of {n} differ from the reference, {far} without {without} rounded");
            assert!(near * 100 <= n, "{name}: {near} of {n} differ from the flash reference");
            assert!(
                far * 10 >= n,
                "{name}: {without} rounded or not is not distinguishable ({far} of {n})"
            );
        }
    }
}
