//! The CUDA backend: f32 buffers in device memory (every one a block of nc-alloc's caching allocator,
//! `memory.rs`), the kernels of `nc_kernels` (CUDA C compiled to PTX, loaded once through cudarc's
//! dynamically loaded driver API) plus the engine's own (`kernels/`), and cuBLAS for the GEMMs (opened by
//! its CUDA 13 soname, `libs.rs`; cuBLASLt for bf16 in `blas_lt.rs`).
//!
//! Build: `CudaBackend::new(ordinal)`, which returns an `NcError` (never panics) when the machine has no
//! driver, no such device, no cuBLAS, or a driver too old for the PTX. `device_count()` says whether there is
//! a device at all (0 without a driver), for callers and tests that fall back to the CPU.
//!
//! All work goes, in order, to one stream of the backend: uploads, kernels, GEMMs, frees. Ops return as soon
//! as their work is queued; `download` synchronizes the stream, so the host data it returns is complete.
//!
//! Errors inside the trait's ops: the trait's methods return nothing, and a failed launch, copy or GEMM
//! there is an internal bug (a kernel fault, a shape the kernels do not support), never a consequence of
//! outside input, which the model checks before it reaches a backend. So those paths panic with a message
//! naming the op (`expect`/`panic!`), like the CPU backend's slice bounds do; a fault inside an
//! asynchronous kernel surfaces at the next launch or at `download`. Shapes are asserted against view
//! lengths before every launch, so no kernel is ever handed a view too short for its shape. Token ids and
//! targets are not checked on the device: the model checks them on the host before uploading (`Backend`
//! says ids are assumed valid).
//!
//! Each op's kernel and parameter order are documented on its constant in kernels-ptx/src/lib.rs; the
//! GEMM mapping is in `blas.rs`. None of this has run on a GPU in the session that wrote it: the parity
//! tests (`cargo test --release --test cuda_parity`) check every op against the CPU backend where a GPU is.

mod blas;
mod blas_lt;
mod device;
mod flash;
mod launch;
mod libs;
mod memory;
mod ops_bf16;
mod optim_bf16;

pub use device::{device_count, driver_present};
pub use flash::{flash_backward_launches, flash_forward_launch, FlashBackwardPtrs, FlashForwardPtrs, FlashLaunch};

use super::{bf16, AdamwStep, AttnShape, Backend, Gemm, Heads, MemoryReport, Rotation, Storage, View, ViewMut};
use blas::Sgemm;
use cudarc::driver::{result as driver, CudaContext, CudaStream};
use launch::{count, int, Arg, Kernels};
use memory::{Block, DeviceMemory};
use nc_alloc::CudaSource;
use parking_lot::{MappedMutexGuard, Mutex, MutexGuard};
use std::sync::Arc;

/// f32 values in device memory: a block of the backend's caching allocator. `len` is the logical length;
/// the block holds at least one element (so an empty buffer still has a distinct address, and the model
/// does ask for empty buffers).
pub struct CudaBuf {
    mem: Block<CudaSource>,
    len: usize,
    /// F32 (4 bytes an element) or Bf16 (2 bytes, the bf16 contract of `Backend`).
    storage: Storage,
}

/// i32 token ids in device memory (same layout rule as `CudaBuf`), and the host copy of what was uploaded,
/// from which the deterministic embedding backward builds its inverse index (ops_bf16.rs).
pub struct CudaIds {
    mem: Block<CudaSource>,
    len: usize,
    host: Vec<i32>,
}

impl CudaBuf {
    pub fn len(&self) -> usize {
        self.len
    }
    /// The device address of the first element (for collectives that take raw addresses, e.g. NCCL's).
    pub fn device_addr(&self) -> u64 {
        self.mem.addr()
    }
    /// How the elements are stored (F32: 4 bytes each, Bf16: 2).
    pub fn storage_kind(&self) -> Storage {
        self.storage
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl CudaIds {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The engine's own kernels (`kernels/*.cu`, PTX built by `kernels/build.sh` and checked in), loaded with
/// the model's kernels of nc_kernels.
const NS_NORM_PTX: &str = include_str!("kernels/ns_norm.ptx");
const ENGINE_MODULES: [(&str, &str); 1] = [("ns_norm", NS_NORM_PTX)];
/// (const f64* partials, i32 blocks, f32 eps, f32* inv); one block of one thread.
const INVERSE_NORM: nc_kernels::Kernel = nc_kernels::Kernel {
    module: "ns_norm",
    ptx: NS_NORM_PTX,
    name: "nc_inverse_norm_f32",
};
/// (const f32* x, const f32* s, f32* y, u64 n); `elementwise_dims(n)`.
const SCALE_BY_SCALAR: nc_kernels::Kernel = nc_kernels::Kernel {
    module: "ns_norm",
    ptx: NS_NORM_PTX,
    name: "nc_scale_by_scalar_f32",
};
const ENGINE_KERNELS: [nc_kernels::Kernel; 2] = [INVERSE_NORM, SCALE_BY_SCALAR];

const I32_BYTES: usize = std::mem::size_of::<i32>();
const F64_BYTES: usize = std::mem::size_of::<f64>();

/// The CUDA backend on one device. Fields drop in order: the cuBLAS handle and modules before the stream
/// and context they belong to.
pub struct CudaBackend {
    ordinal: usize,
    blas: Sgemm,
    kernels: Kernels,
    /// Attention backward's delta = rowsum(dout * out), (B, H, T): grown to the largest call, then reused.
    attention_delta: Mutex<CudaBuf>,
    /// `sum_squares`'s per-block partials, `SUM_SQUARES_MAX_BLOCKS` of them (every launch fits); the lock is
    /// held from the launch until they are downloaded.
    sum_squares_partials: Mutex<Block<CudaSource>>,
    /// cuBLASLt (the GEMMs with a Bf16 operand): planned per shape and cached; opened, with its workspace
    /// taken from the allocator, at the first such GEMM, so strict-f32 runs never load it.
    lt: Mutex<Option<blas_lt::PlanCache<blas_lt::LtPlanner>>>,
    /// The caching allocator every buffer above and every `CudaBuf` comes from (buffers hold it too, so it
    /// outlives the backend while any of them lives).
    memory: Arc<DeviceMemory<CudaSource>>,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
}

// The backend may be handed to another thread (one rank per thread): everything in it is thread-safe.
const _: () = {
    const fn send_and_sync<T: Send + Sync>() {}
    send_and_sync::<CudaBackend>();
};

// Finish queued work before the cuBLAS handle, modules, stream and context go (in field order): teardown
// must not depend on cublasDestroy happening to synchronize the device. The fields are destroyed on whatever
// thread drops the backend, where another device's context may be current (a process with a backend per
// device): cublasDestroy and cublasLtDestroy release the handle's resources in the current context, so ours is
// made current first, explicitly (the stream's synchronize binds it too, but only as cudarc's detail).
impl Drop for CudaBackend {
    fn drop(&mut self) {
        if let Err(e) = self.ctx.bind_to_thread() {
            eprintln!(
                "warning: CUDA backend teardown: making cuda:{}'s context current: {e}",
                self.ordinal
            );
        }
        let _ = self.stream.synchronize();
    }
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBackend(cuda:{})", self.ordinal)
    }
}

impl CudaBackend {
    /// The device ordinal this backend runs on.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The stream every op of this backend is queued on (a collective on another stream orders itself
    /// after this one's work with events).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The device's name, as the driver reports it (for logs).
    pub fn device_name(&self) -> String {
        self.ctx
            .name()
            .unwrap_or_else(|e| format!("cuda:{} ({e})", self.ordinal))
    }

    /// The device's total memory in bytes (what `--recompute auto` plans against); None if the driver
    /// cannot say.
    pub fn memory_bytes(&self) -> Option<f64> {
        self.ctx.total_mem().ok().map(|b| b as f64)
    }

    /// Make the backend's context current on the calling thread (raw driver and cuBLAS calls use whatever
    /// context is current; the rank's thread may not have made any CUDA call yet).
    fn bind(&self) {
        self.ctx
            .bind_to_thread()
            .expect("CUDA: making the backend's context current failed");
    }

    /// A zero-filled block of `elems` elements of `elem_bytes`, from the caching allocator (which hands out
    /// uninitialized memory; the memset is queued on the stream like every other op).
    fn zeroed_block(&self, elems: usize, elem_bytes: usize, what: &str) -> crate::error::Result<Block<CudaSource>> {
        let block = self.memory.block(elems, elem_bytes, what)?;
        self.bind();
        // SAFETY: the block holds at least requested() bytes.
        unsafe { driver::memset_d8_async(block.addr(), 0, block.requested(), self.stream.cu_stream()) }.map_err(
            |e| crate::error::NcError::new(format!("CUDA device {}: zeroing {what} failed: {e}", self.ordinal)),
        )?;
        Ok(block)
    }

    /// A zero-filled f32 buffer, or the allocator's out-of-memory report as an error.
    pub fn try_alloc(&self, len: usize) -> crate::error::Result<CudaBuf> {
        Backend::try_alloc_as(self, len, Storage::F32)
    }

    /// `Backend::matmul` with a Bf16 operand, on cuBLASLt: f32 accumulation, the output rounded to bf16
    /// when C is Bf16, beta = 1 to accumulate. Inputs must be both Bf16 (cuBLASLt has no mixed-input
    /// kernel); a mixed call stops with a message (the model does not make one under the bf16 layout).
    fn matmul_lt(&self, shape: Gemm, a: View<'_, Self>, b: View<'_, Self>, c: ViewMut<'_, Self>) {
        let elem = |s: Storage| match s {
            Storage::F32 => blas_lt::Elem::F32,
            Storage::Bf16 => blas_lt::Elem::Bf16,
        };
        let (pa, pb, pc) = (self.addr_any(a), self.addr_any(b), self.addr_any(c.view()));
        let key = blas_lt::GemmKey {
            shape,
            a: elem(a.buf.storage),
            b: elem(b.buf.storage),
            c: elem(c.buf.storage),
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
            align_a: blas_lt::alignment(pa),
            align_b: blas_lt::alignment(pb),
            align_c: blas_lt::alignment(pc),
        };
        let beta = if shape.accumulate { 1.0 } else { 0.0 };
        let Gemm { m, n, k, .. } = shape;
        let mut cache = self.lt_plans();
        let (planner, plan) = cache
            .get(&key)
            .unwrap_or_else(|e| panic!("CUDA matmul {m}x{n}x{k}: {e}"));
        // SAFETY: the views were checked (by `need` in matmul and addr_any) to hold the key's extents in
        // their storages, which are the key's element types.
        unsafe { planner.run(plan, 1.0, pa, pb, beta, pc, pc, self.stream.cu_stream() as *mut _) }
            .unwrap_or_else(|e| panic!("CUDA matmul {m}x{n}x{k}: {e}"));
    }

    /// The cuBLASLt plan cache (cuBLASLt and its workspace opened on first use), with this device's context
    /// current for the GEMM the caller runs next.
    fn lt_plans(&self) -> MappedMutexGuard<'_, blas_lt::PlanCache<blas_lt::LtPlanner>> {
        self.bind();
        MutexGuard::map(self.lt.lock(), |lt| {
            lt.get_or_insert_with(|| {
                let planner = blas_lt::load_with_workspace(&self.memory)
                    .unwrap_or_else(|e| panic!("CUDA device {}: {e}", self.ordinal));
                blas_lt::PlanCache::new(planner)
            })
        })
    }

    /// One of the cast kernels over n elements from `from` to `to` (raw addresses of checked views).
    fn cast(&self, kernel: nc_kernels::Kernel, from: u64, to: u64, n: usize) {
        let args = [Arg::Ptr(from), Arg::Ptr(to), count(n)];
        self.launch(kernel, nc_kernels::elementwise_bf16_dims(n as u64), &args);
    }

    fn elementwise(&self, kernel: nc_kernels::Kernel, n: usize, args: &[Arg]) {
        if n > 0 {
            self.launch(kernel, nc_kernels::elementwise_dims(n as u64), args);
        }
    }
}

/// Whether a two-operand elementwise op takes its bf16 path (either operand stored bf16) rather than the
/// f32 kernel; the operands must be one length (`what`: the op and its operands, for the message).
fn either_bf16(what: &str, a: View<'_, CudaBackend>, b: View<'_, CudaBackend>) -> bool {
    assert_eq!(a.len, b.len, "CUDA {what} lengths differ");
    a.buf.storage == Storage::Bf16 || b.buf.storage == Storage::Bf16
}

/// `len` elements of a view, checked (the model passes views at least as long as the shapes need).
fn need(what: &str, have: usize, want: usize) {
    assert!(
        have >= want,
        "CUDA {what}: view of {have} values, the shape needs {want}"
    );
}

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    type Ids = CudaIds;

    /// Wait for all queued work: the training loop times steps with it; benchmarks and tests also use it to
    /// surface a kernel fault at a known point.
    fn synchronize(&self) {
        self.stream
            .synchronize()
            .expect("CUDA stream synchronize failed (an earlier kernel or copy faulted)");
    }

    fn alloc(&self, len: usize) -> CudaBuf {
        self.try_alloc(len)
            .unwrap_or_else(|e| panic!("{e}\n(the plan should have caught this before the model was built)"))
    }
    fn alloc_ids(&self, len: usize) -> CudaIds {
        let mem = self
            .zeroed_block(len, I32_BYTES, "token ids")
            .unwrap_or_else(|e| panic!("{e}"));
        CudaIds {
            mem,
            len,
            host: vec![0; len],
        }
    }
    fn buf_len(buf: &CudaBuf) -> usize {
        buf.len
    }
    fn alloc_as(&self, len: usize, storage: Storage) -> CudaBuf {
        self.try_alloc_as(len, storage)
            .unwrap_or_else(|e| panic!("{e}\n(the plan should have caught this before the model was built)"))
    }
    /// A zero-filled buffer stored as `storage`, or the caching allocator's out-of-memory report as an error.
    fn try_alloc_as(&self, len: usize, storage: Storage) -> crate::error::Result<CudaBuf> {
        let what = match storage {
            Storage::F32 => "an f32 buffer",
            Storage::Bf16 => "a bf16 buffer",
        };
        let mem = self.zeroed_block(len, storage.bytes_per_element(), what)?;
        Ok(CudaBuf { mem, len, storage })
    }
    fn storage(buf: &CudaBuf) -> Storage {
        buf.storage
    }
    fn memory_report(&self) -> Option<MemoryReport> {
        Some(self.memory.report())
    }

    // cuProfilerStart/Stop act on the current context: make it this thread's first. Unverified on a GPU.
    fn profiler_capture(&self, on: bool) -> crate::Result<()> {
        use crate::error::NcError;
        self.ctx
            .bind_to_thread()
            .map_err(|e| NcError::new(format!("CUDA device {}: making the context current: {e}", self.ordinal)))?;
        let r = if on {
            cudarc::driver::profiler_start()
        } else {
            cudarc::driver::profiler_stop()
        };
        r.map_err(|e| NcError::new(format!("cuProfiler{}: {e}", if on { "Start" } else { "Stop" })))
    }

    fn upload(&self, dst: ViewMut<'_, Self>, src: &[f32]) {
        assert_eq!(src.len(), dst.len, "CUDA upload: host slice and view lengths differ");
        if src.is_empty() {
            return;
        }
        let storage = dst.buf.storage;
        let to = self.addr_any(dst.view());
        self.bind();
        // SAFETY: `to` covers src.len() elements of the buffer's storage (addr_any checked the view). From
        // pageable memory the driver stages the copy before returning, so the host data may go at once.
        let copied = match storage {
            Storage::F32 => unsafe { driver::memcpy_htod_async(to, src, self.stream.cu_stream()) },
            Storage::Bf16 => {
                // Rounded on the host, as the contract says an upload into a Bf16 buffer rounds.
                let bits: Vec<u16> = src.iter().map(|&x| bf16::bf16_bits(x)).collect();
                unsafe { driver::memcpy_htod_async(to, &bits, self.stream.cu_stream()) }
            }
        };
        copied.expect("CUDA upload: host-to-device copy failed");
    }
    fn download(&self, src: View<'_, Self>, dst: &mut [f32]) {
        assert_eq!(dst.len(), src.len, "CUDA download: host slice and view lengths differ");
        if dst.is_empty() {
            return;
        }
        let storage = src.buf.storage;
        let from = self.addr_any(src);
        self.bind();
        let mut bits = vec![0u16; if storage == Storage::Bf16 { dst.len() } else { 0 }];
        // SAFETY: `from` covers dst.len() elements; the stream is synchronized below before they are read.
        let copied = match storage {
            Storage::F32 => unsafe { driver::memcpy_dtoh_async(dst, from, self.stream.cu_stream()) },
            Storage::Bf16 => unsafe { driver::memcpy_dtoh_async(&mut bits, from, self.stream.cu_stream()) },
        };
        copied.expect("CUDA download: device-to-host copy failed");
        // The copy is queued behind every op before it; wait so `dst` is complete when we return.
        self.stream
            .synchronize()
            .expect("CUDA download: stream synchronize failed (an earlier kernel or copy faulted)");
        // Reading a Bf16 buffer yields the exact widened values.
        for (d, b) in dst.iter_mut().zip(&bits) {
            *d = bf16::bf16_to_f32(*b);
        }
    }
    fn upload_ids(&self, dst: &mut CudaIds, src: &[i32]) {
        assert!(
            src.len() <= dst.len,
            "CUDA upload_ids: {} ids into a buffer of {}",
            src.len(),
            dst.len
        );
        if src.is_empty() {
            return;
        }
        self.bind();
        // SAFETY: the block holds dst.len >= src.len() ids.
        unsafe { driver::memcpy_htod_async(dst.mem.addr(), src, self.stream.cu_stream()) }
            .expect("CUDA upload_ids: host-to-device copy failed");
        dst.host[..src.len()].copy_from_slice(src);
    }
    fn fill(&self, dst: ViewMut<'_, Self>, value: f32) {
        if dst.buf.storage == Storage::Bf16 {
            return self.fill_bf16(dst, value);
        }
        let n = dst.len;
        let x = self.ptr_mut(dst);
        self.elementwise(nc_kernels::FILL, n, &[x, count(n), Arg::F32(value)]);
    }
    fn copy(&self, src: View<'_, Self>, dst: ViewMut<'_, Self>) {
        assert_eq!(src.len, dst.len, "CUDA copy: source and destination lengths differ");
        if src.len == 0 {
            return;
        }
        let n = src.len;
        let (from_storage, to_storage) = (src.buf.storage, dst.buf.storage);
        let (from, to) = (self.addr_any(src), self.addr_any(dst.view()));
        match (from_storage, to_storage) {
            (a, b) if a == b => {
                self.bind();
                // SAFETY: both views were checked to lie inside their buffers.
                unsafe { driver::memcpy_dtod_async(to, from, n * a.bytes_per_element(), self.stream.cu_stream()) }
                    .expect("CUDA copy: device-to-device copy failed");
            }
            // F32 -> Bf16 is the cast (rounds to nearest even); Bf16 -> F32 widens exactly.
            (Storage::F32, _) => self.cast(nc_kernels::CAST_F32_TO_BF16, from, to, n),
            (Storage::Bf16, _) => self.cast(nc_kernels::CAST_BF16_TO_F32, from, to, n),
        }
    }

    fn matmul(&self, shape: Gemm, a: View<'_, Self>, b: View<'_, Self>, mut c: ViewMut<'_, Self>) {
        need("matmul A", a.len, shape.a_len());
        need("matmul B", b.len, shape.b_len());
        need("matmul C", c.len, shape.c_len());
        let Gemm {
            m, n, k, accumulate, ..
        } = shape;
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            // An empty inner product is 0: C = 0, or C unchanged when accumulating (as on the CPU).
            if !accumulate {
                self.fill(c.sub(0, m * n), 0.0);
            }
            return;
        }
        match (a.buf.storage, b.buf.storage, c.buf.storage) {
            (Storage::F32, Storage::F32, Storage::F32) => {}
            (Storage::Bf16, Storage::Bf16, _) => return self.matmul_lt(shape, a, b, c),
            // cuBLASLt has no mixed-input kernel: the bf16 layout never makes one (ops_bf16.rs).
            _ => return self.matmul_widened(shape, a, b, c),
        }
        let call = blas::sgemm_call(shape);
        let (first, second, out) = (self.addr(b), self.addr(a), self.addr_mut(c));
        // cuBLAS works in whatever context is current on this thread; make it ours.
        self.bind();
        // SAFETY: the three views were checked above to cover m x k, k x n and m x n values, which are
        // exactly the extents `call` reads and writes.
        unsafe { self.blas.run(&call, first, second, out) }.unwrap_or_else(|e| panic!("CUDA matmul: {e}"));
    }

    fn embedding_forward(&self, ids: &CudaIds, n: usize, wte: View<'_, Self>, d: usize, out: ViewMut<'_, Self>) {
        need("embedding_forward out", out.len, n * d);
        if n == 0 || d == 0 {
            return;
        }
        if wte.buf.storage == Storage::Bf16 || out.buf.storage == Storage::Bf16 {
            return self.embedding_forward_bf16(ids, n, wte, d, out);
        }
        let args = [
            self.ids_ptr(ids, 0, n),
            self.ptr(wte),
            self.ptr_mut(out),
            int(n, "tokens"),
            int(d, "d"),
        ];
        self.launch(nc_kernels::EMBEDDING_FORWARD, one_block_per_row(n), &args);
    }
    fn embedding_backward(&self, ids: &CudaIds, n: usize, dout: View<'_, Self>, d: usize, dwte: ViewMut<'_, Self>) {
        need("embedding_backward dout", dout.len, n * d);
        if n == 0 || d == 0 {
            return;
        }
        // Deterministic on every storage (no float atomics): the sorted kernels, in the CPU's order.
        self.embedding_backward_sorted(ids, n, dout, d, dwte);
    }

    fn rmsnorm_forward(
        &self,
        x: View<'_, Self>,
        rows: usize,
        dim: usize,
        eps: f32,
        y: ViewMut<'_, Self>,
        rstd: ViewMut<'_, Self>,
    ) {
        need("rmsnorm_forward x", x.len, rows * dim);
        need("rmsnorm_forward y", y.len, rows * dim);
        need("rmsnorm_forward rstd", rstd.len, rows);
        if rows == 0 {
            return;
        }
        if [x.buf.storage, y.buf.storage, rstd.buf.storage].contains(&Storage::Bf16) {
            return self.rmsnorm_forward_bf16(x, rows, dim, eps, y, rstd);
        }
        let args = [
            self.ptr(x),
            self.ptr_mut(y),
            self.ptr_mut(rstd),
            int(rows, "rows"),
            int(dim, "dim"),
            Arg::F32(eps),
        ];
        self.launch(nc_kernels::RMSNORM_FORWARD, one_block_per_row(rows), &args);
    }
    fn rmsnorm_backward(
        &self,
        y: View<'_, Self>,
        rstd: View<'_, Self>,
        dy: View<'_, Self>,
        rows: usize,
        dim: usize,
        dx: ViewMut<'_, Self>,
        accumulate: bool,
    ) {
        need("rmsnorm_backward y", y.len, rows * dim);
        need("rmsnorm_backward rstd", rstd.len, rows);
        need("rmsnorm_backward dy", dy.len, rows * dim);
        need("rmsnorm_backward dx", dx.len, rows * dim);
        if rows == 0 {
            return;
        }
        if [y.buf.storage, rstd.buf.storage, dy.buf.storage, dx.buf.storage].contains(&Storage::Bf16) {
            return self.rmsnorm_backward_bf16(y, rstd, dy, rows, dim, dx, accumulate);
        }
        let args = [
            self.ptr(y),
            self.ptr(rstd),
            self.ptr(dy),
            self.ptr_mut(dx),
            int(rows, "rows"),
            int(dim, "dim"),
            Arg::I32(accumulate as i32),
        ];
        self.launch(nc_kernels::RMSNORM_BACKWARD, one_block_per_row(rows), &args);
    }

    fn rotary(&self, x: ViewMut<'_, Self>, shape: Heads, table: View<'_, Self>, rotation: Rotation) {
        // The transpose of a rotation is the rotation by the opposite angle: the same kernel, sin negated.
        let sin_sign = match rotation {
            Rotation::Forward => 1.0,
            Rotation::Inverse => -1.0,
        };
        if x.buf.storage == Storage::Bf16 {
            return self.rotary_widened(x, shape, table, sin_sign);
        }
        self.rotary_f32(x, shape, table, sin_sign);
    }

    /// The fused kernel (rotary_qknorm.cu) when y is bf16 (the rotated value stays f32: the CPU twin's
    /// rounding points); otherwise the two ops, as the trait's default (the strict f32 path, unchanged).
    fn rotary_qknorm_forward(
        &self,
        x: ViewMut<'_, Self>,
        shape: Heads,
        table: View<'_, Self>,
        eps: f32,
        mut y: ViewMut<'_, Self>,
        mut rstd: ViewMut<'_, Self>,
    ) {
        let (yl, rl) = (y.len, rstd.len);
        let (y_sub, rstd_sub) = (y.sub(0, yl), rstd.sub(0, rl));
        if self.rotary_qknorm_forward_fused(x.view(), shape, table, eps, y_sub, rstd_sub) {
            return;
        }
        super::rotary_qknorm_forward_unfused(self, x, shape, table, eps, y, rstd)
    }
    fn rotary_qknorm_backward(
        &self,
        y: View<'_, Self>,
        rstd: View<'_, Self>,
        dy: View<'_, Self>,
        shape: Heads,
        table: View<'_, Self>,
        mut dx: ViewMut<'_, Self>,
    ) {
        let len = dx.len;
        if self.rotary_qknorm_backward_fused(y, rstd, dy, shape, table, dx.sub(0, len)) {
            return;
        }
        super::rotary_qknorm_backward_unfused(self, y, rstd, dy, shape, table, dx)
    }

    fn attention_forward(
        &self,
        shape: AttnShape,
        q: View<'_, Self>,
        k: View<'_, Self>,
        v: View<'_, Self>,
        out: ViewMut<'_, Self>,
        lse: ViewMut<'_, Self>,
    ) {
        check_attention(&shape, q.len, k.len, v.len, out.len, lse.len);
        if shape.batch == 0 || shape.tq == 0 || shape.n_head == 0 {
            return;
        }
        let storages = [
            q.buf.storage,
            k.buf.storage,
            v.buf.storage,
            out.buf.storage,
            lse.buf.storage,
        ];
        if storages.contains(&Storage::Bf16) {
            return self.attention_forward_bf16(shape, q, k, v, out, lse);
        }
        let s = shape;
        let args = [
            self.ptr(q),
            self.ptr(k),
            self.ptr(v),
            self.ptr_mut(out),
            self.ptr_mut(lse),
            int(s.batch, "batch"),
            int(s.tq, "tq"),
            int(s.tk, "tk"),
            int(s.n_head, "n_head"),
            int(s.n_kv_head, "n_kv_head"),
            int(s.head_dim, "head_dim"),
            int(s.q_pos0, "q_pos0"),
            Arg::F32(attention_scale(s.head_dim)),
        ];
        let dims = nc_kernels::attention_forward_dims(s.batch, s.n_head, s.tq, s.head_dim);
        self.launch(nc_kernels::ATTENTION_FORWARD, dims, &args);
    }
    fn attention_backward(
        &self,
        shape: AttnShape,
        q: View<'_, Self>,
        k: View<'_, Self>,
        v: View<'_, Self>,
        out: View<'_, Self>,
        lse: View<'_, Self>,
        dout: View<'_, Self>,
        dq: ViewMut<'_, Self>,
        dk: ViewMut<'_, Self>,
        dv: ViewMut<'_, Self>,
    ) {
        let s = shape;
        check_attention(&s, q.len, k.len, v.len, out.len, lse.len);
        assert!(
            s.tq == s.tk && s.q_pos0 == 0,
            "attention backward supports the training shape only"
        );
        need("attention_backward dout", dout.len, s.q_len());
        need("attention_backward dq", dq.len, s.q_len());
        need("attention_backward dk", dk.len, s.kv_len());
        need("attention_backward dv", dv.len, s.kv_len());
        if s.batch == 0 || s.tq == 0 || s.n_head == 0 {
            return;
        }
        let storages = [q, k, v, out, lse, dout].map(|x| x.buf.storage);
        if storages.contains(&Storage::Bf16) || [&dq, &dk, &dv].iter().any(|x| x.buf.storage == Storage::Bf16) {
            return self.attention_backward_bf16(s, q, k, v, out, lse, dout, dq, dk, dv);
        }
        let t = s.tq;
        let scale = Arg::F32(attention_scale(s.head_dim));
        let (batch, n_head, n_kv_head, head_dim) = (
            int(s.batch, "batch"),
            int(s.n_head, "n_head"),
            int(s.n_kv_head, "n_kv_head"),
            int(s.head_dim, "head_dim"),
        );
        let tt = int(t, "t");

        // delta (B, H, T) lives in the backend's scratch, grown on first need; the lock is held until the
        // last kernel that reads it is queued (stream order does the rest).
        let mut delta_buf = self.attention_delta.lock();
        if delta_buf.len < s.lse_len() {
            // The old buffer's free is queued on the stream behind the kernels that used it.
            *delta_buf = self
                .try_alloc(s.lse_len())
                .unwrap_or_else(|e| panic!("CUDA attention backward: {e}"));
        }
        let delta = self.scratch_ptr(&mut delta_buf, s.lse_len());
        let (q, k, v, lse, dout) = (self.ptr(q), self.ptr(k), self.ptr(v), self.ptr(lse), self.ptr(dout));

        let args = [self.ptr(out), dout, delta, batch, tt, n_head, head_dim];
        let dims = nc_kernels::attention_delta_dims(s.batch, s.n_head, t, s.head_dim);
        self.launch(nc_kernels::ATTENTION_BACKWARD_DELTA, dims, &args);

        let args = [
            q,
            k,
            v,
            lse,
            delta,
            dout,
            self.ptr_mut(dk),
            self.ptr_mut(dv),
            batch,
            tt,
            n_head,
            n_kv_head,
            head_dim,
            scale,
        ];
        let dims = nc_kernels::attention_dkdv_dims(s.batch, s.n_kv_head, t, s.head_dim);
        self.launch(nc_kernels::ATTENTION_BACKWARD_DKDV, dims, &args);

        let args = [
            q,
            k,
            v,
            lse,
            delta,
            dout,
            self.ptr_mut(dq),
            batch,
            tt,
            n_head,
            n_kv_head,
            head_dim,
            scale,
        ];
        let dims = nc_kernels::attention_dq_dims(s.batch, s.n_head, t, s.head_dim);
        self.launch(nc_kernels::ATTENTION_BACKWARD_DQ, dims, &args);
    }

    fn relu2_forward(&self, u: View<'_, Self>, h: ViewMut<'_, Self>) {
        if either_bf16("relu2_forward: u and h", u, h.view()) {
            return self.relu2_forward_bf16(u, h);
        }
        let n = h.len;
        self.elementwise(nc_kernels::RELU2_FORWARD, n, &[self.ptr(u), self.ptr_mut(h), count(n)]);
    }
    fn relu2_backward(&self, u: View<'_, Self>, dh_to_du: ViewMut<'_, Self>) {
        if either_bf16("relu2_backward: u and dh", u, dh_to_du.view()) {
            return self.relu2_backward_bf16(u, dh_to_du);
        }
        let n = u.len;
        self.elementwise(
            nc_kernels::RELU2_BACKWARD,
            n,
            &[self.ptr(u), self.ptr_mut(dh_to_du), count(n)],
        );
    }
    fn add_inplace(&self, x: ViewMut<'_, Self>, y: View<'_, Self>) {
        if either_bf16("add_inplace: x and y", x.view(), y) {
            return self.add_inplace_widened(x, y);
        }
        let n = x.len;
        self.elementwise(nc_kernels::ADD_INPLACE, n, &[self.ptr_mut(x), self.ptr(y), count(n)]);
    }

    fn softcap_cross_entropy(
        &self,
        logits: ViewMut<'_, Self>,
        rows: usize,
        vocab: usize,
        cap: f32,
        targets: &CudaIds,
        target_off: usize,
        losses: ViewMut<'_, Self>,
        grad_scale: Option<f32>,
    ) {
        assert!(vocab > 0, "softcap_cross_entropy: empty vocabulary");
        // The bf16 layout keeps the logits chunk and the losses f32 (the loss in full precision).
        self.f32_only(
            "softcap_cross_entropy",
            &[("logits", logits.buf.storage), ("losses", losses.buf.storage)],
        );
        need("softcap_cross_entropy logits", logits.len, rows * vocab);
        need("softcap_cross_entropy losses", losses.len, rows);
        if rows == 0 {
            return;
        }
        let args = [
            self.ptr_mut(logits),
            self.ids_ptr(targets, target_off, rows),
            self.ptr_mut(losses),
            int(rows, "rows"),
            int(vocab, "vocab"),
            Arg::F32(cap),
            Arg::F32(grad_scale.unwrap_or(0.0)),
            Arg::I32(grad_scale.is_some() as i32),
        ];
        self.launch(nc_kernels::SOFTCAP_CROSS_ENTROPY, one_block_per_row(rows), &args);
    }
    fn softcap(&self, logits: ViewMut<'_, Self>, cap: f32) {
        if logits.buf.storage == Storage::Bf16 {
            return self.softcap_widened(logits, cap);
        }
        let n = logits.len;
        let args = [self.ptr_mut(logits), count(n), Arg::F32(cap)];
        self.elementwise(nc_kernels::SOFTCAP, n, &args);
    }

    // The optimizer's ops: kernels of optim.cu, which round exactly as `optim_ops` does (bit for bit).

    fn axpby(&self, a: f32, x: View<'_, Self>, b: f32, y: ViewMut<'_, Self>) {
        assert_eq!(x.len, y.len, "CUDA axpby: x and y lengths differ");
        self.f32_only("axpby", &[("x", x.buf.storage), ("y", y.buf.storage)]);
        let n = x.len;
        let args = [self.ptr(x), self.ptr_mut(y), count(n), Arg::F32(a), Arg::F32(b)];
        self.elementwise(nc_kernels::AXPBY, n, &args);
    }
    fn scale(&self, x: ViewMut<'_, Self>, a: f32) {
        self.f32_only("scale", &[("x", x.buf.storage)]);
        let n = x.len;
        let args = [self.ptr_mut(x), count(n), Arg::F32(a)];
        self.elementwise(nc_kernels::SCALE, n, &args);
    }
    /// One launch writes a partial sum per block (f64); they are downloaded (which waits for the queued
    /// work) and added here in block order, so the result depends on n only, never on timing.
    fn sum_squares(&self, x: View<'_, Self>) -> f64 {
        self.f32_only("sum_squares", &[("x", x.buf.storage)]);
        let n = x.len;
        if n == 0 {
            return 0.0;
        }
        let dims = nc_kernels::sum_squares_dims(n as u64);
        let blocks = dims.grid.0 as usize;
        let partials = self.sum_squares_partials.lock();
        assert!(
            blocks * F64_BYTES <= partials.requested(),
            "sum_squares: more blocks than partials"
        );
        let args = [self.ptr(x), count(n), Arg::Ptr(partials.addr())];
        self.launch(nc_kernels::SUM_SQUARES, dims, &args);
        let mut host = vec![0.0f64; blocks];
        self.bind();
        // SAFETY: the partials block holds `blocks` f64s; the stream is synchronized before `host` is read.
        unsafe { driver::memcpy_dtoh_async(&mut host, partials.addr(), self.stream.cu_stream()) }
            .expect("CUDA sum_squares: device-to-host copy of the partials failed");
        self.stream
            .synchronize()
            .expect("CUDA sum_squares: stream synchronize failed (an earlier kernel or copy faulted)");
        let mut total = 0.0f64;
        for p in host {
            total += p;
        }
        total
    }
    /// The partials of `sum_squares`, then one thread adds them in block order and writes the inverse
    /// norm: the same arithmetic as `sum_squares` followed by the host's f32 formula, with no wait.
    fn inverse_norm_into(&self, x: View<'_, Self>, eps: f32, inv: ViewMut<'_, Self>) {
        assert_eq!(inv.len, 1, "CUDA inverse_norm_into: inv must be one element");
        self.f32_only("inverse_norm_into", &[("x", x.buf.storage), ("inv", inv.buf.storage)]);
        let n = x.len;
        let dims = nc_kernels::sum_squares_dims(n.max(1) as u64);
        let blocks = dims.grid.0 as usize;
        // The lock only orders host threads' use of the partials; stream order does the rest.
        let partials = self.sum_squares_partials.lock();
        assert!(
            blocks * F64_BYTES <= partials.requested(),
            "sum_squares: more blocks than partials"
        );
        let args = [self.ptr(x), count(n), Arg::Ptr(partials.addr())];
        self.launch(nc_kernels::SUM_SQUARES, dims, &args);
        let args = [
            Arg::Ptr(partials.addr()),
            int(blocks, "blocks"),
            Arg::F32(eps),
            self.ptr_mut(inv),
        ];
        self.launch(INVERSE_NORM, one_block_per_row(1), &args);
    }
    fn scale_by_scalar(&self, x: View<'_, Self>, s: View<'_, Self>, y: ViewMut<'_, Self>) {
        assert_eq!(s.len, 1, "CUDA scale_by_scalar: s must be one element");
        assert_eq!(x.len, y.len, "CUDA scale_by_scalar: x and y lengths differ");
        self.f32_only(
            "scale_by_scalar",
            &[("x", x.buf.storage), ("s", s.buf.storage), ("y", y.buf.storage)],
        );
        let n = x.len;
        let args = [self.ptr(x), self.ptr(s), self.ptr_mut(y), count(n)];
        self.elementwise(SCALE_BY_SCALAR, n, &args);
    }
    fn muon_momentum(&self, g: View<'_, Self>, buf: ViewMut<'_, Self>, update: ViewMut<'_, Self>, mu: f32) {
        assert!(
            buf.len == g.len && update.len == g.len,
            "CUDA muon_momentum: g, buf and update lengths differ"
        );
        self.f32_only(
            "muon_momentum",
            &[
                ("g", g.buf.storage),
                ("buf", buf.buf.storage),
                ("update", update.buf.storage),
            ],
        );
        let n = g.len;
        let args = [
            self.ptr(g),
            self.ptr_mut(buf),
            self.ptr_mut(update),
            count(n),
            Arg::F32(mu),
        ];
        self.elementwise(nc_kernels::MUON_MOMENTUM, n, &args);
    }
    // The bf16 optimizer ops: optim_bf16.rs.
    fn newton_schulz_bf16(
        &self,
        ns: &super::NsBatch,
        g: View<'_, Self>,
        x: ViewMut<'_, Self>,
        x_tmp: ViewMut<'_, Self>,
        gram: ViewMut<'_, Self>,
        poly: ViewMut<'_, Self>,
        norms: ViewMut<'_, Self>,
    ) {
        self.newton_schulz_bf16_device(ns, g, x, x_tmp, gram, poly, norms)
    }
    fn muon_apply(&self, x: View<'_, Self>, a: f32, p: ViewMut<'_, Self>, p_bf16: Option<ViewMut<'_, Self>>) {
        self.muon_apply_device(x, a, p, p_bf16)
    }
    fn adamw_multi(
        &self,
        p: &mut CudaBuf,
        g: &CudaBuf,
        m: &mut CudaBuf,
        v: &mut CudaBuf,
        working: Option<&mut CudaBuf>,
        pieces: &[super::AdamwPiece],
    ) {
        self.adamw_multi_device(p, g, m, v, working, pieces)
    }
    fn adamw(&self, p: ViewMut<'_, Self>, g: View<'_, Self>, m: ViewMut<'_, Self>, v: ViewMut<'_, Self>, h: AdamwStep) {
        let n = p.len;
        assert!(
            g.len == n && m.len == n && v.len == n,
            "CUDA adamw: p, g, m and v lengths differ"
        );
        self.f32_only(
            "adamw",
            &[
                ("p", p.buf.storage),
                ("g", g.buf.storage),
                ("m", m.buf.storage),
                ("v", v.buf.storage),
            ],
        );
        let args = [
            self.ptr_mut(p),
            self.ptr(g),
            self.ptr_mut(m),
            self.ptr_mut(v),
            count(n),
            Arg::F32(h.beta1),
            Arg::F32(h.beta2),
            Arg::F32(h.eps),
            Arg::F32(h.decay),
            Arg::F32(h.step),
            Arg::F32(h.inv_bc2),
        ];
        self.elementwise(nc_kernels::ADAMW, n, &args);
    }
}

impl CudaBackend {
    /// Rotary in place on x (batch, t, heads, head_dim); sin_sign +1 rotates forward, -1 back.
    fn rotary_f32(&self, x: ViewMut<'_, Self>, shape: Heads, table: View<'_, Self>, sin_sign: f32) {
        let (batch, t, heads, head_dim, pos0) = (shape.batch, shape.t, shape.heads, shape.head_dim, shape.pos0);
        assert!(
            head_dim >= 2 && head_dim.is_multiple_of(2),
            "rotary: head_dim {head_dim} must be even and positive"
        );
        let half = head_dim / 2;
        // As on the CPU: the table view holds cos then sin, each (max_pos, half).
        let max_pos = table.len / (2 * half);
        assert!(
            pos0 + t <= max_pos,
            "rotary: positions up to {} but the table holds {max_pos}",
            pos0 + t
        );
        let rows = batch * t;
        need("rotary x", x.len, rows * heads * head_dim);
        let pairs = rows * heads * half;
        let args = [
            self.ptr_mut(x),
            self.ptr(table),
            int(rows, "rows"),
            int(t, "t"),
            int(heads, "heads"),
            int(head_dim, "head_dim"),
            int(pos0, "pos0"),
            int(max_pos, "max_pos"),
            Arg::F32(sin_sign),
        ];
        self.elementwise(nc_kernels::ROTARY, pairs, &args);
    }
}

/// Launch of the one-block-per-row kernels (embedding, rmsnorm, cross entropy).
fn one_block_per_row(rows: usize) -> nc_kernels::LaunchDims {
    nc_kernels::row_dims(rows, nc_kernels::ROW_THREADS)
}

/// The score scale 1/sqrt(D), computed exactly as the CPU backend does.
fn attention_scale(head_dim: usize) -> f32 {
    1.0 / (head_dim as f32).sqrt()
}

/// The CPU backend's checks of an attention call, plus the kernels' head_dim limit.
fn check_attention(s: &AttnShape, q: usize, k: usize, v: usize, out: usize, lse: usize) {
    assert!(
        s.n_kv_head > 0 && s.n_head.is_multiple_of(s.n_kv_head),
        "attention: n_kv_head must divide n_head"
    );
    assert!(s.q_pos0 + s.tq <= s.tk, "attention: queries reach past the keys");
    assert!(
        (1..=nc_kernels::ATTENTION_MAX_HEAD_DIM).contains(&s.head_dim),
        "attention: the CUDA kernels take 1 <= head_dim <= {}, got {}",
        nc_kernels::ATTENTION_MAX_HEAD_DIM,
        s.head_dim
    );
    need("attention q", q, s.q_len());
    need("attention out", out, s.q_len());
    need("attention k", k, s.kv_len());
    need("attention v", v, s.kv_len());
    need("attention lse", lse, s.lse_len());
}
