//! The ring's schedule: which chunk each rank sends and receives at each step, cut into slices.
//!
//! Pure functions of (bounds, world size, rank, step, slice size), shared by every ring transport (the
//! shared-memory ring between processes and, later, the GPU peer-to-peer ring), so CI checks with real
//! processes the very schedule the GPU runs.
//!
//! Rank r sends to rank r+1 and receives from rank r-1 (mod n); chunk c is `bounds.range(c)`.
//! - Reduce-scatter, n-1 steps: at step s rank r sends its partial sum of chunk r-s-1 and adds the partial
//!   it receives for chunk r-s-2 to its own (incoming partial first). Chunk c therefore starts at rank c+1,
//!   gains one term per hop, and ends complete at rank c: its sum is taken in the ring order
//!   c+1, c+2, ..., c (`sum_order`), the same on every rank and the same as `ThreadRing`.
//! - All-gather, n-1 steps: at step s rank r sends chunk r-s (its own at step 0) and stores chunk r-s-1.
//!
//! Each step's chunks are cut into slices of at most `slice_elems` elements, and a rank alternates "send
//! slice j, receive slice j" within a step, so the next rank starts on slice 0 while this one works on
//! slice 1: the pipeline. Every wait is on an operation that comes earlier in this order on the neighbour
//! (a receive waits on the same slice's send; a send waits on the receive of a slice `slots` earlier), so
//! any number of slots >= 1 is deadlock-free.

use crate::partition::Bounds;
use std::ops::Range;

/// Which half of a ring collective runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Received slices are added to the receiver's own partial sums.
    ReduceScatter,
    /// Received slices overwrite the receiver's copy.
    AllGather,
}

/// One operation of one rank, in the order it performs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingOp {
    /// Send `elems` of this rank's buffer to the next rank.
    Send { step: usize, elems: Range<usize> },
    /// Receive `elems` from the previous rank (add them for reduce-scatter, store them for all-gather).
    Recv { step: usize, elems: Range<usize> },
}

/// Number of steps of each half of a ring collective.
pub fn steps(world_size: usize) -> usize {
    world_size.saturating_sub(1)
}

/// (chunk sent, chunk received) by `rank` at `step`.
pub fn step_chunks(phase: Phase, world_size: usize, rank: usize, step: usize) -> (usize, usize) {
    let n = world_size;
    // `behind(k)` = rank - k mod n, without underflow (step < n so k <= n + 1).
    let behind = |k: usize| (rank + 2 * n - k) % n;
    match phase {
        Phase::ReduceScatter => (behind(step + 1), behind(step + 2)),
        Phase::AllGather => (behind(step), behind(step + 1)),
    }
}

/// `range` cut into consecutive slices of at most `slice_elems` elements (none for an empty range).
pub fn slices(range: Range<usize>, slice_elems: usize) -> impl Iterator<Item = Range<usize>> {
    assert!(slice_elems >= 1, "a slice holds at least one element");
    let end = range.end;
    range
        .step_by(slice_elems)
        .map(move |start| start..(start + slice_elems).min(end))
}

/// The ranks whose terms make up chunk `chunk` after a reduce-scatter, in the order they are added.
pub fn sum_order(world_size: usize, chunk: usize) -> impl Iterator<Item = usize> {
    (1..=world_size).map(move |k| (chunk + k) % world_size)
}

/// Every operation `rank` performs for one half of a ring collective, in order.
pub fn ring_plan(phase: Phase, bounds: &Bounds, rank: usize, slice_elems: usize) -> Vec<RingOp> {
    let n = bounds.world_size();
    let mut ops = Vec::new();
    for step in 0..steps(n) {
        let (send_chunk, recv_chunk) = step_chunks(phase, n, rank, step);
        let mut sends = slices(bounds.range(send_chunk), slice_elems);
        let mut recvs = slices(bounds.range(recv_chunk), slice_elems);
        loop {
            let send = sends.next();
            let recv = recvs.next();
            if send.is_none() && recv.is_none() {
                break;
            }
            if let Some(elems) = send {
                ops.push(RingOp::Send { step, elems });
            }
            if let Some(elems) = recv {
                ops.push(RingOp::Recv { step, elems });
            }
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::even_bounds;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    /// What an element holds in the simulation: the ranks whose terms were added, in order.
    type Terms = Vec<usize>;

    /// Runs every rank's plan with message queues of at most `slots` slices between neighbours, taking
    /// turns while any rank can progress. Returns each rank's final buffer, or the ranks' positions if
    /// they all block (a deadlock).
    fn simulate(
        phase: Phase,
        bounds: &Bounds,
        slice_elems: usize,
        slots: usize,
        start: impl Fn(usize, usize) -> Terms,
    ) -> Result<Vec<Vec<Terms>>, Vec<usize>> {
        let n = bounds.world_size();
        let plans: Vec<Vec<RingOp>> = (0..n).map(|r| ring_plan(phase, bounds, r, slice_elems)).collect();
        let mut bufs: Vec<Vec<Terms>> = (0..n)
            .map(|r| (0..bounds.len()).map(|i| start(r, i)).collect())
            .collect();
        // queues[r]: slices in flight into rank r, with the element range the sender sent.
        let mut queues: Vec<VecDeque<(Range<usize>, Vec<Terms>)>> = vec![VecDeque::new(); n];
        let mut pc = vec![0usize; n];
        loop {
            let mut progressed = false;
            for r in 0..n {
                while let Some(op) = plans[r].get(pc[r]) {
                    match op {
                        RingOp::Send { elems, .. } => {
                            let next = (r + 1) % n;
                            if queues[next].len() >= slots {
                                break;
                            }
                            queues[next].push_back((elems.clone(), bufs[r][elems.clone()].to_vec()));
                        }
                        RingOp::Recv { elems, .. } => {
                            let Some((sent, data)) = queues[r].pop_front() else {
                                break;
                            };
                            assert_eq!(&sent, elems, "rank {r} received a different slice than it expects");
                            for (mine, theirs) in bufs[r][elems.clone()].iter_mut().zip(data) {
                                match phase {
                                    Phase::ReduceScatter => {
                                        let mut sum = theirs;
                                        sum.extend_from_slice(mine);
                                        *mine = sum;
                                    }
                                    Phase::AllGather => *mine = theirs,
                                }
                            }
                        }
                    }
                    pc[r] += 1;
                    progressed = true;
                }
            }
            if pc.iter().zip(&plans).all(|(p, plan)| *p == plan.len()) {
                assert!(queues.iter().all(|q| q.is_empty()), "slices left unreceived");
                return Ok(bufs);
            }
            if !progressed {
                return Err(pc);
            }
        }
    }

    fn arbitrary_bounds() -> impl Strategy<Value = Bounds> {
        (1usize..=8, proptest::collection::vec(0usize..23, 8), any::<bool>()).prop_map(|(n, sizes, even)| {
            if even {
                even_bounds(sizes.iter().sum(), n)
            } else {
                let mut offsets = vec![0];
                for s in &sizes[..n] {
                    offsets.push(offsets.last().unwrap() + s);
                }
                Bounds::new(offsets).unwrap()
            }
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Each owned element ends with every rank's term exactly once, in `sum_order`.
        #[test]
        fn reduce_scatter_adds_every_term_once_in_ring_order(
            bounds in arbitrary_bounds(), slice_elems in 1usize..9, slots in 1usize..4
        ) {
            let n = bounds.world_size();
            let bufs = simulate(Phase::ReduceScatter, &bounds, slice_elems, slots, |r, _| vec![r])
                .map_err(|pc| TestCaseError::fail(format!("deadlock at {pc:?}")))?;
            for (r, buf) in bufs.iter().enumerate() {
                let order: Vec<usize> = sum_order(n, r).collect();
                for i in bounds.range(r) {
                    prop_assert_eq!(&buf[i], &order, "rank {} element {}", r, i);
                }
            }
        }

        /// Every rank ends with every owner's chunk.
        #[test]
        fn all_gather_delivers_every_chunk_from_its_owner(
            bounds in arbitrary_bounds(), slice_elems in 1usize..9, slots in 1usize..4
        ) {
            let n = bounds.world_size();
            let owner = |i: usize| (0..n).find(|&c| bounds.range(c).contains(&i)).unwrap();
            let bufs = simulate(Phase::AllGather, &bounds, slice_elems, slots, |r, i| {
                if owner(i) == r { vec![r] } else { vec![] }
            })
            .map_err(|pc| TestCaseError::fail(format!("deadlock at {pc:?}")))?;
            for (r, buf) in bufs.iter().enumerate() {
                for (i, terms) in buf.iter().enumerate() {
                    prop_assert_eq!(terms, &vec![owner(i)], "rank {} element {}", r, i);
                }
            }
        }

        /// Slices of a step cover its chunks exactly, in order, each at most `slice_elems` long.
        #[test]
        fn plan_slices_cover_each_chunk(bounds in arbitrary_bounds(), slice_elems in 1usize..9, rank in 0usize..8) {
            let n = bounds.world_size();
            let rank = rank % n;
            for phase in [Phase::ReduceScatter, Phase::AllGather] {
                let plan = ring_plan(phase, &bounds, rank, slice_elems);
                for step in 0..steps(n) {
                    let (send_chunk, recv_chunk) = step_chunks(phase, n, rank, step);
                    let pick = |want_send: bool| -> Vec<usize> {
                        plan.iter().flat_map(|op| match op {
                            RingOp::Send { step: s, elems } if want_send && *s == step => elems.clone(),
                            RingOp::Recv { step: s, elems } if !want_send && *s == step => elems.clone(),
                            _ => 0..0,
                        }).collect()
                    };
                    prop_assert_eq!(pick(true), bounds.range(send_chunk).collect::<Vec<_>>());
                    prop_assert_eq!(pick(false), bounds.range(recv_chunk).collect::<Vec<_>>());
                }
                let sizes_ok = plan.iter().all(|op| match op {
                    RingOp::Send { elems, .. } | RingOp::Recv { elems, .. } =>
                        !elems.is_empty() && elems.len() <= slice_elems,
                });
                prop_assert!(sizes_ok, "an empty or oversized slice in {:?}", plan);
            }
        }
    }

    #[test]
    fn a_single_rank_does_nothing() {
        assert!(ring_plan(Phase::ReduceScatter, &even_bounds(10, 1), 0, 4).is_empty());
        assert!(ring_plan(Phase::AllGather, &even_bounds(10, 1), 0, 4).is_empty());
        assert_eq!(sum_order(1, 0).collect::<Vec<_>>(), vec![0]);
    }

    #[test]
    fn sum_order_starts_after_the_owner() {
        assert_eq!(sum_order(4, 1).collect::<Vec<_>>(), vec![2, 3, 0, 1]);
        assert_eq!(sum_order(4, 3).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    }
}
