//! The optimizer where the parameters live: Muon + AdamW and clipping written against the `Backend` ops
//! only, so a GPU backend updates its parameters on the device instead of shipping every parameter and
//! gradient to the host and back each step.
//!
//! Same algorithm, same segments and the same lrs as the host `Optimizer` (SPEC.md section 4), for a single
//! rank (world size 1; several ranks are CPU threads and keep the host optimizer). The arithmetic differs
//! from the host's only in the order of Newton-Schulz's matrix products (the backend's GEMM instead of the
//! host's, no explicit transposes), so Muon's updates agree to rounding, not to the bit; momentum, AdamW and
//! clipping compute the same formulas in the same order (`backend::optim_ops`).
//!
//! State: the host optimizer keeps one flat buffer (per segment: Muon momentum, or AdamW m then v), which
//! checkpoints hold as is. Here the same values live in three device buffers, because the trait's `adamw`
//! takes m and v as two writable views and one buffer cannot be borrowed mutably twice: `momentum` (every
//! matrix's Muon momentum), `adam_m` and `adam_v` (the moments of wte and lm_head), each back to back in
//! canonical order. `state_to_host` and `restore` translate to and from the host layout, so checkpoints
//! move freely between the two optimizers.

use super::adamw::{adam_lr_scale, adamw_step, AdamParams};
use super::clip::clip_factor;
use super::muon::{shape_scale, NS_COEFFS, NS_EPS, NS_STEPS};
use super::shard::ShardLayout;
use super::{check_state_len, OptimConfig};
use crate::backend::{Backend, View, ViewMut};
use crate::config::{ModelConfig, ParamKind};
use crate::error::Result;

/// Scratch for one Muon update on a backend, allocated once for the largest matrix (nothing is allocated
/// per step).
pub struct MuonScratch<B: Backend> {
    /// The matrix's nesterov update, before orthogonalization (rows x cols).
    update: B::Buf,
    /// The Newton-Schulz iterate X and the next one; swapped (handles, not data) after each iteration.
    x: B::Buf,
    x_next: B::Buf,
    /// The Gram matrix A = X X^T and B = b A + c A A, both (short side) x (short side).
    gram: B::Buf,
    poly: B::Buf,
    /// 1 / (||G||_F + eps), computed and used on the backend (one element; the plan's scratch figure leaves
    /// these 4 bytes out).
    inv_norm: B::Buf,
}

impl<B: Backend> MuonScratch<B> {
    /// Room for any of the given (rows, cols) shapes.
    pub fn for_shapes(be: &B, shapes: impl Iterator<Item = (usize, usize)>) -> Self {
        let (numel, short) = crate::optim::muon::scratch_dims(shapes);
        MuonScratch {
            update: be.alloc(numel),
            x: be.alloc(numel),
            x_next: be.alloc(numel),
            gram: be.alloc(short * short),
            poly: be.alloc(short * short),
            inv_norm: be.alloc(1),
        }
    }

    /// Elements allocated (the plan's "optimizer scratch" prices exactly this), less the one-element norm.
    pub fn elements(&self) -> usize {
        [&self.update, &self.x, &self.x_next, &self.gram, &self.poly]
            .iter()
            .map(|b| B::buf_len(b))
            .sum()
    }

    /// The orthogonalized update of the last `newton_schulz5_on` (the first rows x cols elements).
    pub fn result(&self) -> &B::Buf {
        &self.x
    }
}

/// Orthogonalize the first rows x cols elements of `s.update` into `s.x` with `NS_STEPS` quintic
/// Newton-Schulz iterations (as `muon::newton_schulz5`).
pub fn newton_schulz5_on<B: Backend>(be: &B, rows: usize, cols: usize, s: &mut MuonScratch<B>) {
    let n_el = rows * cols;
    let short = rows.min(cols);
    assert!(
        B::buf_len(&s.x) >= n_el && B::buf_len(&s.gram) >= short * short,
        "MuonScratch too small for {rows}x{cols}"
    );
    // X = G / (||G||_F + eps), the norm's sum in f64. Computed and applied on the backend: reading it back
    // here would make the host wait for every queued kernel once per matrix (dozens of times a step).
    be.inverse_norm_into(View::at(&s.update, 0, n_el), NS_EPS, ViewMut::all(&mut s.inv_norm));
    be.scale_by_scalar(
        View::at(&s.update, 0, n_el),
        View::all(&s.inv_norm),
        ViewMut::at(&mut s.x, 0, n_el),
    );

    // The iteration works on the wide orientation, X (short x long), so the Gram matrix is the small one.
    // A wide matrix (rows <= cols) is X itself. A tall one (rows > cols) would be transposed first; instead
    // we keep Y = X^T, which is the matrix as stored (rows x cols), and rewrite each step in terms of Y:
    //   A = X X^T = Y^T Y                                        (cols x cols)
    //   B = b A + c A A                                          (a polynomial in A)
    //   X' = a X + B X, so Y' = X'^T = a Y + X^T B^T = a Y + Y B^T
    // (B is symmetric in exact arithmetic, as A = Y^T Y is and so A A and their sums are; a GEMM's rounding
    // need not keep it exactly so, hence the code multiplies by B^T as written.) Y' is then X'^T, already in
    // the matrix's own layout: no transpose in, none out.
    let tall = rows > cols;
    let (ca, cb, cc) = NS_COEFFS;
    let sq = short * short;
    for _ in 0..NS_STEPS {
        {
            let x = View::at(&s.x, 0, n_el);
            let gram = ViewMut::at(&mut s.gram, 0, sq);
            if tall {
                // A = Y^T Y: (cols x rows)(rows x cols)
                be.matmul(cols, cols, rows, x, true, x, false, gram, false);
            } else {
                // A = X X^T: (rows x cols)(cols x rows)
                be.matmul(rows, rows, cols, x, false, x, true, gram, false);
            }
        }
        // B = A A, then B = b A + c B (the trait's matmul has no alpha, so the scaling is a separate axpby).
        let gram = View::at(&s.gram, 0, sq);
        be.matmul(
            short,
            short,
            short,
            gram,
            false,
            gram,
            false,
            ViewMut::at(&mut s.poly, 0, sq),
            false,
        );
        be.axpby(cb, gram, cc, ViewMut::at(&mut s.poly, 0, sq));
        {
            let x = View::at(&s.x, 0, n_el);
            let poly = View::at(&s.poly, 0, sq);
            let x_next = ViewMut::at(&mut s.x_next, 0, n_el);
            if tall {
                // Y B^T: (rows x cols)(cols x cols). B is symmetric in exact arithmetic, but its rounded
                // value need not be: X' = a X + B X transposes to Y' = a Y + Y B^T, so take B^T literally.
                be.matmul(rows, cols, cols, x, false, poly, true, x_next, false);
            } else {
                // B X: (rows x rows)(rows x cols)
                be.matmul(rows, cols, rows, poly, false, x, false, x_next, false);
            }
            // X_next = a X + X_next
            be.axpby(ca, x, 1.0, ViewMut::at(&mut s.x_next, 0, n_el));
        }
        std::mem::swap(&mut s.x, &mut s.x_next);
    }
}

/// One Muon update of one whole matrix on the backend (as `muon::muon_update`): momentum and nesterov into
/// the scratch, Newton-Schulz, then p -= lr * shape_scale * X.
#[allow(clippy::too_many_arguments)]
pub fn muon_update_on<B: Backend>(
    be: &B,
    param: ViewMut<'_, B>,
    grad: View<'_, B>,
    momentum_buf: ViewMut<'_, B>,
    rows: usize,
    cols: usize,
    lr: f32,
    momentum: f32,
    s: &mut MuonScratch<B>,
) {
    let n = rows * cols;
    assert!(
        param.len == n && grad.len == n && momentum_buf.len == n,
        "muon_update_on: views are not {rows}x{cols}"
    );
    be.muon_momentum(grad, momentum_buf, ViewMut::at(&mut s.update, 0, n), momentum);
    newton_schulz5_on(be, rows, cols, s);
    let step = lr * shape_scale(rows, cols);
    // p = -step X + p: the same rounding as the host's p -= step * X.
    be.axpby(-step, View::at(&s.x, 0, n), 1.0, param);
}

/// One AdamW update of a slice on the backend (as `adamw::adamw_update`); `t` is the 1-based step count.
#[allow(clippy::too_many_arguments)]
pub fn adamw_update_on<B: Backend>(
    be: &B,
    param: ViewMut<'_, B>,
    grad: View<'_, B>,
    m: ViewMut<'_, B>,
    v: ViewMut<'_, B>,
    lr: f32,
    t: u64,
    h: &AdamParams,
) {
    be.adamw(param, grad, m, v, adamw_step(lr, t, h));
}

/// Muon + AdamW for a single rank, with all state and scratch on the backend.
pub struct DeviceOptimizer<B: Backend> {
    pub config: OptimConfig,
    /// Rank 0 of 1: every parameter, in canonical order (the host optimizer's segments and state layout).
    layout: ShardLayout,
    /// Every matrix's Muon momentum, back to back.
    momentum: B::Buf,
    /// AdamW's first and second moments of wte and lm_head, back to back.
    adam_m: B::Buf,
    adam_v: B::Buf,
    /// Per segment of `layout`: where its state starts in `momentum` (Muon) or in `adam_m` and `adam_v`
    /// (AdamW).
    device_offsets: Vec<usize>,
    /// Optimizer steps taken so far (AdamW's bias correction uses steps_taken + 1).
    steps_taken: u64,
    adam_scale: f32,
    scratch: MuonScratch<B>,
}

impl<B: Backend> DeviceOptimizer<B> {
    /// Elements of Muon's scratch this optimizer allocated.
    pub fn scratch_elements(&self) -> usize {
        self.scratch.elements()
    }

    pub fn new(be: &B, model: &ModelConfig, config: OptimConfig) -> Result<Self> {
        model.validate()?;
        let layout = ShardLayout::new(model, 0, 1);
        let (mut muon_len, mut adam_len) = (0, 0);
        let device_offsets = layout
            .segments
            .iter()
            .map(|seg| {
                let total = match seg.kind {
                    ParamKind::Matrix => &mut muon_len,
                    ParamKind::Embedding | ParamKind::Unembedding => &mut adam_len,
                };
                let off = *total;
                *total += seg.len;
                off
            })
            .collect();
        let muon_shapes = layout
            .segments
            .iter()
            .filter(|s| s.kind == ParamKind::Matrix)
            .map(|s| (s.rows, s.cols));
        let scratch = MuonScratch::for_shapes(be, muon_shapes);
        Ok(DeviceOptimizer {
            config,
            momentum: be.alloc(muon_len),
            adam_m: be.alloc(adam_len),
            adam_v: be.alloc(adam_len),
            device_offsets,
            steps_taken: 0,
            adam_scale: adam_lr_scale(model.n_embd),
            scratch,
            layout,
        })
    }

    pub fn layout(&self) -> &ShardLayout {
        &self.layout
    }
    pub fn steps_taken(&self) -> u64 {
        self.steps_taken
    }

    /// Clip the whole gradient to global norm `max_norm` in place; returns the norm before clipping.
    /// `max_norm <= 0` disables clipping. The same semantics and arithmetic as `clip::clip_grad_norm`: the
    /// norm comes back to the host, and the gradient is scaled only when the factor is below 1. This is the
    /// optimizer step's one host read-back (the log wants the norm anyway); `step` reads nothing back
    /// (tests/tests/optimizer_syncs.rs counts).
    pub fn clip(&self, be: &B, grads: &mut B::Buf, max_norm: f64) -> f64 {
        let norm = be.sum_squares(View::all(grads)).sqrt();
        if max_norm > 0.0 {
            let f = clip_factor(norm, max_norm);
            if f < 1.0 {
                be.scale(ViewMut::all(grads), f);
            }
        }
        norm
    }

    /// One step on every parameter: `params` and `grads` are the model's whole contiguous buffers (grads
    /// already clipped). `lr_mult` is the schedule's multiplier, `momentum` Muon's mu.
    pub fn step(&mut self, be: &B, params: &mut B::Buf, grads: &B::Buf, lr_mult: f64, momentum: f32) {
        assert_eq!(
            B::buf_len(params),
            B::buf_len(grads),
            "params and grads must be the same contiguous layout"
        );
        let t = self.steps_taken + 1;
        for (seg, &off) in self.layout.segments.iter().zip(&self.device_offsets) {
            let lr = self.config.scheduled_lr(seg.kind, self.adam_scale, lr_mult);
            let p = ViewMut::at(params, seg.start, seg.len);
            let g = View::at(grads, seg.start, seg.len);
            match seg.kind {
                ParamKind::Matrix => {
                    let buf = ViewMut::at(&mut self.momentum, off, seg.len);
                    muon_update_on(be, p, g, buf, seg.rows, seg.cols, lr, momentum, &mut self.scratch);
                }
                ParamKind::Embedding | ParamKind::Unembedding => {
                    let m = ViewMut::at(&mut self.adam_m, off, seg.len);
                    let v = ViewMut::at(&mut self.adam_v, off, seg.len);
                    adamw_update_on(be, p, g, m, v, lr, t, &self.config.adam);
                }
            }
        }
        self.steps_taken = t;
    }

    /// The state in the host `Optimizer`'s layout for rank 0 of 1 (what checkpoints hold).
    pub fn state_to_host(&self, be: &B) -> Vec<f32> {
        let mut host = vec![0.0f32; self.layout.state_len];
        for (seg, &off) in self.layout.segments.iter().zip(&self.device_offsets) {
            let (st, len) = (seg.state_offset, seg.len);
            match seg.kind {
                ParamKind::Matrix => be.download(View::at(&self.momentum, off, len), &mut host[st..st + len]),
                ParamKind::Embedding | ParamKind::Unembedding => {
                    be.download(View::at(&self.adam_m, off, len), &mut host[st..st + len]);
                    be.download(View::at(&self.adam_v, off, len), &mut host[st + len..st + 2 * len]);
                }
            }
        }
        host
    }

    /// Restore state in the host layout (a checkpoint's, or `state_to_host`'s) of the same model at world
    /// size 1.
    pub fn restore(&mut self, be: &B, state: &[f32], steps_taken: u64) -> Result<()> {
        check_state_len(state.len(), self.layout.state_len)?;
        for (seg, &off) in self.layout.segments.iter().zip(&self.device_offsets) {
            let (st, len) = (seg.state_offset, seg.len);
            match seg.kind {
                ParamKind::Matrix => be.upload(ViewMut::at(&mut self.momentum, off, len), &state[st..st + len]),
                ParamKind::Embedding | ParamKind::Unembedding => {
                    be.upload(ViewMut::at(&mut self.adam_m, off, len), &state[st..st + len]);
                    be.upload(ViewMut::at(&mut self.adam_v, off, len), &state[st + len..st + 2 * len]);
                }
            }
        }
        self.steps_taken = steps_taken;
        Ok(())
    }
}
