//! nc-comm: collectives between the ranks of a data-parallel run.
//!
//! `Collective` is what the training loop calls; `ThreadRing` implements it between threads of one process
//! (the CPU backend's ranks, and the reference every device collective is checked against). The CUDA
//! peer-to-peer ring and NCCL implement the same trait in later work.

mod partition;
mod thread_ring;

pub use partition::{even_bounds, Bounds};
pub use thread_ring::ThreadRing;

use std::fmt;

/// A collective failed: a peer is gone or the call was malformed. Says which rank saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommError {
    pub message: String,
}

impl fmt::Display for CommError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CommError {}

/// Collectives over f32 buffers. Every call is made by all ranks with buffers of the same length and
/// returns only when the caller may touch its buffer again: a collective never reads a buffer after
/// it returned, so the borrow checker keeps every buffer alive for as long as the collective reads it.
///
/// Results are bit-identical on every rank: each element is summed once, in a fixed rank order, by the
/// rank that owns it, and then copied.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;

    /// After the call, `buf[bounds.range(rank)]` on each rank holds the sum over ranks of that range.
    /// Other elements of `buf` hold partial sums (unspecified).
    fn reduce_scatter_sum(&mut self, buf: &mut [f32], bounds: &Bounds) -> Result<(), CommError>;

    /// After the call, every rank's `buf[bounds.range(r)]` equals rank r's `buf[bounds.range(r)]`.
    fn all_gather(&mut self, buf: &mut [f32], bounds: &Bounds) -> Result<(), CommError>;

    /// Every rank ends with the elementwise sum over ranks.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        let bounds = even_bounds(buf.len(), self.world_size());
        self.reduce_scatter_sum(buf, &bounds)?;
        self.all_gather(buf, &bounds)
    }

    /// Blocks until every rank has called it.
    fn barrier(&mut self) -> Result<(), CommError> {
        let mut token = [0.0f32; 1];
        self.all_reduce_sum(&mut token)
    }
}
