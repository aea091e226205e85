//! The GPT, written once against the `Backend` trait: one file per layer kind, `gpt.rs` strings them.
//!
//! Forward and backward are explicit, layer by layer (SPEC.md section 2). Parameters and grads are each one
//! contiguous buffer laid out by `ModelConfig::param_specs()`; activations live in buffers sized by
//! `activation_layout` and allocated once when the model is built, so a step allocates nothing.

pub mod attention;
pub mod embedding;
pub mod gpt;
pub mod init;
pub mod kv_cache;
pub mod linear;
pub mod loss;
pub mod master;
pub mod mlp;
pub mod norm;

pub use gpt::{Gpt, GradHook, GradsReady, HostMirror};
pub use init::Rng;
pub use kv_cache::KvCache;
pub use master::{MasterMap, MasterPiece};

use crate::backend::{Backend, Storage, View, ViewMut};
use crate::config::ModelConfig;
use crate::precision::Precision;

/// What the forward keeps for the backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    /// Save every activation the backward reads, for every layer.
    #[default]
    None,
    /// Save everything but the MLP hidden h = relu(u)^2, the widest activation (4d per token); the backward
    /// recomputes it from the saved pre-activation u into one shared buffer. Every other cheap op (the
    /// rmsnorms, rotary, QK-norm) reads an input as wide as its output, so recomputing it would keep as much
    /// memory as it frees: relu^2 is the one cheap op worth recomputing. Grads are bit-identical to None.
    Selective,
    /// Save only each layer's input; the backward re-runs the layer's forward into one shared set.
    Full,
}

/// How each kind of buffer is stored under a precision: the ONE place that decides which buffers are bf16
/// (ARCHITECTURE.md "Precision scheme" gives the reasons). `Gpt::new` allocates by it, `activation_layout`
/// counts by it and the planner prices by it. Under Fp32 and Fp32Gpu everything is F32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Storages {
    /// The working copy of the weights that every GEMM and the embedding lookup read (Bf16: a copy of the
    /// f32 master, refreshed after each optimizer step; F32: no copy, they read the master itself).
    pub weights: Storage,
    /// Activations that GEMMs or attention read: norm outputs (x0, xn1, xn2, xf), q, k, v, the attention
    /// output y, the MLP pre-activation u and hidden h.
    pub saved: Storage,
    /// Activation-gradient scratch (`GradScratch` but dresid) and the GEMM-input casts of dresid and of the
    /// logits' gradient.
    pub grad_scratch: Storage,
    /// The residual stream and its gradient (running sums over every layer), and the layer inputs kept
    /// under Recompute::Full (copies of the stream, so a recomputed layer sees exactly its input): F32.
    pub stream: Storage,
    /// Norm rstd, attention log-sum-exp, the logits chunk and per-token losses: F32.
    pub stats: Storage,
}

impl Storages {
    pub fn for_precision(precision: Precision) -> Self {
        let narrow = match precision {
            Precision::Fp32 | Precision::Fp32Gpu => Storage::F32,
            Precision::Bf16 => Storage::Bf16,
        };
        Storages {
            weights: narrow,
            saved: narrow,
            grad_scratch: narrow,
            stream: Storage::F32,
            stats: Storage::F32,
        }
    }
    /// Whether the model keeps a separate working copy of the weights and GEMM-input casts.
    pub fn has_casts(&self) -> bool {
        self.weights == Storage::Bf16
    }
}

/// Element counts of every activation buffer of a model built for `tokens = batch * seq` tokens, and their
/// bytes as stored (`Storages`). The model allocates exactly these; the planner (plan.rs) prices them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActivationLayout {
    /// Elements one layer saves per token for its backward (`LayerActs`, without the MLP hidden).
    pub layer_saved_per_token: usize,
    /// How many `LayerActs` sets exist: n_layer (None, Selective) or 1 (Full).
    pub layer_sets: usize,
    /// Elements per token of one MLP hidden buffer h = relu(u)^2 (4d).
    pub hidden_per_token: usize,
    /// How many MLP hidden buffers exist: n_layer (None) or 1 shared (Selective, Full).
    pub hidden_sets: usize,
    /// Per layer per token kept besides the sets: the layer input under Recompute::Full, else 0.
    pub layer_input_per_token: usize,
    /// Per token, outside the layers: residual stream, embedding output and its rstd, final norm output
    /// and rstd, per-token losses, and the backward's gradient scratch.
    pub other_per_token: usize,
    /// Rows of the largest lm_head chunk (`LossChunks`); the loss workspace holds loss_chunk_rows x vocab logits.
    pub loss_chunk_rows: usize,
    /// The logits chunk (F32) and, with casts, its bf16 gradient copy: elements.
    pub loss_workspace: usize,
    /// Everything above for `tokens` tokens.
    pub total: usize,
    /// Bytes of all activations but the loss workspace, and of the loss workspace, as stored.
    pub activation_bytes: usize,
    pub loss_workspace_bytes: usize,
}

/// Fewest tokens in one lm_head chunk, when the micro-batch has that many: it is the K of the lm_head
/// weight-gradient GEMM (dW += dlogits^T x, accumulated once per chunk, so a small K re-reads and re-writes
/// the whole vocab x d gradient for little work) and the rows of one cross-entropy launch (one block per row
/// on a GPU: 1024 blocks are several waves on any card).
pub const LOSS_MIN_CHUNK_ROWS: usize = 1024;
/// Where the vocabulary is small, chunks grow until their logits reach 2^23 values (32 MiB in f32).
pub const LOSS_CHUNK_LOGITS: usize = 1 << 23;

/// How the loss splits a micro-batch of `tokens` into lm_head chunks: the ONE rule, used by the loss (`loss.rs`),
/// the model's allocation and the planner.
///
/// The target chunk is `min(tokens, max(LOSS_MIN_CHUNK_ROWS, LOSS_CHUNK_LOGITS / vocab))` rows; the tokens are
/// cut into `count = tokens / target` chunks (at least 1) of as-equal-as-possible sizes (floor or ceil of
/// tokens / count), so every chunk has at least `target` rows: K >= 1024 for every GEMM of the loss path
/// whenever the micro-batch has 1024 tokens, also when tokens is not a multiple of the target (no short tail
/// chunk). The workspace holds the largest chunk, `rows = ceil(tokens / count)` (< 2 x target; exactly the
/// target when it divides tokens): `rows x vocab` f32 logits and, with casts, a bf16 copy of their gradient,
/// which the memory plan prices (`activation_layout_for`). For vocab 65536 (nanochat's) that is 1024 rows,
/// 256 MiB of f32 logits + 128 MiB of bf16 gradient, instead of a full (B*T) x vocab array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LossChunks {
    pub tokens: usize,
    pub count: usize,
}

impl LossChunks {
    pub fn new(vocab: usize, tokens: usize) -> Self {
        let target = (LOSS_CHUNK_LOGITS / vocab.max(1))
            .max(LOSS_MIN_CHUNK_ROWS)
            .min(tokens)
            .max(1);
        LossChunks {
            tokens,
            count: (tokens / target).max(1),
        }
    }
    /// (first token, rows) of chunk `i` (0 <= i < count).
    pub fn chunk(&self, i: usize) -> (usize, usize) {
        let start = i * self.tokens / self.count;
        (start, (i + 1) * self.tokens / self.count - start)
    }
    /// Every chunk in order: together they cover 0..tokens once.
    pub fn iter(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.count).map(|i| self.chunk(i))
    }
    /// Rows of the largest chunk: what the logits workspace holds.
    pub fn max_rows(&self) -> usize {
        self.tokens.div_ceil(self.count).max(1)
    }
}

/// Rows of the loss workspace for a micro-batch of `tokens` (the largest chunk of `LossChunks`).
pub fn loss_chunk_rows(vocab: usize, tokens: usize) -> usize {
    LossChunks::new(vocab, tokens).max_rows()
}

/// The one accounting of activation memory under f32 storage (the CPU's), shared with the planner.
pub fn activation_layout(cfg: &ModelConfig, batch: usize, seq: usize, policy: Recompute) -> ActivationLayout {
    activation_layout_for(cfg, batch, seq, policy, Precision::Fp32)
}

/// The one accounting of activation memory, shared by `Gpt::new` and the planner: elements per buffer
/// kind, and bytes as `Storages::for_precision(precision)` stores them.
pub fn activation_layout_for(
    cfg: &ModelConfig,
    batch: usize,
    seq: usize,
    policy: Recompute,
    precision: Precision,
) -> ActivationLayout {
    let st = Storages::for_precision(precision);
    let s = LayerShapes::new(cfg, batch * seq);
    let layer_saved_per_token = s.saved_per_token();
    let (layer_sets, hidden_sets, layer_input_per_token) = match policy {
        Recompute::None => (cfg.n_layer, cfg.n_layer, 0),
        Recompute::Selective => (cfg.n_layer, 1, 0),
        Recompute::Full => (1, 1, s.d),
    };
    let hidden_per_token = s.ff;
    // resid, x0 + rstd0, xf + rstdf, losses, the backward's GradScratch (and the bf16 cast of dresid when
    // there are casts), and under Full the residual stream that the recomputed layer forward writes into.
    let resid_tmp = if policy == Recompute::Full { s.d } else { 0 };
    let dresid_cast = if st.has_casts() { s.d } else { 0 };
    let other_per_token = s.d + (s.d + 1) + (s.d + 1) + 1 + grad_scratch_per_token(&s) + dresid_cast + resid_tmp;
    let tokens = batch * seq;
    let loss_chunk_rows = loss_chunk_rows(cfg.vocab_size, tokens);
    let logits = loss_chunk_rows * cfg.vocab_size;
    let dlogits_cast = if st.has_casts() { logits } else { 0 };
    let loss_workspace = logits + dlogits_cast;
    let total = tokens
        * (layer_sets * layer_saved_per_token
            + hidden_sets * hidden_per_token
            + cfg.n_layer * layer_input_per_token
            + other_per_token)
        + loss_workspace;

    // Bytes, by storage class (per token, then times tokens).
    let b = |st: Storage| st.bytes_per_element();
    let (h, hkv) = (s.n_head, s.n_kv_head);
    let layer_saved_bytes = b(st.saved) * (2 * s.d + 2 * s.qd + 2 * s.kvd + s.ff) + b(st.stats) * (2 + 2 * h + hkv);
    let scratch = grad_scratch_per_token(&s) - s.d;
    let other_bytes = b(st.stream) * (2 * s.d + resid_tmp)
        + b(st.saved) * 2 * s.d
        + b(st.stats) * 3
        + b(st.grad_scratch) * (scratch + dresid_cast);
    let activation_bytes = tokens
        * (layer_sets * layer_saved_bytes
            + hidden_sets * hidden_per_token * b(st.saved)
            + cfg.n_layer * layer_input_per_token * b(st.stream)
            + other_bytes);
    let loss_workspace_bytes = logits * b(st.stats) + dlogits_cast * b(st.grad_scratch);
    ActivationLayout {
        layer_saved_per_token,
        layer_sets,
        hidden_per_token,
        hidden_sets,
        layer_input_per_token,
        other_per_token,
        loss_chunk_rows,
        loss_workspace,
        total,
        activation_bytes,
        loss_workspace_bytes,
    }
}

/// Widths of one layer's tensors for `n` tokens.
#[derive(Debug, Clone, Copy)]
pub struct LayerShapes {
    pub n: usize,
    pub d: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    /// n_head * head_dim
    pub qd: usize,
    /// n_kv_head * head_dim
    pub kvd: usize,
    /// MLP hidden width, 4d
    pub ff: usize,
}

impl LayerShapes {
    pub fn new(cfg: &ModelConfig, n: usize) -> Self {
        LayerShapes {
            n,
            d: cfg.n_embd,
            n_head: cfg.n_head,
            n_kv_head: cfg.n_kv_head,
            head_dim: cfg.head_dim,
            qd: cfg.n_head * cfg.head_dim,
            kvd: cfg.kv_dim(),
            ff: 4 * cfg.n_embd,
        }
    }
    /// Must match the buffers of `LayerActs::new`.
    fn saved_per_token(&self) -> usize {
        let (d, h, hkv) = (self.d, self.n_head, self.n_kv_head);
        // xn1+rstd1, q+rstd_q, k+rstd_k, v, y, lse, xn2+rstd2, u
        (d + 1) + (self.qd + h) + (self.kvd + hkv) + self.kvd + self.qd + h + (d + 1) + self.ff
    }
}

/// What one layer's forward saves for its backward (None and Selective keep one set per layer). The MLP
/// hidden h = relu(u)^2 lives apart, in `Gpt::mlp_hidden`, because Selective keeps u per layer but not h.
pub struct LayerActs<B: Backend> {
    /// rmsnorm(x) entering attention, and its rstd.
    pub xn1: B::Buf,
    pub rstd1: B::Buf,
    /// q and k after rotary and QK-norm (what attention read), with the QK-norm rstd per (token, head).
    pub q: B::Buf,
    pub rstd_q: B::Buf,
    pub k: B::Buf,
    pub rstd_k: B::Buf,
    pub v: B::Buf,
    /// Attention output (before c_proj) and its log-sum-exp per (batch, head, row).
    pub y: B::Buf,
    pub lse: B::Buf,
    /// rmsnorm(x) entering the MLP, and its rstd.
    pub xn2: B::Buf,
    pub rstd2: B::Buf,
    /// MLP pre-activation c_fc(xn2).
    pub u: B::Buf,
}

impl<B: Backend> LayerActs<B> {
    /// Allocates one set; a backend out of memory is an error carrying its report.
    pub fn new(be: &B, s: &LayerShapes, st: &Storages) -> crate::error::Result<Self> {
        let n = s.n;
        let (saved, stats) = (st.saved, st.stats);
        Ok(LayerActs {
            xn1: be.try_alloc_as(n * s.d, saved)?,
            rstd1: be.try_alloc_as(n, stats)?,
            q: be.try_alloc_as(n * s.qd, saved)?,
            rstd_q: be.try_alloc_as(n * s.n_head, stats)?,
            k: be.try_alloc_as(n * s.kvd, saved)?,
            rstd_k: be.try_alloc_as(n * s.n_kv_head, stats)?,
            v: be.try_alloc_as(n * s.kvd, saved)?,
            y: be.try_alloc_as(n * s.qd, saved)?,
            lse: be.try_alloc_as(n * s.n_head, stats)?,
            xn2: be.try_alloc_as(n * s.d, saved)?,
            rstd2: be.try_alloc_as(n, stats)?,
            u: be.try_alloc_as(n * s.ff, saved)?,
        })
    }
    /// Every buffer, for the allocation accounting.
    pub fn buffers(&self) -> [&B::Buf; 12] {
        [
            &self.xn1,
            &self.rstd1,
            &self.q,
            &self.rstd_q,
            &self.k,
            &self.rstd_k,
            &self.v,
            &self.y,
            &self.lse,
            &self.xn2,
            &self.rstd2,
            &self.u,
        ]
    }
}

/// Gradient scratch of the backward, one set for the whole model (activation grads are written, `=`).
/// In the forward, `dq`/`dk` also hold q and k before rotary/QK-norm (they are free until the backward).
pub struct GradScratch<B: Backend> {
    /// Grad of the residual stream flowing down through the layers.
    pub dresid: B::Buf,
    /// Grad of a norm's output (d wide).
    pub dxn: B::Buf,
    pub dq: B::Buf,
    pub dk: B::Buf,
    pub dv: B::Buf,
    /// Grad w.r.t. the attention output y, and w.r.t. q/k after rotary (before QK-norm) in turn.
    pub dy: B::Buf,
    pub dqn: B::Buf,
    pub dkn: B::Buf,
    /// Grad w.r.t. the MLP hidden (h, then u in place).
    pub du: B::Buf,
    /// With casts (bf16): dresid cast to the GEMM-input storage, made where a branch's backward starts
    /// (its two c_proj GEMMs read it). Empty without casts: the GEMMs read dresid itself.
    pub dresid_cast: B::Buf,
}

impl<B: Backend> GradScratch<B> {
    /// Allocates the set; a backend out of memory is an error carrying its report.
    pub fn new(be: &B, s: &LayerShapes, st: &Storages) -> crate::error::Result<Self> {
        let n = s.n;
        let g = st.grad_scratch;
        Ok(GradScratch {
            dresid: be.try_alloc_as(n * s.d, st.stream)?,
            dxn: be.try_alloc_as(n * s.d, g)?,
            dq: be.try_alloc_as(n * s.qd, g)?,
            dk: be.try_alloc_as(n * s.kvd, g)?,
            dv: be.try_alloc_as(n * s.kvd, g)?,
            dy: be.try_alloc_as(n * s.qd, g)?,
            dqn: be.try_alloc_as(n * s.qd, g)?,
            dkn: be.try_alloc_as(n * s.kvd, g)?,
            du: be.try_alloc_as(n * s.ff, g)?,
            dresid_cast: be.try_alloc_as(if st.has_casts() { n * s.d } else { 0 }, g)?,
        })
    }
    /// Every buffer, for the allocation accounting.
    pub fn buffers(&self) -> [&B::Buf; 10] {
        [
            &self.dresid,
            &self.dxn,
            &self.dq,
            &self.dk,
            &self.dv,
            &self.dy,
            &self.dqn,
            &self.dkn,
            &self.du,
            &self.dresid_cast,
        ]
    }
    /// Where a branch's backward starts: with casts, round dresid into `dresid_cast` for the GEMMs.
    pub fn cast_dresid(&mut self, be: &B) {
        if B::buf_len(&self.dresid_cast) > 0 {
            be.copy(all(&self.dresid), all_mut(&mut self.dresid_cast));
        }
    }
}

/// What a GEMM reads for a value that has a cast: the cast where there is one (non-empty), else the value.
pub(crate) fn gemm_input<'a, B: Backend>(value: &'a B::Buf, cast: &'a B::Buf) -> &'a B::Buf {
    if B::buf_len(cast) > 0 {
        cast
    } else {
        value
    }
}

/// Elements per token of `GradScratch`; must match `GradScratch::new`.
fn grad_scratch_per_token(s: &LayerShapes) -> usize {
    2 * s.d + s.qd + 2 * s.kvd + s.qd + s.qd + s.kvd + s.ff
}

/// Offsets (into the one parameter / grad buffer) of one block's matrices.
#[derive(Debug, Clone, Copy)]
pub struct BlockParams {
    pub c_q: usize,
    pub c_k: usize,
    pub c_v: usize,
    pub attn_proj: usize,
    pub c_fc: usize,
    pub mlp_proj: usize,
}

/// Whole-buffer views, shorter to write.
pub(crate) fn all<B: Backend>(b: &B::Buf) -> View<'_, B> {
    View::all(b)
}
pub(crate) fn all_mut<B: Backend>(b: &mut B::Buf) -> ViewMut<'_, B> {
    ViewMut::all(b)
}

/// The first `len` elements of a buffer: a forward over fewer tokens than the buffers were sized for (KV-cached
/// decoding feeds a prompt or one token through the training buffers) reads and writes only their head.
pub(crate) fn head<B: Backend>(b: &B::Buf, len: usize) -> View<'_, B> {
    View::at(b, 0, len)
}
pub(crate) fn head_mut<B: Backend>(b: &mut B::Buf, len: usize) -> ViewMut<'_, B> {
    ViewMut::at(b, 0, len)
}
