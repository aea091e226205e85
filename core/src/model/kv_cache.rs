//! The KV cache of KV-cached decoding: for one sequence, each layer's keys (after rotary and QK-norm, what
//! attention reads) and values at every position fed so far. The model's own forward fills it
//! (`Gpt::decode`): attention writes the new tokens' k and v at rows len..len+n and attends over rows
//! 0..len+n, with the queries at positions len.. (`AttnShape::q_pos0`).

use super::Gpt;
use crate::backend::Backend;
use crate::bail;
use crate::error::Result;

pub struct KvCache<B: Backend> {
    max_len: usize,
    len: usize,
    kv_dim: usize,
    /// Per layer: max_len x kv_dim keys and values, stored as the model stores its saved k and v.
    k: Vec<B::Buf>,
    v: Vec<B::Buf>,
}

/// One layer's part of the cache, as attention's forward takes it: `pos0` positions are cached already.
pub struct KvLayer<'a, B: Backend> {
    pub k: &'a mut B::Buf,
    pub v: &'a mut B::Buf,
    pub pos0: usize,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for sequences of up to `max_len` tokens (at most the model's sequence_len: the rotary
    /// table ends there).
    pub fn new(model: &Gpt<B>, max_len: usize) -> Result<Self> {
        let c = &model.cfg;
        if max_len == 0 || max_len > c.sequence_len {
            bail!(
                "generation length {max_len} must be between 1 and the model's sequence_len {}",
                c.sequence_len
            );
        }
        let (be, kvd, st) = (&model.be, c.kv_dim(), model.storages.saved);
        Ok(KvCache {
            max_len,
            len: 0,
            kv_dim: kvd,
            k: (0..c.n_layer).map(|_| be.alloc_as(max_len * kvd, st)).collect(),
            v: (0..c.n_layer).map(|_| be.alloc_as(max_len * kvd, st)).collect(),
        })
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn max_len(&self) -> usize {
        self.max_len
    }
    /// Forget everything cached (the buffers stay).
    pub fn reset(&mut self) {
        self.len = 0;
    }
    /// Layers the cache was made for.
    pub fn n_layer(&self) -> usize {
        self.k.len()
    }
    /// Elements per position of one layer's keys (and values).
    pub fn kv_dim(&self) -> usize {
        self.kv_dim
    }

    /// Layer `l`'s keys and values, with the cached length as the new tokens' first position.
    pub(crate) fn layer(&mut self, l: usize) -> KvLayer<'_, B> {
        KvLayer {
            k: &mut self.k[l],
            v: &mut self.v[l],
            pos0: self.len,
        }
    }

    /// After a forward over `n` new tokens filled every layer's rows len..len+n.
    pub(crate) fn advance(&mut self, n: usize) {
        assert!(self.len + n <= self.max_len, "KV cache overrun");
        self.len += n;
    }
}
