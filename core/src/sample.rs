//! Sampling from a model: KV-cached generation (prefill a prompt, then one token at a time), greedy and
//! temperature + top-k sampling with a seeded RNG.
//!
//! The forward is the model's own (`Gpt::decode`, one path for training, evaluation and decoding on every
//! backend): with a `KvCache`, each layer's attention writes the new tokens' k and v into the cache and the
//! queries attend to everything cached so far (`AttnShape` with q_pos0 = the cache length). Only the last
//! position's logits are computed.

use crate::backend::Backend;
use crate::bail;
use crate::error::Result;
use crate::model::{Gpt, KvCache, Rng};

/// How to pick the next token. temperature 0 = greedy (argmax); top_k 0 = no top-k cut.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    pub top_k: usize,
}

impl Sampling {
    pub fn greedy() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: 0,
        }
    }
}

/// A KV cache for one sequence of up to `max_len` tokens, with the last logits and the picker's scratch.
/// The forward is the model's own (`Gpt::decode`): the sampler holds no copy of the blocks.
pub struct Sampler<B: Backend> {
    cache: KvCache<B>,
    logits_host: Vec<f32>,
    /// (logit, token) scratch for top-k.
    cand: Vec<(f32, u32)>,
}

impl<B: Backend> Sampler<B> {
    /// A sampler for sequences of up to `max_len` tokens (at most the model's sequence_len: the rotary
    /// table ends there).
    pub fn new(model: &Gpt<B>, max_len: usize) -> Result<Self> {
        let vocab = model.cfg.vocab_size;
        Ok(Sampler {
            cache: KvCache::new(model, max_len)?,
            logits_host: vec![0.0; vocab],
            cand: Vec::with_capacity(vocab),
        })
    }

    /// Tokens in the cache.
    pub fn len(&self) -> usize {
        self.cache.len()
    }
    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }
    pub fn reset(&mut self) {
        self.cache.reset();
    }

    /// Append `tokens` to the cache and return the softcapped logits at the last new position.
    pub fn extend(&mut self, model: &mut Gpt<B>, tokens: &[u32]) -> Result<&[f32]> {
        model.decode(&mut self.cache, tokens, &mut self.logits_host)?;
        Ok(&self.logits_host)
    }

    /// The softcapped logits at the last position of a fresh forward over `prompt` (batch 1).
    pub fn logits_for_last_position(&mut self, model: &mut Gpt<B>, prompt: &[u32]) -> Result<Vec<f32>> {
        self.reset();
        Ok(self.extend(model, prompt)?.to_vec())
    }

    /// Prefill `prompt`, then sample `max_new` tokens one at a time (stopping early at `stop` if given).
    /// Returns the new tokens only. Reproducible for a given seed.
    pub fn generate(
        &mut self,
        model: &mut Gpt<B>,
        prompt: &[u32],
        max_new: usize,
        how: Sampling,
        seed: u64,
        stop: Option<u32>,
    ) -> Result<Vec<u32>> {
        if prompt.len() + max_new > self.cache.max_len() {
            bail!(
                "prompt {} + {} new tokens exceed the sampler's max_len {}",
                prompt.len(),
                max_new,
                self.cache.max_len()
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

/// Greedy (temperature 0: the first index of the maximum) or sampling from softmax(logits / temperature)
/// restricted to the top_k largest logits (all when top_k is 0 or >= vocab).
pub fn pick_token(logits: &[f32], how: Sampling, rng: &mut Rng, cand: &mut Vec<(f32, u32)>) -> u32 {
    if how.temperature <= 0.0 {
        let mut best = 0;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    cand.clear();
    cand.extend(logits.iter().enumerate().map(|(i, &l)| (l, i as u32)));
    let k = if how.top_k == 0 {
        cand.len()
    } else {
        how.top_k.min(cand.len())
    };
    // Largest first; ties toward the smaller token id, so the cut is deterministic.
    let by_logit = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    if k < cand.len() {
        cand.select_nth_unstable_by(k - 1, by_logit);
        cand.truncate(k);
    }
    cand.sort_unstable_by(by_logit);
    let max = cand[0].0;
    let total: f64 = cand
        .iter()
        .map(|c| (((c.0 - max) / how.temperature) as f64).exp())
        .sum();
    let mut r = rng.uniform() * total;
    for c in cand.iter() {
        r -= (((c.0 - max) / how.temperature) as f64).exp();
        if r <= 0.0 {
            return c.1;
        }
    }
    cand[cand.len() - 1].1
}
