//! NC_CPU_ISA reaches the kernels: this test binary re-runs its own first test in child processes with the
//! variable set, and the child checks what the process selected. Costs two process starts (well under a
//! second).

use nc_core::backend::cpu::isa::{self, CpuIsa, ISA_ENV};
use std::process::Command;

/// In any process: the level the kernels use is what the environment asks for, or the CPU's own level when
/// the setting is wrong (which `from_env` then explains).
#[test]
fn selected_level_follows_the_environment() {
    match isa::from_env() {
        Ok(level) => assert_eq!(isa::selected(), level),
        Err(e) => {
            assert_eq!(isa::selected(), CpuIsa::detected(), "a bad {ISA_ENV} falls back: {e}");
            assert!(e.contains(ISA_ENV), "{e}");
        }
    }
    println!("selected level: {}", isa::selected().name());
}

/// Runs the test above in a child process with NC_CPU_ISA = `value`; returns (stdout, stderr).
fn child(value: &str) -> (String, String) {
    let exe = std::env::current_exe().expect("test binary path");
    let out = Command::new(exe)
        .args([
            "--exact",
            "selected_level_follows_the_environment",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(ISA_ENV, value)
        .output()
        .expect("re-run the test binary");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "child with {ISA_ENV}={value} failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("1 passed"), "the child ran no test:\n{stdout}");
    (stdout, stderr)
}

#[test]
fn forcing_a_narrower_level_takes_effect_and_a_bad_value_is_explained() {
    let detected = CpuIsa::detected();
    if detected >= CpuIsa::Avx2 {
        let (stdout, _) = child("avx2");
        assert!(stdout.contains("selected level: avx2"), "{stdout}");
    }
    let (stdout, _) = child("baseline");
    assert!(stdout.contains("selected level: baseline"), "{stdout}");
    let (stdout, stderr) = child("sse9");
    assert!(
        stdout.contains(&format!("selected level: {}", detected.name())),
        "{stdout}"
    );
    assert!(
        stderr.contains("NC_CPU_ISA=\"sse9\" is not a vector level") && stderr.contains("avx512, avx2 or baseline"),
        "the child did not explain the bad value:\n{stderr}"
    );
}
