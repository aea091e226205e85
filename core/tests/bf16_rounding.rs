//! `round_bf16` (the CPU twin's store rounding) agrees bit for bit with the emulation's stand-in for CUDA's
//! `__float2bfloat16_rn` (kernels-ptx/emu/shim/cuda_bf16.h), which is what the bf16 kernels are checked
//! against: on every bf16 pattern with the low half at the interesting points (zero, just below, at and just
//! above the midpoint, all ones) and on random floats. Needs g++ (as the emulation tests do).

use nc_core::backend::bf16::{bf16_bits, round_bf16};
use std::path::PathBuf;
use std::process::Command;

/// The inputs: each of the 2^16 high halves with five low halves, then random bit patterns.
fn inputs() -> Vec<u32> {
    let mut xs = Vec::new();
    for hi in 0u32..1 << 16 {
        for lo in [0x0000u32, 0x7fff, 0x8000, 0x8001, 0xffff] {
            xs.push(hi << 16 | lo);
        }
    }
    let mut u: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..200_000 {
        u ^= u << 13;
        u ^= u >> 7;
        u ^= u << 17;
        xs.push((u >> 32) as u32);
    }
    xs
}

const PROGRAM: &str = r#"
#include <cuda_bf16.h>
#include <cstdio>
#include <cstdint>
#include <cstring>
// Reads little-endian u32 float patterns from argv[1], writes the u16 bf16 patterns to argv[2].
int main(int argc, char** argv) {
    if (argc != 3) return 2;
    FILE* in = std::fopen(argv[1], "rb");
    FILE* out = std::fopen(argv[2], "wb");
    if (!in || !out) return 3;
    uint32_t u;
    while (std::fread(&u, 4, 1, in) == 1) {
        float f;
        std::memcpy(&f, &u, 4);
        uint16_t b = __float2bfloat16_rn(f).bits;
        if (std::fwrite(&b, 2, 1, out) != 1) return 4;
    }
    return std::fclose(out) == 0 ? 0 : 5;
}
"#;

#[test]
fn round_bf16_matches_the_emulation_shim() {
    let shim = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../kernels-ptx/emu/shim");
    let dir = tempfile::tempdir().unwrap();
    let (src, exe) = (dir.path().join("shim_round.cpp"), dir.path().join("shim_round"));
    std::fs::write(&src, PROGRAM).unwrap();
    let status = Command::new("g++")
        .args(["-std=c++20", "-O1", "-I"])
        .arg(&shim)
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .status()
        .expect("g++ must be installed (the emulation tests need it too)");
    assert!(status.success(), "compiling the shim program failed");

    let xs = inputs();
    let (inp, outp) = (dir.path().join("in.bin"), dir.path().join("out.bin"));
    std::fs::write(&inp, xs.iter().flat_map(|u| u.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    let status = Command::new(&exe).arg(&inp).arg(&outp).status().unwrap();
    assert!(status.success(), "the shim program failed");
    let got = std::fs::read(&outp).unwrap();
    assert_eq!(got.len(), xs.len() * 2);

    let mut nans = 0;
    for (i, &u) in xs.iter().enumerate() {
        let device = u16::from_le_bytes([got[2 * i], got[2 * i + 1]]);
        let x = f32::from_bits(u);
        assert_eq!(bf16_bits(x), device, "input {u:#010x}");
        assert_eq!(round_bf16(x).to_bits(), (device as u32) << 16, "input {u:#010x}");
        nans += x.is_nan() as usize;
    }
    // the sweep did reach the NaN patterns (each exponent-all-ones high half with a nonzero mantissa)
    assert!(nans > 1000, "{nans}");
}
