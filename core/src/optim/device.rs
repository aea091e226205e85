//! The optimizer where the parameters live: Muon + AdamW and clipping written against the `Backend` ops
//! only, so a GPU backend updates its parameters on the device instead of shipping every parameter and
//! gradient to the host and back each step.
//!
//! Same algorithm, same segments and the same lrs as the host `Optimizer` (SPEC.md section 4), over the
//! segments one rank owns (`DeviceOptions::rank` / `world_size`, `ShardLayout`: ZeRO-1 calls it per rank;
//! the training loop runs it at world size 1). Two paths:
//! - f32 (`Precision::Fp32`, `Fp32Gpu`): per matrix, Newton-Schulz in f32 through the backend's GEMM. It
//!   differs from the host's only in the order of Newton-Schulz's matrix products (no explicit transposes),
//!   so Muon's updates agree to rounding, not to the bit; momentum, AdamW and clipping compute the same
//!   formulas in the same order (`backend::optim_ops`).
//! - bf16 (`Precision::Bf16`, the engine's): the Muon matrices grouped by shape (`ns_groups`), each group's
//!   Newton-Schulz one batched bf16 call (`Backend::newton_schulz_bf16`: strided-batched GEMMs on a device,
//!   norms on the device, rounding as `backend::ns_bf16` says), Muon's apply and one multi-tensor AdamW
//!   writing the f32 master and, given one, the bf16 working copy (`step_writing`).
//!
//! Neither reads anything back: the step's one host wait is the clip's gradient norm
//! (tests/tests/optimizer_syncs.rs counts).
//!
//! State: the host optimizer keeps one flat buffer (per segment: Muon momentum, or AdamW m then v), which
//! checkpoints hold as is. Here the same values live in three device buffers, because the trait's `adamw`
//! takes m and v as two writable views and one buffer cannot be borrowed mutably twice: `momentum` (every
//! matrix's Muon momentum), `adam_m` and `adam_v` (the moments of wte and lm_head), each back to back in
//! canonical order. `state_to_host` and `restore` translate to and from the host layout, so checkpoints
//! move freely between the two optimizers (and the two paths).

use super::adamw::{adam_lr_scale, adamw_step, AdamParams};
use super::clip::clip_factor;
use super::muon::{muon_ns_batch, shape_scale, NS_COEFFS, NS_EPS, NS_STEPS};
use super::ns_bf16_buffers::{ns_bf16_buffer_bytes, NsBf16Buffers};
use super::shard::{Segment, ShardLayout};
use super::{check_state_len, OptimConfig};
use crate::backend::{AdamwPiece, Backend, Gemm, Storage, View, ViewMut};
use crate::bail;
use crate::config::{ModelConfig, ParamKind};
use crate::error::Result;
use crate::precision::Precision;

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
        let x = View::at(&s.x, 0, n_el);
        // A = Y^T Y, (cols x rows)(rows x cols), when tall; A = X X^T, (rows x cols)(cols x rows), when wide.
        let gram_shape = if tall {
            Gemm::tn(cols, cols, rows)
        } else {
            Gemm::nt(rows, rows, cols)
        };
        be.matmul(gram_shape, x, x, ViewMut::at(&mut s.gram, 0, sq));
        // B = A A, then B = b A + c B (the trait's matmul has no alpha, so the scaling is a separate axpby).
        let gram = View::at(&s.gram, 0, sq);
        be.matmul(
            Gemm::nn(short, short, short),
            gram,
            gram,
            ViewMut::at(&mut s.poly, 0, sq),
        );
        be.axpby(cb, gram, cc, ViewMut::at(&mut s.poly, 0, sq));
        let poly = View::at(&s.poly, 0, sq);
        let x_next = ViewMut::at(&mut s.x_next, 0, n_el);
        if tall {
            // Y B^T: (rows x cols)(cols x cols). B is symmetric in exact arithmetic, but its rounded
            // value need not be: X' = a X + B X transposes to Y' = a Y + Y B^T, so take B^T literally.
            be.matmul(Gemm::nt(rows, cols, cols), x, poly, x_next);
        } else {
            // B X: (rows x rows)(rows x cols)
            be.matmul(Gemm::nn(rows, cols, rows), poly, x, x_next);
        }
        // X_next = a X + X_next
        be.axpby(ca, x, 1.0, ViewMut::at(&mut s.x_next, 0, n_el));
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

/// Matrix elements one batched Newton-Schulz call takes at most (a batch of same-shape matrices is split
/// into calls of about equal size under this): bounds the bf16 path's scratch (the batch's f32 momentum
/// updates, two bf16 iterates: 8 bytes an element, 512 MiB at this cap) whatever the model's depth.
pub const NS_BATCH_MAX_ELEMS: usize = 1 << 26;

/// What a `DeviceOptimizer` is built for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceOptions {
    /// `Bf16`: Newton-Schulz in bf16 batched over same-shape matrices, and multi-tensor AdamW, both writing
    /// the bf16 working copy when given one. `Fp32` / `Fp32Gpu`: today's f32 path, bit for bit.
    pub precision: Precision,
    /// The rank and world size whose segments (`ShardLayout`) this optimizer owns and updates.
    pub rank: usize,
    pub world_size: usize,
    /// See `NS_BATCH_MAX_ELEMS` (tests lower it to force several calls per shape).
    pub ns_batch_max_elems: usize,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            precision: Precision::Fp32,
            rank: 0,
            world_size: 1,
            ns_batch_max_elems: NS_BATCH_MAX_ELEMS,
        }
    }
}

/// One batched Newton-Schulz call: same-shape Muon matrices (indices into the layout's segments, in
/// canonical order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NsGroup {
    pub rows: usize,
    pub cols: usize,
    pub members: Vec<usize>,
}

/// The rank's Muon matrices grouped by shape (first appearance order), each group split into calls of at
/// most `max_elems` elements (at least one matrix each), of about equal size.
pub fn ns_groups(segments: &[Segment], max_elems: usize) -> Vec<NsGroup> {
    let mut by_shape: Vec<NsGroup> = Vec::new();
    for (i, seg) in segments.iter().enumerate() {
        if seg.kind != ParamKind::Matrix {
            continue;
        }
        match by_shape.iter_mut().find(|g| (g.rows, g.cols) == (seg.rows, seg.cols)) {
            Some(g) => g.members.push(i),
            None => by_shape.push(NsGroup {
                rows: seg.rows,
                cols: seg.cols,
                members: vec![i],
            }),
        }
    }
    let mut calls = Vec::new();
    for g in by_shape {
        let per_call = (max_elems / (g.rows * g.cols).max(1)).max(1);
        let n_calls = g.members.len().div_ceil(per_call);
        let size = g.members.len().div_ceil(n_calls);
        for chunk in g.members.chunks(size) {
            calls.push(NsGroup {
                rows: g.rows,
                cols: g.cols,
                members: chunk.to_vec(),
            });
        }
    }
    calls
}

/// The bf16 path's scratch, sized once for the largest call (nothing is allocated per step).
struct Bf16Scratch<B: Backend> {
    groups: Vec<NsGroup>,
    /// The call's momentum updates, (batch, rows x cols) f32, back to back.
    g: B::Buf,
    ns: NsBf16Buffers<B>,
}

/// The largest of these calls: (matrix elements, Gram elements, matrices), each over the whole batch.
fn largest_ns_call(groups: &[NsGroup]) -> (usize, usize, usize) {
    let numel = groups
        .iter()
        .map(|g| g.members.len() * g.rows * g.cols)
        .max()
        .unwrap_or(0);
    let gram = groups
        .iter()
        .map(|g| g.members.len() * g.rows.min(g.cols).pow(2))
        .max()
        .unwrap_or(0);
    let batch = groups.iter().map(|g| g.members.len()).max().unwrap_or(0);
    (numel, gram, batch)
}

/// Bytes of Muon scratch a device optimizer allocates on the rank that needs the most, at these options'
/// precision (what the plan prices as "optimizer scratch"): the f32 path's five buffers, or the bf16 path's
/// f32 updates and norms and bf16 iterates and Gram matrices.
pub fn muon_scratch_bytes(model: &ModelConfig, world_size: usize, precision: Precision) -> usize {
    match precision {
        Precision::Fp32 | Precision::Fp32Gpu => 4 * ShardLayout::max_muon_scratch_elems(model, world_size),
        Precision::Bf16 => (0..world_size)
            .map(|r| {
                let layout = ShardLayout::new(model, r, world_size);
                let (numel, gram, batch) = largest_ns_call(&ns_groups(&layout.segments, NS_BATCH_MAX_ELEMS));
                Storage::F32.bytes_per_element() * numel + ns_bf16_buffer_bytes(numel, gram, batch)
            })
            .max()
            .unwrap_or(0),
    }
}

/// Muon + AdamW over the segments one rank owns, with all state and scratch on the backend.
pub struct DeviceOptimizer<B: Backend> {
    pub config: OptimConfig,
    /// The rank's segments in canonical order (the host optimizer's segments and state layout).
    layout: ShardLayout,
    /// Every owned matrix's Muon momentum, back to back.
    momentum: B::Buf,
    /// AdamW's first and second moments of the owned wte and lm_head rows, back to back.
    adam_m: B::Buf,
    adam_v: B::Buf,
    /// Per segment of `layout`: where its state starts in `momentum` (Muon) or in `adam_m` and `adam_v`
    /// (AdamW).
    device_offsets: Vec<usize>,
    /// Per segment: where its parameters start in the `params` a step takes (the segment's own offset, or
    /// in a packed master `ShardLayout::packed_offsets`), and that buffer's length; the grads' length.
    param_at: Vec<usize>,
    params_len: usize,
    grads_len: usize,
    packed: bool,
    /// Optimizer steps taken so far (AdamW's bias correction uses steps_taken + 1).
    steps_taken: u64,
    adam_scale: f32,
    /// The f32 path's scratch (empty on the bf16 path).
    scratch: MuonScratch<B>,
    /// The bf16 path's calls and scratch (None on the f32 path).
    bf16: Option<Bf16Scratch<B>>,
}

impl<B: Backend> DeviceOptimizer<B> {
    /// Elements of Muon's scratch this optimizer allocated (the f32 path's).
    pub fn scratch_elements(&self) -> usize {
        self.scratch.elements()
    }

    /// Bytes of Muon scratch this optimizer allocated, each buffer at its storage's size on a device.
    pub fn scratch_bytes(&self) -> usize {
        let f32_path = 4 * self.scratch.elements();
        let bf16_path = self.bf16.as_ref().map_or(0, |s| {
            B::buf_len(&s.g) * B::storage(&s.g).bytes_per_element() + s.ns.bytes()
        });
        f32_path + bf16_path
    }

    /// Rank 0 of 1, the f32 path (today's optimizer).
    pub fn new(be: &B, model: &ModelConfig, config: OptimConfig) -> Result<Self> {
        Self::with_options(be, model, config, DeviceOptions::default())
    }

    pub fn with_options(be: &B, model: &ModelConfig, config: OptimConfig, opts: DeviceOptions) -> Result<Self> {
        model.validate()?;
        if opts.world_size == 0 || opts.rank >= opts.world_size {
            bail!("rank {} is not in a world of size {}", opts.rank, opts.world_size);
        }
        let layout = ShardLayout::new(model, opts.rank, opts.world_size);
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
        let (scratch, bf16) = match opts.precision {
            Precision::Fp32 | Precision::Fp32Gpu => (MuonScratch::for_shapes(be, layout.muon_shapes()), None),
            Precision::Bf16 => {
                let groups = ns_groups(&layout.segments, opts.ns_batch_max_elems);
                let (numel, gram, batch) = largest_ns_call(&groups);
                let bf16 = Bf16Scratch {
                    groups,
                    g: be.alloc(numel),
                    ns: NsBf16Buffers::new(be, numel, gram, batch),
                };
                (MuonScratch::for_shapes(be, std::iter::empty()), Some(bf16))
            }
        };
        Ok(DeviceOptimizer {
            config,
            param_at: layout.segments.iter().map(|s| s.start).collect(),
            params_len: model.num_params() as usize,
            grads_len: model.num_params() as usize,
            packed: false,
            momentum: be.alloc(muon_len),
            adam_m: be.alloc(adam_len),
            adam_v: be.alloc(adam_len),
            device_offsets,
            steps_taken: 0,
            adam_scale: adam_lr_scale(model.n_embd),
            scratch,
            bf16,
            layout,
        })
    }

    /// This optimizer, stepping a packed master (ZeRO-1 with a sharded master, `model::MasterMap::owned`):
    /// a step's `params` holds only the rank's segments, back to back in canonical order; the grads and the
    /// working copy keep the whole parameter layout. Same kernels on the same values, other offsets (AdamW
    /// then runs per segment, `adamw` and a cast, since `adamw_multi` reads params and grads at one offset).
    pub fn packed(mut self) -> Self {
        self.param_at = self.layout.packed_offsets();
        self.params_len = self.layout.segments.iter().map(|s| s.len).sum();
        self.packed = true;
        self
    }

    pub fn layout(&self) -> &ShardLayout {
        &self.layout
    }
    pub fn steps_taken(&self) -> u64 {
        self.steps_taken
    }
    /// The bf16 path's batched Newton-Schulz calls (empty on the f32 path).
    pub fn ns_groups(&self) -> &[NsGroup] {
        self.bf16.as_ref().map_or(&[], |s| &s.groups)
    }
    /// Whether this optimizer updates every parameter (world size 1): then a step given the working copy
    /// rewrites all of it, and the model's copy is current without `refresh_weights`.
    pub fn owns_everything(&self) -> bool {
        self.layout.world_size == 1
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

    /// One step on every owned segment: `params` and `grads` are the model's whole contiguous buffers (grads
    /// already clipped). `lr_mult` is the schedule's multiplier, `momentum` Muon's mu.
    pub fn step(&mut self, be: &B, params: &mut B::Buf, grads: &B::Buf, lr_mult: f64, momentum: f32) {
        self.step_writing(be, params, grads, None, lr_mult, momentum);
    }

    /// `step`, and given the model's bf16 working copy (the parameters' layout), every owned segment of it
    /// rewritten as bf16(new master) by the update kernels themselves: no separate cast pass. With
    /// `owns_everything` the whole copy is then current (the caller clears the model's stale flag, as
    /// `Gpt::working_written` does); otherwise the ranks gather it as they gather the master.
    pub fn step_writing(
        &mut self,
        be: &B,
        params: &mut B::Buf,
        grads: &B::Buf,
        mut working: Option<&mut B::Buf>,
        lr_mult: f64,
        momentum: f32,
    ) {
        assert_eq!(
            B::buf_len(params),
            self.params_len,
            "params must be the whole parameter layout (or the packed master, after `packed`)"
        );
        assert_eq!(
            B::buf_len(grads),
            self.grads_len,
            "grads must be the whole parameter layout"
        );
        if let Some(w) = working.as_deref() {
            assert_eq!(
                B::buf_len(w),
                self.grads_len,
                "the working copy has the parameters' layout"
            );
        }
        let t = self.steps_taken + 1;
        if self.bf16.is_some() {
            self.muon_bf16(be, params, grads, working.as_deref_mut(), lr_mult, momentum);
            self.adamw_all(be, params, grads, working, lr_mult, t);
            self.steps_taken = t;
            return;
        }
        for ((seg, &off), &at) in self
            .layout
            .segments
            .iter()
            .zip(&self.device_offsets)
            .zip(&self.param_at)
        {
            let lr = self.config.scheduled_lr(seg.kind, self.adam_scale, lr_mult);
            let p = ViewMut::at(params, at, seg.len);
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
            if let Some(w) = working.as_deref_mut() {
                be.copy(View::at(params, at, seg.len), ViewMut::at(w, seg.start, seg.len));
            }
        }
        self.steps_taken = t;
    }

    /// Muon on the bf16 path: per call, every member's momentum into the call's update buffer, one batched
    /// Newton-Schulz, then each member's apply (master and working copy).
    fn muon_bf16(
        &mut self,
        be: &B,
        params: &mut B::Buf,
        grads: &B::Buf,
        mut working: Option<&mut B::Buf>,
        lr_mult: f64,
        momentum: f32,
    ) {
        let s = self.bf16.as_mut().expect("the bf16 path has its scratch");
        let lr = self.config.scheduled_lr(ParamKind::Matrix, self.adam_scale, lr_mult);
        for group in &s.groups {
            let n = group.rows * group.cols;
            let batch = group.members.len();
            for (b, &i) in group.members.iter().enumerate() {
                let (seg, off) = (&self.layout.segments[i], self.device_offsets[i]);
                be.muon_momentum(
                    View::at(grads, seg.start, n),
                    ViewMut::at(&mut self.momentum, off, n),
                    ViewMut::at(&mut s.g, b * n, n),
                    momentum,
                );
            }
            s.ns.run(
                be,
                &muon_ns_batch(batch, group.rows, group.cols),
                View::at(&s.g, 0, batch * n),
            );
            let a = -(lr * shape_scale(group.rows, group.cols));
            for (b, &i) in group.members.iter().enumerate() {
                let seg = &self.layout.segments[i];
                let w = working.as_deref_mut().map(|w| ViewMut::at(w, seg.start, n));
                be.muon_apply(
                    View::at(&s.ns.x, b * n, n),
                    a,
                    ViewMut::at(params, self.param_at[i], n),
                    w,
                );
            }
        }
    }

    /// Every owned AdamW segment in one `adamw_multi` call (one launch on a device).
    fn adamw_all(
        &mut self,
        be: &B,
        params: &mut B::Buf,
        grads: &B::Buf,
        working: Option<&mut B::Buf>,
        lr_mult: f64,
        t: u64,
    ) {
        if self.packed {
            self.adamw_packed(be, params, grads, working, lr_mult, t);
            return;
        }
        let pieces: Vec<AdamwPiece> = self
            .layout
            .segments
            .iter()
            .zip(&self.device_offsets)
            .filter(|(seg, _)| seg.kind != ParamKind::Matrix)
            .map(|(seg, &off)| AdamwPiece {
                p_off: seg.start,
                m_off: off,
                working_off: seg.start,
                len: seg.len,
                step: adamw_step(
                    self.config.scheduled_lr(seg.kind, self.adam_scale, lr_mult),
                    t,
                    &self.config.adam,
                ),
            })
            .collect();
        if !pieces.is_empty() {
            be.adamw_multi(params, grads, &mut self.adam_m, &mut self.adam_v, working, &pieces);
        }
    }

    /// `adamw_all` on a packed master: each owned AdamW segment with `adamw` (the per-tensor form of the same
    /// update, `Backend::adamw_multi`'s contract), then its working copy cast from the new master.
    fn adamw_packed(
        &mut self,
        be: &B,
        params: &mut B::Buf,
        grads: &B::Buf,
        mut working: Option<&mut B::Buf>,
        lr_mult: f64,
        t: u64,
    ) {
        for ((seg, &off), &at) in self
            .layout
            .segments
            .iter()
            .zip(&self.device_offsets)
            .zip(&self.param_at)
        {
            if seg.kind == ParamKind::Matrix {
                continue;
            }
            let lr = self.config.scheduled_lr(seg.kind, self.adam_scale, lr_mult);
            adamw_update_on(
                be,
                ViewMut::at(params, at, seg.len),
                View::at(grads, seg.start, seg.len),
                ViewMut::at(&mut self.adam_m, off, seg.len),
                ViewMut::at(&mut self.adam_v, off, seg.len),
                lr,
                t,
                &self.config.adam,
            );
            if let Some(w) = working.as_deref_mut() {
                be.copy(View::at(params, at, seg.len), ViewMut::at(w, seg.start, seg.len));
            }
        }
    }

    /// The state in the host `Optimizer`'s layout for this rank (what checkpoints hold).
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

    /// Restore state in the host layout (a checkpoint's, or `state_to_host`'s) of the same model, rank and
    /// world size.
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
