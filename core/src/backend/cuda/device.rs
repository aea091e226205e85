//! Opening a device: probe for the driver, count devices, make the context, stream and cuBLAS handle, and
//! load every PTX module and kernel once. Everything here depends on the machine (driver, devices, the
//! libraries installed), so every failure is an `NcError` that says what is missing, never a panic.

use super::blas::Sgemm;
use super::launch::Kernels;
use super::memory::DeviceMemory;
use super::{CudaBackend, CudaBuf, ENGINE_KERNELS, ENGINE_MODULES};
use crate::error::{NcError, Result};
use cudarc::driver::{result as driver, sys as driver_sys, CudaContext};
use cudarc::nvrtc::Ptx;
use nc_alloc::{CudaSource, StreamId};
use parking_lot::Mutex;

/// The first compute capability the PTX targets (nvcc `compute_80`); older devices cannot JIT it.
const MIN_COMPUTE_CAPABILITY: (i32, i32) = (8, 0);

/// Whether the CUDA driver library can be loaded. cudarc panics at its first driver call when it cannot,
/// so this is asked before any.
pub fn driver_present() -> bool {
    // SAFETY: only tries to open the shared library; no driver function is called.
    unsafe { driver_sys::is_culib_present() }
}

/// Number of CUDA devices this process can see: 0 when the driver library is missing, fails to start, or
/// no device is visible. Tests use it to skip on machines without a GPU.
pub fn device_count() -> usize {
    if !driver_present() || driver::init().is_err() {
        return 0;
    }
    driver::device::get_count().map(|c| c.max(0) as usize).unwrap_or(0)
}

impl CudaBackend {
    /// Let cuBLAS round sgemm inputs to TF32 and use the tensor cores (about 8x the f32 throughput on
    /// Hopper, with a 10-bit mantissa on the GEMM inputs: inside the precision nanochat trains at, bf16), or
    /// go back to strict f32 (the default, which the parity tests require).
    pub fn set_tf32(&self, on: bool) -> Result<()> {
        self.blas
            .set_tf32(on)
            .map_err(|e| NcError::new(format!("CUDA device {}: {e}", self.ordinal)))
    }

    /// The backend on device `ordinal` (as numbered under CUDA_VISIBLE_DEVICES). Errors when the driver
    /// or cuBLAS library is missing, the device does not exist or is older than compute capability 8.0,
    /// or the kernels' PTX does not load (a driver older than the nvcc 13.0 that built it).
    pub fn new(ordinal: usize) -> Result<Self> {
        if !driver_present() {
            return Err(NcError::new(
                "the CUDA driver library (libcuda.so) was not found: run on a machine with an NVIDIA driver \
                 installed, or use the CPU backend",
            ));
        }
        driver::init().map_err(|e| {
            NcError::new(format!(
                "the CUDA driver failed to start (cuInit: {e}); check nvidia-smi and CUDA_VISIBLE_DEVICES"
            ))
        })?;
        let count = driver::device::get_count()
            .map_err(|e| NcError::new(format!("counting CUDA devices failed: {e}")))?
            .max(0) as usize;
        if ordinal >= count {
            return Err(NcError::new(format!(
                "CUDA device {ordinal} does not exist: this machine has {count} visible device(s), numbered \
                 from 0; check CUDA_VISIBLE_DEVICES"
            )));
        }
        let device_error = |doing: &str, e: &dyn std::fmt::Display| {
            NcError::new(format!("CUDA device {ordinal}: {doing} failed: {e}"))
        };
        let ctx = CudaContext::new(ordinal).map_err(|e| device_error("creating its context", &e))?;
        let capability = ctx
            .compute_capability()
            .map_err(|e| device_error("reading the compute capability", &e))?;
        if capability < MIN_COMPUTE_CAPABILITY {
            return Err(NcError::new(format!(
                "CUDA device {ordinal} has compute capability {}.{}; the kernels are built for {}.{} \
                 (Ampere) or newer",
                capability.0, capability.1, MIN_COMPUTE_CAPABILITY.0, MIN_COMPUTE_CAPABILITY.1
            )));
        }
        // SAFETY: every buffer of this backend is allocated, used and freed on the one stream created below,
        // so stream order already serializes all accesses; cudarc's per-buffer events (which only matter
        // across streams) would add two events per buffer and event work per launch for nothing. Must come
        // before the first allocation, which is the point where cudarc decides whether a buffer gets events.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| device_error("creating a stream", &e))?;
        crate::nvtx::name_cuda_stream(stream.cu_stream() as *mut std::ffi::c_void, "nc compute");

        // cuBLAS by its CUDA 13 soname first (libs.rs); its calls use the current context.
        ctx.bind_to_thread()
            .map_err(|e| device_error("making the context current", &e))?;
        let blas = Sgemm::new(stream.cu_stream() as *mut std::ffi::c_void)
            .map_err(|e| NcError::new(format!("CUDA device {ordinal}: {e}")))?;
        let memory = DeviceMemory::new(
            CudaSource::new(ordinal).map_err(|e| NcError::new(e.to_string()))?,
            StreamId(stream.cu_stream() as u64),
            format!("cuda:{ordinal}"),
            stream.clone(),
        )?;

        let mut modules = Vec::with_capacity(nc_kernels::MODULES.len() + ENGINE_MODULES.len());
        for (name, ptx) in nc_kernels::MODULES.into_iter().chain(ENGINE_MODULES) {
            if ptx.trim().is_empty() {
                return Err(NcError::new(format!(
                    "the PTX of kernel module '{name}' is empty: rebuild kernels-ptx/ptx with build_ptx.sh"
                )));
            }
            let module = ctx.load_module(Ptx::from_src(ptx)).map_err(|e| {
                device_error(
                    &format!("loading kernel module '{name}' (PTX from nvcc 13.0; an older driver cannot JIT it)"),
                    &e,
                )
            })?;
            modules.push((name, module));
        }
        let mut functions = Vec::with_capacity(nc_kernels::ALL.len() + ENGINE_KERNELS.len());
        for kernel in nc_kernels::ALL.into_iter().chain(ENGINE_KERNELS) {
            let module = modules
                .iter()
                .find(|(name, _)| *name == kernel.module)
                .map(|(_, m)| m)
                .ok_or_else(|| {
                    NcError::new(format!(
                        "kernel {} names module '{}', which nc_kernels::MODULES does not list",
                        kernel.name, kernel.module
                    ))
                })?;
            let function = module.load_function(kernel.name).map_err(|e| {
                device_error(
                    &format!("finding kernel {} in module '{}'", kernel.name, kernel.module),
                    &e,
                )
            })?;
            functions.push((kernel, function));
        }

        let partials = memory.block(
            nc_kernels::SUM_SQUARES_MAX_BLOCKS as usize,
            std::mem::size_of::<f64>(),
            "sum_squares' partials",
        )?;
        let scratch = memory.block(0, std::mem::size_of::<f32>(), "attention scratch")?;
        Ok(CudaBackend {
            ordinal,
            ctx,
            stream,
            blas,
            kernels: Kernels::new(functions),
            attention_delta: Mutex::new(CudaBuf {
                mem: scratch,
                len: 0,
                storage: crate::backend::Storage::F32,
            }),
            sum_squares_partials: Mutex::new(partials),
            lt: Mutex::new(None),
            memory,
        })
    }
}
