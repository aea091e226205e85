//! The GPU peer-to-peer ring end to end through `nc-p2p-bench --check-only` (two processes, sharing a GPU
//! where there is only one): bit-exact against host sums. Without a GPU the program must say it skipped and
//! exit 0, which is what runs in CI; with one (NC_REQUIRE_CUDA=1 to insist) every check must pass.

use std::process::Command;

#[test]
fn the_p2p_check_passes_on_a_gpu_or_says_why_it_skipped() {
    let out = Command::new(env!("CARGO_BIN_EXE_nc-p2p-bench"))
        .args(["--nproc", "2", "--check-only", "--timeout-s", "60"])
        .output()
        .expect("running nc-p2p-bench");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "nc-p2p-bench failed:\n{text}");
    if text.contains("nc-p2p-bench: skipped:") {
        assert!(
            std::env::var("NC_REQUIRE_CUDA").is_err(),
            "NC_REQUIRE_CUDA is set but the check skipped:\n{text}"
        );
        eprintln!("no GPU: {text}");
        return;
    }
    assert!(text.contains("check: 0 failures"), "{text}");
    assert!(text.contains("one-shot all-reduce bf16 n2 len 1000"), "{text}");
    assert!(!text.contains("FAIL"), "{text}");
}

#[test]
fn bad_flags_are_refused_with_a_reason() {
    for args in [
        &["--nproc", "0"][..],
        &["--max-bytes", "lots"],
        &["--min-bytes", "2G", "--max-bytes", "1G"],
        &["--frobnicate"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_nc-p2p-bench"))
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("nc-p2p-bench:") && err.len() > 30, "{args:?}: {err}");
    }
}
