//! The GPT: embedding -> rmsnorm -> blocks -> rmsnorm -> chunked lm_head loss, and the reverse.
//!
//! Public API for the training loop:
//! - `Gpt::new(backend, cfg, batch, seq, policy)` allocates everything once (f32), `Gpt::with_precision`
//!   with a precision (bf16: f32 master weights, a bf16 working copy, bf16 activations; `Storages`);
//!   `init(seed)`. `Gpt::with_sharded_master` (bf16, ZeRO-1) keeps the f32 master of one rank's pieces only
//!   (`MasterMap`); the working copy stays whole.
//! - `forward_backward(inputs, targets, loss_scale)` -> mean loss; grads += loss_scale * d(mean loss)/dθ.
//! - `forward_losses(inputs, targets, out)` -> per-token losses in nats (0 where the target is -1).
//! - `zero_grads()`, `param_specs()`, `read_param` / `write_param` by name (checkpoints), and on the CPU
//!   backend `params()`, `params_mut()`, `grads()`, `grads_mut()` as host slices.

use super::{
    activation_layout_for, all, all_mut, attention, embedding, gemm_input, head, head_mut, init, loss, mlp, norm,
    ActivationLayout, BlockParams, GradScratch, KvCache, LayerActs, LayerShapes, LossChunks, MasterMap, Recompute,
    Storages,
};
use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, Gemm, Storage, View, ViewMut};
use crate::bail;
use crate::config::{ModelConfig, ParamSpec, LOGIT_SOFTCAP};
use crate::error::{NcError, Result};
use crate::nvtx;
use crate::precision::Precision;

/// Which parameter grads the backward has just made final for the current micro-step, in the order it
/// makes them: lm_head (the loss), then the blocks from the last to the first, then wte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GradsReady {
    LmHead,
    Layer(usize),
    Wte,
}

/// What `forward_backward_hooked` calls each time some grads are final: the backend and the whole grad
/// buffer, so a data-parallel rank can start reducing them (on a device: queue it on another stream) while
/// the rest of the backward runs. The hook must not write grads other than the ones just made ready.
pub type GradHook<'a, B> = &'a mut dyn FnMut(&B, &mut <B as Backend>::Buf, GradsReady);

pub struct Gpt<B: Backend> {
    pub be: B,
    pub cfg: ModelConfig,
    pub batch: usize,
    pub seq: usize,
    pub policy: Recompute,
    pub precision: Precision,
    /// Which buffers are bf16 (from `precision`).
    pub storages: Storages,
    pub layout: ActivationLayout,
    specs: Vec<ParamSpec>,
    blocks: Vec<BlockParams>,
    wte_off: usize,
    lm_head_off: usize,
    /// The master weights (f32; what the optimizer updates and checkpoints hold): every parameter in the
    /// parameter layout, or with a sharded master only this rank's pieces, packed as `master` says.
    pub(crate) params: B::Buf,
    /// Where `params`' elements sit in the parameter layout.
    master: MasterMap,
    /// With casts (bf16): the working copy every GEMM and the embedding lookup read; empty otherwise.
    working: B::Buf,
    /// The master changed since `working` was made from it (refreshed before the next forward).
    working_stale: bool,
    grads: B::Buf,
    /// Rotary cos/sin for positions 0..max(seq, cfg.sequence_len).
    pub(crate) rope: B::Buf,
    ids: B::Ids,
    targets: B::Ids,
    /// Host staging of ids/targets (validated before upload) and of per-token losses.
    ids_host: Vec<i32>,
    targets_host: Vec<i32>,
    losses_host: Vec<f32>,
    /// x0 = rmsnorm(embedding output) and its rstd (the embedding output itself passes through `resid`).
    x0: B::Buf,
    rstd0: B::Buf,
    /// The residual stream (updated in place through the blocks).
    resid: B::Buf,
    /// Under Recompute::Full: each layer's input, and the stream a recomputed forward writes into.
    layer_in: Vec<B::Buf>,
    resid_tmp: B::Buf,
    acts: Vec<LayerActs<B>>,
    /// MLP hidden relu(u)^2: one per layer under None, one shared under Selective and Full.
    mlp_hidden: Vec<B::Buf>,
    xf: B::Buf,
    rstdf: B::Buf,
    scratch: GradScratch<B>,
    logits_ws: B::Buf,
    /// With casts: the bf16 copy of the logits chunk's gradient the lm_head backward GEMMs read.
    dlogits_cast: B::Buf,
    losses: B::Buf,
}

impl<B: Backend> Gpt<B> {
    /// Allocate a model for micro-batches of `batch` sequences of `seq` tokens. Params start at zero:
    /// call `init(seed)` or write them by name.
    pub fn new(be: B, cfg: ModelConfig, batch: usize, seq: usize, policy: Recompute) -> Result<Self> {
        Self::with_precision(be, cfg, batch, seq, policy, Precision::Fp32)
    }

    /// `new` with a precision: Fp32 / Fp32Gpu allocate everything f32 (exactly `new`); Bf16 stores as
    /// `Storages::for_precision` says.
    pub fn with_precision(
        be: B,
        cfg: ModelConfig,
        batch: usize,
        seq: usize,
        policy: Recompute,
        precision: Precision,
    ) -> Result<Self> {
        Self::build(be, cfg, batch, seq, policy, precision, MasterMap::full(&cfg))
    }

    /// `with_precision` (Bf16 only) for rank `rank` of `world_size` under ZeRO-1: the f32 master holds only
    /// the pieces this rank updates (`MasterMap::owned`), the bf16 working copy every parameter. The
    /// optimizer updates the owned master and writes its pieces of the working copy; the other pieces of the
    /// working copy come from their owners (`train::zero1`); checkpoints gather the master tensor by tensor.
    /// fp32 keeps the whole master on every rank (its GEMMs read the master itself).
    #[allow(clippy::too_many_arguments)]
    pub fn with_sharded_master(
        be: B,
        cfg: ModelConfig,
        batch: usize,
        seq: usize,
        policy: Recompute,
        precision: Precision,
        rank: usize,
        world_size: usize,
    ) -> Result<Self> {
        if !Storages::for_precision(precision).has_casts() {
            bail!(
                "a sharded master needs bf16 working weights (--precision bf16); {} reads the master itself",
                precision.label()
            );
        }
        if world_size == 0 || rank >= world_size {
            bail!("rank {rank} is not in a world of size {world_size}");
        }
        cfg.validate()?;
        let master = MasterMap::owned(&cfg, rank, world_size);
        Self::build(be, cfg, batch, seq, policy, precision, master)
    }

    fn build(
        be: B,
        cfg: ModelConfig,
        batch: usize,
        seq: usize,
        policy: Recompute,
        precision: Precision,
        master: MasterMap,
    ) -> Result<Self> {
        cfg.validate()?;
        if batch == 0 || seq == 0 {
            bail!("micro-batch {batch} x sequence {seq}: both must be at least 1");
        }
        if seq > cfg.sequence_len {
            bail!(
                "sequence length {seq} exceeds the model's sequence_len {}",
                cfg.sequence_len
            );
        }
        let n = batch * seq;
        let specs = cfg.param_specs();
        let find = |name: &str| {
            specs
                .iter()
                .find(|p| p.name == name)
                .map(|p| p.offset)
                .expect("param_specs names")
        };
        let blocks = (0..cfg.n_layer)
            .map(|i| {
                let p = format!("transformer.h.{i}");
                BlockParams {
                    c_q: find(&format!("{p}.attn.c_q.weight")),
                    c_k: find(&format!("{p}.attn.c_k.weight")),
                    c_v: find(&format!("{p}.attn.c_v.weight")),
                    attn_proj: find(&format!("{p}.attn.c_proj.weight")),
                    c_fc: find(&format!("{p}.mlp.c_fc.weight")),
                    mlp_proj: find(&format!("{p}.mlp.c_proj.weight")),
                }
            })
            .collect();
        let (wte_off, lm_head_off) = (find("transformer.wte.weight"), find("lm_head.weight"));
        let layout = activation_layout_for(&cfg, batch, seq, policy, precision);
        let st = Storages::for_precision(precision);
        let s = LayerShapes::new(&cfg, n);
        let d = cfg.n_embd;
        let nparams = cfg.num_params() as usize;
        // Every buffer through try_alloc_as: a model that does not fit is an error with the allocator's report.
        let alloc = |len: usize, storage: Storage| be.try_alloc_as(len, storage);
        let mut rope = alloc(2 * cfg.sequence_len * (cfg.head_dim / 2), Storage::F32)?;
        be.upload(all_mut(&mut rope), &init::rotary_table(cfg.sequence_len, cfg.head_dim));
        let full = policy == Recompute::Full;
        let casts = st.has_casts();
        let model = Gpt {
            params: alloc(master.len(), Storage::F32)?,
            master,
            working: alloc(if casts { nparams } else { 0 }, st.weights)?,
            working_stale: true,
            grads: alloc(nparams, Storage::F32)?,
            rope,
            ids: be.alloc_ids(n),
            targets: be.alloc_ids(n),
            ids_host: vec![0; n],
            targets_host: vec![0; n],
            losses_host: vec![0.0; n],
            x0: alloc(n * d, st.saved)?,
            rstd0: alloc(n, st.stats)?,
            resid: alloc(n * d, st.stream)?,
            layer_in: if full {
                (0..cfg.n_layer)
                    .map(|_| alloc(n * d, st.stream))
                    .collect::<Result<_>>()?
            } else {
                Vec::new()
            },
            resid_tmp: alloc(if full { n * d } else { 0 }, st.stream)?,
            acts: (0..layout.layer_sets)
                .map(|_| LayerActs::new(&be, &s, &st))
                .collect::<Result<_>>()?,
            mlp_hidden: (0..layout.hidden_sets)
                .map(|_| alloc(n * s.ff, st.saved))
                .collect::<Result<_>>()?,
            xf: alloc(n * d, st.saved)?,
            rstdf: alloc(n, st.stats)?,
            scratch: GradScratch::new(&be, &s, &st)?,
            logits_ws: alloc(layout.loss_chunk_rows * cfg.vocab_size, st.stats)?,
            dlogits_cast: alloc(
                if casts {
                    layout.loss_chunk_rows * cfg.vocab_size
                } else {
                    0
                },
                st.grad_scratch,
            )?,
            losses: alloc(n, st.stats)?,
            specs,
            blocks,
            wte_off,
            lm_head_off,
            layout,
            be,
            cfg,
            batch,
            seq,
            policy,
            precision,
            storages: st,
        };
        Ok(model)
    }

    pub fn tokens(&self) -> usize {
        self.batch * self.seq
    }

    pub fn param_specs(&self) -> &[ParamSpec] {
        &self.specs
    }

    /// Initialize every parameter (SPEC.md section 3), reproducibly from `seed`.
    pub fn init(&mut self, seed: u64) {
        let mut host = vec![0.0f32; self.cfg.num_params() as usize];
        init::init_params(&self.specs, &mut host, seed);
        self.load_from_host(&host);
    }

    /// Every parameter from a host slice in the parameter layout: the master's pieces, and with a sharded
    /// master the whole working copy too (rounded by the upload, the same rounding as `refresh_weights`'
    /// cast), since no rank could cast the pieces it holds no master of.
    fn load_from_host(&mut self, host: &[f32]) {
        if !self.master.is_sharded() {
            self.be.upload(all_mut(&mut self.params), host);
            self.working_stale = true;
            return;
        }
        for p in self.master.pieces() {
            self.be
                .upload(ViewMut::at(&mut self.params, p.at, p.len), &host[p.range()]);
        }
        self.be.upload(all_mut(&mut self.working), host);
        self.working_stale = false;
    }

    /// Where the master's elements sit in the parameter layout (all of them, or this rank's pieces).
    pub fn master_map(&self) -> &MasterMap {
        &self.master
    }

    /// Make the working copy from the master (the cast to bf16), if the master changed since it was made.
    /// Every forward does this first; the training loop calls it right after each optimizer step, where
    /// the device engine's optimizer will write both instead. Nothing to do without casts. With a sharded
    /// master only the owned pieces are cast: the others are the owners' to send (`train::zero1`), which
    /// the training loop gathers right after (and then calls `working_written`).
    pub fn refresh_weights(&mut self) {
        if self.working_stale && B::buf_len(&self.working) > 0 {
            for p in self.master.pieces() {
                self.be.copy(
                    View::at(&self.params, p.at, p.len),
                    ViewMut::at(&mut self.working, p.start, p.len),
                );
            }
        }
        self.working_stale = false;
    }

    /// What every GEMM and the embedding lookup read: the working copy with casts, else the master.
    /// The working copy must be current (`refresh_weights` after changing the master).
    pub fn weights_buf(&self) -> &B::Buf {
        assert!(
            !self.working_stale || B::buf_len(&self.working) == 0,
            "the bf16 working weights are older than the master: call refresh_weights first"
        );
        gemm_input::<B>(&self.params, &self.working)
    }

    pub fn zero_grads(&mut self) {
        self.be.fill(all_mut(&mut self.grads), 0.0);
    }

    fn spec(&self, name: &str) -> Result<&ParamSpec> {
        self.specs.iter().find(|p| p.name == name).ok_or_else(|| {
            NcError::new(format!(
                "no parameter named '{name}' in a model of shape {:?}",
                self.cfg
            ))
        })
    }

    /// The (offset, numel) of parameter `name`, after checking that a host slice of `len` values matches it.
    fn spec_holding(&self, name: &str, len: usize) -> Result<(usize, usize)> {
        let spec = self.spec(name)?;
        if len != spec.numel() {
            bail!(
                "parameter '{name}' has {}x{} = {} values, the host slice holds {len}",
                spec.rows,
                spec.cols,
                spec.numel()
            );
        }
        Ok((spec.offset, spec.numel()))
    }

    /// Copy a parameter in by name; `data` is row-major (out, in), exactly `rows * cols` values. With a
    /// sharded master: the owned part of its master, and all of its working copy.
    pub fn write_param(&mut self, name: &str, data: &[f32]) -> Result<()> {
        let (offset, numel) = self.spec_holding(name, data.len())?;
        if !self.master.is_sharded() {
            self.be.upload(ViewMut::at(&mut self.params, offset, numel), data);
            self.working_stale = true;
            return Ok(());
        }
        for (r, at) in self.master.overlaps(offset..offset + numel) {
            let src = &data[r.start - offset..r.end - offset];
            self.be.upload(ViewMut::at(&mut self.params, at, r.len()), src);
        }
        self.be.upload(ViewMut::at(&mut self.working, offset, numel), data);
        Ok(())
    }

    /// Copy a parameter's master out by name into `out` (exactly `rows * cols` values). A sharded master
    /// holds only this rank's pieces: another rank's parameter is an error (checkpoints gather it).
    pub fn read_param(&self, name: &str, out: &mut [f32]) -> Result<()> {
        let (offset, numel) = self.spec_holding(name, out.len())?;
        let Some(at) = self.master.locate(offset..offset + numel) else {
            bail!("parameter '{name}' is not all in this rank's sharded master; gather it from its owners");
        };
        self.be.download(View::at(&self.params, at, numel), out);
        Ok(())
    }

    /// Copy a parameter's gradient out by name.
    pub fn read_grad(&self, name: &str, out: &mut [f32]) -> Result<()> {
        let (offset, numel) = self.spec_holding(name, out.len())?;
        self.be.download(View::at(&self.grads, offset, numel), out);
        Ok(())
    }

    /// Check and upload one micro-batch. Outside input: every problem is an error, nothing is changed.
    fn load_batch(&mut self, inputs: &[u32], targets: &[i32]) -> Result<usize> {
        let (n, v) = (self.tokens(), self.cfg.vocab_size);
        if inputs.len() != n || targets.len() != n {
            bail!(
                "a micro-batch needs {n} inputs and {n} targets (batch {} x seq {}), got {} and {}",
                self.batch,
                self.seq,
                inputs.len(),
                targets.len()
            );
        }
        if let Some((i, &t)) = inputs.iter().enumerate().find(|(_, &t)| t as usize >= v) {
            bail!("input token {t} at position {i} is outside the vocabulary (size {v}); is the data from another tokenizer?");
        }
        if let Some((i, &t)) = targets.iter().enumerate().find(|(_, &t)| t < -1 || t >= v as i32) {
            bail!("target {t} at position {i} is neither -1 (ignore) nor a token id below {v}");
        }
        for (dst, &src) in self.ids_host.iter_mut().zip(inputs) {
            *dst = src as i32;
        }
        self.targets_host.copy_from_slice(targets);
        self.be.upload_ids(&mut self.ids, &self.ids_host);
        self.be.upload_ids(&mut self.targets, &self.targets_host);
        Ok(targets.iter().filter(|&&t| t >= 0).count())
    }

    /// Embedding, its rmsnorm, every block, the final rmsnorm over `batch` x `t` tokens (the ids uploaded
    /// last; at most `tokens()`): fills the head of `xf` (and of the saved activations). The one forward of
    /// training, evaluation and decoding: with `kv` (batch 1) the tokens continue the cached sequence and every
    /// layer's attention appends to and reads from the cache (the caller advances it).
    fn forward_trunk(&mut self, batch: usize, t: usize, mut kv: Option<&mut KvCache<B>>) {
        self.refresh_weights();
        let s = LayerShapes::new(&self.cfg, batch * t);
        let (be, n, d) = (&self.be, s.n, s.d);
        let weights = gemm_input::<B>(&self.params, &self.working);
        embedding::forward(
            be,
            &self.ids,
            n,
            View::at(weights, self.wte_off, self.cfg.vocab_size * d),
            d,
            head_mut(&mut self.resid, n * d),
        );
        norm::forward(
            be,
            head(&self.resid, n * d),
            n,
            d,
            head_mut(&mut self.x0, n * d),
            head_mut(&mut self.rstd0, n),
        );
        be.copy(head(&self.x0, n * d), head_mut(&mut self.resid, n * d));
        for l in 0..self.cfg.n_layer {
            let _r = nvtx::range_with(|| format!("layer {l} fwd"));
            // Which saved set and which MLP hidden buffer this layer writes.
            let (set, hidden) = match self.policy {
                Recompute::None => (l, l),
                Recompute::Selective => (l, 0),
                Recompute::Full => {
                    be.copy(head(&self.resid, n * d), head_mut(&mut self.layer_in[l], n * d));
                    (0, 0)
                }
            };
            let w = &self.blocks[l];
            let a = &mut self.acts[set];
            attention::forward(
                be,
                &s,
                batch,
                t,
                weights,
                w,
                &mut self.resid,
                a,
                &mut self.scratch,
                &self.rope,
                kv.as_deref_mut().map(|c| c.layer(l)),
            );
            mlp::forward(be, &s, weights, w, &mut self.resid, a, &mut self.mlp_hidden[hidden]);
        }
        norm::forward(
            be,
            head(&self.resid, n * d),
            n,
            d,
            head_mut(&mut self.xf, n * d),
            head_mut(&mut self.rstdf, n),
        );
    }

    /// The softcapped logits of rows r0..r0+rows of `xf` (rows at most the loss workspace's) into `out`.
    fn logits_of_rows(&mut self, r0: usize, rows: usize, out: &mut [f32]) {
        let (d, v) = (self.cfg.n_embd, self.cfg.vocab_size);
        let weights = gemm_input::<B>(&self.params, &self.working);
        let x = View::at(&self.xf, r0 * d, rows * d);
        let w = View::at(weights, self.lm_head_off, v * d);
        let logits = ViewMut::at(&mut self.logits_ws, 0, rows * v);
        self.be.matmul(Gemm::nt(rows, v, d), x, w, logits);
        self.be
            .softcap(ViewMut::at(&mut self.logits_ws, 0, rows * v), LOGIT_SOFTCAP);
        self.be.download(View::at(&self.logits_ws, 0, rows * v), out);
    }

    /// Forward only: the softcapped logits at every position into `out` (batch * seq * vocab values, row-major
    /// by token), computed chunk by chunk (`LossChunks`: the device never holds them all). For tests and tools.
    pub fn forward_logits(&mut self, inputs: &[u32], out: &mut [f32]) -> Result<()> {
        let (n, v) = (self.tokens(), self.cfg.vocab_size);
        if out.len() != n * v {
            bail!(
                "forward_logits: the output holds {} values, {n} tokens x vocab {v} need {}",
                out.len(),
                n * v
            );
        }
        self.load_batch(inputs, &vec![-1; n])?;
        self.forward_trunk(self.batch, self.seq, None);
        for (c0, rows) in LossChunks::new(v, n).iter() {
            self.logits_of_rows(c0, rows, &mut out[c0 * v..(c0 + rows) * v]);
        }
        Ok(())
    }

    /// Forward only over `rows` sequences of `t` tokens (`inputs`, rows * t of them, at most `tokens()`; t at
    /// most the rotary table's length), then the softcapped logits at the flat token positions of each
    /// `(first, count)` span, span after span, into `out` (cleared first). For evaluations that read a few
    /// positions per sequence (CORE's continuations): only those rows of logits are computed and downloaded.
    pub fn forward_span_logits(
        &mut self,
        rows: usize,
        t: usize,
        inputs: &[u32],
        spans: &[(usize, usize)],
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let (n, v) = (rows * t, self.cfg.vocab_size);
        if rows == 0 || t == 0 || n > self.tokens() || t > self.cfg.sequence_len || inputs.len() != n {
            bail!(
                "forward_span_logits: {rows} rows x {t} tokens ({} inputs) do not fit this model (batch {} x seq {})",
                inputs.len(),
                self.batch,
                self.seq
            );
        }
        if let Some(&tok) = inputs.iter().find(|&&x| x as usize >= v) {
            bail!("token {tok} is outside the vocabulary (size {v})");
        }
        if let Some(&(first, count)) = spans.iter().find(|&&(first, count)| first + count > n) {
            bail!("forward_span_logits: span ({first}, {count}) ends past the {n} tokens fed");
        }
        for (dst, &x) in self.ids_host.iter_mut().zip(inputs) {
            *dst = x as i32;
        }
        self.be.upload_ids(&mut self.ids, &self.ids_host[..n]);
        self.forward_trunk(rows, t, None);
        let chunk_rows = LossChunks::new(v, self.tokens()).max_rows();
        out.clear();
        for &(first, count) in spans {
            let mut done = 0;
            while done < count {
                let r = (count - done).min(chunk_rows);
                let at = out.len();
                out.resize(at + r * v, 0.0);
                self.logits_of_rows(first + done, r, &mut out[at..]);
                done += r;
            }
        }
        Ok(())
    }

    /// KV-cached decoding through the model's own forward: feeds `tokens` (one sequence, continuing what `kv`
    /// holds), appends their keys and values to `kv`, and writes the softcapped logits at the last of them
    /// into `logits` (vocab values). A feed longer than the model's buffers (`tokens()`) runs in pieces.
    /// Outside input: every problem is an error, and then nothing (the cache included) has changed.
    pub fn decode(&mut self, kv: &mut KvCache<B>, tokens: &[u32], logits: &mut [f32]) -> Result<()> {
        let c = self.cfg;
        if tokens.is_empty() {
            bail!("decoding needs at least one token to feed the model");
        }
        if kv.n_layer() != c.n_layer || kv.kv_dim() != c.kv_dim() || kv.max_len() > c.sequence_len {
            bail!("this KV cache was made for another model; make one with KvCache::new(model, max_len)");
        }
        if kv.len() + tokens.len() > kv.max_len() {
            bail!(
                "sequence of {} tokens exceeds the KV cache's max_len {}",
                kv.len() + tokens.len(),
                kv.max_len()
            );
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            bail!("token {t} is outside the vocabulary (size {})", c.vocab_size);
        }
        if logits.len() != c.vocab_size {
            bail!(
                "decode: the logits output holds {} values, the vocabulary {}",
                logits.len(),
                c.vocab_size
            );
        }
        let mut last = 0;
        for piece in tokens.chunks(self.tokens()) {
            for (dst, &t) in self.ids_host.iter_mut().zip(piece) {
                *dst = t as i32;
            }
            self.be.upload_ids(&mut self.ids, &self.ids_host[..piece.len()]);
            self.forward_trunk(1, piece.len(), Some(&mut *kv));
            kv.advance(piece.len());
            last = piece.len() - 1;
        }
        self.logits_of_rows(last, 1, logits);
        Ok(())
    }

    /// Backward from `scratch.dxn` = dL/d(xf) down to the embedding; parameter grads accumulate.
    fn backward_trunk(&mut self, hook: GradHook<'_, B>) {
        let s = LayerShapes::new(&self.cfg, self.tokens());
        let (be, n, d) = (&self.be, s.n, s.d);
        let weights = gemm_input::<B>(&self.params, &self.working);
        let scr = &mut self.scratch;
        let (y, rstd, dy) = (all(&self.xf), all(&self.rstdf), all(&scr.dxn));
        be.rmsnorm_backward(y, rstd, dy, n, d, all_mut(&mut scr.dresid), false);
        for l in (0..self.cfg.n_layer).rev() {
            let _r = nvtx::range_with(|| format!("layer {l} bwd"));
            let w = &self.blocks[l];
            let (set, hidden) = match self.policy {
                Recompute::None => (l, l),
                Recompute::Selective => {
                    // The one activation selective dropped: h = relu(u)^2, from this layer's saved u.
                    be.relu2_forward(all(&self.acts[l].u), all_mut(&mut self.mlp_hidden[0]));
                    (l, 0)
                }
                Recompute::Full => {
                    // Re-run this layer's forward from its saved input; scr.dq/dk are free scratch here.
                    be.copy(all(&self.layer_in[l]), all_mut(&mut self.resid_tmp));
                    let a = &mut self.acts[0];
                    attention::forward(
                        be,
                        &s,
                        self.batch,
                        self.seq,
                        weights,
                        w,
                        &mut self.resid_tmp,
                        a,
                        scr,
                        &self.rope,
                        None,
                    );
                    mlp::forward(be, &s, weights, w, &mut self.resid_tmp, a, &mut self.mlp_hidden[0]);
                    (0, 0)
                }
            };
            let a = &self.acts[set];
            let h = &self.mlp_hidden[hidden];
            mlp::backward(be, &s, weights, &mut self.grads, w, a, h, scr);
            attention::backward(
                be,
                &s,
                self.batch,
                self.seq,
                weights,
                &mut self.grads,
                w,
                a,
                scr,
                &self.rope,
            );
            // every grad of layer l is written by its own mlp and attention backward, and by nothing after
            hook(be, &mut self.grads, GradsReady::Layer(l));
        }
        // x0 = rmsnorm(emb): dL/d(emb) into dxn, then scatter into wte's grad.
        let (y, rstd, dy) = (all(&self.x0), all(&self.rstd0), all(&scr.dresid));
        be.rmsnorm_backward(y, rstd, dy, n, d, all_mut(&mut scr.dxn), false);
        let dwte = ViewMut::at(&mut self.grads, self.wte_off, self.cfg.vocab_size * d);
        embedding::backward(be, &self.ids, n, all(&scr.dxn), d, dwte);
        hook(be, &mut self.grads, GradsReady::Wte);
    }

    /// One micro-step: returns the mean loss over targets that are not -1, and adds
    /// `loss_scale * d(mean loss)/d(params)` into the grads (loss_scale = 1/grad_accum).
    /// A batch whose targets are all -1 has loss 0 and adds nothing.
    pub fn forward_backward(&mut self, inputs: &[u32], targets: &[i32], loss_scale: f32) -> Result<f32> {
        self.forward_backward_hooked(inputs, targets, loss_scale, &mut |_, _, _| {})
    }

    /// `forward_backward`, calling `hook` as each group of grads becomes final (`GradsReady`).
    pub fn forward_backward_hooked(
        &mut self,
        inputs: &[u32],
        targets: &[i32],
        loss_scale: f32,
        hook: GradHook<'_, B>,
    ) -> Result<f32> {
        let counted = self.load_batch(inputs, targets)?;
        let fwd = nvtx::range("forward");
        self.forward_trunk(self.batch, self.seq, None);
        drop(fwd);
        let loss_range = nvtx::range("loss");
        let scale = if counted == 0 { 0.0 } else { loss_scale / counted as f32 };
        self.lm_head_loss(Some(scale));
        drop(loss_range);
        hook(&self.be, &mut self.grads, GradsReady::LmHead);
        let bwd = nvtx::range("backward");
        self.backward_trunk(hook);
        drop(bwd);
        self.be.download(all(&self.losses), &mut self.losses_host);
        let sum: f64 = self.losses_host.iter().map(|&l| l as f64).sum();
        Ok(if counted == 0 {
            0.0
        } else {
            (sum / counted as f64) as f32
        })
    }

    /// Forward only: per-token losses in nats into `out` (batch * seq values, 0 where the target is -1).
    pub fn forward_losses(&mut self, inputs: &[u32], targets: &[i32], out: &mut [f32]) -> Result<()> {
        if out.len() != self.tokens() {
            bail!(
                "forward_losses: the output holds {} values, the micro-batch has {}",
                out.len(),
                self.tokens()
            );
        }
        self.load_batch(inputs, targets)?;
        self.forward_trunk(self.batch, self.seq, None);
        self.lm_head_loss(None);
        self.be.download(all(&self.losses), out);
        Ok(())
    }

    /// lm_head, softcap and cross-entropy over the micro-batch the trunk just ran: per-token losses into
    /// `self.losses`; with `grad_scale` (d(scaled mean loss)/d(each loss)), the backward as well: lm_head's
    /// grad accumulates and `scratch.dxn` = dL/d(xf).
    fn lm_head_loss(&mut self, grad_scale: Option<f32>) {
        let (n, d, v) = (self.tokens(), self.cfg.n_embd, self.cfg.vocab_size);
        let grad = grad_scale.map(|scale| loss::LossGrad {
            scale,
            grads: &mut self.grads,
            dxf: &mut self.scratch.dxn,
        });
        let weights = gemm_input::<B>(&self.params, &self.working);
        let chunks = LossChunks::new(v, n);
        let (xf, targets, off) = (&self.xf, &self.targets, self.lm_head_off);
        let (logits, cast, losses) = (&mut self.logits_ws, &mut self.dlogits_cast, &mut self.losses);
        loss::forward_backward(
            &self.be, n, d, v, chunks, weights, off, xf, targets, logits, cast, losses, grad,
        );
    }

    /// Every activation buffer this model allocated (everything but params, the working copy, grads, the
    /// rotary table and ids), the loss workspace last two.
    fn activation_buffers(&self) -> Vec<&B::Buf> {
        let mut bufs: Vec<&B::Buf> = Vec::new();
        for a in &self.acts {
            bufs.extend(a.buffers());
        }
        bufs.extend(self.scratch.buffers());
        bufs.extend(self.layer_in.iter());
        bufs.extend(self.mlp_hidden.iter());
        bufs.extend([
            &self.x0,
            &self.rstd0,
            &self.resid,
            &self.resid_tmp,
            &self.xf,
            &self.rstdf,
            &self.losses,
            &self.logits_ws,
            &self.dlogits_cast,
        ]);
        bufs
    }

    /// Elements of every activation buffer: must equal `activation_layout(..).total`, which the planner
    /// prices.
    pub fn allocated_activation_elements(&self) -> usize {
        self.activation_buffers().into_iter().map(|b| B::buf_len(b)).sum()
    }

    /// Bytes of every activation buffer as its storage tag says a device stores it (bf16: 2 per element,
    /// even where the CPU twin holds it as an f32): what the plan's activations + loss workspace price.
    pub fn allocated_activation_bytes(&self) -> usize {
        self.activation_buffers()
            .into_iter()
            .map(|b| B::buf_len(b) * B::storage(b).bytes_per_element())
            .sum()
    }

    /// Bytes of the master weights and of the working copy, as stored.
    pub fn allocated_weight_bytes(&self) -> (usize, usize) {
        let bytes = |b: &B::Buf| B::buf_len(b) * B::storage(b).bytes_per_element();
        (bytes(&self.params), bytes(&self.working))
    }

    /// Storage of each named activation buffer of layer set 0 and the model-wide ones, for tests that pin
    /// the precision scheme.
    pub fn activation_storages(&self) -> Vec<(&'static str, crate::backend::Storage)> {
        let a = &self.acts[0];
        let sc = &self.scratch;
        let named: [(&'static str, &B::Buf); 29] = [
            ("xn1", &a.xn1),
            ("rstd1", &a.rstd1),
            ("q", &a.q),
            ("rstd_q", &a.rstd_q),
            ("k", &a.k),
            ("rstd_k", &a.rstd_k),
            ("v", &a.v),
            ("y", &a.y),
            ("lse", &a.lse),
            ("xn2", &a.xn2),
            ("rstd2", &a.rstd2),
            ("u", &a.u),
            ("h", &self.mlp_hidden[0]),
            ("x0", &self.x0),
            ("rstd0", &self.rstd0),
            ("resid", &self.resid),
            ("xf", &self.xf),
            ("rstdf", &self.rstdf),
            ("losses", &self.losses),
            ("logits", &self.logits_ws),
            ("dresid", &sc.dresid),
            ("dxn", &sc.dxn),
            ("dq", &sc.dq),
            ("dk", &sc.dk),
            ("dv", &sc.dv),
            ("dy", &sc.dy),
            ("du", &sc.du),
            ("master", &self.params),
            ("grads", &self.grads),
        ];
        named.iter().map(|(n, b)| (*n, B::storage(b))).collect()
    }

    /// Offsets of each block's matrices in the parameter (and grad) buffer.
    pub fn block_params(&self) -> &[BlockParams] {
        &self.blocks
    }
    pub fn wte_offset(&self) -> usize {
        self.wte_off
    }
    pub fn lm_head_offset(&self) -> usize {
        self.lm_head_off
    }

    /// The parameter buffer (backend handle); the sampler and the CUDA path read it through the backend.
    pub fn params_buf(&self) -> &B::Buf {
        &self.params
    }
    pub fn grads_buf(&self) -> &B::Buf {
        &self.grads
    }
}

/// A host copy of the parameters, for backends whose buffers live on a device: checkpoints save and load
/// through it. Empty (and unused) on the CPU, where the buffers are host memory already. (The optimizer
/// does not need it: on a device it runs there, `optim::device`.)
#[derive(Debug, Default)]
pub struct HostMirror {
    params: Vec<f32>,
}

/// Host access for every backend: in place on the CPU, through a `HostMirror` elsewhere.
impl<B: Backend> Gpt<B> {
    /// Every parameter, as one host slice in the checkpoint's layout. Not for a sharded master, which holds
    /// only this rank's pieces (a checkpoint gathers them: `train::zero1::Zero1::gather_master`).
    pub fn host_params<'a>(&'a self, mirror: &'a mut HostMirror) -> &'a [f32] {
        assert!(
            !self.master.is_sharded(),
            "host_params of a sharded master: gather it from the ranks (Zero1::gather_master)"
        );
        if let Some(p) = B::host_slice(&self.params) {
            return p;
        }
        mirror.params.resize(B::buf_len(&self.params), 0.0);
        self.be.download(View::all(&self.params), &mut mirror.params);
        &mirror.params
    }

    /// Overwrite every parameter from a host slice in the parameter layout (a checkpoint's). A sharded
    /// master keeps its own pieces of it (and the working copy all of it).
    pub fn set_params_from_host(&mut self, src: &[f32]) -> Result<()> {
        let n = self.master.params();
        if src.len() != n {
            bail!("{} parameter values given for a model of {n}", src.len());
        }
        self.load_from_host(src);
        Ok(())
    }

    /// Run `f` on the parameters as one host slice in the parameter layout (loading a checkpoint): in place
    /// on the CPU; elsewhere they are downloaded first and uploaded after. With a sharded master `f` sees
    /// the owned pieces' master and the working copy's (bf16) values elsewhere; afterwards the master keeps
    /// its pieces of what `f` left and the working copy all of it.
    pub fn update_params_on_host<R>(&mut self, mirror: &mut HostMirror, f: impl FnOnce(&mut [f32]) -> R) -> R {
        if self.master.is_sharded() {
            mirror.params.resize(self.master.params(), 0.0);
            self.be.download(View::all(&self.working), &mut mirror.params);
            for p in self.master.pieces() {
                self.be
                    .download(View::at(&self.params, p.at, p.len), &mut mirror.params[p.range()]);
            }
            let r = f(&mut mirror.params);
            let host = std::mem::take(&mut mirror.params);
            self.load_from_host(&host);
            mirror.params = host;
            return r;
        }
        self.working_stale = true;
        if let Some(p) = B::host_slice_mut(&mut self.params) {
            return f(p);
        }
        mirror.params.resize(B::buf_len(&self.params), 0.0);
        self.be.download(View::all(&self.params), &mut mirror.params);
        let r = f(&mut mirror.params);
        self.be.upload(ViewMut::all(&mut self.params), &mirror.params);
        r
    }

    /// The parameters and gradients as host slices, where the backend keeps them in host memory (the CPU):
    /// the host optimizer and the ranks' gradient sync work on them in place. None on a device. The
    /// parameters are the master as stored: with a sharded master only this rank's pieces (`master_map`).
    pub fn host_params_and_grads_mut(&mut self) -> Option<(&mut [f32], &mut [f32])> {
        self.working_stale = true;
        match (B::host_slice_mut(&mut self.params), B::host_slice_mut(&mut self.grads)) {
            (Some(p), Some(g)) => Some((p, g)),
            _ => None,
        }
    }

    /// The backend with the parameter and gradient buffers, borrowed together: what the device optimizer's
    /// clip (writes the grads) and step (writes the params, reads the grads) take. The parameters are the
    /// master as stored (packed when sharded: `master_map`).
    pub fn backend_params_grads_mut(&mut self) -> (&B, &mut B::Buf, &mut B::Buf) {
        self.working_stale = true;
        (&self.be, &mut self.params, &mut self.grads)
    }

    /// `backend_params_grads_mut` plus the bf16 working copy (None without casts), for an optimizer that
    /// writes the copy itself (`DeviceOptimizer::step_writing`). The copy counts as stale until the caller
    /// says it was rewritten whole (`working_written`).
    pub fn backend_params_grads_working_mut(&mut self) -> (&B, &mut B::Buf, &mut B::Buf, Option<&mut B::Buf>) {
        self.working_stale = true;
        let working = if B::buf_len(&self.working) > 0 {
            Some(&mut self.working)
        } else {
            None
        };
        (&self.be, &mut self.params, &mut self.grads, working)
    }

    /// The optimizer rewrote every element of the working copy from the new master (bf16(p), the same value
    /// `refresh_weights`' cast stores), so it is current: no cast pass before the next forward. With a
    /// sharded master: the owned pieces were written (by the optimizer or `refresh_weights`) and every
    /// other piece gathered from its owner.
    pub fn working_written(&mut self) {
        self.working_stale = false;
    }
}

/// Host access on the CPU backend: the optimizers and checkpoints work on these slices directly. The params
/// are the master as stored (with a sharded master only this rank's pieces, packed: `master_map`).
impl Gpt<CpuBackend> {
    pub fn params(&self) -> &[f32] {
        CpuBackend::host(&self.params)
    }
    pub fn params_mut(&mut self) -> &mut [f32] {
        self.working_stale = true;
        CpuBackend::host_mut(&mut self.params)
    }
    pub fn grads(&self) -> &[f32] {
        CpuBackend::host(&self.grads)
    }
    pub fn grads_mut(&mut self) -> &mut [f32] {
        CpuBackend::host_mut(&mut self.grads)
    }
    /// Params and grads at once (an optimizer step reads one and writes the other).
    pub fn params_and_grads_mut(&mut self) -> (&mut [f32], &mut [f32]) {
        self.working_stale = true;
        (
            CpuBackend::host_mut(&mut self.params),
            CpuBackend::host_mut(&mut self.grads),
        )
    }
}
