//! nc-train as a user runs it: the no-argument embedded default, Ctrl-C saving a checkpoint, resume.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn nc_train() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nc-train"))
}

/// `cargo run --release --bin nc-train` with no arguments: trains the small model on the embedded corpus,
/// the validation bits per byte fall clearly, samples are printed, outputs land in runs/embedded.
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
    let run = dir.path().join("runs/embedded");
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
    let mut child = nc_train()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let go = line.starts_with("step 00003/");
        seen.push(line);
        if go {
            break;
        }
    }
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    seen.extend(lines.map(|l| l.unwrap()));
    let status = child.wait().unwrap();
    let text = seen.join("\n");
    assert_eq!(status.code(), Some(130), "{text}");
    let stopped = text
        .lines()
        .find(|l| l.starts_with("stopped at step "))
        .unwrap_or_else(|| panic!("{text}"));
    let step: u64 = stopped["stopped at step ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
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
