//! Data parallelism with ZeRO-1 between the ranks of one process (SPEC.md section 4): the gradient is
//! reduce-scattered so each rank holds the full sum of what it owns, clipped by the global norm, each rank
//! updates its own parameters (Muon: whole matrices; AdamW: row slices, see `optim::shard`), and the
//! parameters are all-gathered. Collectives run per parameter tensor, with bounds that give each rank
//! exactly its part of that tensor.

use crate::config::ModelConfig;
use crate::error::{NcError, Result};
use crate::optim::clip::{clip_factor, sum_of_squares};
use crate::optim::shard::ShardLayout;
use crate::train::buckets::{tensor_splits, TensorSplit};
use nc_comm::Collective;
use std::ops::Range;

/// The non-bucketed exchange: every tensor reduced after the whole backward. The training loop runs the
/// bucketed one (`zero1`), which must give the same bits; this stays as the reference it is tested against.
pub struct GradSync {
    splits: Vec<TensorSplit>,
    /// Element ranges (in the whole buffer) this rank owns.
    owned: Vec<Range<usize>>,
}

/// A transport's error as the run's, keeping the rank that saw it (first on the line), and the peer it names
/// when a peer caused it; a CUDA error of this rank's own (out of memory in a staged copy) names none, as it
/// is this rank's failure, not another's.
pub(crate) fn comm_err(e: nc_comm::CommError) -> NcError {
    NcError::from(e).context("collective failed")
}

/// A device collective's error (NCCL, the peer-to-peer ring), keeping the rank that saw it: what went wrong
/// on the device is often a peer's failure, which that peer's own line tells.
pub(crate) fn device_comm_err(e: nc_comm::CommError) -> NcError {
    let e = NcError::from(e);
    NcError {
        message: format!("{} (see the other ranks' messages)", e.message),
        ..e
    }
}

impl GradSync {
    pub fn new(model: &ModelConfig, rank: usize, world_size: usize) -> Self {
        let splits = tensor_splits(model, world_size);
        let owned = ShardLayout::new(model, rank, world_size)
            .segments
            .iter()
            .map(|s| s.range())
            .collect();
        GradSync { splits, owned }
    }

    /// Sum the gradient over ranks into the parts this rank owns, clip by the global norm of the summed
    /// gradient (the same factor on every rank), and return that norm. Parts this rank does not own hold
    /// partial sums afterwards and are not read.
    pub fn reduce_and_clip(&self, comm: &mut dyn Collective, grads: &mut [f32], max_norm: f64) -> Result<f64> {
        for t in &self.splits {
            comm.reduce_scatter_sum(&mut grads[t.range.clone()], &t.bounds)
                .map_err(comm_err)?;
        }
        let own: f64 = self.owned.iter().map(|r| sum_of_squares(&grads[r.clone()])).sum();
        let mut total = [own as f32];
        comm.all_reduce_sum(&mut total).map_err(comm_err)?;
        let norm = (total[0] as f64).sqrt();
        if max_norm > 0.0 {
            let f = clip_factor(norm, max_norm);
            if f < 1.0 {
                for r in &self.owned {
                    grads[r.clone()].iter_mut().for_each(|g| *g *= f);
                }
            }
        }
        Ok(norm)
    }

    /// Give every rank the parameters each owner just updated.
    pub fn gather_params(&self, comm: &mut dyn Collective, params: &mut [f32]) -> Result<()> {
        for t in &self.splits {
            comm.all_gather(&mut params[t.range.clone()], &t.bounds)
                .map_err(comm_err)?;
        }
        Ok(())
    }
}

/// The mean over ranks of one value (the step loss), and whether any rank asks to stop.
pub fn mean_over_ranks(comm: &mut dyn Collective, v: f32) -> Result<f32> {
    let mut b = [v];
    comm.all_reduce_sum(&mut b).map_err(comm_err)?;
    Ok(b[0] / comm.world_size() as f32)
}

pub fn any_rank(comm: &mut dyn Collective, flag: bool) -> Result<bool> {
    let mut b = [flag as u8 as f32];
    comm.all_reduce_sum(&mut b).map_err(comm_err)?;
    Ok(b[0] > 0.0)
}
