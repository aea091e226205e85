//! Errors of the allocator. nc-alloc does not depend on nc-core; the engine turns these into `NcError`
//! through their `Display`, which is written for the person running the job.

use crate::oom::OomReport;
use crate::source::SourceError;
use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum AllocError {
    /// The device is full even after the cache was freed; the report says why and what to do.
    OutOfMemory(Box<OomReport>),
    /// A request so large its size cannot be represented once rounded.
    RequestTooLarge { bytes: usize },
    /// A source failure other than out-of-memory (a driver error), with what was being done.
    Source { doing: String, error: SourceError },
    /// The CUDA driver is absent or could not be initialized.
    NoDevice(String),
    /// Invalid allocator settings.
    Config(String),
}

impl fmt::Display for AllocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllocError::OutOfMemory(report) => write!(f, "{report}"),
            AllocError::RequestTooLarge { bytes } => write!(
                f,
                "allocation request of {bytes} bytes is too large to represent; this is a sizing bug in the \
                 caller (a negative or overflowed size), not a shortage of memory"
            ),
            AllocError::Source { doing, error } => write!(f, "device memory: {doing} failed: {error}"),
            AllocError::NoDevice(msg) => f.write_str(msg),
            AllocError::Config(msg) => write!(f, "allocator settings: {msg}"),
        }
    }
}

impl std::error::Error for AllocError {}
