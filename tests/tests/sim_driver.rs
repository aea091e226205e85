//! The simulated CUDA driver (sim/driver, docs/simulated-gpu.md): each of its checks catches the bug it exists
//! for. Every test builds the simulator (scripts/sim.sh --build, once; needs g++) and runs a small program
//! (src/bin/nc-sim-probe.rs) against it in a child process, twice: correct, and with the bug planted. The
//! correct run must pass cleanly, the planted one must be caught (an error code, a report naming the kernel or
//! call, or results that differ from the CPU's), so each check is shown to fail on its bug.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds target/sim once per test binary; a machine without g++ fails here with the build's own message.
fn built() {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let r = BUILT.get_or_init(|| {
        let out = Command::new(root().join("scripts/sim.sh"))
            .arg("--build")
            .output()
            .map_err(|e| format!("running scripts/sim.sh: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "scripts/sim.sh --build failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    });
    if let Err(e) = r {
        panic!("{e}");
    }
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs nc-sim-probe SCENARIO [planted] against the simulator with `env` (and no NC_SIM_* from outside).
fn probe(scenario: &str, planted: bool, env: &[(&str, &str)]) -> Run {
    built();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nc-sim-probe"));
    cmd.arg(scenario);
    if planted {
        cmd.arg("planted");
    }
    for var in [
        "NC_SIM_DEVICES",
        "NC_SIM_MEM",
        "NC_SIM_RACE",
        "NC_SIM_TRACE",
        "NC_SIM_PLANT_SKIP_SYNCTHREADS",
        "NC_SIM_FAIL_ALLOC",
        "NC_SIM_FAULT_KERNEL",
    ] {
        cmd.env_remove(var);
    }
    let lib = root().join("target/sim");
    let path = match std::env::var("LD_LIBRARY_PATH") {
        Ok(p) if !p.is_empty() => format!("{}:{p}", lib.display()),
        _ => lib.display().to_string(),
    };
    cmd.env("LD_LIBRARY_PATH", path).envs(env.iter().copied());
    let Output { status, stdout, stderr } = cmd.output().expect("running nc-sim-probe");
    Run {
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

fn show(r: &Run) -> String {
    format!("exit {:?}\nstdout:\n{}\nstderr:\n{}", r.code, r.stdout, r.stderr)
}

/// The correct variant ran to the end with `line` on stdout and nothing from the simulator on stderr.
fn clean(r: &Run, line: &str) {
    assert!(
        r.code == Some(0) && r.stdout.contains(line) && !r.stderr.contains("nc-sim:"),
        "{}",
        show(r)
    );
}

/// The call was refused: `error` (the failing call and its CUDA error) on stdout, every one of `words` on stderr.
fn refused(r: &Run, error: &str, words: &[&str]) {
    assert!(r.stdout.contains(error), "missing '{error}' on stdout:\n{}", show(r));
    for w in words {
        assert!(r.stderr.contains(w), "missing '{w}' on stderr:\n{}", show(r));
    }
}

/// SCENARIO's correct variant runs cleanly to `line`; its planted variant is refused (see `refused`).
fn planted_is_refused(scenario: &str, line: &str, error: &str, words: &[&str]) {
    clean(&probe(scenario, false, &[]), line);
    refused(&probe(scenario, true, &[]), error, words);
}

/// A bad value of the simulator's setting `var` is refused at cuInit with the setting as written (and what to
/// write instead); the run, for what else its message must say.
fn bad_setting(scenario: &str, var: &str, value: &str) -> Run {
    let r = probe(scenario, false, &[(var, value)]);
    refused(
        &r,
        "init error: CUDA_ERROR_INVALID_VALUE",
        &[&format!("{var}='{value}'")],
    );
    r
}

/// The planted variant was stopped by a device fault report (exit status 1) containing every one of `words`.
fn stopped(r: &Run, words: &[&str]) {
    assert_eq!(r.code, Some(1), "{}", show(r));
    assert!(r.stderr.contains("nc-sim: DEVICE FAULT"), "{}", show(r));
    for w in words {
        assert!(r.stderr.contains(w), "missing '{w}' in the report:\n{}", show(r));
    }
}

#[test]
fn every_entry_of_every_ptx_has_an_emulated_kernel_the_p2p_ring_included() {
    let r = probe("modules", false, &[]);
    assert!(
        r.code == Some(0) && r.stdout.contains("loaded 13 modules, 54 entries"),
        "{}",
        show(&r)
    );
    // The P2P ring's module is emulated too (issue 20): its five kernels resolve, with no simulator message.
    assert!(r.stdout.contains("p2p_ring ok, 5 entries"), "{}", show(&r));
    assert_eq!(r.stderr.matches("nc-sim:").count(), 0, "{}", show(&r));
}

#[test]
fn a_launch_argument_of_the_wrong_width_is_refused() {
    // A u32 where the kernel reads a u64: the high half comes from the neighbouring float; the packed-buffer
    // launch path knows the size: 16 bytes where the PTX's parameters take 20.
    for (scenario, says) in [("wrong-width", "parameter 1"), ("wrong-width-extra", "16 bytes")] {
        let error = "launch error: CUDA_ERROR_INVALID_VALUE";
        planted_is_refused(scenario, "fill correct: true", error, &["nc_fill_f32", says]);
    }
}

#[test]
fn a_grid_one_block_short_leaves_poison_that_differs_from_the_cpu() {
    let full = probe("grid", false, &[]);
    clean(&full, "launched");
    assert!(max_error_vs_cpu(&full) < 1e-6, "{}", show(&full));
    // The last row is never written: it keeps the allocation's NaN poison.
    let short = probe("grid", true, &[]);
    assert!(max_error_vs_cpu(&short).is_infinite(), "{}", show(&short));
}

/// The "grid" scenario's error against the CPU, from its stdout.
fn max_error_vs_cpu(r: &Run) -> f64 {
    let line = r
        .stdout
        .lines()
        .find(|l| l.starts_with("max abs error vs CPU: "))
        .unwrap_or_else(|| panic!("no error line:\n{}", show(r)));
    line.trim_start_matches("max abs error vs CPU: ")
        .parse()
        .expect("a number")
}

#[test]
fn a_removed_syncthreads_is_reported_as_a_shared_memory_race_in_race_mode() {
    // nc_rmsnorm_forward_f32's block reduction: each warp's lane 0 writes its partial sum to shared memory,
    // __syncthreads, warp 0 reads them. NC_SIM_PLANT_SKIP_SYNCTHREADS=0 makes every thread skip its first
    // __syncthreads, as if it were deleted from the source.
    let race = [("NC_SIM_RACE", "1")];
    let r = probe("grid", false, &race);
    clean(&r, "launched");
    assert!(max_error_vs_cpu(&r) < 1e-6, "{}", show(&r));
    let r = probe(
        "grid",
        false,
        &[("NC_SIM_RACE", "1"), ("NC_SIM_PLANT_SKIP_SYNCTHREADS", "0")],
    );
    stopped(
        &r,
        &[
            "emu race: kernel nc_rmsnorm_forward_f32",
            "with no barrier between them",
            "block_sum::partial",
            "kernel nc_rmsnorm_forward_f32: the emulator reported",
            "shared-memory race(s)",
        ],
    );
    // Outside race mode the same bug shows in the numbers (sums read before every warp wrote its own).
    let r = probe("grid", false, &[("NC_SIM_PLANT_SKIP_SYNCTHREADS", "0")]);
    assert!(r.code == Some(0) && max_error_vs_cpu(&r) > 1e-2, "{}", show(&r));
    // A bad value is refused at cuInit with what to write instead.
    let r = bad_setting("grid", "NC_SIM_PLANT_SKIP_SYNCTHREADS", "first");
    assert_eq!(r.stderr.matches("nc-sim:").count(), 1, "{}", show(&r));
}

#[test]
fn a_kernel_reading_one_element_past_its_buffer_is_stopped_with_the_kernel_and_allocation() {
    // y of 4096 bytes: the read lands on the guard page; of 4000 bytes: in the 96 bytes before it, which only
    // the per-access check sees.
    for (scenario, size) in [("past-end", "4096"), ("past-end-slack", "4000")] {
        clean(&probe(scenario, false, &[]), "sum ok: true");
        let r = probe(scenario, true, &[]);
        let live = format!("live {size} bytes");
        let offset = format!("offset {size}, past its end");
        stopped(&r, &["kernel nc_add_inplace_f32 reads 4 bytes", &live, &offset]);
    }
}

#[test]
fn a_kernel_writing_one_element_past_its_buffer_is_stopped() {
    clean(&probe("write-past-end", false, &[]), "fill ok: true");
    let r = probe("write-past-end", true, &[]);
    stopped(
        &r,
        &[
            "kernel nc_fill_f32 writes 4 bytes",
            "live 4000 bytes",
            "offset 4000, past its end",
        ],
    );
}

#[test]
fn a_read_of_unwritten_memory_shows_as_nan() {
    clean(&probe("unwritten", false, &[]), "nan results: 0");
    let r = probe("unwritten", true, &[]);
    assert!(
        r.code == Some(0) && r.stdout.contains("nan results: 256"),
        "{}",
        show(&r)
    );
}

#[test]
fn a_use_after_free_and_an_out_of_bounds_copy_are_stopped() {
    clean(&probe("use-after-free", false, &[]), "sum ok: true");
    stopped(
        &probe("use-after-free", true, &[]),
        &["kernel nc_add_inplace_f32 reads", "FREED 1024 bytes"],
    );
    clean(&probe("copy-bounds", false, &[]), "upload done");
    stopped(
        &probe("copy-bounds", true, &[]),
        &["cuMemcpyHtoD", "+4004 bytes", "live 4000 bytes"],
    );
}

#[test]
fn a_missing_stream_wait_is_reported_as_a_race_in_race_mode() {
    let race = [("NC_SIM_RACE", "1")];
    clean(&probe("race", false, &race), "z correct: true");
    let r = probe("race", true, &race);
    stopped(
        &r,
        &[
            "RACE",
            "written by \"kernel nc_fill_f32",
            "read by \"kernel nc_add_inplace_f32",
        ],
    );
}

#[test]
fn a_ptx_whose_stamp_differs_from_the_emulated_source_is_refused() {
    let words = ["module 'elementwise'", "disagree"];
    planted_is_refused("stamp", "module loaded", "load error: CUDA_ERROR_INVALID_IMAGE", &words);
}

#[test]
fn memory_is_what_nc_sim_mem_says_and_more_is_out_of_memory() {
    let mem = [("NC_SIM_MEM", "64M")];
    let r = probe("oom", false, &mem);
    clean(&r, "second allocation ok");
    assert!(r.stdout.contains("total 67108864 free 67108864") && r.stdout.contains("free after 48 MiB: 16777216"));
    refused(
        &probe("oom", true, &mem),
        "second alloc error: CUDA_ERROR_OUT_OF_MEMORY",
        &[],
    );
    // A bad setting is an error that says what to write instead, not a crash.
    let r = bad_setting("oom", "NC_SIM_MEM", "lots");
    assert!(r.stderr.contains("4G"), "{}", show(&r));
}

#[test]
fn an_injected_kernel_fault_is_sticky_and_an_injected_oom_fails_every_later_allocation() {
    // The "race" scenario: stream A fills x, stream B adds x into z, both synchronized. The first launch of
    // nc_fill_f32 faults when it runs: its launch returns (asynchronous, as on hardware); the next call after
    // the fault ran (the event record, the second launch or a synchronization, depending on how fast the stream
    // worker got there) reports the illegal address, and so would every later call.
    let r = probe("race", false, &[("NC_SIM_FAULT_KERNEL", "nc_fill_f32:1")]);
    let fault = "kernel nc_fill_f32 (launch 1 of it on device 0) faulted";
    refused(&r, " error: CUDA_ERROR_ILLEGAL_ADDRESS", &[fault]);
    assert!(
        r.code == Some(0) && r.stdout.starts_with("launched\n") && !r.stdout.contains("z correct"),
        "{}",
        show(&r)
    );
    // Another kernel's name, a later launch or another device: nothing happens.
    for off in ["nc_add_inplace_f32:2", "nc_fill_f32:2", "nc_fill_f32:1@1"] {
        clean(
            &probe("race", false, &[("NC_SIM_FAULT_KERNEL", off)]),
            "z correct: true",
        );
    }
    // The second allocation (and every later one) is out of memory; on device 1 only, device 0 is unaffected.
    refused(
        &probe("race", false, &[("NC_SIM_FAIL_ALLOC", "2")]),
        "alloc error: CUDA_ERROR_OUT_OF_MEMORY",
        &["out of memory, injected (NC_SIM_FAIL_ALLOC: allocation 2"],
    );
    clean(
        &probe("race", false, &[("NC_SIM_FAIL_ALLOC", "2@1")]),
        "z correct: true",
    );
    for (var, bad) in [("NC_SIM_FAIL_ALLOC", "0"), ("NC_SIM_FAULT_KERNEL", "nc_fill_f32")] {
        bad_setting("race", var, bad);
    }
}

#[test]
fn cublas_handles_are_destroyed_in_their_own_context() {
    // Two of nc's CUDA backends on two simulated devices; the one on device 0 is dropped while device 1's
    // context is current on the thread. The cuBLAS stand-ins refuse a destroy from another context (one line,
    // and nc's teardown warns), so nothing on stderr means each handle went in its own context.
    let r = probe("backends-across-devices", false, &[("NC_SIM_DEVICES", "2")]);
    assert!(
        r.code == Some(0)
            && r.stdout.contains("dropped the device-0 backend")
            && r.stdout.contains("dropped the device-1 backend")
            && !r.stderr.contains("nc simulated cuBLAS")
            && !r.stderr.contains("warning:"),
        "{}",
        show(&r)
    );
}
