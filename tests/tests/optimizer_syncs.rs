//! The device optimizer waits for the device at most once per optimizer step (issue 10, item 6).
//!
//! A backend whose ops return as soon as they are queued (CUDA) makes the host wait whenever a value comes
//! back: `download`, `sum_squares` (its result is a host f64) and `synchronize`. `Counting` wraps the CPU
//! backend, hides its host slices (so the optimizer takes the device path), and counts those three calls.
//! One optimizer step as the training loop runs it on a device (clip, then step) must make exactly one:
//! the clip's gradient norm, which the log wants anyway. Newton-Schulz's per-matrix norm stays on the
//! backend (`inverse_norm_into` and `scale_by_scalar`); reading it back instead costs one wait per matrix,
//! which this test counts and refuses. The same holds on the bf16 path (`Precision::Bf16`: batched bf16
//! Newton-Schulz, Muon's apply and the multi-tensor AdamW writing the working copy). And on the CUDA backend
//! itself, counted by the simulated GPU's driver (its NC_SIM_TRACE trace) rather than by a wrapper.

use nc_core::backend::cpu::{CpuBackend, CpuBuf};
use nc_core::backend::cuda::CudaBackend;
use nc_core::backend::{Backend, Storage, View};
use nc_core::config::ModelConfig;
use nc_core::model::Rng;
use nc_core::optim::device::{DeviceOptimizer, DeviceOptions};
use nc_core::optim::OptimConfig;
use nc_core::plan::Precision;
use nc_tests::harness::muon_matrices;
use nc_tests::{to_backend, to_host, CudaRun};
use std::cell::Cell;
use std::ffi::{c_char, CString};

/// The CPU backend with host slices hidden and every host wait counted.
#[derive(Default)]
struct Counting {
    cpu: CpuBackend,
    waits: Cell<usize>,
}

impl Counting {
    fn wait(&self) {
        self.waits.set(self.waits.get() + 1);
    }
}

/// The three waiting calls are counted and the host slices hidden; every other op, the optimizer's included,
/// goes to the CPU's own (in place, no wait), as a device backend's kernels would (`Delegate` forwards it;
/// `the_device_backend_overrides_every_op_whose_default_waits` checks that CUDA has a kernel for each).
impl nc_core::backend::delegate::Delegate for Counting {
    type Inner = CpuBackend;
    fn inner(&self) -> &CpuBackend {
        &self.cpu
    }
    fn download(&self, src: View<'_, CpuBackend>, dst: &mut [f32]) {
        self.wait();
        self.cpu.download(src, dst)
    }
    fn synchronize(&self) {
        self.wait();
    }
    fn sum_squares(&self, x: View<'_, CpuBackend>) -> f64 {
        self.wait();
        self.cpu.sum_squares(x)
    }
    fn host_slice(_: &CpuBuf) -> Option<&[f32]> {
        None
    }
    fn host_slice_mut(_: &mut CpuBuf) -> Option<&mut [f32]> {
        None
    }
}

/// Two layers with square, tall and wide matrices: 12 Muon matrices, so a per-matrix wait shows as 12.
fn tiny() -> ModelConfig {
    ModelConfig::new(2, 64, 2, 2, 32, 50, 8).unwrap()
}

#[test]
fn one_optimizer_step_waits_for_the_device_once() {
    counted_steps_wait_once(Precision::Fp32, 5, |opt| {
        let matrices = muon_matrices(opt.layout());
        assert!(
            matrices >= 8,
            "the model should have several Muon matrices, has {matrices}"
        );
    });
}

/// The bf16 path (batched Newton-Schulz, apply and multi-tensor AdamW writing the working copy) waits once too.
#[test]
fn one_bf16_optimizer_step_waits_for_the_device_once() {
    counted_steps_wait_once(Precision::Bf16, 6, |opt| {
        assert!(
            opt.ns_groups().iter().any(|g| g.members.len() > 1),
            "the model should have batched Newton-Schulz calls"
        );
    });
}

/// Three optimizer steps at `precision` as the training loop runs them on a device (clip, then step; the bf16
/// path writes the model's working copy), on `Counting`: each waits for the device once, and computes what
/// the plain CPU path does, to the bit. `check_model` first looks at the counted optimizer: what the test
/// needs of the model at this precision.
fn counted_steps_wait_once(precision: Precision, seed: u64, check_model: impl Fn(&DeviceOptimizer<Counting>)) {
    let model = tiny();
    let n = model.num_params() as usize;
    let mut rng = Rng::new(seed);
    let p0: Vec<f32> = (0..n).map(|_| (rng.normal() * 0.1) as f32).collect();
    let be = Counting::default();
    let cpu = CpuBackend::new();
    let opts = DeviceOptions {
        precision,
        ..DeviceOptions::default()
    };
    let mut params = to_backend(&be, &p0);
    let mut cpu_params = to_backend(&cpu, &p0);
    // The f32 path's GEMMs read the master itself: no working copy.
    let bf16 = precision == Precision::Bf16;
    let mut working = bf16.then(|| be.alloc_as(n, Storage::Bf16));
    let mut cpu_working = bf16.then(|| cpu.alloc_as(n, Storage::Bf16));
    let mut opt = DeviceOptimizer::with_options(&be, &model, OptimConfig::default(), opts).unwrap();
    let mut cpu_opt = DeviceOptimizer::with_options(&cpu, &model, OptimConfig::default(), opts).unwrap();
    check_model(&opt);
    for step in 0..3 {
        let g: Vec<f32> = (0..n).map(|_| (rng.normal() * 0.05) as f32).collect();
        let mut grads = to_backend(&be, &g);
        let mut cpu_grads = to_backend(&cpu, &g);
        be.waits.set(0);
        let norm = opt.clip(&be, &mut grads, 1.0);
        opt.step_writing(&be, &mut params, &grads, working.as_mut(), 1.0, 0.9);
        assert_eq!(
            be.waits.get(),
            1,
            "{precision:?} step {step}: the optimizer step waited for the device {} times (1 allowed: the \
             gradient norm)",
            be.waits.get()
        );
        // The counted path computes what the plain CPU path does, to the bit.
        let cpu_norm = cpu_opt.clip(&cpu, &mut cpu_grads, 1.0);
        cpu_opt.step_writing(&cpu, &mut cpu_params, &cpu_grads, cpu_working.as_mut(), 1.0, 0.9);
        assert_eq!(norm.to_bits(), cpu_norm.to_bits());
        let mut compared = vec![("params", to_host(&be, &params), to_host(&cpu, &cpu_params))];
        if let (Some(w), Some(cpu_w)) = (&working, &cpu_working) {
            compared.push(("working copy", to_host(&be, w), to_host(&cpu, cpu_w)));
        }
        for (what, got, want) in compared {
            assert!(
                got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{precision:?} step {step}: {what} differ"
            );
        }
    }
}

/// The same steps on the CUDA backend, each between two marks in the simulated driver's trace: `mark` is
/// None on a real GPU (its driver keeps no trace), where the steps run and are not counted.
fn cuda_steps(be: &CudaBackend, mark: Option<&dyn Fn(&str)>) {
    let model = tiny();
    let n = model.num_params() as usize;
    let mut rng = Rng::new(7);
    let p0: Vec<f32> = (0..n).map(|_| (rng.normal() * 0.1) as f32).collect();
    for precision in [Precision::Fp32, Precision::Bf16] {
        let opts = DeviceOptions {
            precision,
            ..DeviceOptions::default()
        };
        let mut opt = DeviceOptimizer::with_options(be, &model, OptimConfig::default(), opts).unwrap();
        let mut params = to_backend(be, &p0);
        let mut working = be.alloc_as(n, Storage::Bf16);
        for step in 0..TRACED_STEPS {
            let g: Vec<f32> = (0..n).map(|_| (rng.normal() * 0.05) as f32).collect();
            let mut grads = to_backend(be, &g);
            be.synchronize(); // the upload's waits stay outside the marks
            mark.inspect(|m| m(&format!("begin {precision:?} step {step}")));
            opt.clip(be, &mut grads, 1.0);
            let working = (precision == Precision::Bf16).then_some(&mut working);
            opt.step_writing(be, &mut params, &grads, working, 1.0, 0.9);
            mark.inspect(|m| m(&format!("end {precision:?} step {step}")));
        }
        let got = to_host(be, &params);
        assert!(got.iter().all(|x| x.is_finite()), "{precision:?}: params not finite");
    }
}

/// Optimizer steps traced per precision.
const TRACED_STEPS: usize = 3;

/// The simulated driver's private trace entry (sim/include/ncsim.h), found in the libcuda.so.1 this process
/// loaded (the simulated one in the child); None where the driver has none.
fn simulated_trace_mark() -> Option<impl Fn(&str)> {
    type NcsimTrace = unsafe extern "C" fn(*const c_char, *const c_char);
    // SAFETY: opening a library the CUDA backend already loaded returns that same library (no initializer
    // runs again); ncsim_trace has the signature ncsim.h declares.
    let lib = unsafe { libloading::Library::new("libcuda.so.1") }.ok()?;
    let trace: NcsimTrace = *unsafe { lib.get::<NcsimTrace>(b"ncsim_trace\0") }.ok()?;
    Some(move |detail: &str| {
        let _loaded = &lib;
        let detail = CString::new(detail).expect("a mark without NUL");
        // SAFETY: two NUL-terminated strings that outlive the call; the driver copies them.
        unsafe { trace(c"test".as_ptr(), detail.as_ptr()) }
    })
}

/// What the host did between a "begin" and an "end" mark of a trace.
#[derive(Debug, Default)]
struct Window {
    what: String,
    /// Host synchronizations (the trace's "sync": stream, context and event synchronizations, and copies the
    /// host waits for) with device work queued since the previous one: the waits for the device.
    waits: usize,
    /// Synchronizations right after another with nothing queued between: they wait for nothing (e.g. the
    /// backend's cuStreamSynchronize after a read-back into pageable memory, which the copy already waited for).
    idle_syncs: usize,
    read_backs: usize,
    allocations: usize,
}

/// The marked windows of a finished trace (NC_SIM_TRACE's lines: number, kind, detail).
fn marked_windows(trace: &str) -> Vec<Window> {
    let mut windows = Vec::new();
    let mut open: Option<Window> = None;
    // The marks are placed right after a synchronization: nothing is queued when a window opens.
    let mut queued = false;
    for line in trace.lines().filter(|l| !l.starts_with('#')) {
        let fields: Vec<&str> = line.split('\t').collect();
        let (kind, detail) = (
            fields.get(1).copied().unwrap_or(""),
            fields.get(2).copied().unwrap_or(""),
        );
        if ["launch", "gemm", "h2d", "d2h", "d2d", "memset"].contains(&kind) {
            queued = true;
        }
        match (kind, &mut open) {
            ("test", None) if detail.starts_with("begin ") => {
                queued = false;
                open = Some(Window {
                    what: detail["begin ".len()..].to_string(),
                    ..Window::default()
                })
            }
            ("test", Some(w)) if detail == format!("end {}", w.what) => windows.push(open.take().unwrap()),
            ("test", _) => panic!("unexpected mark '{detail}' in the trace"),
            ("sync", Some(w)) if queued => w.waits += 1,
            ("sync", Some(w)) => w.idle_syncs += 1,
            ("d2h", Some(w)) => w.read_backs += 1,
            ("alloc", Some(w)) => w.allocations += 1,
            _ => {}
        }
        if kind == "sync" {
            queued = false;
        }
    }
    windows
}

/// The count above, of real CUDA synchronizations: the CUDA backend's optimizer step (f32 and bf16), run on
/// the simulated GPU with its trace on, makes the host wait for the device exactly once per step (the clip's
/// gradient norm), as the simulated driver saw it: a synchronization with device work queued since the
/// previous one (one right after another waits for nothing). On a real GPU the steps run uncounted.
#[test]
fn one_cuda_optimizer_step_synchronizes_once_on_the_simulated_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace.tsv");
    let env = [("NC_SIM_TRACE", trace.to_str().expect("a UTF-8 temp path"))];
    match nc_tests::cuda_backend_or_simulated_with("optimizer_syncs", &env) {
        CudaRun::Here(be) => {
            let mark = simulated_trace_mark();
            if mark.is_none() {
                eprintln!("a real GPU: its driver keeps no trace, so the steps run uncounted");
            }
            cuda_steps(&be, mark.as_ref().map(|m| m as &dyn Fn(&str)));
        }
        CudaRun::Simulated => {
            let text = std::fs::read_to_string(&trace).expect("the simulated run's trace (NC_SIM_TRACE)");
            let windows = marked_windows(&text);
            assert_eq!(
                windows.len(),
                2 * TRACED_STEPS,
                "marked steps in the trace: {windows:?}"
            );
            for w in &windows {
                eprintln!(
                    "{}: {} wait(s) for the device, {} idle synchronization(s), {} read-back(s), {} allocation(s)",
                    w.what, w.waits, w.idle_syncs, w.read_backs, w.allocations
                );
                assert_eq!(
                    w.waits, 1,
                    "{}: the optimizer step made the host wait for the device {} times (1 allowed: the gradient \
                     norm)",
                    w.what, w.waits
                );
            }
        }
        CudaRun::Skipped => {}
    }
}

/// The names of the `fn`s declared at the top level of the block starting at `header` (to the first line
/// that is exactly "}"), each with its body's text.
fn fns_in_block<'a>(src: &'a str, header: &str) -> Vec<(String, &'a str)> {
    let start = src.find(header).unwrap_or_else(|| panic!("{header} not found"));
    let block = &src[start..start + src[start..].find("\n}\n").expect("the block's closing brace")];
    let mut fns = Vec::new();
    let starts: Vec<usize> = block.match_indices("\n    fn ").map(|(i, _)| i).collect();
    for (j, &i) in starts.iter().enumerate() {
        let text = &block[i..starts.get(j + 1).copied().unwrap_or(block.len())];
        let name = text["\n    fn ".len()..]
            .split(['(', '<'])
            .next()
            .unwrap()
            .trim()
            .to_string();
        fns.push((name, text));
    }
    fns
}

/// `Counting` hands the optimizer's ops to the CPU's, which return without a host wait; the count above holds
/// on a GPU only if the CUDA backend does the same, with a kernel of its own for every op whose trait default
/// reads values back to the host (download, or the host's sum of squares): a default left in place there
/// would wait once per call, uncounted here.
#[test]
fn the_device_backend_overrides_every_op_whose_default_waits() {
    let trait_src = include_str!("../../core/src/backend/mod.rs");
    let cuda_src = include_str!("../../core/src/backend/cuda/mod.rs");
    let waiting: Vec<String> = fns_in_block(trait_src, "pub trait Backend {")
        .into_iter()
        .filter(|(_, body)| {
            ["download_vec(", "self.download(", "self.sum_squares("]
                .iter()
                .any(|c| body.contains(c))
        })
        .map(|(name, _)| name)
        .collect();
    // the optimizer's ops whose defaults compute on downloaded copies, at least
    for op in [
        "axpby",
        "muon_momentum",
        "adamw",
        "newton_schulz_bf16",
        "inverse_norm_into",
        "scale_by_scalar",
    ] {
        assert!(
            waiting.iter().any(|w| w == op),
            "{op}'s default should read back: {waiting:?}"
        );
    }
    let cuda: Vec<String> = fns_in_block(cuda_src, "impl Backend for CudaBackend {")
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    // sum_squares returns a host value by contract: it is the clip's one counted wait
    let missing: Vec<&String> = waiting
        .iter()
        .filter(|w| *w != "sum_squares" && !cuda.contains(w))
        .collect();
    assert!(
        missing.is_empty(),
        "CudaBackend keeps the waiting default of {missing:?}"
    );
}
