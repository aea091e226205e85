//! NVTX ranges (core/src/nvtx.rs): a training run opens them nested as the profile should show them (step >
//! micro-step > forward/loss/backward > layer; the optimizer and evaluation on their own), without a profiler
//! they are silent no-ops, and through NVTX's injection protocol a profiler's tool receives every push, pop
//! and stream name (a fake tool, tests/nvtx_fake_tool.c, compiled with g++, stands in for nsys's).
//!
//! The protocol cases run in a child process each (this test binary re-run on one test), since the tool is
//! looked up once per process from NVTX_INJECTION64_PATH.

use nc_core::backend::cpu::CpuBackend;
use nc_core::config::ModelConfig;
use nc_core::model::{self, Gpt};
use nc_core::nvtx::{self, Event};
use nc_core::train::{train, TrainConfig};
use nc_tests::harness::{embedded_corpus, tiny_train_config};
use std::path::Path;
use std::process::{Command, Output};

const LAYERS: usize = 2;

fn tiny_run(out_dir: &Path) -> TrainConfig {
    TrainConfig {
        model: ModelConfig::new(LAYERS, 32, 2, 2, 16, 512, 16).unwrap(),
        device_batch_size: 2,
        // two micro-steps per step
        total_batch_size: 2 * 2 * 16,
        eval_tokens: 2 * 16,
        sample_tokens: 2,
        model_tag: "nvtx".into(),
        data: embedded_corpus(20_000, 4_000, 3),
        seed: 5,
        ..tiny_train_config(out_dir, 2)
    }
}

fn path(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[test]
fn a_training_run_opens_nested_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let (run, events) = nvtx::record(|| train(&tiny_run(dir.path())).unwrap());
    assert_eq!(run.final_step, 2);
    nvtx::check_balanced(&events).unwrap();
    let pushes = |name: &str| events.iter().filter(|e| **e == Event::Push(name.into())).count();
    assert_eq!(pushes("step"), 2);
    assert_eq!(nvtx::parents_of(&events, "step"), vec![Vec::<String>::new(); 2]);
    assert_eq!(nvtx::parents_of(&events, "micro-step"), vec![path(&["step"]); 4]);
    for phase in ["forward", "loss", "backward"] {
        assert_eq!(
            nvtx::parents_of(&events, phase),
            vec![path(&["step", "micro-step"]); 4],
            "{phase}"
        );
    }
    assert_eq!(nvtx::parents_of(&events, "optimizer"), vec![path(&["step"]); 2]);
    for l in 0..LAYERS {
        // forward in every micro-step, and in the evaluations (at step 0 and at the end) outside any step
        let fwd = nvtx::parents_of(&events, &format!("layer {l} fwd"));
        let in_steps = fwd
            .iter()
            .filter(|p| **p == path(&["step", "micro-step", "forward"]))
            .count();
        assert_eq!(in_steps, 4, "layer {l} fwd: {fwd:?}");
        assert!(
            fwd.iter().any(|p| p.first().map(String::as_str) == Some("eval")),
            "{fwd:?}"
        );
        assert_eq!(
            nvtx::parents_of(&events, &format!("layer {l} bwd")),
            vec![path(&["step", "micro-step", "backward"]); 4]
        );
    }
    // the backward visits the layers last to first
    let bwd_order: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            Event::Push(n) if n.ends_with(" bwd") => Some(n.as_str()),
            _ => None,
        })
        .take(LAYERS)
        .collect();
    assert_eq!(bwd_order, ["layer 1 bwd", "layer 0 bwd"]);
}

/// Runs in a child process only (NC_NVTX_CHILD set by the tests below): ranges around a model step and a
/// stream name, then says whether ranges were on.
#[test]
fn child_opens_ranges() {
    if std::env::var_os("NC_NVTX_CHILD").is_none() {
        return;
    }
    let m = ModelConfig::new(1, 32, 2, 2, 16, 64, 8).unwrap();
    let mut gpt = Gpt::new(CpuBackend::new(), m, 1, 8, model::Recompute::None).unwrap();
    gpt.init(1);
    nvtx::name_cuda_stream(std::ptr::null_mut(), "nc compute");
    {
        let _outer = nvtx::range("outer");
        let ids: Vec<u32> = (0..8).collect();
        let targets: Vec<i32> = (1..9).collect();
        gpt.forward_backward(&ids, &targets, 1.0).unwrap();
    }
    println!("nvtx enabled={}", nvtx::enabled());
}

fn child(env: &[(&str, &std::ffi::OsStr)], remove_tool: bool) -> Output {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "child_opens_ranges", "--nocapture", "--test-threads=1"])
        .env("NC_NVTX_CHILD", "1");
    if remove_tool {
        cmd.env_remove("NVTX_INJECTION64_PATH");
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "child failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn without_a_profiler_ranges_are_silent_noops() {
    let out = child(&[], true);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(stdout.contains("nvtx enabled=false"), "{stdout}");
    assert!(
        !stderr.contains("NVTX") && !stdout.contains("NVTX"),
        "{stdout}\n{stderr}"
    );
}

#[test]
fn a_tool_that_cannot_load_is_reported_once_and_ignored() {
    let missing = std::ffi::OsStr::new("/nonexistent/libnot-a-tool.so");
    let out = child(&[("NVTX_INJECTION64_PATH", missing)], false);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(stdout.contains("nvtx enabled=false"), "{stdout}");
    assert_eq!(stderr.matches("no nc ranges").count(), 1, "{stderr}");
}

#[test]
fn a_profilers_tool_receives_every_range_and_stream_name() {
    if Command::new("g++").arg("--version").output().is_err() {
        eprintln!("no g++: the NVTX injection check was not run");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tool = dir.path().join("libfake_nvtx.so");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("nvtx_fake_tool.c");
    let built = Command::new("g++")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&tool)
        .arg(&src)
        .output()
        .unwrap();
    assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
    let log = dir.path().join("calls.log");
    let out = child(
        &[
            ("NVTX_INJECTION64_PATH", tool.as_os_str()),
            ("NC_FAKE_NVTX_LOG", log.as_os_str()),
        ],
        false,
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("nvtx enabled=true"));
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // the tool saw NVTX's table sizes (highest ids 15 and 8), then the calls in order
    assert_eq!(lines.first(), Some(&"init 15 8"), "{text}");
    assert_eq!(lines.get(1), Some(&"stream nc compute"), "{text}");
    let events: Vec<Event> = lines[2..]
        .iter()
        .map(|l| match l.strip_prefix("push ") {
            Some(n) => Event::Push(n.to_string()),
            None => {
                assert_eq!(*l, "pop", "{text}");
                Event::Pop
            }
        })
        .collect();
    nvtx::check_balanced(&events).unwrap();
    assert_eq!(events.first(), Some(&Event::Push("outer".into())), "{text}");
    assert_eq!(
        nvtx::parents_of(&events, "layer 0 bwd"),
        vec![path(&["outer", "backward"])],
        "{text}"
    );
    assert_eq!(nvtx::parents_of(&events, "loss"), vec![path(&["outer"])], "{text}");
}
