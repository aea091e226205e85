//! A finished run of nc-train under test: its output as text (for assertion messages), an assertion on what it
//! printed, its loss curve (metrics.jsonl) and how far two curves are apart, and a command cleared of the
//! launcher's variables. Shared by the test files that run nc-train; each includes this file and uses some.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Process ranks against one process, relative, on every step's loss. The two compute the same step from the
/// same tokens, but ranks sum their micro-batches' gradients in the ring after the backward while one rank
/// accumulates them in one buffer during it, so the weights differ in the last bits (tests/tests/multi_rank.rs
/// measured 3.2e-6 of the largest weight after 6 steps). 1e-6 (about 10 f32 ulps) lets a different but
/// legitimate rounding pass, while a wrong token, step, owner or state moves the loss by 1e-3 or more.
pub const LOSS_TOL: f64 = 1e-6;
/// How far bf16 ranks may drift from the one-process bf16 run (raw losses, relative). Two ranks sum the
/// gradient in another order than one rank accumulating two micro-batches, and a last-bit difference of the
/// f32 master can flip a bf16 working weight's rounding (2^-8 relative), which later steps carry on (the thread
/// ranks of tests/tests/multi_rank.rs measured 1.3e-5 for a bf16 resume 2 -> 1). Measured in processes.rs: 0
/// (bit for bit) for two processes vs one and for the 2 -> 1 resume. 5e-5 leaves room for another machine's
/// rounding and stays under what its config's bf16 run differs from its fp32 run by (2.2e-4 at step 1), so a
/// run that quietly trained fp32 fails; a checkpoint missing a rank's master pieces moves the loss by far more.
pub const BF16_LOSS_TOL: f64 = 5e-5;

/// The exit status and both streams, for a failed assertion's message.
pub fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd` to its end; panics with its output (and `what`) unless it succeeded.
pub fn succeeded(cmd: &mut Command, what: &str) -> Output {
    let out = cmd.output().expect("starting the command");
    assert!(out.status.success(), "{what} failed:\n{}", text(&out));
    out
}

/// Panics with the run's output unless its stdout contains `needle`.
pub fn assert_stdout_has(out: &Output, needle: &str) {
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(needle),
        "stdout should contain '{needle}':\n{}",
        text(out)
    );
}

/// `cmd` without the launcher's variables (nc_core's LAUNCH_VARS: RANK, WORLD_SIZE, ...): a test process may
/// itself run under a launcher, and the runs here set their own.
pub fn without_launch_vars(cmd: &mut Command) -> &mut Command {
    for v in nc_core::train::launch::LAUNCH_VARS {
        cmd.env_remove(v);
    }
    cmd
}

/// (step, raw_loss) of metrics.jsonl, the last record of each step (a resumed run logs again what a stopped
/// one logged after its checkpoint), by step.
pub fn losses(out_dir: &Path) -> Vec<(u64, f64)> {
    let t = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
    nc_core::train::metrics::last_per_step(&t, "raw_loss")
        .into_iter()
        .map(|(step, v)| (step, v["raw_loss"].as_f64().unwrap()))
        .collect()
}

/// The largest relative difference of two curves over the same steps (infinite on a NaN).
pub fn gap(a: &[(u64, f64)], b: &[(u64, f64)]) -> f64 {
    assert_eq!(
        a.iter().map(|x| x.0).collect::<Vec<_>>(),
        b.iter().map(|x| x.0).collect::<Vec<_>>()
    );
    a.iter()
        .zip(b)
        .map(|(x, y)| ((x.1 - y.1) / y.1).abs())
        .fold(0.0, |m, d| if d.is_nan() { f64::INFINITY } else { m.max(d) })
}

/// Panics unless the loss curve `got` is within `tol` (relative, every step) of `want`; prints the gap either
/// way, for the record of how close legitimate runs come.
pub fn assert_curves_close(what: &str, got: &[(u64, f64)], want: &[(u64, f64)], tol: f64) {
    let g = gap(got, want);
    eprintln!("{what}: largest relative loss difference {g:e} (limit {tol:e})");
    assert!(g <= tol, "{what}: {g:e} over {tol:e}\n{got:?}\n{want:?}");
}

/// The step of the run's `stopped at step N ...` line (a Ctrl-C or SIGTERM stop), with the line.
pub fn stopped_at_step<'a>(lines: impl IntoIterator<Item = &'a str>) -> Option<(&'a str, u64)> {
    let line = lines.into_iter().find(|l| l.starts_with("stopped at step "))?;
    let step = line["stopped at step ".len()..].split(' ').next()?.parse().ok()?;
    Some((line, step))
}

/// The flags of the multi-process tests' small run: a 2-layer, 128-wide model on 32-token sequences, `dbs`
/// sequences per rank per micro-step, `total` tokens a step, `steps` steps on `backend`, evaluated (128 tokens)
/// only at the start and the end, written into `out`.
pub fn small_run(backend: &str, out: &Path, steps: u64, dbs: u64, total: u64) -> Vec<String> {
    let flags = [
        ("--backend", backend.to_string()),
        ("--depth", "2".into()),
        ("--max-seq-len", "32".into()),
        ("--dbs", dbs.to_string()),
        ("--total-batch-size", total.to_string()),
        ("--eval-every", "0".into()),
        ("--eval-tokens", "128".into()),
        ("--num-iterations", steps.to_string()),
        ("--out-dir", out.to_str().unwrap().into()),
    ];
    flags
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_string(), value])
        .collect()
}
