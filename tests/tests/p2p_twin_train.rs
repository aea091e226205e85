//! The whole training loop over the peer-to-peer ring's exchange, on the CPU: `DeviceLikeCpu` ranks (buffers
//! not host-visible, the device optimizer, as on a GPU) whose ZeRO-1 runs through `zero1_p2p::RingExchange`
//! over `TwinRing` (the P2P ring's host twin: the plan tables the GPU kernels get, their arithmetic, and the
//! ring's own host collectives for the loss, the norm, evaluation and checkpoints), against the same ranks
//! over `StagedRanks` (the thread ring). What `--comm ring` on CUDA runs, minus the kernels.
//!
//! Bit for bit: at world size 2 everything (losses, evaluations, saved weights); at world size 3 the saved
//! weights, with clipping off, since the P2P ring's host all-reduce of one float (the loss, the norm) sums
//! one-shot in rank order 0, 1, 2 where the thread ring sums 1, 2, 0: reported losses may then differ in
//! their last bit (bounded here), and a clip factor would too.

use nc_comm::{P2pOptions, P2pTwin, ThreadRing};
use nc_core::backend::device_like::DeviceLikeCpu;
use nc_core::plan::Precision;
use nc_core::train::zero1::{RankCollective, StagedRanks};
use nc_core::train::zero1_p2p::{RingExchange, TwinRing};
use nc_core::train::{train_as_rank, RunSummary, TrainConfig};
use nc_tests::harness::{device_like_cpu, tiny_train_config};
use std::path::Path;

fn config(out_dir: &Path, world_size: usize, precision: Precision, grad_clip: f64) -> TrainConfig {
    TrainConfig {
        device_batch_size: 2,
        total_batch_size: 2 * 2 * 32 * world_size,
        world_size,
        grad_clip,
        eval_every: 4,
        eval_tokens: 2 * 2 * 32 * world_size,
        model_tag: "p2p".into(),
        precision,
        ..tiny_train_config(out_dir, 5)
    }
}

/// Slices of 128 f32 partials: every matrix of the model takes several slices (and every bucket several
/// tensors), so the tables pipeline as on the GPU; one-shot all-reduce up to 64 bytes (the loss and norm).
fn opts() -> P2pOptions {
    P2pOptions {
        blocks: 2,
        slots: 2,
        slot_bytes: 256,
        one_shot_bytes: 64,
        timeout: std::time::Duration::from_secs(120),
    }
}

/// Rank 0's summary of a run of `cfg.world_size` thread ranks, each with the collective `comm(rank)` gives.
fn run(cfg: &TrainConfig, comms: Vec<Box<dyn RankCollective<DeviceLikeCpu>>>) -> RunSummary {
    let runs: Vec<RunSummary> = std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                scope.spawn(move || train_as_rank(cfg, rank, Some(comm), device_like_cpu(cfg.precision)).unwrap())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    runs.into_iter().next().unwrap()
}

fn staged(world: usize) -> Vec<Box<dyn RankCollective<DeviceLikeCpu>>> {
    ThreadRing::new(world)
        .into_iter()
        .map(|r| Box::new(StagedRanks::new(Box::new(r))) as Box<dyn RankCollective<DeviceLikeCpu>>)
        .collect()
}

fn p2p(world: usize) -> Vec<Box<dyn RankCollective<DeviceLikeCpu>>> {
    P2pTwin::new(world, opts())
        .into_iter()
        .map(|r| Box::new(RingExchange::new(TwinRing::new(r))) as Box<dyn RankCollective<DeviceLikeCpu>>)
        .collect()
}

fn model_file(s: &RunSummary) -> Vec<u8> {
    let dir = s.last_checkpoint.clone().expect("a final checkpoint");
    let file = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("model")))
        .unwrap_or_else(|| panic!("no model file in {}", dir.display()));
    std::fs::read(file).unwrap()
}

fn bits(losses: &[(u64, f32)]) -> Vec<(u64, u32)> {
    losses.iter().map(|&(s, l)| (s, l.to_bits())).collect()
}

#[test]
fn training_over_the_p2p_twin_equals_the_thread_ring() {
    for precision in [Precision::Fp32, Precision::Bf16] {
        for (world, clip) in [(2usize, 1.0), (3, 0.0)] {
            let what = format!("{precision:?} world {world} clip {clip}");
            let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            let thread = run(&config(a.path(), world, precision, clip), staged(world));
            let ring = run(&config(b.path(), world, precision, clip), p2p(world));
            assert!(
                model_file(&ring) == model_file(&thread),
                "{what}: the saved weights differ"
            );
            assert_eq!(ring.train_losses.len(), 5, "{what}");
            if world == 2 {
                assert_eq!(bits(&ring.train_losses), bits(&thread.train_losses), "{what}: losses");
                let evals = |s: &RunSummary| s.evals.iter().map(|e| e.val_loss.to_bits()).collect::<Vec<_>>();
                assert_eq!(evals(&ring), evals(&thread), "{what}: evaluations");
            } else {
                for (x, y) in ring.train_losses.iter().zip(&thread.train_losses) {
                    assert!(((x.1 - y.1) / y.1).abs() < 1e-6, "{what}: losses {x:?} and {y:?}");
                }
            }
            let (first, last) = (thread.train_losses[0].1, thread.train_losses[4].1);
            assert!(last < first, "{what}: the run learns ({first} -> {last})");
        }
    }
}
