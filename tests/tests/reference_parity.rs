//! The CPU engine against the independent JAX float64 reference (tests/reference, fixtures committed):
//! loss, every parameter gradient, and the last-position logits of a KV-cache forward, for two tiny
//! configs (full MHA, and GQA with 3 layers).
//!
//! Metric per tensor: ||ours - ref||_2 / ||ref||_2 <= 1e-5 (f32 engine vs f64 reference rounded to f32).

use nc_core::backend::cpu::CpuBackend;
use nc_core::model::{Gpt, Recompute};
use nc_core::sample::Sampler;
use nc_core::ModelConfig;
use nc_tests::fixtures::{f32s, fixture, i32s};
use safetensors::SafeTensors;
use std::collections::HashMap;

const TOL: f64 = 1e-5;

fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let err: f64 = got.iter().zip(want).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum();
    let norm: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    assert!(
        norm > 0.0,
        "reference tensor is all zero: the comparison would prove nothing"
    );
    (err / norm).sqrt()
}

fn parity(file: &str) {
    let bytes = fixture(file);
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta: HashMap<String, String> = meta.metadata().clone().unwrap_or_default();
    let get = |k: &str| -> usize { meta[k].parse().unwrap_or_else(|e| panic!("metadata {k}: {e}")) };
    let eps: f64 = meta["rmsnorm_eps"].parse().unwrap();
    assert_eq!(
        eps,
        nc_core::config::RMSNORM_EPS as f64,
        "{file}: the reference used another rmsnorm eps"
    );
    let cfg = ModelConfig::new(
        get("n_layer"),
        get("n_embd"),
        get("n_head"),
        get("n_kv_head"),
        get("head_dim"),
        get("vocab_size"),
        get("sequence_len"),
    )
    .unwrap();
    let idx = i32s(&st, "idx");
    let targets = i32s(&st, "targets");
    let t = cfg.sequence_len;
    let b = idx.len() / t;
    assert_eq!(b, get("batch_size"));

    let mut model = Gpt::new(CpuBackend::new(), cfg, b, t, Recompute::None).unwrap();
    for spec in cfg.param_specs() {
        model.write_param(&spec.name, &f32s(&st, &spec.name)).unwrap();
    }
    model.zero_grads();
    let inputs: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
    let loss = model.forward_backward(&inputs, &targets, 1.0).unwrap();
    let want_loss = f32s(&st, "loss")[0];
    let loss_err = ((loss - want_loss) / want_loss).abs() as f64;
    println!("{file}: loss {loss} vs {want_loss} (rel {loss_err:.2e})");
    assert!(loss_err <= TOL, "{file}: loss {loss} vs reference {want_loss}");

    let mut worst = 0.0f64;
    for spec in cfg.param_specs() {
        let mut g = vec![0.0f32; spec.numel()];
        model.read_grad(&spec.name, &mut g).unwrap();
        let e = rel_l2(&g, &f32s(&st, &format!("grad.{}", spec.name)));
        worst = worst.max(e);
        assert!(e <= TOL, "{file}: grad of {} off by {e:.3e} (relative L2)", spec.name);
    }
    println!("{file}: worst gradient relative L2 error {worst:.2e}");

    let prompt: Vec<u32> = i32s(&st, "prompt").iter().map(|&i| i as u32).collect();
    let mut sampler = Sampler::new(&model, t).unwrap();
    let logits = sampler.logits_for_last_position(&mut model, &prompt).unwrap();
    let e = rel_l2(&logits, &f32s(&st, "logits_last"));
    println!("{file}: logits_last relative L2 error {e:.2e}");
    assert!(e <= TOL, "{file}: logits_last off by {e:.3e}");
    // The same logits through the cache, one token at a time.
    sampler.reset();
    let mut last = Vec::new();
    for &tok in &prompt {
        last = sampler.extend(&mut model, &[tok]).unwrap().to_vec();
    }
    let e = rel_l2(&last, &f32s(&st, "logits_last"));
    assert!(e <= TOL, "{file}: token-by-token logits_last off by {e:.3e}");
}

#[test]
fn tiny_mha_matches_jax_reference() {
    parity("tiny_mha.safetensors");
}

#[test]
fn tiny_gqa_matches_jax_reference() {
    parity("tiny_gqa.safetensors");
}
