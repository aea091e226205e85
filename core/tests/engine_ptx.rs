//! The CUDA backend's own kernels (core/src/backend/cuda/kernels/ns_norm.cu) carry, on line 1 of their checked-in
//! PTX, the FNV-1a 64 hash of the .cu they were generated from (as kernels-ptx's modules do): editing the .cu
//! without regenerating the PTX (build.sh next to it) fails here, and the simulated driver refuses the PTX.

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[test]
fn ns_norm_ptx_was_generated_from_the_current_source() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/backend/cuda/kernels");
    let cu = std::fs::read(format!("{dir}/ns_norm.cu")).expect("ns_norm.cu");
    let ptx = std::fs::read_to_string(format!("{dir}/ns_norm.ptx")).expect("ns_norm.ptx");
    let want = format!("// nc-source-fnv1a64: {:016x}", fnv1a64(&cu));
    assert_eq!(
        ptx.lines().next().unwrap_or(""),
        want,
        "ns_norm.ptx is stale: ns_norm.cu changed since it was generated; run core/src/backend/cuda/kernels/build.sh"
    );
}
