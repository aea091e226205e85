//! TEMPORARY: the sampler's own copy of the block forward, kept only while the fold into the model's forward is
//! compared with it (core/tests/sampling.rs); removed in the next commit.
//!
//! Sampling from a model: KV-cached generation (prefill a prompt, then one token at a time), greedy and
//! temperature + top-k sampling with a seeded RNG.
//!
//! The inference forward reuses the backend ops of training; what differs is that k and v go into a
//! per-layer cache of `max_len` positions and queries attend to everything cached so far (`AttnShape` with
//! q_pos0 = the cache length). Only the last position's logits are computed.

use crate::backend::{AttnShape, Backend, View, ViewMut};
use crate::bail;
use crate::config::{LOGIT_SOFTCAP, RMSNORM_EPS};
use crate::error::Result;
use crate::model::{Gpt, Rng};
use crate::sample::{pick_token, Sampling};

/// KV cache and work buffers for one sequence of up to `max_len` tokens.
pub struct LegacySampler<B: Backend> {
    max_len: usize,
    len: usize,
    k_cache: Vec<B::Buf>,
    v_cache: Vec<B::Buf>,
    ids: B::Ids,
    ids_host: Vec<i32>,
    x: B::Buf,
    xn: B::Buf,
    rstd: B::Buf,
    q: B::Buf,
    qn: B::Buf,
    rstd_q: B::Buf,
    k: B::Buf,
    rstd_k: B::Buf,
    y: B::Buf,
    lse: B::Buf,
    u: B::Buf,
    hid: B::Buf,
    logits: B::Buf,
    logits_host: Vec<f32>,
    /// (logit, token) scratch for top-k.
    cand: Vec<(f32, u32)>,
}

impl<B: Backend> LegacySampler<B> {
    /// Buffers for sequences of up to `max_len` tokens (at most the model's sequence_len: the rotary
    /// table ends there).
    pub fn new(model: &Gpt<B>, max_len: usize) -> Result<Self> {
        let c = &model.cfg;
        if max_len == 0 || max_len > c.sequence_len {
            bail!(
                "generation length {max_len} must be between 1 and the model's sequence_len {}",
                c.sequence_len
            );
        }
        let be = &model.be;
        let (d, qd, kvd, n) = (c.n_embd, c.n_head * c.head_dim, c.kv_dim(), max_len);
        Ok(LegacySampler {
            max_len,
            len: 0,
            k_cache: (0..c.n_layer).map(|_| be.alloc(n * kvd)).collect(),
            v_cache: (0..c.n_layer).map(|_| be.alloc(n * kvd)).collect(),
            ids: be.alloc_ids(n),
            ids_host: vec![0; n],
            x: be.alloc(n * d),
            xn: be.alloc(n * d),
            rstd: be.alloc(n),
            q: be.alloc(n * qd),
            qn: be.alloc(n * qd),
            rstd_q: be.alloc(n * c.n_head),
            k: be.alloc(n * kvd),
            rstd_k: be.alloc(n * c.n_kv_head),
            y: be.alloc(n * qd),
            lse: be.alloc(n * c.n_head),
            u: be.alloc(n * 4 * d),
            hid: be.alloc(n * 4 * d),
            logits: be.alloc(c.vocab_size),
            logits_host: vec![0.0; c.vocab_size],
            cand: Vec::with_capacity(c.vocab_size),
        })
    }

    /// Tokens in the cache.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// Append `tokens` to the cache and return the softcapped logits at the last new position.
    pub fn extend(&mut self, model: &Gpt<B>, tokens: &[u32]) -> Result<&[f32]> {
        let c = model.cfg;
        let (n, pos0) = (tokens.len(), self.len);
        if n == 0 {
            bail!("generation needs at least one token to feed the model");
        }
        if pos0 + n > self.max_len {
            bail!(
                "sequence of {} tokens exceeds the sampler's max_len {}",
                pos0 + n,
                self.max_len
            );
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            bail!("token {t} is outside the vocabulary (size {})", c.vocab_size);
        }
        for (dst, &t) in self.ids_host.iter_mut().zip(tokens) {
            *dst = t as i32;
        }
        let be = &model.be;
        let p = model.weights_buf();
        let (d, h, hkv, hd) = (c.n_embd, c.n_head, c.n_kv_head, c.head_dim);
        let (qd, kvd, ff, v) = (h * hd, hkv * hd, 4 * d, c.vocab_size);
        let w = |off: usize, len: usize| View::<B>::at(p, off, len);
        be.upload_ids(&mut self.ids, &self.ids_host[..n]);
        be.embedding_forward(
            &self.ids,
            n,
            w(model.wte_offset(), v * d),
            d,
            ViewMut::at(&mut self.xn, 0, n * d),
        );
        be.rmsnorm_forward(
            View::at(&self.xn, 0, n * d),
            n,
            d,
            RMSNORM_EPS,
            ViewMut::at(&mut self.x, 0, n * d),
            ViewMut::at(&mut self.rstd, 0, n),
        );
        let rope = View::<B>::all(&model.rope);
        for l in 0..c.n_layer {
            let b = model.block_params()[l];
            // Attention: new k and v land in the cache at rows pos0..pos0+n.
            be.rmsnorm_forward(
                View::at(&self.x, 0, n * d),
                n,
                d,
                RMSNORM_EPS,
                ViewMut::at(&mut self.xn, 0, n * d),
                ViewMut::at(&mut self.rstd, 0, n),
            );
            let xn = View::<B>::at(&self.xn, 0, n * d);
            be.matmul(
                n,
                qd,
                d,
                xn,
                false,
                w(b.c_q, qd * d),
                true,
                ViewMut::at(&mut self.q, 0, n * qd),
                false,
            );
            be.matmul(
                n,
                kvd,
                d,
                xn,
                false,
                w(b.c_k, kvd * d),
                true,
                ViewMut::at(&mut self.k, 0, n * kvd),
                false,
            );
            let v_new = ViewMut::at(&mut self.v_cache[l], pos0 * kvd, n * kvd);
            be.matmul(n, kvd, d, xn, false, w(b.c_v, kvd * d), true, v_new, false);
            be.rotary_forward(ViewMut::at(&mut self.q, 0, n * qd), 1, n, h, hd, pos0, rope);
            be.rotary_forward(ViewMut::at(&mut self.k, 0, n * kvd), 1, n, hkv, hd, pos0, rope);
            be.rmsnorm_forward(
                View::at(&self.q, 0, n * qd),
                n * h,
                hd,
                RMSNORM_EPS,
                ViewMut::at(&mut self.qn, 0, n * qd),
                ViewMut::at(&mut self.rstd_q, 0, n * h),
            );
            be.rmsnorm_forward(
                View::at(&self.k, 0, n * kvd),
                n * hkv,
                hd,
                RMSNORM_EPS,
                ViewMut::at(&mut self.k_cache[l], pos0 * kvd, n * kvd),
                ViewMut::at(&mut self.rstd_k, 0, n * hkv),
            );
            let shape = AttnShape {
                batch: 1,
                tq: n,
                tk: pos0 + n,
                n_head: h,
                n_kv_head: hkv,
                head_dim: hd,
                q_pos0: pos0,
            };
            be.attention_forward(
                shape,
                View::at(&self.qn, 0, n * qd),
                View::at(&self.k_cache[l], 0, (pos0 + n) * kvd),
                View::at(&self.v_cache[l], 0, (pos0 + n) * kvd),
                ViewMut::at(&mut self.y, 0, n * qd),
                ViewMut::at(&mut self.lse, 0, n * h),
            );
            let y = View::<B>::at(&self.y, 0, n * qd);
            be.matmul(
                n,
                d,
                qd,
                y,
                false,
                w(b.attn_proj, d * qd),
                true,
                ViewMut::at(&mut self.x, 0, n * d),
                true,
            );
            // MLP.
            be.rmsnorm_forward(
                View::at(&self.x, 0, n * d),
                n,
                d,
                RMSNORM_EPS,
                ViewMut::at(&mut self.xn, 0, n * d),
                ViewMut::at(&mut self.rstd, 0, n),
            );
            let xn = View::<B>::at(&self.xn, 0, n * d);
            be.matmul(
                n,
                ff,
                d,
                xn,
                false,
                w(b.c_fc, ff * d),
                true,
                ViewMut::at(&mut self.u, 0, n * ff),
                false,
            );
            be.relu2_forward(View::at(&self.u, 0, n * ff), ViewMut::at(&mut self.hid, 0, n * ff));
            let hid = View::<B>::at(&self.hid, 0, n * ff);
            be.matmul(
                n,
                d,
                ff,
                hid,
                false,
                w(b.mlp_proj, d * ff),
                true,
                ViewMut::at(&mut self.x, 0, n * d),
                true,
            );
        }
        // Final norm and lm_head on the last position only.
        let last = (n - 1) * d;
        be.rmsnorm_forward(
            View::at(&self.x, last, d),
            1,
            d,
            RMSNORM_EPS,
            ViewMut::at(&mut self.xn, 0, d),
            ViewMut::at(&mut self.rstd, 0, 1),
        );
        be.matmul(
            1,
            v,
            d,
            View::at(&self.xn, 0, d),
            false,
            w(model.lm_head_offset(), v * d),
            true,
            ViewMut::all(&mut self.logits),
            false,
        );
        be.softcap(ViewMut::all(&mut self.logits), LOGIT_SOFTCAP);
        be.download(View::all(&self.logits), &mut self.logits_host);
        self.len += n;
        Ok(&self.logits_host)
    }

    /// The softcapped logits at the last position of a fresh forward over `prompt` (batch 1).
    pub fn logits_for_last_position(&mut self, model: &Gpt<B>, prompt: &[u32]) -> Result<Vec<f32>> {
        self.reset();
        Ok(self.extend(model, prompt)?.to_vec())
    }

    /// Prefill `prompt`, then sample `max_new` tokens one at a time (stopping early at `stop` if given).
    /// Returns the new tokens only. Reproducible for a given seed.
    pub fn generate(
        &mut self,
        model: &Gpt<B>,
        prompt: &[u32],
        max_new: usize,
        how: Sampling,
        seed: u64,
        stop: Option<u32>,
    ) -> Result<Vec<u32>> {
        if prompt.len() + max_new > self.max_len {
            bail!(
                "prompt {} + {} new tokens exceed the sampler's max_len {}",
                prompt.len(),
                max_new,
                self.max_len
            );
        }
        let mut rng = Rng::new(seed);
        let mut out = Vec::with_capacity(max_new);
        self.reset();
        if max_new == 0 {
            return Ok(out);
        }
        self.extend(model, prompt)?;
        loop {
            let tok = pick_token(&self.logits_host, how, &mut rng, &mut self.cand);
            out.push(tok);
            if out.len() == max_new || Some(tok) == stop {
                return Ok(out);
            }
            self.extend(model, &[tok])?;
        }
    }
}
