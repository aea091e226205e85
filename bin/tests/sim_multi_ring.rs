//! nc-train over the peer-to-peer ring on simulated GPUs (issue 20; docs/simulated-gpu.md): the real binary,
//! `--backend cuda --world-size N` under `scripts/sim.sh`, its workers separate processes on simulated
//! devices that reach each other's memory through the simulator's CUDA IPC and run the ring's kernels
//! (kernels-ptx/cuda/p2p_ring.cu) for the device ZeRO-1 exchange (core/src/train/zero1_p2p.rs).
//!
//! - fp32, two ranks on two devices (`--comm auto`, which must pick the ring and say why) and bf16 (`--comm
//!   ring`), each against one process accumulating two micro-batches of the same tokens, within the
//!   tolerances bin/tests/processes.rs uses for the CPU's processes (1e-6 relative on every step's loss for
//!   fp32, 5e-5 for bf16); three ranks on two devices (ranks 0 and 2 share device 0) against one process
//!   accumulating three. Planted: the ring's wait for the compute stream before a reduce-scatter removed
//!   (`RingExchange::reduce_to_owners` without `wait_for_compute`): the ring read gradients the backward had
//!   not written yet and the fp32 losses moved by far more than the tolerance from step 1 on.
//! - `--comm auto` with NC_SIM_PEER=0 picks NCCL and says why in its `comm:` line (whatever NCCL does next:
//!   the simulator's NCCL stand-in is another task's).
//! - `kill -9` of rank 1 during a run: every rank ends within 60 s, rank 0 by itself naming rank 1, and the
//!   last complete checkpoint is byte for byte what it was.
//! - an out-of-memory and a faulted kernel on rank 1's device in the middle of a run (NC_SIM_FAIL_ALLOC,
//!   NC_SIM_FAULT_KERNEL): every rank ends within 60 s, rank 1 with one line naming itself and the cause
//!   (support/rank_faults.rs).
//!
//! The model is processes.rs's (depth 2, width 128, 32-token sequences, 4 a micro-step, 256 tokens a step) for
//! 4 steps: each simulated run is 5-10 s of wall time on 2 busy cores. Without the simulator (no g++, or
//! NC_TEST_SIM=0) each test prints why and passes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
#[path = "support/procs.rs"]
mod procs;
use procs::{files, kill_rank_1, spawn_until, Killed};
#[path = "support/rank_faults.rs"]
mod rank_faults;
use rank_faults::injected_failure_on_rank_1_ends_every_rank;
#[path = "support/runs.rs"]
mod runs;
#[path = "support/sim_libs.rs"]
mod sim_libs;
use runs::{
    assert_curves_close, assert_stdout_has, losses, small_run, succeeded, text, without_launch_vars, BF16_LOSS_TOL,
    LOSS_TOL,
};
use sim_libs::simulator_with;

#[allow(dead_code)]
#[path = "../../tests/src/sim.rs"]
mod sim;

/// The simulator with the P2P ring's emulated module and the cuBLAS stand-ins, or None (with the skip line).
fn simulator() -> Option<PathBuf> {
    simulator_with("gen/kernels_p2p_ring.cpp", "sim_multi_ring")
}

/// The run: `steps` steps of `tokens` tokens (32-token sequences, 4 a micro-step on each rank).
fn args(out: &Path, steps: u64, tokens: usize) -> Vec<String> {
    let mut a = small_run("cuda", out, steps, 4, tokens as u64);
    a.extend(["--sample-every", "0"].map(String::from));
    a
}

/// nc-train under scripts/sim.sh with `args` on `devices` simulated devices and extra environment.
fn nc_train(args: &[String], devices: usize, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(sim::repo_root().join("scripts/sim.sh"))
        .arg(env!("CARGO_BIN_EXE_nc-train"))
        .args(args)
        .env("NC_SIM_DEVICES", devices.to_string());
    // a test process may itself run under a launcher's variables, or the simulator's: the runs set their own
    without_launch_vars(&mut cmd)
        .env_remove("NC_SIM_PEER")
        .env_remove("NC_SIM_RACE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// `world` ranks over the ring against one process accumulating `world` micro-batches of the same tokens.
fn ring_matches_one_process(what: &str, world: usize, devices: usize, extra: &[&str], tol: f64) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let (one, many) = (dir.path().join("one"), dir.path().join("many"));
    let tokens = 128 * world;
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    succeeded(
        &mut nc_train(&[args(&one, 4, tokens), extra.clone()].concat(), 1, &[]),
        &format!("{what}: one process"),
    );
    let world_flag = vec!["--world-size".to_string(), world.to_string()];
    let out = succeeded(
        &mut nc_train(&[args(&many, 4, tokens), extra, world_flag].concat(), devices, &[]),
        &format!("{what}: {world} processes"),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("x {world} ranks, grad accum 1")),
        "{what}: {world} ranks, one micro-step each:\n{}",
        text(&out)
    );
    let (a, b) = (losses(&one), losses(&many));
    assert_eq!(a.len(), 4, "{what}: the one process's steps");
    assert_curves_close(&format!("{what}: {world} processes vs one"), &b, &a, tol);
    assert!(a[3].1 < a[0].1 - 0.3, "{what}: training should make progress: {a:?}");
    out
}

#[test]
fn fp32_two_ranks_over_the_ring_match_one_process_and_auto_picks_the_ring() {
    if simulator().is_none() {
        return;
    }
    let out = ring_matches_one_process("fp32 --comm auto", 2, 2, &["--comm", "auto"], LOSS_TOL);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("comm: peer-to-peer ring (2 GPUs of one node with peer-to-peer access"),
        "auto picks the ring when the simulated devices can access each other:\n{}",
        text(&out)
    );
}

#[test]
fn bf16_two_ranks_over_the_ring_match_one_process() {
    if simulator().is_none() {
        return;
    }
    let out = ring_matches_one_process(
        "bf16 --comm ring",
        2,
        2,
        &["--comm", "ring", "--precision", "bf16"],
        BF16_LOSS_TOL,
    );
    assert_stdout_has(&out, "comm: peer-to-peer ring");
}

#[test]
fn fp32_three_ranks_two_sharing_a_device_match_one_process() {
    if simulator().is_none() {
        return;
    }
    let out = ring_matches_one_process("fp32 3 ranks on 2 devices", 3, 2, &["--comm", "ring"], LOSS_TOL);
    assert_stdout_has(&out, "3 ranks share 2 GPU(s)");
}

#[test]
fn auto_without_peer_access_picks_nccl_and_says_why() {
    if simulator().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut a = args(dir.path(), 1, 256);
    a.extend(["--world-size", "2", "--comm", "auto"].map(String::from));
    let out = nc_train(&a, 2, &[("NC_SIM_PEER", "0")]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("comm: "))
        .unwrap_or_else(|| panic!("no comm: line\n{}", text(&out)));
    assert!(
        line.starts_with("comm: NCCL (no peer-to-peer ring: cuDeviceCanAccessPeer says rank"),
        "{line}\n{}",
        text(&out)
    );
}

#[test]
fn a_rank_killed_during_the_ring_ends_every_rank_naming_it() {
    if simulator().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut a = args(dir.path(), 100_000, 256);
    a.extend(["--world-size", "2", "--comm", "ring", "--save-every", "2"].map(String::from));
    // scripts/sim.sh execs nc-train, so the child is the supervisor itself
    let (mut sup, seen, _rest) = spawn_until(&mut nc_train(&a, 2, &[]), "step 00003/");
    let ck = dir.path().join("checkpoints/step_000002");
    assert!(
        ck.join("COMPLETE").is_file(),
        "the step-2 checkpoint is complete\n{seen:?}"
    );
    let before = files(&ck);
    let Killed {
        victim,
        status,
        took,
        stderr,
        ..
    } = kill_rank_1(&mut sup, &seen);
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("rank 1 (pid {victim}) was killed by signal 9")),
        "the supervisor names the dead rank\n{stderr}"
    );
    // rank 0's own line (its ring watchdog, or a failed collective), not the supervisor's
    assert!(
        stderr
            .lines()
            .any(|l| !l.starts_with("nc-train: supervisor") && l.contains("rank 0") && l.contains("rank 1")),
        "rank 0 names the dead rank\n{stderr}"
    );
    assert!(
        !stderr.contains("killing it"),
        "rank 0 ends by itself, not by the supervisor's kill\n{stderr}"
    );
    assert_eq!(files(&ck), before, "the last complete checkpoint is intact");
    eprintln!("the run ended {took:?} after the kill");
}

/// A 2-rank run over the ring that would go on for long, checkpointing every 3 steps, with `env` (the fault).
fn faulty_ring_run(out: &Path, env: &[(&str, &str)]) -> Command {
    let mut a = args(out, 100_000, 256);
    a.extend(["--world-size", "2", "--comm", "ring", "--save-every", "3"].map(String::from));
    nc_train(&a, 2, env)
}

/// An out-of-memory on rank 1's device in step 5, after the step-3 checkpoint (NC_SIM_FAIL_ALLOC=84@1: in the
/// no-caching mode set-up makes about 70 allocations on each device and each step 3, the embedding backward's
/// index arrays; the ring itself allocates nothing per step): the allocator's report on one line that names
/// rank 1, every rank ended within 60 s.
#[test]
fn an_out_of_memory_on_one_rank_ends_every_rank_naming_it() {
    if simulator().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    injected_failure_on_rank_1_ends_every_rank(
        &mut faulty_ring_run(dir.path(), &[("NC_NO_ALLOC_CACHE", "1"), ("NC_SIM_FAIL_ALLOC", "84@1")]),
        dir.path(),
        "on device 1: out of memory, injected (NC_SIM_FAIL_ALLOC",
        "out of memory on cuda:1",
    );
}

/// A kernel that faults on rank 1's device in step 5 (the 6th embedding forward there: the start's evaluation,
/// steps 1-4, then step 5's), after the step-3 checkpoint: the sticky error on one line that names rank 1,
/// every rank ended within 60 s.
#[test]
fn a_kernel_fault_on_one_rank_ends_every_rank_naming_it() {
    if simulator().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    injected_failure_on_rank_1_ends_every_rank(
        &mut faulty_ring_run(dir.path(), &[("NC_SIM_FAULT_KERNEL", "nc_embedding_forward_f32:6@1")]),
        dir.path(),
        "on device 1) faulted: an illegal memory access, injected",
        "CUDA_ERROR_ILLEGAL_ADDRESS",
    );
}
