//! What the training tests share: the small run they start from (train_resume, multi_rank, bf16_twin_train,
//! p2p_twin_train, nvtx_ranges, plan_matches_run each wrote its own copy of these 30 lines: a 2-layer,
//! 32-wide model on the embedded corpus, a step in milliseconds), the device-like CPU device, and the loss
//! gap between two runs. A test states only what it is about, with
//! struct-update syntax, so its own values stand out:
//! `TrainConfig { eval_every: 3, ..tiny_train_config(dir, 10) }`.

use nc_core::backend::device_like::DeviceLikeCpu;
use nc_core::config::{ModelConfig, ParamKind};
use nc_core::data::run_data::DataSource;
use nc_core::optim::shard::ShardLayout;
use nc_core::optim::OptimConfig;
use nc_core::plan::{Horizon, Precision, Recompute};
use nc_core::train::{Device, Resume, TrainConfig};
use std::path::Path;

/// One rank, fp32, `steps` steps of two micro-batches of 4 x 32 tokens; no evaluation, sampling or saving
/// until a test asks for them; seeds fixed.
pub fn tiny_train_config(out_dir: &Path, steps: u64) -> TrainConfig {
    TrainConfig {
        model: ModelConfig::new(2, 32, 2, 2, 16, 512, 32).unwrap(),
        device_batch_size: 4,
        total_batch_size: 2 * 4 * 32,
        world_size: 1,
        horizon: Horizon::Iterations(steps),
        optim: OptimConfig::default(),
        grad_clip: 1.0,
        warmup_ratio: 0.0,
        warmdown_ratio: 0.2,
        final_lr_frac: 0.0,
        eval_every: 0,
        eval_tokens: 4 * 32,
        sample_every: 0,
        save_every: 0,
        sample_tokens: 4,
        model_tag: "tiny".into(),
        data: embedded_corpus(60_000, 8_000, 7),
        out_dir: out_dir.to_path_buf(),
        resume: Resume::No,
        seed: 42,
        recompute: Recompute::None,
        precision: Precision::Fp32,
        stop_at_step: None,
        profile_steps: None,
        core_metric: Default::default(),
        verbose: false,
    }
}

/// The embedded corpus under a 300-token tokenizer, of the given sizes and generator seed.
pub fn embedded_corpus(train_chars: usize, val_chars: usize, seed: u64) -> DataSource {
    DataSource::Embedded {
        vocab_size: 300,
        train_chars,
        val_chars,
        seed,
    }
}

/// The CPU backend with its host access hidden (`DeviceLikeCpu`) as a training device: the loop takes the
/// path a GPU takes (the device optimizer, checkpoints by download and upload).
pub fn device_like_cpu(precision: Precision) -> Device<DeviceLikeCpu> {
    Device {
        be: DeviceLikeCpu::default(),
        peak_flops: 1e9,
        peak_how: "a test".into(),
        memory_bytes: None,
        memory_name: "test memory".into(),
        replicas_sharing_memory: 1,
        precision,
    }
}

/// The largest relative difference between two runs' losses, step by step (the steps must match); a NaN
/// difference is infinite.
pub fn loss_gap(a: &[(u64, f32)], b: &[(u64, f32)]) -> f64 {
    assert_eq!(
        a.iter().map(|x| x.0).collect::<Vec<_>>(),
        b.iter().map(|x| x.0).collect::<Vec<_>>()
    );
    a.iter()
        .zip(b)
        .map(|(x, y)| ((x.1 as f64 - y.1 as f64) / y.1 as f64).abs())
        .fold(0.0, |m, d| if d.is_nan() { f64::INFINITY } else { m.max(d) })
}

/// How many Muon matrices (`ParamKind::Matrix` segments) a shard layout holds.
pub fn muon_matrices(layout: &ShardLayout) -> usize {
    layout.segments.iter().filter(|s| s.kind == ParamKind::Matrix).count()
}
