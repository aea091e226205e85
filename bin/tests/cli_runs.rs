//! nc-train as a user runs it: the no-argument embedded default, Ctrl-C saving a checkpoint, resume.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
#[path = "support/procs.rs"]
mod procs;
use procs::spawn_until;
#[path = "support/runs.rs"]
mod runs;
use runs::{assert_stdout_has, stopped_at_step, succeeded, text};

fn nc_train() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nc-train"))
}

/// The embedded default run for `steps` steps into `out`, saving every `save_every` steps (0: only at the end),
/// evaluating only at the start and the end.
fn embedded_run(out: &Path, steps: u64, save_every: u64) -> Vec<String> {
    let (steps, save_every) = (steps.to_string(), save_every.to_string());
    [
        "--num-iterations",
        &steps,
        "--save-every",
        &save_every,
        "--eval-every",
        "0",
        "--out-dir",
        out.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

/// `cargo run --release --bin nc-train` with no arguments: trains the small model on the embedded corpus,
/// the validation bits per byte fall clearly, samples are printed, outputs land in runs/d4-w128 (4 layers, 128
/// wide: not the 256-wide model `--depth 4` builds, so not its folder).
#[test]
fn embedded_default_learns_and_samples() {
    let dir = tempfile::tempdir().unwrap();
    let out = nc_train().current_dir(dir.path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let bpb: Vec<f64> = stdout
        .lines()
        .filter_map(|l| l.split("val bpb ").nth(1))
        .map(|v| v.trim().parse().unwrap())
        .collect();
    assert!(bpb.len() >= 2, "{stdout}");
    let (first, last) = (bpb[0], *bpb.last().unwrap());
    assert!(last < 0.5 * first, "val bpb should fall clearly: {bpb:?}");
    assert!(
        stdout.lines().filter(|l| l.starts_with("sample | ")).count() >= 3,
        "{stdout}"
    );
    assert!(stdout.contains("done: peak memory"), "{stdout}");
    let run = dir.path().join("runs/d4-w128");
    assert!(run.join("metrics.jsonl").is_file());
    assert!(
        run.join("checkpoints/step_000300/COMPLETE").is_file(),
        "{:?}",
        std::fs::read_dir(run.join("checkpoints"))
    );
}

/// SIGINT mid-run: the loop saves a checkpoint at the next step boundary and exits with 130; `--resume`
/// continues from it.
#[test]
fn sigint_saves_and_resume_continues() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("run");
    let args = [
        "--num-iterations",
        "100000",
        "--eval-every",
        "0",
        "--out-dir",
        out_dir.to_str().unwrap(),
    ];
    let (mut child, mut seen, lines) = spawn_until(nc_train().args(args), "step 00003/");
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    seen.extend(lines.map(|l| l.unwrap()));
    let status = child.wait().unwrap();
    let text = seen.join("\n");
    assert_eq!(status.code(), Some(130), "{text}");
    let (stopped, step) = stopped_at_step(text.lines()).unwrap_or_else(|| panic!("{text}"));
    assert!(step >= 4, "{stopped}");
    let ckpt = out_dir.join(format!("checkpoints/step_{step:06}"));
    assert!(ckpt.join("COMPLETE").is_file(), "{text}");

    // resume and stop two steps later
    let stop = (step + 2).to_string();
    let out = nc_train()
        .args(args)
        .args(["--resume", "--stop-at-step", &stop])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(130),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&format!("at step {step}")), "{text}");
    assert!(text.contains(&format!("step {:05}/100000", step + 1)), "{text}");
    assert!(out_dir
        .join(format!("checkpoints/step_{:06}/COMPLETE", step + 2))
        .is_file());
}

#[test]
fn bad_flags_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--data-dir", "/nonexistent/nc-data"], "no such directory"),
        (&["--dbs", "3", "--total-batch-size", "1000"], "--total-batch-size"),
        (&["--resume"], "no complete checkpoint"),
        (
            &["--plan", "--backend", "cpu", "--precision", "bf16"],
            "prices the host's f32 buffers",
        ),
        (&["--plan", "--precision", "fp16"], "not one of bf16, fp32"),
        (&["--precision", "fp16"], "not one of fp32, bf16"),
        (&["--tf32"], "needs --backend cuda"),
        (&["--depth", "52", "--dbs", "24"], "nc-data download"),
        (&["--aspect-ratio", "8"], "need --depth"),
        (
            &["--depth", "20", "--aspect-ratio", "7", "--head-dim", "32"],
            "model_dim 140, which must be a positive multiple of --head-dim 32",
        ),
    ];
    let mut cases = cases.to_vec();
    // without a GPU, --backend cuda says what is missing and what to use instead
    if nc_core::backend::cuda::device_count() == 0 {
        cases.push((&["--backend", "cuda"], "use the CPU backend"));
        // the bf16 engine is accepted, and fails the same clean way
        cases.push((&["--backend", "cuda", "--precision", "bf16"], "use the CPU backend"));
    }
    for (args, needle) in &cases {
        let out = nc_train().current_dir(dir.path()).args(*args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: one line: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    assert!(!dir.path().join("runs").exists(), "a refused run must write nothing");
}

/// SIGKILL during saves: with a checkpoint every step and a model whose save takes longer than its step,
/// kills land mid-save. After every kill the latest complete checkpoint loads, and --resume continues.
#[test]
fn sigkill_mid_save_leaves_a_loadable_checkpoint() {
    use nc_core::checkpoint;
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("run");
    // d 256, 4 layers: 3.4M params, a 14 MB save per step of 1 x 32 tokens
    let args = [
        "--depth",
        "4",
        "--max-seq-len",
        "32",
        "--dbs",
        "1",
        "--total-batch-size",
        "32",
        "--num-iterations",
        "100000",
        "--eval-every",
        "0",
        "--save-every",
        "1",
        "--out-dir",
        out_dir.to_str().unwrap(),
    ];
    let mut partial_seen = 0;
    for round in 0..4u64 {
        let mut cmd = nc_train();
        cmd.args(args);
        if round > 0 {
            cmd.arg("--resume");
        }
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        // after two saves, wait for a step's log line: the save of the next step follows it at once; kill a
        // few milliseconds into it (a different moment each round)
        let mut saves = 0;
        for line in lines.by_ref() {
            let line = line.unwrap();
            saves += line.starts_with("saved ") as usize;
            if saves >= 2 && line.starts_with("step ") {
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(2 * round));
        // SAFETY: killing our own child process.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGKILL) }, 0);
        child.wait().unwrap();
        let root = checkpoint::checkpoints_dir(&out_dir);
        partial_seen += std::fs::read_dir(&root)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".partial-"))
            .count();
        let latest = checkpoint::latest(&out_dir)
            .unwrap()
            .expect("a complete checkpoint survives");
        let meta = checkpoint::load_meta(&latest).unwrap();
        let mut params = vec![0.0f32; meta.model_config.num_params() as usize];
        checkpoint::load_params(&latest, &meta.model_config, &mut params).unwrap();
        assert!(params.iter().all(|p| p.is_finite()));
        let mut state = vec![0.0f32; meta.optimizer.state_lens[0]];
        checkpoint::load_optim_state(&latest, 0, &mut state).unwrap();
    }
    eprintln!("kills that left a partial save behind: {partial_seen} of 4");
}

/// Every file under `dir` with its bytes: a folder's state, to show a run changed nothing there.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                files.insert(p.strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(&p).unwrap());
            }
        }
    }
    files
}

/// Two models trained with no out-dir flags land in their own folders: the embedded default (d4-w128) stopped
/// at step 2, then a 2-layer model (d2); the first folder is byte for byte as it was, and the stop's hint (the
/// same flags plus --resume) resumes the checkpoint it named. Before the fix both went to runs/embedded.
#[test]
fn default_out_dirs_are_per_model_and_the_stop_hint_resumes_its_run() {
    let dir = tempfile::tempdir().unwrap();
    let first = ["--num-iterations", "4", "--stop-at-step", "2", "--eval-every", "0"];
    let out = nc_train().current_dir(dir.path()).args(first).output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let hint = stdout
        .lines()
        .find(|l| l.starts_with("stopped at step 2 of 4"))
        .unwrap_or_else(|| panic!("{}", text(&out)));
    let saved = hint.split("saved ").nth(1).unwrap().split(';').next().unwrap();
    assert_eq!(saved, "runs/d4-w128/checkpoints/step_000002", "{hint}");
    assert!(hint.ends_with("continue with the same flags plus --resume"), "{hint}");
    let embedded = dir.path().join("runs/d4-w128");
    let before = snapshot(&embedded);
    assert!(before.contains_key(Path::new("metrics.jsonl")), "{before:?}");

    let second = [
        "--depth",
        "2",
        "--max-seq-len",
        "128",
        "--num-iterations",
        "2",
        "--eval-every",
        "0",
    ];
    let out = nc_train().current_dir(dir.path()).args(second).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let d2 = dir.path().join("runs/d2");
    assert!(d2.join("metrics.jsonl").is_file() && d2.join("checkpoints/step_000002/COMPLETE").is_file());
    assert!(snapshot(&embedded) == before, "the first run's folder changed");

    let out = nc_train()
        .current_dir(dir.path())
        .args(first)
        .arg("--resume")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out));
    assert_stdout_has(&out, &format!("resumed from {saved} at step 2"));
}

/// A fresh run (no --resume) into an out dir holding a run is refused with one line naming the folder and the
/// ways on, before anything is written: the same model, another model, and several ranks (refused by the
/// supervisor before any worker starts). Before the fix a fresh run truncated metrics.jsonl and replaced
/// checkpoints of the same step.
#[test]
fn a_fresh_run_into_a_used_out_dir_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let x = dir.path().join("x");
    let base = embedded_run(&x, 2, 0);
    succeeded(nc_train().args(&base), "the first run");
    let before = snapshot(&x);
    let others: [&[&str]; 3] = [&[], &["--depth", "2", "--max-seq-len", "128"], &["--world-size", "2"]];
    for extra in others {
        let out = nc_train().args(&base).args(extra).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {}", text(&out));
        assert_eq!(err.trim_end().lines().count(), 1, "{extra:?}: one line: {err}");
        for needle in [
            x.to_str().unwrap(),
            "--resume",
            "--out-dir",
            "--model-tag",
            "nothing was changed",
        ] {
            assert!(err.contains(needle), "{extra:?}: {needle}: {err}");
        }
        assert!(
            snapshot(&x) == before,
            "{extra:?}: the refused run changed {}",
            x.display()
        );
    }
}

/// metrics.jsonl is only appended to: a resume that fails (the loss becomes infinite under absurd learning
/// rates) from an older checkpoint keeps every line the file had, and adds the resume marker and the steps it
/// ran; a resume refused before it starts leaves the file byte for byte. Before the fix the failed resume cut
/// the file back to the steps before its checkpoint.
#[test]
fn a_failed_resume_keeps_every_metrics_line() {
    let dir = tempfile::tempdir().unwrap();
    let x = dir.path().join("x");
    let base = embedded_run(&x, 6, 2);
    succeeded(nc_train().args(&base), "the first run");
    let metrics = x.join("metrics.jsonl");
    let before = std::fs::read_to_string(&metrics).unwrap();
    let ck2 = x.join("checkpoints/step_000002");
    let lrs = [
        "--matrix-lr",
        "1e30",
        "--embedding-lr",
        "1e30",
        "--unembedding-lr",
        "1e30",
    ];
    let out = nc_train()
        .args(&base)
        .args(lrs)
        .args(["--resume", ck2.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the train loss became"),
        "{}",
        text(&out)
    );
    let after = std::fs::read_to_string(&metrics).unwrap();
    assert!(after.starts_with(&before), "lines lost:\n{before}\n---\n{after}");
    let added: Vec<&str> = after[before.len()..].lines().collect();
    assert!(
        added
            .first()
            .is_some_and(|l| l.contains("\"event\":\"resume\"") && l.contains("step_000002")),
        "{added:?}"
    );
    // refused before training: another batch size than the checkpoint's
    let out = nc_train()
        .args(&base)
        .args(["--total-batch-size", "4096", "--resume", ck2.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(&metrics).unwrap(), after);
}

/// A flipped byte in any file of a checkpoint: --resume PATH refuses it with one line naming the file;
/// --resume alone skips it (saying so) and resumes the newest checkpoint that verifies. Before the fix the
/// flipped weights were loaded as they were.
#[test]
fn resume_refuses_a_corrupt_checkpoint_and_falls_back_to_the_newest_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let x = dir.path().join("x");
    let base = embedded_run(&x, 4, 2);
    succeeded(nc_train().args(&base), "the first run");
    let newest = x.join("checkpoints/step_000004");
    let flip = |path: &Path| {
        let mut b = std::fs::read(path).unwrap();
        let at = b.len() / 2;
        b[at] ^= 0x04;
        std::fs::write(path, b).unwrap();
    };
    for file in ["COMPLETE", "meta.json", "model.safetensors", "optim_rank0.safetensors"] {
        let copy = dir.path().join(format!("copy-{file}"));
        std::fs::create_dir_all(&copy).unwrap();
        for f in std::fs::read_dir(&newest).unwrap().flatten() {
            std::fs::copy(f.path(), copy.join(f.file_name())).unwrap();
        }
        flip(&copy.join(file));
        let out = nc_train()
            .args(&base)
            .args(["--resume", copy.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{file}: {}", text(&out));
        assert_eq!(err.trim_end().lines().count(), 1, "{file}: one line: {err}");
        assert!(err.contains(&copy.join(file).display().to_string()), "{file}: {err}");
    }
    flip(&newest.join("model.safetensors"));
    let out = nc_train().args(&base).arg("--resume").output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let skipped = format!(
        "--resume: skipping {}: {}",
        newest.display(),
        newest.join("model.safetensors").display()
    );
    assert!(stdout.contains(&skipped), "{}", text(&out));
    let good = x.join("checkpoints/step_000002");
    assert!(
        stdout.contains(&format!("resumed from {} at step 2", good.display())),
        "{}",
        text(&out)
    );
}

/// The time a run will take is said before its first step (expected from its FLOPs) and after it (measured).
#[test]
fn the_run_time_is_estimated_before_and_after_the_first_step() {
    let dir = tempfile::tempdir().unwrap();
    let out = nc_train()
        .args(["--num-iterations", "3", "--eval-every", "0", "--out-dir"])
        .arg(dir.path().join("r"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let at = |pred: &dyn Fn(&str) -> bool| stdout.lines().position(pred);
    let expected =
        at(&|l| l.starts_with("estimate: about ") && l.contains(" per step") && l.contains("for the 3 step(s)"));
    let first_step = at(&|l| l.starts_with("step 00000/"));
    let measured =
        at(&|l| l.starts_with("estimate: the first step took ") && l.contains("the 2 step(s) left take about"));
    assert!(
        expected.is_some() && expected < first_step && first_step < measured,
        "{expected:?} {first_step:?} {measured:?}\n{stdout}"
    );
}

/// The embedded default with a billion tokens a step: minutes a step even on a 64-core AVX-512 machine.
fn start_a_minutes_long_step(out: &Path) -> (std::process::Child, Vec<String>) {
    let mut child = nc_train()
        .args(["--total-batch-size", "1073741824", "--eval-tokens", "2048", "--out-dir"])
        .arg(out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    // the step-0 evaluation is printed just before the first step starts
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        let go = line.starts_with("step 00000 | val loss");
        seen.push(line);
        if go {
            break;
        }
    }
    (child, seen)
}

/// A batch that takes minutes per step on this machine is warned about before the first step, with a smaller
/// --total-batch-size (a multiple of the micro-batch). Before the fix a 108 s first step said nothing.
#[test]
fn a_minutes_long_step_is_warned_about_before_it_starts() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, seen) = start_a_minutes_long_step(&dir.path().join("slow"));
    // SAFETY: killing our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    let warning = seen
        .iter()
        .find(|l| l.starts_with("warning: 1073741824 tokens per step take minutes"))
        .unwrap_or_else(|| panic!("{seen:#?}"));
    let suggested: usize = warning
        .split("--total-batch-size ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{warning}"));
    // a multiple of the embedded default's micro-batch (16 x 128), smaller than asked
    assert!(suggested < 1 << 30 && suggested % (16 * 128) == 0, "{warning}");
}

/// Ctrl-C during a minutes-long step says at once that the run will save and stop after it (the step is nowhere
/// near its end, so only the signal handler can have said it); a second Ctrl-C ends the run at once, with 130.
/// Before the fix Ctrl-C printed nothing for the rest of the step.
#[test]
fn ctrl_c_during_a_long_step_answers_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, _) = start_a_minutes_long_step(&dir.path().join("slow"));
    // stderr, read on a thread so a missing message fails the test instead of hanging it
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let mut err = Vec::new();
    let said = loop {
        match rx.recv_timeout(std::time::Duration::from_secs(60)) {
            Ok(l) => {
                let hit = l.contains("stopping: the run saves a checkpoint and stops after the current step");
                err.push(l);
                if hit {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    let running = child.try_wait().unwrap().is_none();
    // SAFETY: as above; the second signal ends it at once
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let code = child.wait().unwrap().code();
    assert!(said, "no message after Ctrl-C: {err:?}");
    assert!(running, "the run is still in its first step when the message comes");
    assert_eq!(code, Some(130));
}

/// --aspect-ratio and --head-dim shape a narrow model of a deep structure (for tracing a d20 or d52 step on the
/// simulated GPU): --plan shows the model they make.
#[test]
fn aspect_ratio_and_head_dim_shape_the_model() {
    let out = nc_train()
        .args(["--plan", "--depth", "20", "--aspect-ratio", "8", "--head-dim", "32"])
        .output()
        .unwrap();
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(all.contains("depth 20  d 160  heads 5 (kv 5)"), "{all}");
}

/// nanochat's flags that mean nothing to nc are accepted, each with one note on stderr saying what nc does
/// instead (here with --plan, which then runs as usual); --resume-from-step N is nanochat's --resume PATH.
#[test]
fn nanochat_flags_are_accepted_with_a_note() {
    let out = nc_train()
        .args([
            "--plan",
            "--depth",
            "4",
            "--run",
            "d4-test",
            "--device_type=cuda",
            "--fp8",
            "--fp8-recipe",
            "rowwise",
        ])
        .args(["--window-pattern", "SSSL", "--resume_from_step=-1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    let notes: Vec<&str> = err.lines().filter(|l| l.starts_with("nc-train: note: ")).collect();
    assert_eq!(notes.len(), 5, "{err}");
    for (flag, instead) in [
        ("--run d4-test", "metrics.jsonl"),
        ("--device-type cuda", "--backend"),
        ("--fp8", "--precision"),
        ("--window-pattern SSSL", "whole context"),
        ("--resume-from-step -1", "--resume"),
    ] {
        assert!(
            notes.iter().any(|n| n.contains(flag) && n.contains(instead)),
            "{flag}: {notes:?}"
        );
    }
    assert_stdout_has(&out, "depth 4");
    // --resume-from-step N: the out dir's step_N, as --resume PATH (refused here: there is none)
    let dir = tempfile::tempdir().unwrap();
    let out = nc_train()
        .current_dir(dir.path())
        .args(["--resume-from-step", "7", "--out-dir", "r"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--resume r/checkpoints/step_000007: no such checkpoint folder"),
        "{}",
        text(&out)
    );
}

/// scripts/profile.sh run twice with the same nc-train flags profiles both times (a stand-in nsys runs the
/// command it is given on the CPU, without --profile-steps, and prints an empty kernel table): the profiled run
/// writes into the profile folder's own train/, emptied by each call, not the model's default out dir under
/// the repository, which a new run may not reuse (and which may hold a real run of that model).
#[test]
fn profile_sh_profiles_the_same_flags_twice() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let nsys = dir.path().join("nsys");
    std::fs::write(
        &nsys,
        r#"#!/usr/bin/env bash
if [ "$1" = profile ]; then
  shift; while [[ "$1" == --* ]]; do shift; done
  # the CPU run cannot take --profile-steps (it starts CUDA's profiler): drop it and its value
  cmd=(); while [ $# -gt 0 ]; do if [ "$1" = --profile-steps ]; then shift 2; else cmd+=("$1"); shift; fi; done
  exec "${cmd[@]}"
fi
case "$*" in *cuda_gpu_kern_sum*) echo '"Time (%)","Total Time (ns)","Instances","Avg (ns)","Name"' ;; esac
"#,
    )
    .unwrap();
    let chmod = Command::new("chmod").arg("+x").arg(&nsys).status().unwrap();
    assert!(chmod.success());
    let flags = [
        "--depth",
        "2",
        "--max-seq-len",
        "64",
        "--num-iterations",
        "2",
        "--eval-every",
        "0",
    ];
    for attempt in 1..=2 {
        let out = Command::new("bash")
            .arg(root.join("scripts/profile.sh"))
            .args(["--steps", "0:1", "--out"])
            .arg(dir.path().join("prof"))
            .arg("--")
            .args(flags)
            .env("NSYS", &nsys)
            .env("NC_TRAIN", env!("CARGO_BIN_EXE_nc-train"))
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "profile {attempt}: {}", text(&out));
        assert_stdout_has(&out, "(0 kernels in all)");
        let saved = dir.path().join("prof/train/checkpoints/step_000002/COMPLETE");
        assert!(saved.is_file(), "profile {attempt}: {}", text(&out));
    }
}
