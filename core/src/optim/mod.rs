//! Optimizers: Muon for block matrices, AdamW for the embedding and lm_head, the lr schedule, clipping.
//!
//! `Optimizer` updates the parameters one rank owns (see `shard`), reading the synchronized gradient and
//! keeping its state in one contiguous f32 buffer (checkpointed as is).

pub mod adamw;
pub mod clip;
pub mod device;
pub mod muon;
pub mod ns_bf16_buffers;
pub mod schedule;
pub mod shard;

use crate::bail;
use crate::config::{ModelConfig, ParamKind};
use crate::error::Result;
use adamw::{adam_lr_scale, adamw_update, AdamParams};
use muon::{muon_update, NsWorkspace};
use shard::ShardLayout;

/// Learning rates and optimizer constants (nanochat's defaults, SPEC.md section 4).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OptimConfig {
    /// Muon lr for block matrices.
    pub matrix_lr: f32,
    /// AdamW lr for wte, before the (d/768)^-0.5 scaling.
    pub embedding_lr: f32,
    /// AdamW lr for lm_head, before the (d/768)^-0.5 scaling.
    pub unembedding_lr: f32,
    pub adam: AdamParams,
}

impl OptimConfig {
    /// The lr of a parameter kind at lr multiplier 1. `adam_scale` is AdamW's d_model scaling
    /// (`adamw::adam_lr_scale`); Muon's lr is not scaled.
    pub fn base_lr(&self, kind: ParamKind, adam_scale: f32) -> f32 {
        match kind {
            ParamKind::Matrix => self.matrix_lr,
            ParamKind::Embedding => self.embedding_lr * adam_scale,
            ParamKind::Unembedding => self.unembedding_lr * adam_scale,
        }
    }

    /// The lr of a parameter kind at a step: the base lr times the schedule's multiplier, in f64 and
    /// rounded once (the host and the device optimizers both use this, so their lrs agree to the bit).
    pub fn scheduled_lr(&self, kind: ParamKind, adam_scale: f32, lr_mult: f64) -> f32 {
        (self.base_lr(kind, adam_scale) as f64 * lr_mult) as f32
    }
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            matrix_lr: 0.02,
            embedding_lr: 0.2,
            unembedding_lr: 0.004,
            adam: AdamParams::default(),
        }
    }
}

/// Muon + AdamW over the parameters one rank owns.
pub struct Optimizer {
    pub config: OptimConfig,
    layout: ShardLayout,
    /// The rank's optimizer state (see `shard`): Muon momentum and AdamW moments.
    state: Vec<f32>,
    /// Optimizer steps taken so far (AdamW's bias correction uses steps_taken + 1).
    steps_taken: u64,
    adam_scale: f32,
    ns: NsWorkspace,
    /// Scratch for one matrix's orthogonalized update.
    update: Vec<f32>,
}

impl Optimizer {
    pub fn new(model: &ModelConfig, config: OptimConfig, rank: usize, world_size: usize) -> Result<Self> {
        if world_size == 0 || rank >= world_size {
            bail!("rank {rank} is not in a world of size {world_size}");
        }
        let layout = ShardLayout::new(model, rank, world_size);
        let ns = NsWorkspace::for_shapes(layout.muon_shapes());
        let max_numel = layout.muon_shapes().map(|(r, c)| r * c).max().unwrap_or(0);
        Ok(Optimizer {
            config,
            state: vec![0.0; layout.state_len],
            layout,
            steps_taken: 0,
            adam_scale: adam_lr_scale(model.n_embd),
            ns,
            update: vec![0.0; max_numel],
        })
    }

    pub fn layout(&self) -> &ShardLayout {
        &self.layout
    }
    pub fn state(&self) -> &[f32] {
        &self.state
    }
    pub fn steps_taken(&self) -> u64 {
        self.steps_taken
    }

    /// Restore state saved from an optimizer of the same model, rank and world size.
    pub fn restore(&mut self, state: &[f32], steps_taken: u64) -> Result<()> {
        check_state_len(state.len(), self.state.len())?;
        self.state.copy_from_slice(state);
        self.steps_taken = steps_taken;
        Ok(())
    }

    /// The effective AdamW lr of a parameter kind at lr multiplier 1 (with the d_model scaling).
    pub fn base_lr(&self, kind: ParamKind) -> f32 {
        self.config.base_lr(kind, self.adam_scale)
    }

    /// One step on the owned segments: `params` and `grads` are the whole contiguous buffers (grads already
    /// synchronized and clipped). `lr_mult` is the schedule's multiplier, `momentum` Muon's mu.
    pub fn step(&mut self, params: &mut [f32], grads: &[f32], lr_mult: f64, momentum: f32) {
        assert_eq!(
            params.len(),
            grads.len(),
            "params and grads must be the same contiguous layout"
        );
        let t = self.steps_taken + 1;
        for seg in &self.layout.segments {
            let lr = self.config.scheduled_lr(seg.kind, self.adam_scale, lr_mult);
            let p = &mut params[seg.range()];
            let g = &grads[seg.range()];
            let st = &mut self.state[seg.state_offset..seg.state_offset + seg.state_len()];
            match seg.kind {
                ParamKind::Matrix => {
                    let upd = &mut self.update[..seg.len];
                    muon_update(p, g, st, upd, seg.rows, seg.cols, lr, momentum, &mut self.ns);
                }
                ParamKind::Embedding | ParamKind::Unembedding => {
                    let (m, v) = st.split_at_mut(seg.len);
                    adamw_update(p, g, m, v, lr, t, &self.config.adam);
                }
            }
        }
        self.steps_taken = t;
    }
}

/// A saved optimizer state must have exactly the size this model, rank and world size need.
pub(crate) fn check_state_len(given: usize, needed: usize) -> Result<()> {
    if given != needed {
        bail!(
            "optimizer state has {given} values but this model and rank need {needed}; the checkpoint is from a \
             different model or world size"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        ModelConfig::new(2, 64, 2, 2, 32, 50, 8).unwrap()
    }

    fn fill(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 + seed) * 0.618).sin() * 0.1).collect()
    }

    /// Sharded over 3 ranks, the union of the ranks' updates equals the single-rank update exactly.
    #[test]
    fn sharded_steps_equal_the_single_rank_step() {
        let m = tiny();
        let n = m.num_params() as usize;
        let p0 = fill(n, 1.0);
        let grads: Vec<Vec<f32>> = (0..3).map(|s| fill(n, 10.0 + s as f32)).collect();
        let mut single = p0.clone();
        let mut opt = Optimizer::new(&m, OptimConfig::default(), 0, 1).unwrap();
        for (s, g) in grads.iter().enumerate() {
            opt.step(&mut single, g, 1.0, schedule::muon_momentum(s as u64));
        }
        let world = 3;
        let mut opts: Vec<Optimizer> = (0..world)
            .map(|r| Optimizer::new(&m, OptimConfig::default(), r, world).unwrap())
            .collect();
        let mut shared = p0.clone();
        for (s, g) in grads.iter().enumerate() {
            // each rank writes only what it owns; the "all-gather" is sharing one buffer
            for o in opts.iter_mut() {
                o.step(&mut shared, g, 1.0, schedule::muon_momentum(s as u64));
            }
        }
        assert_eq!(single, shared);
        assert_ne!(single, p0);
    }

    #[test]
    fn restore_rejects_a_wrong_size() {
        let mut opt = Optimizer::new(&tiny(), OptimConfig::default(), 0, 1).unwrap();
        let e = opt.restore(&[0.0; 3], 1).unwrap_err();
        assert!(e.message.contains("different model"), "{e}");
        assert!(Optimizer::new(&tiny(), OptimConfig::default(), 2, 2).is_err());
    }
}
