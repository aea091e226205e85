//! How a buffer is split among ranks: rank r owns the contiguous range `bounds[r]..bounds[r + 1]`.

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
