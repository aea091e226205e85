//! Where raw memory comes from: the `MemorySource` trait, and stream identities.
//!
//! A source hands out and takes back whole segments, and records events on streams so the allocator can
//! tell when work queued before a free has finished. The CUDA source does this with cuMemAlloc and
//! cuEventRecord; the host source with host memory and events that tests complete by hand.

use std::fmt;

/// A stream of device work, as the backend names it (for CUDA: the `CUstream` pointer as an integer).
/// Work on one stream runs in order, so a block freed on a stream may be reused by that stream at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u64);

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stream {:#x}", self.0)
    }
}

/// Why a source could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceError {
    /// The device has no room for the segment; the allocator frees its cache and retries once.
    OutOfMemory,
    /// Anything else (a driver error); passed on as is.
    Failed(String),
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceError::OutOfMemory => f.write_str("out of memory"),
            SourceError::Failed(msg) => f.write_str(msg),
        }
    }
}

/// A provider of raw memory segments and of stream events.
///
/// Addresses are device addresses as integers (`CUdeviceptr`); the allocator never dereferences them.
pub trait MemorySource {
    /// A reusable event handle. The allocator keeps a pool of them, so `create_event` is rare.
    type Event;

    /// A short name for messages, e.g. "cuda:0".
    fn name(&self) -> String;

    /// A new segment of exactly `bytes` bytes, aligned to at least 512 bytes.
    fn allocate(&mut self, bytes: usize) -> Result<u64, SourceError>;

    /// Give back a segment from `allocate`. The allocator calls this only when no queued work can still
    /// touch the segment (it waited on the events covering every free in it).
    fn release(&mut self, addr: u64, bytes: usize) -> Result<(), SourceError>;

    /// (free, total) bytes of the device, for out-of-memory reports; None where unknown.
    fn memory_info(&mut self) -> Option<(usize, usize)>;

    fn create_event(&mut self) -> Result<Self::Event, SourceError>;

    /// Record `event` on `stream`: it completes once all work queued on the stream so far has finished.
    fn record_event(&mut self, event: &Self::Event, stream: StreamId) -> Result<(), SourceError>;

    /// Non-blocking: has the last recording of `event` completed?
    fn event_completed(&mut self, event: &Self::Event) -> Result<bool, SourceError>;

    /// Block the host until the last recording of `event` has completed (only used when flushing).
    fn wait_event(&mut self, event: &Self::Event) -> Result<(), SourceError>;

    fn destroy_event(&mut self, event: Self::Event);
}
