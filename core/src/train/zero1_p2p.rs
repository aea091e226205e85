//! The device side of ZeRO-1 (`zero1`) over nc's own peer-to-peer ring (`nc_comm::P2pRing`, CUDA IPC between
//! the GPUs of one node), and its host twin.
//!
//! UNVERIFIED on a GPU: `P2pDevice` never ran on one; it trains on simulated devices across processes
//! (bin/tests/sim_multi_ring.rs: 2 and 3 ranks against one process). What CI also runs is the same exchange over
//! `TwinRing` (the ring's host twin, `nc_comm::P2pTwin`, which runs the very plan tables the kernels get),
//! checked bit for bit against `HostRanks` in the tests below.
//!
//! `RingExchange` is the bucket/tensor walking, generic over a small `PieceRing` (what a ring must offer:
//! reduce-scatter and all-gather of several tensors of one span of a buffer, each with its own bounds):
//! - `reduce_to_owners(bucket)`: the communication stream waits for the compute stream (an event), then ONE
//!   ring reduce-scatter over the bucket's tensors, each with its `TensorSplit` bounds (a block matrix to its
//!   one owner, wte and lm_head row slices to every rank). One launch per bucket: the kernels run a plan
//!   table of independent operations, so the tensors' tables concatenated (`p2p_plan::encode_pieces`) do
//!   what one launch per tensor would, without a launch and a wait for the slowest block between tensors.
//! - `gather_from_owners`: the same wait, then one ring all-gather over every tensor, for an f32 or a bf16
//!   parameter buffer (the f32 master, or the bf16 working copy when ZeRO-1 gathers that).
//! - `join_compute`: the compute stream waits for the communication stream (an event).
//! - `host()`: the ring's own host collectives (the loss, the norm, stop flags).
//!
//! Bytes: a tensor owned whole by one rank travels the ring once (every rank but its owner sends it on with
//! its term added), so a rank sends exactly the parts it does not own, what `plan_comm` prices for NCCL's
//! reduces; a row-split tensor is a plain ring reduce-scatter. Sums are
//! the ring's (`schedule::sum_order`), the order of the thread and shared-memory rings, so the CPU twin and
//! the device give the same bits for the exchange. In place on the model's buffers; a bf16 reduce-scatter
//! keeps its f32 partials in one scratch of the largest bucket (the ring's `work`).

use crate::backend::cuda::{CudaBackend, CudaBuf};
use crate::backend::{Backend, Storage, View, ViewMut};
use crate::error::{NcError, Result};
use crate::train::buckets::TensorSplit;
use crate::train::sync::{comm_err, device_comm_err};
use crate::train::zero1::RankCollective;
use nc_comm::{bf16, Collective, Member, P2pRing, P2pTwin, Piece};
use std::ops::Range;

/// What `RingExchange` needs of a ring: collectives over several tensors ("pieces") of one span of a
/// backend buffer, every rank passing the same pieces.
pub trait PieceRing<B: Backend>: Send {
    /// Which rank this is, of how many.
    fn member(&self) -> Member;
    /// Each piece's owned range (elements `span.start + piece.start + bounds.range(rank)` of `buf`) ends with
    /// the sum over ranks; the rest of the pieces is unspecified. Queued behind `wait_for_compute` on a device.
    fn reduce_scatter(&mut self, be: &B, buf: &mut B::Buf, span: Range<usize>, pieces: &[Piece]) -> Result<()>;
    /// Every rank's part of each piece ends as its owner's.
    fn all_gather(&mut self, be: &B, buf: &mut B::Buf, span: Range<usize>, pieces: &[Piece]) -> Result<()>;
    /// The ring's next collectives wait for the compute work queued so far (a device: an event).
    fn wait_for_compute(&mut self, be: &B) -> Result<()>;
    /// The compute work queued from now on waits for the ring's collectives queued so far.
    fn join_compute(&mut self, be: &B) -> Result<()>;
    fn host(&mut self) -> &mut (dyn Collective + 'static);
}

/// ZeRO-1's exchange over a `PieceRing`: a bucket's tensors in one ring collective, each with its bounds.
pub struct RingExchange<R> {
    ring: R,
}

impl<R> RingExchange<R> {
    pub fn new(ring: R) -> Self {
        RingExchange { ring }
    }
}

/// The span of `buf_len` elements the tensors lie in and their pieces (starts relative to the span), in
/// buffer order, so every rank builds the same list.
pub fn tensor_pieces(tensors: &[&TensorSplit], buf_len: usize) -> Result<(Range<usize>, Vec<Piece>)> {
    let mut sorted: Vec<&TensorSplit> = tensors.to_vec();
    sorted.sort_by_key(|t| t.range.start);
    let (Some(first), Some(end)) = (sorted.first(), sorted.iter().map(|t| t.range.end).max()) else {
        return Ok((0..0, Vec::new()));
    };
    if end > buf_len {
        return Err(NcError::new(format!(
            "zero1: a tensor ends at element {end} of a buffer of {buf_len}"
        )));
    }
    let base = first.range.start;
    let pieces = sorted
        .iter()
        .map(|t| Piece {
            start: t.range.start - base,
            bounds: t.bounds.clone(),
        })
        .collect();
    Ok((base..end, pieces))
}

impl<B: Backend, R: PieceRing<B>> RankCollective<B> for RingExchange<R> {
    fn member(&self) -> Member {
        self.ring.member()
    }

    fn reduce_to_owners(&mut self, be: &B, grads: &mut B::Buf, tensors: &[&TensorSplit]) -> Result<()> {
        let (span, pieces) = tensor_pieces(tensors, B::buf_len(grads))?;
        self.ring.wait_for_compute(be)?;
        self.ring.reduce_scatter(be, grads, span, &pieces)
    }

    fn gather_from_owners(&mut self, be: &B, params: &mut B::Buf, tensors: &[TensorSplit]) -> Result<()> {
        let all: Vec<&TensorSplit> = tensors.iter().collect();
        let (span, pieces) = tensor_pieces(&all, B::buf_len(params))?;
        self.ring.wait_for_compute(be)?;
        self.ring.all_gather(be, params, span, &pieces)
    }

    fn join_compute(&mut self, be: &B) -> Result<()> {
        self.ring.join_compute(be)
    }

    fn host(&mut self) -> &mut (dyn Collective + 'static) {
        self.ring.host()
    }
}

/// The peer-to-peer ring on the rank's GPU, its stream in the backend's context. UNVERIFIED.
pub struct P2pDevice {
    ring: P2pRing,
}

impl P2pDevice {
    /// `ring` must run on a stream of the backend's context (`zero1_nccl::NcclExchange::comm_stream`).
    pub fn new(ring: P2pRing) -> Self {
        P2pDevice { ring }
    }
}

/// ZeRO-1 over the peer-to-peer ring on CUDA.
pub type P2pExchange = RingExchange<P2pDevice>;

impl P2pExchange {
    pub fn on_gpu(ring: P2pRing) -> Self {
        RingExchange::new(P2pDevice::new(ring))
    }
}

impl PieceRing<CudaBackend> for P2pDevice {
    fn member(&self) -> Member {
        self.ring.member()
    }

    fn reduce_scatter(
        &mut self,
        _be: &CudaBackend,
        buf: &mut CudaBuf,
        span: Range<usize>,
        pieces: &[Piece],
    ) -> Result<()> {
        // SAFETY: the span lies in the buffer (tensor_pieces checked it), which lives as long as the model; the
        // compute stream touches these grads again only after `join_compute`, which waits for the ring's stream.
        unsafe {
            match buf.storage_kind() {
                Storage::F32 => {
                    let base = buf.device_addr() + (span.start * 4) as u64;
                    self.ring.reduce_scatter_pieces::<f32>(base, span.len(), pieces)
                }
                Storage::Bf16 => {
                    let base = buf.device_addr() + (span.start * 2) as u64;
                    self.ring.reduce_scatter_pieces::<bf16>(base, span.len(), pieces)
                }
            }
        }
        .map_err(device_comm_err)
    }

    fn all_gather(&mut self, _be: &CudaBackend, buf: &mut CudaBuf, span: Range<usize>, pieces: &[Piece]) -> Result<()> {
        // SAFETY: as for reduce_scatter; the compute stream reads the parameters again only after
        // `join_compute`, which `Zero1::gather_params` calls right after this.
        unsafe {
            match buf.storage_kind() {
                Storage::F32 => {
                    let base = buf.device_addr() + (span.start * 4) as u64;
                    self.ring.all_gather_pieces::<f32>(base, span.len(), pieces)
                }
                Storage::Bf16 => {
                    let base = buf.device_addr() + (span.start * 2) as u64;
                    self.ring.all_gather_pieces::<bf16>(base, span.len(), pieces)
                }
            }
        }
        .map_err(device_comm_err)
    }

    fn wait_for_compute(&mut self, be: &CudaBackend) -> Result<()> {
        self.ring.wait_for(be.stream()).map_err(device_comm_err)
    }

    fn join_compute(&mut self, be: &CudaBackend) -> Result<()> {
        be.stream().join(self.ring.stream()).map_err(|e| {
            NcError::new(format!(
                "zero1 on the device: ordering the compute stream after the P2P ring's stream failed: {e:?}"
            ))
        })
    }

    fn host(&mut self) -> &mut (dyn Collective + 'static) {
        &mut self.ring
    }
}

/// The P2P ring's host twin for any backend (`nc_comm::P2pTwin`, thread ranks): each span is downloaded,
/// exchanged by the plan tables the GPU would run, with the kernels' arithmetic, and uploaded whole again
/// (partial sums included, as the f32 kernel leaves them). bf16 buffers go through the twin's bf16 path. The
/// CPU twin of `P2pExchange`, for tests.
pub struct TwinRing {
    twin: P2pTwin,
    staging: Vec<f32>,
    staging_bf16: Vec<bf16>,
}

impl TwinRing {
    pub fn new(twin: P2pTwin) -> Self {
        TwinRing {
            twin,
            staging: Vec::new(),
            staging_bf16: Vec::new(),
        }
    }

    fn exchange<B: Backend>(
        &mut self,
        be: &B,
        buf: &mut B::Buf,
        span: Range<usize>,
        pieces: &[Piece],
        reduce: bool,
    ) -> Result<()> {
        let (start, len) = (span.start, span.len());
        self.staging.resize(len, 0.0);
        be.download(View::at(buf, start, len), &mut self.staging);
        let twin = &mut self.twin;
        match B::storage(buf) {
            Storage::F32 if reduce => twin.reduce_scatter_pieces(&mut self.staging, pieces),
            Storage::F32 => twin.all_gather_pieces(&mut self.staging, pieces),
            Storage::Bf16 => {
                self.staging_bf16.clear();
                self.staging_bf16
                    .extend(self.staging.iter().map(|&x| bf16::from_f32(x)));
                let r = if reduce {
                    twin.reduce_scatter_pieces(&mut self.staging_bf16, pieces)
                } else {
                    twin.all_gather_pieces(&mut self.staging_bf16, pieces)
                };
                for (s, b) in self.staging.iter_mut().zip(&self.staging_bf16) {
                    *s = b.to_f32();
                }
                r
            }
        }
        .map_err(comm_err)?;
        be.upload(ViewMut::at(buf, start, len), &self.staging);
        Ok(())
    }
}

impl<B: Backend> PieceRing<B> for TwinRing {
    fn member(&self) -> Member {
        self.twin.member()
    }
    fn reduce_scatter(&mut self, be: &B, buf: &mut B::Buf, span: Range<usize>, pieces: &[Piece]) -> Result<()> {
        self.exchange(be, buf, span, pieces, true)
    }
    fn all_gather(&mut self, be: &B, buf: &mut B::Buf, span: Range<usize>, pieces: &[Piece]) -> Result<()> {
        self.exchange(be, buf, span, pieces, false)
    }
    fn wait_for_compute(&mut self, _be: &B) -> Result<()> {
        Ok(())
    }
    fn join_compute(&mut self, _be: &B) -> Result<()> {
        Ok(())
    }
    fn host(&mut self) -> &mut (dyn Collective + 'static) {
        &mut self.twin
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::device_like::DeviceLikeCpu;
    use crate::model::{Gpt, Recompute};
    use crate::optim::schedule::muon_momentum;
    use crate::optim::{OptimConfig, Optimizer};
    use crate::train::buckets::{backward_buckets, tensor_splits};
    use crate::train::zero1::{HostRanks, Zero1};
    use crate::train::zero1_test_support::{micro_steps, tiny};
    use nc_comm::schedule::sum_order;
    use nc_comm::{P2pOptions, ThreadRing};

    /// Slices of 256 f32 (reduce-scatter) / 512 bf16 elements: every matrix of `tiny` takes several slices,
    /// so the tables pipeline within and across tensors. One-shot up to 64 bytes: the norm's and a loss's
    /// all-reduce take it, as on the GPU.
    fn twin_opts() -> P2pOptions {
        P2pOptions {
            blocks: 2,
            slots: 2,
            slot_bytes: 512,
            one_shot_bytes: 64,
            timeout: std::time::Duration::from_secs(60),
        }
    }

    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Transport {
        /// `HostRanks` over the thread ring: the CPU's ZeRO-1.
        Host,
        /// `RingExchange<TwinRing>`: the P2P exchange's bucket walking over the ring's host twin.
        P2pTwin,
    }

    /// `steps` steps of 2 micro-batches on `world` thread ranks with ZeRO-1 over `how`, gradient clipping at
    /// `max_norm` (0: off); rank 0's losses and norms, and the final parameters (equal on every rank).
    fn run(world: usize, steps: usize, max_norm: f64, how: Transport) -> (Vec<f32>, Vec<f64>, Vec<f32>) {
        let cfg = tiny();
        let (b, t, accum) = (2, cfg.sequence_len, 2);
        let comms: Vec<Box<dyn RankCollective<CpuBackend>>> = match how {
            Transport::Host => ThreadRing::new(world)
                .into_iter()
                .map(|r| Box::new(HostRanks::new(Box::new(r))) as Box<dyn RankCollective<CpuBackend>>)
                .collect(),
            Transport::P2pTwin => P2pTwin::new(world, twin_opts())
                .into_iter()
                .map(|r| Box::new(RingExchange::new(TwinRing::new(r))) as Box<dyn RankCollective<CpuBackend>>)
                .collect(),
        };
        let results: Vec<(Vec<f32>, Vec<f64>, Vec<f32>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = comms
                .into_iter()
                .enumerate()
                .map(|(rank, comm)| {
                    scope.spawn(move || {
                        let mut model = Gpt::new(CpuBackend::new(), cfg, b, t, Recompute::None).unwrap();
                        model.init(7);
                        let mut opt = Optimizer::new(&cfg, OptimConfig::default(), rank, world).unwrap();
                        let mut zero1 = Zero1::<CpuBackend>::new(&cfg, comm);
                        let (mut losses, mut norms) = (Vec::new(), Vec::new());
                        for step in 0..steps {
                            model.zero_grads();
                            let sum = micro_steps(&mut model, &mut zero1, (rank, world), (step, accum), true);
                            // this rank's loss, not an all-reduce: that is a host collective (below)
                            losses.push(sum);
                            let (be, params, grads) = model.backend_params_grads_mut();
                            norms.push(zero1.finish_reduce_and_clip(be, grads, max_norm).unwrap());
                            let (p, g) = (CpuBackend::host_mut(params), CpuBackend::host(grads));
                            opt.step(p, g, 1.0, muon_momentum(step as u64));
                            zero1.gather_params(be, params).unwrap();
                        }
                        (losses, norms, model.params().to_vec())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in 1..world {
            assert_eq!(
                results[r].2, results[0].2,
                "{how:?} world {world}: rank {r}'s parameters differ"
            );
        }
        results.into_iter().next().unwrap()
    }

    /// ZeRO-1 through the P2P exchange (each bucket one table over its tensors with their bounds, the
    /// kernels' arithmetic) trains bit for bit like ZeRO-1 through the thread ring: same sums in the same
    /// order. Without clipping at world sizes 2 and 3; with clipping at 2 too. The norm is a host all-reduce
    /// of one float per rank, which the P2P ring takes one-shot in rank order 0, 1, 2 and the thread ring in
    /// ring order 1, 2, 0: equal bits at world size 2 (two terms commute), within float rounding at 3 (so
    /// no clipping there: the factor could differ in its last bit; that is the host collective, not the
    /// exchange).
    #[test]
    fn zero1_over_the_p2p_twin_equals_the_thread_ring_bit_for_bit() {
        for (world, max_norm) in [(2usize, 0.0), (3, 0.0), (2, 0.5)] {
            let host = run(world, 3, max_norm, Transport::Host);
            let p2p = run(world, 3, max_norm, Transport::P2pTwin);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&p2p.0), bits(&host.0), "world {world} clip {max_norm}: losses");
            if world == 2 {
                assert_eq!(p2p.1, host.1, "world {world} clip {max_norm}: norms");
            }
            for (a, b) in p2p.1.iter().zip(&host.1) {
                assert!(
                    (a - b).abs() <= 1e-6 * b,
                    "world {world}: norms {:?} and {:?}",
                    p2p.1,
                    host.1
                );
            }
            assert!(
                bits(&p2p.2) == bits(&host.2),
                "world {world} clip {max_norm}: parameters differ"
            );
            assert!(host.0[2] < host.0[0], "world {world}: the runs learn ({:?})", host.0);
            if max_norm > 0.0 {
                assert!(
                    host.1.iter().any(|&n| n > max_norm),
                    "the clip acts in this run: {:?}",
                    host.1
                );
            }
        }
    }

    /// The exchange on buffers that are not host slices (DeviceLikeCpu, as a GPU's), f32 and bf16: each
    /// bucket's owned parts end with the ring-order sum (bf16: f32 sum rounded once), and a gather of a bf16
    /// parameter buffer (the working copy) gives every rank every owner's values.
    #[test]
    fn the_exchange_reduces_and_gathers_f32_and_bf16_device_buffers() {
        let cfg = tiny();
        let world = 3;
        let numel = cfg.num_params() as usize;
        let value = |r: usize, i: usize| ((r * 31 + i * 17) % 1009) as f32 / 64.0 - 7.0 + 1.0 / (3 + r) as f32;
        let splits = tensor_splits(&cfg, world);
        let buckets = backward_buckets(&cfg);
        let results = std::thread::scope(|scope| {
            let handles: Vec<_> = P2pTwin::new(world, twin_opts())
                .into_iter()
                .enumerate()
                .map(|(rank, twin)| {
                    let (splits, buckets) = (&splits, &buckets);
                    scope.spawn(move || {
                        let be = DeviceLikeCpu::default();
                        let mut x = RingExchange::new(TwinRing::new(twin));
                        let mut out = Vec::new();
                        for storage in [Storage::F32, Storage::Bf16] {
                            let mut g = be.alloc_as(numel, storage);
                            let host: Vec<f32> = (0..numel).map(|i| value(rank, i)).collect();
                            be.upload(ViewMut::at(&mut g, 0, numel), &host);
                            for bucket in buckets {
                                let tensors: Vec<&TensorSplit> = bucket.tensors.iter().map(|&t| &splits[t]).collect();
                                RankCollective::<DeviceLikeCpu>::reduce_to_owners(&mut x, &be, &mut g, &tensors)
                                    .unwrap();
                            }
                            let mut reduced = vec![0.0; numel];
                            be.download(View::at(&g, 0, numel), &mut reduced);
                            let mut p = be.alloc_as(numel, storage);
                            be.upload(ViewMut::at(&mut p, 0, numel), &host);
                            RankCollective::<DeviceLikeCpu>::gather_from_owners(&mut x, &be, &mut p, splits).unwrap();
                            let mut gathered = vec![0.0; numel];
                            be.download(View::at(&p, 0, numel), &mut gathered);
                            out.push((reduced, gathered));
                        }
                        out
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
        });
        let round = |x: f32| bf16::from_f32(x).to_f32();
        for (rank, per_storage) in results.iter().enumerate() {
            for ((reduced, gathered), bf) in per_storage.iter().zip([false, true]) {
                let input = |r: usize, i: usize| if bf { round(value(r, i)) } else { value(r, i) };
                for t in &splits {
                    for (owner, part) in t.parts() {
                        for i in part {
                            let want_gather = input(owner, i);
                            assert_eq!(gathered[i], want_gather, "bf16 {bf}: rank {rank} gathered element {i}");
                            if owner == rank {
                                let mut order = sum_order(world, rank);
                                let first = input(order.next().unwrap(), i);
                                let sum = order.fold(first, |a, q| a + input(q, i));
                                let want = if bf { round(sum) } else { sum };
                                assert_eq!(
                                    reduced[i].to_bits(),
                                    want.to_bits(),
                                    "bf16 {bf}: rank {rank} element {i}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn pieces_are_in_buffer_order_and_must_lie_in_the_buffer() {
        let cfg = tiny();
        let splits = tensor_splits(&cfg, 2);
        let bucket: Vec<&TensorSplit> = vec![&splits[3], &splits[1], &splits[2]];
        let (span, pieces) = tensor_pieces(&bucket, cfg.num_params() as usize).unwrap();
        assert_eq!(span, splits[1].range.start..splits[3].range.end);
        let starts: Vec<usize> = pieces.iter().map(|p| p.start + span.start).collect();
        assert_eq!(
            starts,
            vec![splits[1].range.start, splits[2].range.start, splits[3].range.start]
        );
        assert_eq!(pieces[0].bounds, splits[1].bounds);
        let e = tensor_pieces(&bucket, splits[3].range.end - 1).unwrap_err();
        assert!(e.to_string().contains("of a buffer of"), "{e}");
    }
}
