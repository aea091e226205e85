//! nc-comm: collectives between the ranks of a data-parallel run.
//!
//! `Collective` is what the training loop calls; `ThreadRing` implements it between threads of one process
//! (the CPU backend's ranks, and the reference every device collective is checked against). `ShmRing`
//! implements it between processes of one machine, after the ranks met through a `Rendezvous` (TCP).
//! The ring's chunk/step schedule lives in `schedule`, shared by every ring transport.

mod member;
pub mod nccl;
mod nccl_watchdog;
pub mod p2p;
pub mod p2p_plan;
pub mod p2p_twin;
mod partition;
pub mod rendezvous;
pub mod schedule;
mod shm_flags;
pub mod shm_ring;
mod shm_segment;
mod thread_ring;
mod wire;

pub use half::bf16;
pub use member::Member;
pub use nccl::{nccl_available, NcclRing};
pub use p2p::{p2p_support, P2pOptions, P2pRing};
pub use p2p_plan::Piece;
pub use p2p_twin::P2pTwin;
pub use partition::{even_bounds, Bounds};
pub use rendezvous::{PeerWatch, Rendezvous, RendezvousConfig};
pub use shm_ring::{ShmRing, ShmRingOptions};
pub use thread_ring::ThreadRing;

use std::fmt;

/// A collective failed: a peer is gone or the call was malformed. Says which rank saw it, where one did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommError {
    /// The rank that saw the failure; None before a rank is known (a malformed RANK, a shared-memory file).
    pub rank: Option<usize>,
    /// What failed, without the rank.
    pub reason: String,
}

impl CommError {
    /// A failure rank `rank` saw.
    pub fn at(rank: usize, reason: impl Into<String>) -> Self {
        CommError {
            rank: Some(rank),
            reason: reason.into(),
        }
    }

    /// A failure no rank is known for.
    pub fn unranked(reason: impl Into<String>) -> Self {
        CommError {
            rank: None,
            reason: reason.into(),
        }
    }
}

/// "rank R: reason", or the reason alone: one line a rank's output can be told apart by.
impl fmt::Display for CommError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rank {
            Some(rank) => write!(f, "rank {rank}: {}", self.reason),
            None => f.write_str(&self.reason),
        }
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
    /// Which rank this is, of how many.
    fn member(&self) -> Member;

    fn rank(&self) -> usize {
        self.member().rank
    }

    fn world_size(&self) -> usize {
        self.member().world_size
    }

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

    /// bf16 reduce-scatter with f32 accumulation: the owned range holds the f32 sum (in the same order as
    /// `reduce_scatter_sum`) rounded once to bf16. Other elements are left as they were. This default
    /// widens the whole buffer to f32 (a temporary of 2x the buffer's bytes) and reuses the f32 path.
    fn reduce_scatter_sum_bf16(&mut self, buf: &mut [bf16], bounds: &Bounds) -> Result<(), CommError> {
        let mut wide: Vec<f32> = buf.iter().map(|x| x.to_f32()).collect();
        self.reduce_scatter_sum(&mut wide, bounds)?;
        let mine = bounds.range(self.rank());
        for (b, w) in buf[mine.clone()].iter_mut().zip(&wide[mine]) {
            *b = bf16::from_f32(*w);
        }
        Ok(())
    }

    /// bf16 all-gather. This default goes through f32, which is exact both ways.
    fn all_gather_bf16(&mut self, buf: &mut [bf16], bounds: &Bounds) -> Result<(), CommError> {
        let mut wide: Vec<f32> = buf.iter().map(|x| x.to_f32()).collect();
        self.all_gather(&mut wide, bounds)?;
        for (b, w) in buf.iter_mut().zip(&wide) {
            *b = bf16::from_f32(*w);
        }
        Ok(())
    }

    /// Every rank ends with the elementwise sum over ranks, accumulated in f32 and rounded once.
    fn all_reduce_sum_bf16(&mut self, buf: &mut [bf16]) -> Result<(), CommError> {
        let bounds = even_bounds(buf.len(), self.world_size());
        self.reduce_scatter_sum_bf16(buf, &bounds)?;
        self.all_gather_bf16(buf, &bounds)
    }

    /// Blocks until every rank has called it.
    fn barrier(&mut self) -> Result<(), CommError> {
        let mut token = [0.0f32; 1];
        self.all_reduce_sum(&mut token)
    }
}
