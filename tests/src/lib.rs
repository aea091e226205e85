//! nc-tests: end-to-end tests live in tests/; this library holds the helpers several of them share.

pub mod fixtures;
pub mod harness;
pub mod sim;

use nc_core::backend::cuda::{self, CudaBackend};
use nc_core::backend::{Backend, NsBatch, View, ViewMut};
use nc_core::optim::ns_bf16_buffers::NsBf16Buffers;

/// The CUDA backend on device 0 for a CUDA test of `suite` (its file's name, for the skip line), or None
/// when the test must return at once. Where this process sees a device (a real GPU, or the simulated one in
/// the child that `sim::run_this_test_simulated` starts) the test runs here. Without one, the test is run on
/// the simulated GPU in a child process and has passed there when this returns None (a failure panics). With
/// no simulated GPU either it is skipped with one line saying why, or fails under NC_REQUIRE_CUDA=1.
pub fn cuda_backend_or_simulated(suite: &str) -> Option<CudaBackend> {
    match cuda_backend_or_simulated_with(suite, &[]) {
        CudaRun::Here(be) => Some(be),
        CudaRun::Simulated | CudaRun::Skipped => None,
    }
}

/// Where a CUDA test runs (`cuda_backend_or_simulated_with`).
pub enum CudaRun {
    /// This process sees a device (a real GPU, or the simulated one in the child): run the test here.
    Here(CudaBackend),
    /// The test ran on the simulated GPU in a child process and passed there.
    Simulated,
    /// No device of any kind: skipped, with a line saying why.
    Skipped,
}

/// `cuda_backend_or_simulated`, telling a test that ran in the simulated child from one that was skipped,
/// and giving the child more environment (e.g. `NC_SIM_TRACE=FILE`, read once the child has exited).
pub fn cuda_backend_or_simulated_with(suite: &str, env: &[(&str, &str)]) -> CudaRun {
    let why = if !cuda::driver_present() {
        "the CUDA driver library (libcuda.so) is not installed"
    } else if cuda::device_count() == 0 {
        "the driver sees no device"
    } else {
        let be = CudaBackend::new(0)
            .unwrap_or_else(|e| panic!("a CUDA device is visible but the CUDA backend failed to start: {e}"));
        return CudaRun::Here(be);
    };
    match sim::run_this_test_simulated_with(&sim::BLAS_LIBRARIES, env) {
        sim::Simulated::Passed => CudaRun::Simulated,
        sim::Simulated::Unavailable(no_sim) => {
            if std::env::var_os("NC_REQUIRE_CUDA").is_some() {
                panic!("NC_REQUIRE_CUDA is set but {why} (and no simulated GPU: {no_sim})");
            }
            eprintln!("no CUDA device: {why}, and no simulated GPU: {no_sim}; {suite} not run");
            CudaRun::Skipped
        }
    }
}

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

/// `Backend::newton_schulz_bf16` of the `ns.batch` matrices `g` on a backend, with the scratch a device uses;
/// the result on the host (the CUDA bf16 optimizer test and the bf16 Newton-Schulz test share it).
pub fn newton_schulz_bf16_on<B: Backend>(be: &B, ns: &NsBatch, g: &[f32]) -> Vec<f32> {
    let gb = to_backend(be, g);
    let mut buffers = NsBf16Buffers::for_call(be, ns);
    buffers.run(be, ns, View::all(&gb));
    to_host(be, &buffers.x)
}

/// The largest |a - b| over two slices of the same length; infinite where a difference is NaN (`f32::max`
/// alone would drop it, and a NaN result would read as no error at all).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) })
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
