//! The CUDA memory source: segments from cuMemAlloc, events from cuEventCreate, through cudarc's
//! dynamically loaded driver API, so the crate builds and runs on machines without CUDA.
//!
//! Constructing one on a machine without libcuda returns an error (cudarc would panic at the first
//! driver call), so callers can fall back to the CPU backend. Not yet run on a GPU.

use crate::error::AllocError;
use crate::source::{MemorySource, SourceError, StreamId};
use cudarc::driver::result::{self, DriverError};
use cudarc::driver::sys;

/// Raw driver memory for one device, in that device's primary context (the one cudarc's CudaContext
/// uses, so blocks are valid in the engine's kernels).
pub struct CudaSource {
    ordinal: usize,
    device: sys::CUdevice,
    context: sys::CUcontext,
}

/// A CUDA event created without timing (cheaper to record and query).
pub struct CudaEvent(sys::CUevent);

// SAFETY: driver handles are plain identifiers valid from any thread; every call below first makes the
// context current on the calling thread. The allocator serializes all calls behind its mutex.
unsafe impl Send for CudaSource {}
unsafe impl Send for CudaEvent {}

fn driver_error(doing: &str, e: DriverError) -> SourceError {
    if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        SourceError::OutOfMemory
    } else {
        SourceError::Failed(format!("{doing}: {e}"))
    }
}

impl CudaSource {
    /// The source for device `ordinal`. Errors (never panics) when the driver library is missing, the
    /// driver fails to start, or the device does not exist.
    pub fn new(ordinal: usize) -> Result<Self, AllocError> {
        // SAFETY: only tries to open the library; no driver call is made.
        if !unsafe { sys::is_culib_present() } {
            return Err(AllocError::NoDevice(
                "the CUDA driver library (libcuda.so) was not found, so GPU memory cannot be allocated; \
                 run on a machine with an NVIDIA driver installed, or use the CPU backend"
                    .into(),
            ));
        }
        let no_device = |doing: &str, e: DriverError| {
            AllocError::NoDevice(format!(
                "CUDA device {ordinal}: {doing} failed ({e}); check nvidia-smi and CUDA_VISIBLE_DEVICES"
            ))
        };
        result::init().map_err(|e| no_device("cuInit", e))?;
        let count = result::device::get_count().map_err(|e| no_device("counting devices", e))?;
        if ordinal >= count.max(0) as usize {
            return Err(AllocError::NoDevice(format!(
                "CUDA device {ordinal} does not exist: this machine has {count} visible device(s) \
                 (numbered from 0); check CUDA_VISIBLE_DEVICES"
            )));
        }
        let device = result::device::get(ordinal as i32).map_err(|e| no_device("cuDeviceGet", e))?;
        // SAFETY: `device` came from device::get.
        let context =
            unsafe { result::primary_ctx::retain(device) }.map_err(|e| no_device("retaining the context", e))?;
        Ok(CudaSource {
            ordinal,
            device,
            context,
        })
    }

    fn make_current(&self) -> Result<(), SourceError> {
        // SAFETY: the primary context is retained for as long as self lives.
        unsafe { result::ctx::set_current(self.context) }.map_err(|e| driver_error("cuCtxSetCurrent", e))
    }
}

impl MemorySource for CudaSource {
    type Event = CudaEvent;

    fn name(&self) -> String {
        format!("cuda:{}", self.ordinal)
    }

    fn allocate(&mut self, bytes: usize) -> Result<u64, SourceError> {
        self.make_current()?;
        // SAFETY: the memory is returned uninitialized; nothing reads it before a kernel writes it.
        unsafe { result::malloc_sync(bytes) }.map_err(|e| driver_error("cuMemAlloc", e))
    }

    fn release(&mut self, addr: u64, _bytes: usize) -> Result<(), SourceError> {
        self.make_current()?;
        // SAFETY: `addr` came from malloc_sync, and the allocator waited for the work that used it.
        unsafe { result::free_sync(addr) }.map_err(|e| driver_error("cuMemFree", e))
    }

    fn memory_info(&mut self) -> Option<(usize, usize)> {
        self.make_current().ok()?;
        result::mem_get_info().ok()
    }

    fn create_event(&mut self) -> Result<CudaEvent, SourceError> {
        self.make_current()?;
        result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map(CudaEvent)
            .map_err(|e| driver_error("cuEventCreate", e))
    }

    fn record_event(&mut self, event: &CudaEvent, stream: StreamId) -> Result<(), SourceError> {
        self.make_current()?;
        // SAFETY: the event is live; the stream id is the CUstream the backend gave us.
        unsafe { result::event::record(event.0, stream.0 as sys::CUstream) }
            .map_err(|e| driver_error("cuEventRecord", e))
    }

    fn event_completed(&mut self, event: &CudaEvent) -> Result<bool, SourceError> {
        self.make_current()?;
        // SAFETY: the event is live.
        match unsafe { result::event::query(event.0) } {
            Ok(()) => Ok(true),
            Err(e) if e.0 == sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            Err(e) => Err(driver_error("cuEventQuery", e)),
        }
    }

    fn wait_event(&mut self, event: &CudaEvent) -> Result<(), SourceError> {
        self.make_current()?;
        // SAFETY: the event is live.
        unsafe { result::event::synchronize(event.0) }.map_err(|e| driver_error("cuEventSynchronize", e))
    }

    fn destroy_event(&mut self, event: CudaEvent) {
        if self.make_current().is_ok() {
            // SAFETY: the event is live and consumed here.
            let _ = unsafe { result::event::destroy(event.0) };
        }
    }
}

impl Drop for CudaSource {
    fn drop(&mut self) {
        // SAFETY: balances the retain in new().
        let _ = unsafe { result::primary_ctx::release(self.device) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_driver_construction_is_an_error_not_a_panic() {
        // SAFETY: only probes for the library.
        let present = unsafe { sys::is_culib_present() };
        match CudaSource::new(0) {
            Ok(_) => assert!(present),
            Err(e) => {
                if !present {
                    assert!(matches!(e, AllocError::NoDevice(_)), "{e:?}");
                    assert!(e.to_string().contains("libcuda"), "{e}");
                }
            }
        }
        // An ordinal no machine has is an error either way.
        assert!(CudaSource::new(1 << 20).is_err());
    }
}
