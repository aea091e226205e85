//! Runs the kernels' CPU emulation check (`emu/run.sh`: the real `.cu` files compiled by g++ against emu.h,
//! each CUDA thread a fiber, checked against double-precision references and numerical derivatives, and the
//! optimizer's kernels bit for bit against float references in the CPU backend's order, every program in race
//! mode: a shared-memory race or an early cp.async read fails it), so CI exercises the kernels' arithmetic and
//! barrier placement without a GPU. Skipped, with a note, where g++ is missing.

use std::process::Command;
#[path = "support/emu_run.rs"]
mod emu_run;
use emu_run::{gxx_present, output_text};

#[test]
fn kernels_pass_their_cpu_emulation() {
    if !gxx_present("the kernels' CPU emulation check") {
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/emu/run.sh");
    let out = Command::new("bash").arg(script).output().expect("running bash");
    let text = output_text(&out);
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
        // emu/test_bf16.cpp
        "rmsnorm bf16 forward y f32 dim 1280",
        "rmsnorm bf16 forward y bf16 dim 13",
        "rmsnorm bf16 backward dy bf16 dx bf16 accumulate",
        "rotary+qknorm in bf16 B2 T5 H3 D128 pos0 4 y",
        "rotary+qknorm in bf16 B1 T5 H2 D6 pos0 1 y",
        "qknorm alone in bf16",
        "backward dy bf16 dx f32",
        "rotary+qknorm backward vs central differences",
        "relu2 forward f32 -> bf16 n 1003 unaligned",
        "relu2 backward u bf16 dh f32 n 4096",
        "relu2 backward in place",
        "cast f32 -> bf16 n 1003",
        "cast bf16 -> f32 n 4096 unaligned",
        "embedding forward bf16 -> f32",
        "embedding backward sorted f32 d 300 block 64 x 3 = CPU order",
        "embedding backward sorted bf16 d 64 block 32 x 1 = CPU order",
        "same bits as the first launch shape",
        "embedding backward data is order-sensitive",
        "adamw multi p tensor 3 n 777 unaligned",
        "adamw multi p_bf16",
        "adamw multi: descriptors past count untouched",
        "ns sum of squares batch 2 n 5000",
        "ns normalize -> bf16 batch 3 n 91 parts 4 unaligned",
        "ns normalized matrix 0 has norm 1",
        "ns muon apply p (strided)",
        "ns muon apply without a copy",
        // the launch machinery (emu/test_launch.cpp)
        "3-D grid and block: each thread once, indices and dims     ok",
        "launch_params: pointers, u64, f64, struct by value, u8     ok",
        "threads returning early leave the barriers                 ok",
        "3 OS threads launching at once, 20 launches each           ok",
        "access check: every global access, no other                ok",
        "access check sees the planted read past the end            ok",
        "access check on flash forward (cp.async reads)             ok",
        // the race checker's planted bugs (emu/test_race.cpp), each reported
        "planted: reverse without __syncthreads                     ok",
        "planted: overwrite before the others read                  ok",
        "planted: read of unwritten shared memory                   ok",
        "planted: cp.async tile read before the wait                ok",
        "cp.async read before the wait gives stale data             ok",
        "planted: cross entropy without block_max's first barrier   ok",
        "planted: rmsnorm forward without block_sum's first barrier ok",
        "planted: f32 attention forward without its first __syncwarp ok",
        "planted: flash forward without the barrier after Q/K land  ok",
        "planted: flash forward reading Q/K before their wait       ok",
    ] {
        assert!(text.contains(what), "emu/run.sh did not check '{what}':\n{text}");
    }
    // race mode (emu_race.h) on, with the shared-memory accesses instrumented, in each of the five programs
    // that check kernels or launches, and no race reported
    let race_clean = "race check                                                 ok   0 reports (race mode on, shared \
                      accesses instrumented)";
    assert_eq!(
        text.matches(race_clean).count(),
        5,
        "emu/run.sh: not every program ran race-clean:\n{text}"
    );
}
