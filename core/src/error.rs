//! The one error type of the engine.
//!
//! Errors caused by outside input (flags, files, checkpoints, shards, devices) are values, never panics.
//! Each message says what was wrong and, where there is one, what to do about it.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NcError {
    pub message: String,
}

impl NcError {
    pub fn new(message: impl Into<String>) -> Self {
        NcError {
            message: message.into(),
        }
    }

    /// Prefix the message with where it happened (a file, a flag), keeping the original reason.
    pub fn context(self, what: impl fmt::Display) -> Self {
        NcError {
            message: format!("{what}: {}", self.message),
        }
    }
}

impl fmt::Display for NcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for NcError {}

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
