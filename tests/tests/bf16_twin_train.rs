//! `--precision bf16` on the CPU backend (the twin of the bf16 engine) trains: a short run on a tiny model
//! learns, its losses differ from the f32 run's (the rounding is real) and its final validation bpb is
//! within 2% of the f32 run's. The 500-step depth-4 comparison is in BENCHMARKS.md. And the twin's optimizer
//! is the engine's: it steps bit for bit as the device path does.

use nc_core::config::ModelConfig;
use nc_core::plan::Precision;
use nc_core::train::{train, RunSummary, TrainConfig};
use nc_tests::harness::{device_like_cpu, tiny_train_config};
use std::path::Path;

fn config(out_dir: &Path, precision: Precision, steps: u64) -> TrainConfig {
    TrainConfig {
        model: ModelConfig::new(2, 64, 2, 2, 32, 512, 32).unwrap(),
        eval_tokens: 8 * 4 * 32,
        model_tag: "twin".into(),
        precision,
        ..tiny_train_config(out_dir, steps)
    }
}

fn run(out_dir: &Path, precision: Precision) -> RunSummary {
    train(&config(out_dir, precision, 40)).unwrap()
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

/// The twin's optimizer is the bf16 engine's (`optim::device`: Muon's Newton-Schulz batched over same-shape
/// matrices in bf16, `backend::ns_bf16`, and the multi-tensor updates writing the bf16 working copy): a bf16
/// run on the CPU backend (host buffers) and on `DeviceLikeCpu` (the CPU with its buffers hidden, so the
/// training loop takes the path a GPU takes) agree to the bit: every train loss, the final weights and the
/// optimizer state. A twin whose Muon ran the host optimizer's f32 Newton-Schulz differs within four steps
/// (planted: the third loss differed).
#[test]
fn bf16_twin_steps_as_the_device_path_does() {
    use nc_core::train::train_on;
    let dir = tempfile::tempdir().unwrap();
    let steps = 4;
    let twin = train(&config(&dir.path().join("twin"), Precision::Bf16, steps)).unwrap();
    let device = device_like_cpu(Precision::Bf16);
    let dev = train_on(&config(&dir.path().join("device"), Precision::Bf16, steps), device).unwrap();
    let bits =
        |s: &RunSummary| -> Vec<(u64, u32)> { s.train_losses.iter().map(|(st, l)| (*st, l.to_bits())).collect() };
    assert_eq!(bits(&twin).len(), steps as usize);
    assert_eq!(bits(&twin), bits(&dev), "train losses");
    let (a, b) = (twin.last_checkpoint.unwrap(), dev.last_checkpoint.unwrap());
    for file in ["model.safetensors", "optim_rank0.safetensors"] {
        let read = |d: &Path| std::fs::read(d.join(file)).unwrap();
        assert!(
            read(&a) == read(&b),
            "{file} differs between the twin and the device path"
        );
    }
}
