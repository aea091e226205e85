//! Runs a CUDA test on the simulated GPU (issue 19; docs/simulated-gpu.md) where this machine has no real one.
//!
//! The simulated device is a stand-in `libcuda.so.1` (and cuBLAS/cuBLASLt) that `scripts/sim.sh --build`
//! compiles into `target/sim/`. The dynamic loader reads `LD_LIBRARY_PATH` only when a process starts, so a
//! test that finds no device cannot switch to the simulator itself: `run_this_test_simulated` re-runs the
//! calling test (this same test binary, `--exact NAME`) as a child with `LD_LIBRARY_PATH=target/sim`,
//! `NC_REQUIRE_CUDA=1` (a child that finds no device fails instead of skipping) and the allocator's no-caching
//! mode (`NC_NO_ALLOC_CACHE=1`, so the simulator's memory checks see every tensor's bounds), and fails the
//! test unless the child ran exactly that test and it passed. The child takes the real-GPU path: nothing in
//! the engine or in the test body knows it is simulated.
//!
//! std only: alloc/tests/cuda_smoke.rs includes this file with `#[path]` (nc-alloc cannot depend on
//! nc-tests, which depends on it).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Set in the child, so a child that finds no device does not start another one.
pub const CHILD_ENV: &str = "NC_SIM_TEST_CHILD";
/// Set to 0 to skip the simulated runs (e.g. to run a CUDA test file's CPU-only tests quickly).
pub const SWITCH_ENV: &str = "NC_TEST_SIM";

/// What happened to a test that found no CUDA device in its own process.
#[derive(Debug)]
pub enum Simulated {
    /// The child ran the test on the simulated GPU and it passed (a failure panics instead).
    Passed,
    /// No simulated GPU here, and why (no g++, the simulator's sources are not in this checkout, this is
    /// already the child, or NC_TEST_SIM=0).
    Unavailable(String),
}

/// The repository root: every crate that uses this file sits one folder below it.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("a crate folder has a parent")
        .to_path_buf()
}

/// Whether the simulated libraries are there to use.
#[derive(Debug, Clone)]
enum Libraries {
    Built(PathBuf),
    Missing(String),
    BuildFailed(String),
}

/// The folder of the simulated libraries (`target/sim`), built once per process (`scripts/sim.sh --build`
/// rebuilds only what is stale), holding libcuda.so.1 and each of `also_needs`; or why there is none. A build
/// that fails where g++ exists is a test failure, not a skip: CI has g++, and a broken simulator must not
/// quietly turn every CUDA test into a skip. NC_TEST_SIM=0 turns the simulator off.
pub fn simulator_libraries(also_needs: &[&str]) -> Result<PathBuf, String> {
    if std::env::var(SWITCH_ENV).as_deref() == Ok("0") {
        return Err(format!("{SWITCH_ENV}=0"));
    }
    let libs = built_libraries()?;
    match also_needs.iter().find(|lib| !libs.join(lib).exists()) {
        Some(missing) => Err(format!(
            "the simulated GPU has no {missing} yet (scripts/sim.sh did not build one)"
        )),
        None => Ok(libs),
    }
}

fn built_libraries() -> Result<PathBuf, String> {
    static BUILT: OnceLock<Libraries> = OnceLock::new();
    let libs = BUILT.get_or_init(|| {
        let root = repo_root();
        let script = root.join("scripts/sim.sh");
        if !script.exists() || !root.join("sim/driver").is_dir() {
            return Libraries::Missing(
                "the simulated driver (sim/driver, scripts/sim.sh) is not in this checkout".into(),
            );
        }
        if Command::new("g++").arg("--version").output().is_err() {
            return Libraries::Missing("g++ is not installed, so the simulated GPU cannot be built".into());
        }
        let out = match Command::new("bash")
            .arg(&script)
            .arg("--build")
            .current_dir(&root)
            .output()
        {
            Ok(out) => out,
            Err(e) => return Libraries::BuildFailed(format!("running {}: {e}", script.display())),
        };
        let libs = root.join("target/sim");
        if out.status.success() && libs.join("libcuda.so.1").exists() {
            Libraries::Built(libs)
        } else {
            Libraries::BuildFailed(format!(
                "scripts/sim.sh --build failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    });
    match libs {
        Libraries::Built(path) => Ok(path.clone()),
        Libraries::Missing(why) => Err(why.clone()),
        Libraries::BuildFailed(why) => panic!("the CUDA tests cannot run on the simulated GPU: {why}"),
    }
}

/// The name libtest gave the calling test: its thread's name (libtest runs each test on a thread named
/// after it, also with one test thread).
fn this_test_name() -> String {
    let thread = std::thread::current();
    match thread.name() {
        Some(name) if name != "main" => name.to_string(),
        _ => panic!("run_this_test_simulated must be called from a #[test] function (libtest's test thread)"),
    }
}

/// What a test of the CUDA backend needs beside the driver, under target/sim: cuBLAS and cuBLASLt (opened at
/// start), and the emulation of the engine's own kernel module ns_norm (core/src/backend/cuda/kernels/, loaded
/// at start; scripts/sim.sh generates one gen/kernels_MODULE.cpp per module it emulates). Until all are built
/// the backend tests skip with a line saying which is missing, rather than fail on a half-built simulator.
pub const BLAS_LIBRARIES: [&str; 3] = ["libcublas.so.13", "libcublasLt.so.13", "gen/kernels_ns_norm.cpp"];

/// Re-run the calling test on the simulated GPU in a child process (see the module comment). Call it where
/// the test found no CUDA device; `also_needs` names the stand-in libraries it needs beside libcuda.so.1
/// (`BLAS_LIBRARIES` for the CUDA backend; a driver without them is "unavailable", not a failure, while the
/// stand-ins land one by one). Panics, with the child's output, when the child's test failed or did not
/// run; prints the child's output when it passed.
pub fn run_this_test_simulated(also_needs: &[&str]) -> Simulated {
    run_this_test_simulated_with(also_needs, &[])
}

/// `run_this_test_simulated` with more environment for the child, e.g. `NC_SIM_TRACE=FILE` for a test that
/// reads the simulated driver's trace of its run once the child has exited (the trace is complete then).
pub fn run_this_test_simulated_with(also_needs: &[&str], env: &[(&str, &str)]) -> Simulated {
    if std::env::var_os(CHILD_ENV).is_some() {
        return Simulated::Unavailable(format!(
            "this is the simulated run ({CHILD_ENV} is set) and the simulated driver did not show a device"
        ));
    }
    let libs = match simulator_libraries(also_needs) {
        Ok(libs) => libs,
        Err(why) => return Simulated::Unavailable(why),
    };
    let test = this_test_name();
    let exe = std::env::current_exe().expect("the test binary's path");
    let library_path = match std::env::var_os("LD_LIBRARY_PATH") {
        Some(old) if !old.is_empty() => format!("{}:{}", libs.display(), old.to_string_lossy()),
        _ => libs.display().to_string(),
    };
    let out = Command::new(&exe)
        .args([&test, "--exact", "--nocapture", "--test-threads=1"])
        .env("LD_LIBRARY_PATH", library_path)
        .env("NC_REQUIRE_CUDA", "1")
        .env("NC_NO_ALLOC_CACHE", "1")
        .env(CHILD_ENV, "1")
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("starting {} for the simulated run: {e}", exe.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // libtest prints "test NAME ... ok" and "1 passed" when the one test ran and passed; a filter that
    // matched nothing would also exit 0, with "0 passed".
    let ran = text.contains(&format!("test {test} ... ok")) && text.contains("test result: ok. 1 passed");
    if !out.status.success() || !ran {
        panic!(
            "{test} failed on the simulated GPU ({}; rerun: LD_LIBRARY_PATH={} NC_REQUIRE_CUDA=1 \
             NC_NO_ALLOC_CACHE=1 {} {test} --exact --nocapture):\n{text}",
            out.status,
            libs.display(),
            exe.display()
        );
    }
    eprintln!("{test}: ran on the simulated GPU (a child process) and passed:\n{text}");
    Simulated::Passed
}
