//! The peer-to-peer ring on simulated GPUs (issue 20; docs/simulated-gpu.md): `nc-p2p-bench --check-only`,
//! the real binary, as ranks that are separate processes, each on a simulated device, reaching each other's
//! memory through the simulator's CUDA IPC and running the ring's kernels (kernels-ptx/cuda/p2p_ring.cu)
//! with system-scope flags on shared memory. The bench's own checks are bit-exact (one-shot and ring
//! all-reduce, reduce-scatter and all-gather of even, uneven and bucketed bounds, f32 and bf16, against host
//! sums in the kernels' order); a test passes only when every check line says ok and the bench counts 0
//! failures.
//!
//! - two ranks on two devices, and three ranks on two devices (ranks 0 and 2 share device 0: IPC between
//!   processes on one device, as `--comm ring` allows);
//! - race mode (NC_SIM_RACE=1): slot stores are held back until the block's release and each release lands
//!   late, so a ring step that read a peer's slot before waiting on its flag reads stale bytes (planted in
//!   p2p_ring.cu: 18 of the checks failed, 20 in race mode); and the synchronous memset that zeroes the
//!   ring's areas returns before it runs, so a ring that exported its handles without waiting for the zeros
//!   is stopped by the simulator's export check (planted: the synchronization in `set_up_own_side` removed:
//!   "RACE on device memory: cuIpcGetMemHandle(...) exports a 4456448-byte allocation that cuMemsetD8 ...
//!   writes, and the host has not waited for that write");
//! - NC_SIM_PEER=0: the ring refuses to start, every rank naming cuDeviceCanAccessPeer.
//!
//! Cost: each run is 10-25 s of wall time on 2 busy cores (the emulated ring moves about 70 MB per rank).
//! Without the simulator (no g++, or NC_TEST_SIM=0) each test prints why and passes.

use std::process::{Command, Output};

#[allow(dead_code)]
#[path = "../../tests/src/sim.rs"]
mod sim;

/// The simulator with the P2P ring's emulated module, or None (with the skip line).
fn simulator() -> Option<std::path::PathBuf> {
    match sim::simulator_libraries(&["gen/kernels_p2p_ring.cpp"]) {
        Ok(libs) => Some(libs),
        Err(why) => {
            eprintln!("no simulated GPU: {why}; sim_p2p not run");
            None
        }
    }
}

/// `nc-p2p-bench --check-only --nproc N` under scripts/sim.sh with `env`; the output, whatever the exit.
fn bench(nproc: usize, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("bash");
    cmd.arg(sim::repo_root().join("scripts/sim.sh"))
        .arg(env!("CARGO_BIN_EXE_nc-p2p-bench"))
        .args(["--check-only", "--nproc", &nproc.to_string(), "--timeout-s", "120"]);
    for v in [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "NC_SIM_RACE",
        "NC_SIM_PEER",
    ] {
        cmd.env_remove(v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("starting scripts/sim.sh")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every check passed: the run succeeded, said it ran on a simulated device, printed at least `min_checks`
/// check lines, each ok, and counted 0 failures.
fn assert_all_checks_pass(what: &str, out: &Output, min_checks: usize) {
    let log = text(out);
    assert!(
        out.status.success(),
        "{what}: the bench failed ({}):\n{log}",
        out.status
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("device: nc simulated GPU") && stdout.contains("not a GPU's"),
        "{what}: the bench says the device is simulated and its times are not a GPU's:\n{log}"
    );
    let checks: Vec<&str> = stdout.lines().filter(|l| l.starts_with("check ")).collect();
    assert!(
        checks.len() >= min_checks,
        "{what}: {} check lines:\n{log}",
        checks.len()
    );
    assert!(
        checks.iter().all(|l| l.ends_with(" ok")),
        "{what}: a check failed:\n{log}"
    );
    assert!(stdout.contains("check: 0 failures"), "{what}:\n{log}");
}

/// 13 checks a type (4 one-shot, 3 x 2 ring, 2 bucket, 1 ring all-reduce), f32 and bf16.
const CHECKS: usize = 26;

/// Two ranks on two devices, and three (ranks 0 and 2 sharing device 0), with the bench's line of where they ran.
#[test]
fn two_ranks_and_three_on_two_simulated_devices_pass_every_check() {
    if simulator().is_none() {
        return;
    }
    for (nproc, placed) in [(2, "2 ranks on 2 GPU(s)"), (3, "3 ranks on 2 GPU(s) (shared")] {
        let out = bench(nproc, &[("NC_SIM_DEVICES", "2")]);
        assert_all_checks_pass(&format!("{nproc} ranks, 2 devices"), &out, CHECKS);
        assert!(text(&out).contains(placed), "{}", text(&out));
    }
}

#[test]
fn race_mode_late_stores_and_early_returning_memsets_still_pass() {
    if simulator().is_none() {
        return;
    }
    let out = bench(2, &[("NC_SIM_DEVICES", "2"), ("NC_SIM_RACE", "1")]);
    assert!(!text(&out).contains("RACE"), "a race was reported:\n{}", text(&out));
    assert_all_checks_pass("2 ranks, race mode", &out, CHECKS);
}

#[test]
fn without_peer_access_the_ring_refuses_to_start_naming_why() {
    if simulator().is_none() {
        return;
    }
    let out = bench(2, &[("NC_SIM_DEVICES", "2"), ("NC_SIM_PEER", "0")]);
    let log = text(&out);
    assert!(
        !out.status.success(),
        "the ring must not start without peer access:\n{log}"
    );
    for rank in 0..2 {
        assert!(
            log.contains(&format!(
                "rank {rank}: the peer-to-peer ring cannot run: cuDeviceCanAccessPeer says"
            )),
            "rank {rank} names the missing peer access:\n{log}"
        );
    }
    assert!(!log.contains("check "), "no check may run:\n{log}");
}
