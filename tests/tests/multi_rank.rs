//! Data parallelism on the CPU (ranks as threads, ZeRO-1): two ranks with one micro-batch each train the
//! same model as one rank accumulating two micro-batches, and a two-rank run resumes bit-exactly.

use nc_core::config::ModelConfig;
use nc_core::optim::OptimConfig;
use nc_core::plan::Horizon;
use nc_core::train::data::DataSource;
use nc_core::train::{train, Resume, TrainConfig};
use std::path::Path;

fn config(out_dir: &Path, world_size: usize, steps: u64) -> TrainConfig {
    TrainConfig {
        model: ModelConfig::new(2, 32, 2, 2, 16, 512, 32).unwrap(),
        device_batch_size: 4,
        total_batch_size: 2 * 4 * 32,
        world_size,
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
        data: DataSource::Embedded {
            vocab_size: 300,
            train_chars: 60_000,
            val_chars: 8_000,
            seed: 7,
        },
        out_dir: out_dir.to_path_buf(),
        resume: Resume::No,
        seed: 42,
        recompute: nc_core::plan::Recompute::None,
        stop_at_step: None,
        verbose: false,
    }
}

fn weights(dir: &Path) -> Vec<f32> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out = Vec::new();
    let mut tensors = st.tensors();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, t) in tensors {
        out.extend(
            t.data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
    }
    out
}

#[test]
fn two_ranks_match_one_rank_with_accumulation() {
    let steps = 6;
    let one_dir = tempfile::tempdir().unwrap();
    let one = train(&config(one_dir.path(), 1, steps)).unwrap();
    let two_dir = tempfile::tempdir().unwrap();
    let two = train(&config(two_dir.path(), 2, steps)).unwrap();
    assert_eq!(one.train_losses.len(), two.train_losses.len());
    for ((s, a), (_, b)) in one.train_losses.iter().zip(&two.train_losses) {
        assert!((a - b).abs() <= 1e-5 * a.abs(), "step {s}: one rank {a}, two ranks {b}");
    }
    let (wa, wb) = (
        weights(&one.last_checkpoint.unwrap()),
        weights(&two.last_checkpoint.clone().unwrap()),
    );
    let scale = wa.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let err = wa.iter().zip(&wb).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(err <= 1e-4 * scale, "final weights differ by {err} (scale {scale})");
    let (va, vb) = (one.evals.last().unwrap().val_loss, two.evals.last().unwrap().val_loss);
    assert!(
        (va - vb).abs() <= 1e-5 * va,
        "final val loss: one rank {va}, two ranks {vb}"
    );
    // each rank saved its own optimizer state
    let ck = two.last_checkpoint.unwrap();
    assert!(ck.join("optim_rank0.safetensors").is_file() && ck.join("optim_rank1.safetensors").is_file());
    let l = &one.train_losses;
    assert!(
        l.last().unwrap().1 < l[0].1 - 0.5,
        "training should make progress: {l:?}"
    );
}

#[test]
fn two_rank_resume_is_bit_exact() {
    let straight_dir = tempfile::tempdir().unwrap();
    let straight = train(&config(straight_dir.path(), 2, 6)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 2, 6);
    cfg.stop_at_step = Some(3);
    let first = train(&cfg).unwrap();
    assert!(first.stopped_early);
    cfg.stop_at_step = None;
    cfg.resume = Resume::Latest;
    let second = train(&cfg).unwrap();
    let got: Vec<u32> = first
        .train_losses
        .iter()
        .chain(&second.train_losses)
        .map(|(_, l)| l.to_bits())
        .collect();
    let want: Vec<u32> = straight.train_losses.iter().map(|(_, l)| l.to_bits()).collect();
    assert_eq!(got, want);
    // resuming with another world size is refused
    let mut other = config(dir.path(), 1, 6);
    other.resume = Resume::Latest;
    assert!(train(&other).unwrap_err().message.contains("--world-size 2"));
}
