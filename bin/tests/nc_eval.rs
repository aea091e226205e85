//! The `nc-eval` binary and nc-train's CORE flags, end to end on the fixture of core/tests/core_e2e.rs:
//! `--core --json` prints nanochat's keys with the values of the independent computation and writes the CSV
//! and JSON beside the checkpoint; bad input is an error that says what to do; nc-train logs CORE to
//! metrics.jsonl on nanochat's schedule, and is off with one line when there is no bundle; two training ranks
//! give the one-rank CORE; --bpb and greedy --sample repeat the training run's own figures and samples.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../core/tests/fixtures/core_eval/e2e")
}

fn nc_eval(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nc-eval")).args(args).output().unwrap()
}

/// nc-eval with `args`, after it succeeded (else panics with its stderr).
fn nc_eval_ok(args: &[&str]) -> Output {
    let out = nc_eval(args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// nc-train with `args`; its stdout, after it succeeded (else panics with its stderr).
fn nc_train_ok(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_nc-train"))
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn core_json_equals_the_independent_computation_and_files_are_written() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("step_000400");
    copy_dir(&fixture().join("checkpoint"), &ckpt);
    let (bundle, tok) = (fixture().join("bundle"), fixture().join("tokenizer"));
    let out = nc_eval_ok(&[
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--core",
        "--json",
        "--eval-bundle",
        bundle.to_str().unwrap(),
        "--tokenizer",
        tok.to_str().unwrap(),
    ]);
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    let want: Value = serde_json::from_str(&std::fs::read_to_string(fixture().join("expected.json")).unwrap()).unwrap();
    for key in ["results", "centered_results", "core_metric"] {
        assert_eq!(got[key], want["all"][key], "{key}");
    }
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(ckpt.join("core_eval.json")).unwrap()).unwrap();
    assert_eq!(saved["core_metric"], want["all"]["core_metric"]);
    let csv = std::fs::read_to_string(ckpt.join("core_eval.csv")).unwrap();
    assert!(csv.starts_with("Task"), "{csv}");
    assert_eq!(csv.lines().count(), 1 + 8 + 1, "{csv}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("30 rows beyond the training length"));
}

#[test]
fn bad_input_is_an_error_that_says_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().to_str().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (&["--checkpoint", t], "pass --core, --bpb or --sample"),
        (&["--checkpoint", t, "--core"], "neither a complete checkpoint"),
        (&["--checkpoint", "/nonexistent/run", "--bpb"], "no such folder"),
        (&["--checkpoint", t, "--bpb", "--split", "test"], "use val or train"),
    ];
    for (args, says) in cases {
        let out = nc_eval(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{args:?}: {err}");
    }
    let ckpt = tmp.path().join("ckpt");
    copy_dir(&fixture().join("checkpoint"), &ckpt);
    let tok = fixture().join("tokenizer");
    let out = nc_eval(&[
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--core",
        "--eval-bundle",
        t,
        "--tokenizer",
        tok.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("nc-data download --eval-bundle"),
        "{err}"
    );
}

fn metrics(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn nc_train_logs_core_on_nanochats_schedule_or_says_why_not() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = fixture().join("bundle");
    let train = |out: &Path, bundle: &str| {
        nc_train_ok(&[
            "--num-iterations",
            "5",
            "--core-metric-every",
            "2",
            "--core-metric-max-per-task",
            "12",
            "--eval-bundle",
            bundle,
            "--out-dir",
            out.to_str().unwrap(),
            "--eval-every",
            "0",
        ])
    };
    let run = tmp.path().join("run");
    let stdout = train(&run, bundle.to_str().unwrap());
    let steps: Vec<u64> = metrics(&run)
        .iter()
        .filter(|r| r.get("core_metric").is_some())
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(
        steps,
        vec![2, 4, 5],
        "every 2 steps after step 0, and the last: {stdout}"
    );
    let last = metrics(&run)
        .into_iter()
        .rfind(|r| r.get("core_metric").is_some())
        .unwrap();
    assert_eq!(last["centered_results"].as_object().unwrap().len(), 8);
    assert_eq!(stdout.matches("CORE metric:").count(), 3, "{stdout}");
    assert!(!stdout.contains("CORE metric failed"), "{stdout}");

    let run = tmp.path().join("run2");
    let stdout = train(&run, tmp.path().join("nowhere").to_str().unwrap());
    assert_eq!(stdout.matches("CORE metric off").count(), 1, "{stdout}");
    assert!(stdout.contains("nc-data download --eval-bundle"), "{stdout}");
    assert!(metrics(&run).iter().all(|r| r.get("core_metric").is_none()));

    // a bundle nanochat would also fail on (a task with fewer examples than its shots) does not end the run
    let run = tmp.path().join("run3");
    let stdout = nc_train_ok(&[
        "--num-iterations",
        "4",
        "--core-metric-every",
        "2",
        "--core-metric-max-per-task",
        "4",
        "--eval-bundle",
        bundle.to_str().unwrap(),
        "--out-dir",
        run.to_str().unwrap(),
    ]);
    assert_eq!(
        stdout
            .matches("CORE metric failed, off for the rest of the run")
            .count(),
        1,
        "{stdout}"
    );
    assert!(
        stdout.contains("10 few-shot examples requested but the task has only 4"),
        "{stdout}"
    );
}

#[test]
fn two_training_ranks_striding_give_the_core_of_one_rank_on_the_same_weights() {
    // 2 ranks each evaluate half of every task's examples during training; nc-eval (one rank) evaluates them
    // all on the checkpoint saved at that step. 512 positions: no row of the fixture bundle is cropped in
    // training, so the two must agree exactly.
    let tmp = tempfile::tempdir().unwrap();
    let (run, bundle) = (tmp.path().join("run"), fixture().join("bundle"));
    let stdout = nc_train_ok(&[
        "--world-size",
        "2",
        "--num-iterations",
        "3",
        "--max-seq-len",
        "512",
        "--device-batch-size",
        "2",
        "--total-batch-size",
        "2048",
        "--eval-every",
        "0",
        "--sample-every",
        "0",
        "--core-metric-every",
        "3",
        "--core-metric-max-per-task",
        "12",
        "--eval-bundle",
        bundle.to_str().unwrap(),
        "--out-dir",
        run.to_str().unwrap(),
    ]);
    let records: Vec<Value> = metrics(&run)
        .into_iter()
        .filter(|r| r.get("core_metric").is_some())
        .collect();
    assert_eq!(records.len(), 1, "{stdout}");
    assert_eq!(
        stdout.matches("CORE metric:").count(),
        1,
        "rank 0 alone logs it: {stdout}"
    );
    assert_eq!(records[0]["core_rows_cropped"], 0);

    let one = nc_eval_ok(&[
        "--checkpoint",
        run.to_str().unwrap(),
        "--core",
        "--max-per-task",
        "12",
        "--json",
        "--eval-bundle",
        bundle.to_str().unwrap(),
    ]);
    let one: Value = serde_json::from_slice(&one.stdout).unwrap();
    assert_eq!(records[0]["centered_results"], one["centered_results"]);
    assert_eq!(records[0]["core_metric"], one["core_metric"]);
    // not a vacuous match: some task is above zero
    assert!(one["results"]
        .as_object()
        .unwrap()
        .values()
        .any(|v| v.as_f64().unwrap() > 0.0));
}

#[test]
fn bpb_and_greedy_samples_equal_the_training_runs_own_on_its_checkpoint() {
    // nc-train evaluates validation bpb and prints greedy samples (24 tokens on the embedded corpus) at its
    // last step, on the weights it saves there; nc-eval on that checkpoint, with the same validation batch
    // (4 rows of 128 tokens) and greedy sampling, must print the same.
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let stdout = nc_train_ok(&[
        "--num-iterations",
        "20",
        "--dbs",
        "4",
        "--total-batch-size",
        "2048",
        "--eval-tokens",
        "512",
        "--eval-every",
        "0",
        "--out-dir",
        run.to_str().unwrap(),
    ]);
    let last = metrics(&run)
        .into_iter()
        .rfind(|r| r["step"] == 20 && r.get("val_bpb").is_some())
        .unwrap();
    let want = format!(
        "val loss {:.6} | bpb {:.6} | 512 tokens",
        last["val_loss"].as_f64().unwrap(),
        last["val_bpb"].as_f64().unwrap()
    );
    let run_dir = run.to_str().unwrap();
    let bpb = nc_eval_ok(&["--checkpoint", run_dir, "--bpb", "--batch-rows", "4", "--tokens", "512"]);
    assert_eq!(String::from_utf8_lossy(&bpb.stdout).trim_end(), want);

    for prompt in ["The fox is", "2 + 3 ="] {
        let trained = stdout
            .lines()
            .find_map(|l| l.strip_prefix("sample | ").filter(|s| s.starts_with(prompt)))
            .unwrap_or_else(|| panic!("no sample of {prompt:?}: {stdout}"));
        let args = [
            "--checkpoint",
            run_dir,
            "--sample",
            prompt,
            "--temperature",
            "0",
            "--max-tokens",
            "24",
        ];
        let got = nc_eval_ok(&args);
        assert_eq!(String::from_utf8_lossy(&got.stdout).trim_end(), trained, "{prompt}");
    }
}
