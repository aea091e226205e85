//! The device optimizer waits for the device at most once per optimizer step (issue 10, item 6).
//!
//! A backend whose ops return as soon as they are queued (CUDA) makes the host wait whenever a value comes
//! back: `download`, `sum_squares` (its result is a host f64) and `synchronize`. `Counting` wraps the CPU
//! backend, hides its host slices (so the optimizer takes the device path), and counts those three calls.
//! One optimizer step as the training loop runs it on a device (clip, then step) must make exactly one:
//! the clip's gradient norm, which the log wants anyway. Newton-Schulz's per-matrix norm stays on the
//! backend (`inverse_norm_into` and `scale_by_scalar`); reading it back instead costs one wait per matrix,
//! which this test counts and refuses. The same holds on the bf16 path (`Precision::Bf16`: batched bf16
//! Newton-Schulz, Muon's apply and the multi-tensor AdamW writing the working copy).

use nc_core::backend::cpu::{CpuBackend, CpuBuf, CpuIds};
use nc_core::backend::{AdamwPiece, AdamwStep, AttnShape, Backend, NsBatch, Storage, View, ViewMut};
use nc_core::config::{ModelConfig, ParamKind};
use nc_core::model::Rng;
use nc_core::optim::device::{DeviceOptimizer, DeviceOptions};
use nc_core::optim::OptimConfig;
use nc_core::plan::Precision;
use nc_tests::{to_backend, to_host};
use std::cell::Cell;

/// The CPU backend with host slices hidden and every host wait counted.
#[derive(Default)]
struct Counting {
    cpu: CpuBackend,
    waits: Cell<usize>,
}

fn v<'a>(x: View<'a, Counting>) -> View<'a, CpuBackend> {
    View {
        buf: x.buf,
        off: x.off,
        len: x.len,
    }
}

fn vm<'a>(x: ViewMut<'a, Counting>) -> ViewMut<'a, CpuBackend> {
    ViewMut {
        buf: x.buf,
        off: x.off,
        len: x.len,
    }
}

const NOT_AN_OPTIMIZER_OP: &str = "the optimizer does not call the model's ops";

impl Backend for Counting {
    type Buf = CpuBuf;
    type Ids = CpuIds;

    fn alloc(&self, len: usize) -> CpuBuf {
        self.cpu.alloc(len)
    }
    fn alloc_as(&self, len: usize, storage: Storage) -> CpuBuf {
        self.cpu.alloc_as(len, storage)
    }
    fn storage(buf: &CpuBuf) -> Storage {
        CpuBackend::storage(buf)
    }
    fn alloc_ids(&self, len: usize) -> CpuIds {
        self.cpu.alloc_ids(len)
    }
    fn buf_len(buf: &CpuBuf) -> usize {
        CpuBackend::buf_len(buf)
    }
    fn upload(&self, dst: ViewMut<'_, Self>, src: &[f32]) {
        self.cpu.upload(vm(dst), src)
    }
    fn download(&self, src: View<'_, Self>, dst: &mut [f32]) {
        self.waits.set(self.waits.get() + 1);
        self.cpu.download(v(src), dst)
    }
    fn synchronize(&self) {
        self.waits.set(self.waits.get() + 1);
    }
    fn sum_squares(&self, x: View<'_, Self>) -> f64 {
        self.waits.set(self.waits.get() + 1);
        self.cpu.sum_squares(v(x))
    }
    fn upload_ids(&self, dst: &mut CpuIds, src: &[i32]) {
        self.cpu.upload_ids(dst, src)
    }
    fn fill(&self, dst: ViewMut<'_, Self>, value: f32) {
        self.cpu.fill(vm(dst), value)
    }
    fn copy(&self, src: View<'_, Self>, dst: ViewMut<'_, Self>) {
        self.cpu.copy(v(src), vm(dst))
    }
    fn matmul(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: View<'_, Self>,
        a_t: bool,
        b: View<'_, Self>,
        b_t: bool,
        c: ViewMut<'_, Self>,
        accumulate: bool,
    ) {
        self.cpu.matmul(m, n, k, v(a), a_t, v(b), b_t, vm(c), accumulate)
    }
    // The optimizer's ops go to the CPU's own (in place, no wait), as a device backend's kernels would.
    fn axpby(&self, a: f32, x: View<'_, Self>, b: f32, y: ViewMut<'_, Self>) {
        self.cpu.axpby(a, v(x), b, vm(y))
    }
    fn scale(&self, x: ViewMut<'_, Self>, a: f32) {
        self.cpu.scale(vm(x), a)
    }
    fn inverse_norm_into(&self, x: View<'_, Self>, eps: f32, inv: ViewMut<'_, Self>) {
        self.cpu.inverse_norm_into(v(x), eps, vm(inv))
    }
    fn scale_by_scalar(&self, x: View<'_, Self>, s: View<'_, Self>, y: ViewMut<'_, Self>) {
        self.cpu.scale_by_scalar(v(x), v(s), vm(y))
    }
    fn muon_momentum(&self, g: View<'_, Self>, buf: ViewMut<'_, Self>, update: ViewMut<'_, Self>, mu: f32) {
        self.cpu.muon_momentum(v(g), vm(buf), vm(update), mu)
    }
    fn adamw(&self, p: ViewMut<'_, Self>, g: View<'_, Self>, m: ViewMut<'_, Self>, w: ViewMut<'_, Self>, h: AdamwStep) {
        self.cpu.adamw(vm(p), v(g), vm(m), vm(w), h)
    }
    fn newton_schulz_bf16(
        &self,
        ns: &NsBatch,
        g: View<'_, Self>,
        x: ViewMut<'_, Self>,
        x_tmp: ViewMut<'_, Self>,
        gram: ViewMut<'_, Self>,
        poly: ViewMut<'_, Self>,
        norms: ViewMut<'_, Self>,
    ) {
        self.cpu
            .newton_schulz_bf16(ns, v(g), vm(x), vm(x_tmp), vm(gram), vm(poly), vm(norms))
    }
    fn muon_apply(&self, x: View<'_, Self>, a: f32, p: ViewMut<'_, Self>, p_bf16: Option<ViewMut<'_, Self>>) {
        self.cpu.muon_apply(v(x), a, vm(p), p_bf16.map(vm))
    }
    fn adamw_multi(
        &self,
        p: &mut CpuBuf,
        g: &CpuBuf,
        m: &mut CpuBuf,
        w: &mut CpuBuf,
        working: Option<&mut CpuBuf>,
        pieces: &[AdamwPiece],
    ) {
        self.cpu.adamw_multi(p, g, m, w, working, pieces)
    }

    fn embedding_forward(&self, _: &CpuIds, _: usize, _: View<'_, Self>, _: usize, _: ViewMut<'_, Self>) {
        unimplemented!("{NOT_AN_OPTIMIZER_OP}")
    }
    fn embedding_backward(&self, _: &CpuIds, _: usize, _: View<'_, Self>, _: usize, _: ViewMut<'_, Self>) {
        unimplemented!("{NOT_AN_OPTIMIZER_OP}")
    }
    fn rmsnorm_forward(
        &self,
        _: View<'_, Self>,
        _: usize,
        _: usize,
        _: f32,
        _: ViewMut<'_, Self>,
        _: ViewMut<'_, Self>,
    ) {
        unimplemented!("{NOT_AN_OPTIMIZER_OP}")
    }
    fn rmsnorm_backward(
        &self,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: usize,
        _: usize,
        _: ViewMut<'_, Self>,
        _: bool,
    ) {
        unimplemented!("{NOT_AN_OPTIMIZER_OP}")
    }
    fn rotary_forward(
        &self,
        _: ViewMut<'_, Self>,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: View<'_, Self>,
    ) {
        unimplemented!("{NOT_AN_OPTIMIZER_OP}")
    }
    fn rotary_backward(
        &self,
        _: ViewMut<'_, Self>,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: View<'_, Self>,
    ) {
        unimplemented!("{NOT_AN_OPTIMIZER_OP}")
    }
    fn attention_forward(
        &self,
        _: AttnShape,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: ViewMut<'_, Self>,
        _: ViewMut<'_, Self>,
    ) {
        unimplemented!("{NOT_AN_OPTIMIZER_OP}")
    }
    fn attention_backward(
        &self,
        _: AttnShape,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: ViewMut<'_, Self>,
        _: ViewMut<'_, Self>,
        _: ViewMut<'_, Self>,
    ) {
        unimplemented!("{NOT_AN_OPTIMIZER_OP}")
    }
    fn relu2_forward(&self, _: View<'_, Self>, _: ViewMut<'_, Self>) {
        unimplemented!("{NOT_AN_OPTIMIZER_OP}")
    }
    fn relu2_backward(&self, _: View<'_, Self>, _: ViewMut<'_, Self>) {
        unimplemented!("{NOT_AN_OPTIMIZER_OP}")
    }
    fn add_inplace(&self, _: ViewMut<'_, Self>, _: View<'_, Self>) {
        unimplemented!("{NOT_AN_OPTIMIZER_OP}")
    }
    fn softcap_cross_entropy(
        &self,
        _: ViewMut<'_, Self>,
        _: usize,
        _: usize,
        _: f32,
        _: &CpuIds,
        _: usize,
        _: ViewMut<'_, Self>,
        _: Option<f32>,
    ) {
        unimplemented!("{NOT_AN_OPTIMIZER_OP}")
    }
    fn softcap(&self, _: ViewMut<'_, Self>, _: f32) {
        unimplemented!("{NOT_AN_OPTIMIZER_OP}")
    }
}

/// Two layers with square, tall and wide matrices: 12 Muon matrices, so a per-matrix wait shows as 12.
fn tiny() -> ModelConfig {
    ModelConfig::new(2, 64, 2, 2, 32, 50, 8).unwrap()
}

#[test]
fn one_optimizer_step_waits_for_the_device_once() {
    let model = tiny();
    let n = model.num_params() as usize;
    let mut rng = Rng::new(5);
    let p0: Vec<f32> = (0..n).map(|_| (rng.normal() * 0.1) as f32).collect();
    let be = Counting::default();
    let cpu = CpuBackend::new();
    let mut params = to_backend(&be, &p0);
    let mut cpu_params = to_backend(&cpu, &p0);
    let mut opt = DeviceOptimizer::new(&be, &model, OptimConfig::default()).unwrap();
    let mut cpu_opt = DeviceOptimizer::new(&cpu, &model, OptimConfig::default()).unwrap();
    let matrices = opt
        .layout()
        .segments
        .iter()
        .filter(|s| s.kind == ParamKind::Matrix)
        .count();
    assert!(
        matrices >= 8,
        "the model should have several Muon matrices, has {matrices}"
    );
    for step in 0..3 {
        let g: Vec<f32> = (0..n).map(|_| (rng.normal() * 0.05) as f32).collect();
        let mut grads = to_backend(&be, &g);
        let mut cpu_grads = to_backend(&cpu, &g);
        be.waits.set(0);
        let norm = opt.clip(&be, &mut grads, 1.0);
        opt.step(&be, &mut params, &grads, 1.0, 0.9);
        assert_eq!(
            be.waits.get(),
            1,
            "step {step}: the optimizer step waited for the device {} times (1 allowed: the gradient norm)",
            be.waits.get()
        );
        // The counted path computes what the plain CPU path does, to the bit.
        let cpu_norm = cpu_opt.clip(&cpu, &mut cpu_grads, 1.0);
        cpu_opt.step(&cpu, &mut cpu_params, &cpu_grads, 1.0, 0.9);
        assert_eq!(norm.to_bits(), cpu_norm.to_bits());
        let (got, want) = (to_host(&be, &params), to_host(&cpu, &cpu_params));
        assert!(
            got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
            "step {step}: params differ"
        );
    }
}

/// The bf16 path (batched Newton-Schulz, apply and multi-tensor AdamW writing the working copy) waits once too.
#[test]
fn one_bf16_optimizer_step_waits_for_the_device_once() {
    let model = tiny();
    let n = model.num_params() as usize;
    let mut rng = Rng::new(6);
    let p0: Vec<f32> = (0..n).map(|_| (rng.normal() * 0.1) as f32).collect();
    let be = Counting::default();
    let cpu = CpuBackend::new();
    let opts = DeviceOptions {
        precision: Precision::Bf16,
        ..DeviceOptions::default()
    };
    let mut params = to_backend(&be, &p0);
    let mut cpu_params = to_backend(&cpu, &p0);
    let mut working = be.alloc_as(n, Storage::Bf16);
    let mut cpu_working = cpu.alloc_as(n, Storage::Bf16);
    let mut opt = DeviceOptimizer::with_options(&be, &model, OptimConfig::default(), opts).unwrap();
    let mut cpu_opt = DeviceOptimizer::with_options(&cpu, &model, OptimConfig::default(), opts).unwrap();
    assert!(
        opt.ns_groups().iter().any(|g| g.members.len() > 1),
        "the model should have batched Newton-Schulz calls"
    );
    for step in 0..3 {
        let g: Vec<f32> = (0..n).map(|_| (rng.normal() * 0.05) as f32).collect();
        let mut grads = to_backend(&be, &g);
        let mut cpu_grads = to_backend(&cpu, &g);
        be.waits.set(0);
        let norm = opt.clip(&be, &mut grads, 1.0);
        opt.step_writing(&be, &mut params, &grads, Some(&mut working), 1.0, 0.9);
        assert_eq!(
            be.waits.get(),
            1,
            "step {step}: the bf16 optimizer step waited for the device {} times (1 allowed: the gradient norm)",
            be.waits.get()
        );
        let cpu_norm = cpu_opt.clip(&cpu, &mut cpu_grads, 1.0);
        cpu_opt.step_writing(&cpu, &mut cpu_params, &cpu_grads, Some(&mut cpu_working), 1.0, 0.9);
        assert_eq!(norm.to_bits(), cpu_norm.to_bits());
        for (what, got, want) in [
            ("params", to_host(&be, &params), to_host(&cpu, &cpu_params)),
            ("working copy", to_host(&be, &working), to_host(&cpu, &cpu_working)),
        ] {
            assert!(
                got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                "step {step}: {what} differ"
            );
        }
    }
}
