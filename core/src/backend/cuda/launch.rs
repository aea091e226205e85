//! Kernel launches: the table of loaded kernels, device pointers of views, and one `launch` that passes a
//! kernel its parameters in the order its `nc_kernels::Kernel` constant documents.
//!
//! Parameters go through `Arg`, one variant per C type of the contract (`f32*`, `int`, `unsigned long
//! long`, `float`), so each call site reads like the kernel's signature. Pointers are raw device addresses
//! already offset by the view's `off`: every buffer is a block of the backend's caching allocator used on
//! the backend's one stream, so stream order alone keeps a kernel from running before the copy that fills
//! its input or after its block is handed to a later request (memory.rs).

use super::{CudaBackend, CudaBuf, CudaIds, I32_BYTES};
use crate::backend::{Storage, View, ViewMut};
use cudarc::driver::{CudaFunction, LaunchConfig, PushKernelArg};
use nc_kernels::{Kernel, LaunchDims};

/// One kernel parameter, by its C type in the contract.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg {
    /// `f32*` / `const f32*` / `const i32*` / `f64*`: a device address.
    Ptr(u64),
    /// `i32` (C `int`).
    I32(i32),
    /// `u64` (C `unsigned long long`).
    U64(u64),
    /// `f32` (C `float`).
    F32(f32),
}

/// Every kernel of `nc_kernels::ALL`, resolved once when the backend is built.
pub(crate) struct Kernels {
    functions: Vec<(Kernel, CudaFunction)>,
}

impl Kernels {
    pub(crate) fn new(functions: Vec<(Kernel, CudaFunction)>) -> Self {
        Kernels { functions }
    }

    pub(super) fn get(&self, kernel: Kernel) -> &CudaFunction {
        // 20 entries: a linear search costs nothing next to a launch.
        self.functions
            .iter()
            .find(|(k, _)| k.module == kernel.module && k.name == kernel.name)
            .map(|(_, f)| f)
            .unwrap_or_else(|| panic!("kernel {} was not loaded (it is not in nc_kernels::ALL)", kernel.name))
    }
}

/// A size as the kernels' `int`; shapes past 2^31 - 1 cannot be expressed in the contract.
pub(crate) fn int(value: usize, what: &str) -> Arg {
    Arg::I32(
        i32::try_from(value)
            .unwrap_or_else(|_| panic!("CUDA backend: {what} = {value} does not fit the kernels' 32-bit int")),
    )
}

/// A count as the kernels' `unsigned long long`.
pub(crate) fn count(value: usize) -> Arg {
    Arg::U64(value as u64)
}

impl CudaBackend {
    /// Device address of a view's first element, whatever its storage (offsets are in elements).
    pub(crate) fn addr_any(&self, v: View<'_, Self>) -> u64 {
        assert!(
            v.off + v.len <= v.buf.len,
            "CUDA view {}+{} past buffer end {}",
            v.off,
            v.len,
            v.buf.len
        );
        v.buf.mem.addr() + (v.off * v.buf.storage.bytes_per_element()) as u64
    }

    /// Device address of an F32 view's first element, for the f32 kernels and sgemm. A Bf16 buffer handed
    /// to an op that has no bf16 path yet stops here with the op's name rather than being read as f32.
    pub(crate) fn addr(&self, v: View<'_, Self>) -> u64 {
        assert!(
            v.buf.storage == Storage::F32,
            "CUDA backend: this op has no bf16 path yet (a Bf16 buffer reached an f32 kernel; issue 10 item 4)"
        );
        self.addr_any(v)
    }

    /// Device address of a writable F32 view's first element.
    pub(crate) fn addr_mut(&self, v: ViewMut<'_, Self>) -> u64 {
        self.addr(v.view())
    }

    /// A read-only view as a kernel's pointer parameter.
    pub(crate) fn ptr(&self, v: View<'_, Self>) -> Arg {
        Arg::Ptr(self.addr(v))
    }

    /// A writable view as a kernel's pointer parameter.
    pub(crate) fn ptr_mut(&self, v: ViewMut<'_, Self>) -> Arg {
        Arg::Ptr(self.addr_mut(v))
    }

    /// Entry `off` of an ids buffer, which must hold `len` entries from there, as a kernel's pointer.
    pub(crate) fn ids_ptr(&self, ids: &CudaIds, off: usize, len: usize) -> Arg {
        assert!(off + len <= ids.len, "CUDA ids {off}+{len} past buffer end {}", ids.len);
        Arg::Ptr(ids.mem.addr() + (off * I32_BYTES) as u64)
    }

    /// The start of a scratch buffer, which must hold `len` values, as a kernel's pointer.
    pub(crate) fn scratch_ptr(&self, buf: &mut CudaBuf, len: usize) -> Arg {
        assert!(len <= buf.len, "CUDA scratch of {} values used for {len}", buf.len);
        Arg::Ptr(buf.mem.addr())
    }

    /// Launch `kernel` on the backend's stream with `args` in the contract's order. Asynchronous: a fault
    /// inside the kernel surfaces at a later launch or at `download`'s synchronize.
    pub(crate) fn launch(&self, kernel: Kernel, dims: LaunchDims, args: &[Arg]) {
        let function = self.kernels.get(kernel);
        let mut builder = self.stream.launch_builder(function);
        for arg in args {
            // The builder keeps a pointer to each value; `args` outlives the launch below.
            match arg {
                Arg::Ptr(p) => builder.arg(p),
                Arg::I32(v) => builder.arg(v),
                Arg::U64(v) => builder.arg(v),
                Arg::F32(v) => builder.arg(v),
            };
        }
        let config = LaunchConfig {
            grid_dim: dims.grid,
            block_dim: dims.block,
            shared_mem_bytes: dims.shared_bytes,
        };
        // SAFETY: the argument list follows the kernel's documented signature (each call site passes them in
        // that order, with the C types above), and every pointer comes from `ptr`/`ptr_mut`/`ids_ptr` after
        // the op asserted that its view covers all the elements the kernel touches for the given shape.
        unsafe { builder.launch(config) }.unwrap_or_else(|e| panic!("CUDA launch of {} failed: {e}", kernel.name));
    }
}
