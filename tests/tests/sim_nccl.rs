//! The simulated NCCL (sim/nccl/, issue 20), built with g++ as scripts/sim.sh builds it and run on the fake
//! of the simulated driver's ncsim_* functions (sim/blas/tests/fake_ncsim.cpp, built as libcuda.so.1): its own
//! check program, sim/nccl/tests/nccl_check.cpp, forks three ranks that run every collective in f32 and bf16,
//! out of place and in place, over several steps of a small slot, and compare each result bit for bit with a
//! reference computed there (f32 sums in rank order, bf16 rounded at every hop); groups; refusals; ranks whose
//! calls differ (ncclInvalidUsage, released by ncclCommAbort); a peer that exits (ncclRemoteError naming it).
//! nc-train over the stand-in is bin/tests/sim_multi_nccl.rs.
//!
//! Cost: three g++ compiles (a few seconds of CPU, in parallel) and about two seconds of checks, mostly the
//! dead peer's wait.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Compiles the fake driver, the stand-in and the check program into a folder of the target directory; None
/// when there is no g++.
fn built() -> Option<PathBuf> {
    if Command::new("g++").arg("--version").output().is_err() {
        eprintln!("no g++: the simulated NCCL checks were not run");
        return None;
    }
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sim_nccl");
    std::fs::create_dir_all(&out).unwrap();
    let sim = repo().join("sim");
    let include = format!("-I{}", sim.join("include").display());
    let mut driver = Command::new("g++");
    driver
        .args(["-std=c++20", "-O2", "-shared", "-fPIC", &include])
        .arg(sim.join("blas/tests/fake_ncsim.cpp"))
        .args(["-Wl,-soname,libcuda.so.1", "-o"])
        .arg(out.join("libcuda.so.1"));
    // the flags scripts/sim.sh builds the stand-in with
    let mut nccl = Command::new("g++");
    nccl.args([
        "-std=c++20",
        "-O2",
        "-shared",
        "-fPIC",
        "-pthread",
        "-ffp-contract=off",
        "-fvisibility=hidden",
        "-Wall",
        &include,
    ]);
    let mut sources: Vec<PathBuf> = std::fs::read_dir(sim.join("nccl"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "cpp"))
        .collect();
    sources.sort();
    nccl.args(&sources)
        .args(["-Wl,-soname,libnccl.so.2", "-ldl", "-lrt", "-o"])
        .arg(out.join("libnccl.so.2"));
    let children: Vec<_> = [&mut driver, &mut nccl]
        .into_iter()
        .map(|c| (format!("{c:?}"), c.spawn().unwrap()))
        .collect();
    for (what, child) in children {
        assert!(child.wait_with_output().unwrap().status.success(), "{what} failed");
    }
    let status = Command::new("g++")
        .args(["-std=c++20", "-O2", "-Wall", "-pthread", "-ffp-contract=off"])
        .arg(sim.join("nccl/tests/nccl_check.cpp"))
        .arg(format!("-L{}", out.display()))
        .args(["-l:libcuda.so.1", "-l:libnccl.so.2"])
        .arg(format!("-Wl,-rpath,{}", out.display()))
        .arg("-o")
        .arg(out.join("nccl_check"))
        .status()
        .unwrap();
    assert!(status.success(), "compiling nccl_check failed");
    Some(out)
}

#[test]
fn the_simulated_nccl_matches_its_references_and_reports_failures() {
    let Some(dir) = built() else { return };
    let output = Command::new(dir.join("nccl_check")).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "nccl_check failed:\n{stdout}\n{stderr}");
    // every rank ran every check (none skipped by an early exit)
    for rank in 0..3 {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("rank {rank}: ")))
            .unwrap_or_else(|| panic!("no summary of rank {rank}:\n{stdout}"));
        let checks: usize = line.split(' ').nth(2).unwrap().parse().unwrap();
        assert!(checks >= 80 && line.contains(" 0 failed"), "{line}");
    }
    assert!(stdout.ends_with("3 ranks, 0 failed\n"), "{stdout}");
}
