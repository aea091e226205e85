//! The JAX reference's fixtures (tests/reference/fixtures/*.safetensors), as reference_parity.rs and
//! optim_parity.rs read them.

use safetensors::{Dtype, SafeTensors};
use std::path::PathBuf;

/// The bytes of fixture `name`.
pub fn fixture(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("reference/fixtures")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Tensor `name` of a fixture, which must be f32.
pub fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    words(st, name, Dtype::F32)
        .into_iter()
        .map(f32::from_le_bytes)
        .collect()
}

/// Tensor `name` of a fixture, which must be i32.
pub fn i32s(st: &SafeTensors, name: &str) -> Vec<i32> {
    words(st, name, Dtype::I32)
        .into_iter()
        .map(i32::from_le_bytes)
        .collect()
}

/// Tensor `name`'s elements as little-endian 4-byte words, after checking that it is of `dtype`.
fn words(st: &SafeTensors, name: &str, dtype: Dtype) -> Vec<[u8; 4]> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.dtype(), dtype, "{name}");
    t.data().chunks_exact(4).map(|b| [b[0], b[1], b[2], b[3]]).collect()
}
