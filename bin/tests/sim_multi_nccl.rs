//! nc-train with one process per rank over NCCL on simulated GPUs (issue 20; docs/simulated-gpu.md): the
//! real binary, `--backend cuda --comm nccl --world-size N` with NC_SIM_DEVICES=N, each rank on its own
//! simulated device, its collectives through the NCCL stand-in (sim/nccl/, shared memory between the ranks'
//! processes), and its device ZeRO-1 exchange (core/src/train/zero1_nccl.rs) as it runs on a GPU node.
//!
//! - fp32: 2 and 3 ranks equal one process accumulating as many micro-batches, within processes.rs's LOSS_TOL
//!   (1e-6 relative on every step's loss: the ranks' sum of the gradients rounds differently from one rank's
//!   accumulation; a wrong owner, root, bucket or token moves the loss by 1e-3 or more); a world-2 checkpoint
//!   resumes at world size 1 and 3 and continues the straight run's curve within the same tolerance;
//! - bf16: 2 and 3 ranks (the bf16 working copy broadcast, each rank the f32 master of what it owns) equal
//!   one process within processes.rs's BF16_LOSS_TOL;
//! - failures, each ending every rank, never a hang: a rank killed (SIGKILL) while the other waits in a
//!   collective (within 60 s, naming it, the last complete checkpoint untouched); a stuck rank (the stand-in's
//!   NC_SIM_NCCL_STUCK) after NC_COLLECTIVE_TIMEOUT; an NCCL call that fails (NC_SIM_NCCL_FAIL) and a
//!   collective that fails on the device (NC_SIM_NCCL_FAIL=R:N:async, seen through ncclCommGetAsyncError),
//!   an out-of-memory and a faulted kernel on one rank's device (NC_SIM_FAIL_ALLOC, NC_SIM_FAULT_KERNEL;
//!   support/rank_faults.rs), each with one line naming the rank and the cause.
//!
//! The model is processes.rs's (depth 2, width 128, 32-token sequences) for a few steps: each run costs
//! seconds of CPU on the simulator. Without the simulator (no g++) each test prints why and passes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::mpsc;
use std::time::{Duration, Instant};
#[path = "support/procs.rs"]
mod procs;
use procs::workers_of;
#[path = "support/rank_faults.rs"]
mod rank_faults;
#[path = "support/runs.rs"]
mod runs;
#[path = "support/sim_libs.rs"]
mod sim_libs;
use rank_faults::{
    assert_none_was_killed, assert_rank_0_names_rank_1, complete_checkpoints, finish,
    injected_failure_on_rank_1_ends_every_rank, spawn_reading_stderr, wait_for_line,
};
use runs::{
    assert_curves_close, assert_stdout_has, losses, small_run, succeeded, text, without_launch_vars, BF16_LOSS_TOL,
    LOSS_TOL,
};
use sim_libs::simulator_with;

#[allow(dead_code)]
#[path = "../../tests/src/sim.rs"]
mod sim;

/// The simulator's libraries with the NCCL stand-in, or None (with the skip line).
fn simulator() -> Option<PathBuf> {
    simulator_with("libnccl.so", "sim_multi_nccl")
}

/// nc-train on `devices` simulated GPUs (the stand-ins from `libs`), launcher variables of the test's own
/// environment removed; the caller adds the flags.
fn nc_train(libs: &Path, devices: usize) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nc-train"));
    without_launch_vars(&mut c)
        .env("LD_LIBRARY_PATH", libs)
        .env("NC_SIM_DEVICES", devices.to_string())
        // every tensor its own driver allocation, so the stand-in's range checks see each one's bounds
        .env("NC_NO_ALLOC_CACHE", "1");
    c
}

/// The run: processes.rs's model, `dbs` sequences per rank and micro-step, `total` tokens a step.
fn args(out: &Path, steps: u64, dbs: u64, total: u64) -> Vec<String> {
    small_run("cuda", out, steps, dbs, total)
}

/// `--world-size N --comm nccl`, or nothing for one process.
fn world(n: usize) -> Vec<String> {
    if n == 1 {
        vec![]
    } else {
        vec!["--world-size".into(), n.to_string(), "--comm".into(), "nccl".into()]
    }
}

/// fp32: one process accumulating 6 micro-batches, 2 ranks accumulating 3, 3 ranks accumulating 2 (2 sequences
/// of 32 tokens each, 384 tokens a step) train the same curve; a world-2 run stopped at step 2 resumes at world
/// size 1 and at 3 and continues it.
#[test]
fn fp32_ranks_over_nccl_match_one_process_and_resume_at_other_world_sizes() {
    let Some(libs) = simulator() else { return };
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, n: usize, extra: &[&str]| {
        let out_dir = dir.path().join(name);
        let out = succeeded(
            nc_train(&libs, 3)
                .args(args(&out_dir, 4, 2, 384))
                .args(world(n))
                .args(extra),
            name,
        );
        (out_dir, out)
    };
    let (one, _) = run("one", 1, &[]);
    let (two, out) = run("two", 2, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("comm: NCCL (--comm nccl)") && stdout.contains("NCCL communicator initialized"),
        "{}",
        text(&out)
    );
    assert!(stdout.contains("x 2 ranks, grad accum 3"), "{}", text(&out));
    let (three, out) = run("three", 3, &[]);
    assert_stdout_has(&out, "x 3 ranks, grad accum 2");
    let want = losses(&one);
    assert_eq!(want.len(), 4);
    assert!(want[3].1 < want[0].1 - 0.3, "training should make progress: {want:?}");
    for (what, got) in [("2 ranks", losses(&two)), ("3 ranks", losses(&three))] {
        assert_curves_close(&format!("fp32 over NCCL: {what} vs one process"), &got, &want, LOSS_TOL);
    }
    // a world-2 checkpoint resumed at world size 1 and 3
    let straight = losses(&two);
    for to in [1usize, 3] {
        let d = dir.path().join(format!("2to{to}"));
        let out = nc_train(&libs, 3)
            .args(args(&d, 4, 2, 384))
            .args(world(2))
            .args(["--stop-at-step", "2"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(130), "{}", text(&out));
        assert!(d.join("checkpoints/step_000002/COMPLETE").is_file());
        let out = succeeded(
            nc_train(&libs, 3)
                .args(args(&d, 4, 2, 384))
                .args(world(to))
                .arg("--resume"),
            "resume",
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("re-sharded"),
            "2 -> {to}: {}",
            text(&out)
        );
        let got = losses(&d);
        assert_curves_close(
            &format!("fp32 over NCCL: resumed 2 -> {to} vs straight"),
            &got,
            &straight,
            LOSS_TOL,
        );
    }
}

/// bf16: 2 and 3 ranks (each the f32 master of what it owns; the bf16 working copy broadcast over NCCL) train as
/// one bf16 process accumulating as many micro-batches (2 sequences of 32 tokens each, 384 tokens a step).
#[test]
fn bf16_ranks_over_nccl_match_one_process() {
    let Some(libs) = simulator() else { return };
    let dir = tempfile::tempdir().unwrap();
    let bf16 = ["--precision", "bf16"];
    let run = |name: &str, n: usize| {
        let out_dir = dir.path().join(name);
        let out = succeeded(
            nc_train(&libs, 3)
                .args(args(&out_dir, 4, 2, 384))
                .args(bf16)
                .args(world(n)),
            name,
        );
        (out_dir, out)
    };
    let (one, _) = run("one", 1);
    let (two, out) = run("two", 2);
    assert_stdout_has(&out, "rank 0 keeps the f32 master of the");
    let (three, _) = run("three", 3);
    let want = losses(&one);
    assert_eq!(want.len(), 4);
    assert!(want[3].1 < want[0].1 - 0.3, "training should make progress: {want:?}");
    for (what, got) in [("2 ranks", losses(&two)), ("3 ranks", losses(&three))] {
        assert_curves_close(
            &format!("bf16 over NCCL: {what} vs one process"),
            &got,
            &want,
            BF16_LOSS_TOL,
        );
    }
}

// ---- failures -------------------------------------------------------------------------------------------

/// The collective call (on each rank, counted by the stand-in) where the fault tests act: in step 3 or later
/// of the run below (tens of calls a step), so the step-2 checkpoint is complete by then.
const FAULT_CALL: u64 = 150;

/// A 2-rank run that would go on for long, checkpointing every `save_every` steps, with `env` (the fault to
/// inject).
fn faulty_run(libs: &Path, out: &Path, save_every: u64, env: &[(&str, &str)]) -> Command {
    let mut cmd = nc_train(libs, 2);
    cmd.args(args(out, 100_000, 4, 256))
        .args(world(2))
        .args(["--save-every", &save_every.to_string()]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Waits (at most 300 s) for the stand-in's stderr line `needle` saying that rank 1 reached collective
/// FAULT_CALL; every line seen goes into `seen`.
fn rank_1_reached_the_fault_call(lines: &mpsc::Receiver<String>, needle: &str, seen: &mut Vec<String>) {
    let reached = wait_for_line(lines, needle, Duration::from_secs(300), seen);
    assert!(
        reached,
        "rank 1 never reached collective {FAULT_CALL}:\n{}",
        seen.join("\n")
    );
}

/// How a fault test's run ended: its exit status, its stderr lines joined, and how long it took to end after the
/// test acted.
struct Ended {
    status: ExitStatus,
    stderr: String,
    after: Duration,
}

/// `faulty_run` checkpointing every 2 steps with `env` (the fault), started; waits for the stand-in's stderr line
/// `reached` saying that rank 1 reached collective FAULT_CALL (None: no wait), lets `act` act on the supervisor,
/// then gives the run `limit` to end (panics if it did not).
fn run_into_the_fault(
    libs: &Path,
    out: &Path,
    env: &[(&str, &str)],
    reached: Option<&str>,
    act: impl FnOnce(&Child),
    limit: Duration,
) -> Ended {
    let (mut sup, lines) = spawn_reading_stderr(&mut faulty_run(libs, out, 2, env));
    let mut seen = Vec::new();
    if let Some(needle) = reached {
        rank_1_reached_the_fault_call(&lines, needle, &mut seen);
    }
    act(&sup);
    let t0 = Instant::now();
    let status = finish(&mut sup, &lines, limit, &mut seen);
    let after = t0.elapsed();
    let stderr = seen.join("\n");
    let status = status.unwrap_or_else(|| panic!("the run did not end within {limit:?}:\n{stderr}"));
    Ended { status, stderr, after }
}

/// SIGKILL of rank 1 while rank 0 waits for it in a collective (rank 1 held in collective FAULT_CALL by the
/// stand-in, so rank 0 is inside it too): every rank ends within 60 s, rank 0 naming rank 1, and the
/// checkpoints that were complete are untouched.
#[test]
fn a_rank_killed_in_a_collective_ends_every_rank_naming_it() {
    let Some(libs) = simulator() else { return };
    let dir = tempfile::tempdir().unwrap();
    let stuck = format!("1:{FAULT_CALL}");
    let (mut before, mut victim) = (Vec::new(), 0);
    let kill_rank_1 = |sup: &Child| {
        before = complete_checkpoints(dir.path());
        assert!(
            before.iter().any(|(name, _)| name == "step_000002"),
            "the step-2 checkpoint is complete before the kill: {:?}",
            before.iter().map(|c| &c.0).collect::<Vec<_>>()
        );
        let workers = workers_of(sup.id());
        victim = workers
            .iter()
            .find(|(_, r)| *r == 1)
            .map(|w| w.0)
            .expect("rank 1's pid");
        // SAFETY: killing a process this test started (through the supervisor).
        assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGKILL) }, 0);
    };
    let stuck_env = [("NC_SIM_NCCL_STUCK", stuck.as_str())];
    let limit = Duration::from_secs(60);
    let Ended { status, stderr, after } = run_into_the_fault(
        &libs,
        dir.path(),
        &stuck_env,
        Some("will never complete"),
        kill_rank_1,
        limit,
    );
    eprintln!("the run ended {after:?} after the kill");
    assert_eq!(status.code(), Some(137), "the first failure's code (SIGKILL)\n{stderr}");
    assert!(
        stderr.contains(&format!("rank 1 (pid {victim}) was killed by signal 9")),
        "{stderr}"
    );
    assert_rank_0_names_rank_1(&stderr);
    assert_none_was_killed(&stderr);
    assert_eq!(
        complete_checkpoints(dir.path()),
        before,
        "the complete checkpoints changed"
    );
}

/// A rank stuck in a collective (NC_SIM_NCCL_STUCK: it never arrives, and nothing reports an error) ends the
/// run once NC_COLLECTIVE_TIMEOUT has passed, not before, with the watchdog's line.
#[test]
fn a_stuck_rank_ends_the_run_after_the_collective_timeout() {
    let Some(libs) = simulator() else { return };
    let dir = tempfile::tempdir().unwrap();
    let stuck = format!("1:{FAULT_CALL}");
    // long enough for the legitimate waits of a loaded 2-core machine (a peer's start-up, a step run at a third
    // of a core), short enough for CI
    let timeout = 60;
    let env = [
        ("NC_SIM_NCCL_STUCK", stuck.as_str()),
        ("NC_COLLECTIVE_TIMEOUT", &timeout.to_string()),
    ];
    let limit = Duration::from_secs(timeout + 60);
    let Ended {
        status,
        stderr,
        after: took,
    } = run_into_the_fault(&libs, dir.path(), &env, Some("will never complete"), |_| {}, limit);
    assert_eq!(status.code(), Some(77), "the collective timeout's exit code\n{stderr}");
    assert!(
        stderr.contains(&format!("has not completed (NC_COLLECTIVE_TIMEOUT is {timeout} s)")),
        "{stderr}"
    );
    assert!(
        took >= Duration::from_secs(timeout - 2),
        "ended after {took:?}, before the timeout\n{stderr}"
    );
}

/// An NCCL call that fails on rank 1 (NC_SIM_NCCL_FAIL=1:N): rank 1 ends with one line naming itself and the
/// call, rank 0 follows naming rank 1, within 60 s.
#[test]
fn a_failing_nccl_call_ends_every_rank_naming_it() {
    let Some(libs) = simulator() else { return };
    let dir = tempfile::tempdir().unwrap();
    let fail = format!("1:{FAULT_CALL}");
    let env = [("NC_SIM_NCCL_FAIL", fail.as_str())];
    let Ended { status, stderr, .. } =
        run_into_the_fault(&libs, dir.path(), &env, None, |_| {}, Duration::from_secs(300));
    assert!(!status.success(), "{stderr}");
    let rank1 = stderr
        .lines()
        .find(|l| l.contains("rank 1: NCCL") && l.contains("failed") && l.contains("ncclSystemError"))
        .unwrap_or_else(|| panic!("rank 1's line names the failed call\n{stderr}"));
    assert!(
        (rank1.contains("ncclReduce") || rank1.contains("ncclBroadcast"))
            && rank1.contains(&format!("NC_SIM_NCCL_FAIL={fail}")),
        "the line names the call and the cause: {rank1}"
    );
    assert_rank_0_names_rank_1(&stderr);
    assert_none_was_killed(&stderr);
    // after its failed call rank 1 made no other: the stand-in would have seen the ranks' calls differ
    assert!(
        !stderr.contains("collectives differ"),
        "rank 1 went on calling NCCL\n{stderr}"
    );
}

/// A collective that fails on rank 1's device (NC_SIM_NCCL_FAIL=1:N:async: accepted, then an asynchronous
/// error and no completion, as NCCL reports a transport failure): rank 1's watchdog sees it through
/// ncclCommGetAsyncError and ends the run with one line naming the rank and the error; rank 0 follows.
#[test]
fn an_asynchronous_nccl_error_ends_every_rank_naming_it() {
    let Some(libs) = simulator() else { return };
    let dir = tempfile::tempdir().unwrap();
    let fail = format!("1:{FAULT_CALL}:async");
    let env = [("NC_SIM_NCCL_FAIL", fail.as_str())];
    let limit = Duration::from_secs(60);
    let Ended { status, stderr, .. } =
        run_into_the_fault(&libs, dir.path(), &env, Some("asynchronous error"), |_| {}, limit);
    assert_eq!(status.code(), Some(76), "the asynchronous error's exit code\n{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("rank 1: NCCL reported an asynchronous error"))
        .unwrap_or_else(|| panic!("rank 1's watchdog line\n{stderr}"));
    assert!(
        line.contains("ncclSystemError") && line.contains(&format!("NC_SIM_NCCL_FAIL={fail}")),
        "{line}"
    );
    assert_rank_0_names_rank_1(&stderr);
}

/// An out-of-memory on rank 1's device in the middle of the run (NC_SIM_FAIL_ALLOC=150@1: set-up makes about
/// 70 allocations on each device, each step about 20 in this no-caching mode, NCCL's host-staged collectives
/// included; so in step 5, after the step-3 checkpoint): rank 1 ends with one line naming itself and the
/// out-of-memory, the others follow naming it, within 60 s (`injected_failure_on_rank_1_ends_every_rank`).
#[test]
fn an_out_of_memory_on_one_rank_ends_every_rank_naming_it() {
    let Some(libs) = simulator() else { return };
    let dir = tempfile::tempdir().unwrap();
    injected_failure_on_rank_1_ends_every_rank(
        &mut faulty_run(&libs, dir.path(), 3, &[("NC_SIM_FAIL_ALLOC", "150@1")]),
        dir.path(),
        "on device 1: out of memory, injected (NC_SIM_FAIL_ALLOC",
        "out of memory",
    );
}

/// A kernel that faults on rank 1's device in the middle of the run (NC_SIM_FAULT_KERNEL: the 6th embedding
/// forward there, step 5's after the start's evaluation and steps 1-4; after the step-3 checkpoint): the
/// device's context is broken, rank 1 ends with one line naming itself and the sticky error, the others
/// follow naming it, within 60 s.
#[test]
fn a_kernel_fault_on_one_rank_ends_every_rank_naming_it() {
    let Some(libs) = simulator() else { return };
    let dir = tempfile::tempdir().unwrap();
    injected_failure_on_rank_1_ends_every_rank(
        &mut faulty_run(
            &libs,
            dir.path(),
            3,
            &[("NC_SIM_FAULT_KERNEL", "nc_embedding_forward_f32:6@1")],
        ),
        dir.path(),
        "on device 1) faulted: an illegal memory access, injected",
        "CUDA_ERROR_ILLEGAL_ADDRESS",
    );
}
