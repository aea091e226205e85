//! nc-train on the simulated GPU (issue 19; docs/simulated-gpu.md): the real binary, run as a child under
//! `scripts/sim.sh`, trains a small embedded run (the embedded default model: 4 layers, width 128; T 64,
//! 4 sequences a step, 20 steps) on `--backend cuda`, and is compared with the CPU:
//! - fp32: the first train loss (one forward, no update yet) within 1e-5 relative of the CPU backend's (the
//!   model-parity tolerance of tests/tests/cuda_parity.rs) and the last validation loss within 2e-3 (the GPU
//!   check's train-f32 step);
//! - bf16: the same against its CPU twin (`--backend cpu --precision bf16`) within the GPU check's train step
//!   tolerances: first loss 2e-3, last validation loss 5e-3;
//! - `--resume` from the step-10 checkpoint on the simulated device ends bit for bit where the straight run
//!   did (losses of steps 10-19, the step-20 model and optimizer files);
//! - a device too small for the run (NC_SIM_MEM) ends with the allocator's out-of-memory report and a
//!   non-zero exit, and the checkpoint it was resuming from is intact (same bytes, nothing added); so do an
//!   injected out-of-memory and an injected kernel fault in the middle of the run (NC_SIM_FAIL_ALLOC,
//!   NC_SIM_FAULT_KERNEL), each with one line naming the cause as the output's end;
//! - the plan (`nc_core::plan::memory_per_gpu`, what `--plan` prints) prices what the bf16 run allocated (the
//!   allocator's peak, less the cuBLASLt workspace the plan counts in its fixed per-process overhead) within 5%.
//!
//! The bf16 runs use the allocator's no-caching mode (NC_NO_ALLOC_CACHE=1) so the simulator's memory checks
//! see every tensor; the fp32 run keeps the caching allocator. Without the simulator (no g++, or its sources
//! not in this checkout) each test prints why and passes.

use nc_core::plan::{memory_per_gpu, Precision, Recompute};
use nc_core::ModelConfig;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
#[path = "support/procs.rs"]
mod procs;
use procs::files;
#[path = "support/runs.rs"]
mod runs;
use runs::text;

#[allow(dead_code)]
#[path = "../../tests/src/sim.rs"]
mod sim;

/// The run every test trains: the embedded default model, small enough for the simulator.
const SMALL_RUN: [&str; 14] = [
    "--max-seq-len",
    "64",
    "--dbs",
    "4",
    "--num-iterations",
    "20",
    "--eval-every",
    "10",
    "--eval-tokens",
    "1024",
    "--save-every",
    "10",
    "--recompute",
    "none",
];
/// The cuBLASLt workspace the CUDA backend allocates once (core/src/backend/cuda/blas_lt.rs), which the plan
/// prices in its fixed per-process overhead rather than per buffer.
const CUBLASLT_WORKSPACE_BYTES: f64 = (32u64 << 20) as f64;

/// The simulator's libraries, or None (with the skip line) where it cannot be built.
fn simulator() -> Option<PathBuf> {
    match sim::simulator_libraries(&sim::BLAS_LIBRARIES) {
        Ok(libs) => Some(libs),
        Err(why) => {
            eprintln!("no simulated GPU: {why}; sim_train not run");
            None
        }
    }
}

fn nc_train() -> &'static str {
    env!("CARGO_BIN_EXE_nc-train")
}

/// nc-train on the CPU with `args`; panics with its output unless it succeeded.
fn on_cpu(args: &[&str]) -> Output {
    let out = Command::new(nc_train()).args(args).output().expect("starting nc-train");
    assert_succeeded("nc-train on the CPU", &out);
    out
}

/// nc-train under scripts/sim.sh with `args` and extra environment; the output, whatever the exit.
fn on_simulator(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("bash");
    cmd.arg(sim::repo_root().join("scripts/sim.sh"))
        .arg(nc_train())
        .args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("starting scripts/sim.sh")
}

fn assert_succeeded(what: &str, out: &Output) {
    assert!(out.status.success(), "{what} failed ({}):\n{}", out.status, text(out));
}

/// The metrics.jsonl rows of a run.
fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap_or_else(|e| panic!("reading {}/metrics.jsonl: {e}", dir.display()))
        .lines()
        .map(|l| serde_json::from_str(l).expect("a metrics row is JSON"))
        .collect()
}

/// (step, raw train loss) of every training step.
fn train_losses(dir: &Path) -> Vec<(u64, f64)> {
    metrics(dir)
        .iter()
        .filter_map(|r| Some((r["step"].as_u64()?, r.get("raw_loss")?.as_f64()?)))
        .collect()
}

fn last_val_loss(dir: &Path) -> f64 {
    metrics(dir)
        .iter()
        .filter_map(|r| r.get("val_loss")?.as_f64())
        .last()
        .expect("a validation loss")
}

fn relative(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

/// First train loss and last validation loss of the simulated run against the CPU run, within the limits.
fn compare_curves(what: &str, cpu: &Path, gpu: &Path, first_limit: f64, val_limit: f64) {
    let (c, g) = (train_losses(cpu), train_losses(gpu));
    assert_eq!(c.len(), 20, "{what}: the CPU run's steps");
    assert_eq!(g.len(), 20, "{what}: the simulated run's steps");
    let first = relative(g[0].1, c[0].1);
    let val = relative(last_val_loss(gpu), last_val_loss(cpu));
    eprintln!(
        "{what}: first train loss cpu {:.7} sim {:.7} (relative {first:.2e}, limit {first_limit:.0e}); last val \
         loss cpu {:.7} sim {:.7} (relative {val:.2e}, limit {val_limit:.0e})",
        c[0].1,
        g[0].1,
        last_val_loss(cpu),
        last_val_loss(gpu)
    );
    assert!(
        first <= first_limit,
        "{what}: first train loss differs by {first:.2e} relative"
    );
    assert!(
        val <= val_limit,
        "{what}: last validation loss differs by {val:.2e} relative"
    );
}

#[test]
fn fp32_on_the_simulated_gpu_matches_the_cpu_backend() {
    if simulator().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cpu, gpu) = (dir.path().join("cpu"), dir.path().join("sim"));
    on_cpu(
        &[
            &SMALL_RUN[..],
            &["--backend", "cpu", "--out-dir", cpu.to_str().unwrap()],
        ]
        .concat(),
    );
    let out = on_simulator(
        &[
            &SMALL_RUN[..],
            &["--backend", "cuda", "--out-dir", gpu.to_str().unwrap()],
        ]
        .concat(),
        &[],
    );
    assert_succeeded("nc-train --backend cuda on the simulated GPU", &out);
    let log = text(&out);
    assert!(
        log.contains("simulated"),
        "the start-up line names the simulated device:\n{log}"
    );
    compare_curves("fp32", &cpu, &gpu, 1e-5, 2e-3);
}

fn copy_folder(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for (name, bytes) in files(from) {
        std::fs::write(to.join(name), bytes).unwrap();
    }
}

#[test]
fn bf16_on_the_simulated_gpu_matches_its_twin_resumes_exactly_and_survives_an_oom() {
    if simulator().is_none() {
        return;
    }
    let no_cache = [("NC_NO_ALLOC_CACHE", "1")];
    let bf16 = [&SMALL_RUN[..], &["--precision", "bf16"]].concat();
    let dir = tempfile::tempdir().unwrap();
    let (twin, gpu, resumed) = (
        dir.path().join("twin"),
        dir.path().join("sim"),
        dir.path().join("resumed"),
    );
    on_cpu(&[&bf16[..], &["--backend", "cpu", "--out-dir", twin.to_str().unwrap()]].concat());
    let cuda = [&bf16[..], &["--backend", "cuda"]].concat();
    let out = on_simulator(&[&cuda[..], &["--out-dir", gpu.to_str().unwrap()]].concat(), &no_cache);
    assert_succeeded("nc-train --backend cuda --precision bf16 on the simulated GPU", &out);
    compare_curves("bf16", &twin, &gpu, 2e-3, 5e-3);
    plan_prices_the_run(&gpu);

    // A run resuming from the step-10 checkpoint on a device too small for it: the allocator's report, a
    // failed exit, and the checkpoint untouched.
    let step10 = resumed.join("checkpoints/step_000010");
    copy_folder(&gpu.join("checkpoints/step_000010"), &step10);
    let before = files(&step10);
    let resume = [&cuda[..], &["--out-dir", resumed.to_str().unwrap(), "--resume"]].concat();
    let oom = on_simulator(&resume, &[("NC_NO_ALLOC_CACHE", "1"), ("NC_SIM_MEM", "40M")]);
    failed_cleanly(&oom, &["out of memory on cuda:0", "What to do"], &resumed, &before);
    // Injected device failures (the simulator's fault injection) in the middle of a resumed run, each in a
    // folder of its own (a failed run's log rows stay out of `resumed`'s metrics), each ending the run with
    // one line naming the cause: every allocation from the 102nd on out of memory (the set-up and the step-10
    // evaluation make about 96, each step 3 more, in this no-caching mode), and a faulted kernel (the
    // optimizer's second launch: step 11's update), whose sticky error the next synchronization reports.
    let injected = |name: &str, env: (&str, &str)| -> (Output, PathBuf) {
        let out_dir = dir.path().join(name);
        copy_folder(&step10, &out_dir.join("checkpoints/step_000010"));
        let args = [&cuda[..], &["--out-dir", out_dir.to_str().unwrap(), "--resume"]].concat();
        (on_simulator(&args, &[("NC_NO_ALLOC_CACHE", "1"), env]), out_dir)
    };
    let (oom, out_dir) = injected("injected_oom", ("NC_SIM_FAIL_ALLOC", "102"));
    failed_cleanly(&oom, &["out of memory on cuda:0"], &out_dir, &before);
    assert!(text(&oom).contains("out of memory, injected (NC_SIM_FAIL_ALLOC: allocation 102"));
    let (fault, out_dir) = injected("injected_fault", ("NC_SIM_FAULT_KERNEL", "nc_adamw_multi_f32:2"));
    failed_cleanly(&fault, &["CUDA_ERROR_ILLEGAL_ADDRESS"], &out_dir, &before);
    let log = text(&fault);
    assert!(
        log.contains("step 00010/") && !log.contains("step 00012/"),
        "the fault came in step 11:\n{log}"
    );

    // The same resume on a device with room: bit for bit the straight run's steps 10-19 and final files.
    let out = on_simulator(&resume, &no_cache);
    assert_succeeded("nc-train --resume on the simulated GPU", &out);
    let straight: Vec<(u64, u64)> = train_losses(&gpu)
        .iter()
        .map(|&(s, l)| (s, l.to_bits()))
        .filter(|&(s, _)| s >= 10)
        .collect();
    let again: Vec<(u64, u64)> = train_losses(&resumed).iter().map(|&(s, l)| (s, l.to_bits())).collect();
    assert_eq!(
        again, straight,
        "the resumed run's losses differ from the straight run's"
    );
    let (want, got) = (
        files(&gpu.join("checkpoints/step_000020")),
        files(&resumed.join("checkpoints/step_000020")),
    );
    for ((name, a), (_, b)) in want.iter().zip(&got).filter(|((n, _), _)| n.ends_with(".safetensors")) {
        assert!(a == b, "{name} of the resumed run differs from the straight run's");
    }
}

/// A run resumed from `out_dir`'s step-10 checkpoint that a device failure stopped: a failed exit; nc-train's
/// one line naming the cause (each of `cause`) ends its output (no cascade of warnings from destructors
/// after it, no panic of the default kind); the checkpoint it resumed from holds the bytes it held `before`,
/// and nothing was added beside it.
fn failed_cleanly(out: &Output, cause: &[&str], out_dir: &Path, before: &[(String, Vec<u8>)]) {
    let log = text(out);
    assert!(!out.status.success(), "the run should have failed:\n{log}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    let first_of_report = stderr
        .lines()
        .find(|l| l.starts_with("nc-train: error: "))
        .unwrap_or("");
    assert!(
        !first_of_report.is_empty() && stderr.matches("nc-train: error: ").count() == 1,
        "one error line:\n{log}"
    );
    for word in cause {
        assert!(stderr.contains(word), "the error names the cause ('{word}'):\n{log}");
    }
    assert!(
        last.contains(" (at ") && !stderr.contains("panicked at") && !stderr.contains("warning:"),
        "the error ends the output:\n{log}"
    );
    assert_eq!(
        files(&out_dir.join("checkpoints/step_000010")),
        before,
        "the checkpoint the failed run resumed from changed"
    );
    let names: Vec<_> = std::fs::read_dir(out_dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("step_000010")],
        "the failed run left a checkpoint behind"
    );
}

/// The plan's memory of the run's model, batch and policy (what `--plan` prints for it; `--plan` itself only
/// describes --depth models with nanochat's vocabulary, not the embedded one) against the allocator's peak in
/// the run (no caching: the exact bytes of the live tensors), less the cuBLASLt workspace, which the plan
/// prices in its fixed per-process overhead: within 5%.
fn plan_prices_the_run(dir: &Path) {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("checkpoints/step_000020/meta.json")).unwrap()).unwrap();
    let model: ModelConfig = serde_json::from_value(meta["model_config"].clone()).expect("the checkpoint's model");
    let memory = memory_per_gpu(&model, 4, 1, Precision::Bf16, Recompute::None);
    let priced = memory.total - memory.slack;
    let peak = metrics(dir)
        .iter()
        .find_map(|r| r.get("peak_allocated_bytes")?.as_f64())
        .expect("the run's metrics hold the allocator's peak");
    let allocated = peak - CUBLASLT_WORKSPACE_BYTES;
    let gap = relative(priced, allocated);
    eprintln!(
        "plan {priced:.0} bytes, run {allocated:.0} bytes (peak {peak:.0} less the cuBLASLt workspace): {gap:.2e}"
    );
    assert!(
        gap <= 0.05,
        "the plan ({priced:.0} bytes) and the run ({allocated:.0}) differ by {gap:.2e}"
    );
}
