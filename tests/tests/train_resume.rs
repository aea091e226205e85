//! The training loop end to end on the CPU with the embedded corpus: resume is bit-exact, a stop saves a
//! checkpoint, outputs are where the issue says, and bad input is a clear error.

use nc_core::checkpoint;
use nc_core::config::ModelConfig;
use nc_core::data::run_data::DataSource;
use nc_core::train::{train, Resume, RunSummary, TrainConfig};
use nc_tests::harness::{device_like_cpu, loss_gap, tiny_train_config};
use std::path::Path;

/// A 2-layer, 32-wide model on a small embedded corpus: a step takes milliseconds.
fn tiny_config(out_dir: &Path, steps: u64) -> TrainConfig {
    TrainConfig {
        eval_every: 3,
        eval_tokens: 2 * 4 * 32,
        ..tiny_train_config(out_dir, steps)
    }
}

/// Trains `cfg` with `first` until `stop` (stopping there with a save), then resumes the latest checkpoint with
/// `second` to the end: both runs' summaries. `first` and `second` are the paths the halves run on (`train`, or
/// `train_on` a device), each given the config it must run.
fn stop_and_resume(
    mut cfg: TrainConfig,
    stop: u64,
    first: &dyn Fn(&TrainConfig) -> RunSummary,
    second: &dyn Fn(&TrainConfig) -> RunSummary,
) -> (RunSummary, RunSummary) {
    cfg.stop_at_step = Some(stop);
    let stopped = first(&cfg);
    cfg.stop_at_step = None;
    cfg.resume = Resume::Latest;
    (stopped, second(&cfg))
}

/// `train` for `stop_and_resume`, which gets the result (every run here must succeed).
fn on_cpu(cfg: &TrainConfig) -> RunSummary {
    train(cfg).unwrap()
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Training 2N steps straight and training N, stopping, then resuming for N more give bit-identical
/// losses, evaluations and final weights and optimizer state (grad accumulation 2 included).
#[test]
fn resume_is_bit_exact() {
    let n = 5u64;
    let straight_dir = tempfile::tempdir().unwrap();
    let straight = train(&tiny_config(straight_dir.path(), 2 * n)).unwrap();
    assert_eq!(straight.train_losses.len() as u64, 2 * n);
    assert!(!straight.stopped_early);

    let split_dir = tempfile::tempdir().unwrap();
    let (first, second) = stop_and_resume(tiny_config(split_dir.path(), 2 * n), n, &on_cpu, &on_cpu);
    assert!(first.stopped_early);
    assert_eq!(first.final_step, n);
    let ckpt = first.last_checkpoint.clone().unwrap();
    assert!(ckpt.ends_with("checkpoints/step_000005"));
    assert!(!second.stopped_early);

    let mut resumed: Vec<(u64, u32)> = first.train_losses.iter().map(|(s, l)| (*s, l.to_bits())).collect();
    resumed.extend(second.train_losses.iter().map(|(s, l)| (*s, l.to_bits())));
    let want: Vec<(u64, u32)> = straight.train_losses.iter().map(|(s, l)| (*s, l.to_bits())).collect();
    assert_eq!(resumed, want, "losses of the resumed run differ from the straight run");
    // the last evaluation and the final weights and optimizer state agree exactly too
    assert_eq!(
        straight.evals.last().unwrap().val_loss.to_bits(),
        second.evals.last().unwrap().val_loss.to_bits()
    );
    let a = straight.last_checkpoint.unwrap();
    let b = second.last_checkpoint.unwrap();
    assert_eq!(read(&a.join("model.safetensors")), read(&b.join("model.safetensors")));
    assert_eq!(
        read(&a.join("optim_rank0.safetensors")),
        read(&b.join("optim_rank0.safetensors"))
    );
    // and training did something
    let l = &straight.train_losses;
    assert!(l.last().unwrap().1 < l[0].1 - 0.5, "loss should fall: {l:?}");
}

/// metrics.jsonl has a line per step and per evaluation with the keys; on resume the steps after
/// the checkpoint are not duplicated.
#[test]
fn metrics_and_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny_config(dir.path(), 6);
    cfg.stop_at_step = Some(4);
    train(&cfg).unwrap();
    cfg.stop_at_step = None;
    cfg.resume = Resume::Path(dir.path().join("checkpoints/step_000004"));
    let s = train(&cfg).unwrap();
    assert_eq!(s.samples.len(), 4, "samples at the end");
    let text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let steps: Vec<u64> = rows
        .iter()
        .filter(|r| r.get("loss").is_some())
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![0, 1, 2, 3, 4, 5]);
    for r in rows.iter().filter(|r| r.get("loss").is_some()) {
        for k in ["lr_mult", "dt_ms", "tok_per_sec", "mfu"] {
            assert!(r[k].as_f64().is_some_and(|v| v.is_finite() && v >= 0.0), "{k} in {r}");
        }
    }
    // evaluations at 0, 3 (eval_every), 4 (the resumed run's first step is not an eval step: 4 % 3 != 0)
    // and 6 (the end)
    let evals: Vec<u64> = rows
        .iter()
        .filter(|r| r.get("val_bpb").is_some())
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(evals, vec![0, 3, 6]);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("checkpoints/step_000006/meta.json")).unwrap())
            .unwrap();
    assert_eq!(meta["step"], 6);
    assert_eq!(meta["model_config"]["vocab_size"], 300, "the tokenizer's vocabulary");
    assert!(meta["loader_state"]["position"].is_u64());
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    // a data dir that does not exist
    let mut cfg = tiny_config(dir.path(), 2);
    cfg.data = DataSource::Dir(dir.path().join("nope"));
    let e = train(&cfg).unwrap_err();
    assert!(
        e.message.contains("nc-data") && e.message.contains("no such directory"),
        "{e}"
    );
    // resume with nothing to resume
    let mut cfg = tiny_config(dir.path(), 2);
    cfg.resume = Resume::Latest;
    assert!(train(&cfg).unwrap_err().message.contains("no complete checkpoint"));
    // a corrupt checkpoint
    let mut cfg = tiny_config(dir.path(), 2);
    let s = train(&cfg).unwrap();
    let ck = s.last_checkpoint.unwrap();
    let w = ck.join("model.safetensors");
    let bytes = read(&w);
    std::fs::write(&w, &bytes[..100]).unwrap();
    cfg.resume = Resume::Latest;
    let e = train(&cfg).unwrap_err();
    assert!(
        e.message.contains("corrupt") && e.message.contains("--resume PATH"),
        "{e}"
    );
    // a checkpoint of another model (the weights put back: a corrupt file is refused before the model is compared)
    std::fs::write(&w, &bytes).unwrap();
    let mut other = tiny_config(dir.path(), 2);
    other.model = ModelConfig::new(3, 32, 2, 2, 16, 512, 32).unwrap();
    other.resume = Resume::Path(ck.clone());
    assert!(train(&other).unwrap_err().message.contains("same --depth"));
    // a batch that does not divide
    let mut cfg = tiny_config(dir.path(), 2);
    cfg.total_batch_size = 100;
    assert!(train(&cfg).unwrap_err().message.contains("--total-batch-size"));
}

/// --eval-tokens beyond the validation split evaluates one pass (and says so) instead of looping it: the
/// result equals asking for exactly one pass, while 2.5 passes asked of a looping loader would weight part
/// of the split twice.
#[test]
fn eval_tokens_beyond_the_split_evaluate_one_pass() {
    let run = |eval_tokens: usize| {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = tiny_config(dir.path(), 1);
        cfg.eval_tokens = eval_tokens;
        train(&cfg).unwrap()
    };
    let tokens_per_batch = 4 * 32;
    let probe = run(tokens_per_batch);
    assert!(!probe.eval_capped && probe.eval_batches == 1);
    // one pass, counted on the validation loader itself: batches until it wraps
    let cfg = tiny_config(Path::new("unused"), 1);
    let mut val = nc_core::data::run_data::load(&cfg.data, 0, 1, 4, 32).unwrap().val;
    let one_pass = (0..).take_while(|_| val.next_batch().epoch == 0).count();
    assert!((3..1000).contains(&one_pass), "the split holds {one_pass} batches");
    let huge = run(1 << 20);
    assert!(huge.eval_capped && huge.eval_batches == one_pass);
    let exact = run(one_pass * tokens_per_batch);
    assert!(!exact.eval_capped && exact.eval_batches == one_pass);
    let two_and_a_half = run((5 * one_pass / 2) * tokens_per_batch);
    assert!(two_and_a_half.eval_capped && two_and_a_half.eval_batches == one_pass);
    for s in [&huge, &two_and_a_half] {
        assert_eq!(
            s.evals.last().unwrap().val_loss.to_bits(),
            exact.evals.last().unwrap().val_loss.to_bits()
        );
    }
}

/// A save that died midway (a partial folder without its marker) is ignored: resume takes the last
/// complete checkpoint.
#[test]
fn resume_skips_a_partial_save() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny_config(dir.path(), 4);
    cfg.stop_at_step = Some(2);
    let first = train(&cfg).unwrap();
    let done = first.last_checkpoint.unwrap();
    // what a crash during the save of step 3 leaves behind, and a step folder whose marker never came
    let root = checkpoint::checkpoints_dir(dir.path());
    std::fs::create_dir_all(root.join(".partial-step_000003")).unwrap();
    std::fs::copy(
        done.join("model.safetensors"),
        root.join(".partial-step_000003/model.safetensors"),
    )
    .unwrap();
    std::fs::create_dir_all(root.join("step_000003")).unwrap();
    std::fs::write(root.join("step_000003/model.safetensors"), b"half").unwrap();
    assert_eq!(checkpoint::latest(dir.path()).unwrap(), Some(done));
    cfg.stop_at_step = None;
    cfg.resume = Resume::Latest;
    let s = train(&cfg).unwrap();
    assert_eq!(
        s.train_losses.first().unwrap().0,
        2,
        "resumed at the complete checkpoint's step"
    );
    assert!(
        !root.join(".partial-step_000003").exists(),
        "the next save clears leftovers"
    );
}

/// Recomputation changes memory, never numbers: a run that keeps everything, and a run that trains its first
/// half with full recomputation and resumes its second half with selective, log bit-identical losses.
#[test]
fn recompute_policies_train_identically_and_may_change_on_resume() {
    use nc_core::plan::Recompute;
    let n = 3u64;
    let none_dir = tempfile::tempdir().unwrap();
    let none = train(&tiny_config(none_dir.path(), 2 * n)).unwrap();

    let mixed_dir = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        recompute: Recompute::Full,
        ..tiny_config(mixed_dir.path(), 2 * n)
    };
    let selective = |c: &TrainConfig| {
        on_cpu(&TrainConfig {
            recompute: Recompute::Selective,
            ..c.clone()
        })
    };
    let (first, second) = stop_and_resume(cfg, n, &on_cpu, &selective);
    assert!(first.stopped_early);

    let mut mixed: Vec<(u64, u32)> = first.train_losses.iter().map(|(s, l)| (*s, l.to_bits())).collect();
    mixed.extend(second.train_losses.iter().map(|(s, l)| (*s, l.to_bits())));
    let want: Vec<(u64, u32)> = none.train_losses.iter().map(|(s, l)| (*s, l.to_bits())).collect();
    assert_eq!(mixed.len() as u64, 2 * n);
    assert_eq!(mixed, want, "full then selective recomputation changed the losses");
    assert_eq!(
        none.evals.last().unwrap().val_loss.to_bits(),
        second.evals.last().unwrap().val_loss.to_bits()
    );
}

/// The largest difference between two checkpoints' weights, relative to the largest weight.
fn weight_gap(a: &Path, b: &Path) -> f64 {
    let model = checkpoint::load_meta(a).unwrap().model_config;
    let load = |d: &Path| {
        let mut p = vec![0.0f32; model.num_params() as usize];
        checkpoint::load_params(d, &model, &mut p).unwrap();
        p
    };
    let (pa, pb) = (load(a), load(b));
    let scale = pb.iter().fold(0.0f64, |m, &x| m.max((x as f64).abs()));
    pa.iter()
        .zip(&pb)
        .map(|(x, y)| (*x as f64 - *y as f64).abs() / scale)
        .fold(0.0, |m, d| if d.is_nan() { f64::INFINITY } else { m.max(d) })
}

/// How far the device path (DeviceLikeCpu, with the device optimizer) may drift from the CPU path (host
/// optimizer) over the 8 steps of `device_path_trains_like_the_cpu_and_shares_its_checkpoints`. The two
/// differ only in the rounding of Muon's Newton-Schulz products (6.5e-6 of an update at most,
/// tests/tests/device_optimizer.rs), which training then carries along. Measured, for the device run and
/// for both mixed runs (half on each path): every train loss equal to the bit (the difference stays below
/// an f32 ulp of the loss, ~1e-7 relative); the final validation loss (an f64 mean) 1.7e-9, 1.8e-9 and
/// 1.0e-8 relative; the final weights 3.5e-6, 3.5e-6 and 1.3e-6 of the largest weight (wte's AdamW, at lr
/// ~1 in this tiny model, passes small gradient differences on at full size). The tolerances: train losses
/// 5e-7 relative (about 5 ulps), validation loss 5e-8 (5x), weights 2e-5 (6x).
const DEVICE_LOSS_TOL: f64 = 5e-7;
const DEVICE_VAL_LOSS_TOL: f64 = 5e-8;
const DEVICE_WEIGHT_TOL: f64 = 2e-5;

/// The path a GPU backend takes (buffers not host-visible: the device optimizer clips and steps with the
/// backend's ops, checkpoints go through download and upload). Its Muon updates differ from the host
/// optimizer's by rounding (the order of Newton-Schulz's products), so it tracks the CPU path within the
/// `DEVICE_*_TOL`s above rather than to the bit. Bit-exact still: the first loss (no update yet), and resume
/// on the device path itself (2N straight = N, a save, N resumed: losses, evaluation, weights, optimizer
/// state). Checkpoints move between the paths: N steps on one, a save, N resumed on the other, track the CPU
/// run within the same tolerances.
#[test]
fn device_path_trains_like_the_cpu_and_shares_its_checkpoints() {
    use nc_core::train::train_on;
    let device = || device_like_cpu(nc_core::plan::Precision::Fp32);
    let on_device = |c: &TrainConfig| train_on(c, device()).unwrap();
    let n = 4u64;
    let cpu_dir = tempfile::tempdir().unwrap();
    let cpu = train(&tiny_config(cpu_dir.path(), 2 * n)).unwrap();
    let dev_dir = tempfile::tempdir().unwrap();
    let dev = train_on(&tiny_config(dev_dir.path(), 2 * n), device()).unwrap();
    let bits =
        |s: &RunSummary| -> Vec<(u64, u32)> { s.train_losses.iter().map(|(st, l)| (*st, l.to_bits())).collect() };
    assert_eq!(bits(&dev)[0], bits(&cpu)[0], "the first loss precedes any update");
    // a whole run against the CPU's, and a run stitched from two paths against it
    let tracks_cpu = |what: &str, losses: &[(u64, f32)], last: &RunSummary| {
        let gap = loss_gap(losses, &cpu.train_losses);
        assert!(
            gap <= DEVICE_LOSS_TOL,
            "{what}: train losses differ by {gap:e} (relative)"
        );
        let val_gap = (last.evals.last().unwrap().val_loss / cpu.evals.last().unwrap().val_loss - 1.0).abs();
        assert!(
            val_gap <= DEVICE_VAL_LOSS_TOL,
            "{what}: final val loss differs by {val_gap:e}"
        );
        let w_gap = weight_gap(
            &last.last_checkpoint.clone().unwrap(),
            &cpu.last_checkpoint.clone().unwrap(),
        );
        assert!(w_gap <= DEVICE_WEIGHT_TOL, "{what}: final weights differ by {w_gap:e}");
    };
    tracks_cpu("the device path", &dev.train_losses, &dev);
    assert_ne!(
        read(&dev.last_checkpoint.clone().unwrap().join("model.safetensors")),
        read(&cpu.last_checkpoint.clone().unwrap().join("model.safetensors")),
        "the device path should run the device optimizer, whose rounding differs"
    );

    // the device path resumes its own checkpoint bit-exactly
    let split_dir = tempfile::tempdir().unwrap();
    let (first, second) = stop_and_resume(tiny_config(split_dir.path(), 2 * n), n, &on_device, &on_device);
    let mut split = bits(&first);
    split.extend(bits(&second));
    assert_eq!(split, bits(&dev), "the device path's resume is not bit-exact");
    let (a, b) = (dev.last_checkpoint.clone().unwrap(), second.last_checkpoint.unwrap());
    assert_eq!(read(&a.join("model.safetensors")), read(&b.join("model.safetensors")));
    assert_eq!(
        read(&a.join("optim_rank0.safetensors")),
        read(&b.join("optim_rank0.safetensors"))
    );

    // a device-path checkpoint resumed on the CPU
    let mixed_dir = tempfile::tempdir().unwrap();
    let (first, second) = stop_and_resume(tiny_config(mixed_dir.path(), 2 * n), n, &on_device, &on_cpu);
    let mut mixed = first.train_losses.clone();
    mixed.extend(second.train_losses.iter().copied());
    assert_eq!(bits(&first), bits(&dev)[..n as usize]);
    tracks_cpu("a device-path checkpoint resumed on the CPU", &mixed, &second);

    // and a CPU checkpoint resumed on the device path
    let back_dir = tempfile::tempdir().unwrap();
    let (first, second) = stop_and_resume(tiny_config(back_dir.path(), 2 * n), n, &on_cpu, &on_device);
    assert_eq!(bits(&first), bits(&cpu)[..n as usize]);
    let mut back = first.train_losses.clone();
    back.extend(second.train_losses.iter().copied());
    tracks_cpu("a CPU checkpoint resumed on the device path", &back, &second);
}

/// Several ranks on a device backend in one process are refused with an error naming the fix (one process
/// per GPU), before anything is written.
#[test]
fn device_path_refuses_several_ranks_in_one_process() {
    use nc_core::train::train_on;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny_config(dir.path(), 2);
    cfg.world_size = 2;
    cfg.total_batch_size = 2 * 4 * 32;
    let device = device_like_cpu(nc_core::plan::Precision::Fp32);
    let err = train_on(&cfg, device).unwrap_err().to_string();
    assert!(err.contains("--nproc-per-node 2"), "{err}");
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "nothing should be written"
    );
}

/// The device ZeRO-1 path without a GPU: two `DeviceLikeCpu` ranks (buffers not host-visible, so each
/// rank's sharded device optimizer steps what it owns with the backend's ops), their buckets reduced from
/// the backward's hook through a host-staged thread ring (`StagedRanks`, the twin of the NCCL exchange),
/// against the CPU's two thread ranks (host optimizer). The same drift as one device rank against one CPU
/// rank is allowed (`DEVICE_*_TOL`: only Newton-Schulz's rounding differs); the first loss is bit-equal.
/// One rank with a collective (what the GPU check's `launch` step runs) is checked the same way.
#[test]
fn device_zero1_ranks_train_like_the_cpu_ranks() {
    use nc_core::backend::device_like::DeviceLikeCpu;
    use nc_core::train::train_as_rank;
    use nc_core::train::zero1::{RankCollective, StagedRanks};
    let device = || device_like_cpu(nc_core::plan::Precision::Fp32);
    let steps = 6u64;
    for world in [2usize, 1] {
        let cpu_dir = tempfile::tempdir().unwrap();
        let mut cfg = tiny_config(cpu_dir.path(), steps);
        cfg.world_size = world;
        let cpu = train(&cfg).unwrap();
        let dev_dir = tempfile::tempdir().unwrap();
        let mut dcfg = cfg.clone();
        dcfg.out_dir = dev_dir.path().to_path_buf();
        let rings = nc_comm::ThreadRing::new(world);
        let runs: Vec<RunSummary> = std::thread::scope(|scope| {
            let handles: Vec<_> = rings
                .into_iter()
                .enumerate()
                .map(|(rank, ring)| {
                    let dcfg = &dcfg;
                    scope.spawn(move || {
                        let comm: Box<dyn RankCollective<DeviceLikeCpu>> = Box::new(StagedRanks::new(Box::new(ring)));
                        train_as_rank(dcfg, rank, Some(comm), device()).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let dev = &runs[0];
        assert_eq!(dev.train_losses.len(), steps as usize);
        assert_eq!(
            dev.train_losses[0].1.to_bits(),
            cpu.train_losses[0].1.to_bits(),
            "world {world}: the first loss precedes any update"
        );
        let gap = loss_gap(&dev.train_losses, &cpu.train_losses);
        assert!(gap <= DEVICE_LOSS_TOL, "world {world}: train losses differ by {gap:e}");
        let w_gap = weight_gap(
            &dev.last_checkpoint.clone().unwrap(),
            &cpu.last_checkpoint.clone().unwrap(),
        );
        assert!(
            w_gap <= DEVICE_WEIGHT_TOL,
            "world {world}: final weights differ by {w_gap:e}"
        );
        let last = cpu.train_losses.last().unwrap().1;
        assert!(last < cpu.train_losses[0].1, "world {world}: the run learns");
        // every rank saved its own optimizer state
        for r in 0..world {
            assert!(dev
                .last_checkpoint
                .clone()
                .unwrap()
                .join(format!("optim_rank{r}.safetensors"))
                .is_file());
        }
    }
}
