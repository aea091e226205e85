//! nc-train with one process per rank, as users run it: `--world-size 2` (the supervisor starting two
//! workers), ranks started by hand with the torchrun variables (an outside launcher), resume at the same and
//! at another world size, a worker killed with SIGKILL, SIGTERM to the supervisor, ranks that disagree, and a
//! bf16 run (sharded f32 master: two processes vs one, a world-2 checkpoint resumed by one process).
//!
//! Tolerance of process ranks against one process: the two compute the same step from the same tokens, but
//! two ranks sum their micro-batches' gradients in the ring after the backward while one rank accumulates
//! them in one buffer during it, so the weights differ in the last bits (tests/tests/multi_rank.rs measured
//! 3.2e-6 of the largest weight after 6 steps) and the losses, rounded to f32, agree to the bit over these
//! runs. LOSS_TOL allows 1e-6 relative (about 10 f32 ulps) so a different but legitimate rounding passes while
//! a wrong token, step or state does not (those move the loss by 1e-3 or more).

use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
#[path = "support/procs.rs"]
mod procs;
use procs::{kill_rank_1, spawn_until, wait_at_most, Killed};
#[path = "support/runs.rs"]
mod runs;
use runs::{
    assert_curves_close, assert_stdout_has, losses, small_run, stopped_at_step, text, without_launch_vars,
    BF16_LOSS_TOL, LOSS_TOL,
};

fn nc_train() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nc-train"));
    without_launch_vars(&mut c);
    c
}

/// A 2-layer, 128-wide model on 32-token sequences: 4 sequences per rank per micro-step, 256 tokens per
/// step (one micro-step of two ranks, or two of one rank).
fn args(out: &Path, steps: u64) -> Vec<String> {
    small_run("cpu", out, steps, 4, 256)
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Rank `rank` of `world` started by hand, as torchrun would.
fn by_hand(rank: usize, world: usize, port: u16, args: &[String]) -> Command {
    let mut c = nc_train();
    c.args(args)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("LOCAL_WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("NC_RENDEZVOUS_TIMEOUT", "30");
    c
}

/// Ranks 0 and 1 of two started by hand at once with the run's flags `args` and then `extra(rank)`: their
/// outputs, once both ended.
fn two_ranks_by_hand(args: &[String], extra: impl Fn(usize) -> Vec<String>) -> Vec<Output> {
    let port = free_port();
    let children: Vec<Child> = (0..2)
        .map(|r| {
            by_hand(r, 2, port, args)
                .args(extra(r))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children.into_iter().map(|c| c.wait_with_output().unwrap()).collect()
}

/// The 6-step run in `two` (two ranks) has the loss curve of the one in `one` (one process) within `tol`, and
/// the one-process run learned.
fn two_match_one(what: &str, one: &Path, two: &Path, tol: f64) {
    let (a, b) = (losses(one), losses(two));
    assert_eq!(a.len(), 6);
    assert_curves_close(what, &b, &a, tol);
    assert!(
        a.last().unwrap().1 < a[0].1 - 0.3,
        "training should make progress: {a:?}"
    );
}

fn checkpoint_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Two processes (the supervisor's workers) train as one process accumulating two micro-batches; the
/// checkpoint holds each rank's optimizer state; only rank 0 logs.
#[test]
fn two_processes_match_one_with_accumulation() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let out = run(nc_train().args(args(&one, 6)));
    assert!(out.status.success(), "{}", text(&out));
    let out = run(nc_train().args(args(&two, 6)).args(["--world-size", "2"]));
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    // one log: rank 0's
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("step 00002/")).count(),
        1,
        "{}",
        text(&out)
    );
    assert!(stdout.contains("x 2 ranks, grad accum 1"), "{}", text(&out));
    two_match_one("two processes vs one", &one, &two, LOSS_TOL);
    let files = checkpoint_files(&two.join("checkpoints/step_000006"));
    assert_eq!(
        files,
        [
            "COMPLETE",
            "meta.json",
            "model.safetensors",
            "optim_rank0.safetensors",
            "optim_rank1.safetensors"
        ]
    );
}

/// MFU x dt (seconds) of every step record of metrics.jsonl, the last record of each step: the model FLOPs of
/// the step over the peak FLOP/s the MFU is stated against, which depend on the work and the machine, not on
/// how long the step took.
fn mfu_seconds(out_dir: &Path) -> Vec<(u64, f64)> {
    let t = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
    nc_core::train::metrics::last_per_step(&t, "mfu")
        .into_iter()
        .map(|(step, v)| (step, v["mfu"].as_f64().unwrap() * v["dt_ms"].as_f64().unwrap() / 1e3))
        .collect()
}

/// MFU is the model FLOPs of all ranks over the peak of all ranks (nanochat's definition): two and three
/// processes doing one process's work (the same 384 tokens per step: grad accum 6, 3 and 2) state the MFU one
/// process would at the same step time. MFU x dt is compared (it does not depend on timing); the ranks of one
/// machine share its cores, so their peaks add up to the one process's. Before the fix, world size W read W
/// times one process's.
#[test]
fn mfu_of_several_processes_is_the_one_process_mfu() {
    let dir = tempfile::tempdir().unwrap();
    let same_work = ["--dbs", "2", "--total-batch-size", "384"];
    let mut got = Vec::new();
    for world in [1usize, 2, 3] {
        let d = dir.path().join(format!("w{world}"));
        let out = run(nc_train()
            .args(args(&d, 2))
            .args(same_work)
            .args(["--world-size", &world.to_string()]));
        assert!(out.status.success(), "{}", text(&out));
        let q = mfu_seconds(&d);
        assert_eq!(q.iter().map(|x| x.0).collect::<Vec<_>>(), [0, 1], "world {world}");
        got.push((world, q));
    }
    let one = got[0].1[0].1;
    assert!(one > 0.0 && one.is_finite(), "{got:?}");
    for (world, q) in &got {
        for (step, v) in q {
            // the same f64 products; rounding of dt_ms is all that may differ
            assert!(
                ((v - one) / one).abs() < 1e-9,
                "world {world} step {step}: MFU x dt {v:e} vs one process's {one:e}\n{got:?}"
            );
        }
    }
}

/// Stop at step 3 and resume: bit-exact at the same world size; at another world size (2 -> 1 and 1 -> 2)
/// the curve continues within LOSS_TOL. The stop ends every worker and the supervisor with 130.
#[test]
fn processes_resume_at_the_same_and_at_another_world_size() {
    let dir = tempfile::tempdir().unwrap();
    let world = |w: usize| -> Vec<String> { vec!["--world-size".into(), w.to_string()] };
    let straight = dir.path().join("straight");
    let out = run(nc_train().args(args(&straight, 6)).args(world(2)));
    assert!(out.status.success(), "{}", text(&out));
    let want = losses(&straight);
    for (from, to) in [(2usize, 2usize), (2, 1), (1, 2)] {
        let d = dir.path().join(format!("{from}to{to}"));
        let out = run(nc_train()
            .args(args(&d, 6))
            .args(world(from))
            .args(["--stop-at-step", "3"]));
        assert_eq!(out.status.code(), Some(130), "{}", text(&out));
        assert!(d.join("checkpoints/step_000003/COMPLETE").is_file());
        let out = run(nc_train().args(args(&d, 6)).args(world(to)).arg("--resume"));
        assert!(out.status.success(), "{from} -> {to}: {}", text(&out));
        let got = losses(&d);
        if from == to {
            let bits = |v: &[(u64, f64)]| v.iter().map(|(s, l)| (*s, l.to_bits())).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{from} -> {to}");
        } else {
            assert_stdout_has(&out, "re-sharded");
            assert_curves_close(&format!("{from} -> {to}"), &got, &want, LOSS_TOL);
        }
    }
}

/// bf16 through real processes: two workers (the shared-memory ring, each keeping the f32 master of what it
/// owns, the bf16 working copy gathered) train as one bf16 process accumulating two micro-batches; a stop at
/// step 3 saves the master gathered from both workers, and one process resumes it and continues the curve.
#[test]
fn bf16_processes_match_one_process_and_resume_at_world_size_one() {
    let dir = tempfile::tempdir().unwrap();
    let bf16 = ["--precision", "bf16"];
    let (one, two, resumed) = (
        dir.path().join("one"),
        dir.path().join("two"),
        dir.path().join("resumed"),
    );
    let out = run(nc_train().args(args(&one, 6)).args(bf16));
    assert!(out.status.success(), "{}", text(&out));
    let out = run(nc_train().args(args(&two, 6)).args(bf16).args(["--world-size", "2"]));
    assert!(out.status.success(), "{}", text(&out));
    // the sharded-master path ran: rank 0 keeps half of the f32 master
    assert_stdout_has(&out, "rank 0 keeps the f32 master of the 262144 of 524288");
    two_match_one("bf16 two processes vs one", &one, &two, BF16_LOSS_TOL);

    let out = run(nc_train()
        .args(args(&resumed, 6))
        .args(bf16)
        .args(["--world-size", "2", "--stop-at-step", "3"]));
    assert_eq!(out.status.code(), Some(130), "{}", text(&out));
    let ck = resumed.join("checkpoints/step_000003");
    assert!(checkpoint_files(&ck).contains(&"optim_rank1.safetensors".to_string()));
    let out = run(nc_train().args(args(&resumed, 6)).args(bf16).arg("--resume"));
    assert!(out.status.success(), "2 -> 1: {}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("re-sharded") && stdout.contains("at step 3"),
        "{}",
        text(&out)
    );
    let got = losses(&resumed);
    assert_curves_close("bf16 resume 2 -> 1", &got, &losses(&two), BF16_LOSS_TOL);
}

/// Start the supervisor with two workers training for long; return it once rank 0 logged step 3, with the
/// lines seen and the rest of stdout.
fn start_long_run(out: &Path) -> (Child, Vec<String>, std::io::Lines<BufReader<std::process::ChildStdout>>) {
    spawn_until(
        nc_train().args(args(out, 100_000)).args(["--world-size", "2"]),
        "step 00003/",
    )
}

/// SIGKILL of one worker: the other worker and the supervisor exit non-zero within 60 s, naming it.
#[test]
fn a_killed_worker_stops_the_run_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut sup, seen, _rest) = start_long_run(dir.path());
    let Killed {
        workers,
        victim,
        status,
        took,
        stderr,
    } = kill_rank_1(&mut sup, &seen);
    let (survivor, _) = *workers.iter().find(|(_, r)| *r == 0).unwrap();
    assert_eq!(status.code(), Some(137), "the first failure's code (SIGKILL)\n{stderr}");
    assert!(
        stderr.contains(&format!("rank 1 (pid {victim}) was killed by signal 9")),
        "{stderr}"
    );
    // rank 0 failed by itself (its collective named the dead rank), before the supervisor's grace ran out
    let rank0_line = stderr
        .lines()
        .find(|l| l.contains("rank 0") && l.contains("error"))
        .unwrap_or_else(|| panic!("rank 0 reports an error\n{stderr}"));
    assert!(rank0_line.contains("rank 1"), "{rank0_line}");
    assert!(
        !stderr.contains("killing it"),
        "rank 0 should not need the supervisor's kill\n{stderr}"
    );
    assert!(!Path::new(&format!("/proc/{survivor}")).exists() || took < Duration::from_secs(60));
    eprintln!("the run ended {took:?} after the kill");
}

/// SIGTERM to the supervisor: every worker saves the same step's checkpoint and exits; the supervisor exits
/// with 130, and --resume continues from that step.
#[test]
fn sigterm_to_the_supervisor_saves_every_rank() {
    let dir = tempfile::tempdir().unwrap();
    let (mut sup, _seen, rest) = start_long_run(dir.path());
    // SAFETY: signalling a process this test started.
    assert_eq!(unsafe { libc::kill(sup.id() as i32, libc::SIGTERM) }, 0);
    let status = wait_at_most(&mut sup, Duration::from_secs(60)).expect("the run stops");
    let stdout: Vec<String> = rest.map(|l| l.unwrap()).collect();
    let mut stderr = String::new();
    sup.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert_eq!(status.code(), Some(130), "{stdout:?}\n{stderr}");
    let (_, step) =
        stopped_at_step(stdout.iter().map(String::as_str)).unwrap_or_else(|| panic!("{stdout:?}\n{stderr}"));
    let ck: PathBuf = dir.path().join(format!("checkpoints/step_{step:06}"));
    let files = checkpoint_files(&ck);
    assert!(
        files.contains(&"COMPLETE".to_string()) && files.contains(&"optim_rank1.safetensors".to_string()),
        "{files:?}"
    );
    let out = run(nc_train()
        .args(args(dir.path(), step + 1))
        .args(["--world-size", "2", "--resume"]));
    assert!(out.status.success(), "{}", text(&out));
    assert_stdout_has(&out, &format!("at step {step}"));
}

/// Ranks started by hand with the torchrun variables on 127.0.0.1 (an outside launcher) train together,
/// and equal the supervisor's run.
#[test]
fn ranks_started_by_hand_with_torchrun_variables() {
    let dir = tempfile::tempdir().unwrap();
    let a = args(&dir.path().join("hand"), 4);
    let outs = two_ranks_by_hand(&a, |_| vec![]);
    for o in &outs {
        assert!(o.status.success(), "{}", text(o));
    }
    assert!(outs[1].stdout.is_empty(), "rank 1 logs nothing: {}", text(&outs[1]));
    let sup = dir.path().join("sup");
    let out = run(nc_train().args(args(&sup, 4)).args(["--world-size", "2"]));
    assert!(out.status.success(), "{}", text(&out));
    let bits = |v: Vec<(u64, f64)>| v.iter().map(|(s, l)| (*s, l.to_bits())).collect::<Vec<_>>();
    assert_eq!(bits(losses(&dir.path().join("hand"))), bits(losses(&sup)));
    // WORLD_SIZE from the launcher wins over the flag; a conflicting one is an error naming both
    let out = run(by_hand(0, 2, free_port(), &a).args(["--world-size", "3"]));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("WORLD_SIZE=2") && err.contains("--world-size 3"), "{err}");
}

/// Ranks started with different flags refuse to start, every one with an error naming the flag.
#[test]
fn ranks_with_different_flags_refuse_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let a = args(&dir.path().join("x"), 4);
    let t0 = Instant::now();
    for o in two_ranks_by_hand(&a, |r| vec!["--seed".into(), (r + 1).to_string()]) {
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("--seed"), "{err}");
    }
    assert!(
        t0.elapsed() < Duration::from_secs(25),
        "refused at the rendezvous, not by a timeout"
    );
    assert!(!dir.path().join("x/checkpoints").exists(), "nothing trained");
}

/// A malformed NC_P2P_ONE_SHOT_BYTES (the peer-to-peer ring's one-shot threshold) is one error from the
/// supervisor, before any worker starts or any GPU is needed, naming the variable; no panic.
#[test]
fn a_bad_one_shot_threshold_is_refused_before_any_rank_starts() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = args(dir.path(), 2);
    let backend = a.iter().position(|x| x == "cpu").unwrap();
    a[backend] = "cuda".into();
    let out = run(nc_train()
        .args(&a)
        .args(["--world-size", "2", "--comm", "ring"])
        .env("NC_P2P_ONE_SHOT_BYTES", "lots"));
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("NC_P2P_ONE_SHOT_BYTES=\"lots\"") && err.contains("256K"),
        "{}",
        text(&out)
    );
    assert!(!err.contains("panicked") && !err.contains("rank 0"), "{}", text(&out));
}
