//! The `Backend` trait: the operations the GPT is written against. The CPU and CUDA backends implement it.
//!
//! A backend owns memory and kernels, nothing else. Buffers are backend handles (`Backend::Buf`), never
//! host vectors, so a CUDA backend can keep them on the device in bf16 while the model code stays the same.
//! Every op names its shapes explicitly; tensors are row-major and a "view" is a (buffer, offset, len)
//! triple so one contiguous buffer (all parameters, all grads) can hold many named tensors.
//!
//! Conventions every implementation follows:
//! - Logical element type is f32; a buffer's storage (`Storage`) may be bf16. An op writing into a Bf16
//!   buffer computes in f32 and rounds to bf16 (nearest even) on store; accumulating into one stores
//!   round_bf16(old + new) with the sum in f32; reading one yields the exact widened value. GEMMs accumulate
//!   in f32 whatever their inputs' storage. `upload` into a Bf16 buffer and `copy` from F32 to Bf16 round.
//! - An op writes (`=`) its outputs unless a flag says it accumulates (`+=`); parameter grads are always
//!   produced with accumulate = true (gradient accumulation over micro-steps).
//! - Token ids live in `Backend::Ids` buffers (i32; -1 marks an ignored target).

pub mod bf16;
pub mod cpu;
pub mod cuda;
pub mod delegate;
pub mod device_like;
pub mod ns_bf16;
pub mod optim_ops;
pub mod shapes;

pub use ns_bf16::NsBatch;
pub use optim_ops::AdamwStep;
pub use shapes::{AttnShape, Gemm, Heads};

/// One tensor of a multi-tensor AdamW (`Backend::adamw_multi`): where it sits in the parameter buffer (its
/// gradient sits at the same offset of the gradient buffer), in the moment buffers (m and v share offsets)
/// and in the bf16 working copy, and its step's scalars.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamwPiece {
    pub p_off: usize,
    pub m_off: usize,
    /// Offset in the working copy (used when one is given).
    pub working_off: usize,
    pub len: usize,
    pub step: AdamwStep,
}

/// How a buffer stores its (logically f32) elements. Views, lengths and offsets are in elements either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Storage {
    /// 4 bytes per element, values exactly as computed.
    #[default]
    F32,
    /// 2 bytes per element: every value stored is rounded to bf16 (see `bf16::round_bf16`).
    Bf16,
}

impl Storage {
    /// Bytes one element takes on a device that stores it natively.
    pub fn bytes_per_element(self) -> usize {
        match self {
            Storage::F32 => 4,
            Storage::Bf16 => 2,
        }
    }
}

/// A read-only view of `len` elements starting at `off` in a backend buffer.
pub struct View<'a, B: Backend + ?Sized> {
    pub buf: &'a B::Buf,
    pub off: usize,
    pub len: usize,
}

/// A writable view of `len` elements starting at `off` in a backend buffer.
pub struct ViewMut<'a, B: Backend + ?Sized> {
    pub buf: &'a mut B::Buf,
    pub off: usize,
    pub len: usize,
}

impl<B: Backend + ?Sized> Clone for View<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend + ?Sized> Copy for View<'_, B> {}

impl<'a, B: Backend + ?Sized> View<'a, B> {
    /// The whole buffer.
    pub fn all(buf: &'a B::Buf) -> Self {
        View {
            buf,
            off: 0,
            len: B::buf_len(buf),
        }
    }
    /// `len` elements starting at `off` of the whole buffer.
    pub fn at(buf: &'a B::Buf, off: usize, len: usize) -> Self {
        assert!(
            off + len <= B::buf_len(buf),
            "view {off}+{len} past buffer end {}",
            B::buf_len(buf)
        );
        View { buf, off, len }
    }
    /// A sub-view (relative to this view).
    pub fn sub(&self, off: usize, len: usize) -> Self {
        assert!(off + len <= self.len, "sub-view {off}+{len} past view end {}", self.len);
        View {
            buf: self.buf,
            off: self.off + off,
            len,
        }
    }
}

impl<'a, B: Backend + ?Sized> ViewMut<'a, B> {
    pub fn all(buf: &'a mut B::Buf) -> Self {
        let len = B::buf_len(buf);
        ViewMut { buf, off: 0, len }
    }
    pub fn at(buf: &'a mut B::Buf, off: usize, len: usize) -> Self {
        assert!(
            off + len <= B::buf_len(buf),
            "view {off}+{len} past buffer end {}",
            B::buf_len(buf)
        );
        ViewMut { buf, off, len }
    }
    /// A shorter-lived writable sub-view (relative to this view).
    pub fn sub(&mut self, off: usize, len: usize) -> ViewMut<'_, B> {
        assert!(off + len <= self.len, "sub-view {off}+{len} past view end {}", self.len);
        ViewMut {
            buf: &mut *self.buf,
            off: self.off + off,
            len,
        }
    }
    /// Re-borrow as read-only.
    pub fn view(&self) -> View<'_, B> {
        View {
            buf: &*self.buf,
            off: self.off,
            len: self.len,
        }
    }
}

/// A device allocator's sizes at the end of a run (`Backend::memory_report`): what `nc-train` prints and
/// writes to metrics.jsonl. Peaks are since the backend started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryReport {
    /// The device, as the allocator names it ("cuda:0").
    pub device: String,
    /// The most bytes held from the driver at once (what the device had to have free).
    pub peak_reserved_bytes: u64,
    /// The most bytes in live buffers at once.
    pub peak_allocated_bytes: u64,
    pub reserved_bytes: u64,
    pub allocated_bytes: u64,
    /// The allocator's few-line summary, for logs.
    pub summary: String,
}

/// Which way `Backend::rotary` turns: by +angle (the forward) or by -angle (its transpose, the backward).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    Forward,
    Inverse,
}

/// The operations of nanochat's GPT. Shapes are in elements; `rows x dim` means `rows` contiguous rows.
pub trait Backend {
    /// A buffer of f32 values (logically); the backend decides the storage.
    type Buf;
    /// A buffer of i32 token ids / targets.
    type Ids;

    /// A zero-filled f32 buffer of `len` elements. Called at construction time only, never inside a step.
    fn alloc(&self, len: usize) -> Self::Buf;
    /// A zero-filled buffer of `len` elements stored as `storage`. A backend without narrow storage keeps
    /// f32 (this default), and `storage` then reports F32: callers that care (the plan check) ask it.
    fn alloc_as(&self, len: usize, storage: Storage) -> Self::Buf {
        let _ = storage;
        self.alloc(len)
    }
    /// `alloc_as`, or an error carrying the allocator's out-of-memory report where memory can run out (a
    /// device). Model construction allocates through this, so a model that does not fit is an `NcError`, not
    /// a panic. The default cannot fail (host memory: an allocation failure aborts the process anyway).
    fn try_alloc_as(&self, len: usize, storage: Storage) -> crate::error::Result<Self::Buf> {
        Ok(self.alloc_as(len, storage))
    }
    /// How `buf` stores its elements.
    fn storage(buf: &Self::Buf) -> Storage {
        let _ = buf;
        Storage::F32
    }
    fn alloc_ids(&self, len: usize) -> Self::Ids;
    fn buf_len(buf: &Self::Buf) -> usize;

    /// Host -> backend copy into a view (`src.len() == dst.len`).
    fn upload(&self, dst: ViewMut<'_, Self>, src: &[f32]);
    /// Backend -> host copy from a view (`dst.len() == src.len`).
    fn download(&self, src: View<'_, Self>, dst: &mut [f32]);
    /// Host -> backend copy of ids into the first `src.len()` entries.
    fn upload_ids(&self, dst: &mut Self::Ids, src: &[i32]);
    /// Fill a view with a constant (used to zero grads).
    fn fill(&self, dst: ViewMut<'_, Self>, value: f32);
    /// dst = src (same length).
    fn copy(&self, src: View<'_, Self>, dst: ViewMut<'_, Self>);

    /// C = op(A) op(B) [+ C] in the shape `shape` says (see `Gemm`), row-major; the views hold at least
    /// `shape.a_len()`, `b_len()` and `c_len()` values. A linear layer y = x W^T with W (out, in) is
    /// `matmul(Gemm::nt(N, out, in), x, W, y)`.
    fn matmul(&self, shape: Gemm, a: View<'_, Self>, b: View<'_, Self>, c: ViewMut<'_, Self>);

    /// out (N x d) = wte[ids] with wte (V x d). Ids are assumed valid (< V) (the model checks them).
    fn embedding_forward(&self, ids: &Self::Ids, n: usize, wte: View<'_, Self>, d: usize, out: ViewMut<'_, Self>);
    /// dwte[ids[i]] += dout[i] for every row i (scatter-add; repeated ids add up).
    fn embedding_backward(&self, ids: &Self::Ids, n: usize, dout: View<'_, Self>, d: usize, dwte: ViewMut<'_, Self>);

    /// Weightless rmsnorm over rows: y = x / sqrt(mean(x^2) + eps); saves rstd = 1/sqrt(mean(x^2) + eps).
    fn rmsnorm_forward(
        &self,
        x: View<'_, Self>,
        rows: usize,
        dim: usize,
        eps: f32,
        y: ViewMut<'_, Self>,
        rstd: ViewMut<'_, Self>,
    );
    /// dx = rstd * (dy - y * mean(dy * y)) from the saved output y and rstd; written, or added when
    /// `accumulate` (the residual stream adds the norm's grad into the grad flowing past it).
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &self,
        y: View<'_, Self>,
        rstd: View<'_, Self>,
        dy: View<'_, Self>,
        rows: usize,
        dim: usize,
        dx: ViewMut<'_, Self>,
        accumulate: bool,
    );

    /// In-place rotary embedding, half-split layout, on x (B, T, heads, D) (see `Heads`): for row t (absolute
    /// position pos0 + t), x1 = x[..D/2], x2 = x[D/2..]: (x1 cos + x2 sin, -x1 sin + x2 cos). `table` holds cos then
    /// sin, each (max_pos, D/2), row p = angle(p, j). `Rotation::Inverse` rotates by -angle: rotary is
    /// orthogonal, so that is its transpose, the backward of a gradient.
    fn rotary(&self, x: ViewMut<'_, Self>, shape: Heads, table: View<'_, Self>, rotation: Rotation);

    /// Rotary then QK-norm, fused: y = rmsnorm(rotary(x)) over each head (`shape.rows()` rows of
    /// `head_dim`), rstd per (row, head). x (B, T, heads, D) is the projection's output and serves as scratch:
    /// its contents afterwards are unspecified (the default rotates it in place). The rotated value is an
    /// intermediate: a backend with narrow storage keeps it in f32 and rounds only y (the CUDA kernel and the
    /// CPU twin do); the default, two calls, rounds it into x when x is Bf16.
    #[allow(clippy::too_many_arguments)]
    fn rotary_qknorm_forward(
        &self,
        x: ViewMut<'_, Self>,
        shape: Heads,
        table: View<'_, Self>,
        eps: f32,
        y: ViewMut<'_, Self>,
        rstd: ViewMut<'_, Self>,
    ) {
        rotary_qknorm_forward_unfused(self, x, shape, table, eps, y, rstd)
    }
    /// Backward of `rotary_qknorm_forward` from its saved y and rstd: dx (written, not added) = the
    /// transpose rotation of the norm's input gradient. That gradient is an intermediate too (f32 on a
    /// backend with narrow storage; the default, two calls, rounds it into dx when dx is Bf16).
    #[allow(clippy::too_many_arguments)]
    fn rotary_qknorm_backward(
        &self,
        y: View<'_, Self>,
        rstd: View<'_, Self>,
        dy: View<'_, Self>,
        shape: Heads,
        table: View<'_, Self>,
        dx: ViewMut<'_, Self>,
    ) {
        rotary_qknorm_backward_unfused(self, y, rstd, dy, shape, table, dx)
    }

    /// Causal softmax attention with GQA (see `AttnShape`), scale 1/sqrt(D). Writes out (B, Tq, H, D) and
    /// lse (B, H, Tq), the log-sum-exp of each row's scaled scores (the backward recomputes from it).
    /// Implementations must not hold a Tq x Tk score matrix per head (tiles with online softmax).
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        shape: AttnShape,
        q: View<'_, Self>,
        k: View<'_, Self>,
        v: View<'_, Self>,
        out: ViewMut<'_, Self>,
        lse: ViewMut<'_, Self>,
    );
    /// Backward of `attention_forward` (training shape only: Tq = Tk, q_pos0 = 0). Writes dq, dk, dv.
    #[allow(clippy::too_many_arguments)]
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
    );

    /// h = relu(u)^2, elementwise.
    fn relu2_forward(&self, u: View<'_, Self>, h: ViewMut<'_, Self>);
    /// In place: dh becomes du = dh * 2 relu(u).
    fn relu2_backward(&self, u: View<'_, Self>, dh_to_du: ViewMut<'_, Self>);

    /// x += y, elementwise (the residual add, where it is not fused into a matmul's accumulate).
    fn add_inplace(&self, x: ViewMut<'_, Self>, y: View<'_, Self>);

    /// One chunk of the loss, fused: logits (rows x V) hold raw lm_head outputs on entry.
    /// z = cap * tanh(logits / cap); loss[r] = logsumexp(z_r) - z_r[target_r] (0 where target is -1).
    /// When `grad_scale` is Some(s), logits are overwritten with d(s * sum of losses)/d(raw logits)
    /// (zero rows for ignored targets); otherwise they hold the capped logits z (rows with a target).
    /// `targets` are read from `target_off` on; targets must be -1 or < V (the model checks them).
    #[allow(clippy::too_many_arguments)]
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
    );
    /// In place: z = cap * tanh(z / cap) (generation wants the capped logits themselves).
    fn softcap(&self, logits: ViewMut<'_, Self>, cap: f32);

    // ---- The optimizer's ops (Muon's momentum and Newton-Schulz, AdamW, clipping), so it can run where the
    // parameters live. The defaults compute on downloaded copies (correct on any backend, but slow); the
    // CPU works in place and a GPU backend launches kernels. Formulas: `optim_ops`.

    /// y = a x + b y (same length); with b = 0, y = a x without reading y.
    fn axpby(&self, a: f32, x: View<'_, Self>, b: f32, y: ViewMut<'_, Self>) {
        let (xs, mut ys) = (download_vec(self, x), download_vec(self, y.view()));
        optim_ops::axpby(a, &xs, b, &mut ys);
        self.upload(y, &ys);
    }
    /// x *= a.
    fn scale(&self, x: ViewMut<'_, Self>, a: f32) {
        let mut xs = download_vec(self, x.view());
        optim_ops::scale(&mut xs, a);
        self.upload(x, &xs);
    }
    /// The sum of squares of x, accumulated in f64, on the host (so this waits for queued work).
    fn sum_squares(&self, x: View<'_, Self>) -> f64 {
        optim_ops::sum_squares(&download_vec(self, x))
    }
    /// Newton-Schulz's normalization without a host round trip: writes s = 1 / (||x||_F + eps) into the
    /// one-element view `inv`, on the backend. The arithmetic is the host's: the sum of squares as
    /// `sum_squares` computes it (f64), its square root in f64 rounded to f32, then the add and the divide
    /// in f32. The default goes through `sum_squares` (so on a device it waits for the queued work: a
    /// device backend overrides it with kernels; the CPU's is already in place).
    fn inverse_norm_into(&self, x: View<'_, Self>, eps: f32, inv: ViewMut<'_, Self>) {
        assert_eq!(inv.len, 1, "inverse_norm_into: inv must be one element");
        let norm = self.sum_squares(x).sqrt() as f32;
        self.upload(inv, &[1.0 / (norm + eps)]);
    }
    /// y = s x, where s is the value in the one-element view `s` (left on the backend, so nothing waits).
    /// Rounds as `axpby(s, x, 0, y)` does. The default reads s back (a device backend overrides it).
    fn scale_by_scalar(&self, x: View<'_, Self>, s: View<'_, Self>, y: ViewMut<'_, Self>) {
        assert_eq!(s.len, 1, "scale_by_scalar: s must be one element");
        let mut value = [0.0f32];
        self.download(s, &mut value);
        self.axpby(value[0], x, 0.0, y);
    }
    /// Muon's momentum with nesterov: buf = buf + (1 - mu)(g - buf); update = g + mu (buf - g).
    fn muon_momentum(&self, g: View<'_, Self>, buf: ViewMut<'_, Self>, update: ViewMut<'_, Self>, mu: f32) {
        let gs = download_vec(self, g);
        let mut bs = download_vec(self, buf.view());
        let mut us = vec![0.0f32; update.len];
        optim_ops::muon_momentum(&gs, &mut bs, &mut us, mu);
        self.upload(buf, &bs);
        self.upload(update, &us);
    }
    /// One AdamW step of a slice of parameters p with gradient g and moments m, v.
    fn adamw(&self, p: ViewMut<'_, Self>, g: View<'_, Self>, m: ViewMut<'_, Self>, v: ViewMut<'_, Self>, h: AdamwStep) {
        let gs = download_vec(self, g);
        let (mut ps, mut ms, mut vs) = (
            download_vec(self, p.view()),
            download_vec(self, m.view()),
            download_vec(self, v.view()),
        );
        optim_ops::adamw(&mut ps, &gs, &mut ms, &mut vs, h);
        self.upload(p, &ps);
        self.upload(m, &ms);
        self.upload(v, &vs);
    }

    /// Muon's Newton-Schulz in bf16 over a batch of same-shape matrices (`ns_bf16` says where it rounds):
    /// `g` holds `ns.batch` f32 matrices back to back (the momentum updates), `x` receives the orthogonalized
    /// updates (`ns.batch` matrices, bf16 values). `x_tmp` (like x), `gram` and `poly` (`ns.batch` Gram
    /// matrices each) are the iteration's scratch and `norms` (`NS_NORM_SCRATCH_PER_MATRIX` per matrix) the
    /// norms' partial sums; a device stores x, x_tmp, gram and poly as Bf16. Nothing comes back to the host.
    /// The default computes on downloaded copies with the host twin (the CPU's twin; slow on a device, which
    /// overrides it with strided-batched GEMMs).
    #[allow(clippy::too_many_arguments)]
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
        let _ = (x_tmp, gram, poly, norms);
        let gs = download_vec(self, g);
        let mut xs = vec![0.0f32; x.len];
        ns_bf16::newton_schulz_bf16(ns, &gs, &mut xs);
        self.upload(x, &xs);
    }
    /// Muon's apply: p = a x + p (as `axpby(a, x, 1, p)` rounds), then, given a working copy, p_bf16 = bf16(p).
    /// `x` may be stored as Bf16 (the batched Newton-Schulz's output).
    fn muon_apply(&self, x: View<'_, Self>, a: f32, p: ViewMut<'_, Self>, p_bf16: Option<ViewMut<'_, Self>>) {
        let p_buf = p.buf;
        let (off, len) = (p.off, p.len);
        self.axpby(
            a,
            x,
            1.0,
            ViewMut {
                buf: &mut *p_buf,
                off,
                len,
            },
        );
        if let Some(w) = p_bf16 {
            self.copy(View { buf: &*p_buf, off, len }, w);
        }
    }
    /// AdamW over many tensors at once (one launch on a device): for each piece, exactly `adamw` on
    /// p[p_off..], g[p_off..], m[m_off..], v[m_off..], then, given a working copy, working[working_off..] =
    /// bf16(new p).
    fn adamw_multi(
        &self,
        p: &mut Self::Buf,
        g: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        mut working: Option<&mut Self::Buf>,
        pieces: &[AdamwPiece],
    ) {
        for t in pieces {
            self.adamw(
                ViewMut::at(p, t.p_off, t.len),
                View::at(g, t.p_off, t.len),
                ViewMut::at(m, t.m_off, t.len),
                ViewMut::at(v, t.m_off, t.len),
                t.step,
            );
            if let Some(w) = working.as_deref_mut() {
                self.copy(View::at(p, t.p_off, t.len), ViewMut::at(w, t.working_off, t.len));
            }
        }
    }

    /// The device allocator's sizes and peaks; None where memory is the host's (the CPU backend).
    fn memory_report(&self) -> Option<MemoryReport> {
        None
    }

    /// Wait until every op queued so far has finished (a device backend's ops return once queued; the CPU's
    /// return when done, so its default does nothing). Timing needs it; correctness never does, since
    /// `download` waits by itself.
    fn synchronize(&self) {}

    /// Start (`true`) or stop (`false`) a profiler's capture, for `nc-train --profile-steps` (nsys
    /// `--capture-range=cudaProfilerApi`). Backends no such profiler captures have nothing to do.
    fn profiler_capture(&self, on: bool) -> crate::Result<()> {
        let _ = on;
        Ok(())
    }

    /// The whole buffer as a host slice, where the backend keeps it in host memory (the CPU), so the
    /// optimizers and checkpoints can work on it in place; None where it lives on a device, and callers copy
    /// through `download` and `upload` instead.
    fn host_slice(buf: &Self::Buf) -> Option<&[f32]> {
        let _ = buf;
        None
    }
    /// Writable form of `host_slice`; None for a Bf16 buffer (a raw slice write could not round on store).
    fn host_slice_mut(buf: &mut Self::Buf) -> Option<&mut [f32]> {
        let _ = buf;
        None
    }
}

/// `Backend::rotary_qknorm_forward`'s default, two calls: rotary in place on x, then the per-head rmsnorm of
/// the rotated x (which rounds into x first when x is Bf16). A backend whose own rotary and rmsnorm are what
/// it wants composed (a test's differently-rounding CPU) calls this from its override.
#[allow(clippy::too_many_arguments)]
pub fn rotary_qknorm_forward_unfused<B: Backend + ?Sized>(
    be: &B,
    mut x: ViewMut<'_, B>,
    shape: Heads,
    table: View<'_, B>,
    eps: f32,
    y: ViewMut<'_, B>,
    rstd: ViewMut<'_, B>,
) {
    let len = x.len;
    be.rotary(x.sub(0, len), shape, table, Rotation::Forward);
    be.rmsnorm_forward(x.view(), shape.rows(), shape.head_dim, eps, y, rstd);
}

/// `Backend::rotary_qknorm_backward`'s default, two calls: the norm's backward into dx, then the transpose
/// rotation of dx in place.
#[allow(clippy::too_many_arguments)]
pub fn rotary_qknorm_backward_unfused<B: Backend + ?Sized>(
    be: &B,
    y: View<'_, B>,
    rstd: View<'_, B>,
    dy: View<'_, B>,
    shape: Heads,
    table: View<'_, B>,
    mut dx: ViewMut<'_, B>,
) {
    let len = dx.len;
    be.rmsnorm_backward(y, rstd, dy, shape.rows(), shape.head_dim, dx.sub(0, len), false);
    be.rotary(dx, shape, table, Rotation::Inverse);
}

/// A view's values copied to a new host vector (the optimizer ops' default implementations).
fn download_vec<B: Backend + ?Sized>(be: &B, v: View<'_, B>) -> Vec<f32> {
    let mut out = vec![0.0f32; v.len];
    be.download(v, &mut out);
    out
}
