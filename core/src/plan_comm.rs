//! What data parallelism costs each step (the communication part of `nc-train --plan`): the bytes each rank
//! moves in the ZeRO-1 exchange (`train::zero1`), the buffers it needs, and the time at an assumed bus
//! bandwidth per GPU kind.
//!
//! The exchange as built: each rank's f32 grads are summed into their owners (a block matrix's one owner,
//! wte's and lm_head's row slices: `optim::shard`), then the owners' weights go to every rank: under bf16 the
//! bf16 working copy (each rank keeps the f32 master of its own pieces only, `model::MasterMap`), under fp32
//! the f32 master. Rank r sends, in the reduction, every part it does not own: 4 (N - O_r) bytes of a model
//! of N parameters of which it owns O_r; and receives w (N - O_r) in the gather, w = 2 (bf16) or 4 (fp32)
//! bytes an element. With balanced ownership O_r = N / n, this is the ring factor (n - 1) / n of a
//! reduce-scatter and an all-gather of the whole gradient and weights. The plan prices the busiest rank (the
//! one owning least), since every rank waits for it.
//!
//! Time: bytes / busbw, where busbw is the bus bandwidth as nccl-tests report it (busbw = algbw x
//! (n-1)/n for reduce-scatter and all-gather, so one rank's (n-1)/n S bytes take S (n-1)/n / busbw).
//! The reduction of every bucket but the last (wte, made final at the very end of the backward) overlaps the
//! backward; the last bucket and the gather are exposed (the gather is not yet overlapped with the next
//! forward).
//!
//! Buffers: the exchange runs in place on the model's grads and on the weights the forward reads (the bf16
//! working copy, or the fp32 master), so it needs no buffer of its own (NCCL's staging, NCCL_BUFFSIZE per
//! channel, is in the plan's per-process context allowance). A bf16 rank holds no f32 master of what others
//! own: the plan's master weights are the owned part only, as allocated.

use crate::config::{ModelConfig, ParamKind};
use crate::optim::shard::ShardLayout;
use crate::precision::Precision;
use serde::Serialize;

/// An assumed bus bandwidth of one kind of GPU's interconnect inside one node.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Interconnect {
    pub gpu: &'static str,
    /// Bytes per second, nccl-tests' busbw for reduce-scatter / all-gather at large sizes.
    pub busbw: f64,
    pub source: &'static str,
}

/// ASSUMED figures, not measured here (no GPU was available): about 80% of each NVLink generation's
/// nominal per-direction bandwidth, in line with the all-reduce busbw nccl-tests typically print on 8-GPU
/// SXM nodes (H100/H200: 360-400 GB/s against 450 GB/s nominal).
pub const INTERCONNECTS: &[Interconnect] = &[
    Interconnect {
        gpu: "h100",
        busbw: 360e9,
        source: "assumed: NVLink 4 (450 GB/s per direction nominal), nccl-tests busbw typically 360-400 GB/s",
    },
    Interconnect {
        gpu: "h200",
        busbw: 360e9,
        source: "assumed: NVLink 4 (450 GB/s per direction nominal), nccl-tests busbw typically 360-400 GB/s",
    },
    Interconnect {
        gpu: "b200",
        busbw: 720e9,
        source: "assumed: NVLink 5 (900 GB/s per direction nominal) at the same 80%",
    },
    Interconnect {
        gpu: "a100",
        busbw: 240e9,
        source: "assumed: NVLink 3 (300 GB/s per direction nominal) at the same 80%",
    },
];

/// The interconnect of a GPU kind; unknown kinds (a --gpu-mem device, the CPU) get the H100's figure.
pub fn interconnect_for(gpu: &str) -> Interconnect {
    INTERCONNECTS
        .iter()
        .find(|i| i.gpu == gpu)
        .copied()
        .unwrap_or(INTERCONNECTS[0])
}

/// Bytes of an element of the reduced grads (f32).
pub const EXCHANGE_BYTES: f64 = 4.0;

/// Bytes of an element of the gathered weights: the bf16 working copy, or the fp32 master.
pub fn gather_element_bytes(precision: Precision) -> f64 {
    match precision {
        Precision::Bf16 => 2.0,
        Precision::Fp32 | Precision::Fp32Gpu => 4.0,
    }
}

/// The communication of one optimizer step on the busiest rank.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CommPlan {
    pub world_size: usize,
    /// The rank that owns least (and so sends and receives most).
    pub busiest_rank: usize,
    /// Parameters that rank owns, and the model's total.
    pub owned_params: u64,
    pub params: u64,
    /// Bytes it sends in the gradient reduction (f32), and receives in the weight gather (bf16 or f32).
    pub reduce_bytes: f64,
    pub gather_bytes: f64,
    /// What the gather moves: "bf16" (the working copy) or "f32" (the master).
    pub gathered: &'static str,
    /// (n - 1) / n: what (reduce_bytes / (4 N)) would be with perfectly balanced ownership.
    pub ring_factor: f64,
    /// Extra memory per GPU for the exchange: none (in place on the grads and the weights).
    pub buffer_bytes: f64,
    pub interconnect: Interconnect,
    /// reduce + gather at busbw.
    pub seconds: f64,
    /// What cannot overlap the backward: the last bucket's (wte's) reduction and the gather.
    pub exposed_seconds: f64,
}

impl CommPlan {
    /// The exchange of `model` among `world_size` ranks on `gpu` at `precision` (None at world size 1:
    /// nothing moves).
    pub fn new(model: &ModelConfig, world_size: usize, gpu: &str, precision: Precision) -> Option<CommPlan> {
        if world_size <= 1 {
            return None;
        }
        let owned = |r: usize, of: &dyn Fn(ParamKind) -> bool| -> u64 {
            ShardLayout::new(model, r, world_size)
                .segments
                .iter()
                .filter(|s| of(s.kind))
                .map(|s| s.len as u64)
                .sum()
        };
        let busiest_rank = (0..world_size)
            .min_by_key(|&r| owned(r, &|_| true))
            .expect("world_size > 1");
        let owned_params = owned(busiest_rank, &|_| true);
        let params = model.num_params();
        let not_owned = (params - owned_params) as f64;
        let reduce_bytes = not_owned * EXCHANGE_BYTES;
        let gather_bytes = not_owned * gather_element_bytes(precision);
        let wte = model.num_params_wte();
        let wte_reduced = (wte - owned(busiest_rank, &|k| k == ParamKind::Embedding)) as f64 * EXCHANGE_BYTES;
        let interconnect = interconnect_for(gpu);
        Some(CommPlan {
            world_size,
            busiest_rank,
            owned_params,
            params,
            reduce_bytes,
            gather_bytes,
            gathered: if precision == Precision::Bf16 { "bf16" } else { "f32" },
            ring_factor: (world_size - 1) as f64 / world_size as f64,
            buffer_bytes: 0.0,
            interconnect,
            seconds: (reduce_bytes + gather_bytes) / interconnect.busbw,
            exposed_seconds: (wte_reduced + gather_bytes) / interconnect.busbw,
        })
    }

    /// The lines `--plan` prints.
    pub fn render(&self) -> String {
        let gb = |b: f64| b / crate::precision::GB;
        format!(
            "communication per step (ZeRO-1, {} ranks; the busiest is rank {}, owning {} of {} params):\n  \
             grads reduced (f32)    {:8.2} GB sent per rank ({:.3} of the model; ring factor (n-1)/n = {:.3})\n  \
             weights gathered ({}){:8.2} GB received per rank\n  \
             buffers: {:.2} GB (in place on the grads and the weights the forward reads)\n  \
             at {:.0} GB/s busbw per GPU ({}): {:.1} ms a step, {:.1} ms of it not overlapped with the backward\n",
            self.world_size,
            self.busiest_rank,
            self.owned_params,
            self.params,
            gb(self.reduce_bytes),
            self.reduce_bytes / (EXCHANGE_BYTES * self.params as f64),
            self.ring_factor,
            self.gathered,
            gb(self.gather_bytes),
            gb(self.buffer_bytes),
            self.interconnect.busbw / 1e9,
            self.interconnect.source,
            1e3 * self.seconds,
            1e3 * self.exposed_seconds,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2-layer model, d 64, 2 heads of 32 (q, k, v, proj: 64 x 64; fc, proj: 256 x 64), vocab 100, on 8
    /// ranks, priced by hand from the ownership rules (round-robin matrices, ceil(100 / 8) = 13-row slices).
    #[test]
    fn bytes_and_time_match_a_hand_count() {
        let m = ModelConfig::new(2, 64, 2, 2, 32, 100, 16).unwrap();
        let (small, big) = (64 * 64u64, 4 * 64 * 64u64);
        // the 12 matrices in canonical order: per layer q, k, v, proj, fc, proj
        let sizes = [
            small, small, small, small, big, big, small, small, small, small, big, big,
        ];
        let total = 2 * 100 * 64 + sizes.iter().sum::<u64>();
        assert_eq!(total, 111_104);
        // matrix i belongs to rank i % 8: ranks 0-3 own two (i and i + 8), 4-7 one
        let mut owned = [0u64; 8];
        for (i, s) in sizes.iter().enumerate() {
            owned[i % 8] += s;
        }
        // rows 0-90 in 13-row slices for ranks 0-6, rows 91-99 (9) for rank 7, of wte and of lm_head
        for (r, o) in owned.iter_mut().enumerate() {
            *o += 2 * if r < 7 { 13 * 64 } else { 9 * 64 };
        }
        assert_eq!(owned, [9856, 9856, 22144, 22144, 18048, 18048, 5760, 5248]);
        // fp32: f32 grads reduced, the f32 master gathered
        let p = CommPlan::new(&m, 8, "h100", Precision::Fp32Gpu).unwrap();
        assert_eq!(p.busiest_rank, 7);
        assert_eq!(p.owned_params, 5248);
        assert_eq!(p.reduce_bytes, 4.0 * (111_104 - 5248) as f64);
        assert_eq!(p.reduce_bytes, 423_424.0);
        assert_eq!(p.gather_bytes, p.reduce_bytes);
        assert_eq!(p.ring_factor, 0.875);
        assert_eq!(p.buffer_bytes, 0.0);
        let wte_reduced = 4.0 * (100 * 64 - 9 * 64) as f64;
        assert!((p.seconds - 2.0 * 423_424.0 / 360e9).abs() < 1e-15);
        assert!((p.exposed_seconds - (423_424.0 + wte_reduced) / 360e9).abs() < 1e-15);
        assert!(p.render().contains("rank 7"), "{}", p.render());
        assert!(p.render().contains("weights gathered (f32)"), "{}", p.render());
        // bf16: the same reduction, the bf16 working copy gathered (half the bytes)
        let b = CommPlan::new(&m, 8, "h100", Precision::Bf16).unwrap();
        assert_eq!(b.reduce_bytes, 423_424.0);
        assert_eq!(b.gather_bytes, 2.0 * (111_104 - 5248) as f64);
        assert!((b.seconds - (423_424.0 + 211_712.0) / 360e9).abs() < 1e-15);
        assert!((b.exposed_seconds - (211_712.0 + wte_reduced) / 360e9).abs() < 1e-15);
        assert!(b.render().contains("weights gathered (bf16)"), "{}", b.render());
        assert!(CommPlan::new(&m, 1, "h100", Precision::Bf16).is_none());
    }

    /// Balanced ownership (4 ranks: three matrices of 4096 + 16384 + 4096 each, 25-row slices) moves exactly
    /// the ring factor of the model.
    #[test]
    fn balanced_ownership_moves_the_ring_factor() {
        let m = ModelConfig::new(2, 64, 2, 2, 32, 100, 16).unwrap();
        let p = CommPlan::new(&m, 4, "b200", Precision::Bf16).unwrap();
        assert_eq!(p.owned_params, 24_576 + 2 * 25 * 64);
        assert_eq!(p.reduce_bytes, 0.75 * 4.0 * 111_104.0);
        assert_eq!(p.interconnect.busbw, 720e9);
    }
}
