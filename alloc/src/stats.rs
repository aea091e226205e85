//! Statistics: running counters kept by the allocator, the snapshot handed to callers, and the
//! one-screen summary for logs.

/// Counters the allocator updates as it goes (all under its lock).
#[derive(Debug, Default, Clone)]
pub(crate) struct Counters {
    pub allocated_bytes: usize,
    pub requested_bytes: usize,
    pub reserved_bytes: usize,
    /// Free bytes held for one stream until an event in flight completes.
    pub waiting_bytes: usize,
    pub peak_allocated_bytes: usize,
    pub peak_reserved_bytes: usize,
    pub peak_active_bytes: usize,
    pub num_allocs: u64,
    pub num_frees: u64,
    pub num_segment_allocs: u64,
    pub num_segment_frees: u64,
    pub num_cache_flushes: u64,
    pub num_ooms: u64,
    pub num_events_recorded: u64,
    pub segments_small: usize,
    pub segments_large: usize,
}

impl Counters {
    pub fn update_peaks(&mut self) {
        self.peak_allocated_bytes = self.peak_allocated_bytes.max(self.allocated_bytes);
        self.peak_reserved_bytes = self.peak_reserved_bytes.max(self.reserved_bytes);
        self.peak_active_bytes = self.peak_active_bytes.max(self.allocated_bytes + self.waiting_bytes);
    }

    pub fn reset_peaks(&mut self) {
        self.peak_allocated_bytes = self.allocated_bytes;
        self.peak_reserved_bytes = self.reserved_bytes;
        self.peak_active_bytes = self.allocated_bytes + self.waiting_bytes;
    }

    pub fn snapshot(
        &self,
        caching: bool,
        largest_free_block: usize,
        free_blocks: usize,
        inactive_split_bytes: usize,
    ) -> AllocatorStats {
        AllocatorStats {
            caching,
            allocated_bytes: self.allocated_bytes,
            requested_bytes: self.requested_bytes,
            reserved_bytes: self.reserved_bytes,
            active_bytes: self.allocated_bytes + self.waiting_bytes,
            peak_allocated_bytes: self.peak_allocated_bytes,
            peak_reserved_bytes: self.peak_reserved_bytes,
            peak_active_bytes: self.peak_active_bytes,
            num_allocs: self.num_allocs,
            num_frees: self.num_frees,
            num_segment_allocs: self.num_segment_allocs,
            num_segment_frees: self.num_segment_frees,
            num_cache_flushes: self.num_cache_flushes,
            num_ooms: self.num_ooms,
            num_events_recorded: self.num_events_recorded,
            segments_small: self.segments_small,
            segments_large: self.segments_large,
            live_blocks: (self.num_allocs - self.num_frees) as usize,
            free_blocks,
            largest_free_block,
            inactive_split_bytes,
        }
    }
}

/// A snapshot of the allocator's statistics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocatorStats {
    /// false in the no-caching mode (`NC_NO_ALLOC_CACHE=1`). There every block is one source allocation of
    /// exactly the requested bytes, given back when freed: reserved equals allocated at all times (so its
    /// peak is the allocated peak, below what the caching allocator reserves), block sizes are the requests
    /// (not rounded to 512), a segment is counted per block, and nothing is cached, waiting or fragmented.
    pub caching: bool,
    /// Bytes in allocated blocks (rounded sizes; the exact requests without caching).
    pub allocated_bytes: usize,
    /// Bytes callers asked for (before rounding).
    pub requested_bytes: usize,
    /// Bytes in segments taken from the source.
    pub reserved_bytes: usize,
    /// Allocated bytes plus freed bytes other streams cannot use yet because an event covering their free
    /// is still in flight.
    pub active_bytes: usize,
    pub peak_allocated_bytes: usize,
    pub peak_reserved_bytes: usize,
    pub peak_active_bytes: usize,
    pub num_allocs: u64,
    pub num_frees: u64,
    /// Segments asked of the source (cudaMalloc calls), and given back.
    pub num_segment_allocs: u64,
    pub num_segment_frees: u64,
    /// Cache flushes, requested (`empty_cache`) or forced by a full device.
    pub num_cache_flushes: u64,
    /// Allocations that failed after the flush and retry.
    pub num_ooms: u64,
    pub num_events_recorded: u64,
    pub segments_small: usize,
    pub segments_large: usize,
    pub live_blocks: usize,
    pub free_blocks: usize,
    pub largest_free_block: usize,
    /// Free bytes in segments that also hold allocated blocks: cached memory that can neither be given
    /// back to the device nor serve a request bigger than its holes.
    pub inactive_split_bytes: usize,
}

impl AllocatorStats {
    /// Reserved bytes not allocated: the cache.
    pub fn cached_free_bytes(&self) -> usize {
        self.reserved_bytes - self.allocated_bytes
    }

    /// Share of the cache that is split: free bytes in segments that also hold allocated blocks, over all
    /// cached free bytes. 0 when every cached byte lies in a wholly free segment (a flush could return it
    /// all); near 1 when the cache is holes between live blocks, the state that ends in fragmentation OOMs.
    pub fn fragmentation(&self) -> f64 {
        let free = self.cached_free_bytes();
        if free == 0 {
            0.0
        } else {
            self.inactive_split_bytes as f64 / free as f64
        }
    }

    /// Three lines for a training log.
    pub fn summary(&self, device: &str) -> String {
        let mode = if self.caching {
            ""
        } else {
            " [no caching (NC_NO_ALLOC_CACHE=1): one driver allocation per block]"
        };
        format!(
            "memory {device}{mode}: allocated {} (peak {}) | active {} (peak {}) | reserved {} (peak {})\n  \
             cache: {} free in {} blocks ({} in split segments, fragmentation {:.1}%), largest {} | \
             segments {} (small {}, large {})\n  \
             allocs {} frees {} live {} | segment allocs {} frees {} | cache flushes {} | OOMs {}",
            fmt_bytes(self.allocated_bytes),
            fmt_bytes(self.peak_allocated_bytes),
            fmt_bytes(self.active_bytes),
            fmt_bytes(self.peak_active_bytes),
            fmt_bytes(self.reserved_bytes),
            fmt_bytes(self.peak_reserved_bytes),
            fmt_bytes(self.cached_free_bytes()),
            self.free_blocks,
            fmt_bytes(self.inactive_split_bytes),
            100.0 * self.fragmentation(),
            fmt_bytes(self.largest_free_block),
            self.segments_small + self.segments_large,
            self.segments_small,
            self.segments_large,
            self.num_allocs,
            self.num_frees,
            self.live_blocks,
            self.num_segment_allocs,
            self.num_segment_frees,
            self.num_cache_flushes,
            self.num_ooms,
        )
    }
}

/// Bytes in binary units with three significant digits: "512 B", "1.50 KiB", "20.0 MiB", "78.0 GiB".
pub fn fmt_bytes(bytes: usize) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    let digits = if value < 10.0 {
        2
    } else if value < 100.0 {
        1
    } else {
        0
    };
    format!("{value:.digits$} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_human_readable() {
        assert_eq!(fmt_bytes(0), "0 B");
        assert_eq!(fmt_bytes(512), "512 B");
        assert_eq!(fmt_bytes(1536), "1.50 KiB");
        assert_eq!(fmt_bytes(20 << 20), "20.0 MiB");
        assert_eq!(fmt_bytes(200 << 20), "200 MiB");
        assert_eq!(fmt_bytes(78 << 30), "78.0 GiB");
    }

    #[test]
    fn fragmentation_figure() {
        let mut c = Counters {
            reserved_bytes: 100 << 20,
            allocated_bytes: 60 << 20,
            ..Default::default()
        };
        assert_eq!(c.snapshot(true, 40 << 20, 1, 0).fragmentation(), 0.0);
        assert!((c.snapshot(true, 10 << 20, 4, 30 << 20).fragmentation() - 0.75).abs() < 1e-12);
        c.allocated_bytes = 100 << 20;
        assert_eq!(c.snapshot(true, 0, 0, 0).fragmentation(), 0.0);
    }
}
