//! The bf16 optimizer ops on the device: batched Newton-Schulz on cuBLASLt strided-batched GEMMs, Muon's
//! apply and the multi-tensor AdamW, each writing the f32 master and the bf16 working copy. Nothing here
//! reads back to the host (one optimizer step waits once, for the clip's norm: tests/tests/optimizer_syncs.rs).
//!
//! Newton-Schulz over `batch` same-shape matrices (kernels-ptx/cuda/newton_schulz.cu has the whole recipe):
//!   1. `NS_SUM_SQUARES`: per matrix, 64 f64 partial sums of squares into `norms`;
//!   2. `NS_NORMALIZE_BF16`: X = bf16(G / (||G||_F + eps)), the norm from the partials, on the device;
//!   3. per iteration three strided-batched GEMMs, bf16 in and out, f32 compute, the quintic in the
//!      epilogues (a tall matrix iterates Y = X^T as stored: A = Y^T Y, Y' = Y B^T + a Y), so no kernel runs
//!      inside the iteration:
//!
//!      | product            | alpha | beta | C | D                 |
//!      |--------------------|-------|------|---|-------------------|
//!      | A  = X X^T         | 1     | 0    | - | A                 |
//!      | B  = c (A A) + b A | c     | b    | A | B                 |
//!      | X' = B X + a X     | 1     | a    | X | the other iterate |
//!
//!      The iterate ping-pongs between `x` and `x_tmp`; the first one is chosen so the last iteration lands
//!      in `x`.
//!
//! The CPU twin (backend/ns_bf16.rs) rounds at the same points; the f32 accumulation order inside the GEMMs
//! is cuBLASLt's own, so the two agree to a few bf16 ulps.
//!
//! Unverified: none of this has run on a GPU (the session that wrote it had none). It is compile-checked and
//! its host twin is tested; `cargo test --release --test cuda_parity` and benches/benches/ns_bf16.rs run it
//! where a GPU is.

use super::blas_lt::{self, Elem, GemmKey};
use super::launch::{count, Arg};
use super::{CudaBackend, CudaBuf};
use crate::backend::{AdamwPiece, Backend, Gemm, NsBatch, Storage, View, ViewMut};
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use nc_kernels::{AdamwTable, AdamwTensor, ADAMW_MAX_TENSORS};

/// `AdamwTable` as a by-value kernel parameter (1024 bytes, `#[repr(C)]`, plain data: the driver copies it
/// with the launch).
#[repr(transparent)]
struct AdamwTableArg(AdamwTable);
// SAFETY: AdamwTable is #[repr(C)] plain old data (u64s and f32s) with the layout adamw_multi.cu
// static_asserts; the kernel reads it by value.
unsafe impl DeviceRepr for AdamwTableArg {}

/// One operand of a batched GEMM: a device address and the distance between consecutive matrices.
#[derive(Clone, Copy)]
struct Operand {
    addr: u64,
    stride: usize,
}

/// The alignment every matrix of a batch has: the first one's, and what the stride between them keeps of
/// it (an odd element count would misalign every other bf16 matrix).
fn batch_alignment(op: Operand, batch: usize) -> u32 {
    let first = blas_lt::alignment(op.addr);
    if batch > 1 {
        first.min(blas_lt::alignment(
            (op.stride * Storage::Bf16.bytes_per_element()) as u64,
        ))
    } else {
        first
    }
}

impl CudaBackend {
    /// D = alpha op(A) op(B) + beta C over `batch` matrices, all bf16, f32 compute, on cuBLASLt with the
    /// backend's plan cache. C is read only when beta != 0 (it may be D itself, or another buffer); `shape`'s
    /// own `accumulate` is not read (beta says it).
    #[allow(clippy::too_many_arguments)]
    fn gemm_bf16_batched(
        &self,
        shape: Gemm,
        batch: usize,
        (a, b): (Operand, Operand),
        alpha: f32,
        beta: f32,
        c: Operand,
        d: u64,
    ) {
        let key = GemmKey {
            shape: shape.accumulating(beta != 0.0),
            a: Elem::Bf16,
            b: Elem::Bf16,
            c: Elem::Bf16,
            batch,
            stride_a: a.stride,
            stride_b: b.stride,
            stride_c: c.stride,
            align_a: batch_alignment(a, batch),
            align_b: batch_alignment(b, batch),
            align_c: batch_alignment(c, batch).min(batch_alignment(Operand { addr: d, ..c }, batch)),
        };
        let Gemm { m, n, k, .. } = shape;
        let mut cache = self.lt_plans();
        let (planner, plan) = cache
            .get(&key)
            .unwrap_or_else(|e| panic!("CUDA Newton-Schulz GEMM {m}x{n}x{k} batch {batch}: {e}"));
        let stream = self.stream.cu_stream() as *mut _;
        // SAFETY: the caller checked that every operand's view holds `batch` matrices at its stride, in bf16.
        unsafe { planner.run(plan, alpha, a.addr, b.addr, beta, c.addr, d, stream) }
            .unwrap_or_else(|e| panic!("CUDA Newton-Schulz GEMM {m}x{n}x{k} batch {batch}: {e}"));
    }

    /// `Backend::newton_schulz_bf16` (see the module comment).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn newton_schulz_bf16_device(
        &self,
        ns: &NsBatch,
        g: View<'_, Self>,
        x: ViewMut<'_, Self>,
        x_tmp: ViewMut<'_, Self>,
        gram: ViewMut<'_, Self>,
        poly: ViewMut<'_, Self>,
        norms: ViewMut<'_, Self>,
    ) {
        let (n_el, sq, batch) = (ns.numel(), ns.gram_numel(), ns.batch);
        if batch == 0 || n_el == 0 {
            return;
        }
        for (what, have, want) in [
            ("g", g.len, batch * n_el),
            ("x", x.len, batch * n_el),
            ("x_tmp", x_tmp.len, batch * n_el),
            ("gram", gram.len, batch * sq),
            ("poly", poly.len, batch * sq),
            (
                "norms",
                norms.len,
                batch * crate::backend::ns_bf16::NS_NORM_SCRATCH_PER_MATRIX,
            ),
        ] {
            super::need(&format!("newton_schulz_bf16 {what}"), have, want);
        }
        for (what, s) in [
            ("x", x.buf.storage),
            ("x_tmp", x_tmp.buf.storage),
            ("gram", gram.buf.storage),
            ("poly", poly.buf.storage),
        ] {
            assert!(
                s == Storage::Bf16,
                "CUDA newton_schulz_bf16: {what} must be a Bf16 buffer"
            );
        }
        let g_addr = self.addr(g);
        let partials = self.addr_mut(norms);
        let (x_addr, tmp_addr) = (self.addr_any(x.view()), self.addr_any(x_tmp.view()));
        let (gram_addr, poly_addr) = (self.addr_any(gram.view()), self.addr_any(poly.view()));

        // 1-2. X = bf16(G / (||G|| + eps)), into the buffer the last iteration's ping-pong ends in `x` from.
        let (cur, other) = if ns.steps.is_multiple_of(2) {
            (x_addr, tmp_addr)
        } else {
            (tmp_addr, x_addr)
        };
        let sum_args = [Arg::Ptr(g_addr), count(n_el), Arg::Ptr(partials)];
        self.launch(
            nc_kernels::NS_SUM_SQUARES,
            nc_kernels::ns_sum_squares_dims(batch),
            &sum_args,
        );
        let norm_args = [
            Arg::Ptr(g_addr),
            count(n_el),
            Arg::Ptr(partials),
            Arg::I32(nc_kernels::NS_PARTS as i32),
            Arg::F32(ns.eps),
            Arg::Ptr(cur),
        ];
        let dims = nc_kernels::ns_elementwise_dims(n_el as u64, batch);
        self.launch(nc_kernels::NS_NORMALIZE_BF16, dims, &norm_args);

        // 3. The iteration: GEMMs only.
        let last = self.ns_iterations(ns, cur, other, gram_addr, poly_addr);
        debug_assert_eq!(last, x_addr, "the last iteration lands in x");
    }

    /// Newton-Schulz's iterations alone (the GEMMs, no norm): `ns.steps` iterations from the bf16 iterate in
    /// `x`, ping-ponging with `x_tmp`. For benchmarks (benches/benches/ns_bf16.rs times the whole
    /// `newton_schulz_bf16` against this, its GEMMs alone); returns nothing useful to a caller otherwise.
    pub fn newton_schulz_gemms_bf16(
        &self,
        ns: &NsBatch,
        x: ViewMut<'_, Self>,
        x_tmp: ViewMut<'_, Self>,
        gram: ViewMut<'_, Self>,
        poly: ViewMut<'_, Self>,
    ) {
        let (n_el, sq, batch) = (ns.numel(), ns.gram_numel(), ns.batch);
        for (what, have, want) in [
            ("x", x.len, batch * n_el),
            ("x_tmp", x_tmp.len, batch * n_el),
            ("gram", gram.len, batch * sq),
            ("poly", poly.len, batch * sq),
        ] {
            super::need(&format!("newton_schulz_gemms_bf16 {what}"), have, want);
        }
        for s in [x.buf.storage, x_tmp.buf.storage, gram.buf.storage, poly.buf.storage] {
            assert!(
                s == Storage::Bf16,
                "CUDA newton_schulz_gemms_bf16: every buffer must be Bf16"
            );
        }
        if batch > 0 && n_el > 0 {
            let (x_addr, tmp_addr) = (self.addr_any(x.view()), self.addr_any(x_tmp.view()));
            self.ns_iterations(
                ns,
                x_addr,
                tmp_addr,
                self.addr_any(gram.view()),
                self.addr_any(poly.view()),
            );
        }
    }

    /// The iterations from the iterate at `cur` (the other at `other`); returns where the last one landed.
    fn ns_iterations(&self, ns: &NsBatch, mut cur: u64, mut other: u64, gram_addr: u64, poly_addr: u64) -> u64 {
        let (n_el, sq, batch) = (ns.numel(), ns.gram_numel(), ns.batch);
        let (rows, cols, short) = (ns.rows, ns.cols, ns.short());
        let (ca, cb, cc) = ns.coeffs;
        let gram_op = Operand {
            addr: gram_addr,
            stride: sq,
        };
        let poly_op = Operand {
            addr: poly_addr,
            stride: sq,
        };
        for _ in 0..ns.steps {
            let x_op = Operand {
                addr: cur,
                stride: n_el,
            };
            if ns.tall() {
                // A = Y^T Y (cols x cols)
                self.gemm_bf16_batched(
                    Gemm::tn(cols, cols, rows),
                    batch,
                    (x_op, x_op),
                    1.0,
                    0.0,
                    gram_op,
                    gram_addr,
                );
            } else {
                // A = X X^T (rows x rows)
                self.gemm_bf16_batched(
                    Gemm::nt(rows, rows, cols),
                    batch,
                    (x_op, x_op),
                    1.0,
                    0.0,
                    gram_op,
                    gram_addr,
                );
            }
            // B = c (A A) + b A
            let square = Gemm::nn(short, short, short);
            self.gemm_bf16_batched(square, batch, (gram_op, gram_op), cc, cb, gram_op, poly_addr);
            if ns.tall() {
                // Y' = Y B^T + a Y (rows x cols)
                self.gemm_bf16_batched(Gemm::nt(rows, cols, cols), batch, (x_op, poly_op), 1.0, ca, x_op, other);
            } else {
                // X' = B X + a X (rows x cols)
                self.gemm_bf16_batched(Gemm::nn(rows, cols, rows), batch, (poly_op, x_op), 1.0, ca, x_op, other);
            }
            std::mem::swap(&mut cur, &mut other);
        }
        cur
    }

    /// `Backend::muon_apply`: `MUON_APPLY_BF16` (p = a x + p in f32, then the working copy) for a Bf16 x and
    /// a Bf16 (or no) working copy; otherwise the f32 ops (axpby, then the cast copy).
    pub(super) fn muon_apply_device(
        &self,
        x: View<'_, Self>,
        a: f32,
        p: ViewMut<'_, Self>,
        p_bf16: Option<ViewMut<'_, Self>>,
    ) {
        let n = p.len;
        assert_eq!(x.len, n, "CUDA muon_apply: x and p differ in length");
        let bf16_copy = p_bf16.as_ref().is_none_or(|w| w.buf.storage == Storage::Bf16);
        if x.buf.storage != Storage::Bf16 || !bf16_copy {
            let (p_buf, off) = (p.buf, p.off);
            self.axpby(
                a,
                x,
                1.0,
                ViewMut {
                    buf: &mut *p_buf,
                    off,
                    len: n,
                },
            );
            if let Some(w) = p_bf16 {
                self.copy(
                    View {
                        buf: &*p_buf,
                        off,
                        len: n,
                    },
                    w,
                );
            }
            return;
        }
        if n == 0 {
            return;
        }
        let pb = match p_bf16 {
            Some(w) => {
                assert_eq!(w.len, n, "CUDA muon_apply: the working copy's view differs in length");
                self.addr_any(w.view())
            }
            None => 0,
        };
        let args = [
            Arg::Ptr(self.addr_any(x)),
            count(n),
            self.ptr_mut(p),
            count(0),
            Arg::Ptr(pb),
            count(0),
            Arg::F32(a),
        ];
        self.launch(
            nc_kernels::MUON_APPLY_BF16,
            nc_kernels::ns_elementwise_dims(n as u64, 1),
            &args,
        );
    }

    /// `Backend::adamw_multi`: `ADAMW_MULTI` over up to 16 pieces a launch (a model has two AdamW tensors
    /// per rank: one launch), writing the bf16 working copy when it is a Bf16 buffer.
    pub(super) fn adamw_multi_device(
        &self,
        p: &mut CudaBuf,
        g: &CudaBuf,
        m: &mut CudaBuf,
        v: &mut CudaBuf,
        mut working: Option<&mut CudaBuf>,
        pieces: &[AdamwPiece],
    ) {
        if working.as_ref().is_some_and(|w| w.storage != Storage::Bf16) {
            // An f32 working copy (no model makes one): the per-tensor kernel and a copy.
            for t in pieces {
                self.adamw(
                    ViewMut::at(p, t.p_off, t.len),
                    View::at(g, t.p_off, t.len),
                    ViewMut::at(m, t.m_off, t.len),
                    ViewMut::at(v, t.m_off, t.len),
                    t.step,
                );
                if let Some(w) = working.as_deref_mut() {
                    self.copy(View::at(p, t.p_off, t.len), ViewMut::at(w, t.working_off, t.len));
                }
            }
            return;
        }
        let Some(first) = pieces.first() else {
            return;
        };
        let (beta1, beta2, eps) = (first.step.beta1, first.step.beta2, first.step.eps);
        for chunk in pieces.chunks(ADAMW_MAX_TENSORS) {
            let mut table = AdamwTable::default();
            let mut max_n = 0u64;
            for (slot, t) in table.tensors.iter_mut().zip(chunk) {
                assert!(
                    (t.step.beta1, t.step.beta2, t.step.eps) == (beta1, beta2, eps),
                    "CUDA adamw_multi: one launch takes one (beta1, beta2, eps)"
                );
                *slot = AdamwTensor {
                    p: self.addr(View::at(p, t.p_off, t.len)),
                    g: self.addr(View::at(g, t.p_off, t.len)),
                    m: self.addr(View::at(m, t.m_off, t.len)),
                    v: self.addr(View::at(v, t.m_off, t.len)),
                    p_bf16: working
                        .as_deref()
                        .map_or(0, |w| self.addr_any(View::at(w, t.working_off, t.len))),
                    n: t.len as u64,
                    decay: t.step.decay,
                    step: t.step.step,
                    inv_bc2: t.step.inv_bc2,
                    unused: 0.0,
                };
                max_n = max_n.max(t.len as u64);
            }
            let dims = nc_kernels::adamw_multi_dims(max_n, chunk.len());
            let table = AdamwTableArg(table);
            let n_tensors = chunk.len() as i32;
            let function = self.kernels.get(nc_kernels::ADAMW_MULTI);
            let mut builder = self.stream.launch_builder(function);
            builder.arg(&table);
            builder.arg(&n_tensors);
            builder.arg(&beta1);
            builder.arg(&beta2);
            builder.arg(&eps);
            let config = LaunchConfig {
                grid_dim: dims.grid,
                block_dim: dims.block,
                shared_mem_bytes: dims.shared_bytes,
            };
            // SAFETY: the parameters follow nc_adamw_multi_f32's signature (table by value, int, three
            // floats); every address in the table came from a view checked to hold the piece's elements.
            unsafe { builder.launch(config) }
                .unwrap_or_else(|e| panic!("CUDA launch of nc_adamw_multi_f32 failed: {e}"));
        }
    }
}
