//! Size classes: how a request is rounded, which pool serves it, and how big a new segment is.
//!
//! The numbers follow PyTorch's CUDACachingAllocator, whose choices are well tested on real training jobs:
//! 512-byte granules, a small pool for requests up to 1 MiB carved from 2 MiB segments, and a large pool of
//! 20 MiB segments, with requests of 10 MiB and more getting a segment of their own (rounded to 2 MiB).

use crate::error::AllocError;

/// Every block size is a multiple of this; it is also the alignment of every block.
pub const GRANULE: usize = 512;
/// Requests up to this size are served by the small pool.
pub const SMALL_REQUEST_MAX: usize = 1 << 20;
/// The small pool grows by segments of this size.
pub const SMALL_SEGMENT: usize = 2 << 20;
/// The large pool grows by segments of this size for requests below `EXACT_SEGMENT_MIN`.
pub const LARGE_SEGMENT: usize = 20 << 20;
/// Requests of at least this size get a segment of their own.
pub const EXACT_SEGMENT_MIN: usize = 10 << 20;
/// Exact segments are rounded up to this multiple.
pub const EXACT_SEGMENT_ROUND: usize = 2 << 20;
/// An oversize block (>= max_split_size) may serve a request at most this much smaller than itself.
pub const OVERSIZE_SLACK: usize = 20 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolKind {
    Small,
    Large,
}

/// Tunables of the allocator. The defaults suit training runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocatorConfig {
    /// Blocks at least this big are never split, and serve only requests within `OVERSIZE_SLACK` of their
    /// size. Without this, a small request that happens to best-fit a freed multi-GiB block shreds it, and
    /// the next big request finds no hole: the classic late-run fragmentation OOM.
    pub max_split_size: usize,
    /// true (the default): cache freed blocks in segments for reuse. false: the debug mode that
    /// `NC_NO_ALLOC_CACHE=1` turns on (`crate::no_cache`): every block is its own source allocation of exactly
    /// the requested bytes, given back to the source when freed, so a memory checker sees each tensor's
    /// bounds and a use after free.
    pub caching: bool,
}

/// Default `max_split_size`: 64 MiB. Blocks this big are whole segments that are never split, so once
/// free they can always be given back on a flush; only the ones below it leave holes. On a random
/// workload with live bytes up to 80% of the device (tests/long_run.rs) this turns hundreds of
/// fragmentation OOMs (no limit, or 256 MiB) into none; a repeated training step reuses its big blocks
/// exactly, so it loses nothing.
pub const DEFAULT_MAX_SPLIT_SIZE: usize = 64 << 20;

impl Default for AllocatorConfig {
    fn default() -> Self {
        AllocatorConfig {
            max_split_size: DEFAULT_MAX_SPLIT_SIZE,
            caching: true,
        }
    }
}

impl AllocatorConfig {
    pub fn validate(&self) -> Result<(), AllocError> {
        if self.max_split_size <= LARGE_SEGMENT {
            return Err(AllocError::Config(format!(
                "max_split_size {} must be larger than the 20 MiB large segment size, or blocks of ordinary \
                 segments could never be split; use at least {} bytes",
                self.max_split_size,
                LARGE_SEGMENT + GRANULE
            )));
        }
        Ok(())
    }
}

fn round_up(x: usize, multiple: usize) -> Option<usize> {
    x.checked_add(multiple - 1).map(|v| v / multiple * multiple)
}

/// The block size that serves a request of `bytes`: a multiple of 512, at least 512 (so a zero-byte
/// request still gets a distinct address).
pub fn block_size_for(bytes: usize) -> Result<usize, AllocError> {
    match round_up(bytes.max(1), GRANULE) {
        Some(size) => Ok(size),
        None => Err(AllocError::RequestTooLarge { bytes }),
    }
}

pub fn pool_kind_for(block_size: usize) -> PoolKind {
    if block_size <= SMALL_REQUEST_MAX {
        PoolKind::Small
    } else {
        PoolKind::Large
    }
}

/// The size of the segment to ask the source for when no cached block fits `block_size`.
pub fn segment_size_for(block_size: usize) -> Result<usize, AllocError> {
    if block_size <= SMALL_REQUEST_MAX {
        Ok(SMALL_SEGMENT)
    } else if block_size < EXACT_SEGMENT_MIN {
        Ok(LARGE_SEGMENT)
    } else {
        round_up(block_size, EXACT_SEGMENT_ROUND).ok_or(AllocError::RequestTooLarge { bytes: block_size })
    }
}

/// Whether a free block of `block_size` may serve a request whose block size is `want` (block >= want).
pub fn oversize_allows(block_size: usize, want: usize, max_split_size: usize) -> bool {
    if block_size < max_split_size {
        return true;
    }
    // An oversize block serves only big requests, and wastes at most OVERSIZE_SLACK on them.
    want >= max_split_size && block_size - want <= OVERSIZE_SLACK
}

/// Whether taking `want` bytes out of a free block of `block_size` leaves a remainder worth keeping as its
/// own free block (otherwise the whole block is handed out).
pub fn should_split(block_size: usize, want: usize, kind: PoolKind, max_split_size: usize) -> bool {
    if block_size >= max_split_size {
        return false;
    }
    let remainder = block_size - want;
    match kind {
        PoolKind::Small => remainder >= GRANULE,
        // Large-pool remainders of 1 MiB or less would be useless to large requests.
        PoolKind::Large => remainder > SMALL_REQUEST_MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_to_granules() {
        assert_eq!(block_size_for(0).unwrap(), 512);
        assert_eq!(block_size_for(1).unwrap(), 512);
        assert_eq!(block_size_for(512).unwrap(), 512);
        assert_eq!(block_size_for(513).unwrap(), 1024);
        assert!(block_size_for(usize::MAX).is_err());
    }

    #[test]
    fn segment_sizes_per_class() {
        assert_eq!(segment_size_for(512).unwrap(), 2 << 20);
        assert_eq!(segment_size_for(1 << 20).unwrap(), 2 << 20);
        assert_eq!(segment_size_for((1 << 20) + 512).unwrap(), 20 << 20);
        assert_eq!(segment_size_for((10 << 20) - 512).unwrap(), 20 << 20);
        assert_eq!(segment_size_for(10 << 20).unwrap(), 10 << 20);
        assert_eq!(segment_size_for((10 << 20) + 512).unwrap(), 12 << 20);
        assert_eq!(pool_kind_for(1 << 20), PoolKind::Small);
        assert_eq!(pool_kind_for((1 << 20) + 512), PoolKind::Large);
    }

    #[test]
    fn split_and_oversize_rules() {
        let max = 512 << 20;
        assert!(should_split(2 << 20, 1024, PoolKind::Small, max));
        assert!(!should_split(1024, 1024, PoolKind::Small, max));
        assert!(!should_split(20 << 20, 19 << 20, PoolKind::Large, max));
        assert!(should_split(20 << 20, (19 << 20) - 512, PoolKind::Large, max));
        assert!(!should_split(600 << 20, 2 << 20, PoolKind::Large, max));
        assert!(!oversize_allows(600 << 20, 100 << 20, max));
        assert!(oversize_allows(600 << 20, 590 << 20, max));
        assert!(!oversize_allows(600 << 20, 579 << 20, max));
        assert!(oversize_allows(500 << 20, 2 << 20, max));
        assert!(AllocatorConfig {
            max_split_size: 20 << 20,
            ..AllocatorConfig::default()
        }
        .validate()
        .is_err());
        assert!(AllocatorConfig::default().validate().is_ok());
    }
}
