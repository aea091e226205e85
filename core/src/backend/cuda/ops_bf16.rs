//! The CUDA backend's ops on bf16 buffers: each `Backend` op the model calls under `--precision bf16` looks at
//! its buffers' `Storage` (mod.rs sends it here when any is Bf16) and launches the kernel of that storage
//! combination (kernels-ptx/src/lib.rs documents each): rmsnorm_bf16.cu, rotary_qknorm.cu,
//! elementwise_bf16.cu, embedding.cu's bf16 entries, and the flash attention kernels (flash.rs).
//!
//! Which combinations the bf16 layout makes (`model::Storages`; ARCHITECTURE.md "Precision scheme"):
//! - embedding forward: bf16 wte into the f32 residual stream; backward: bf16 dout into the f32 grads, sorted
//!   (deterministic, `EmbeddingIndex` built from the ids' host copy).
//! - rmsnorm forward: f32 stream into a bf16 output; backward: bf16 y and dy (or the f32 dresid as dy for the
//!   embedding's norm) into an f32 (the stream's gradient) or bf16 dx.
//! - rotary + QK-norm (fused) from the bf16 projections into bf16 q/k, and back into bf16 dq/dk.
//! - attention on bf16 q/k/v/out with f32 lse: the flash kernels (head_dim 64 and 128).
//! - relu^2 bf16 -> bf16, and its backward in place on a bf16 gradient.
//! - GEMMs with both operands bf16 (cuBLASLt, mod.rs); casts by `copy`.
//!
//! Everything else that mixes storages takes a slower but exact road rather than failing: the bf16 operands
//! are widened into f32 scratch from the caching allocator (exact), the f32 kernel runs, and a bf16
//! destination gets the cast (round to nearest even on store, as the contract says). That covers GEMMs with
//! one bf16 operand (cuBLASLt has no mixed-input kernel) or f32 operands into a bf16 C, attention at head
//! dims the flash kernels are not built for (or views not 16-byte aligned), rotary alone, add_inplace and
//! softcap. Ops with no bf16 meaning in the layout (the loss chunk, the optimizer's ops on the f32 master)
//! stop with a message that names the op. None of this has run on a GPU: unverified.

use super::launch::{count, int, Arg};
use super::{one_block_per_row, CudaBackend, CudaBuf, CudaIds, I32_BYTES};
use crate::backend::{bf16, AttnShape, Backend, Gemm, Heads, Storage, View, ViewMut};
use cudarc::driver::{result as driver, sys};
use nc_kernels::{EmbeddingIndex, Kernel};

/// A whole scratch buffer as a view.
fn all(buf: &CudaBuf) -> View<'_, CudaBackend> {
    View::all(buf)
}
fn all_mut(buf: &mut CudaBuf) -> ViewMut<'_, CudaBackend> {
    ViewMut::all(buf)
}

/// The op has no bf16 meaning in the layout: stop with its name and the storages it was given.
fn unsupported(op: &str, storages: &[(&str, Storage)]) -> ! {
    panic!(
        "CUDA {op}: no kernel for the storages {storages:?} (the bf16 layout never makes this call; \
         ARCHITECTURE.md \"Precision scheme\")"
    )
}

impl CudaBackend {
    /// A view of any storage as a kernel's pointer parameter (the kernel's entry says which storage).
    fn any(&self, v: View<'_, Self>) -> Arg {
        Arg::Ptr(self.addr_any(v))
    }
    fn any_mut(&self, v: ViewMut<'_, Self>) -> Arg {
        Arg::Ptr(self.addr_any(v.view()))
    }

    /// Uninitialized scratch of `len` elements from the caching allocator (freed, stream-ordered, on drop).
    pub(super) fn scratch(&self, len: usize, storage: Storage, op: &str) -> CudaBuf {
        let mem = self
            .memory
            .block(len, storage.bytes_per_element(), op)
            .unwrap_or_else(|e| panic!("CUDA {op}: scratch: {e}"));
        CudaBuf { mem, len, storage }
    }

    /// An F32 copy of a Bf16 view (exact widening), or None when the view is F32 already.
    fn widened(&self, v: View<'_, Self>, op: &str) -> Option<CudaBuf> {
        if v.buf.storage == Storage::F32 {
            return None;
        }
        let mut w = self.scratch(v.len, Storage::F32, op);
        self.copy(v, all_mut(&mut w));
        Some(w)
    }

    /// For a destination view: an F32 scratch to compute into when it is Bf16 (holding its widened values when
    /// the op reads them, `keep`), or None when it is F32 and can be written directly.
    fn f32_destination(&self, v: &ViewMut<'_, Self>, keep: bool, op: &str) -> Option<CudaBuf> {
        if v.buf.storage == Storage::F32 {
            return None;
        }
        let mut w = self.scratch(v.len, Storage::F32, op);
        if keep {
            self.copy(v.view(), all_mut(&mut w));
        }
        Some(w)
    }

    /// Completes `f32_destination`: the cast of the scratch into the Bf16 destination.
    fn store_destination(&self, scratch: Option<CudaBuf>, v: ViewMut<'_, Self>) {
        if let Some(w) = scratch {
            self.copy(all(&w), v);
        }
    }

    /// `fill` of a Bf16 view: a 16-bit memset with the value's bf16 bits (rounded to nearest even).
    pub(super) fn fill_bf16(&self, dst: ViewMut<'_, Self>, value: f32) {
        let n = dst.len;
        if n == 0 {
            return;
        }
        let to = self.addr_any(dst.view());
        self.bind();
        // SAFETY: the view (checked by addr_any) covers n 2-byte elements from `to`, which is 2-byte aligned.
        unsafe { sys::cuMemsetD16Async(to, bf16::bf16_bits(value), n, self.stream.cu_stream()).result() }
            .expect("CUDA fill (bf16): memset failed");
    }

    /// `matmul` for the storage combinations cuBLASLt cannot take (one bf16 operand, or f32 operands into a
    /// bf16 C): bf16 operands widened into f32 scratch (exact), sgemm, and for a bf16 C the f32 result (with
    /// its old values when accumulating) cast back: round(old + A B) with the sum in f32, the contract.
    pub(super) fn matmul_widened(&self, shape: Gemm, a: View<'_, Self>, b: View<'_, Self>, c: ViewMut<'_, Self>) {
        let (a, b) = (a.sub(0, shape.a_len()), b.sub(0, shape.b_len()));
        let mut c = c;
        let mut c = c.sub(0, shape.c_len());
        let (wa, wb) = (self.widened(a, "matmul"), self.widened(b, "matmul"));
        let mut wc = self.f32_destination(&c, shape.accumulate, "matmul");
        let a = wa.as_ref().map_or(a, all);
        let b = wb.as_ref().map_or(b, all);
        match wc.as_mut() {
            Some(w) => self.matmul(shape, a, b, all_mut(w)),
            None => self.matmul(shape, a, b, c.sub(0, shape.c_len())),
        }
        self.store_destination(wc, c);
    }

    /// `embedding_forward` from a bf16 wte (the working copy) into an f32 or bf16 output.
    pub(super) fn embedding_forward_bf16(
        &self,
        ids: &CudaIds,
        n: usize,
        wte: View<'_, Self>,
        d: usize,
        out: ViewMut<'_, Self>,
    ) {
        let kernel = match (wte.buf.storage, out.buf.storage) {
            (Storage::Bf16, Storage::F32) => nc_kernels::EMBEDDING_FORWARD_BF16_F32,
            (Storage::Bf16, Storage::Bf16) => nc_kernels::EMBEDDING_FORWARD_BF16_BF16,
            (a, b) => unsupported("embedding_forward", &[("wte", a), ("out", b)]),
        };
        let args = [
            self.ids_ptr(ids, 0, n),
            self.any(wte),
            self.any_mut(out),
            int(n, "tokens"),
            int(d, "d"),
        ];
        self.launch(kernel, one_block_per_row(n), &args);
    }

    /// `embedding_backward`, deterministic on every storage: the inverse index of the ids (built on the host
    /// from the copy `upload_ids` kept, uploaded with the launch) and one writer per row of dwte, adding the
    /// rows of dout in increasing position order (the CPU backend's order). dwte (parameter grads) is f32.
    pub(super) fn embedding_backward_sorted(
        &self,
        ids: &CudaIds,
        n: usize,
        dout: View<'_, Self>,
        d: usize,
        dwte: ViewMut<'_, Self>,
    ) {
        if dwte.buf.storage != Storage::F32 {
            unsupported(
                "embedding_backward",
                &[("dout", dout.buf.storage), ("dwte", dwte.buf.storage)],
            );
        }
        let kernel = match dout.buf.storage {
            Storage::F32 => nc_kernels::EMBEDDING_BACKWARD_SORTED_F32,
            Storage::Bf16 => nc_kernels::EMBEDDING_BACKWARD_SORTED_BF16,
        };
        assert!(n <= ids.len, "CUDA embedding_backward: {n} tokens, {} ids", ids.len);
        let vocab = dwte.len / d;
        // The ids were checked against the vocabulary by the model before upload; an error here is a bug.
        let index =
            EmbeddingIndex::build(&ids.host[..n], vocab).unwrap_or_else(|e| panic!("CUDA embedding_backward: {e}"));
        let order = self.upload_i32(&index.order, "embedding index order");
        let seg_start = self.upload_i32(&index.seg_start, "embedding index starts");
        let seg_id = self.upload_i32(&index.seg_id, "embedding index ids");
        let segments = index.segments();
        if segments == 0 {
            return;
        }
        let args = [
            Arg::Ptr(order.addr()),
            Arg::Ptr(seg_start.addr()),
            Arg::Ptr(seg_id.addr()),
            int(segments, "segments"),
            self.any(dout),
            self.any_mut(dwte),
            int(d, "d"),
        ];
        self.launch(kernel, nc_kernels::embedding_sorted_dims(segments, d), &args);
        // The index blocks go back to the cache when dropped here; a later request reuses them only behind
        // this launch on the one stream.
    }

    /// i32 values copied to a fresh block of the allocator (queued on the stream; the driver stages pageable
    /// host memory before returning, so `data` may go at once).
    fn upload_i32(&self, data: &[i32], what: &str) -> super::Block<nc_alloc::CudaSource> {
        let block = self
            .memory
            .block(data.len(), I32_BYTES, what)
            .unwrap_or_else(|e| panic!("CUDA {what}: {e}"));
        if !data.is_empty() {
            self.bind();
            // SAFETY: the block holds data.len() i32s.
            unsafe { driver::memcpy_htod_async(block.addr(), data, self.stream.cu_stream()) }
                .unwrap_or_else(|e| panic!("CUDA {what}: host-to-device copy failed: {e}"));
        }
        block
    }

    /// `rmsnorm_forward` into a bf16 y (from an f32 or bf16 x), rstd f32.
    pub(super) fn rmsnorm_forward_bf16(
        &self,
        x: View<'_, Self>,
        rows: usize,
        dim: usize,
        eps: f32,
        y: ViewMut<'_, Self>,
        rstd: ViewMut<'_, Self>,
    ) {
        let kernel = match (x.buf.storage, y.buf.storage, rstd.buf.storage) {
            (Storage::F32, Storage::Bf16, Storage::F32) => nc_kernels::RMSNORM_FORWARD_F32_BF16,
            (Storage::Bf16, Storage::Bf16, Storage::F32) => nc_kernels::RMSNORM_FORWARD_BF16_BF16,
            (a, b, c) => unsupported("rmsnorm_forward", &[("x", a), ("y", b), ("rstd", c)]),
        };
        let args = [
            self.any(x),
            self.any_mut(y),
            self.any_mut(rstd),
            int(rows, "rows"),
            int(dim, "dim"),
            Arg::F32(eps),
        ];
        self.launch(kernel, one_block_per_row(rows), &args);
    }

    /// `rmsnorm_backward` from a bf16 saved y, f32 rstd, dy and dx of either storage.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rmsnorm_backward_bf16(
        &self,
        y: View<'_, Self>,
        rstd: View<'_, Self>,
        dy: View<'_, Self>,
        rows: usize,
        dim: usize,
        dx: ViewMut<'_, Self>,
        accumulate: bool,
    ) {
        use Storage::{Bf16, F32};
        let kernel = match (y.buf.storage, rstd.buf.storage, dy.buf.storage, dx.buf.storage) {
            (Bf16, F32, Bf16, F32) => nc_kernels::RMSNORM_BACKWARD_DY_BF16_DX_F32,
            (Bf16, F32, Bf16, Bf16) => nc_kernels::RMSNORM_BACKWARD_DY_BF16_DX_BF16,
            (Bf16, F32, F32, F32) => nc_kernels::RMSNORM_BACKWARD_DY_F32_DX_F32,
            (Bf16, F32, F32, Bf16) => nc_kernels::RMSNORM_BACKWARD_DY_F32_DX_BF16,
            (a, b, c, d) => unsupported("rmsnorm_backward", &[("y", a), ("rstd", b), ("dy", c), ("dx", d)]),
        };
        let args = [
            self.any(y),
            self.any(rstd),
            self.any(dy),
            self.any_mut(dx),
            int(rows, "rows"),
            int(dim, "dim"),
            Arg::I32(accumulate as i32),
        ];
        self.launch(kernel, one_block_per_row(rows), &args);
    }

    /// `rotary` on a bf16 x: widened, rotated by the f32 kernel, cast back (one
    /// rounding, on store). The model's bf16 path uses the fused rotary + QK-norm instead.
    pub(super) fn rotary_widened(&self, x: ViewMut<'_, Self>, shape: Heads, table: View<'_, Self>, sin_sign: f32) {
        let table_w = self.widened(table, "rotary table");
        let table = table_w.as_ref().map_or(table, all);
        let mut w = self.f32_destination(&x, true, "rotary");
        match w.as_mut() {
            Some(w) => self.rotary_f32(all_mut(w), shape, table, sin_sign),
            None => unreachable!("rotary_widened is called for a Bf16 x"),
        }
        self.store_destination(w, x);
    }

    /// The fused rotary + QK-norm forward (rotary_qknorm.cu) when y is bf16; false (nothing launched) for the
    /// storages it has no entry for, which the caller then runs as the two separate ops.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rotary_qknorm_forward_fused(
        &self,
        x: View<'_, Self>,
        shape: Heads,
        table: View<'_, Self>,
        eps: f32,
        y: ViewMut<'_, Self>,
        rstd: ViewMut<'_, Self>,
    ) -> bool {
        let (batch, t, heads, head_dim, pos0) = (shape.batch, shape.t, shape.heads, shape.head_dim, shape.pos0);
        let kernel = match (x.buf.storage, y.buf.storage, rstd.buf.storage, table.buf.storage) {
            (Storage::F32, Storage::Bf16, Storage::F32, Storage::F32) => nc_kernels::ROTARY_QKNORM_FORWARD_F32,
            (Storage::Bf16, Storage::Bf16, Storage::F32, Storage::F32) => nc_kernels::ROTARY_QKNORM_FORWARD_BF16,
            _ => return false,
        };
        if !head_dim.is_multiple_of(2) || head_dim > nc_kernels::QKNORM_MAX_HEAD_DIM {
            return false;
        }
        let rows = batch * t;
        let units = rows * heads;
        let max_pos = self.rotary_positions(table, head_dim, pos0, t);
        need_all("rotary_qknorm_forward", &[("x", x.len), ("y", y.len)], units * head_dim);
        need_all("rotary_qknorm_forward", &[("rstd", rstd.len)], units);
        if units == 0 {
            return true;
        }
        let args = [
            self.any(x),
            self.any_mut(y),
            self.any_mut(rstd),
            self.any(table),
            int(rows, "rows"),
            int(t, "t"),
            int(heads, "heads"),
            int(head_dim, "head_dim"),
            int(pos0, "pos0"),
            int(max_pos, "max_pos"),
            Arg::F32(eps),
        ];
        self.launch(kernel, nc_kernels::qknorm_dims(units, head_dim), &args);
        true
    }

    /// The fused backward when y is bf16; false (nothing launched) otherwise.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rotary_qknorm_backward_fused(
        &self,
        y: View<'_, Self>,
        rstd: View<'_, Self>,
        dy: View<'_, Self>,
        shape: Heads,
        table: View<'_, Self>,
        dx: ViewMut<'_, Self>,
    ) -> bool {
        let (batch, t, heads, head_dim, pos0) = (shape.batch, shape.t, shape.heads, shape.head_dim, shape.pos0);
        use Storage::{Bf16, F32};
        if (y.buf.storage, rstd.buf.storage, table.buf.storage) != (Bf16, F32, F32)
            || !head_dim.is_multiple_of(2)
            || head_dim > nc_kernels::QKNORM_MAX_HEAD_DIM
        {
            return false;
        }
        let kernel = match (dy.buf.storage, dx.buf.storage) {
            (F32, F32) => nc_kernels::ROTARY_QKNORM_BACKWARD_DY_F32_DX_F32,
            (F32, Bf16) => nc_kernels::ROTARY_QKNORM_BACKWARD_DY_F32_DX_BF16,
            (Bf16, F32) => nc_kernels::ROTARY_QKNORM_BACKWARD_DY_BF16_DX_F32,
            (Bf16, Bf16) => nc_kernels::ROTARY_QKNORM_BACKWARD_DY_BF16_DX_BF16,
        };
        let rows = batch * t;
        let units = rows * heads;
        let max_pos = self.rotary_positions(table, head_dim, pos0, t);
        need_all(
            "rotary_qknorm_backward",
            &[("y", y.len), ("dy", dy.len), ("dx", dx.len)],
            units * head_dim,
        );
        need_all("rotary_qknorm_backward", &[("rstd", rstd.len)], units);
        if units == 0 {
            return true;
        }
        let args = [
            self.any(y),
            self.any(rstd),
            self.any(dy),
            self.any_mut(dx),
            self.any(table),
            int(rows, "rows"),
            int(t, "t"),
            int(heads, "heads"),
            int(head_dim, "head_dim"),
            int(pos0, "pos0"),
            int(max_pos, "max_pos"),
        ];
        self.launch(kernel, nc_kernels::qknorm_dims(units, head_dim), &args);
        true
    }

    /// Positions the rotary table holds (cos then sin, each (max_pos, D/2)), checked to cover pos0 + t.
    fn rotary_positions(&self, table: View<'_, Self>, head_dim: usize, pos0: usize, t: usize) -> usize {
        assert!(
            head_dim >= 2 && head_dim.is_multiple_of(2),
            "rotary: head_dim {head_dim} must be even and positive"
        );
        let max_pos = table.len / head_dim;
        assert!(
            pos0 + t <= max_pos,
            "rotary: positions up to {} but the table holds {max_pos}",
            pos0 + t
        );
        max_pos
    }

    /// `attention_forward` with a Bf16 buffer among its tensors. Bf16 q, k, v, out and f32 lse at head_dim 64
    /// or 128 with 16-byte aligned views: the flash kernel (training and KV-cache decoding alike). Anything
    /// else: the bf16 tensors widened into f32 scratch, the f32 kernel, out cast back.
    pub(super) fn attention_forward_bf16(
        &self,
        s: AttnShape,
        q: View<'_, Self>,
        k: View<'_, Self>,
        v: View<'_, Self>,
        out: ViewMut<'_, Self>,
        lse: ViewMut<'_, Self>,
    ) {
        let (q, k, v) = (q.sub(0, s.q_len()), k.sub(0, s.kv_len()), v.sub(0, s.kv_len()));
        let (mut out, mut lse) = (out, lse);
        let (mut out, mut lse) = (out.sub(0, s.q_len()), lse.sub(0, s.lse_len()));
        let bf16_io = [q.buf.storage, k.buf.storage, v.buf.storage, out.buf.storage] == [Storage::Bf16; 4]
            && lse.buf.storage == Storage::F32;
        if bf16_io {
            let ptrs = super::FlashForwardPtrs {
                q: self.addr_any(q),
                k: self.addr_any(k),
                v: self.addr_any(v),
                out: self.addr_any(out.view()),
                lse: self.addr_any(lse.view()),
            };
            // SAFETY: each address is a view of this backend checked (addr_any, sub) to hold its tensor for
            // `s` in the storage the kernel reads (bf16 q/k/v/out, f32 lse); out and lse are distinct buffers
            // from the inputs (the borrow rules: they are &mut).
            if unsafe { self.flash_attention_forward_bf16(s, ptrs) }.is_ok() {
                return;
            }
            // Not a shape or alignment the flash kernels take (nothing was launched): the f32 road below.
        }
        let (wq, wk, wv) = (
            self.widened(q, "attention q"),
            self.widened(k, "attention k"),
            self.widened(v, "attention v"),
        );
        let mut wo = self.f32_destination(&out, false, "attention out");
        let mut wl = self.f32_destination(&lse, false, "attention lse");
        let (q, k, v) = (
            wq.as_ref().map_or(q, all),
            wk.as_ref().map_or(k, all),
            wv.as_ref().map_or(v, all),
        );
        let o = match wo.as_mut() {
            Some(w) => all_mut(w),
            None => out.sub(0, s.q_len()),
        };
        let l = match wl.as_mut() {
            Some(w) => all_mut(w),
            None => lse.sub(0, s.lse_len()),
        };
        self.attention_forward(s, q, k, v, o, l);
        self.store_destination(wo, out);
        self.store_destination(wl, lse);
    }

    /// `attention_backward` with a Bf16 buffer among its tensors: the flash backward when q, k, v, out, dout,
    /// dq, dk, dv are bf16 and lse f32 (head_dim 64 or 128, aligned views); otherwise widened into f32 scratch
    /// and the f32 kernels, the bf16 gradients cast back.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_backward_bf16(
        &self,
        s: AttnShape,
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
        let (ql, kl, ll) = (s.q_len(), s.kv_len(), s.lse_len());
        let (q, k, v, out, lse, dout) = (
            q.sub(0, ql),
            k.sub(0, kl),
            v.sub(0, kl),
            out.sub(0, ql),
            lse.sub(0, ll),
            dout.sub(0, ql),
        );
        let (mut dq, mut dk, mut dv) = (dq, dk, dv);
        let (mut dq, mut dk, mut dv) = (dq.sub(0, ql), dk.sub(0, kl), dv.sub(0, kl));
        let inputs = [q, k, v, out, dout].map(|x| x.buf.storage);
        let outputs = [&dq, &dk, &dv].map(|x| x.buf.storage);
        if inputs == [Storage::Bf16; 5] && outputs == [Storage::Bf16; 3] && lse.buf.storage == Storage::F32 {
            // delta (B, H, T) f32 in the backend's scratch, grown on first need; the lock is held until both
            // launches that use it are queued.
            let mut delta = self.attention_delta.lock();
            if delta.len < ll {
                *delta = self.scratch(ll, Storage::F32, "attention backward delta");
            }
            let ptrs = super::FlashBackwardPtrs {
                q: self.addr_any(q),
                k: self.addr_any(k),
                v: self.addr_any(v),
                out: self.addr_any(out),
                lse: self.addr_any(lse),
                dout: self.addr_any(dout),
                delta: delta.mem.addr(),
                dq: self.addr_any(dq.view()),
                dk: self.addr_any(dk.view()),
                dv: self.addr_any(dv.view()),
            };
            // SAFETY: every address is a checked view of this backend holding its tensor for `s` in the storage
            // the kernels read or write (bf16 tensors, f32 lse and delta); dq, dk, dv are &mut views, so they do
            // not overlap the inputs, and delta is the backend's own scratch, at least lse_len long.
            if unsafe { self.flash_attention_backward_bf16(s, ptrs) }.is_ok() {
                return;
            }
        }
        let op = "attention_backward";
        let w = |x: View<'_, Self>| self.widened(x, op);
        let (wq, wk, wv, wo, wl, wd) = (w(q), w(k), w(v), w(out), w(lse), w(dout));
        let (mut gq, mut gk, mut gv) = (
            self.f32_destination(&dq, false, op),
            self.f32_destination(&dk, false, op),
            self.f32_destination(&dv, false, op),
        );
        {
            let dq32 = match gq.as_mut() {
                Some(b) => all_mut(b),
                None => dq.sub(0, ql),
            };
            let dk32 = match gk.as_mut() {
                Some(b) => all_mut(b),
                None => dk.sub(0, kl),
            };
            let dv32 = match gv.as_mut() {
                Some(b) => all_mut(b),
                None => dv.sub(0, kl),
            };
            self.attention_backward(
                s,
                pick(&wq, q),
                pick(&wk, k),
                pick(&wv, v),
                pick(&wo, out),
                pick(&wl, lse),
                pick(&wd, dout),
                dq32,
                dk32,
                dv32,
            );
        }
        self.store_destination(gq, dq);
        self.store_destination(gk, dk);
        self.store_destination(gv, dv);
    }

    /// `relu2_forward` into a bf16 h (from a bf16 or f32 u); an f32 h from a bf16 u goes through a widened u.
    pub(super) fn relu2_forward_bf16(&self, u: View<'_, Self>, h: ViewMut<'_, Self>) {
        let n = h.len;
        let kernel = match (u.buf.storage, h.buf.storage) {
            (Storage::Bf16, Storage::Bf16) => nc_kernels::RELU2_FORWARD_BF16_TO_BF16,
            (Storage::F32, Storage::Bf16) => nc_kernels::RELU2_FORWARD_F32_TO_BF16,
            _ => {
                let wu = self.widened(u, "relu2_forward").expect("u is Bf16 here");
                return self.relu2_forward(all(&wu), h);
            }
        };
        self.cast_like(kernel, &[self.any(u), self.any_mut(h)], n);
    }

    /// `relu2_backward` in place on a bf16 gradient (u of either storage); an f32 gradient with a bf16 u goes
    /// through a widened u.
    pub(super) fn relu2_backward_bf16(&self, u: View<'_, Self>, dh_to_du: ViewMut<'_, Self>) {
        let n = u.len;
        let kernel = match (u.buf.storage, dh_to_du.buf.storage) {
            (Storage::Bf16, Storage::Bf16) => nc_kernels::RELU2_BACKWARD_U_BF16_DH_BF16,
            (Storage::F32, Storage::Bf16) => nc_kernels::RELU2_BACKWARD_U_F32_DH_BF16,
            _ => {
                let wu = self.widened(u, "relu2_backward").expect("u is Bf16 here");
                return self.relu2_backward(all(&wu), dh_to_du);
            }
        };
        // du is dh (in place: the kernels allow it).
        let dh = self.addr_any(dh_to_du.view());
        self.cast_like(kernel, &[self.any(u), Arg::Ptr(dh), Arg::Ptr(dh)], n);
    }

    /// An elementwise_bf16 kernel over n elements: `args` then the count.
    fn cast_like(&self, kernel: Kernel, args: &[Arg], n: usize) {
        if n == 0 {
            return;
        }
        let mut all_args = args.to_vec();
        all_args.push(count(n));
        self.launch(kernel, nc_kernels::elementwise_bf16_dims(n as u64), &all_args);
    }

    /// `add_inplace` with a Bf16 side: y widened, x computed in f32 scratch and cast back (round(x + y)).
    pub(super) fn add_inplace_widened(&self, x: ViewMut<'_, Self>, y: View<'_, Self>) {
        let wy = self.widened(y, "add_inplace");
        let y = wy.as_ref().map_or(y, all);
        let mut x = x;
        let mut wx = self.f32_destination(&x, true, "add_inplace");
        match wx.as_mut() {
            Some(w) => self.add_inplace(all_mut(w), y),
            None => self.add_inplace(x.sub(0, y.len), y),
        }
        self.store_destination(wx, x);
    }

    /// `softcap` on Bf16 logits: widened, capped in f32, cast back.
    pub(super) fn softcap_widened(&self, logits: ViewMut<'_, Self>, cap: f32) {
        let mut w = self
            .f32_destination(&logits, true, "softcap")
            .expect("logits are Bf16 here");
        self.softcap(all_mut(&mut w), cap);
        self.store_destination(Some(w), logits);
    }

    /// Ops that only take f32 (the loss chunk, the optimizer's ops on the f32 master and grads): a Bf16 buffer
    /// stops here with the op's name.
    pub(super) fn f32_only(&self, op: &str, storages: &[(&str, Storage)]) {
        if storages.iter().any(|(_, s)| *s != Storage::F32) {
            unsupported(op, storages);
        }
    }
}

/// The widened copy of a view where there is one, else the view.
fn pick<'a>(widened: &'a Option<CudaBuf>, v: View<'a, CudaBackend>) -> View<'a, CudaBackend> {
    widened.as_ref().map_or(v, all)
}

/// Each named view length must cover `want` elements.
fn need_all(op: &str, lens: &[(&str, usize)], want: usize) {
    for &(what, have) in lens {
        assert!(
            have >= want,
            "CUDA {op} {what}: view of {have} values, the shape needs {want}"
        );
    }
}
