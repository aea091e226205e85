//! Whole-model gradient check: the engine's backward against central finite differences of an
//! independent f64 implementation (tests/common), on tiny configs (MHA and GQA, every recompute policy).

mod common;

use common::{model_loss, TestRng};
use nc_core::backend::cpu::CpuBackend;
use nc_core::model::{Gpt, Recompute};
use nc_core::ModelConfig;

struct Case {
    cfg: ModelConfig,
    b: usize,
    t: usize,
}

fn tiny(kv_heads: usize) -> Case {
    // 2 layers, d 32, 2 heads of 16, vocab 37, T 8.
    let cfg = ModelConfig::new(2, 32, 2, kv_heads, 16, 37, 8).unwrap();
    Case { cfg, b: 2, t: 8 }
}

fn random_model(case: &Case, policy: Recompute, seed: u64) -> (Gpt<CpuBackend>, Vec<u32>, Vec<i32>) {
    let mut m = Gpt::new(CpuBackend::new(), case.cfg, case.b, case.t, policy).unwrap();
    let mut rng = TestRng(seed);
    // Random non-zero weights everywhere (the real init zeroes lm_head and c_proj, hiding their grads).
    for v in m.params_mut() {
        *v = (rng.normal() * 0.4) as f32;
    }
    let n = case.b * case.t;
    let inputs: Vec<u32> = (0..n).map(|_| rng.below(case.cfg.vocab_size) as u32).collect();
    let mut targets: Vec<i32> = (0..n).map(|_| rng.below(case.cfg.vocab_size) as i32).collect();
    targets[3] = -1;
    targets[n - 2] = -1;
    (m, inputs, targets)
}

/// For each parameter tensor, a random direction inside it: compare <grad, u> with the central difference
/// of the f64 loss along u. Also compares the f32 loss with the f64 loss.
fn check(case: &Case, policy: Recompute, seed: u64) {
    let (mut m, inputs, targets) = random_model(case, policy, seed);
    m.zero_grads();
    let loss_scale = 0.5;
    let loss = m.forward_backward(&inputs, &targets, loss_scale).unwrap();
    let p64: Vec<f64> = m.params().iter().map(|&v| v as f64).collect();
    let ref_loss = model_loss(&case.cfg, &p64, case.b, case.t, &inputs, &targets);
    assert!(
        ((loss as f64) - ref_loss).abs() <= 1e-5 * ref_loss.abs(),
        "loss {loss} vs f64 reference {ref_loss}"
    );
    let mut rng = TestRng(seed ^ 0xABCD);
    let eps = 1e-4;
    for spec in case.cfg.param_specs() {
        let u: Vec<f64> = (0..spec.numel()).map(|_| rng.normal()).collect();
        let analytic: f64 = m.grads()[spec.range()]
            .iter()
            .zip(&u)
            .map(|(&g, &u)| g as f64 * u)
            .sum::<f64>()
            / loss_scale as f64;
        let mut plus = p64.clone();
        let mut minus = p64.clone();
        for (i, &ui) in spec.range().zip(&u) {
            plus[i] += eps * ui;
            minus[i] -= eps * ui;
        }
        let fd = (model_loss(&case.cfg, &plus, case.b, case.t, &inputs, &targets)
            - model_loss(&case.cfg, &minus, case.b, case.t, &inputs, &targets))
            / (2.0 * eps);
        let err = (analytic - fd).abs();
        assert!(
            err <= 1e-4 * fd.abs() + 1e-6,
            "{}: directional derivative {analytic:.8e} vs finite difference {fd:.8e} (policy {policy:?})",
            spec.name
        );
    }
}

/// MHA (2 kv heads) and GQA (1), and both recompute policies: (kv heads, policy, seed) a case.
#[test]
fn model_grads_match_finite_differences() {
    let cases = [
        (2, Recompute::None, 1),
        (1, Recompute::None, 2),
        (1, Recompute::Full, 3),
        (2, Recompute::Selective, 5),
    ];
    for (kv_heads, policy, seed) in cases {
        check(&tiny(kv_heads), policy, seed);
    }
}

/// Every (kv heads, policy) pair of `kv_heads` and `policies`.
fn pairs(kv_heads: &[usize], policies: &[Recompute]) -> Vec<(usize, Recompute)> {
    kv_heads
        .iter()
        .flat_map(|&kv| policies.iter().map(move |&policy| (kv, policy)))
        .collect()
}

/// Selective and full recomputation give the grads of keeping everything, bit for bit, over two
/// accumulated micro-batches (so a stale recompute buffer from the first call would show in the second).
#[test]
fn recompute_gives_identical_grads() {
    for (kv, policy) in pairs(&[1, 2], &[Recompute::Full, Recompute::Selective]) {
        let case = tiny(kv);
        let (mut a, inputs, targets) = random_model(&case, Recompute::None, 7);
        let (mut b, _, _) = random_model(&case, policy, 7);
        a.zero_grads();
        b.zero_grads();
        let rev: Vec<u32> = inputs.iter().rev().copied().collect();
        for ids in [&inputs, &rev] {
            let la = a.forward_backward(ids, &targets, 0.5).unwrap();
            let lb = b.forward_backward(ids, &targets, 0.5).unwrap();
            assert_eq!(la, lb, "{policy:?}");
        }
        assert!(a.grads().iter().any(|&g| g != 0.0));
        assert_eq!(
            a.grads(),
            b.grads(),
            "{policy:?} (kv {kv}): recompute must not change a single bit of the grads"
        );
    }
}

#[test]
fn grads_accumulate_over_calls() {
    let case = tiny(2);
    let (mut m, inputs, targets) = random_model(&case, Recompute::None, 11);
    m.zero_grads();
    m.forward_backward(&inputs, &targets, 1.0).unwrap();
    let once = m.grads().to_vec();
    m.forward_backward(&inputs, &targets, 0.5).unwrap();
    for (i, (&g2, &g1)) in m.grads().iter().zip(&once).enumerate() {
        assert!(
            (g2 - 1.5 * g1).abs() <= 1e-6 * g1.abs().max(1e-3),
            "grad {i}: {g2} vs 1.5 x {g1}"
        );
    }
    m.zero_grads();
    assert!(m.grads().iter().all(|&g| g == 0.0));
}

#[test]
fn forward_losses_match_reference_per_token() {
    let case = tiny(1);
    let (mut m, inputs, targets) = random_model(&case, Recompute::None, 5);
    let mut out = vec![0.0f32; case.b * case.t];
    m.forward_losses(&inputs, &targets, &mut out).unwrap();
    let counted = targets.iter().filter(|&&t| t >= 0).count() as f64;
    let mean = out.iter().map(|&l| l as f64).sum::<f64>() / counted;
    let p64: Vec<f64> = m.params().iter().map(|&v| v as f64).collect();
    let ref_loss = model_loss(&case.cfg, &p64, case.b, case.t, &inputs, &targets);
    assert!((mean - ref_loss).abs() <= 1e-5 * ref_loss, "{mean} vs {ref_loss}");
    for (l, t) in out.iter().zip(&targets) {
        if *t < 0 {
            assert_eq!(*l, 0.0);
        } else {
            assert!(*l > 0.0);
        }
    }
}

#[test]
fn bad_batches_are_errors() {
    let case = tiny(2);
    let (mut m, mut inputs, targets) = random_model(&case, Recompute::None, 9);
    assert!(m.forward_backward(&inputs[1..], &targets[1..], 1.0).is_err());
    inputs[0] = 37;
    let e = m.forward_backward(&inputs, &targets, 1.0).unwrap_err();
    assert!(e.message.contains("vocabulary"), "{e}");
    inputs[0] = 0;
    let mut bad_t = targets.clone();
    bad_t[1] = -2;
    assert!(m.forward_backward(&inputs, &bad_t, 1.0).is_err());
    assert!(Gpt::new(CpuBackend::new(), case.cfg, 1, 9, Recompute::None).is_err());
}

#[test]
fn activation_layout_is_what_the_model_allocates() {
    for (kv, policy) in pairs(&[2, 1], &[Recompute::None, Recompute::Selective, Recompute::Full]) {
        let cfg = ModelConfig::new(3, 32, 2, kv, 16, 37, 16).unwrap();
        let m = Gpt::new(CpuBackend::new(), cfg, 2, 16, policy).unwrap();
        let layout = nc_core::model::activation_layout(&cfg, 2, 16, policy);
        assert_eq!(m.allocated_activation_elements(), layout.total, "kv {kv}, {policy:?}");
        assert_eq!(layout.layer_sets, if policy == Recompute::Full { 1 } else { 3 });
        assert_eq!(layout.hidden_sets, if policy == Recompute::None { 3 } else { 1 });
    }
}
