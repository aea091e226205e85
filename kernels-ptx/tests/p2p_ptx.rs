//! Checks on the peer-to-peer ring's PTX (`nc_kernels::p2p`, outside `MODULES`), needing no toolkit: it was
//! generated from the current `cuda/p2p_ring.cu`, targets compute_80 with an ISA the driver takes, has exactly
//! the documented entries with their parameter lists, and the Rust constants equal the source's `#define`s.

mod support;

use nc_kernels::p2p;
use support::{define, entry_params, fnv1a64, source};

#[test]
fn p2p_ptx_was_generated_from_the_current_source() {
    let want = format!("// nc-source-fnv1a64: {:016x}", fnv1a64(&source("p2p_ring")));
    assert_eq!(
        p2p::PTX.lines().next().unwrap_or(""),
        want,
        "ptx/p2p_ring.ptx is stale: run kernels-ptx/build_ptx.sh and commit ptx/p2p_ring.ptx"
    );
    assert!(p2p::PTX.lines().any(|l| l.trim() == ".target sm_80"));
    assert!(p2p::PTX.lines().any(|l| l.trim() == ".version 9.0"));
}

#[test]
fn p2p_entries_have_the_documented_parameters_and_no_others_exist() {
    for (k, letters) in p2p::ALL {
        assert_eq!(k.ptx, p2p::PTX);
        let want: String = letters.chars().map(|c| if c == 'u' { 'p' } else { c }).collect();
        assert_eq!(
            entry_params(p2p::PTX, k.name).unwrap_or_else(|| panic!("no entry {}", k.name)),
            want,
            "{}",
            k.name
        );
    }
    let entries = p2p::PTX.lines().filter(|l| l.starts_with(".visible .entry ")).count();
    assert_eq!(entries, p2p::ALL.len(), "p2p_ring.ptx has entries that p2p::ALL lacks");
}

#[test]
fn p2p_constants_match_the_kernel_source() {
    let src = String::from_utf8(source("p2p_ring")).expect("p2p_ring.cu is UTF-8");
    let int = |name: &str| -> usize {
        define(&src, name)
            .parse()
            .unwrap_or_else(|_| panic!("{name} not an integer"))
    };
    assert_eq!(int("P2P_THREADS"), p2p::THREADS as usize);
    assert_eq!(int("P2P_MAX_BLOCKS"), p2p::MAX_BLOCKS as usize);
    assert_eq!(int("P2P_FLAG_STRIDE"), p2p::FLAG_STRIDE);
    assert_eq!(int("P2P_FLAGS_PER_BLOCK"), p2p::FLAGS_PER_BLOCK);
    assert_eq!(int("P2P_PART_ALIGN"), p2p::PART_ALIGN);
    assert_eq!(
        define(&src, "P2P_ERROR_WORD"),
        "(P2P_MAX_BLOCKS * P2P_FLAGS_PER_BLOCK * P2P_FLAG_STRIDE)"
    );
    assert_eq!(define(&src, "P2P_SIGNAL_U64S"), "(P2P_ERROR_WORD + P2P_FLAG_STRIDE)");
    assert_eq!(define(&src, "P2P_OP_RECV"), "(1ull << 48)");
    assert_eq!(p2p::OP_RECV, 1 << 48);
    // The flags' order in the source is the order of the Rust docs: SENT 0, CONSUMED 1, POSTED 2, DONE 3.
    for (i, flag) in ["P2P_SENT", "P2P_CONSUMED", "P2P_POSTED", "P2P_DONE"]
        .iter()
        .enumerate()
    {
        assert_eq!(int(flag), i, "{flag}");
    }
    // The flags are system-scope release/acquire, as the protocol needs.
    assert!(p2p::PTX.contains("st.release.sys.global.u64"));
    assert!(p2p::PTX.contains("ld.acquire.sys.global.u64"));
}
