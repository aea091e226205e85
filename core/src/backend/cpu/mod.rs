//! The CPU backend: f32 buffers in host memory, threads through rayon, GEMMs through the `gemm` crate.
//!
//! It is the reference every other backend is checked against, so it favours plain, exact code; the hot
//! paths (matmuls, attention tiles) still run multithreaded and vectorized. One file per op family.

mod attention;
mod elementwise;
mod loss;
mod matmul;
mod norm;

use super::{optim_ops, AdamwStep, AttnShape, Backend, View, ViewMut};

/// f32 values in host memory.
#[derive(Debug, Clone, Default)]
pub struct CpuBuf(pub Vec<f32>);

/// i32 token ids in host memory.
#[derive(Debug, Clone, Default)]
pub struct CpuIds(pub Vec<i32>);

/// The CPU backend. `threads` is the parallelism handed to big GEMMs (0 = rayon's pool size).
#[derive(Debug, Clone, Default)]
pub struct CpuBackend {
    pub threads: usize,
}

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend { threads: 0 }
    }
    /// Host slice of a whole buffer (CPU only: this is how the optimizers and checkpoints reach params).
    pub fn host(buf: &CpuBuf) -> &[f32] {
        &buf.0
    }
    pub fn host_mut(buf: &mut CpuBuf) -> &mut [f32] {
        &mut buf.0
    }
}

/// The host slice behind a view.
pub(crate) fn sl<'a>(v: View<'a, CpuBackend>) -> &'a [f32] {
    &v.buf.0[v.off..v.off + v.len]
}

/// The writable host slice behind a view.
pub(crate) fn sl_mut<'a>(v: ViewMut<'a, CpuBackend>) -> &'a mut [f32] {
    &mut v.buf.0[v.off..v.off + v.len]
}

/// A raw pointer that may cross threads: kernels hand disjoint, strided regions of one output to rayon
/// tasks, which safe slices cannot express. Every use states why the regions are disjoint.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl Backend for CpuBackend {
    type Buf = CpuBuf;
    type Ids = CpuIds;

    fn alloc(&self, len: usize) -> CpuBuf {
        CpuBuf(vec![0.0; len])
    }
    fn alloc_ids(&self, len: usize) -> CpuIds {
        CpuIds(vec![0; len])
    }
    fn buf_len(buf: &CpuBuf) -> usize {
        buf.0.len()
    }
    fn upload(&self, dst: ViewMut<'_, Self>, src: &[f32]) {
        sl_mut(dst).copy_from_slice(src);
    }
    fn download(&self, src: View<'_, Self>, dst: &mut [f32]) {
        dst.copy_from_slice(sl(src));
    }
    fn upload_ids(&self, dst: &mut CpuIds, src: &[i32]) {
        dst.0[..src.len()].copy_from_slice(src);
    }
    fn fill(&self, dst: ViewMut<'_, Self>, value: f32) {
        sl_mut(dst).fill(value);
    }
    fn copy(&self, src: View<'_, Self>, dst: ViewMut<'_, Self>) {
        sl_mut(dst).copy_from_slice(sl(src));
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
        matmul::matmul(self.threads, m, n, k, sl(a), a_t, sl(b), b_t, sl_mut(c), accumulate);
    }

    fn embedding_forward(&self, ids: &CpuIds, n: usize, wte: View<'_, Self>, d: usize, out: ViewMut<'_, Self>) {
        elementwise::embedding_forward(&ids.0[..n], sl(wte), d, sl_mut(out));
    }
    fn embedding_backward(&self, ids: &CpuIds, n: usize, dout: View<'_, Self>, d: usize, dwte: ViewMut<'_, Self>) {
        elementwise::embedding_backward(&ids.0[..n], sl(dout), d, sl_mut(dwte));
    }

    fn rmsnorm_forward(
        &self,
        x: View<'_, Self>,
        rows: usize,
        dim: usize,
        eps: f32,
        y: ViewMut<'_, Self>,
        rstd: ViewMut<'_, Self>,
    ) {
        norm::rmsnorm_forward(sl(x), rows, dim, eps, sl_mut(y), sl_mut(rstd));
    }
    fn rmsnorm_backward(
        &self,
        y: View<'_, Self>,
        rstd: View<'_, Self>,
        dy: View<'_, Self>,
        rows: usize,
        dim: usize,
        dx: ViewMut<'_, Self>,
        accumulate: bool,
    ) {
        norm::rmsnorm_backward(sl(y), sl(rstd), sl(dy), rows, dim, sl_mut(dx), accumulate);
    }

    fn rotary_forward(
        &self,
        x: ViewMut<'_, Self>,
        batch: usize,
        t: usize,
        heads: usize,
        head_dim: usize,
        pos0: usize,
        table: View<'_, Self>,
    ) {
        norm::rotary(sl_mut(x), batch, t, heads, head_dim, pos0, sl(table), false);
    }
    fn rotary_backward(
        &self,
        dx: ViewMut<'_, Self>,
        batch: usize,
        t: usize,
        heads: usize,
        head_dim: usize,
        pos0: usize,
        table: View<'_, Self>,
    ) {
        norm::rotary(sl_mut(dx), batch, t, heads, head_dim, pos0, sl(table), true);
    }

    fn attention_forward(
        &self,
        shape: AttnShape,
        q: View<'_, Self>,
        k: View<'_, Self>,
        v: View<'_, Self>,
        out: ViewMut<'_, Self>,
        lse: ViewMut<'_, Self>,
    ) {
        attention::forward(shape, sl(q), sl(k), sl(v), sl_mut(out), sl_mut(lse));
    }
    fn attention_backward(
        &self,
        shape: AttnShape,
        q: View<'_, Self>,
        k: View<'_, Self>,
        v: View<'_, Self>,
        out: View<'_, Self>,
        lse: View<'_, Self>,
        dout: View<'_, Self>,
        dq: ViewMut<'_, Self>,
        dk: ViewMut<'_, Self>,
        dv: ViewMut<'_, Self>,
    ) {
        attention::backward(
            shape,
            sl(q),
            sl(k),
            sl(v),
            sl(out),
            sl(lse),
            sl(dout),
            sl_mut(dq),
            sl_mut(dk),
            sl_mut(dv),
        );
    }

    fn relu2_forward(&self, u: View<'_, Self>, h: ViewMut<'_, Self>) {
        elementwise::relu2_forward(sl(u), sl_mut(h));
    }
    fn relu2_backward(&self, u: View<'_, Self>, dh_to_du: ViewMut<'_, Self>) {
        elementwise::relu2_backward(sl(u), sl_mut(dh_to_du));
    }
    fn add_inplace(&self, x: ViewMut<'_, Self>, y: View<'_, Self>) {
        elementwise::add_inplace(sl_mut(x), sl(y));
    }

    fn softcap_cross_entropy(
        &self,
        logits: ViewMut<'_, Self>,
        rows: usize,
        vocab: usize,
        cap: f32,
        targets: &CpuIds,
        target_off: usize,
        losses: ViewMut<'_, Self>,
        grad_scale: Option<f32>,
    ) {
        let t = &targets.0[target_off..target_off + rows];
        loss::softcap_cross_entropy(sl_mut(logits), rows, vocab, cap, t, sl_mut(losses), grad_scale);
    }
    fn softcap(&self, logits: ViewMut<'_, Self>, cap: f32) {
        loss::softcap(sl_mut(logits), cap);
    }

    fn axpby(&self, a: f32, x: View<'_, Self>, b: f32, y: ViewMut<'_, Self>) {
        optim_ops::axpby(a, sl(x), b, sl_mut(y));
    }
    fn scale(&self, x: ViewMut<'_, Self>, a: f32) {
        optim_ops::scale(sl_mut(x), a);
    }
    fn sum_squares(&self, x: View<'_, Self>) -> f64 {
        optim_ops::sum_squares(sl(x))
    }
    fn muon_momentum(&self, g: View<'_, Self>, buf: ViewMut<'_, Self>, update: ViewMut<'_, Self>, mu: f32) {
        optim_ops::muon_momentum(sl(g), sl_mut(buf), sl_mut(update), mu);
    }
    fn adamw(&self, p: ViewMut<'_, Self>, g: View<'_, Self>, m: ViewMut<'_, Self>, v: ViewMut<'_, Self>, h: AdamwStep) {
        optim_ops::adamw(sl_mut(p), sl(g), sl_mut(m), sl_mut(v), h);
    }

    fn host_slice(buf: &CpuBuf) -> Option<&[f32]> {
        Some(&buf.0)
    }
    fn host_slice_mut(buf: &mut CpuBuf) -> Option<&mut [f32]> {
        Some(&mut buf.0)
    }
}
