//! Checks on the peer-to-peer ring's PTX (`nc_kernels::p2p`, outside `MODULES`), needing no toolkit: it was
//! generated from the current `cuda/p2p_ring.cu`, targets compute_80 with an ISA the driver takes, has exactly
//! the documented entries with their parameter lists, and the Rust constants equal the source's `#define`s.

use nc_kernels::p2p;

fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn source() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/cuda/p2p_ring.cu");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

#[test]
fn p2p_ptx_was_generated_from_the_current_source() {
    let want = format!("// nc-source-fnv1a64: {:016x}", fnv1a64(source().as_bytes()));
    assert_eq!(
        p2p::PTX.lines().next().unwrap_or(""),
        want,
        "ptx/p2p_ring.ptx is stale: run kernels-ptx/build_ptx.sh and commit ptx/p2p_ring.ptx"
    );
    assert!(p2p::PTX.lines().any(|l| l.trim() == ".target sm_80"));
    assert!(p2p::PTX.lines().any(|l| l.trim() == ".version 9.0"));
}

/// Parameter letters of `.visible .entry name(` in the PTX: p for .u64 (pointer or u64), i for .u32/.s32.
fn entry_params(name: &str) -> Option<String> {
    let head = format!(".visible .entry {name}(");
    let start = p2p::PTX.find(&head)? + head.len();
    let body = &p2p::PTX[start..start + p2p::PTX[start..].find(')')?];
    Some(
        body.lines()
            .map(str::trim)
            .filter(|l| l.starts_with(".param"))
            .map(|l| match l.split_whitespace().nth(1) {
                Some(".u64") => 'p',
                Some(".u32") | Some(".s32") => 'i',
                other => panic!("{name}: unexpected parameter type {other:?} in `{l}`"),
            })
            .collect(),
    )
}

#[test]
fn p2p_entries_have_the_documented_parameters_and_no_others_exist() {
    for (k, letters) in p2p::ALL {
        assert_eq!(k.ptx, p2p::PTX);
        let want: String = letters.chars().map(|c| if c == 'u' { 'p' } else { c }).collect();
        assert_eq!(
            entry_params(k.name).unwrap_or_else(|| panic!("no entry {}", k.name)),
            want,
            "{}",
            k.name
        );
    }
    let entries = p2p::PTX.lines().filter(|l| l.starts_with(".visible .entry ")).count();
    assert_eq!(entries, p2p::ALL.len(), "p2p_ring.ptx has entries that p2p::ALL lacks");
}

fn define(src: &str, name: &str) -> String {
    let head = format!("#define {name} ");
    let line = src
        .lines()
        .find(|l| l.starts_with(&head))
        .unwrap_or_else(|| panic!("p2p_ring.cu has no `{head}...`"));
    line[head.len()..].trim().to_string()
}

#[test]
fn p2p_constants_match_the_kernel_source() {
    let src = source();
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
