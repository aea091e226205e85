//! The no-caching debug mode, switched on by `NC_NO_ALLOC_CACHE=1` (nc's counterpart of PyTorch's
//! `PYTORCH_NO_CUDA_MEMORY_CACHING`).
//!
//! The caching allocator carves many tensors out of one driver allocation and keeps freed blocks for reuse,
//! so a memory checker (compute-sanitizer, the simulated device) sees one big live range: a kernel reading
//! past its tensor into the next one, or a block used after it was freed, goes unnoticed. In this mode every
//! block is its own driver allocation of exactly the requested bytes, and a free waits for the freeing
//! stream to reach it and then gives the memory back to the driver, so the checker sees each tensor's end
//! and every use after free. It is slower (a driver call per allocation, a host wait per free) and is for
//! debugging, never for training runs that are meant to be fast.

use crate::error::AllocError;
use crate::sizes::AllocatorConfig;
use std::ffi::OsStr;

/// The environment variable: 1 turns caching off, 0 or unset keeps it on.
pub const NO_CACHE_ENV: &str = "NC_NO_ALLOC_CACHE";

/// The allocator settings for this process: the defaults, with caching off when `NC_NO_ALLOC_CACHE=1`.
/// A value other than 0, 1 or empty is an error that says what to set, not a silent default.
pub fn config_from_env() -> Result<AllocatorConfig, AllocError> {
    let caching = caching_from(std::env::var_os(NO_CACHE_ENV).as_deref())?;
    Ok(AllocatorConfig {
        caching,
        ..AllocatorConfig::default()
    })
}

/// Whether the allocator caches, given the variable's value (None: not set).
pub fn caching_from(value: Option<&OsStr>) -> Result<bool, AllocError> {
    match value.map(|v| v.to_str()) {
        None | Some(Some("" | "0")) => Ok(true),
        Some(Some("1")) => Ok(false),
        Some(other) => Err(AllocError::Config(format!(
            "{NO_CACHE_ENV} is {:?}; set it to 1 to give every block its own driver allocation (a debugging \
             mode for memory checkers), or to 0 or unset it for the caching allocator",
            other.unwrap_or("(not valid UTF-8)")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    #[test]
    fn one_turns_caching_off_and_anything_unexpected_is_an_error_naming_the_variable() {
        assert_eq!(caching_from(None), Ok(true));
        assert_eq!(caching_from(Some(OsStr::new(""))), Ok(true));
        assert_eq!(caching_from(Some(OsStr::new("0"))), Ok(true));
        assert_eq!(caching_from(Some(OsStr::new("1"))), Ok(false));
        for bad in ["yes", "true", " 1", "2"] {
            let e = caching_from(Some(OsStr::new(bad))).unwrap_err().to_string();
            assert!(
                e.contains(NO_CACHE_ENV) && e.contains(bad) && e.contains("set it to 1"),
                "{e}"
            );
        }
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStringExt;
            let e = caching_from(Some(&OsString::from_vec(vec![0xff])))
                .unwrap_err()
                .to_string();
            assert!(e.contains("not valid UTF-8"), "{e}");
        }
    }
}
