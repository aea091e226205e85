//! Who owns which part of the optimizer's work (ZeRO-1), and where each owned part's state lives.
//!
//! As nanochat's DistMuon/DistAdamW: a Muon matrix is owned whole by one rank (round-robin over the block
//! matrices in canonical order); an AdamW parameter (wte, lm_head) is split into contiguous row slices, one
//! per rank. A rank's optimizer state is one contiguous buffer holding, segment by segment in canonical
//! order, the Muon momentum (numel) or the AdamW moments (m then v, 2 x numel) of what it owns.

use crate::config::{ModelConfig, ParamKind};

/// A piece of the parameter buffer one rank updates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Index into `ModelConfig::param_specs()`.
    pub param_index: usize,
    pub kind: ParamKind,
    /// Element range in the parameter (and grad) buffer.
    pub start: usize,
    pub len: usize,
    /// Shape of the piece: the whole matrix for Muon, the row slice for AdamW.
    pub rows: usize,
    pub cols: usize,
    /// Element offset of this piece's state in the rank's state buffer.
    pub state_offset: usize,
}

impl Segment {
    pub fn range(&self) -> std::ops::Range<usize> {
        self.start..self.start + self.len
    }
    /// State elements: Muon keeps one momentum buffer, AdamW two moments.
    pub fn state_len(&self) -> usize {
        match self.kind {
            ParamKind::Matrix => self.len,
            ParamKind::Embedding | ParamKind::Unembedding => 2 * self.len,
        }
    }
}

/// The segments rank `rank` of `world_size` owns, and the size of its state buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardLayout {
    pub rank: usize,
    pub world_size: usize,
    pub segments: Vec<Segment>,
    pub state_len: usize,
}

impl ShardLayout {
    pub fn new(model: &ModelConfig, rank: usize, world_size: usize) -> Self {
        assert!(
            world_size >= 1 && rank < world_size,
            "rank {rank} of world {world_size}"
        );
        let mut segments = Vec::new();
        let mut state_len = 0;
        let mut matrix_index = 0;
        for (i, spec) in model.param_specs().iter().enumerate() {
            let piece = match spec.kind {
                ParamKind::Matrix => {
                    let owner = matrix_index % world_size;
                    matrix_index += 1;
                    (owner == rank).then_some((spec.offset, spec.rows))
                }
                ParamKind::Embedding | ParamKind::Unembedding => {
                    let (r0, r1) = row_slice(spec.rows, rank, world_size);
                    (r1 > r0).then_some((spec.offset + r0 * spec.cols, r1 - r0))
                }
            };
            if let Some((start, rows)) = piece {
                let seg = Segment {
                    param_index: i,
                    kind: spec.kind,
                    start,
                    len: rows * spec.cols,
                    rows,
                    cols: spec.cols,
                    state_offset: state_len,
                };
                state_len += seg.state_len();
                segments.push(seg);
            }
        }
        ShardLayout {
            rank,
            world_size,
            segments,
            state_len,
        }
    }

    /// Where each segment's parameters sit in a packed master (ZeRO-1 with a sharded master: the rank's
    /// segments back to back in canonical order, `model::MasterMap::owned`), one offset per segment.
    pub fn packed_offsets(&self) -> Vec<usize> {
        self.segments
            .iter()
            .scan(0, |at, s| {
                let here = *at;
                *at += s.len;
                Some(here)
            })
            .collect()
    }

    /// (rows, cols) of every Muon matrix this rank owns, in canonical order: what the optimizers size their
    /// Newton-Schulz scratch by.
    pub fn muon_shapes(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.segments
            .iter()
            .filter(|s| s.kind == ParamKind::Matrix)
            .map(|s| (s.rows, s.cols))
    }

    /// Optimizer-state elements of the rank that holds the most (what each GPU must reserve).
    pub fn max_state_len(model: &ModelConfig, world_size: usize) -> usize {
        (0..world_size)
            .map(|r| ShardLayout::new(model, r, world_size).state_len)
            .max()
            .unwrap_or(0)
    }

    /// Elements of Muon's scratch (the update, Newton-Schulz's X and X_next, two Gram matrices) on the rank
    /// whose owned matrices need the most: what either optimizer allocates once, at construction.
    pub fn max_muon_scratch_elems(model: &ModelConfig, world_size: usize) -> usize {
        (0..world_size)
            .map(|r| crate::optim::muon::scratch_elems(ShardLayout::new(model, r, world_size).muon_shapes()))
            .max()
            .unwrap_or(0)
    }

    /// Parameter elements of the rank that owns the most (its fp32 master weights on a GPU).
    pub fn max_owned_params(model: &ModelConfig, world_size: usize) -> usize {
        (0..world_size)
            .map(|r| {
                ShardLayout::new(model, r, world_size)
                    .segments
                    .iter()
                    .map(|s| s.len)
                    .sum::<usize>()
            })
            .max()
            .unwrap_or(0)
    }
}

/// Rows [r0, r1) of a `rows`-row parameter that `rank` owns: contiguous slices of ceil(rows / world).
pub fn row_slice(rows: usize, rank: usize, world_size: usize) -> (usize, usize) {
    let chunk = rows.div_ceil(world_size);
    let r0 = (rank * chunk).min(rows);
    let r1 = ((rank + 1) * chunk).min(rows);
    (r0, r1)
}

/// Three layers of width 64 (two heads of 32), vocabulary 100, sequence 16: the model the layout tests walk
/// (these segments, the master map of `model::master`, the gradient buckets of `train::buckets`), small
/// enough to check element by element, with every kind of tensor.
#[cfg(test)]
pub(crate) fn layout_test_model() -> ModelConfig {
    ModelConfig::new(3, 64, 2, 2, 32, 100, 16).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn world_one_owns_everything_in_order() {
        let m = layout_test_model();
        let l = ShardLayout::new(&m, 0, 1);
        assert_eq!(l.segments.len(), m.param_specs().len());
        let covered: usize = l.segments.iter().map(|s| s.len).sum();
        assert_eq!(covered as u64, m.num_params());
        // state: 2x for wte and lm_head, 1x for the matrices
        let expect = 2 * 2 * 100 * 64 + (m.num_params() as usize - 2 * 100 * 64);
        assert_eq!(l.state_len, expect);
    }

    #[test]
    fn ranks_partition_the_parameters_exactly() {
        let m = layout_test_model();
        for world in [2usize, 3, 8] {
            let mut owner = vec![0u32; m.num_params() as usize];
            for r in 0..world {
                let l = ShardLayout::new(&m, r, world);
                let mut off = 0;
                for s in &l.segments {
                    assert_eq!(s.state_offset, off);
                    off += s.state_len();
                    owner[s.range()].iter_mut().for_each(|o| *o += 1);
                }
                assert_eq!(off, l.state_len);
            }
            assert!(
                owner.iter().all(|&o| o == 1),
                "world {world}: every element owned exactly once"
            );
        }
    }

    #[test]
    fn row_slices_cover_uneven_rows() {
        assert_eq!(row_slice(10, 0, 4), (0, 3));
        assert_eq!(row_slice(10, 3, 4), (9, 10));
        assert_eq!(row_slice(2, 3, 4), (2, 2));
    }
}
