//! A rank's place in its group: which rank it is of how many. Every collective holds one and the
//! `Collective` trait reads `rank` and `world_size` through it; a ring's neighbours are worked out here once.

/// Rank `rank` of `world_size` ranks (`rank < world_size`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub rank: usize,
    pub world_size: usize,
}

impl Member {
    /// The rank this one sends to around a ring: the next, wrapping from the last to rank 0.
    pub fn next(self) -> usize {
        (self.rank + 1) % self.world_size
    }

    /// The rank this one receives from around a ring: the previous, wrapping from rank 0 to the last.
    pub fn prev(self) -> usize {
        (self.rank + self.world_size - 1) % self.world_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbours_wrap_around_the_ring() {
        let at = |rank| Member { rank, world_size: 3 };
        assert_eq!([at(0).next(), at(1).next(), at(2).next()], [1, 2, 0]);
        assert_eq!([at(0).prev(), at(1).prev(), at(2).prev()], [2, 0, 1]);
        let alone = Member { rank: 0, world_size: 1 };
        assert_eq!((alone.next(), alone.prev()), (0, 0));
    }
}
