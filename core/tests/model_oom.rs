//! A model that does not fit is an error, not a panic: `Gpt::with_precision` allocates every buffer through
//! `Backend::try_alloc_as` and hands the backend's out-of-memory report back unchanged.
//!
//! `Budgeted` is the CPU backend with a byte budget: an allocation that would pass it fails with a report
//! (the role of the CUDA caching allocator's OOM report), and its plain `alloc`/`alloc_as` panic past the
//! budget, as the CUDA backend's do. Each budget of the sweep makes a different allocation of the model's
//! construction the first to fail, so an allocation made with `alloc_as` instead of `try_alloc_as` anywhere
//! in construction panics here.

use nc_core::backend::cpu::{CpuBackend, CpuBuf, CpuIds};
use nc_core::backend::{AttnShape, Backend, Storage, View, ViewMut};
use nc_core::error::{NcError, Result};
use nc_core::model::{Gpt, Recompute};
use nc_core::plan::Precision;
use nc_core::ModelConfig;
use std::sync::Mutex;

/// Bytes used and the sizes of every allocation so far (what the sweep replays).
#[derive(Default)]
struct Ledger {
    used: usize,
    sizes: Vec<usize>,
}

struct Budgeted {
    inner: CpuBackend,
    budget: usize,
    ledger: Mutex<Ledger>,
}

impl Budgeted {
    fn new(budget: usize) -> Self {
        Budgeted {
            inner: CpuBackend::new(),
            budget,
            ledger: Mutex::new(Ledger::default()),
        }
    }
    /// Counts `len` elements of `storage` (at least one, as the device allocator does) against the budget.
    fn charge(&self, len: usize, storage: Storage) -> Result<()> {
        let bytes = len.max(1) * storage.bytes_per_element();
        let mut l = self.ledger.lock().unwrap();
        if l.used + bytes > self.budget {
            return Err(NcError::new(format!(
                "budget report: out of memory at allocation #{}: tried to allocate {bytes} bytes with {} of {} \
                 in use",
                l.sizes.len(),
                l.used,
                self.budget
            )));
        }
        l.used += bytes;
        l.sizes.push(bytes);
        Ok(())
    }
}

fn v<'a>(x: View<'a, Budgeted>) -> View<'a, CpuBackend> {
    View {
        buf: x.buf,
        off: x.off,
        len: x.len,
    }
}

fn vm<'a>(x: ViewMut<'a, Budgeted>) -> ViewMut<'a, CpuBackend> {
    ViewMut {
        buf: x.buf,
        off: x.off,
        len: x.len,
    }
}

impl Backend for Budgeted {
    type Buf = CpuBuf;
    type Ids = CpuIds;

    fn alloc(&self, len: usize) -> CpuBuf {
        self.alloc_as(len, Storage::F32)
    }
    fn alloc_as(&self, len: usize, storage: Storage) -> CpuBuf {
        self.try_alloc_as(len, storage).unwrap_or_else(|e| panic!("{e}"))
    }
    fn try_alloc_as(&self, len: usize, storage: Storage) -> Result<CpuBuf> {
        self.charge(len, storage)?;
        Ok(self.inner.alloc_as(len, storage))
    }
    fn storage(buf: &CpuBuf) -> Storage {
        CpuBackend::storage(buf)
    }
    fn alloc_ids(&self, len: usize) -> CpuIds {
        self.inner.alloc_ids(len)
    }
    fn buf_len(buf: &CpuBuf) -> usize {
        CpuBackend::buf_len(buf)
    }
    fn upload(&self, dst: ViewMut<'_, Self>, src: &[f32]) {
        self.inner.upload(vm(dst), src)
    }
    fn download(&self, src: View<'_, Self>, dst: &mut [f32]) {
        self.inner.download(v(src), dst)
    }
    fn upload_ids(&self, dst: &mut CpuIds, src: &[i32]) {
        self.inner.upload_ids(dst, src)
    }
    fn fill(&self, dst: ViewMut<'_, Self>, value: f32) {
        self.inner.fill(vm(dst), value)
    }
    fn copy(&self, src: View<'_, Self>, dst: ViewMut<'_, Self>) {
        self.inner.copy(v(src), vm(dst))
    }
    #[allow(clippy::too_many_arguments)]
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
        self.inner.matmul(m, n, k, v(a), a_t, v(b), b_t, vm(c), accumulate)
    }
    fn embedding_forward(&self, ids: &CpuIds, n: usize, wte: View<'_, Self>, d: usize, out: ViewMut<'_, Self>) {
        self.inner.embedding_forward(ids, n, v(wte), d, vm(out))
    }
    fn embedding_backward(&self, ids: &CpuIds, n: usize, dout: View<'_, Self>, d: usize, dwte: ViewMut<'_, Self>) {
        self.inner.embedding_backward(ids, n, v(dout), d, vm(dwte))
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
        self.inner.rmsnorm_forward(v(x), rows, dim, eps, vm(y), vm(rstd))
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
        self.inner
            .rmsnorm_backward(v(y), v(rstd), v(dy), rows, dim, vm(dx), accumulate)
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
        self.inner
            .rotary_forward(vm(x), batch, t, heads, head_dim, pos0, v(table))
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
        self.inner
            .rotary_backward(vm(dx), batch, t, heads, head_dim, pos0, v(table))
    }
    fn rotary_qknorm_forward(
        &self,
        x: ViewMut<'_, Self>,
        batch: usize,
        t: usize,
        heads: usize,
        head_dim: usize,
        pos0: usize,
        table: View<'_, Self>,
        eps: f32,
        y: ViewMut<'_, Self>,
        rstd: ViewMut<'_, Self>,
    ) {
        self.inner
            .rotary_qknorm_forward(vm(x), batch, t, heads, head_dim, pos0, v(table), eps, vm(y), vm(rstd))
    }
    fn rotary_qknorm_backward(
        &self,
        y: View<'_, Self>,
        rstd: View<'_, Self>,
        dy: View<'_, Self>,
        batch: usize,
        t: usize,
        heads: usize,
        head_dim: usize,
        pos0: usize,
        table: View<'_, Self>,
        dx: ViewMut<'_, Self>,
    ) {
        self.inner
            .rotary_qknorm_backward(v(y), v(rstd), v(dy), batch, t, heads, head_dim, pos0, v(table), vm(dx))
    }
    fn attention_forward(
        &self,
        shape: AttnShape,
        q: View<'_, Self>,
        k: View<'_, Self>,
        val: View<'_, Self>,
        out: ViewMut<'_, Self>,
        lse: ViewMut<'_, Self>,
    ) {
        self.inner
            .attention_forward(shape, v(q), v(k), v(val), vm(out), vm(lse))
    }
    fn attention_backward(
        &self,
        shape: AttnShape,
        q: View<'_, Self>,
        k: View<'_, Self>,
        val: View<'_, Self>,
        out: View<'_, Self>,
        lse: View<'_, Self>,
        dout: View<'_, Self>,
        dq: ViewMut<'_, Self>,
        dk: ViewMut<'_, Self>,
        dv: ViewMut<'_, Self>,
    ) {
        self.inner.attention_backward(
            shape,
            v(q),
            v(k),
            v(val),
            v(out),
            v(lse),
            v(dout),
            vm(dq),
            vm(dk),
            vm(dv),
        )
    }
    fn relu2_forward(&self, u: View<'_, Self>, h: ViewMut<'_, Self>) {
        self.inner.relu2_forward(v(u), vm(h))
    }
    fn relu2_backward(&self, u: View<'_, Self>, dh_to_du: ViewMut<'_, Self>) {
        self.inner.relu2_backward(v(u), vm(dh_to_du))
    }
    fn add_inplace(&self, x: ViewMut<'_, Self>, y: View<'_, Self>) {
        self.inner.add_inplace(vm(x), v(y))
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
        self.inner.softcap_cross_entropy(
            vm(logits),
            rows,
            vocab,
            cap,
            targets,
            target_off,
            vm(losses),
            grad_scale,
        )
    }
    fn softcap(&self, logits: ViewMut<'_, Self>, cap: f32) {
        self.inner.softcap(vm(logits), cap)
    }
}

fn cfg() -> ModelConfig {
    // 2 layers, d 64, 4 heads of 16 (2 kv heads), vocab 97, T 16
    ModelConfig::new(2, 64, 4, 2, 16, 97, 16).unwrap()
}

/// Sizes of every allocation of a model's construction, from a run with room to spare.
fn allocation_sizes(precision: Precision, policy: Recompute) -> Vec<usize> {
    let be = Budgeted::new(usize::MAX);
    let m = Gpt::with_precision(be, cfg(), 2, 16, policy, precision).expect("fits");
    let sizes = m.be.ledger.lock().unwrap().sizes.clone();
    sizes
}

#[test]
fn every_construction_allocation_past_the_budget_is_an_error_with_the_report() {
    for precision in [Precision::Bf16, Precision::Fp32] {
        for policy in [Recompute::None, Recompute::Full] {
            let sizes = allocation_sizes(precision, policy);
            assert!(sizes.len() > 30, "{} allocations", sizes.len());
            let mut used = 0;
            for (k, &bytes) in sizes.iter().enumerate() {
                // Room for allocations 0..k exactly: #k is the first that does not fit.
                let be = Budgeted::new(used);
                let err = match Gpt::with_precision(be, cfg(), 2, 16, policy, precision) {
                    Ok(_) => panic!("{precision:?} {policy:?}: a budget of {used} bytes built the model"),
                    Err(e) => e.to_string(),
                };
                let want = format!("budget report: out of memory at allocation #{k}: tried to allocate {bytes} bytes");
                assert!(err.contains(&want), "{precision:?} {policy:?}: {err}");
                used += bytes;
            }
            // And with exactly the total it fits.
            let be = Budgeted::new(used);
            assert!(Gpt::with_precision(be, cfg(), 2, 16, policy, precision).is_ok());
        }
    }
}
