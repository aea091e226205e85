//! The GPU peer-to-peer ring's plan tables: `schedule::ring_plan`, the very plan the shared-memory ring
//! runs, encoded for `kernels-ptx/cuda/p2p_ring.cu` (two u64 per operation: word 0 = first element, word 1 =
//! element count | step << 32 | `OP_RECV` for a receive). Pure functions, so the CPU emulation of the
//! kernels (comm/tests/p2p_emu.rs) runs them with the tables the GPU gets.

use crate::partition::Bounds;
use crate::schedule::{ring_plan, steps, Phase, RingOp};
use nc_kernels::p2p::{OP_RECV, PART_ALIGN};

/// Elements of one slice of `ring_plan`: what `blocks` slots of `slot_bytes` hold. Reduce-scatter slots
/// carry f32 partial sums whatever the buffer's type (f32 accumulation); all-gather slots carry elements of
/// `elem_bytes` unchanged. Each block's part of a slice (ceil(len / blocks) rounded up to `PART_ALIGN`)
/// then fits its slot as long as a slot holds a multiple of `PART_ALIGN` elements, which `slot_bytes`
/// being a multiple of 32 guarantees.
pub fn slice_elems(phase: Phase, elem_bytes: usize, blocks: usize, slot_bytes: usize) -> usize {
    assert!(
        blocks >= 1 && slot_bytes.is_multiple_of(32) && slot_bytes > 0,
        "blocks {blocks} slot_bytes {slot_bytes}"
    );
    let slot_elem = match phase {
        Phase::ReduceScatter => 4,
        Phase::AllGather => elem_bytes,
    };
    blocks * slot_bytes / slot_elem
}

/// The table one rank's kernel runs for one half of a ring collective.
pub fn encode(phase: Phase, bounds: &Bounds, rank: usize, slice_elems: usize) -> Vec<u64> {
    let mut table = Vec::new();
    for op in ring_plan(phase, bounds, rank, slice_elems) {
        let (step, elems, recv) = match op {
            RingOp::Send { step, elems } => (step, elems, 0),
            RingOp::Recv { step, elems } => (step, elems, OP_RECV),
        };
        assert!(
            step < 1 << 16 && elems.len() < 1 << 32,
            "a step or slice too large to encode"
        );
        table.push(elems.start as u64);
        table.push(elems.len() as u64 | (step as u64) << 32 | recv);
    }
    table
}

/// One tensor of a bucket: `bounds` splits the elements `start..start + bounds.len()` of the bucket's span
/// (element offsets from the span's first element) among the ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub start: usize,
    pub bounds: Bounds,
}

impl Piece {
    pub fn end(&self) -> usize {
        self.start + self.bounds.len()
    }
}

/// Elements a list of pieces spans (the end of the last), or why the list is unusable: the pieces must lie
/// in increasing order without overlapping (a bf16 reduce-scatter keeps every piece's partial sums in one
/// f32 scratch indexed like the span) and have bounds for `world_size` ranks.
pub fn pieces_span(pieces: &[Piece], world_size: usize) -> Result<usize, String> {
    let mut end = 0;
    for (i, p) in pieces.iter().enumerate() {
        if p.bounds.world_size() != world_size {
            return Err(format!(
                "piece {i} has bounds for {} ranks, the ring has {world_size}",
                p.bounds.world_size()
            ));
        }
        if p.start < end {
            return Err(format!(
                "piece {i} starts at element {} inside the previous piece (which ends at {end}): pieces must be in \
                 increasing order without overlap",
                p.start
            ));
        }
        end = p.end();
    }
    Ok(end)
}

/// The table of one launch over several tensors: each piece's `encode`d operations, shifted to its start,
/// concatenated in piece order. A launch over this table does exactly what one launch per piece (in that
/// order, sequence numbers carried from one to the next) would: the kernels' operations are independent
/// entries, a rank's k-th send pairs with the next rank's k-th receive in both, and each block's flags and
/// slots only ever see the same sequence of operations. What one launch saves is the per-launch latency and
/// the wait for the slowest block between tensors.
pub fn encode_pieces(phase: Phase, pieces: &[Piece], rank: usize, slice_elems: usize) -> Vec<u64> {
    let mut table = Vec::new();
    for p in pieces {
        let ops = encode(phase, &p.bounds, rank, slice_elems);
        for op in ops.chunks(2) {
            table.push(op[0] + p.start as u64);
            table.push(op[1]);
        }
    }
    table
}

/// (sends, receives) in a table: how far a launch advances the rank's two sequence numbers.
pub fn counts(table: &[u64]) -> (u64, u64) {
    let recvs = table.chunks(2).filter(|op| op[1] & OP_RECV != 0).count() as u64;
    (table.len() as u64 / 2 - recvs, recvs)
}

/// The step at which a reduce-scatter receives the chunk the rank owns (the kernel rounds it into `out`).
pub fn last_step(world_size: usize) -> usize {
    steps(world_size).saturating_sub(1)
}

/// Bytes of one block's one-shot region needed for `len` elements of `elem_bytes` over `blocks` blocks.
pub fn one_shot_region_bytes(len: usize, elem_bytes: usize, blocks: usize) -> usize {
    let per = len.div_ceil(blocks).div_ceil(PART_ALIGN) * PART_ALIGN;
    per * elem_bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::even_bounds;
    use crate::schedule::step_chunks;

    #[test]
    fn a_table_decodes_to_the_schedule() {
        let bounds = Bounds::new(vec![0, 5, 5, 17, 20]).unwrap();
        for phase in [Phase::ReduceScatter, Phase::AllGather] {
            for rank in 0..4 {
                let table = encode(phase, &bounds, rank, 3);
                let plan = ring_plan(phase, &bounds, rank, 3);
                assert_eq!(table.len(), 2 * plan.len());
                for (op, words) in plan.iter().zip(table.chunks(2)) {
                    let (step, elems, recv) = match op {
                        RingOp::Send { step, elems } => (*step, elems.clone(), false),
                        RingOp::Recv { step, elems } => (*step, elems.clone(), true),
                    };
                    assert_eq!(words[0], elems.start as u64);
                    assert_eq!(words[1] & 0xffff_ffff, elems.len() as u64);
                    assert_eq!((words[1] >> 32) & 0xffff, step as u64);
                    assert_eq!(words[1] & OP_RECV != 0, recv);
                    // Each op lies inside the chunk the schedule names for its step.
                    let (send_chunk, recv_chunk) = step_chunks(phase, 4, rank, step);
                    let chunk = bounds.range(if recv { recv_chunk } else { send_chunk });
                    assert!(chunk.start <= elems.start && elems.end <= chunk.end);
                }
                let sends = plan.iter().filter(|op| matches!(op, RingOp::Send { .. })).count() as u64;
                assert_eq!(counts(&table), (sends, plan.len() as u64 - sends));
            }
        }
    }

    /// A bucket's table is its tensors' tables shifted to their starts, in order (what one launch per
    /// tensor would run, sequence numbers carried over).
    #[test]
    fn a_bucket_table_is_its_pieces_tables_shifted_and_concatenated() {
        let pieces = [
            Piece {
                start: 4,
                bounds: Bounds::new(vec![0, 5, 5, 17]).unwrap(),
            },
            Piece {
                start: 30,
                bounds: even_bounds(10, 3),
            },
        ];
        assert_eq!(pieces_span(&pieces, 3), Ok(40));
        for phase in [Phase::ReduceScatter, Phase::AllGather] {
            for rank in 0..3 {
                let table = encode_pieces(phase, &pieces, rank, 4);
                let mut want = Vec::new();
                for p in &pieces {
                    for op in encode(phase, &p.bounds, rank, 4).chunks(2) {
                        want.extend([op[0] + p.start as u64, op[1]]);
                    }
                }
                assert_eq!(table, want);
                let (a, b) = (
                    encode(phase, &pieces[0].bounds, rank, 4),
                    encode(phase, &pieces[1].bounds, rank, 4),
                );
                assert_eq!(table.len(), a.len() + b.len());
                assert!(table[a.len()..].chunks(2).all(|op| op[0] >= 30 && op[0] < 40));
            }
        }
        let overlapping = [pieces[1].clone(), pieces[0].clone()];
        assert!(pieces_span(&overlapping, 3).unwrap_err().contains("without overlap"));
        assert!(pieces_span(&pieces, 2).unwrap_err().contains("bounds for 3 ranks"));
    }

    #[test]
    fn the_last_reduce_scatter_step_receives_the_owned_chunk() {
        for n in 2..=8 {
            for rank in 0..n {
                let (_, recv) = step_chunks(Phase::ReduceScatter, n, rank, last_step(n));
                assert_eq!(recv, rank);
            }
        }
        assert!(encode(Phase::ReduceScatter, &even_bounds(9, 1), 0, 4).is_empty());
    }

    #[test]
    fn a_block_part_fits_its_slot() {
        for (phase, elem) in [
            (Phase::ReduceScatter, 2),
            (Phase::ReduceScatter, 4),
            (Phase::AllGather, 2),
            (Phase::AllGather, 4),
        ] {
            for blocks in 1..=16 {
                for slot_bytes in [32, 96, 4096] {
                    let slice = slice_elems(phase, elem, blocks, slot_bytes);
                    let part = slice.div_ceil(blocks).div_ceil(PART_ALIGN) * PART_ALIGN;
                    let slot_elem = if phase == Phase::ReduceScatter { 4 } else { elem };
                    assert!(part * slot_elem <= slot_bytes, "{phase:?} {elem} {blocks} {slot_bytes}");
                }
            }
        }
    }
}
