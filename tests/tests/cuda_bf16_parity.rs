//! The CUDA bf16 engine (`--precision bf16`) against its CPU twin (the CPU backend with the same `Storage`s),
//! op by op on the storage combinations the bf16 layout makes, then a whole training step of a model whose
//! attention runs on the flash kernels (head_dim 64), and the step's determinism on the device.
//!
//! Without a GPU every CUDA test runs on the simulated GPU in a child process (tests/src/sim.rs), or where that
//! cannot be built prints "no CUDA device: ... not run" and passes (NC_REQUIRE_CUDA=1 makes that a failure); `the_harness_runs_clean_with_the_twin_as_device` runs the same bodies with the device-like CPU in
//! the device's place everywhere, so the harness itself is exercised by CI.
//!
//! Tolerances (both sides round to bf16 at the same points, the flash kernels' bf16 P and dS included: the twin
//! rounds them where the kernels do, core/src/backend/cpu/attention.rs; they differ only in f32 arithmetic
//! order):
//! - casts, fill, embedding lookup and its sorted backward, relu^2 and its backward, a mixed add: bit for bit
//!   (the same f32 operations, one rounding, the same order);
//! - everything else with a bf16 output: within one bf16 ulp of the twin's value plus the op's f32 tolerance,
//!   and at most 3% of the elements may differ at all (a different f32 summation order tips a value over a
//!   rounding midpoint rarely; an extra or missing rounding point changes a quarter or more of them);
//! - GEMM f32 outputs: 1e-6 sqrt(k) of the products' magnitude (as cuda_parity.rs); rmsnorm and QK-norm
//!   statistics 1e-5 relative;
//! - attention: 1 bf16 ulp plus 1e-3 of the output's largest magnitude, and the 3% rule: dq and dk sum terms
//!   that cancel, and a dS that the two sides' f32 arithmetic puts on either side of a rounding midpoint
//!   moves one term by 2^-8 of itself (core/tests/bf16_twin.rs measures the twin against an f64 reference
//!   of the same rounding points: under 0.1% of values differ; leaving out the rounding of P or dS moves
//!   36-41% of them). On the simulated GPU (2026-12-06) at most 0.6% differ (dq), the worst value at 0.27 of
//!   the allowed;
//! - the whole step: the engine's per-token losses and every gradient are at most a quarter as far from the
//!   twin's as the twin's are from the strict f32 model's (the distance bf16 itself puts between two runs).
//!   On the simulated GPU: 0.012 (losses) and 0.069 (gradients); with a twin that did not round P and dS it
//!   was 0.74, so a missing rounding point fails here. Not yet run on a GPU, whose tensor cores may sum in
//!   another order than the emulator's: the ratio is printed.

use nc_core::backend::bf16::round_bf16;
use nc_core::backend::cpu::{CpuBackend, CpuBuf, CpuIds};
use nc_core::backend::cuda::CudaBackend;
use nc_core::backend::device_like::DeviceLikeCpu;
use nc_core::backend::{AttnShape, Backend, Gemm, Heads, Storage, View, ViewMut};
use nc_core::config::RMSNORM_EPS;
use nc_core::model::init::rotary_table;
use nc_core::model::{Gpt, HostMirror, Recompute, Rng};
use nc_core::plan::Precision;
use nc_core::ModelConfig;

use Storage::{Bf16, F32};

/// The CUDA backend on device 0, or None where the test returns at once: it ran and passed on the simulated GPU
/// in a child process, or there is no device of any kind (`nc_tests::cuda_backend_or_simulated`).
fn gpu() -> Option<CudaBackend> {
    nc_tests::cuda_backend_or_simulated("cuda_bf16_parity")
}

fn randn(rng: &mut Rng, len: usize, std: f64) -> Vec<f32> {
    (0..len).map(|_| (rng.normal() * std) as f32).collect()
}

/// One bf16 unit in the last place at the magnitude of `x`.
fn bf16_ulp(x: f64) -> f64 {
    2f64.powf(x.abs().max(1e-30).log2().floor() - 7.0)
}

/// The same data in a buffer of `storage` on the twin and on the device.
struct Pair<D: Backend> {
    cpu: CpuBuf,
    dev: D::Buf,
}

impl<D: Backend> Pair<D> {
    fn new(g: &D, data: &[f32], storage: Storage) -> Self {
        let mut dev = g.alloc_as(data.len(), storage);
        g.upload(ViewMut::all(&mut dev), data);
        Pair {
            cpu: CpuBuf::with_storage(data.to_vec(), storage),
            dev,
        }
    }
    fn c(&self) -> View<'_, CpuBackend> {
        View::all(&self.cpu)
    }
    fn d(&self) -> View<'_, D> {
        View::all(&self.dev)
    }
    fn cm(&mut self) -> ViewMut<'_, CpuBackend> {
        ViewMut::all(&mut self.cpu)
    }
    fn dm(&mut self) -> ViewMut<'_, D> {
        ViewMut::all(&mut self.dev)
    }
    fn got(&self, g: &D) -> Vec<f32> {
        let mut v = vec![0.0; self.cpu.0.len()];
        g.download(View::all(&self.dev), &mut v);
        v
    }
}

fn ids_pair<D: Backend>(g: &D, ids: &[i32]) -> (CpuIds, D::Ids) {
    let mut dev = g.alloc_ids(ids.len());
    g.upload_ids(&mut dev, ids);
    (CpuIds(ids.to_vec()), dev)
}

/// Bit for bit.
fn exact<D: Backend>(what: &str, g: &D, p: &Pair<D>) {
    let got = p.got(g);
    for (i, (a, b)) in got.iter().zip(&p.cpu.0).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "{what}[{i}]: device {a}, twin {b}");
    }
}

/// Within `tol` (plus one bf16 ulp for a Bf16 output, of which at most 3% may differ).
fn close<D: Backend>(what: &str, g: &D, p: &Pair<D>, tol: f64) {
    let got = p.got(g);
    let bf16 = D::storage(&p.dev) == Bf16;
    let (mut differ, mut worst) = (0, 0.0f64);
    for (i, (&a, &b)) in got.iter().zip(&p.cpu.0).enumerate() {
        let allowed = tol + if bf16 { bf16_ulp(b as f64) } else { 0.0 };
        let diff = (a as f64 - b as f64).abs();
        assert!(
            diff <= allowed && a.is_finite() == b.is_finite(),
            "{what}[{i}]: device {a}, twin {b}, allowed {allowed:e}"
        );
        differ += (a != b) as usize;
        worst = worst.max(diff / allowed.max(f64::MIN_POSITIVE));
    }
    eprintln!(
        "{what}: {differ} of {} differ, worst {worst:.2} of the allowed",
        got.len()
    );
    if bf16 {
        assert!(
            differ * 100 <= 3 * got.len().max(1),
            "{what}: {differ} of {} bf16 values differ from the twin's (a rounding point moved?)",
            got.len()
        );
    }
}

fn max_abs(x: &[f32]) -> f64 {
    x.iter().fold(0.0f64, |m, v| m.max((*v as f64).abs()))
}

fn casts_fill_embedding_relu2_add_on<D: Backend>(g: &D) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(1);
    let xs = randn(&mut rng, 1000, 3.0);
    // F32 -> Bf16 is the cast; Bf16 -> F32 widens; fill rounds its value.
    let src = Pair::new(g, &xs, F32);
    let mut h = Pair::new(g, &vec![0.0; 1000], Bf16);
    cpu.copy(src.c(), h.cm());
    g.copy(src.d(), h.dm());
    exact("cast f32->bf16", g, &h);
    let mut w = Pair::new(g, &vec![0.0; 1000], F32);
    cpu.copy(h.c(), w.cm());
    g.copy(h.d(), w.dm());
    exact("cast bf16->f32", g, &w);
    cpu.fill(ViewMut::at(&mut h.cpu, 10, 500), 0.1);
    g.fill(ViewMut::at(&mut h.dev, 10, 500), 0.1);
    exact("fill bf16", g, &h);

    // Embedding from the bf16 working copy into the f32 stream and into bf16; the sorted backward of a bf16
    // gradient into the f32 grads (accumulating, repeated ids): the CPU's order, so the same bits.
    let (vocab, d, n) = (37, 72, 120);
    let wte = Pair::new(g, &randn(&mut rng, vocab * d, 1.0), Bf16);
    let ids: Vec<i32> = (0..n).map(|i| ((i * 7 + i / 5) % vocab) as i32 % 11).collect();
    let (cids, dids) = ids_pair(g, &ids);
    for out_storage in [F32, Bf16] {
        let mut out = Pair::new(g, &vec![f32::NAN; n * d], out_storage);
        cpu.embedding_forward(&cids, n, wte.c(), d, out.cm());
        g.embedding_forward(&dids, n, wte.d(), d, out.dm());
        exact(&format!("embedding_forward into {out_storage:?}"), g, &out);
    }
    let dout = Pair::new(g, &randn(&mut rng, n * d, 1.0), Bf16);
    let mut dwte = Pair::new(g, &randn(&mut rng, vocab * d, 0.1), F32);
    cpu.embedding_backward(&cids, n, dout.c(), d, dwte.cm());
    g.embedding_backward(&dids, n, dout.d(), d, dwte.dm());
    exact("embedding_backward (sorted) bf16 dout", g, &dwte);

    // relu^2 bf16 -> bf16, its backward in place on a bf16 gradient; the residual add with a bf16 side.
    let u = Pair::new(g, &randn(&mut rng, 999, 2.0), Bf16);
    let mut hh = Pair::new(g, &vec![f32::NAN; 999], Bf16);
    cpu.relu2_forward(u.c(), hh.cm());
    g.relu2_forward(u.d(), hh.dm());
    exact("relu2_forward bf16", g, &hh);
    let mut du = Pair::new(g, &randn(&mut rng, 999, 1.0), Bf16);
    cpu.relu2_backward(u.c(), du.cm());
    g.relu2_backward(u.d(), du.dm());
    exact("relu2_backward bf16", g, &du);
    let mut x = Pair::new(g, &randn(&mut rng, 999, 1.0), F32);
    cpu.add_inplace(x.cm(), u.c());
    g.add_inplace(x.dm(), u.d());
    exact("add_inplace f32 += bf16", g, &x);
}

fn matmuls_on<D: Backend>(g: &D) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(2);
    let (m, n, k) = (33, 70, 96);
    let a = randn(&mut rng, m * k, 1.0);
    let b = randn(&mut rng, k * n, 0.2);
    // |products| <= max|a| max|b| k; the f32 tolerance of cuda_parity.rs on it.
    let tol = 1e-6 * (k as f64).sqrt() * max_abs(&a) * max_abs(&b) * k as f64;
    for (sa, sb, sc, acc) in [
        (Bf16, Bf16, Bf16, false),
        (Bf16, Bf16, Bf16, true),
        (Bf16, Bf16, F32, true),
        (F32, Bf16, Bf16, false),
        (Bf16, F32, F32, true),
        (F32, F32, Bf16, true),
    ] {
        for (at, bt) in [(false, false), (true, false), (false, true)] {
            let (pa, pb) = (Pair::new(g, &a, sa), Pair::new(g, &b, sb));
            let mut c = Pair::new(g, &randn(&mut rng, m * n, 1.0), sc);
            let shape = Gemm::nn(m, n, k).transposed(at, bt).accumulating(acc);
            cpu.matmul(shape, pa.c(), pb.c(), c.cm());
            g.matmul(shape, pa.d(), pb.d(), c.dm());
            close(
                &format!("matmul {sa:?} x {sb:?} -> {sc:?} accumulate {acc} a_t {at} b_t {bt}"),
                g,
                &c,
                tol,
            );
        }
    }
}

fn norms_on<D: Backend>(g: &D) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(3);
    let (rows, dim) = (50, 192);
    // forward from the f32 stream and from bf16, rstd f32
    for xs in [F32, Bf16] {
        let x = Pair::new(g, &randn(&mut rng, rows * dim, 2.0), xs);
        let mut y = Pair::new(g, &vec![f32::NAN; rows * dim], Bf16);
        let mut r = Pair::new(g, &vec![f32::NAN; rows], F32);
        cpu.rmsnorm_forward(x.c(), rows, dim, RMSNORM_EPS, y.cm(), r.cm());
        g.rmsnorm_forward(x.d(), rows, dim, RMSNORM_EPS, y.dm(), r.dm());
        close(&format!("rmsnorm_forward {xs:?} -> bf16 y"), g, &y, 1e-5 * 4.0);
        close("rmsnorm_forward rstd", g, &r, 1e-5 * max_abs(&r.cpu.0));
        // backward from the saved bf16 y: dy bf16 into the f32 stream's grad (accumulate), dy f32 into bf16
        for (dys, dxs, acc) in [(Bf16, F32, true), (F32, Bf16, false), (Bf16, Bf16, true)] {
            let dy = Pair::new(g, &randn(&mut rng, rows * dim, 1.0), dys);
            let mut dx = Pair::new(g, &randn(&mut rng, rows * dim, 1.0), dxs);
            cpu.rmsnorm_backward(y.c(), r.c(), dy.c(), rows, dim, dx.cm(), acc);
            g.rmsnorm_backward(y.d(), r.d(), dy.d(), rows, dim, dx.dm(), acc);
            let tol = 1e-6 * (dim as f64).sqrt() * 4.0 * max_abs(&r.cpu.0);
            close(
                &format!("rmsnorm_backward dy {dys:?} dx {dxs:?} acc {acc}"),
                g,
                &dx,
                tol,
            );
        }
    }
    // fused rotary + QK-norm, both ways, at a decode position too
    for (batch, t, heads, hd, pos0) in [(2, 9, 3, 64, 0), (1, 5, 2, 128, 7), (2, 4, 4, 16, 3)] {
        let len = batch * t * heads * hd;
        let units = batch * t * heads;
        let table = Pair::new(g, &rotary_table(pos0 + t + 2, hd), F32);
        let mut x = Pair::new(g, &randn(&mut rng, len, 1.5), Bf16);
        let mut y = Pair::new(g, &vec![f32::NAN; len], Bf16);
        let mut r = Pair::new(g, &vec![f32::NAN; units], F32);
        let what = format!("rotary_qknorm {batch}x{t}x{heads}x{hd} pos0 {pos0}");
        let shape = Heads::new(batch, t, heads, hd).from_position(pos0);
        cpu.rotary_qknorm_forward(x.cm(), shape, table.c(), RMSNORM_EPS, y.cm(), r.cm());
        g.rotary_qknorm_forward(x.dm(), shape, table.d(), RMSNORM_EPS, y.dm(), r.dm());
        close(&format!("{what} forward y"), g, &y, 2e-5);
        close(&format!("{what} forward rstd"), g, &r, 1e-5 * max_abs(&r.cpu.0));
        let dy = Pair::new(g, &randn(&mut rng, len, 1.0), Bf16);
        let mut dx = Pair::new(g, &vec![f32::NAN; len], Bf16);
        cpu.rotary_qknorm_backward(y.c(), r.c(), dy.c(), shape, table.c(), dx.cm());
        g.rotary_qknorm_backward(y.d(), r.d(), dy.d(), shape, table.d(), dx.dm());
        let tol = 1e-6 * (hd as f64).sqrt() * 4.0 * max_abs(&r.cpu.0);
        close(&format!("{what} backward dx"), g, &dx, tol);
    }
}

/// Training shapes at head_dim 64 and 128 (flash) and 32 (the widened f32 road), T not a multiple of any tile,
/// GQA; the forward also at a KV-cache decode shape (q_pos0 > 0, a few rows).
fn attention_on<D: Backend>(g: &D) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(4);
    let shapes = [
        AttnShape::causal(2, 80, 4, 2, 64),
        AttnShape::causal(1, 70, 2, 1, 128),
        AttnShape::causal(2, 33, 2, 2, 32),
        AttnShape {
            tq: 3,
            tk: 90,
            q_pos0: 87,
            ..AttnShape::causal(2, 3, 4, 2, 64)
        },
    ];
    for s in shapes {
        let what = format!("attention {s:?}");
        let q = Pair::new(g, &randn(&mut rng, s.q_len(), 1.0), Bf16);
        let k = Pair::new(g, &randn(&mut rng, s.kv_len(), 1.0), Bf16);
        let v = Pair::new(g, &randn(&mut rng, s.kv_len(), 1.0), Bf16);
        let mut o = Pair::new(g, &vec![f32::NAN; s.q_len()], Bf16);
        let mut lse = Pair::new(g, &vec![f32::NAN; s.lse_len()], F32);
        cpu.attention_forward(s, q.c(), k.c(), v.c(), o.cm(), lse.cm());
        g.attention_forward(s, q.d(), k.d(), v.d(), o.dm(), lse.dm());
        close(&format!("{what} out"), g, &o, 1e-3 * max_abs(&o.cpu.0));
        close(&format!("{what} lse"), g, &lse, 1e-4 * max_abs(&lse.cpu.0));
        if s.q_pos0 > 0 {
            continue;
        }
        let dout = Pair::new(g, &randn(&mut rng, s.q_len(), 1.0), Bf16);
        let mut dq = Pair::new(g, &vec![f32::NAN; s.q_len()], Bf16);
        let mut dk = Pair::new(g, &vec![f32::NAN; s.kv_len()], Bf16);
        let mut dv = Pair::new(g, &vec![f32::NAN; s.kv_len()], Bf16);
        // Both sides differentiate their own forward's output (the twin's), as the model's backward does.
        let o_twin = Pair::new(g, &o.cpu.0, Bf16);
        cpu.attention_backward(
            s,
            q.c(),
            k.c(),
            v.c(),
            o_twin.c(),
            lse.c(),
            dout.c(),
            dq.cm(),
            dk.cm(),
            dv.cm(),
        );
        g.attention_backward(
            s,
            q.d(),
            k.d(),
            v.d(),
            o_twin.d(),
            lse.d(),
            dout.d(),
            dq.dm(),
            dk.dm(),
            dv.dm(),
        );
        for (name, p) in [("dq", &dq), ("dk", &dk), ("dv", &dv)] {
            close(&format!("{what} {name}"), g, p, 1e-3 * max_abs(&p.cpu.0));
        }
    }
}

/// 2 layers, d 128, 2 heads of 64 sharing 1 kv head (the flash kernels' head_dim), vocab 211.
fn flash_model() -> ModelConfig {
    ModelConfig::new(2, 128, 2, 1, 64, 211, 80).unwrap()
}

/// The parameters every model of the step comparison gets: the init, perturbed so no gradient is zero.
fn params(cfg: ModelConfig) -> Vec<f32> {
    let mut m = Gpt::new(CpuBackend::new(), cfg, 1, 1, Recompute::None).unwrap();
    m.init(21);
    let mut rng = Rng::new(22);
    let mut p = m.host_params(&mut HostMirror::default()).to_vec();
    for x in &mut p {
        *x += (0.05 * rng.normal()) as f32;
    }
    p
}

/// One micro-step's per-token losses (forward only, first) and every gradient, flattened.
fn step_of<B: Backend>(be: B, cfg: ModelConfig, precision: Precision, p: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (batch, seq) = (2, 80);
    let mut rng = Rng::new(23);
    let n = batch * seq;
    let inputs: Vec<u32> = (0..n)
        .map(|_| (rng.next_u64() % cfg.vocab_size as u64) as u32)
        .collect();
    let targets: Vec<i32> = (0..n)
        .map(|i| {
            if i % 9 == 4 {
                -1
            } else {
                (rng.next_u64() % cfg.vocab_size as u64) as i32
            }
        })
        .collect();
    let mut m = Gpt::with_precision(be, cfg, batch, seq, Recompute::None, precision).unwrap();
    m.set_params_from_host(p).unwrap();
    let mut losses = vec![0.0; n];
    m.forward_losses(&inputs, &targets, &mut losses).unwrap();
    m.zero_grads();
    m.forward_backward(&inputs, &targets, 1.0).unwrap();
    let mut grads = Vec::new();
    for spec in cfg.param_specs() {
        let mut gs = vec![0.0; spec.numel()];
        m.read_grad(&spec.name, &mut gs).unwrap();
        grads.extend(gs);
    }
    (losses, grads)
}

fn distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// A whole bf16 step on the device against the twin's, measured against what bf16 itself moves (the twin
/// against the strict f32 model); and two device runs are identical (deterministic kernels).
fn step_on<D: Backend>(make: &dyn Fn() -> D) {
    let cfg = flash_model();
    let p = params(cfg);
    let (twin_l, twin_g) = step_of(CpuBackend::new(), cfg, Precision::Bf16, &p);
    let (f32_l, f32_g) = step_of(CpuBackend::new(), cfg, Precision::Fp32, &p);
    let (dev_l, dev_g) = step_of(make(), cfg, Precision::Bf16, &p);
    for (what, dev, twin, strict) in [
        ("per-token losses", &dev_l, &twin_l, &f32_l),
        ("gradients", &dev_g, &twin_g, &f32_g),
    ] {
        assert!(dev.iter().all(|x| x.is_finite()), "{what}: not finite on the device");
        let (near, bf16_effect) = (distance(dev, twin), distance(twin, strict));
        eprintln!("bf16 step {what}: device vs twin {near:.3e}, twin vs f32 {bf16_effect:.3e}");
        assert!(
            bf16_effect > 0.0,
            "{what}: the twin equals the f32 model (no rounding?)"
        );
        assert!(
            near <= 0.25 * bf16_effect,
            "{what}: the device is {near:e} from its twin, bf16 itself moves {bf16_effect:e}"
        );
    }
    let (again_l, again_g) = step_of(make(), cfg, Precision::Bf16, &p);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&again_l), bits(&dev_l), "two device runs gave different losses");
    assert_eq!(bits(&again_g), bits(&dev_g), "two device runs gave different gradients");
}

#[test]
fn bf16_casts_fill_embedding_relu2_add_match_the_twin() {
    if let Some(g) = gpu() {
        casts_fill_embedding_relu2_add_on(&g);
    }
}

#[test]
fn bf16_matmuls_match_the_twin() {
    if let Some(g) = gpu() {
        matmuls_on(&g);
    }
}

#[test]
fn bf16_norms_and_fused_rotary_qknorm_match_the_twin() {
    if let Some(g) = gpu() {
        norms_on(&g);
    }
}

#[test]
fn bf16_attention_flash_and_widened_match_the_twin() {
    if let Some(g) = gpu() {
        attention_on(&g);
    }
}

#[test]
fn bf16_step_matches_the_twin_and_repeats_exactly() {
    if gpu().is_some() {
        step_on(&|| CudaBackend::new(0).expect("the CUDA backend started once in this test already"));
    }
}

/// Every body above with the device-like CPU in the device's place: exact agreement, so this proves the
/// harness runs clean (storages, shapes, the nonzero bf16 effect the step comparison divides by) on CI.
#[test]
fn the_harness_runs_clean_with_the_twin_as_device() {
    let g = DeviceLikeCpu::default();
    casts_fill_embedding_relu2_add_on(&g);
    matmuls_on(&g);
    norms_on(&g);
    attention_on(&g);
    step_on(&DeviceLikeCpu::default);
}

/// The comparison sees a moved rounding point: a bf16 output with a quarter of its values one ulp off fails
/// `close` even though each is within tolerance.
#[test]
#[should_panic(expected = "a rounding point moved")]
fn a_moved_rounding_point_fails_the_comparison() {
    let g = DeviceLikeCpu::default();
    let data: Vec<f32> = (0..400).map(|i| round_bf16(1.0 + i as f32 / 512.0)).collect();
    let mut p = Pair::new(&g, &data, Bf16);
    let mut shifted = data.clone();
    for x in shifted.iter_mut().step_by(4) {
        // the next bf16 value up: one ulp, as a rounding tipped the other way would be
        *x = round_bf16(*x + bf16_ulp(*x as f64) as f32);
    }
    g.upload(p.dm(), &shifted);
    close("planted", &g, &p, 0.0);
}
