//! Which f32 master weights a model holds: all of them, or, under ZeRO-1 with bf16 working weights, only
//! the pieces its rank owns (`optim::shard`), packed back to back.
//!
//! The master is what the optimizer updates and checkpoints hold; the forward and backward read only the
//! working copy (bf16, every element on every rank). A rank that updates only its own pieces needs the
//! master of nothing else: the other pieces of its working copy arrive from their owners, already rounded
//! (`train::zero1`). So a sharded rank allocates `owned` f32 elements instead of the model's N, and the map
//! below says where each owned piece of the parameter layout (`ModelConfig::param_specs`) sits in that
//! packed buffer. The packing is the one `ShardLayout::packed_offsets` defines, which the optimizers use too.

use crate::config::ModelConfig;
use crate::optim::shard::ShardLayout;
use std::ops::Range;

/// One piece of the parameter layout that the master holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MasterPiece {
    /// First element in the parameter layout (the grad and working-copy buffers' offsets).
    pub start: usize,
    pub len: usize,
    /// First element in the master buffer.
    pub at: usize,
}

impl MasterPiece {
    /// The piece's elements in the parameter layout.
    pub fn range(&self) -> Range<usize> {
        self.start..self.start + self.len
    }
}

/// Where the master buffer's elements sit in the parameter layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterMap {
    /// Elements of the parameter layout (the model's N).
    params: usize,
    /// Ascending, disjoint; `at` is the running sum of the lengths before.
    pieces: Vec<MasterPiece>,
    /// Whether this is a rank's owned share (`owned`) rather than the whole model.
    sharded: bool,
}

impl MasterMap {
    /// Every parameter: the master has the parameter layout itself.
    pub fn full(model: &ModelConfig) -> Self {
        let n = model.num_params() as usize;
        MasterMap {
            params: n,
            pieces: vec![MasterPiece {
                start: 0,
                len: n,
                at: 0,
            }],
            sharded: false,
        }
    }

    /// What rank `rank` of `world_size` updates: its Muon matrices and its wte and lm_head row slices, packed
    /// in canonical order.
    pub fn owned(model: &ModelConfig, rank: usize, world_size: usize) -> Self {
        let layout = ShardLayout::new(model, rank, world_size);
        let pieces = layout
            .segments
            .iter()
            .zip(layout.packed_offsets())
            .map(|(s, at)| MasterPiece {
                start: s.start,
                len: s.len,
                at,
            })
            .collect();
        MasterMap {
            params: model.num_params() as usize,
            pieces,
            sharded: true,
        }
    }

    /// Elements of the master buffer.
    pub fn len(&self) -> usize {
        self.pieces.last().map_or(0, |p| p.at + p.len)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Elements of the whole parameter layout.
    pub fn params(&self) -> usize {
        self.params
    }
    /// A rank's owned share (true) or every parameter (false).
    pub fn is_sharded(&self) -> bool {
        self.sharded
    }
    pub fn pieces(&self) -> &[MasterPiece] {
        &self.pieces
    }

    /// Where the parameter elements `range` start in the master, when it holds all of them (inside one
    /// piece); None when any of them is another rank's.
    pub fn locate(&self, range: Range<usize>) -> Option<usize> {
        let i = self.pieces.partition_point(|p| p.start + p.len <= range.start);
        let p = self.pieces.get(i)?;
        (p.start <= range.start && range.end <= p.start + p.len).then(|| p.at + (range.start - p.start))
    }

    /// The pieces' parts that fall inside the parameter elements `range`: (parameter range, master offset).
    pub fn overlaps(&self, range: Range<usize>) -> impl Iterator<Item = (Range<usize>, usize)> + '_ {
        self.pieces.iter().filter_map(move |p| {
            let (s, e) = (p.start.max(range.start), (p.start + p.len).min(range.end));
            (s < e).then(|| (s..e, p.at + (s - p.start)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::shard::layout_test_model;

    /// Each rank's map packs exactly its segments; over the ranks every parameter is held once.
    #[test]
    fn owned_maps_pack_each_ranks_segments_and_cover_the_model_once() {
        let m = layout_test_model();
        let n = m.num_params() as usize;
        for world in [1usize, 2, 3, 8] {
            let mut held = vec![0u8; n];
            let mut total = 0;
            for r in 0..world {
                let map = MasterMap::owned(&m, r, world);
                let layout = ShardLayout::new(&m, r, world);
                assert_eq!(map.len(), layout.segments.iter().map(|s| s.len).sum::<usize>());
                let mut at = 0;
                for (p, s) in map.pieces().iter().zip(&layout.segments) {
                    assert_eq!((p.start, p.len, p.at), (s.start, s.len, at));
                    at += p.len;
                    held[p.range()].iter_mut().for_each(|h| *h += 1);
                    assert_eq!(map.locate(p.range()), Some(p.at));
                    assert_eq!(map.locate(p.start + 1..p.start + 2), Some(p.at + 1));
                }
                total += map.len();
            }
            assert!(held.iter().all(|&h| h == 1), "world {world}");
            assert_eq!(total, n);
        }
        let full = MasterMap::full(&m);
        assert_eq!((full.len(), full.is_sharded()), (n, false));
        assert_eq!(full.locate(5..n), Some(5));
    }

    #[test]
    fn locate_refuses_what_another_rank_holds() {
        let m = layout_test_model();
        let map = MasterMap::owned(&m, 1, 3);
        let specs = m.param_specs();
        // wte rows are split in slices of 34 rows: rank 1 holds rows 34..68, not row 0 nor the whole tensor
        let wte = &specs[0];
        assert_eq!(map.locate(wte.range()), None);
        assert_eq!(map.locate(0..1), None);
        assert_eq!(map.locate(34 * 64..68 * 64), Some(0));
        assert_eq!(map.locate(34 * 64..68 * 64 + 1), None);
        // the overlap of the whole wte with rank 1's map is its slice
        let parts: Vec<_> = map.overlaps(wte.range()).collect();
        assert_eq!(parts, vec![(34 * 64..68 * 64, 0)]);
    }
}
