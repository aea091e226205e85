//! The gradient buckets of data parallelism: which parameter tensors the backward finishes together, in the
//! order it finishes them, and how each tensor is split among the ranks that own it (ZeRO-1).
//!
//! A bucket is what one `GradsReady` event makes final: lm_head's grad (the loss runs first), then each
//! block's six matrices from the last block to the first, then wte. Reducing a bucket as soon as it is
//! ready overlaps that reduction with the rest of the backward (on a device: on a communication stream).
//! Every transport runs this one schedule: the thread and shared-memory rings on the CPU (the twin, tested
//! in CI) and NCCL on GPUs.
//!
//! Ownership is `optim::shard`'s: a block matrix belongs whole to one rank (round-robin over the matrices in
//! canonical order), wte and lm_head are split into row slices, one per rank. A tensor's split is a
//! `Bounds` over its elements: rank r owns `bounds.range(r)` (empty for the ranks that own none of it).

use crate::config::{ModelConfig, ParamKind};
use crate::model::GradsReady;
use crate::optim::shard::row_slice;
use nc_comm::Bounds;
use std::ops::Range;

/// One parameter tensor and how it is split among ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSplit {
    /// Elements of the tensor in the parameter (and grad) buffer.
    pub range: Range<usize>,
    /// Rank r owns `range.start + bounds.range(r)`.
    pub bounds: Bounds,
}

impl TensorSplit {
    /// Element ranges (in the whole buffer) of each rank's part, with the owning rank; empty parts left out.
    pub fn parts(&self) -> impl Iterator<Item = (usize, Range<usize>)> + '_ {
        (0..self.bounds.world_size()).filter_map(move |r| {
            let b = self.bounds.range(r);
            (!b.is_empty()).then(|| (r, self.range.start + b.start..self.range.start + b.end))
        })
    }
}

/// Every parameter tensor's split, in `param_specs` order.
pub fn tensor_splits(model: &ModelConfig, world_size: usize) -> Vec<TensorSplit> {
    let mut matrix_index = 0;
    model
        .param_specs()
        .iter()
        .map(|spec| {
            let n = spec.numel();
            let offsets: Vec<usize> = match spec.kind {
                // the owner (round-robin, as ShardLayout) gets the whole matrix, the others nothing
                ParamKind::Matrix => {
                    let owner = matrix_index % world_size;
                    matrix_index += 1;
                    (0..=world_size).map(|k| if k <= owner { 0 } else { n }).collect()
                }
                ParamKind::Embedding | ParamKind::Unembedding => std::iter::once(0)
                    .chain((0..world_size).map(|r| row_slice(spec.rows, r, world_size).1 * spec.cols))
                    .collect(),
            };
            TensorSplit {
                range: spec.range(),
                bounds: Bounds::new(offsets).expect("offsets from 0, non-decreasing, ending at numel"),
            }
        })
        .collect()
}

/// The tensors one `GradsReady` event makes final.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub ready: GradsReady,
    /// Indices into `param_specs` (and `tensor_splits`).
    pub tensors: Vec<usize>,
}

/// The buckets in the order the backward makes them ready (the order `Gpt::forward_backward_hooked` calls
/// its hook in); every parameter tensor is in exactly one.
pub fn backward_buckets(model: &ModelConfig) -> Vec<Bucket> {
    let specs = model.param_specs();
    let find = |pred: &dyn Fn(&crate::config::ParamSpec) -> bool| -> Vec<usize> {
        specs
            .iter()
            .enumerate()
            .filter(|(_, s)| pred(s))
            .map(|(i, _)| i)
            .collect()
    };
    let mut buckets = vec![Bucket {
        ready: GradsReady::LmHead,
        tensors: find(&|s| s.kind == ParamKind::Unembedding),
    }];
    for l in (0..model.n_layer).rev() {
        buckets.push(Bucket {
            ready: GradsReady::Layer(l),
            tensors: find(&|s| s.layer == Some(l)),
        });
    }
    buckets.push(Bucket {
        ready: GradsReady::Wte,
        tensors: find(&|s| s.kind == ParamKind::Embedding),
    });
    buckets
}

/// Bytes of the largest bucket's f32 grads: what a transport that stages one bucket at a time needs.
pub fn largest_bucket_elems(model: &ModelConfig) -> usize {
    let specs = model.param_specs();
    backward_buckets(model)
        .iter()
        .map(|b| b.tensors.iter().map(|&t| specs[t].numel()).sum::<usize>())
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::shard::{layout_test_model, ShardLayout};

    #[test]
    fn buckets_cover_every_tensor_once_in_backward_order() {
        let m = layout_test_model();
        let b = backward_buckets(&m);
        let order: Vec<GradsReady> = b.iter().map(|b| b.ready).collect();
        assert_eq!(
            order,
            vec![
                GradsReady::LmHead,
                GradsReady::Layer(2),
                GradsReady::Layer(1),
                GradsReady::Layer(0),
                GradsReady::Wte
            ]
        );
        let mut seen = vec![0; m.param_specs().len()];
        for bucket in &b {
            for &t in &bucket.tensors {
                seen[t] += 1;
            }
        }
        assert!(seen.iter().all(|&c| c == 1), "{seen:?}");
        assert_eq!(b[1].tensors.len(), 6);
        // a block of d 64 with 2 heads of 32 and 2 kv heads: q, k, v, proj 64 x 64 each, fc and proj 4 x 64 x 64
        assert_eq!(largest_bucket_elems(&m), 4 * 64 * 64 + 8 * 64 * 64);
    }

    /// The splits give each rank exactly the segments `ShardLayout` says it updates.
    #[test]
    fn splits_agree_with_the_optimizer_shards() {
        let m = layout_test_model();
        for world in [1usize, 2, 3, 8] {
            let splits = tensor_splits(&m, world);
            for r in 0..world {
                let mut mine: Vec<Range<usize>> = splits
                    .iter()
                    .flat_map(|s| s.parts().filter(|(o, _)| *o == r).map(|(_, p)| p))
                    .collect();
                mine.sort_by_key(|p| p.start);
                let layout: Vec<Range<usize>> = ShardLayout::new(&m, r, world)
                    .segments
                    .iter()
                    .map(|s| s.range())
                    .collect();
                assert_eq!(mine, layout, "world {world} rank {r}");
            }
        }
    }
}
