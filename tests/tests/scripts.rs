//! The shell scripts parse (`bash -n`), and what can be checked of them without a GPU is: gpu_check.sh's default
//! run fits its 480 s share of a 15-minute lease and rejects an unknown step before running anything;
//! profile.sh builds the nsys commands around `nc-train --profile-steps` and turns `nsys stats`' kernel table
//! into its top-N list (with a stand-in nsys); and gpu_check.sh's default `run`, end to end, on the simulated
//! GPU (docs/simulated-gpu.md), over the binaries this cargo build made.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn run(cmd: &mut Command) -> Output {
    cmd.current_dir(root()).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn every_script_parses() {
    let mut checked = 0;
    for entry in std::fs::read_dir(root().join("scripts")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "sh") {
            let out = run(Command::new("bash").arg("-n").arg(&path));
            assert!(out.status.success(), "{}: {}", path.display(), text(&out.stderr));
            checked += 1;
        }
    }
    assert!(checked >= 3, "found only {checked} scripts");
}

#[test]
fn gpu_check_default_run_fits_its_share_of_a_lease() {
    let out = run(Command::new("bash").args(["scripts/gpu_check.sh", "plan"]));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let mut steps = Vec::new();
    let mut sum = 0u64;
    let mut total = None;
    for line in stdout.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["default", step, secs] => {
                let secs: u64 = secs.parse().unwrap();
                assert!(secs > 0, "{line}");
                steps.push(step.to_string());
                sum += secs;
            }
            ["default-total", t, "of", budget] => total = Some((t.parse::<u64>().unwrap(), budget.to_string())),
            _ => {}
        }
    }
    // the issue's default run: the most valuable ~8 minutes
    assert_eq!(steps, ["info", "alloc", "parity", "train", "bench"], "{stdout}");
    assert!(
        sum <= 480,
        "the default steps' limits sum to {sum} s, more than 480:\n{stdout}"
    );
    assert_eq!(total, Some((sum, "480".to_string())), "{stdout}");
}

#[test]
fn gpu_check_refuses_an_unknown_step_before_running_anything() {
    let out_dir = tempfile::tempdir().unwrap();
    let out = run(Command::new("bash")
        .args(["scripts/gpu_check.sh", "run", "info", "no-such-step"])
        .env("OUT", out_dir.path()));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("unknown step 'no-such-step'"));
    // `info` (listed first) did not run
    let log = std::fs::read_to_string(out_dir.path().join("gpu_check.log")).unwrap_or_default();
    assert!(!log.contains("== info"), "{log}");
}

#[test]
fn profile_dry_run_prints_the_nsys_commands() {
    let out = run(Command::new("bash").args([
        "scripts/profile.sh",
        "--dry-run",
        "--steps",
        "3:4",
        "--",
        "--backend",
        "cuda",
        "--depth",
        "4",
    ]));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let profile = stdout.lines().find(|l| l.contains(" profile ")).expect(&stdout);
    for part in [
        "--capture-range=cudaProfilerApi",
        "nc-train --profile-steps 3:4 --out-dir profile/train --backend cuda --depth 4",
    ] {
        assert!(profile.contains(part), "{part} missing: {profile}");
    }
    assert!(stdout.contains("stats --report cuda_gpu_kern_sum"), "{stdout}");
    assert!(stdout.contains("stats --report nvtx_sum"), "{stdout}");
    // a backwards range is refused
    let bad = run(Command::new("bash").args(["scripts/profile.sh", "--dry-run", "--steps", "4:3", "--", "x"]));
    assert_eq!(bad.status.code(), Some(2));
    assert!(text(&bad.stderr).contains("A <= B"));
}

#[test]
fn profile_lists_the_top_kernels_from_nsys_stats() {
    let dir = tempfile::tempdir().unwrap();
    // a stand-in nsys: `profile` does nothing, `stats` prints a kernel table as nsys 2024+ does (notes first)
    let nsys = dir.path().join("nsys");
    std::fs::write(
        &nsys,
        r#"#!/usr/bin/env bash
[ "$1" = profile ] && exit 0
case "$*" in
  *cuda_gpu_kern_sum*) cat <<'CSV'
Processing [report.sqlite] with [cuda_gpu_kern_sum.py]...

"Time (%)","Total Time (ns)","Instances","Avg (ns)","Med (ns)","Min (ns)","Max (ns)","StdDev (ns)","Name"
"61.5","1234567","40","30864.2","30000","29000","40000","100.0","gemm_bf16_big"
"20.1","400000","10","40000.0","40000","39000","41000","10.0","flash_fwd"
"5.0","100000","100","1000.0","1000","900","1100","1.0","rmsnorm_fwd"
CSV
  ;;
  *) echo "nvtx table" ;;
esac
"#,
    )
    .unwrap();
    let chmod = Command::new("chmod").arg("+x").arg(&nsys).status().unwrap();
    assert!(chmod.success());
    let out = run(Command::new("bash")
        .args(["scripts/profile.sh", "--top", "2", "--out"])
        .arg(dir.path().join("prof"))
        .args(["--", "--backend", "cuda"])
        .env("NSYS", &nsys)
        .env("NC_TRAIN", "/bin/true"));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let rows: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.contains("avg us"))
        .skip(1)
        .take_while(|l| !l.starts_with('('))
        .collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    let first: Vec<&str> = rows[0].split_whitespace().collect();
    assert_eq!(first, ["61.5", "1.235", "40", "30.9", "gemm_bf16_big"], "{stdout}");
    assert!(rows[1].ends_with("flash_fwd"), "{stdout}");
    assert!(stdout.contains("(3 kernels in all)"), "{stdout}");
}

/// The binaries each default step of gpu_check.sh runs (what its `build` copies into gpu-check/).
const GPU_CHECK_STEP_BINARIES: [(&str, &[&str]); 5] = [
    ("info", &[]),
    ("alloc", &["cuda_smoke"]),
    ("parity", &["cuda_parity", "cuda_bf16_parity"]),
    ("train", &["nc-train"]),
    ("bench", &["step_cuda"]),
];

/// Where cargo put `name` in this build: nc-train beside the profile's other binaries (target/release), a test
/// or bench executable as deps/NAME-HASH (the newest, when several feature sets left several).
fn built_by_cargo(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?; // target/release/deps/scripts-HASH
    let deps = exe.parent()?;
    if name == "nc-train" {
        return Some(deps.parent()?.join(name)).filter(|p| p.is_file());
    }
    let is_build = |file: &str| {
        file.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('-'))
            .is_some_and(|hash| hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()))
    };
    std::fs::read_dir(deps)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str().is_some_and(is_build))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .max()
        .map(|(_, path)| path)
}

/// Whether `binary` (the bench, which embeds the kernels' PTX) is older than a file of kernels-ptx/ptx/: it may
/// then embed PTX whose source stamp the simulated driver refuses (`cargo test` rebuilds tests but not
/// benches, so a bench left from before a kernel change is stale).
fn built_before_the_ptx(binary: &Path) -> bool {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let Some(built) = modified(binary) else { return false };
    std::fs::read_dir(root().join("kernels-ptx/ptx"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| modified(&e.path()))
        .any(|ptx| ptx > built)
}

/// A GPU_CHECK_BIN_DIR of links to the binaries this cargo build made (the script's `build` step would run
/// cargo inside cargo test, whose other package selection resolves other features and rebuilds the workspace:
/// ~10 minutes here). Returns the default steps whose binaries are all there and current, and a line per missing
/// or stale one.
fn link_gpu_check_binaries(dir: &Path) -> (Vec<&'static str>, Vec<String>) {
    let mut steps = Vec::new();
    let mut missing = Vec::new();
    for (step, names) in GPU_CHECK_STEP_BINARIES {
        let mut all = true;
        for name in names {
            match built_by_cargo(name) {
                // cargo test rebuilds the test binaries and nc-train, not the bench
                Some(path) if step == "bench" && built_before_the_ptx(&path) => {
                    missing.push(format!(
                        "{step} needs {name}, built before the PTX it embeds changed (rebuild it: cargo build \
                         --release --workspace --all-targets; cargo test does not rebuild benches)"
                    ));
                    all = false;
                }
                Some(path) => std::os::unix::fs::symlink(&path, dir.join(name)).unwrap(),
                None => {
                    missing.push(format!("{step} needs {name}, which this build has not made"));
                    all = false;
                }
            }
        }
        if all {
            steps.push(step);
        }
    }
    (steps, missing)
}

/// `scripts/sim.sh scripts/gpu_check.sh run` (the default steps: info alloc parity train bench) on the simulated
/// GPU, as on a GPU machine but with models sized for the emulator, over the binaries this cargo build made
/// (`link_gpu_check_binaries`; the script's own `build` is not run here): every step passes, the script says it
/// ran on the simulated device, and every line a step printed is marked as not a GPU figure. Without the
/// simulator (no g++) it says why and passes. A step whose binary this build did not make (step_cuda is a
/// bench: `cargo build --release --workspace --all-targets`, as .ci/run does first) is left out, saying so.
/// Costs about 30 CPU-s (the parity tests and two short training runs on the emulator).
#[test]
fn gpu_check_runs_its_default_steps_on_the_simulated_gpu() {
    if let Err(why) = nc_tests::sim::simulator_libraries(&nc_tests::sim::BLAS_LIBRARIES) {
        eprintln!("no simulated GPU: {why}; gpu_check's end-to-end run not tested");
        return;
    }
    let bins = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let (steps, missing) = link_gpu_check_binaries(bins.path());
    let mut cmd = Command::new("bash");
    cmd.args(["scripts/sim.sh", "bash", "scripts/gpu_check.sh", "run"]);
    if !missing.is_empty() {
        eprintln!("gpu_check's run leaves steps out: {}", missing.join("; "));
        cmd.args(&steps);
    }
    let out = run(cmd
        .env("GPU_CHECK_BIN_DIR", bins.path())
        .env("OUT", out_dir.path())
        .env_remove("NC_SIM_TRACE"));
    let log = std::fs::read_to_string(out_dir.path().join("gpu_check.log")).unwrap_or_default();
    let all = format!("{}{}\nlog:\n{log}", text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "gpu_check run on the simulated GPU failed:\n{all}"
    );
    assert!(log.starts_with("gpu_check: on the simulated GPU"), "{all}");
    assert!(
        log.contains("all steps passed on the simulated GPU, not on a GPU"),
        "{all}"
    );
    let parts: &[(&str, &[&str])] = &[
        ("info", &["info"]),
        ("alloc", &["alloc"]),
        ("train", &["train-twin", "train-cuda-bf16", "train-compare"]),
        ("bench", &["bench-d20-bf16"]),
    ];
    for (step, names) in parts {
        if !steps.contains(step) {
            continue;
        }
        for part in names.iter() {
            assert!(
                log.contains(&format!("== {part}: exit 0 after")),
                "{part} did not pass:\n{all}"
            );
        }
    }
    if steps.contains(&"parity") {
        assert!(log.contains("== parity:") && log.contains("== parity-bf16:"), "{all}");
    }
    assert!(!log.contains(": exit 1") && !log.contains("skipped"), "{all}");
    // Between a part's "== NAME (limit" and "== NAME: exit" lines, everything it printed carries the mark.
    let mut inside = false;
    let mut marked = 0;
    for line in log.lines() {
        if line.starts_with("== ") {
            inside = line.contains(" (limit ");
            continue;
        }
        if inside {
            assert!(
                line.starts_with("[simulated GPU: not a GPU figure] "),
                "an unmarked line: {line}\n{all}"
            );
            marked += 1;
        }
    }
    assert!(
        log.contains("[simulated GPU: not a GPU figure] ") && marked > 20,
        "{all}"
    );
    // The benchmark's figures are there, marked (it ran, and its MFU line is the emulator's).
    if steps.contains(&"bench") {
        assert!(
            log.lines()
                .any(|l| l.starts_with("[simulated GPU: not a GPU figure] ") && l.contains("MFU bf16")),
            "{all}"
        );
    }
}
