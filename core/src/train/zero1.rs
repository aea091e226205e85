//! ZeRO-1 data parallelism driven by the backward, for any backend: each bucket's gradient (`buckets`) is
//! summed over the ranks into its owners' parts as soon as the backward has made it final, while the rest of
//! the backward runs; then the owned parts are clipped by the global norm, each rank's optimizer updates
//! what it owns, and the owners' parameters go to every rank.
//!
//! The transport is a `RankCollective`: on host buffers (the CPU backend) the thread or shared-memory ring
//! (`HostRanks`: each bucket's reduction runs on the spot, between two layers' backward: the CPU twin of the
//! device's overlap, with the very same bucket schedule and ownership); on GPUs NCCL on a communication
//! stream (`zero1_nccl`: queued behind an event of the compute stream, no host wait, so it overlaps the
//! backward of the layers below); `StagedRanks` runs a host ring for buffers that are not host slices (the
//! device path's twin in tests, on `DeviceLikeCpu`).
//!
//! What is gathered: with bf16 working weights (`--precision bf16`) each rank keeps the f32 master of only
//! what it owns (`model::MasterMap`, `Gpt::with_sharded_master`); its optimizer updates that master and
//! writes the bf16 working copy of those pieces, and the ranks all-gather the bf16 working copy (half the
//! bytes of the f32 master). That is exact, not an approximation: a rank that received the f32 master used
//! to round it to bf16 itself, the same rounding of the same value the owner now does before sending. fp32
//! (the strict path, whose GEMMs read the master) keeps the whole master on every rank and gathers it. A
//! checkpoint gathers the f32 master over the host collective, tensor by tensor (`gather_master`).
//!
//! Numerics: every tensor is reduced by the same transport call with the same bounds as the non-bucketed
//! exchange (`sync::GradSync`), only earlier, and reductions are elementwise in a fixed rank order, so the
//! two give the same bits (tested below with thread ranks). The norm is summed over the owned parts in
//! canonical order with the backend's `sum_squares` (on the CPU: `clip::sum_of_squares`, as GradSync).

use crate::backend::{Backend, Storage, View, ViewMut};
use crate::bail;
use crate::config::ModelConfig;
use crate::error::{NcError, Result};
use crate::model::{GradsReady, MasterMap};
use crate::optim::clip::clip_factor;
use crate::optim::shard::ShardLayout;
use crate::train::buckets::{backward_buckets, tensor_splits, Bucket, TensorSplit};
use crate::train::sync::comm_err;
use nc_comm::{bf16, Collective, Member};
use std::ops::Range;

/// The collectives a data-parallel rank needs on its backend's buffers.
pub trait RankCollective<B: Backend>: Send {
    /// Which rank this is, of how many.
    fn member(&self) -> Member;

    fn rank(&self) -> usize {
        self.member().rank
    }

    fn world_size(&self) -> usize {
        self.member().world_size
    }

    /// Sum each tensor over the ranks into the part its owner holds (`TensorSplit::parts`); what other
    /// ranks hold of it afterwards is unspecified. On a device this is queued behind the work already
    /// queued on the compute stream and returns at once.
    fn reduce_to_owners(&mut self, be: &B, grads: &mut B::Buf, tensors: &[&TensorSplit]) -> Result<()>;
    /// Every rank gets each owner's part of each tensor of `weights` (queued behind the compute stream's
    /// work). `weights` is what the forward reads, in the parameter layout: the f32 master (fp32 runs) or the
    /// bf16 working copy (bf16 runs, whose master is sharded); an implementation moves the buffer's own
    /// storage (`Backend::storage`: 4 or 2 bytes an element) and must accept both.
    fn gather_from_owners(&mut self, be: &B, weights: &mut B::Buf, tensors: &[TensorSplit]) -> Result<()>;
    /// Make the compute work queued from now on wait for every collective queued so far (a device: an event
    /// the compute stream waits on; nothing to do where collectives run on the spot).
    fn join_compute(&mut self, be: &B) -> Result<()>;
    /// Collectives on host values: the loss, the norm, stop flags, checkpoint phases.
    fn host(&mut self) -> &mut (dyn Collective + 'static);
}

/// A ring on host memory (thread ranks, processes over /dev/shm) for a backend whose buffers are host
/// slices: every reduction runs at once, between two layers of the backward.
pub struct HostRanks {
    ring: Box<dyn Collective>,
}

impl HostRanks {
    pub fn new(ring: Box<dyn Collective>) -> Self {
        HostRanks { ring }
    }
}

fn host_buffer<B: Backend>(buf: &mut B::Buf) -> Result<&mut [f32]> {
    B::host_slice_mut(buf).ok_or_else(|| {
        NcError::new("a host ring reduces host buffers only; a device backend needs its own collective (NCCL)")
    })
}

impl<B: Backend> RankCollective<B> for HostRanks {
    fn member(&self) -> Member {
        self.ring.member()
    }
    fn reduce_to_owners(&mut self, _be: &B, grads: &mut B::Buf, tensors: &[&TensorSplit]) -> Result<()> {
        let g = host_buffer::<B>(grads)?;
        for t in tensors {
            self.ring
                .reduce_scatter_sum(&mut g[t.range.clone()], &t.bounds)
                .map_err(comm_err)?;
        }
        Ok(())
    }
    fn gather_from_owners(&mut self, be: &B, weights: &mut B::Buf, tensors: &[TensorSplit]) -> Result<()> {
        if B::storage(weights) == Storage::Bf16 {
            // a bf16 working copy is written through ops only (they round): through a bf16 staging copy
            return gather_staged(self.ring.as_mut(), be, weights, tensors, &mut Vec::new());
        }
        let p = host_buffer::<B>(weights)?;
        for t in tensors {
            self.ring
                .all_gather(&mut p[t.range.clone()], &t.bounds)
                .map_err(comm_err)?;
        }
        Ok(())
    }
    fn join_compute(&mut self, _be: &B) -> Result<()> {
        Ok(())
    }
    fn host(&mut self) -> &mut (dyn Collective + 'static) {
        self.ring.as_mut()
    }
}

/// A host ring for a backend whose buffers are not host slices: each tensor is downloaded, exchanged on the
/// host and uploaded again (for a reduction only the owned part goes back). Two copies a tensor, so not for
/// GPUs (they use NCCL, `zero1_nccl`): the CPU twin of the device path, which lets CI run the device
/// optimizer's ZeRO-1 on `DeviceLikeCpu` ranks. Sums are the ring's, so the same bits as `HostRanks`.
pub struct StagedRanks {
    ring: Box<dyn Collective>,
    staging: Vec<f32>,
}

impl StagedRanks {
    pub fn new(ring: Box<dyn Collective>) -> Self {
        StagedRanks {
            ring,
            staging: Vec::new(),
        }
    }
}

impl<B: Backend> RankCollective<B> for StagedRanks {
    fn member(&self) -> Member {
        self.ring.member()
    }
    fn reduce_to_owners(&mut self, be: &B, grads: &mut B::Buf, tensors: &[&TensorSplit]) -> Result<()> {
        let rank = self.ring.rank();
        for t in tensors {
            let (start, len) = (t.range.start, t.range.len());
            self.staging.resize(len, 0.0);
            be.download(View::at(grads, start, len), &mut self.staging);
            self.ring
                .reduce_scatter_sum(&mut self.staging, &t.bounds)
                .map_err(comm_err)?;
            let mine = t.bounds.range(rank);
            be.upload(ViewMut::at(grads, start + mine.start, mine.len()), &self.staging[mine]);
        }
        Ok(())
    }
    fn gather_from_owners(&mut self, be: &B, weights: &mut B::Buf, tensors: &[TensorSplit]) -> Result<()> {
        gather_staged(self.ring.as_mut(), be, weights, tensors, &mut self.staging)
    }
    fn join_compute(&mut self, _be: &B) -> Result<()> {
        Ok(())
    }
    fn host(&mut self) -> &mut (dyn Collective + 'static) {
        self.ring.as_mut()
    }
}

/// `gather_from_owners` through host staging, one tensor at a time: download, all-gather in the buffer's own
/// storage (a Bf16 buffer's values are bf16 already, so the bf16 ring moves them exactly, 2 bytes each),
/// upload (exact: the values are representable).
fn gather_staged<B: Backend>(
    ring: &mut dyn Collective,
    be: &B,
    weights: &mut B::Buf,
    tensors: &[TensorSplit],
    staging: &mut Vec<f32>,
) -> Result<()> {
    let narrow = B::storage(weights) == Storage::Bf16;
    let mut narrow_staging: Vec<bf16> = Vec::new();
    for t in tensors {
        let (start, len) = (t.range.start, t.range.len());
        staging.resize(len, 0.0);
        be.download(View::at(weights, start, len), staging);
        if narrow {
            narrow_staging.clear();
            narrow_staging.extend(staging.iter().map(|&x| bf16::from_f32(x)));
            ring.all_gather_bf16(&mut narrow_staging, &t.bounds).map_err(comm_err)?;
            for (dst, src) in staging.iter_mut().zip(&narrow_staging) {
                *dst = src.to_f32();
            }
        } else {
            ring.all_gather(staging, &t.bounds).map_err(comm_err)?;
        }
        be.upload(ViewMut::at(weights, start, len), staging);
    }
    Ok(())
}

/// One rank's ZeRO-1 exchange: the bucket schedule, what this rank owns, and the transport.
pub struct Zero1<B: Backend> {
    comm: Box<dyn RankCollective<B>>,
    splits: Vec<TensorSplit>,
    buckets: Vec<Bucket>,
    /// Element ranges this rank owns, in canonical order (the optimizer's segments).
    owned: Vec<Range<usize>>,
    /// The next bucket the backward should make ready this step.
    next_bucket: usize,
    /// The first failure inside the backward's hook (returned by `finish_reduce_and_clip`).
    failed: Option<NcError>,
}

impl<B: Backend> Zero1<B> {
    pub fn new(model: &ModelConfig, comm: Box<dyn RankCollective<B>>) -> Self {
        let (rank, world) = (comm.rank(), comm.world_size());
        Zero1 {
            splits: tensor_splits(model, world),
            buckets: backward_buckets(model),
            owned: ShardLayout::new(model, rank, world)
                .segments
                .iter()
                .map(|s| s.range())
                .collect(),
            comm,
            next_bucket: 0,
            failed: None,
        }
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }
    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }
    pub fn host(&mut self) -> &mut (dyn Collective + 'static) {
        self.comm.host()
    }
    /// How many gradient buckets a step reduces.
    pub fn buckets(&self) -> usize {
        self.buckets.len()
    }

    /// Before the step's last micro-batch (the only one whose backward reduces: earlier ones accumulate).
    pub fn begin_reduce(&mut self) {
        self.next_bucket = 0;
        self.failed = None;
    }

    /// The backward's hook: start reducing the bucket `ready` names. Buckets must come in schedule order;
    /// after a failure the rest are skipped (the error comes back from `finish_reduce_and_clip`).
    pub fn grads_ready(&mut self, be: &B, grads: &mut B::Buf, ready: GradsReady) {
        if self.failed.is_some() {
            return;
        }
        let Some(bucket) = self.buckets.get(self.next_bucket) else {
            self.failed = Some(NcError::new(format!(
                "zero1: the backward reported {ready:?} after every bucket was reduced"
            )));
            return;
        };
        if bucket.ready != ready {
            self.failed = Some(NcError::new(format!(
                "zero1: the backward reported {ready:?} where the bucket schedule expects {:?}",
                bucket.ready
            )));
            return;
        }
        let tensors: Vec<&TensorSplit> = bucket.tensors.iter().map(|&t| &self.splits[t]).collect();
        if let Err(e) = self.comm.reduce_to_owners(be, grads, &tensors) {
            self.failed = Some(e);
        }
        self.next_bucket += 1;
    }

    /// After the backward: wait (on the device: make the compute stream wait) for every bucket, then clip the
    /// owned parts by the global norm of the summed gradient (the same factor on every rank) and return it.
    pub fn finish_reduce_and_clip(&mut self, be: &B, grads: &mut B::Buf, max_norm: f64) -> Result<f64> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        if self.next_bucket != self.buckets.len() {
            bail!(
                "zero1: the backward made {} of {} gradient buckets ready",
                self.next_bucket,
                self.buckets.len()
            );
        }
        self.comm.join_compute(be)?;
        let own: f64 = self
            .owned
            .iter()
            .map(|r| be.sum_squares(View::at(grads, r.start, r.len())))
            .sum();
        let mut total = [own as f32];
        self.comm.host().all_reduce_sum(&mut total).map_err(comm_err)?;
        let norm = (total[0] as f64).sqrt();
        if max_norm > 0.0 {
            let f = clip_factor(norm, max_norm);
            if f < 1.0 {
                for r in &self.owned {
                    be.scale(ViewMut::at(grads, r.start, r.len()), f);
                }
            }
        }
        Ok(norm)
    }

    /// After this rank's optimizer updated what it owns: every rank gets every owner's part of `weights`
    /// (what the forward reads: the f32 master under fp32, the bf16 working copy under bf16), and the compute
    /// work queued next waits for them.
    pub fn gather_params(&mut self, be: &B, weights: &mut B::Buf) -> Result<()> {
        self.comm.gather_from_owners(be, weights, &self.splits)?;
        self.comm.join_compute(be)
    }

    /// The f32 master of every tensor from the ranks that own its parts, over the host collective, one tensor
    /// at a time (a checkpoint of a sharded master, `map` saying where this rank's pieces sit in `master`).
    /// `into`, the whole parameter layout, receives every tensor on the rank that writes the checkpoint; the
    /// others pass None and hold one tensor's staging at a time. Every rank must call it.
    pub fn gather_master(
        &mut self,
        be: &B,
        master: &B::Buf,
        map: &MasterMap,
        mut into: Option<&mut [f32]>,
    ) -> Result<()> {
        let rank = self.comm.rank();
        let mut staging = Vec::new();
        for t in &self.splits {
            let buf: &mut [f32] = match into.as_deref_mut() {
                Some(full) => &mut full[t.range.clone()],
                None => {
                    staging.resize(t.range.len(), 0.0);
                    &mut staging
                }
            };
            let mine = t.bounds.range(rank);
            if !mine.is_empty() {
                let part = t.range.start + mine.start..t.range.start + mine.end;
                let at = map
                    .locate(part.clone())
                    .expect("a rank's master holds every part it owns (the splits are its ShardLayout)");
                be.download(View::at(master, at, part.len()), &mut buf[mine]);
            }
            self.comm.host().all_gather(buf, &t.bounds).map_err(comm_err)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::model::{Gpt, Recompute};
    use crate::optim::schedule::muon_momentum;
    use crate::optim::{OptimConfig, Optimizer};
    use crate::train::sync::GradSync;
    use crate::train::zero1_test_support::{batch, micro_steps, tiny};
    use nc_comm::ThreadRing;

    /// How a rank exchanges its gradient.
    #[derive(Clone, Copy, PartialEq)]
    enum Exchange {
        /// `Zero1`, each bucket reduced from the backward's hook.
        Bucketed,
        /// `GradSync`: everything after the backward.
        Whole,
    }

    /// Train `steps` steps of `accum` micro-batches on `world` thread ranks; rank 0's step losses and final
    /// parameters.
    fn run(world: usize, steps: usize, accum: usize, how: Exchange) -> (Vec<f32>, Vec<f32>) {
        let cfg = tiny();
        let (b, t) = (2, cfg.sequence_len);
        let rings = ThreadRing::new(world);
        let results: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = rings
                .into_iter()
                .enumerate()
                .map(|(rank, ring)| {
                    scope.spawn(move || {
                        let mut model = Gpt::new(CpuBackend::new(), cfg, b, t, Recompute::None).unwrap();
                        model.init(7);
                        let mut opt = Optimizer::new(&cfg, OptimConfig::default(), rank, world).unwrap();
                        let mut zero1 = Zero1::<CpuBackend>::new(&cfg, Box::new(HostRanks::new(Box::new(ring))));
                        let sync = GradSync::new(&cfg, rank, world);
                        let mut losses = Vec::new();
                        for step in 0..steps {
                            model.zero_grads();
                            let bucketed = how == Exchange::Bucketed;
                            let sum = micro_steps(&mut model, &mut zero1, (rank, world), (step, accum), bucketed);
                            losses.push(sum);
                            let (be, params, grads) = model.backend_params_grads_mut();
                            match how {
                                Exchange::Bucketed => {
                                    zero1.finish_reduce_and_clip(be, grads, 1.0).unwrap();
                                }
                                Exchange::Whole => {
                                    let g = CpuBackend::host_mut(grads);
                                    sync.reduce_and_clip(zero1.host(), g, 1.0).unwrap();
                                }
                            }
                            let (p, g) = (CpuBackend::host_mut(params), CpuBackend::host(grads));
                            opt.step(p, g, 1.0, muon_momentum(step as u64));
                            match how {
                                Exchange::Bucketed => zero1.gather_params(be, params).unwrap(),
                                Exchange::Whole => {
                                    sync.gather_params(zero1.host(), CpuBackend::host_mut(params)).unwrap()
                                }
                            }
                        }
                        (losses, model.params().to_vec())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in 1..world {
            assert_eq!(
                results[r].1, results[0].1,
                "rank {r} ends with other parameters than rank 0"
            );
        }
        results.into_iter().next().unwrap()
    }

    /// The bucketed exchange (reductions interleaved with the backward) gives the same bits as reducing
    /// everything after it: same calls, same bounds, same sum order, only earlier.
    #[test]
    fn bucketed_reduction_equals_the_whole_gradient_exchange_bit_for_bit() {
        for world in [2usize, 3] {
            let bucketed = run(world, 3, 2, Exchange::Bucketed);
            let whole = run(world, 3, 2, Exchange::Whole);
            assert_eq!(bucketed.0, whole.0, "world {world}: losses");
            assert_eq!(bucketed.1, whole.1, "world {world}: parameters");
            assert!(
                bucketed.0[2] < bucketed.0[0],
                "world {world}: the runs learn ({:?})",
                bucketed.0
            );
        }
    }

    /// The device path's twin: ranks on `DeviceLikeCpu` (buffers that are not host slices) with the device
    /// optimizer's bf16 path and `StagedRanks`, `steps` steps of one micro-batch. `sharded`: each rank keeps
    /// the master of what it owns (`Gpt::with_sharded_master`), its packed optimizer writes the working copy
    /// of those pieces and the bf16 working copy is gathered; else every rank keeps the whole master, which
    /// is gathered and cast. Rank 0's losses, working copy and the whole f32 master (gathered when sharded).
    fn run_device_twin(world: usize, steps: usize, sharded: bool) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        use crate::backend::device_like::DeviceLikeCpu;
        use crate::optim::device::{DeviceOptimizer, DeviceOptions};
        use crate::plan::Precision;
        let cfg = tiny();
        let (b, t) = (2, cfg.sequence_len);
        let n = cfg.num_params() as usize;
        let rings = ThreadRing::new(world);
        let results: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = rings
                .into_iter()
                .enumerate()
                .map(|(rank, ring)| {
                    scope.spawn(move || {
                        let be = DeviceLikeCpu::default();
                        let policy = Recompute::None;
                        let mut model = if sharded {
                            Gpt::with_sharded_master(be, cfg, b, t, policy, Precision::Bf16, rank, world)
                        } else {
                            Gpt::with_precision(be, cfg, b, t, policy, Precision::Bf16)
                        }
                        .unwrap();
                        model.init(7);
                        let opts = DeviceOptions {
                            precision: Precision::Bf16,
                            rank,
                            world_size: world,
                            ..DeviceOptions::default()
                        };
                        let opt = DeviceOptimizer::with_options(&model.be, &cfg, OptimConfig::default(), opts).unwrap();
                        let mut opt = if sharded { opt.packed() } else { opt };
                        let comm = Box::new(StagedRanks::new(Box::new(ring)));
                        let mut zero1 = Zero1::<DeviceLikeCpu>::new(&cfg, comm);
                        let mut losses = Vec::new();
                        for step in 0..steps {
                            model.zero_grads();
                            // the same micro-batch every step: learnable in 3 steps
                            let (x, y) = batch(&cfg, b * t, rank, 0, 0);
                            zero1.begin_reduce();
                            let mut hook = |be: &DeviceLikeCpu, g: &mut _, r| zero1.grads_ready(be, g, r);
                            let loss = model.forward_backward_hooked(&x, &y, 1.0 / world as f32, &mut hook);
                            losses.push(loss.unwrap());
                            let mu = muon_momentum(step as u64);
                            let (be, params, grads, working) = model.backend_params_grads_working_mut();
                            zero1.finish_reduce_and_clip(be, grads, 1.0).unwrap();
                            if sharded {
                                let working = working.unwrap();
                                opt.step_writing(be, params, grads, Some(&mut *working), 1.0, mu);
                                zero1.gather_params(be, working).unwrap();
                                model.working_written();
                            } else {
                                opt.step(be, params, grads, 1.0, mu);
                                zero1.gather_params(be, params).unwrap();
                                model.refresh_weights();
                            }
                        }
                        let mut master = vec![0.0f32; n];
                        if sharded {
                            let map = model.master_map().clone();
                            zero1
                                .gather_master(&model.be, model.params_buf(), &map, Some(&mut master))
                                .unwrap();
                        } else {
                            model.be.download(View::all(model.params_buf()), &mut master);
                        }
                        let mut working = vec![0.0f32; n];
                        model.be.download(View::all(model.weights_buf()), &mut working);
                        (losses, working, master)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in 1..world {
            assert_eq!(
                results[r].1, results[0].1,
                "rank {r}: another working copy than rank 0's"
            );
            assert_eq!(results[r].2, results[0].2, "rank {r}: another master than rank 0's");
        }
        results.into_iter().next().unwrap()
    }

    /// On the device path's twin, a sharded master (bf16 working copy gathered) gives the same bits as the
    /// whole master gathered and cast: losses, working copy and master.
    #[test]
    fn device_twin_sharded_master_equals_the_full_master_bit_for_bit() {
        for world in [2usize, 3] {
            let sharded = run_device_twin(world, 3, true);
            let full = run_device_twin(world, 3, false);
            assert_eq!(sharded.0, full.0, "world {world}: losses");
            assert!(
                sharded.0[2] < sharded.0[0],
                "world {world}: it learns ({:?})",
                sharded.0
            );
            assert!(sharded.1 == full.1, "world {world}: working copies differ");
            assert!(sharded.2 == full.2, "world {world}: masters differ");
            assert_ne!(
                sharded.1, sharded.2,
                "world {world}: the working copy is bf16, the master f32"
            );
        }
    }

    /// When the hook says a bucket is ready, its grads are final: a snapshot taken then equals the grads at
    /// the end of the backward, and buckets not yet reported are still untouched (zero).
    #[test]
    fn the_hook_fires_when_each_bucket_is_final_and_in_schedule_order() {
        let cfg = tiny();
        let mut model = Gpt::new(CpuBackend::new(), cfg, 2, cfg.sequence_len, Recompute::None).unwrap();
        // not `init`: its zero lm_head and projections would leave most grads zero
        let mut rng = crate::model::Rng::new(3);
        model
            .params_mut()
            .iter_mut()
            .for_each(|p| *p = 0.1 * rng.normal() as f32);
        model.zero_grads();
        let buckets = backward_buckets(&cfg);
        let splits = tensor_splits(&cfg, 1);
        let (x, y) = batch(&cfg, 2 * cfg.sequence_len, 0, 0, 0);
        let mut seen: Vec<(GradsReady, Vec<f32>, bool)> = Vec::new();
        model
            .forward_backward_hooked(&x, &y, 1.0, &mut |_be, g, ready| {
                let g = CpuBackend::host(g);
                let i = seen.len();
                let snap = buckets[i]
                    .tensors
                    .iter()
                    .flat_map(|&t| g[splits[t].range.clone()].to_vec())
                    .collect();
                let later_untouched = buckets[i + 1..]
                    .iter()
                    .flat_map(|b| b.tensors.iter())
                    .all(|&t| g[splits[t].range.clone()].iter().all(|&v| v == 0.0));
                seen.push((ready, snap, later_untouched));
            })
            .unwrap();
        let order: Vec<GradsReady> = seen.iter().map(|s| s.0).collect();
        let expected: Vec<GradsReady> = buckets.iter().map(|b| b.ready).collect();
        assert_eq!(order, expected);
        let g = model.grads();
        for (i, (ready, snap, later_untouched)) in seen.iter().enumerate() {
            let fin: Vec<f32> = buckets[i]
                .tensors
                .iter()
                .flat_map(|&t| g[splits[t].range.clone()].to_vec())
                .collect();
            assert_eq!(
                snap, &fin,
                "{ready:?}: grads changed after the hook said they were final"
            );
            assert!(snap.iter().any(|&v| v != 0.0), "{ready:?}: no gradient at all");
            assert!(later_untouched, "{ready:?}: a later bucket already had grads");
        }
    }

    #[test]
    fn a_bucket_out_of_order_is_an_error_not_a_wrong_sum() {
        let cfg = tiny();
        let rings = ThreadRing::new(1);
        let ring = rings.into_iter().next().unwrap();
        let mut z = Zero1::<CpuBackend>::new(&cfg, Box::new(HostRanks::new(Box::new(ring))));
        let be = CpuBackend::new();
        let mut g = be.alloc(cfg.num_params() as usize);
        z.begin_reduce();
        z.grads_ready(&be, &mut g, GradsReady::Layer(0));
        let e = z.finish_reduce_and_clip(&be, &mut g, 0.0).unwrap_err();
        assert!(e.message.contains("expects LmHead"), "{e}");
        z.begin_reduce();
        z.grads_ready(&be, &mut g, GradsReady::LmHead);
        let e = z.finish_reduce_and_clip(&be, &mut g, 0.0).unwrap_err();
        assert!(e.message.contains("1 of 5"), "{e}");
    }
}
