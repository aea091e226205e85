//! A test backend that computes exactly as the CPU backend but, like a GPU backend, does not expose its
//! buffers as host slices. It lets CI, which has no GPU, exercise every path the training loop takes for a
//! device backend (the optimizer on the backend's ops, the trait's default optimizer ops, checkpoints
//! through download and upload) and compare it with the CPU path.

use super::cpu::{CpuBackend, CpuBuf, CpuIds};
use super::{AttnShape, Backend, Storage, View, ViewMut};

/// The CPU backend with its host access hidden (`host_slice` keeps the trait's default, None). The second
/// field, when set, records the shape of every GEMM and cross-entropy launch (tests that pin launch shapes).
#[derive(Debug, Clone, Default)]
pub struct DeviceLikeCpu(pub CpuBackend, pub Option<LaunchLog>);

/// A shared record of launches, in call order.
pub type LaunchLog = std::sync::Arc<std::sync::Mutex<Vec<Launch>>>;

/// One recorded launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launch {
    /// C (m x n) (+)= A (m x k) B (k x n).
    Matmul {
        m: usize,
        n: usize,
        k: usize,
        accumulate: bool,
    },
    /// One `softcap_cross_entropy` over `rows` rows of `vocab` logits.
    CrossEntropy { rows: usize, vocab: usize },
}

impl DeviceLikeCpu {
    /// A DeviceLikeCpu that records its launches into the returned log.
    pub fn recording() -> (Self, LaunchLog) {
        let log = LaunchLog::default();
        (DeviceLikeCpu(CpuBackend::new(), Some(log.clone())), log)
    }
    fn record(&self, launch: Launch) {
        if let Some(log) = &self.1 {
            log.lock().expect("launch log").push(launch);
        }
    }
}

fn v<'a>(x: View<'a, DeviceLikeCpu>) -> View<'a, CpuBackend> {
    View {
        buf: x.buf,
        off: x.off,
        len: x.len,
    }
}

fn vm<'a>(x: ViewMut<'a, DeviceLikeCpu>) -> ViewMut<'a, CpuBackend> {
    ViewMut {
        buf: x.buf,
        off: x.off,
        len: x.len,
    }
}

impl Backend for DeviceLikeCpu {
    type Buf = CpuBuf;
    type Ids = CpuIds;

    fn alloc(&self, len: usize) -> CpuBuf {
        self.0.alloc(len)
    }
    fn alloc_as(&self, len: usize, storage: Storage) -> CpuBuf {
        self.0.alloc_as(len, storage)
    }
    fn try_alloc_as(&self, len: usize, storage: Storage) -> crate::error::Result<CpuBuf> {
        self.0.try_alloc_as(len, storage)
    }
    fn storage(buf: &CpuBuf) -> Storage {
        CpuBackend::storage(buf)
    }
    fn alloc_ids(&self, len: usize) -> CpuIds {
        self.0.alloc_ids(len)
    }
    fn buf_len(buf: &CpuBuf) -> usize {
        CpuBackend::buf_len(buf)
    }
    fn upload(&self, dst: ViewMut<'_, Self>, src: &[f32]) {
        self.0.upload(vm(dst), src)
    }
    fn download(&self, src: View<'_, Self>, dst: &mut [f32]) {
        self.0.download(v(src), dst)
    }
    fn upload_ids(&self, dst: &mut CpuIds, src: &[i32]) {
        self.0.upload_ids(dst, src)
    }
    fn fill(&self, dst: ViewMut<'_, Self>, value: f32) {
        self.0.fill(vm(dst), value)
    }
    fn copy(&self, src: View<'_, Self>, dst: ViewMut<'_, Self>) {
        self.0.copy(v(src), vm(dst))
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
        self.record(Launch::Matmul { m, n, k, accumulate });
        self.0.matmul(m, n, k, v(a), a_t, v(b), b_t, vm(c), accumulate)
    }
    fn embedding_forward(&self, ids: &CpuIds, n: usize, wte: View<'_, Self>, d: usize, out: ViewMut<'_, Self>) {
        self.0.embedding_forward(ids, n, v(wte), d, vm(out))
    }
    fn embedding_backward(&self, ids: &CpuIds, n: usize, dout: View<'_, Self>, d: usize, dwte: ViewMut<'_, Self>) {
        self.0.embedding_backward(ids, n, v(dout), d, vm(dwte))
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
        self.0.rmsnorm_forward(v(x), rows, dim, eps, vm(y), vm(rstd))
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
        self.0
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
        self.0.rotary_forward(vm(x), batch, t, heads, head_dim, pos0, v(table))
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
        self.0
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
        self.0
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
        self.0
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
        self.0.attention_forward(shape, v(q), v(k), v(val), vm(out), vm(lse))
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
        self.0.attention_backward(
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
        self.0.relu2_forward(v(u), vm(h))
    }
    fn relu2_backward(&self, u: View<'_, Self>, dh_to_du: ViewMut<'_, Self>) {
        self.0.relu2_backward(v(u), vm(dh_to_du))
    }
    fn add_inplace(&self, x: ViewMut<'_, Self>, y: View<'_, Self>) {
        self.0.add_inplace(vm(x), v(y))
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
        self.record(Launch::CrossEntropy { rows, vocab });
        self.0.softcap_cross_entropy(
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
        self.0.softcap(vm(logits), cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::AdamwStep;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 16777216.0) - 0.5)
            .collect()
    }

    fn buf<B: Backend>(be: &B, xs: &[f32]) -> B::Buf {
        let mut b = be.alloc(xs.len());
        be.upload(ViewMut::all(&mut b), xs);
        b
    }

    fn host<B: Backend>(be: &B, b: &B::Buf) -> Vec<f32> {
        let mut out = vec![0.0; B::buf_len(b)];
        be.download(View::all(b), &mut out);
        out
    }

    /// Runs the optimizer ops on a sub-view (offset 3) of each buffer, so the defaults' view handling is
    /// checked too; returns every buffer afterwards and the sum of squares.
    fn run_ops<B: Backend>(be: &B) -> (Vec<Vec<f32>>, f64) {
        let n = 37;
        let (mut p, g, mut m, mut v) = (
            buf(be, &data(n + 5, 1)),
            buf(be, &data(n + 5, 2)),
            buf(be, &data(n + 5, 3)),
            buf(be, &data(n + 5, 4)),
        );
        let mut u = buf(be, &vec![f32::NAN; n + 5]);
        // v must be non-negative for AdamW
        let vs: Vec<f32> = data(n + 5, 4).iter().map(|x| x * x).collect();
        be.upload(ViewMut::all(&mut v), &vs);
        be.muon_momentum(
            View::at(&g, 3, n),
            ViewMut::at(&mut m, 3, n),
            ViewMut::at(&mut u, 3, n),
            0.9,
        );
        be.axpby(0.5, View::at(&g, 3, n), -2.0, ViewMut::at(&mut p, 3, n));
        be.axpby(3.0, View::at(&g, 3, n), 0.0, ViewMut::at(&mut u, 0, n));
        be.scale(ViewMut::at(&mut p, 1, n), 0.25);
        let h = AdamwStep {
            beta1: 0.8,
            beta2: 0.95,
            eps: 1e-10,
            decay: 0.999,
            step: 0.01,
            inv_bc2: 20.0,
        };
        be.adamw(
            ViewMut::at(&mut p, 3, n),
            View::at(&g, 3, n),
            ViewMut::at(&mut m, 3, n),
            ViewMut::at(&mut v, 3, n),
            h,
        );
        let ss = be.sum_squares(View::at(&p, 2, n));
        (
            vec![host(be, &p), host(be, &g), host(be, &m), host(be, &v), host(be, &u)],
            ss,
        )
    }

    /// The trait's default optimizer ops (download, compute, upload) equal the CPU's in-place ones bit for bit.
    #[test]
    fn default_optimizer_ops_equal_the_cpus() {
        let (cpu, cpu_ss) = run_ops(&CpuBackend::new());
        let (dev, dev_ss) = run_ops(&DeviceLikeCpu::default());
        assert_eq!(cpu_ss.to_bits(), dev_ss.to_bits());
        for (i, (a, b)) in cpu.iter().zip(&dev).enumerate() {
            let (a, b): (Vec<u32>, Vec<u32>) = (
                a.iter().map(|x| x.to_bits()).collect(),
                b.iter().map(|x| x.to_bits()).collect(),
            );
            assert_eq!(a, b, "buffer {i} differs");
        }
        // and the ops did something: p changed from its initial values
        assert_ne!(cpu[0], data(42, 1));
    }
}
