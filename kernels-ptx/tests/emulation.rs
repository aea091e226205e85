//! Runs the kernels' CPU emulation check (`emu/run.sh`: the real `.cu` files compiled by g++ with one OS
//! thread per CUDA thread, checked against double-precision references and numerical derivatives, and the
//! optimizer's kernels bit for bit against float references in the CPU backend's order), so CI exercises
//! the kernels' arithmetic without a GPU. Skipped, with a note, where g++ is missing.

use std::process::Command;

#[test]
fn kernels_pass_their_cpu_emulation() {
    let gxx = Command::new("g++").arg("--version").output();
    if !matches!(gxx, Ok(ref o) if o.status.success()) {
        eprintln!("no g++: the kernels' CPU emulation check was not run");
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/emu/run.sh");
    let out = Command::new("bash").arg(script).output().expect("running bash");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "emu/run.sh failed:\n{text}");
    assert!(text.contains("\n0 failures"), "emu/run.sh reported failures:\n{text}");
    // every kernel family was checked
    for what in [
        "fill",
        "rmsnorm backward",
        "rotary backward",
        "ce grad",
        "embedding backward",
        "  dk",
        "axpby b = 0",
        "scale",
        "sum_squares n 5000  grid 3",
        "muon momentum update",
        "adamw p",
        // the tensor-core emulation's own checks (test_tc.cpp) and the flash kernels (test_flash.cpp)
        "mma m16n8k16 bf16, C ~ N(0,1) ",
        "ldmatrix x4.trans, arbitrary row addresses",
        "ldmatrix x2.trans of B row-major = mma B fragment",
        "cp.async: deferred to wait_group",
        "flash fwd B1 Tq70 Tk70 H2 Hkv1 D128",
        "flash fwd B2 Tq45 Tk45 H3 Hkv1 D64",
        "flash fwd B1 Tq1 Tk70 H4 Hkv2 D128 pos0 69",
        "flash fwd B1 Tq5 Tk133 H2 Hkv1 D64 pos0 128",
        "  flash lse",
        "  flash delta",
        "  flash dq",
        "  flash dk",
        "  flash dv",
    ] {
        assert!(text.contains(what), "emu/run.sh did not check '{what}':\n{text}");
    }
}
