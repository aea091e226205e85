//! `--precision bf16` on the CPU backend (the twin of the bf16 engine) trains: a short run on a tiny model
//! learns, its losses differ from the f32 run's (the rounding is real) and its final validation bpb is
//! within 2% of the f32 run's. The 500-step depth-4 comparison is in BENCHMARKS.md.

use nc_core::config::ModelConfig;
use nc_core::optim::OptimConfig;
use nc_core::plan::{Horizon, Precision, Recompute};
use nc_core::train::data::DataSource;
use nc_core::train::{train, Resume, RunSummary, TrainConfig};
use std::path::Path;

fn run(out_dir: &Path, precision: Precision) -> RunSummary {
    let cfg = TrainConfig {
        model: ModelConfig::new(2, 64, 2, 2, 32, 512, 32).unwrap(),
        device_batch_size: 4,
        total_batch_size: 2 * 4 * 32,
        world_size: 1,
        horizon: Horizon::Iterations(40),
        optim: OptimConfig::default(),
        grad_clip: 1.0,
        warmup_ratio: 0.0,
        warmdown_ratio: 0.2,
        final_lr_frac: 0.0,
        eval_every: 0,
        eval_tokens: 8 * 4 * 32,
        sample_every: 0,
        save_every: 0,
        sample_tokens: 4,
        model_tag: "twin".into(),
        data: DataSource::Embedded {
            vocab_size: 300,
            train_chars: 60_000,
            val_chars: 8_000,
            seed: 7,
        },
        out_dir: out_dir.to_path_buf(),
        resume: Resume::No,
        seed: 42,
        recompute: Recompute::None,
        precision,
        stop_at_step: None,
        profile_steps: None,
        verbose: false,
    };
    train(&cfg).unwrap()
}

#[test]
fn bf16_twin_learns_like_f32_but_not_identically() {
    let dir = tempfile::tempdir().unwrap();
    let f32_run = run(&dir.path().join("f32"), Precision::Fp32);
    let bf16_run = run(&dir.path().join("bf16"), Precision::Bf16);
    let first = bf16_run.evals.first().unwrap().val_bpb;
    let last = bf16_run.evals.last().unwrap().val_bpb;
    let last_f32 = f32_run.evals.last().unwrap().val_bpb;
    eprintln!("val bpb: bf16 {first:.4} -> {last:.4}, f32 -> {last_f32:.4}");
    assert!(last < 0.8 * first, "bf16 did not learn: {first} -> {last}");
    assert!((last / last_f32 - 1.0).abs() <= 0.02, "bf16 {last} vs f32 {last_f32}");
    let differing = f32_run
        .train_losses
        .iter()
        .zip(&bf16_run.train_losses)
        .filter(|(a, b)| a.1 != b.1)
        .count();
    assert!(
        differing >= f32_run.train_losses.len() - 1,
        "only {differing} step losses differ"
    );
}
