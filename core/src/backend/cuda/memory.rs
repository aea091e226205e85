//! Device memory of the CUDA backend: every buffer, id buffer and scratch is a block of nc-alloc's caching
//! allocator, never a bare cuMemAlloc, so a training step allocates nothing from the driver after the first
//! one and an out-of-memory comes back as an `NcError` carrying the allocator's report (what was asked, what
//! the device and this process hold, what to do).
//!
//! Generic over the allocator's `MemorySource` so the sizing, the error path and the bookkeeping run on the
//! CPU with `HostSource` in the tests below; the backend uses `CudaSource`.
//!
//! Frees: a block is given back on the backend's one stream when its buffer drops, and the allocator may
//! hand it to the next request on that stream at once: stream order runs every kernel queued before the
//! drop before any kernel queued after the reuse, so no event or host wait is needed.

use crate::backend::MemoryReport;
use crate::error::{NcError, Result};
use nc_alloc::{AllocatorConfig, CachingAllocator, DeviceBlock, MemorySource, StreamId};
use std::sync::Arc;

/// Whatever owns the stream (the backend's `Arc<CudaStream>`), kept alive by the memory.
pub(crate) type StreamOwner = Arc<dyn std::any::Any + Send + Sync>;

/// The allocator and the one stream every block of the backend is used on.
pub(crate) struct DeviceMemory<S: MemorySource> {
    alloc: CachingAllocator<S>,
    stream: StreamId,
    device: String,
    /// Keeps the stream alive until the allocator is gone (fields drop in order): buffers may outlive the
    /// backend, and in the no-caching mode (`NC_NO_ALLOC_CACHE=1`) each free records an event on the stream,
    /// which fails on a destroyed stream (found on the simulated GPU: a model's buffers freed after its
    /// backend, each free refused with "invalid handle" and its memory leaked).
    _stream_owner: Option<StreamOwner>,
}

/// One allocation, given back to the allocator when dropped.
pub(crate) struct Block<S: MemorySource> {
    block: Option<DeviceBlock>,
    memory: Arc<DeviceMemory<S>>,
}

impl<S: MemorySource> Block<S> {
    /// The device address of the first byte (512-byte aligned).
    pub(crate) fn addr(&self) -> u64 {
        self.block.as_ref().map(|b| b.addr()).expect("block used after free")
    }
    /// Bytes asked for.
    pub(crate) fn requested(&self) -> usize {
        self.block.as_ref().map(|b| b.requested()).unwrap_or(0)
    }
}

impl<S: MemorySource> Drop for Block<S> {
    fn drop(&mut self) {
        if let Some(block) = self.block.take() {
            self.memory.alloc.free(block);
        }
    }
}

/// Bytes of a buffer of `elems` elements of `elem_bytes` each. An empty buffer still gets one element, so
/// every buffer has a distinct, valid address (the model asks for empty buffers).
pub(crate) fn buffer_bytes(elems: usize, elem_bytes: usize) -> Option<usize> {
    elems.max(1).checked_mul(elem_bytes)
}

impl<S: MemorySource> DeviceMemory<S> {
    /// An allocator over `source` for work on `stream`; `device` names it in messages ("cuda:0"). Caching
    /// unless `NC_NO_ALLOC_CACHE=1` (a bad value is an error saying what to set).
    /// `stream_owner` is kept alive as long as the memory (see the field).
    pub(crate) fn new(source: S, stream: StreamId, device: String, stream_owner: StreamOwner) -> Result<Arc<Self>> {
        let config = nc_alloc::config_from_env().map_err(|e| NcError::new(format!("{device}: {e}")))?;
        Self::with_config(source, stream, device, config, Some(stream_owner))
    }

    fn with_config(
        source: S,
        stream: StreamId,
        device: String,
        config: AllocatorConfig,
        stream_owner: Option<StreamOwner>,
    ) -> Result<Arc<Self>> {
        let alloc = CachingAllocator::new(source, config)
            .map_err(|e| NcError::new(format!("{device}: starting the caching allocator failed: {e}")))?;
        Ok(Arc::new(DeviceMemory {
            alloc,
            stream,
            device,
            _stream_owner: stream_owner,
        }))
    }

    /// Room for `elems` elements of `elem_bytes` bytes (uninitialized). `what` says what it is for, in the
    /// error: an out-of-memory error carries the allocator's whole report.
    pub(crate) fn block(self: &Arc<Self>, elems: usize, elem_bytes: usize, what: &str) -> Result<Block<S>> {
        let bytes = buffer_bytes(elems, elem_bytes).ok_or_else(|| {
            NcError::new(format!(
                "{}: {what}: {elems} elements of {elem_bytes} bytes overflow the address space",
                self.device
            ))
        })?;
        let block = self
            .alloc
            .allocate(bytes, self.stream)
            .map_err(|e| NcError::new(format!("{}: allocating {what} ({elems} elements): {e}", self.device)))?;
        Ok(Block {
            block: Some(block),
            memory: Arc::clone(self),
        })
    }

    /// Sizes and peaks, for the end of a run.
    pub(crate) fn report(&self) -> MemoryReport {
        let s = self.alloc.stats();
        MemoryReport {
            device: self.device.clone(),
            peak_reserved_bytes: s.peak_reserved_bytes as u64,
            peak_allocated_bytes: s.peak_allocated_bytes as u64,
            reserved_bytes: s.reserved_bytes as u64,
            allocated_bytes: s.allocated_bytes as u64,
            summary: s.summary(&self.device),
        }
    }

    /// The allocator itself (tests and the report).
    #[cfg(test)]
    pub(crate) fn allocator(&self) -> &CachingAllocator<S> {
        &self.alloc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nc_alloc::HostSource;

    fn memory(capacity: usize) -> Arc<DeviceMemory<HostSource>> {
        let config = AllocatorConfig::default();
        DeviceMemory::with_config(
            HostSource::unbacked(capacity),
            StreamId(7),
            "host:0".into(),
            config,
            None,
        )
        .unwrap()
    }

    #[test]
    fn buffers_are_sized_by_element_width_and_empty_ones_get_an_address() {
        let m = memory(1 << 30);
        let f32s = m.block(1000, 4, "x").unwrap();
        let bf16s = m.block(1000, 2, "y").unwrap();
        let empty = m.block(0, 4, "z").unwrap();
        assert_eq!(
            (f32s.requested(), bf16s.requested(), empty.requested()),
            (4000, 2000, 4)
        );
        assert!(f32s.addr() != bf16s.addr() && empty.addr() != f32s.addr() && empty.addr() != bf16s.addr());
        assert_eq!(m.allocator().stats().live_blocks, 3);
        assert_eq!(buffer_bytes(usize::MAX, 2), None);
    }

    #[test]
    fn a_dropped_buffer_goes_back_to_the_cache_and_is_reused_on_the_stream() {
        let m = memory(1 << 30);
        let first = m.block(300_000, 4, "a").unwrap();
        let addr = first.addr();
        drop(first);
        let s = m.allocator().stats();
        assert_eq!((s.allocated_bytes, s.live_blocks), (0, 0));
        // Same stream: the freed block is handed out again at once, and no new segment is taken.
        let again = m.block(300_000, 4, "b").unwrap();
        assert_eq!(again.addr(), addr);
        assert_eq!(m.allocator().stats().num_segment_allocs, 1);
        let r = m.report();
        assert!(
            r.peak_reserved_bytes >= 1_200_000 && r.peak_allocated_bytes >= 1_200_000,
            "{r:?}"
        );
        assert!(r.summary.contains("host:0"), "{}", r.summary);
    }

    #[test]
    fn out_of_memory_is_an_error_with_the_allocators_report_not_a_panic() {
        let m = memory(64 << 20);
        let _held = m.block(10 << 20, 4, "params").unwrap();
        let e = m
            .block(10 << 20, 4, "grads")
            .err()
            .expect("a 40 MiB request into 24 MiB left must fail");
        let e = e.to_string();
        // What was being allocated, the report's figures and the advice all reach the person running the job.
        assert!(e.contains("host:0") && e.contains("grads"), "{e}");
        assert!(e.contains("out of memory") && e.contains("--dbs"), "{e}");
        let overflow = m.block(usize::MAX / 2, 4, "huge").err().unwrap().to_string();
        assert!(overflow.contains("overflow"), "{overflow}");
    }
}
