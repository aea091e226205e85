//! Ring collectives between threads of one process.
//!
//! The steps are `schedule::step_chunks`, whole chunks at a time (no slicing: a channel message has no
//! size limit). Rank r sends to rank r+1 and receives from rank r-1 (mod n). A reduce-scatter takes n-1 steps: at step
//! s rank r sends its partial sum of chunk (r - s - 1) and adds the partial it receives for chunk
//! (r - s - 2) to its own, so chunk c makes one lap starting at rank c+1 and ends, complete, at rank c.
//! An all-gather then passes each finished chunk once around the ring. Each link carries about
//! 2(n-1)/n of the buffer per all-reduce, the bandwidth-optimal figure, which is why rings are used on GPUs
//! too; here it also fixes the order of every sum, so results are deterministic and equal on all ranks.

use crate::partition::Bounds;
use crate::schedule::{step_chunks, steps, Phase};
use crate::{Collective, CommError, Member};
use crossbeam_channel::{unbounded, Receiver, Sender};

/// One rank's end of an in-process ring. Create all ranks with `ThreadRing::new(n)` and move each to its
/// own thread.
pub struct ThreadRing {
    member: Member,
    to_next: Sender<Vec<f32>>,
    from_prev: Receiver<Vec<f32>>,
    /// Buffers that came back around the ring, reused for sends so steady state allocates nothing.
    spare: Vec<Vec<f32>>,
}

/// The links of a ring of `world_size` ranks in one process: for each rank, in rank order, its place, the
/// sender to the next rank and the receiver from the previous one. `channel` makes one link (bounded or not).
pub(crate) fn ring_links<M>(
    world_size: usize,
    channel: impl Fn() -> (Sender<M>, Receiver<M>),
) -> Vec<(Member, Sender<M>, Receiver<M>)> {
    assert!(world_size >= 1, "a ring has at least one rank");
    // Channel r carries messages into rank r, so rank r sends on channel r+1.
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..world_size).map(|_| channel()).unzip();
    receivers
        .into_iter()
        .enumerate()
        .map(|(rank, from_prev)| {
            let member = Member { rank, world_size };
            (member, senders[member.next()].clone(), from_prev)
        })
        .collect()
}

impl ThreadRing {
    /// The `n` ranks of a ring, in rank order.
    pub fn new(world_size: usize) -> Vec<ThreadRing> {
        ring_links(world_size, unbounded)
            .into_iter()
            .map(|(member, to_next, from_prev)| ThreadRing {
                member,
                to_next,
                from_prev,
                spare: Vec::new(),
            })
            .collect()
    }

    fn check(&self, buf: &[f32], bounds: &Bounds, what: &str) -> Result<(), CommError> {
        bounds.check_call(self.member, buf.len(), what)
    }

    fn send(&mut self, data: &[f32]) -> Result<(), CommError> {
        let mut msg = self.spare.pop().unwrap_or_default();
        msg.clear();
        msg.extend_from_slice(data);
        self.to_next
            .send(msg)
            .map_err(|_| self.peer_gone("send to", self.member.next()))
    }

    fn recv(&mut self, expected_len: usize) -> Result<Vec<f32>, CommError> {
        let prev = self.member.prev();
        let msg = self
            .from_prev
            .recv()
            .map_err(|_| self.peer_gone("receive from", prev))?;
        if msg.len() != expected_len {
            return Err(CommError::at(
                self.member.rank,
                format!(
                    "received {} elements from rank {prev}, expected {expected_len}; the ranks called \
                     different collectives or passed different bounds",
                    msg.len()
                ),
            ));
        }
        Ok(msg)
    }

    /// Runs one half of a ring collective over `buf`: each step sends one chunk to the next rank and applies
    /// the chunk received from the previous one with `combine(mine, theirs)`.
    fn run(
        &mut self,
        phase: Phase,
        buf: &mut [f32],
        bounds: &Bounds,
        what: &str,
        combine: fn(&mut [f32], &[f32]),
    ) -> Result<(), CommError> {
        self.check(buf, bounds, what)?;
        let n = self.member.world_size;
        for step in 0..steps(n) {
            let (send_chunk, recv_chunk) = step_chunks(phase, n, self.member.rank, step);
            self.send(&buf[bounds.range(send_chunk)])?;
            let incoming = self.recv(bounds.range(recv_chunk).len())?;
            combine(&mut buf[bounds.range(recv_chunk)], &incoming);
            self.spare.push(incoming);
        }
        Ok(())
    }

    fn peer_gone(&self, what: &str, peer: usize) -> CommError {
        CommError::at(
            self.member.rank,
            format!("cannot {what} rank {peer}: that rank has exited"),
        )
    }
}

impl Collective for ThreadRing {
    fn member(&self) -> Member {
        self.member
    }

    fn reduce_scatter_sum(&mut self, buf: &mut [f32], bounds: &Bounds) -> Result<(), CommError> {
        // Every chunk is summed in ring order from its start (schedule::sum_order); IEEE addition is
        // commutative, so the operand order within one addition does not matter.
        self.run(
            Phase::ReduceScatter,
            buf,
            bounds,
            "reduce_scatter_sum",
            |mine, theirs| {
                for (m, t) in mine.iter_mut().zip(theirs) {
                    *m += *t;
                }
            },
        )
    }

    fn all_gather(&mut self, buf: &mut [f32], bounds: &Bounds) -> Result<(), CommError> {
        self.run(Phase::AllGather, buf, bounds, "all_gather", |mine, theirs| {
            mine.copy_from_slice(theirs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::even_bounds;
    use proptest::prelude::*;
    use std::thread;

    /// Runs `f` on every rank of a ring of `n` threads, returning each rank's result in rank order.
    fn on_ring<T: Send + 'static>(
        n: usize,
        f: impl Fn(&mut ThreadRing) -> T + Send + Sync + Clone + 'static,
    ) -> Vec<T> {
        let handles: Vec<_> = ThreadRing::new(n)
            .into_iter()
            .map(|mut ring| {
                let f = f.clone();
                thread::spawn(move || f(&mut ring))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread panicked"))
            .collect()
    }

    /// Rank r's input: distinct, exactly representable values so sums are exact in any order.
    fn input(rank: usize, len: usize) -> Vec<f32> {
        (0..len).map(|i| ((rank * 1000 + i) % 4093) as f32 - 2000.0).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn all_reduce_equals_the_sum_on_every_rank(n in 1usize..6, len in 0usize..300) {
            let results = on_ring(n, move |ring| {
                let mut buf = input(ring.rank(), len);
                ring.all_reduce_sum(&mut buf).unwrap();
                buf
            });
            let expected: Vec<f32> = (0..len).map(|i| (0..n).map(|r| input(r, len)[i]).sum()).collect();
            for (rank, got) in results.iter().enumerate() {
                prop_assert_eq!(got, &expected, "rank {}", rank);
            }
        }

        #[test]
        fn reduce_scatter_then_gather_with_uneven_bounds(
            n in 1usize..5, sizes in proptest::collection::vec(0usize..40, 4)
        ) {
            let mut offsets = vec![0];
            for s in &sizes[..n] { offsets.push(offsets.last().unwrap() + s); }
            let bounds = Bounds::new(offsets).unwrap();
            let len = bounds.len();
            let b2 = bounds.clone();
            let results = on_ring(n, move |ring| {
                let mut buf = input(ring.rank(), len);
                ring.reduce_scatter_sum(&mut buf, &b2).unwrap();
                let owned = buf[b2.range(ring.rank())].to_vec();
                ring.all_gather(&mut buf, &b2).unwrap();
                (owned, buf)
            });
            let expected: Vec<f32> = (0..len).map(|i| (0..n).map(|r| input(r, len)[i]).sum()).collect();
            for (rank, (owned, gathered)) in results.iter().enumerate() {
                prop_assert_eq!(&owned[..], &expected[bounds.range(rank)]);
                prop_assert_eq!(gathered, &expected);
            }
        }
    }

    #[test]
    fn float_sums_are_bit_identical_across_ranks() {
        // Values whose sum depends on order: every rank must still end with the same bits.
        let results = on_ring(4, |ring| {
            let mut buf: Vec<f32> = (0..257)
                .map(|i| 1.0 / (1.0 + (i * 7 + ring.rank() * 13) as f32))
                .collect();
            ring.all_reduce_sum(&mut buf).unwrap();
            buf.iter().map(|x| x.to_bits()).collect::<Vec<u32>>()
        });
        for r in 1..4 {
            assert_eq!(results[r], results[0], "rank {r} differs from rank 0");
        }
    }

    #[test]
    fn mismatched_bounds_are_an_error_not_a_hang() {
        let mut rings = ThreadRing::new(1);
        let mut buf = vec![0.0f32; 10];
        let err = rings[0].reduce_scatter_sum(&mut buf, &even_bounds(9, 1)).unwrap_err();
        assert!(err.reason.contains("buffer 10 elements"), "{err}");
    }

    #[test]
    fn a_departed_peer_is_an_error() {
        let mut rings = ThreadRing::new(2);
        let survivor = rings.remove(0);
        drop(rings); // rank 1 exits without taking part
        let mut survivor = survivor;
        let mut buf = vec![1.0f32; 8];
        let err = survivor.all_reduce_sum(&mut buf).unwrap_err();
        assert!(err.reason.contains("has exited"), "{err}");
    }
}
