//! The out-of-memory report: what was asked, what the device and this process hold, and what to do.

use crate::source::StreamId;
use crate::stats::fmt_bytes;
use std::fmt;

/// Everything known when an allocation failed after the cache was freed and the allocation retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OomReport {
    /// false in the no-caching mode (`NC_NO_ALLOC_CACHE=1`): nothing was cached, so nothing was flushed.
    pub caching: bool,
    pub device: String,
    pub stream: StreamId,
    /// Bytes asked for.
    pub requested: usize,
    /// The rounded block size.
    pub block_size: usize,
    /// The segment that could not be had.
    pub segment_size: usize,
    /// The device's free and total bytes (all processes), where the source knows them.
    pub device_free: Option<usize>,
    pub device_total: Option<usize>,
    /// This allocator's allocated bytes, and reserved bytes that are cached but not allocated.
    pub allocated: usize,
    pub reserved: usize,
    pub reserved_free: usize,
    /// The largest cached free block (the biggest request the cache could still serve).
    pub largest_free_block: usize,
}

impl fmt::Display for OomReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "out of memory on {}: tried to allocate {} ({} bytes, on {}), which needed a new {} segment.",
            self.device,
            fmt_bytes(self.requested),
            self.requested,
            self.stream,
            fmt_bytes(self.segment_size)
        )?;
        match (self.device_free, self.device_total) {
            (Some(free), Some(total)) => write!(
                f,
                " The device has {} free of {} total.",
                fmt_bytes(free),
                fmt_bytes(total)
            )?,
            _ => write!(f, " The device's free and total memory are unknown.")?,
        }
        if self.caching {
            write!(
                f,
                " This process has {} allocated and {} reserved, of which {} is cached but free (largest free \
                 block {}); unused cached segments were already given back and the allocation retried.",
                fmt_bytes(self.allocated),
                fmt_bytes(self.reserved),
                fmt_bytes(self.reserved_free),
                fmt_bytes(self.largest_free_block)
            )?;
        } else {
            write!(
                f,
                " This process has {} allocated; caching is off (NC_NO_ALLOC_CACHE=1: one driver allocation per \
                 block, a debugging mode), so nothing was cached to give back.",
                fmt_bytes(self.allocated)
            )?;
        }
        write!(
            f,
            "\nWhat to do: lower the device batch size (--dbs, e.g. half of it; gradient accumulation keeps \
             the total batch), or recompute activations in the backward pass (--recompute selective, or \
             --recompute full to keep only each layer's input). `nc-train --plan` with the same flags shows \
             what fits."
        )?;
        if self.caching && self.reserved_free >= self.block_size {
            write!(
                f,
                " The cache holds enough free bytes but no hole big enough: memory is fragmented; a smaller \
                 --dbs reduces the largest activation sizes."
            )?;
        }
        if let (Some(free), Some(total)) = (self.device_free, self.device_total) {
            let others = total.saturating_sub(free).saturating_sub(self.reserved);
            if others > total / 10 {
                write!(
                    f,
                    " Other processes (or the CUDA context) hold about {} of the device: check nvidia-smi.",
                    fmt_bytes(others)
                )?;
            }
        }
        Ok(())
    }
}
