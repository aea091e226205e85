//! Model shape: from depth to every dimension, the parameter list, parameter count and FLOPs per token.
//!
//! Everything here follows SPEC.md section 1. `ModelConfig` is the single source of the model's shape;
//! the planner, the backends, the optimizers and the checkpoints all read it.

use crate::bail;
use crate::error::Result;
use serde::{Deserialize, Serialize};

/// model_dim = depth * ASPECT_RATIO.
pub const ASPECT_RATIO: usize = 64;
/// Head dimension of every preset.
pub const HEAD_DIM: usize = 128;
pub const DEFAULT_VOCAB_SIZE: usize = 65536;
pub const DEFAULT_SEQ_LEN: usize = 2048;
/// Rotary base: angle(t, j) = t / ROPE_BASE^(2j / head_dim).
pub const ROPE_BASE: f64 = 10000.0;
/// Logit softcap: logits = SOFTCAP * tanh(logits / SOFTCAP).
pub const LOGIT_SOFTCAP: f32 = 15.0;
/// The one rmsnorm epsilon, used by every backend and by the JAX reference.
/// nanochat leaves eps to PyTorch's default, the machine epsilon of the input dtype; we fix it to the
/// f32 machine epsilon (what nanochat uses for fp32 inputs) so CPU, GPU and reference agree exactly.
pub const RMSNORM_EPS: f32 = f32::EPSILON;

/// Which optimizer owns a parameter and how it was initialized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ParamKind {
    /// `transformer.wte.weight` (vocab, d): AdamW with `embedding_lr`.
    Embedding,
    /// A block matrix (out, in): Muon.
    Matrix,
    /// `lm_head.weight` (vocab, d): AdamW with `unembedding_lr`.
    Unembedding,
}

/// One named parameter: nanochat's name and PyTorch Linear's (out_features, in_features) shape.
/// `offset` is its first element in the one contiguous parameter buffer (and in the grad buffer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub kind: ParamKind,
    pub offset: usize,
    /// Block index for block matrices, None for wte and lm_head.
    pub layer: Option<usize>,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.rows * self.cols
    }
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.numel()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub sequence_len: usize,
}

/// The named presets of the scaling plan: (name, depth).
pub const PRESETS: &[(&str, usize)] = &[
    ("d20", 20),
    ("d26", 26),
    ("d32", 32),
    ("3b", 38),
    ("6.6b", 50),
    ("7b", 52),
];

/// The batch the scaling plan (SPEC.md section 7; the seed's scaling document) trains a preset with, on its
/// node of `world_size` GPUs of `gpu_mem_gb` GB each. At another world size the total stays and gradient
/// accumulation makes up the difference.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PresetBatch {
    pub device_batch_size: usize,
    pub total_batch_size: usize,
    pub world_size: usize,
    /// Memory per GPU of the plan's node, in GB (10^9 bytes): 1.5 TB over 8 GPUs.
    pub gpu_mem_gb: f64,
}

/// The presets that carry the scaling plan's batch: (name, device batch size, total batch size). All at 8
/// GPUs of 187.5 GB, 2048-token sequences: 48 x 2048 x 8 = 786,432 and 24 x 2048 x 8 = 393,216 (gradient
/// accumulation 1 on the node).
const PRESET_BATCHES: &[(&str, usize, usize)] = &[("3b", 48, 786_432), ("6.6b", 24, 393_216), ("7b", 24, 393_216)];
const PRESET_NODE_GPUS: usize = 8;
const PRESET_NODE_GPU_MEM_GB: f64 = 187.5;

/// The scaling plan's batch for a preset that has one (3b, 6.6b, 7b); None for the d* presets, which take
/// nanochat's defaults.
pub fn preset_batch(name: &str) -> Option<PresetBatch> {
    PRESET_BATCHES
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|&(_, dbs, total)| PresetBatch {
            device_batch_size: dbs,
            total_batch_size: total,
            world_size: PRESET_NODE_GPUS,
            gpu_mem_gb: PRESET_NODE_GPU_MEM_GB,
        })
}

impl ModelConfig {
    /// nanochat's depth scaling: d = 64 * depth, head_dim 128, n_head = ceil(d / 128), full MHA.
    pub fn from_depth(depth: usize) -> Result<Self> {
        if depth == 0 {
            bail!("--depth must be at least 1");
        }
        let n_embd = depth * ASPECT_RATIO;
        let n_head = n_embd.div_ceil(HEAD_DIM);
        if n_head * HEAD_DIM != n_embd {
            bail!(
                "--depth {depth} gives model_dim {n_embd}, which is not a multiple of head_dim {HEAD_DIM}; \
                 use an even depth (e.g. --depth {} or --depth {})",
                depth - 1,
                depth + 1
            );
        }
        Self::new(
            depth,
            n_embd,
            n_head,
            n_head,
            HEAD_DIM,
            DEFAULT_VOCAB_SIZE,
            DEFAULT_SEQ_LEN,
        )
    }

    /// A preset by name (`d20`, `d26`, `d32`, `3b`, `6.6b`, `7b`).
    pub fn preset(name: &str) -> Result<Self> {
        match PRESETS.iter().find(|(n, _)| *n == name) {
            Some((_, depth)) => Self::from_depth(*depth),
            None => {
                let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
                bail!("unknown preset '{name}'; the presets are {}", names.join(", "))
            }
        }
    }

    /// Any shape, validated. Used by tests (tiny models) and by checkpoints.
    pub fn new(
        n_layer: usize,
        n_embd: usize,
        n_head: usize,
        n_kv_head: usize,
        head_dim: usize,
        vocab_size: usize,
        sequence_len: usize,
    ) -> Result<Self> {
        let c = ModelConfig {
            n_layer,
            n_embd,
            n_head,
            n_kv_head,
            head_dim,
            vocab_size,
            sequence_len,
        };
        c.validate()?;
        Ok(c)
    }

    /// Grouped-query attention: `n_kv_head` must divide `n_head`.
    pub fn with_kv_heads(mut self, n_kv_head: usize) -> Result<Self> {
        self.n_kv_head = n_kv_head;
        self.validate()?;
        Ok(self)
    }

    pub fn with_vocab_size(mut self, vocab_size: usize) -> Result<Self> {
        self.vocab_size = vocab_size;
        self.validate()?;
        Ok(self)
    }

    pub fn with_sequence_len(mut self, sequence_len: usize) -> Result<Self> {
        self.sequence_len = sequence_len;
        self.validate()?;
        Ok(self)
    }

    pub fn validate(&self) -> Result<()> {
        let c = self;
        if c.n_layer == 0 || c.n_embd == 0 || c.n_head == 0 || c.n_kv_head == 0 {
            bail!("model shape {c:?}: n_layer, n_embd, n_head and n_kv_head must all be at least 1");
        }
        if c.head_dim == 0 || !c.head_dim.is_multiple_of(2) {
            bail!(
                "head_dim {} must be even and positive (rotary rotates halves of each head)",
                c.head_dim
            );
        }
        if c.n_head * c.head_dim != c.n_embd {
            bail!(
                "n_head {} x head_dim {} = {} must equal n_embd {}",
                c.n_head,
                c.head_dim,
                c.n_head * c.head_dim,
                c.n_embd
            );
        }
        if !c.n_head.is_multiple_of(c.n_kv_head) {
            bail!(
                "n_kv_head {} must divide n_head {} (each kv head serves n_head/n_kv_head query heads)",
                c.n_kv_head,
                c.n_head
            );
        }
        if c.vocab_size < 2 || c.vocab_size > (1 << 31) {
            bail!("vocab_size {} must be between 2 and 2^31", c.vocab_size);
        }
        if c.sequence_len == 0 {
            bail!("sequence_len must be at least 1");
        }
        Ok(())
    }

    /// Short tag used for run directories, e.g. `d20`.
    pub fn model_tag(&self) -> String {
        format!("d{}", self.n_layer)
    }

    pub fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim
    }

    /// Every parameter in canonical order (the order of the contiguous buffers):
    /// wte, then per block c_q, c_k, c_v, attn.c_proj, mlp.c_fc, mlp.c_proj, then lm_head.
    pub fn param_specs(&self) -> Vec<ParamSpec> {
        let d = self.n_embd;
        let qd = self.n_head * self.head_dim;
        let kvd = self.kv_dim();
        let v = self.vocab_size;
        let mut specs = Vec::with_capacity(2 + 6 * self.n_layer);
        let mut offset = 0;
        let mut push = |name: String, rows: usize, cols: usize, kind: ParamKind, layer: Option<usize>| {
            specs.push(ParamSpec {
                name,
                rows,
                cols,
                kind,
                offset,
                layer,
            });
            offset += rows * cols;
        };
        push("transformer.wte.weight".into(), v, d, ParamKind::Embedding, None);
        for i in 0..self.n_layer {
            let p = format!("transformer.h.{i}");
            push(format!("{p}.attn.c_q.weight"), qd, d, ParamKind::Matrix, Some(i));
            push(format!("{p}.attn.c_k.weight"), kvd, d, ParamKind::Matrix, Some(i));
            push(format!("{p}.attn.c_v.weight"), kvd, d, ParamKind::Matrix, Some(i));
            push(format!("{p}.attn.c_proj.weight"), d, qd, ParamKind::Matrix, Some(i));
            push(format!("{p}.mlp.c_fc.weight"), 4 * d, d, ParamKind::Matrix, Some(i));
            push(format!("{p}.mlp.c_proj.weight"), d, 4 * d, ParamKind::Matrix, Some(i));
        }
        push("lm_head.weight".into(), v, d, ParamKind::Unembedding, None);
        specs
    }

    /// Total parameter count, embeddings included (with full MHA: 2*V*d + 12*L*d^2).
    pub fn num_params(&self) -> u64 {
        let d = self.n_embd as u64;
        let qd = (self.n_head * self.head_dim) as u64;
        let kvd = self.kv_dim() as u64;
        let per_layer = qd * d + 2 * kvd * d + d * qd + 8 * d * d;
        2 * self.vocab_size as u64 * d + self.n_layer as u64 * per_layer
    }

    /// Parameters of the token embedding alone (excluded from FLOPs: a lookup, not a matmul).
    pub fn num_params_wte(&self) -> u64 {
        (self.vocab_size * self.n_embd) as u64
    }

    /// Training FLOPs per token, PaLM convention: 6 * (params - wte) + 12 * L * H * D * T.
    pub fn flops_per_token(&self) -> f64 {
        let dense = 6.0 * (self.num_params() - self.num_params_wte()) as f64;
        let attn = 12.0 * (self.n_layer * self.n_head * self.head_dim * self.sequence_len) as f64;
        dense + attn
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_match_spec_shapes() {
        let c = ModelConfig::preset("3b").unwrap();
        assert_eq!((c.n_layer, c.n_embd, c.n_head, c.n_kv_head), (38, 2432, 19, 19));
        let c = ModelConfig::preset("7b").unwrap();
        assert_eq!((c.n_layer, c.n_embd, c.n_head), (52, 3328, 26));
        let c = ModelConfig::preset("d20").unwrap();
        assert_eq!((c.n_layer, c.n_embd, c.n_head), (20, 1280, 10));
    }

    #[test]
    fn preset_batches_are_the_scaling_plans() {
        // the seed's numbers: dbs x 2048 x 8 GPUs, gradient accumulation 1 on its node
        for (name, dbs, total) in [("3b", 48, 786_432), ("6.6b", 24, 393_216), ("7b", 24, 393_216)] {
            let b = preset_batch(name).unwrap();
            assert_eq!(
                (b.device_batch_size, b.total_batch_size, b.world_size),
                (dbs, total, 8),
                "{name}"
            );
            let seq = ModelConfig::preset(name).unwrap().sequence_len;
            assert_eq!(b.device_batch_size * seq * b.world_size, b.total_batch_size, "{name}");
        }
        assert!(preset_batch("d20").is_none());
    }

    #[test]
    fn param_count_is_2vd_plus_12ld2() {
        for depth in [2usize, 20, 26, 32, 38, 50, 52] {
            let c = ModelConfig::from_depth(depth).unwrap();
            let (v, d, l) = (65536u64, c.n_embd as u64, depth as u64);
            assert_eq!(c.num_params(), 2 * v * d + 12 * l * d * d, "depth {depth}");
            let sum: usize = c.param_specs().iter().map(|p| p.numel()).sum();
            assert_eq!(sum as u64, c.num_params(), "depth {depth}: specs must tile the buffer");
        }
        // d20 is nanochat's "561M" model.
        assert_eq!(ModelConfig::from_depth(20).unwrap().num_params(), 560_988_160);
    }

    #[test]
    fn flops_match_spec_section_7() {
        let f38 = ModelConfig::from_depth(38).unwrap().flops_per_token();
        let f52 = ModelConfig::from_depth(52).unwrap().flops_per_token();
        assert!((f38 / 1.94e10 - 1.0).abs() < 0.005, "d38 flops/token {f38:e}");
        assert!((f52 / 4.70e10 - 1.0).abs() < 0.005, "d52 flops/token {f52:e}");
    }

    #[test]
    fn gqa_params_and_validation() {
        let c = ModelConfig::from_depth(4).unwrap().with_kv_heads(1).unwrap();
        let d = 256u64;
        let kvd = 128u64;
        assert_eq!(c.num_params(), 2 * 65536 * d + 4 * (10 * d * d + 2 * kvd * d));
        assert!(ModelConfig::from_depth(4).unwrap().with_kv_heads(3).is_err());
    }

    #[test]
    fn odd_shapes_are_errors_not_panics() {
        let e = ModelConfig::from_depth(3).unwrap_err();
        assert!(e.message.contains("even depth"), "{e}");
        assert!(ModelConfig::from_depth(0).is_err());
        assert!(ModelConfig::preset("13b").is_err());
        assert!(ModelConfig::new(2, 100, 3, 3, 32, 256, 16).is_err());
        assert!(ModelConfig::new(2, 96, 3, 3, 32, 256, 16).is_ok());
        assert!(ModelConfig::new(2, 96, 3, 3, 32, 1, 16).is_err());
    }
}
