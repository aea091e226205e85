//! A pool of free blocks, kept sorted by (size, address) for best-fit lookup.
//!
//! A sorted Vec rather than a BTreeSet: pools hold tens to a few hundred blocks, a binary search plus a
//! short memmove is faster than tree nodes at that size, and once the Vec has grown to its working
//! capacity, inserting and removing never touches the heap.

/// One free block in a pool: its size and address (the sort key) and its index in the block table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PoolEntry {
    pub size: usize,
    pub addr: u64,
    pub node: u32,
}

#[derive(Debug, Default)]
pub struct Pool {
    entries: Vec<PoolEntry>,
}

impl Pool {
    pub fn insert(&mut self, entry: PoolEntry) {
        let at = self
            .entries
            .partition_point(|e| (e.size, e.addr) < (entry.size, entry.addr));
        self.entries.insert(at, entry);
    }

    /// Remove the entry for the block at (size, addr); false if it is not here.
    pub fn remove(&mut self, size: usize, addr: u64) -> bool {
        let at = self.entries.partition_point(|e| (e.size, e.addr) < (size, addr));
        if at < self.entries.len() && self.entries[at].size == size && self.entries[at].addr == addr {
            self.entries.remove(at);
            true
        } else {
            false
        }
    }

    /// The smallest block of at least `size` bytes (lowest address among equals), without removing it.
    pub fn best_fit(&self, size: usize) -> Option<PoolEntry> {
        let at = self.entries.partition_point(|e| e.size < size);
        self.entries.get(at).copied()
    }

    /// Index of the best fit, for `remove_at`.
    pub fn best_fit_index(&self, size: usize) -> Option<usize> {
        let at = self.entries.partition_point(|e| e.size < size);
        (at < self.entries.len()).then_some(at)
    }

    pub fn remove_at(&mut self, index: usize) -> PoolEntry {
        self.entries.remove(index)
    }

    pub fn largest(&self) -> Option<PoolEntry> {
        self.entries.last().copied()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entries(&self) -> &[PoolEntry] {
        &self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(size: usize, addr: u64) -> PoolEntry {
        PoolEntry {
            size,
            addr,
            node: addr as u32,
        }
    }

    #[test]
    fn best_fit_is_smallest_then_lowest_address() {
        let mut p = Pool::default();
        for (s, a) in [(4096, 7), (1024, 9), (4096, 3), (2048, 1)] {
            p.insert(e(s, a));
        }
        assert_eq!(p.best_fit(1500), Some(e(2048, 1)));
        assert_eq!(p.best_fit(3000), Some(e(4096, 3)));
        assert_eq!(p.best_fit(512), Some(e(1024, 9)));
        assert_eq!(p.best_fit(5000), None);
        assert_eq!(p.best_fit_index(5000), None);
        let i = p.best_fit_index(3000).unwrap();
        assert_eq!(p.entries()[i], e(4096, 3));
        assert_eq!(p.largest(), Some(e(4096, 7)));
        assert!(p.remove(4096, 3));
        assert!(!p.remove(4096, 3));
        assert_eq!(p.best_fit(3000), Some(e(4096, 7)));
        assert_eq!(p.len(), 3);
    }
}
