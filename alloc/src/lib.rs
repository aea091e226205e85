//! nc-alloc: A caching allocator for GPU memory, generic over a raw memory source.
//!
//! `CachingAllocator<S>` takes segments from a `MemorySource` (CUDA: cuMemAlloc; tests and benchmarks:
//! host memory), carves them into 512-byte-granular blocks, and caches freed blocks for reuse, so the
//! training loop never calls cuMemAlloc after its first step. Blocks freed on a stream are reused by
//! that stream at once and by other streams after an event covering the free has completed.
//! `NC_NO_ALLOC_CACHE=1` turns the caching off (`no_cache`): every block its own source allocation, for memory
//! checkers. Design notes: ARCHITECTURE.md, section "Allocator".

pub mod allocator;
pub mod cuda_source;
pub mod error;
pub mod host_source;
pub mod no_cache;
pub mod oom;
pub mod pool;
pub mod sizes;
pub mod source;
pub mod stats;

pub use allocator::{BlockSnapshot, BlockState, CachingAllocator, DeviceBlock, SegmentSnapshot};
pub use cuda_source::CudaSource;
pub use error::AllocError;
pub use host_source::HostSource;
pub use no_cache::{config_from_env, NO_CACHE_ENV};
pub use oom::OomReport;
pub use sizes::{AllocatorConfig, PoolKind};
pub use source::{MemorySource, SourceError, StreamId};
pub use stats::{fmt_bytes, AllocatorStats};
