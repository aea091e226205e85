//! How a buffer is split among ranks: rank r owns the contiguous range `bounds[r]..bounds[r + 1]`.

use crate::{CommError, Member};
use std::ops::Range;

/// `world_size + 1` non-decreasing offsets from 0 to the buffer length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bounds {
    offsets: Vec<usize>,
}

impl Bounds {
    /// Offsets must start at 0, never decrease, and hold one more entry than there are ranks.
    pub fn new(offsets: Vec<usize>) -> Option<Self> {
        let ok = offsets.len() >= 2 && offsets[0] == 0 && offsets.windows(2).all(|w| w[0] <= w[1]);
        ok.then_some(Bounds { offsets })
    }

    pub fn world_size(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Total length covered: the buffer length the bounds were made for.
    pub fn len(&self) -> usize {
        *self.offsets.last().expect("at least two offsets")
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn range(&self, rank: usize) -> Range<usize> {
        self.offsets[rank]..self.offsets[rank + 1]
    }

    /// That these bounds were made for the caller's ring (`at`) and a buffer of `len` elements: the error every
    /// collective's `what` returns otherwise, before it moves anything.
    pub fn check_call(&self, at: Member, len: usize, what: &str) -> Result<(), CommError> {
        let Member { rank, world_size } = at;
        if self.world_size() != world_size || self.len() != len {
            return Err(CommError::at(
                rank,
                format!(
                    "{what} called with bounds for {} ranks over {} elements, but the ring has \
                     {world_size} ranks and the buffer {len} elements",
                    self.world_size(),
                    self.len()
                ),
            ));
        }
        Ok(())
    }
}

/// Splits `len` elements over `world_size` ranks as evenly as possible (the first `len % world_size` ranks
/// get one more).
pub fn even_bounds(len: usize, world_size: usize) -> Bounds {
    assert!(world_size >= 1, "a world has at least one rank");
    let base = len / world_size;
    let extra = len % world_size;
    let mut offsets = Vec::with_capacity(world_size + 1);
    let mut at = 0;
    offsets.push(0);
    for r in 0..world_size {
        at += base + usize::from(r < extra);
        offsets.push(at);
    }
    Bounds { offsets }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one check every collective runs on its bounds (thread, shm, NCCL, P2P rings and the P2P twin).
    #[test]
    fn a_call_with_bounds_of_another_world_or_buffer_is_refused_naming_both() {
        let bounds = even_bounds(10, 2);
        let at = |rank, world_size| Member { rank, world_size };
        assert_eq!(bounds.check_call(at(1, 2), 10, "all_gather"), Ok(()));
        let other_world = bounds.check_call(at(1, 3), 10, "all_gather").unwrap_err();
        assert_eq!(other_world.rank, Some(1));
        assert_eq!(
            other_world.to_string(),
            "rank 1: all_gather called with bounds for 2 ranks over 10 elements, but the ring has 3 ranks and the \
             buffer 10 elements"
        );
        let other_buffer = bounds.check_call(at(0, 2), 11, "reduce_scatter_sum").unwrap_err();
        assert!(other_buffer.reason.contains("the buffer 11 elements"), "{other_buffer}");
        assert!(bounds.check_call(at(0, 2), 9, "x").is_err() && bounds.check_call(at(0, 1), 10, "x").is_err());
    }

    #[test]
    fn even_bounds_cover_the_buffer_in_order() {
        for len in [0usize, 1, 5, 64, 1001] {
            for world in 1..=7 {
                let b = even_bounds(len, world);
                assert_eq!(b.world_size(), world);
                assert_eq!(b.len(), len);
                let sizes: Vec<usize> = (0..world).map(|r| b.range(r).len()).collect();
                assert_eq!(sizes.iter().sum::<usize>(), len);
                assert!(
                    sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1,
                    "{sizes:?}"
                );
            }
        }
    }

    #[test]
    fn malformed_bounds_are_rejected() {
        assert!(Bounds::new(vec![0]).is_none());
        assert!(Bounds::new(vec![1, 4]).is_none());
        assert!(Bounds::new(vec![0, 5, 3]).is_none());
        assert!(Bounds::new(vec![0, 3, 3, 9]).is_some());
    }
}
