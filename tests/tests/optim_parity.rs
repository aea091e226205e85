//! The optimizers against the independent JAX/numpy reference (tests/reference, fixtures committed):
//! one Muon step, one AdamW step, the lr and momentum schedule, and five full optimizer steps (clipping,
//! Muon and AdamW, lr scaling) on the tiny model's contiguous buffers. The Muon, AdamW and five-step
//! fixtures run twice more with the device optimizer (`optim::device`, on the Backend ops), on the CPU
//! backend and on DeviceLikeCpu, at the same tolerances.

use nc_core::backend::cpu::CpuBackend;
use nc_core::backend::device_like::DeviceLikeCpu;
use nc_core::backend::{Backend, View, ViewMut};
use nc_core::config::ModelConfig;
use nc_core::optim::adamw::{adamw_update, AdamParams};
use nc_core::optim::clip::clip_grad_norm;
use nc_core::optim::device::{adamw_update_on, muon_update_on, DeviceOptimizer, MuonScratch};
use nc_core::optim::muon::{muon_update, NsWorkspace};
use nc_core::optim::schedule::{muon_momentum, LrSchedule};
use nc_core::optim::{OptimConfig, Optimizer};
use nc_tests::fixtures::{f32s, fixture};
use nc_tests::{change_error, max_abs_diff, to_backend, to_host};
use safetensors::SafeTensors;
use std::collections::HashMap;

fn metadata(bytes: &[u8]) -> HashMap<String, String> {
    let (_, meta) = SafeTensors::read_metadata(bytes).unwrap();
    meta.metadata().clone().unwrap_or_default()
}

/// The AdamW fixture's hyperparameters, learning rate and step number (its metadata).
fn adamw_fixture_settings(bytes: &[u8]) -> (AdamParams, f32, u64) {
    let meta = metadata(bytes);
    let get = |k: &str| -> f32 { meta[k].parse().unwrap() };
    let h = AdamParams {
        beta1: get("beta1"),
        beta2: get("beta2"),
        eps: get("eps"),
        weight_decay: get("weight_decay"),
    };
    (h, get("lr"), meta["step"].parse().unwrap())
}

/// The Muon fixture's two matrices: (tag of its tensors, rows, cols).
const MUON_MATRICES: [(&str, usize, usize); 2] = [("tall", 48, 24), ("wide", 24, 48)];

/// The Muon fixture's learning rate and momentum (its metadata).
fn muon_fixture_settings(bytes: &[u8]) -> (f32, f32) {
    let meta = metadata(bytes);
    (meta["lr"].parse().unwrap(), meta["momentum"].parse().unwrap())
}

/// A Muon step's outputs against the fixture's `{tag}.param_out` (the update's relative error) and
/// `{tag}.buf_out` (the momentum, absolutely).
fn check_muon_outputs(st: &SafeTensors, tag: &str, p: &[f32], buf: &[f32], before: &[f32]) {
    let e = change_error(p, &f32s(st, &format!("{tag}.param_out")), before);
    assert!(e < 1e-5, "{tag}: param error {e:e} of the update");
    let want_buf = f32s(st, &format!("{tag}.buf_out"));
    let eb = max_abs_diff(buf, &want_buf);
    assert!(eb < 1e-6, "{tag}: momentum error {eb:e}");
}

/// An AdamW step's outputs against the fixture's `param_out` (the update's relative error), `m_out` and
/// `v_out` (relative to each one's largest value).
fn check_adamw_outputs(st: &SafeTensors, p: &[f32], m: &[f32], v: &[f32], before: &[f32]) {
    let e = change_error(p, &f32s(st, "param_out"), before);
    assert!(e < 1e-5, "param error {e:e} of the update");
    for (got, name) in [(m, "m_out"), (v, "v_out")] {
        let want = f32s(st, name);
        let scale = want.iter().fold(0.0f32, |a, b| a.max(b.abs()));
        let err = max_abs_diff(got, &want);
        assert!(err <= 1e-6 * scale, "{name}: {err:e} of {scale:e}");
    }
}

#[test]
fn muon_step_matches_reference() {
    let bytes = fixture("muon_step.safetensors");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (lr, mu) = muon_fixture_settings(&bytes);
    for (tag, rows, cols) in MUON_MATRICES {
        let mut p = f32s(&st, &format!("{tag}.param"));
        let before = p.clone();
        let g = f32s(&st, &format!("{tag}.grad"));
        let mut buf = f32s(&st, &format!("{tag}.buf"));
        let mut upd = vec![0.0; rows * cols];
        let mut ws = NsWorkspace::for_shapes([(rows, cols)].into_iter());
        muon_update(&mut p, &g, &mut buf, &mut upd, rows, cols, lr, mu, &mut ws);
        check_muon_outputs(&st, &tag, &p, &buf, &before);
    }
}

#[test]
fn adamw_step_matches_reference() {
    let bytes = fixture("adamw_step.safetensors");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (h, lr, t) = adamw_fixture_settings(&bytes);
    let mut p = f32s(&st, "param");
    let before = p.clone();
    let (mut m, mut v) = (f32s(&st, "m"), f32s(&st, "v"));
    adamw_update(&mut p, &f32s(&st, "grad"), &mut m, &mut v, lr, t, &h);
    check_adamw_outputs(&st, &p, &m, &v, &before);
}

#[test]
fn schedule_matches_reference() {
    let text = String::from_utf8(fixture("schedule.json")).unwrap();
    let j: serde_json::Value = serde_json::from_str(&text).unwrap();
    let s = LrSchedule {
        num_iterations: j["num_iterations"].as_u64().unwrap(),
        warmup_ratio: j["warmup_ratio"].as_f64().unwrap(),
        warmdown_ratio: j["warmdown_ratio"].as_f64().unwrap(),
        final_lr_frac: j["final_lr_frac"].as_f64().unwrap(),
    };
    assert_eq!(s.warmup_iters(), j["warmup_iters"].as_u64().unwrap());
    assert_eq!(s.warmdown_iters(), j["warmdown_iters"].as_u64().unwrap());
    let lr = j["lr_mult"].as_array().unwrap();
    let mom = j["muon_momentum"].as_array().unwrap();
    assert_eq!(lr.len() as u64, s.num_iterations + 1);
    for (it, (l, m)) in lr.iter().zip(mom).enumerate() {
        let (l, m) = (l.as_f64().unwrap(), m.as_f64().unwrap());
        assert!((s.lr_multiplier(it as u64) - l).abs() < 1e-12, "lr_mult[{it}]");
        assert!(
            (muon_momentum(it as u64) as f64 - m).abs() < 1e-7,
            "muon_momentum[{it}]"
        );
    }
}

/// The five-step fixture: the tiny model, the schedule, the reference's gradient norms and lr multipliers,
/// and each of its named buffers ("init", "grad{k}", "step{k}") gathered into the contiguous layout.
struct FiveSteps {
    bytes: Vec<u8>,
    model: ModelConfig,
    schedule: LrSchedule,
    want_norms: Vec<f64>,
    want_lr: Vec<f64>,
}

impl FiveSteps {
    fn load() -> Self {
        let bytes = fixture("optim_5steps.safetensors");
        let meta = metadata(&bytes);
        let num = |k: &str| -> usize { meta[k].parse().unwrap() };
        let model = ModelConfig::new(
            num("n_layer"),
            num("n_embd"),
            num("n_head"),
            num("n_kv_head"),
            num("head_dim"),
            num("vocab_size"),
            num("sequence_len"),
        )
        .unwrap();
        let floats = |k: &str| -> Vec<f64> { meta[k].split(',').map(|x| x.parse().unwrap()).collect() };
        let schedule = LrSchedule {
            num_iterations: num("num_iterations") as u64,
            warmup_ratio: meta["warmup_ratio"].parse().unwrap(),
            warmdown_ratio: meta["warmdown_ratio"].parse().unwrap(),
            final_lr_frac: meta["final_lr_frac"].parse().unwrap(),
        };
        FiveSteps {
            model,
            schedule,
            want_norms: floats("grad_total_norm"),
            want_lr: floats("lr_mult"),
            bytes,
        }
    }

    fn gather(&self, prefix: &str) -> Vec<f32> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let mut buf = vec![0.0f32; self.model.num_params() as usize];
        for s in &self.model.param_specs() {
            let t = f32s(&st, &format!("{prefix}.{}", s.name));
            assert_eq!(t.len(), s.numel(), "{prefix}.{}", s.name);
            buf[s.range()].copy_from_slice(&t);
        }
        buf
    }
}

/// Five steps of the whole optimizer on the tiny model: clip the raw gradient, then Muon + AdamW.
#[test]
fn five_optimizer_steps_match_reference() {
    let fx = FiveSteps::load();
    let (model, schedule) = (fx.model, fx.schedule);
    let (want_norms, want_lr) = (&fx.want_norms, &fx.want_lr);
    let specs = model.param_specs();
    let gather = |prefix: &str| fx.gather(prefix);
    let mut params = gather("init");
    let init = params.clone();
    let mut opt = Optimizer::new(&model, OptimConfig::default(), 0, 1).unwrap();
    for k in 0..5u64 {
        let mut grads = gather(&format!("grad{k}"));
        let norm = clip_grad_norm(&mut grads, 1.0);
        assert!(
            (norm / want_norms[k as usize] - 1.0).abs() < 1e-6,
            "step {k}: norm {norm}"
        );
        let lr_mult = schedule.lr_multiplier(k);
        assert_eq!(lr_mult, want_lr[k as usize]);
        opt.step(&mut params, &grads, lr_mult, muon_momentum(k));
        let want = gather(&format!("step{k}"));
        for s in &specs {
            let e = change_error(&params[s.range()], &want[s.range()], &init[s.range()]);
            assert!(e < 2e-5, "step {k} {}: error {e:e} of the total change", s.name);
        }
    }
}

fn device_muon_step_matches_reference<B: Backend>(be: B) {
    let bytes = fixture("muon_step.safetensors");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (lr, mu) = muon_fixture_settings(&bytes);
    for (tag, rows, cols) in MUON_MATRICES {
        let before = f32s(&st, &format!("{tag}.param"));
        let mut p = to_backend(&be, &before);
        let g = to_backend(&be, &f32s(&st, &format!("{tag}.grad")));
        let mut buf = to_backend(&be, &f32s(&st, &format!("{tag}.buf")));
        let mut scratch = MuonScratch::for_shapes(&be, [(rows, cols)].into_iter());
        muon_update_on(
            &be,
            ViewMut::all(&mut p),
            View::all(&g),
            ViewMut::all(&mut buf),
            rows,
            cols,
            lr,
            mu,
            &mut scratch,
        );
        check_muon_outputs(&st, &tag, &to_host(&be, &p), &to_host(&be, &buf), &before);
    }
}

#[test]
fn device_muon_step_matches_reference_on_both_backends() {
    device_muon_step_matches_reference(CpuBackend::new());
    device_muon_step_matches_reference(DeviceLikeCpu::default());
}

fn device_adamw_step_matches_reference<B: Backend>(be: B) {
    let bytes = fixture("adamw_step.safetensors");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (h, lr, t) = adamw_fixture_settings(&bytes);
    let before = f32s(&st, "param");
    let mut p = to_backend(&be, &before);
    let (mut m, mut v) = (to_backend(&be, &f32s(&st, "m")), to_backend(&be, &f32s(&st, "v")));
    let g = to_backend(&be, &f32s(&st, "grad"));
    adamw_update_on(
        &be,
        ViewMut::all(&mut p),
        View::all(&g),
        ViewMut::all(&mut m),
        ViewMut::all(&mut v),
        lr,
        t,
        &h,
    );
    check_adamw_outputs(&st, &to_host(&be, &p), &to_host(&be, &m), &to_host(&be, &v), &before);
}

#[test]
fn device_adamw_step_matches_reference_on_both_backends() {
    device_adamw_step_matches_reference(CpuBackend::new());
    device_adamw_step_matches_reference(DeviceLikeCpu::default());
}

/// The five steps again with the device optimizer: its clip, then its step.
fn device_five_optimizer_steps_match_reference<B: Backend>(be: B) {
    let fx = FiveSteps::load();
    let (model, schedule) = (fx.model, fx.schedule);
    let (want_norms, want_lr) = (&fx.want_norms, &fx.want_lr);
    let specs = model.param_specs();
    let gather = |prefix: &str| fx.gather(prefix);
    let init = gather("init");
    let mut params = to_backend(&be, &init);
    let mut opt = DeviceOptimizer::new(&be, &model, OptimConfig::default()).unwrap();
    for k in 0..5u64 {
        let mut grads = to_backend(&be, &gather(&format!("grad{k}")));
        let norm = opt.clip(&be, &mut grads, 1.0);
        assert!(
            (norm / want_norms[k as usize] - 1.0).abs() < 1e-6,
            "step {k}: norm {norm}"
        );
        let lr_mult = schedule.lr_multiplier(k);
        assert_eq!(lr_mult, want_lr[k as usize]);
        opt.step(&be, &mut params, &grads, lr_mult, muon_momentum(k));
        let (got, want) = (to_host(&be, &params), gather(&format!("step{k}")));
        for s in &specs {
            let e = change_error(&got[s.range()], &want[s.range()], &init[s.range()]);
            assert!(e < 2e-5, "step {k} {}: error {e:e} of the total change", s.name);
        }
    }
}

#[test]
fn device_five_optimizer_steps_match_reference_on_both_backends() {
    device_five_optimizer_steps_match_reference(CpuBackend::new());
    device_five_optimizer_steps_match_reference(DeviceLikeCpu::default());
}
