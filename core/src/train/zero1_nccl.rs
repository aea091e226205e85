//! The device side of ZeRO-1 (`zero1`): NCCL on a communication stream of the rank's GPU.
//!
//! Run on simulated GPUs over the simulator's NCCL stand-in (bin/tests/sim_multi_nccl.rs: 2 and 3 ranks equal
//! one process within the processes tests' tolerance), not yet on a GPU.
//!
//! Streams and events, no host waits: when the backward reports a bucket ready, an event recorded on the
//! compute stream (the backend's) makes the communication stream (the `NcclRing`'s, in the same context)
//! wait for the bucket's grads, then one NCCL group of in-place `ncclReduce`s sums each owned part into its
//! owner (`TensorSplit::parts`: a block matrix to its one owner, wte and lm_head row slices to each rank);
//! the compute stream goes on with the next layers' backward at once. `join_compute` makes the compute
//! stream wait for the communication stream (an event) before the clip reads the owned grads. The gather
//! is the mirror image: the communication stream waits for the optimizer's work, one group of in-place
//! `ncclBroadcast`s from each owner, and the compute stream waits before the next forward reads them. What
//! is broadcast is the buffer the forward reads: under bf16 the working copy (bf16, 2 bytes an element; each
//! rank holds the f32 master of its own pieces only, `model::MasterMap`), under fp32 the f32 master.
//!
//! Why reduces and broadcasts and not ncclReduceScatter/ncclAllGather: those take equal counts per rank,
//! and ownership is whole matrices of unequal sizes (Muon needs each matrix on one rank). A group of reduces
//! of a partition moves the same bytes per rank as a reduce-scatter of it: rank r sends every part except
//! its own, S - O_r bytes of a bucket of S bytes of which it owns O_r (the ring factor (n-1)/n when ownership
//! is balanced). The plan prices exactly that (`plan_comm`).
//!
//! Memory: in place on the model's grad buffer and on the weights the forward reads, so no bucket buffer beyond
//! NCCL's own.

use crate::backend::cuda::{CudaBackend, CudaBuf};
use crate::backend::Storage;
use crate::bail;
use crate::error::{NcError, Result};
use crate::train::buckets::TensorSplit;
use crate::train::sync::device_comm_err;
use crate::train::zero1::RankCollective;
use cudarc::driver::CudaStream;
use nc_comm::{Collective, CommError, Member, NcclRing};
use std::sync::Arc;

/// A rank's NCCL ring with the stream it runs on (created in the backend's context, separate from its
/// compute stream).
pub struct NcclExchange {
    ring: NcclRing,
}

fn driver_error(what: &str, e: impl std::fmt::Debug) -> NcError {
    NcError::new(format!("zero1 on the device: {what} failed: {e:?}"))
}

impl NcclExchange {
    /// A communication stream in `be`'s context: what `NcclRing::join` runs its collectives on.
    pub fn comm_stream(be: &CudaBackend) -> Result<Arc<CudaStream>> {
        be.stream()
            .context()
            .new_stream()
            .map_err(|e| driver_error("creating the communication stream", e))
    }

    /// `ring` must run on a stream of the backend's context (`comm_stream`).
    pub fn new(ring: NcclRing) -> Self {
        NcclExchange { ring }
    }

    /// The communication stream waits for everything queued on the compute stream so far.
    fn comm_waits_for_compute(&self, be: &CudaBackend) -> Result<()> {
        self.ring
            .stream()
            .join(be.stream())
            .map_err(|e| driver_error("ordering the communication stream after the compute stream", e))
    }

    /// One NCCL group over every owned part of `tensors` of `buf`, each part queued with `op(addr, count,
    /// owner)`; addresses step by the buffer's element size (`Storage`).
    fn grouped(
        &self,
        buf: &CudaBuf,
        tensors: &[&TensorSplit],
        op: impl Fn(&NcclRing, u64, usize, usize) -> std::result::Result<(), CommError>,
    ) -> Result<()> {
        let element = buf.storage_kind().bytes_per_element();
        let base = buf.device_addr();
        self.ring.group_start().map_err(device_comm_err)?;
        let mut first_error = None;
        // after a failed call, no further one: every rank must make the same calls in the same order, and the
        // run ends on this error anyway
        'tensors: for t in tensors {
            if t.range.end > buf.len() {
                first_error = Some(NcError::new(format!(
                    "zero1: a tensor ends at element {} of a buffer of {}",
                    t.range.end,
                    buf.len()
                )));
                break 'tensors;
            }
            for (owner, part) in t.parts() {
                let addr = base + (part.start * element) as u64;
                if let Err(e) = op(&self.ring, addr, part.len(), owner) {
                    first_error = Some(device_comm_err(e));
                    break 'tensors;
                }
            }
        }
        // a started group is always ended, also after an error
        let ended = self.ring.group_end().map_err(device_comm_err);
        match first_error {
            Some(e) => Err(e),
            None => ended,
        }
    }
}

impl RankCollective<CudaBackend> for NcclExchange {
    fn member(&self) -> Member {
        self.ring.member()
    }

    fn reduce_to_owners(&mut self, be: &CudaBackend, grads: &mut CudaBuf, tensors: &[&TensorSplit]) -> Result<()> {
        if grads.storage_kind() != Storage::F32 {
            bail!("zero1 on the device reduces f32 grads; this buffer is bf16");
        }
        self.comm_waits_for_compute(be)?;
        // SAFETY: the grads buffer lives as long as the model; the compute stream touches these grads again
        // only after `join_compute` (the clip), which waits for this stream.
        self.grouped(grads, tensors, |ring, addr, n, owner| unsafe {
            ring.reduce_in_place_f32(addr, n, owner)
        })
    }

    fn gather_from_owners(&mut self, be: &CudaBackend, weights: &mut CudaBuf, tensors: &[TensorSplit]) -> Result<()> {
        self.comm_waits_for_compute(be)?;
        let all: Vec<&TensorSplit> = tensors.iter().collect();
        // SAFETY: the weight buffer lives as long as the model; the compute stream reads it again only after
        // `join_compute`, which `Zero1::gather_params` calls right after this. Each broadcast's element type
        // is the buffer's storage, which `grouped` steps addresses by.
        match weights.storage_kind() {
            Storage::Bf16 => self.grouped(weights, &all, |ring, addr, n, owner| unsafe {
                ring.broadcast_in_place_bf16(addr, n, owner)
            }),
            Storage::F32 => self.grouped(weights, &all, |ring, addr, n, owner| unsafe {
                ring.broadcast_in_place_f32(addr, n, owner)
            }),
        }
    }

    fn join_compute(&mut self, be: &CudaBackend) -> Result<()> {
        be.stream()
            .join(self.ring.stream())
            .map_err(|e| driver_error("ordering the compute stream after the communication stream", e))
    }

    fn host(&mut self) -> &mut (dyn Collective + 'static) {
        &mut self.ring
    }
}
