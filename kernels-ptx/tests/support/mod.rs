//! What the PTX checks (`ptx_is_current.rs`, `p2p_ptx.rs`) share: the source stamp's hash and bytes, and an
//! entry's parameter list as letters.

use nc_kernels::AdamwTable;

/// FNV-1a 64 of the bytes, the hash build_ptx.sh stamps.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn read(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// What the stamp hashes: the module's `.cu` followed by each header it includes as `#include "NAME"`
/// (`cuda/NAME`, in the order of the lines), as build_ptx.sh and scripts/sim.sh hash it, so that a changed
/// shared header (block_reduce.cuh) makes the PTX of every module including it stale.
pub fn source(module: &str) -> Vec<u8> {
    let dir = format!("{}/cuda", env!("CARGO_MANIFEST_DIR"));
    let cu = read(&format!("{dir}/{module}.cu"));
    let mut bytes = cu.clone();
    for line in String::from_utf8_lossy(&cu).lines() {
        if let Some(name) = line.strip_prefix("#include \"").and_then(|rest| rest.split('"').next()) {
            bytes.extend(read(&format!("{dir}/{name}")));
        }
    }
    bytes
}

/// The parameter types of entry `name` in `ptx`, as signature letters (p and u both read as p: PTX does
/// not tell a pointer from a u64, so u is mapped to p before comparing).
pub fn entry_params(ptx: &str, name: &str) -> Option<String> {
    let head = format!(".visible .entry {name}(");
    let start = ptx.find(&head)? + head.len();
    let body = &ptx[start..start + ptx[start..].find(')')?];
    Some(
        body.lines()
            .map(str::trim)
            .filter(|l| l.starts_with(".param"))
            .map(|l| match l.split_whitespace().nth(1) {
                Some(".u64") => 'p',
                Some(".u32") | Some(".s32") => 'i',
                Some(".f32") => 'f',
                Some(".align") => {
                    let want = format!("[{}]", std::mem::size_of::<AdamwTable>());
                    assert!(
                        l.contains(".align 8 .b8") && l.trim_end_matches(',').ends_with(&want),
                        "{name}: a by-value parameter other than the 8-aligned {want} AdamwTable: `{l}`"
                    );
                    't'
                }
                other => panic!("{name}: unexpected parameter type {other:?} in `{l}`"),
            })
            .collect(),
    )
}

/// The text after `#define NAME ` in `src` (the `.cu` and its headers, as `source` gives them), trimmed.
pub fn define<'a>(src: &'a str, name: &str) -> &'a str {
    let head = format!("#define {name} ");
    let line = src
        .lines()
        .find(|l| l.starts_with(&head))
        .unwrap_or_else(|| panic!("the source has no `{head}...`"));
    line[head.len()..].trim()
}
