//! The one error type of the engine.
//!
//! Errors caused by outside input (flags, files, checkpoints, shards, devices) are values, never panics.
//! Each message says what was wrong and, where there is one, what to do about it.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NcError {
    /// The rank of a data-parallel run that saw the error, where one did: it leads the printed line, so
    /// the interleaved output of several ranks says whose failure each line is.
    pub rank: Option<usize>,
    /// What was wrong, without the rank.
    pub message: String,
}

impl NcError {
    pub fn new(message: impl Into<String>) -> Self {
        NcError {
            rank: None,
            message: message.into(),
        }
    }

    /// An error rank `rank` saw.
    pub fn at_rank(rank: usize, message: impl Into<String>) -> Self {
        NcError::new(message).with_rank(rank)
    }

    /// The same error, seen by rank `rank` unless it already names the rank that saw it.
    pub fn with_rank(self, rank: usize) -> Self {
        NcError {
            rank: self.rank.or(Some(rank)),
            ..self
        }
    }

    /// Prefix the message with where it happened (a file, a flag), keeping the original reason; the rank, if
    /// any, stays first.
    pub fn context(self, what: impl fmt::Display) -> Self {
        NcError {
            message: format!("{what}: {}", self.message),
            ..self
        }
    }
}

/// "rank R: message", or the message alone.
impl fmt::Display for NcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rank {
            Some(rank) => write!(f, "rank {rank}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for NcError {}

/// A collective's error keeps the rank that saw it.
impl From<nc_comm::CommError> for NcError {
    fn from(e: nc_comm::CommError) -> Self {
        NcError {
            rank: e.rank,
            message: e.reason,
        }
    }
}

impl From<std::io::Error> for NcError {
    fn from(e: std::io::Error) -> Self {
        NcError::new(format!("I/O error: {e}"))
    }
}

pub type Result<T> = std::result::Result<T, NcError>;

/// `bail!("...")` returns an `NcError` built with `format!`.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => { return Err($crate::error::NcError::new(format!($($arg)*))) };
}
