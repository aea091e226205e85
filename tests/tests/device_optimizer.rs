//! The device optimizer (`optim::device`, Muon + AdamW and clipping on the Backend ops) against the host
//! optimizer, on the CPU backend and on DeviceLikeCpu (the CPU with its host slices hidden, as a GPU's are):
//! several steps of random parameters and gradients for a tiny model, clipping, and the state's round trip.
//! The JAX reference fixtures run against it in optim_parity.rs.

use nc_core::backend::cpu::CpuBackend;
use nc_core::backend::device_like::DeviceLikeCpu;
use nc_core::backend::Backend;
use nc_core::config::{ModelConfig, ParamKind};
use nc_core::model::Rng;
use nc_core::optim::clip::clip_grad_norm;
use nc_core::optim::device::DeviceOptimizer;
use nc_core::optim::schedule::muon_momentum;
use nc_core::optim::{OptimConfig, Optimizer};
use nc_tests::{change_error, to_backend, to_host};

/// Two layers, n_embd 64: the blocks hold square (64 x 64), tall (c_fc, 256 x 64) and wide (mlp c_proj,
/// 64 x 256) matrices, so both Newton-Schulz orientations run.
fn tiny() -> ModelConfig {
    ModelConfig::new(2, 64, 2, 2, 32, 50, 8).unwrap()
}

fn normal(n: usize, std: f64, rng: &mut Rng) -> Vec<f32> {
    (0..n).map(|_| (rng.normal() * std) as f32).collect()
}

const STEPS: u64 = 6;

/// Measured: the largest Muon error is 6.5e-6 of a matrix's total change since the start (3e-6 to 6.5e-6
/// for every matrix and step, square, tall and wide alike, not growing over the steps), on both backends
/// (DeviceLikeCpu computes exactly as the CPU). The two optimizers differ only in the order of
/// Newton-Schulz's products (host: explicit transposes and gemm's alpha/beta; device: the backend's matmul
/// and separate axpbys); the iteration's polynomial amplifies those f32 roundings (its slope at 0 is
/// a^5 ~ 490) to this size. It is the same size as the host's own error against the JAX reference
/// (optim_parity.rs allows 1e-5 for one step). Deliberately wrong steps were off by far more: without the
/// nesterov term 0.33, with one Newton-Schulz iteration fewer 0.36, with the tall branch reading Y
/// transposed, non-finite. The tolerance is 3x the measurement.
const MUON_TOL: f64 = 2e-5;

/// `STEPS` steps of the device optimizer and of the host optimizer on the same random parameters and
/// gradients (grads of varied scale, a varying lr multiplier, the momentum warmup): Muon's matrices agree
/// within `MUON_TOL` of their change; AdamW's parameters and every optimizer state value agree to the bit
/// (the momentum and the moments depend on the gradients only, and AdamW and the momentum are the same
/// formulas in the same order on both). Returns the largest Muon error, for the log.
fn device_steps_match_host<B: Backend>(be: B) -> f64 {
    let model = tiny();
    let n = model.num_params() as usize;
    let mut rng = Rng::new(11);
    let p0 = normal(n, 0.1, &mut rng);
    let lr_mults = [1.0, 1.0, 0.8, 0.5, 0.25, 0.1];
    let mut host_params = p0.clone();
    let mut host = Optimizer::new(&model, OptimConfig::default(), 0, 1).unwrap();
    let mut params = to_backend(&be, &p0);
    let mut dev = DeviceOptimizer::new(&be, &model, OptimConfig::default()).unwrap();
    let mut worst = 0.0f64;
    for k in 0..STEPS {
        let g = normal(n, 0.01 * (1.0 + k as f64), &mut rng);
        let grads = to_backend(&be, &g);
        let mu = muon_momentum(k * 60);
        host.step(&mut host_params, &g, lr_mults[k as usize], mu);
        dev.step(&be, &mut params, &grads, lr_mults[k as usize], mu);
        assert_eq!(dev.steps_taken(), host.steps_taken());
        let got = to_host(&be, &params);
        for seg in &host.layout().segments {
            let r = seg.range();
            match seg.kind {
                ParamKind::Matrix => {
                    let e = change_error(&got[r.clone()], &host_params[r.clone()], &p0[r]);
                    worst = worst.max(e);
                    assert!(
                        e < MUON_TOL,
                        "step {k}, matrix {}x{} at {}: error {e:e} of its change",
                        seg.rows,
                        seg.cols,
                        seg.start
                    );
                }
                ParamKind::Embedding | ParamKind::Unembedding => {
                    assert_eq!(got[r.clone()], host_params[r], "step {k}: AdamW params differ");
                }
            }
        }
        assert!(
            dev.state_to_host(&be) == host.state(),
            "step {k}: the optimizer state differs"
        );
    }
    worst
}

#[test]
fn device_steps_match_the_host_optimizer_on_the_cpu() {
    let e = device_steps_match_host(CpuBackend::new());
    eprintln!("CpuBackend: largest Muon error {e:e} of the change");
}

#[test]
fn device_steps_match_the_host_optimizer_on_a_device_like_backend() {
    let e = device_steps_match_host(DeviceLikeCpu::default());
    eprintln!("DeviceLikeCpu: largest Muon error {e:e} of the change");
}

/// Clipping: the same norm and the same clipped gradient, to the bit, as `clip_grad_norm`, above and below
/// the threshold and with clipping disabled.
fn clip_matches_host<B: Backend>(be: B) {
    let model = tiny();
    let n = model.num_params() as usize;
    let dev = DeviceOptimizer::new(&be, &model, OptimConfig::default()).unwrap();
    let mut rng = Rng::new(5);
    let g = normal(n, 0.01, &mut rng);
    for max_norm in [0.5, 1000.0, 0.0] {
        let mut host = g.clone();
        let want = clip_grad_norm(&mut host, max_norm);
        let mut grads = to_backend(&be, &g);
        let got = dev.clip(&be, &mut grads, max_norm);
        assert_eq!(
            got.to_bits(),
            want.to_bits(),
            "max_norm {max_norm}: norm {got} vs {want}"
        );
        assert!(
            to_host(&be, &grads) == host,
            "max_norm {max_norm}: clipped grads differ"
        );
    }
    // the first case clipped and the others did not
    let mut once = g.clone();
    assert!(clip_grad_norm(&mut once, 0.5) > 0.5 && once != g);
}

#[test]
fn clip_matches_clip_grad_norm() {
    clip_matches_host(CpuBackend::new());
    clip_matches_host(DeviceLikeCpu::default());
}

/// state_to_host then restore into a fresh optimizer continues exactly as the original would (params and
/// state to the bit), the host optimizer's state restores into the device optimizer, and a state of the
/// wrong size is a clear error.
fn state_round_trip<B: Backend>(be: B) {
    let model = tiny();
    let n = model.num_params() as usize;
    let mut rng = Rng::new(3);
    let p0 = normal(n, 0.1, &mut rng);
    let grads: Vec<Vec<f32>> = (0..4).map(|_| normal(n, 0.02, &mut rng)).collect();
    let mut params = to_backend(&be, &p0);
    let mut dev = DeviceOptimizer::new(&be, &model, OptimConfig::default()).unwrap();
    for (k, g) in grads[..2].iter().enumerate() {
        dev.step(&be, &mut params, &to_backend(&be, g), 1.0, muon_momentum(k as u64));
    }
    let saved = dev.state_to_host(&be);
    assert_eq!(saved.len(), dev.layout().state_len);
    assert!(saved.iter().any(|&x| x != 0.0));
    let mut resumed = DeviceOptimizer::new(&be, &model, OptimConfig::default()).unwrap();
    resumed.restore(&be, &saved, dev.steps_taken()).unwrap();
    assert_eq!(resumed.state_to_host(&be), saved);
    assert_eq!(resumed.steps_taken(), 2);
    let mut resumed_params = to_backend(&be, &to_host(&be, &params));
    for (k, g) in grads[2..].iter().enumerate() {
        let step = 2 + k as u64;
        dev.step(&be, &mut params, &to_backend(&be, g), 0.5, muon_momentum(step));
        resumed.step(&be, &mut resumed_params, &to_backend(&be, g), 0.5, muon_momentum(step));
    }
    assert!(
        to_host(&be, &params) == to_host(&be, &resumed_params),
        "resumed params differ"
    );
    assert!(
        dev.state_to_host(&be) == resumed.state_to_host(&be),
        "resumed state differs"
    );

    // the host optimizer's state is the same layout
    let mut host = Optimizer::new(&model, OptimConfig::default(), 0, 1).unwrap();
    let mut hp = p0.clone();
    host.step(&mut hp, &grads[0], 1.0, muon_momentum(0));
    let mut from_host = DeviceOptimizer::new(&be, &model, OptimConfig::default()).unwrap();
    from_host.restore(&be, host.state(), host.steps_taken()).unwrap();
    assert!(from_host.state_to_host(&be) == host.state());

    let e = from_host.restore(&be, &saved[1..], 2).unwrap_err();
    assert!(e.message.contains("different model"), "{e}");
}

#[test]
fn state_round_trips_through_the_host() {
    state_round_trip(CpuBackend::new());
    state_round_trip(DeviceLikeCpu::default());
}
