//! nc-tests: end-to-end tests live in tests/; this library holds the helpers several of them share.

use nc_core::backend::{Backend, View, ViewMut};

pub mod harness;

/// A backend buffer holding `host`.
pub fn to_backend<B: Backend>(be: &B, host: &[f32]) -> B::Buf {
    let mut buf = be.alloc(host.len());
    be.upload(ViewMut::all(&mut buf), host);
    buf
}

/// A backend buffer's values on the host.
pub fn to_host<B: Backend>(be: &B, buf: &B::Buf) -> Vec<f32> {
    let mut out = vec![0.0f32; B::buf_len(buf)];
    be.download(View::all(buf), &mut out);
    out
}

/// max |got - want| / max |want - before|: an optimizer's error relative to the size of the change it made
/// (from `before` to `want`). Infinite when `got` holds a non-finite value: `f64::max` drops a NaN, so a
/// NaN result would otherwise read as no error at all.
pub fn change_error(got: &[f32], want: &[f32], before: &[f32]) -> f64 {
    if got.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let err = got
        .iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .fold(0.0, f64::max);
    let change = want
        .iter()
        .zip(before)
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .fold(0.0, f64::max);
    assert!(change > 0.0, "the steps must move the parameters");
    err / change
}
