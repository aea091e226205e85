//! Backends that wrap another backend (tests' and benches' instruments: one that hides host slices, one that
//! counts host waits, one that charges allocations to a budget, one that times every op, one that rounds like
//! a GPU) implement `Delegate`: they name the backend they wrap and override only what they change. Every
//! other `Backend` method goes to the wrapped backend's own implementation, never to the trait's default body.
//!
//! Why it matters: the trait's defaults are written for a backend that has nothing better (download, compute
//! on the host, upload; or two unfused calls). A wrapper that forgot to forward, say, `rotary_qknorm_forward`
//! ran the default's two calls, which round the rotated intermediate into a bf16 buffer where the wrapped
//! backend's fused op does not; one that forgot an optimizer op made it download and upload, which a wait
//! counter then counted against the optimizer. Here forwarding is the default, for every method:
//! `every_backend_method_is_forwarded` below fails when the trait grows a method this file does not forward.
//!
//! A wrapper's overrides take views of the wrapped backend (`View<'_, Inner>`), so they hand them straight to
//! it. Implement the trait by path (`impl nc_core::backend::delegate::Delegate for W`) rather than importing
//! it: with both traits in scope, a call such as `w.alloc(n)` would be ambiguous between the two (inside the
//! impl block it is in scope, so an override calls the wrapper's own ops as `Backend::alloc(self, n)`).

use super::{
    AdamwPiece, AdamwStep, AttnShape, Backend, Gemm, Heads, MemoryReport, NsBatch, Rotation, Storage, View, ViewMut,
};
use crate::error::Result;

/// The wrapped backend's buffer type.
pub type Buf<D> = <<D as Delegate>::Inner as Backend>::Buf;
/// The wrapped backend's token-id buffer type.
pub type Ids<D> = <<D as Delegate>::Inner as Backend>::Ids;
/// A read-only view into the wrapped backend's buffers.
pub type In<'a, D> = View<'a, <D as Delegate>::Inner>;
/// A writable view into the wrapped backend's buffers.
pub type InMut<'a, D> = ViewMut<'a, <D as Delegate>::Inner>;

/// A backend made of another one (`Inner`) plus changes. Each method's default forwards to `inner()`; see
/// `Backend` for what each does.
#[allow(clippy::too_many_arguments)]
pub trait Delegate: Sized {
    type Inner: Backend;
    fn inner(&self) -> &Self::Inner;

    fn alloc(&self, len: usize) -> Buf<Self> {
        self.inner().alloc(len)
    }
    fn alloc_as(&self, len: usize, storage: Storage) -> Buf<Self> {
        self.inner().alloc_as(len, storage)
    }
    fn try_alloc_as(&self, len: usize, storage: Storage) -> Result<Buf<Self>> {
        self.inner().try_alloc_as(len, storage)
    }
    fn storage(buf: &Buf<Self>) -> Storage {
        Self::Inner::storage(buf)
    }
    fn alloc_ids(&self, len: usize) -> Ids<Self> {
        self.inner().alloc_ids(len)
    }
    fn buf_len(buf: &Buf<Self>) -> usize {
        Self::Inner::buf_len(buf)
    }
    fn upload(&self, dst: InMut<'_, Self>, src: &[f32]) {
        self.inner().upload(dst, src)
    }
    fn download(&self, src: In<'_, Self>, dst: &mut [f32]) {
        self.inner().download(src, dst)
    }
    fn upload_ids(&self, dst: &mut Ids<Self>, src: &[i32]) {
        self.inner().upload_ids(dst, src)
    }
    fn fill(&self, dst: InMut<'_, Self>, value: f32) {
        self.inner().fill(dst, value)
    }
    fn copy(&self, src: In<'_, Self>, dst: InMut<'_, Self>) {
        self.inner().copy(src, dst)
    }
    fn matmul(&self, shape: Gemm, a: In<'_, Self>, b: In<'_, Self>, c: InMut<'_, Self>) {
        self.inner().matmul(shape, a, b, c)
    }
    fn embedding_forward(&self, ids: &Ids<Self>, n: usize, wte: In<'_, Self>, d: usize, out: InMut<'_, Self>) {
        self.inner().embedding_forward(ids, n, wte, d, out)
    }
    fn embedding_backward(&self, ids: &Ids<Self>, n: usize, dout: In<'_, Self>, d: usize, dwte: InMut<'_, Self>) {
        self.inner().embedding_backward(ids, n, dout, d, dwte)
    }
    fn rmsnorm_forward(
        &self,
        x: In<'_, Self>,
        rows: usize,
        dim: usize,
        eps: f32,
        y: InMut<'_, Self>,
        rstd: InMut<'_, Self>,
    ) {
        self.inner().rmsnorm_forward(x, rows, dim, eps, y, rstd)
    }
    fn rmsnorm_backward(
        &self,
        y: In<'_, Self>,
        rstd: In<'_, Self>,
        dy: In<'_, Self>,
        rows: usize,
        dim: usize,
        dx: InMut<'_, Self>,
        accumulate: bool,
    ) {
        self.inner().rmsnorm_backward(y, rstd, dy, rows, dim, dx, accumulate)
    }
    fn rotary(&self, x: InMut<'_, Self>, shape: Heads, table: In<'_, Self>, rotation: Rotation) {
        self.inner().rotary(x, shape, table, rotation)
    }
    fn rotary_qknorm_forward(
        &self,
        x: InMut<'_, Self>,
        shape: Heads,
        table: In<'_, Self>,
        eps: f32,
        y: InMut<'_, Self>,
        rstd: InMut<'_, Self>,
    ) {
        self.inner().rotary_qknorm_forward(x, shape, table, eps, y, rstd)
    }
    fn rotary_qknorm_backward(
        &self,
        y: In<'_, Self>,
        rstd: In<'_, Self>,
        dy: In<'_, Self>,
        shape: Heads,
        table: In<'_, Self>,
        dx: InMut<'_, Self>,
    ) {
        self.inner().rotary_qknorm_backward(y, rstd, dy, shape, table, dx)
    }
    fn attention_forward(
        &self,
        shape: AttnShape,
        q: In<'_, Self>,
        k: In<'_, Self>,
        v: In<'_, Self>,
        out: InMut<'_, Self>,
        lse: InMut<'_, Self>,
    ) {
        self.inner().attention_forward(shape, q, k, v, out, lse)
    }
    fn attention_backward(
        &self,
        shape: AttnShape,
        q: In<'_, Self>,
        k: In<'_, Self>,
        v: In<'_, Self>,
        out: In<'_, Self>,
        lse: In<'_, Self>,
        dout: In<'_, Self>,
        dq: InMut<'_, Self>,
        dk: InMut<'_, Self>,
        dv: InMut<'_, Self>,
    ) {
        self.inner()
            .attention_backward(shape, q, k, v, out, lse, dout, dq, dk, dv)
    }
    fn relu2_forward(&self, u: In<'_, Self>, h: InMut<'_, Self>) {
        self.inner().relu2_forward(u, h)
    }
    fn relu2_backward(&self, u: In<'_, Self>, dh_to_du: InMut<'_, Self>) {
        self.inner().relu2_backward(u, dh_to_du)
    }
    fn add_inplace(&self, x: InMut<'_, Self>, y: In<'_, Self>) {
        self.inner().add_inplace(x, y)
    }
    fn softcap_cross_entropy(
        &self,
        logits: InMut<'_, Self>,
        rows: usize,
        vocab: usize,
        cap: f32,
        targets: &Ids<Self>,
        target_off: usize,
        losses: InMut<'_, Self>,
        grad_scale: Option<f32>,
    ) {
        self.inner()
            .softcap_cross_entropy(logits, rows, vocab, cap, targets, target_off, losses, grad_scale)
    }
    fn softcap(&self, logits: InMut<'_, Self>, cap: f32) {
        self.inner().softcap(logits, cap)
    }
    fn axpby(&self, a: f32, x: In<'_, Self>, b: f32, y: InMut<'_, Self>) {
        self.inner().axpby(a, x, b, y)
    }
    fn scale(&self, x: InMut<'_, Self>, a: f32) {
        self.inner().scale(x, a)
    }
    fn sum_squares(&self, x: In<'_, Self>) -> f64 {
        self.inner().sum_squares(x)
    }
    fn inverse_norm_into(&self, x: In<'_, Self>, eps: f32, inv: InMut<'_, Self>) {
        self.inner().inverse_norm_into(x, eps, inv)
    }
    fn scale_by_scalar(&self, x: In<'_, Self>, s: In<'_, Self>, y: InMut<'_, Self>) {
        self.inner().scale_by_scalar(x, s, y)
    }
    fn muon_momentum(&self, g: In<'_, Self>, buf: InMut<'_, Self>, update: InMut<'_, Self>, mu: f32) {
        self.inner().muon_momentum(g, buf, update, mu)
    }
    fn adamw(&self, p: InMut<'_, Self>, g: In<'_, Self>, m: InMut<'_, Self>, v: InMut<'_, Self>, h: AdamwStep) {
        self.inner().adamw(p, g, m, v, h)
    }
    fn newton_schulz_bf16(
        &self,
        ns: &NsBatch,
        g: In<'_, Self>,
        x: InMut<'_, Self>,
        x_tmp: InMut<'_, Self>,
        gram: InMut<'_, Self>,
        poly: InMut<'_, Self>,
        norms: InMut<'_, Self>,
    ) {
        self.inner().newton_schulz_bf16(ns, g, x, x_tmp, gram, poly, norms)
    }
    fn muon_apply(&self, x: In<'_, Self>, a: f32, p: InMut<'_, Self>, p_bf16: Option<InMut<'_, Self>>) {
        self.inner().muon_apply(x, a, p, p_bf16)
    }
    fn adamw_multi(
        &self,
        p: &mut Buf<Self>,
        g: &Buf<Self>,
        m: &mut Buf<Self>,
        v: &mut Buf<Self>,
        working: Option<&mut Buf<Self>>,
        pieces: &[AdamwPiece],
    ) {
        self.inner().adamw_multi(p, g, m, v, working, pieces)
    }
    fn memory_report(&self) -> Option<MemoryReport> {
        self.inner().memory_report()
    }
    fn synchronize(&self) {
        self.inner().synchronize()
    }
    fn profiler_capture(&self, on: bool) -> Result<()> {
        self.inner().profiler_capture(on)
    }
    fn host_slice(buf: &Buf<Self>) -> Option<&[f32]> {
        Self::Inner::host_slice(buf)
    }
    fn host_slice_mut(buf: &mut Buf<Self>) -> Option<&mut [f32]> {
        Self::Inner::host_slice_mut(buf)
    }
}

/// A wrapper's view as a view of the backend it wraps (the same buffer, offset and length).
pub fn inner_view<D: Delegate>(x: View<'_, D>) -> In<'_, D> {
    View {
        buf: x.buf,
        off: x.off,
        len: x.len,
    }
}

/// A wrapper's writable view as one of the backend it wraps.
pub fn inner_view_mut<D: Delegate>(x: ViewMut<'_, D>) -> InMut<'_, D> {
    ViewMut {
        buf: x.buf,
        off: x.off,
        len: x.len,
    }
}

/// A view of the wrapped backend as the wrapper's (for an override that calls the wrapper's own ops).
pub fn outer_view<D: Delegate>(x: In<'_, D>) -> View<'_, D> {
    View {
        buf: x.buf,
        off: x.off,
        len: x.len,
    }
}

/// A writable view of the wrapped backend as the wrapper's.
pub fn outer_view_mut<D: Delegate>(x: InMut<'_, D>) -> ViewMut<'_, D> {
    ViewMut {
        buf: x.buf,
        off: x.off,
        len: x.len,
    }
}

use inner_view as iv;
use inner_view_mut as im;

/// Every `Backend` method of a wrapper is its `Delegate` method (the wrapper's override, or the forward).
impl<D: Delegate> Backend for D {
    type Buf = Buf<D>;
    type Ids = Ids<D>;

    fn alloc(&self, len: usize) -> Self::Buf {
        Delegate::alloc(self, len)
    }
    fn alloc_as(&self, len: usize, storage: Storage) -> Self::Buf {
        Delegate::alloc_as(self, len, storage)
    }
    fn try_alloc_as(&self, len: usize, storage: Storage) -> Result<Self::Buf> {
        Delegate::try_alloc_as(self, len, storage)
    }
    fn storage(buf: &Self::Buf) -> Storage {
        <D as Delegate>::storage(buf)
    }
    fn alloc_ids(&self, len: usize) -> Self::Ids {
        Delegate::alloc_ids(self, len)
    }
    fn buf_len(buf: &Self::Buf) -> usize {
        <D as Delegate>::buf_len(buf)
    }
    fn upload(&self, dst: ViewMut<'_, Self>, src: &[f32]) {
        Delegate::upload(self, im(dst), src)
    }
    fn download(&self, src: View<'_, Self>, dst: &mut [f32]) {
        Delegate::download(self, iv(src), dst)
    }
    fn upload_ids(&self, dst: &mut Self::Ids, src: &[i32]) {
        Delegate::upload_ids(self, dst, src)
    }
    fn fill(&self, dst: ViewMut<'_, Self>, value: f32) {
        Delegate::fill(self, im(dst), value)
    }
    fn copy(&self, src: View<'_, Self>, dst: ViewMut<'_, Self>) {
        Delegate::copy(self, iv(src), im(dst))
    }
    fn matmul(&self, shape: Gemm, a: View<'_, Self>, b: View<'_, Self>, c: ViewMut<'_, Self>) {
        Delegate::matmul(self, shape, iv(a), iv(b), im(c))
    }
    fn embedding_forward(&self, ids: &Self::Ids, n: usize, wte: View<'_, Self>, d: usize, out: ViewMut<'_, Self>) {
        Delegate::embedding_forward(self, ids, n, iv(wte), d, im(out))
    }
    fn embedding_backward(&self, ids: &Self::Ids, n: usize, dout: View<'_, Self>, d: usize, dwte: ViewMut<'_, Self>) {
        Delegate::embedding_backward(self, ids, n, iv(dout), d, im(dwte))
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
        Delegate::rmsnorm_forward(self, iv(x), rows, dim, eps, im(y), im(rstd))
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
        Delegate::rmsnorm_backward(self, iv(y), iv(rstd), iv(dy), rows, dim, im(dx), accumulate)
    }
    fn rotary(&self, x: ViewMut<'_, Self>, shape: Heads, table: View<'_, Self>, rotation: Rotation) {
        Delegate::rotary(self, im(x), shape, iv(table), rotation)
    }
    fn rotary_qknorm_forward(
        &self,
        x: ViewMut<'_, Self>,
        shape: Heads,
        table: View<'_, Self>,
        eps: f32,
        y: ViewMut<'_, Self>,
        rstd: ViewMut<'_, Self>,
    ) {
        Delegate::rotary_qknorm_forward(self, im(x), shape, iv(table), eps, im(y), im(rstd))
    }
    fn rotary_qknorm_backward(
        &self,
        y: View<'_, Self>,
        rstd: View<'_, Self>,
        dy: View<'_, Self>,
        shape: Heads,
        table: View<'_, Self>,
        dx: ViewMut<'_, Self>,
    ) {
        Delegate::rotary_qknorm_backward(self, iv(y), iv(rstd), iv(dy), shape, iv(table), im(dx))
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
        Delegate::attention_forward(self, shape, iv(q), iv(k), iv(v), im(out), im(lse))
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
        Delegate::attention_backward(
            self,
            shape,
            iv(q),
            iv(k),
            iv(v),
            iv(out),
            iv(lse),
            iv(dout),
            im(dq),
            im(dk),
            im(dv),
        )
    }
    fn relu2_forward(&self, u: View<'_, Self>, h: ViewMut<'_, Self>) {
        Delegate::relu2_forward(self, iv(u), im(h))
    }
    fn relu2_backward(&self, u: View<'_, Self>, dh_to_du: ViewMut<'_, Self>) {
        Delegate::relu2_backward(self, iv(u), im(dh_to_du))
    }
    fn add_inplace(&self, x: ViewMut<'_, Self>, y: View<'_, Self>) {
        Delegate::add_inplace(self, im(x), iv(y))
    }
    fn softcap_cross_entropy(
        &self,
        logits: ViewMut<'_, Self>,
        rows: usize,
        vocab: usize,
        cap: f32,
        targets: &Self::Ids,
        target_off: usize,
        losses: ViewMut<'_, Self>,
        grad_scale: Option<f32>,
    ) {
        Delegate::softcap_cross_entropy(
            self,
            im(logits),
            rows,
            vocab,
            cap,
            targets,
            target_off,
            im(losses),
            grad_scale,
        )
    }
    fn softcap(&self, logits: ViewMut<'_, Self>, cap: f32) {
        Delegate::softcap(self, im(logits), cap)
    }
    fn axpby(&self, a: f32, x: View<'_, Self>, b: f32, y: ViewMut<'_, Self>) {
        Delegate::axpby(self, a, iv(x), b, im(y))
    }
    fn scale(&self, x: ViewMut<'_, Self>, a: f32) {
        Delegate::scale(self, im(x), a)
    }
    fn sum_squares(&self, x: View<'_, Self>) -> f64 {
        Delegate::sum_squares(self, iv(x))
    }
    fn inverse_norm_into(&self, x: View<'_, Self>, eps: f32, inv: ViewMut<'_, Self>) {
        Delegate::inverse_norm_into(self, iv(x), eps, im(inv))
    }
    fn scale_by_scalar(&self, x: View<'_, Self>, s: View<'_, Self>, y: ViewMut<'_, Self>) {
        Delegate::scale_by_scalar(self, iv(x), iv(s), im(y))
    }
    fn muon_momentum(&self, g: View<'_, Self>, buf: ViewMut<'_, Self>, update: ViewMut<'_, Self>, mu: f32) {
        Delegate::muon_momentum(self, iv(g), im(buf), im(update), mu)
    }
    fn adamw(&self, p: ViewMut<'_, Self>, g: View<'_, Self>, m: ViewMut<'_, Self>, v: ViewMut<'_, Self>, h: AdamwStep) {
        Delegate::adamw(self, im(p), iv(g), im(m), im(v), h)
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
        Delegate::newton_schulz_bf16(self, ns, iv(g), im(x), im(x_tmp), im(gram), im(poly), im(norms))
    }
    fn muon_apply(&self, x: View<'_, Self>, a: f32, p: ViewMut<'_, Self>, p_bf16: Option<ViewMut<'_, Self>>) {
        Delegate::muon_apply(self, iv(x), a, im(p), p_bf16.map(im))
    }
    fn adamw_multi(
        &self,
        p: &mut Self::Buf,
        g: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        working: Option<&mut Self::Buf>,
        pieces: &[AdamwPiece],
    ) {
        Delegate::adamw_multi(self, p, g, m, v, working, pieces)
    }
    fn memory_report(&self) -> Option<MemoryReport> {
        Delegate::memory_report(self)
    }
    fn synchronize(&self) {
        Delegate::synchronize(self)
    }
    fn profiler_capture(&self, on: bool) -> Result<()> {
        Delegate::profiler_capture(self, on)
    }
    fn host_slice(buf: &Self::Buf) -> Option<&[f32]> {
        <D as Delegate>::host_slice(buf)
    }
    fn host_slice_mut(buf: &mut Self::Buf) -> Option<&mut [f32]> {
        <D as Delegate>::host_slice_mut(buf)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    /// The names of the `fn`s declared at the top level of the block that starts at `header` in `src` (up
    /// to the first line that is exactly "}").
    fn fns_in_block(src: &str, header: &str) -> BTreeSet<String> {
        let start = src.find(header).unwrap_or_else(|| panic!("{header} not found"));
        let body = &src[start..];
        let end = body.find("\n}\n").expect("the block's closing brace");
        body[..end]
            .lines()
            .filter_map(|l| l.strip_prefix("    fn "))
            .map(|l| l.split(['(', '<']).next().unwrap().trim().to_string())
            .collect()
    }

    /// The trait's methods, the wrapper trait's and the blanket impl's are the same set: a method added to
    /// `Backend` must be forwarded here, or a wrapper silently runs the trait's default body for it.
    #[test]
    fn every_backend_method_is_forwarded() {
        let backend = fns_in_block(include_str!("mod.rs"), "pub trait Backend {");
        let this = include_str!("delegate.rs");
        let mut delegate = fns_in_block(this, "pub trait Delegate: Sized {");
        assert!(delegate.remove("inner"));
        let forwarded = fns_in_block(this, "impl<D: Delegate> Backend for D {");
        assert!(backend.len() >= 40, "parsed only {} Backend methods", backend.len());
        assert_eq!(backend, delegate, "Delegate's methods are not Backend's");
        assert_eq!(
            backend, forwarded,
            "the blanket impl does not forward every Backend method"
        );
    }
}
