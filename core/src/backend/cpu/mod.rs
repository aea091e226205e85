//! The CPU backend: f32 buffers in host memory, threads through rayon, GEMMs through the `gemm` crate.
//!
//! It is the reference every other backend is checked against, so it favours plain, exact code; the hot
//! paths (matmuls, attention tiles) still run multithreaded and vectorized. One file per op family.
//!
//! It is also the CPU twin of the bf16 engine: a buffer allocated with `Storage::Bf16` keeps f32 values that
//! are always bf16-representable. Every op computes in f32 exactly as for an F32 buffer and then, if its
//! destination is Bf16, rounds what it wrote (`store`), which is the device's "f32 math, round on store";
//! an accumulating op rounds old + new, the sum taken in f32. F32 buffers are never touched by rounding, so
//! the f32 path is bit for bit what it was. One op also rounds inside: attention on bf16 tensors at a flash
//! head_dim rounds P and dS where the device's flash kernels do (`flash_operands`, attention.rs).

mod attention;
mod bf16_slice;
mod elementwise;
pub mod host_gemm;
pub mod isa;
mod loss;
pub(crate) mod matmul;
pub mod matmul_f64;
mod norm;

use super::{optim_ops, AdamwStep, AttnShape, Backend, Gemm, Heads, Rotation, Storage, View, ViewMut};
use bf16_slice::round_slice_bf16;
use rayon::prelude::*;

/// f32 values in host memory and the storage they stand for (Bf16: every value is bf16-representable).
#[derive(Debug, Clone, Default)]
pub struct CpuBuf(pub Vec<f32>, pub Storage);

impl CpuBuf {
    /// An F32 buffer holding `data`.
    pub fn f32(data: Vec<f32>) -> Self {
        CpuBuf(data, Storage::F32)
    }
    /// A buffer stored as `storage` holding `data` (rounded to bf16 for Bf16, as an upload would).
    pub fn with_storage(mut data: Vec<f32>, storage: Storage) -> Self {
        if storage == Storage::Bf16 {
            round_slice_bf16(&mut data);
        }
        CpuBuf(data, storage)
    }
}

/// i32 token ids in host memory.
#[derive(Debug, Clone, Default)]
pub struct CpuIds(pub Vec<i32>);

/// The CPU backend. `threads` is the parallelism handed to big GEMMs (0 = rayon's pool size).
#[derive(Debug, Clone, Default)]
pub struct CpuBackend {
    pub threads: usize,
}

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend { threads: 0 }
    }
    /// Host slice of a whole buffer (CPU only: this is how the optimizers and checkpoints reach params).
    pub fn host(buf: &CpuBuf) -> &[f32] {
        &buf.0
    }
    /// Writable host slice of a whole F32 buffer (a Bf16 one is written through ops, which round).
    pub fn host_mut(buf: &mut CpuBuf) -> &mut [f32] {
        assert_eq!(
            buf.1,
            Storage::F32,
            "host_mut on a Bf16 buffer: writes would skip the rounding"
        );
        &mut buf.0
    }
}

/// The host slice behind a view.
pub(crate) fn sl<'a>(v: View<'a, CpuBackend>) -> &'a [f32] {
    &v.buf.0[v.off..v.off + v.len]
}

/// The writable host slice behind a view.
pub(crate) fn sl_mut<'a>(v: ViewMut<'a, CpuBackend>) -> &'a mut [f32] {
    &mut v.buf.0[v.off..v.off + v.len]
}

/// The writable slice of a view, borrowed so the view can be passed to `store` afterwards.
fn out<'a>(v: &'a mut ViewMut<'_, CpuBackend>) -> &'a mut [f32] {
    &mut v.buf.0[v.off..v.off + v.len]
}

/// Elements per rayon task when rounding a stored range.
const ROUND_CHUNK: usize = 1 << 14;

/// Completes a store into `v`: rounds what the op wrote to bf16 if the buffer is Bf16 (nothing for F32).
pub(crate) fn store(v: ViewMut<'_, CpuBackend>) {
    if v.buf.1 == Storage::Bf16 {
        sl_mut(v).par_chunks_mut(ROUND_CHUNK).for_each(round_slice_bf16);
    }
}

/// How the device computes this attention's P and dS (cpu/attention.rs), so the twin rounds where it rounds:
/// bf16 exactly where the CUDA backend takes its bf16 flash kernels (cuda/ops_bf16.rs, cuda/flash.rs): every
/// tensor (storage, view offset) bf16 and lse f32, a head_dim the kernels are built for, and every view
/// starting 16-byte aligned (a multiple of 8 bf16 elements; device buffers themselves start 512-aligned).
/// Anything else runs the f32 kernels there, with f32 operands, as here.
fn flash_operands(head_dim: usize, tensors: &[(Storage, usize)], lse: Storage) -> attention::ProbOperands {
    let flash = nc_kernels::FLASH_HEAD_DIMS.contains(&head_dim)
        && lse == Storage::F32
        && tensors
            .iter()
            .all(|&(storage, off)| storage == Storage::Bf16 && off.is_multiple_of(8));
    if flash {
        attention::ProbOperands::Bf16
    } else {
        attention::ProbOperands::F32
    }
}

/// A raw pointer that may cross threads: kernels hand disjoint, strided regions of one output to rayon
/// tasks, which safe slices cannot express. Every use states why the regions are disjoint.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl Backend for CpuBackend {
    type Buf = CpuBuf;
    type Ids = CpuIds;

    fn alloc(&self, len: usize) -> CpuBuf {
        CpuBuf::f32(vec![0.0; len])
    }
    fn alloc_as(&self, len: usize, storage: Storage) -> CpuBuf {
        CpuBuf(vec![0.0; len], storage)
    }
    fn storage(buf: &CpuBuf) -> Storage {
        buf.1
    }
    fn alloc_ids(&self, len: usize) -> CpuIds {
        CpuIds(vec![0; len])
    }
    fn buf_len(buf: &CpuBuf) -> usize {
        buf.0.len()
    }
    fn upload(&self, mut dst: ViewMut<'_, Self>, src: &[f32]) {
        out(&mut dst).copy_from_slice(src);
        store(dst);
    }
    fn download(&self, src: View<'_, Self>, dst: &mut [f32]) {
        dst.copy_from_slice(sl(src));
    }
    fn upload_ids(&self, dst: &mut CpuIds, src: &[i32]) {
        dst.0[..src.len()].copy_from_slice(src);
    }
    fn fill(&self, mut dst: ViewMut<'_, Self>, value: f32) {
        out(&mut dst).fill(value);
        store(dst);
    }
    fn copy(&self, src: View<'_, Self>, mut dst: ViewMut<'_, Self>) {
        out(&mut dst).copy_from_slice(sl(src));
        store(dst);
    }

    fn matmul(&self, shape: Gemm, a: View<'_, Self>, b: View<'_, Self>, mut c: ViewMut<'_, Self>) {
        matmul::matmul(self.threads, shape, sl(a), sl(b), out(&mut c));
        store(c);
    }

    fn embedding_forward(&self, ids: &CpuIds, n: usize, wte: View<'_, Self>, d: usize, mut y: ViewMut<'_, Self>) {
        elementwise::embedding_forward(&ids.0[..n], sl(wte), d, out(&mut y));
        store(y);
    }
    fn embedding_backward(&self, ids: &CpuIds, n: usize, dout: View<'_, Self>, d: usize, mut dwte: ViewMut<'_, Self>) {
        elementwise::embedding_backward(&ids.0[..n], sl(dout), d, out(&mut dwte));
        store(dwte);
    }

    fn rmsnorm_forward(
        &self,
        x: View<'_, Self>,
        rows: usize,
        dim: usize,
        eps: f32,
        mut y: ViewMut<'_, Self>,
        mut rstd: ViewMut<'_, Self>,
    ) {
        norm::rmsnorm_forward(sl(x), rows, dim, eps, out(&mut y), out(&mut rstd));
        store(y);
        store(rstd);
    }
    fn rmsnorm_backward(
        &self,
        y: View<'_, Self>,
        rstd: View<'_, Self>,
        dy: View<'_, Self>,
        rows: usize,
        dim: usize,
        mut dx: ViewMut<'_, Self>,
        accumulate: bool,
    ) {
        norm::rmsnorm_backward(sl(y), sl(rstd), sl(dy), rows, dim, out(&mut dx), accumulate);
        store(dx);
    }

    fn rotary(&self, mut x: ViewMut<'_, Self>, shape: Heads, table: View<'_, Self>, rotation: Rotation) {
        let inverse = rotation == Rotation::Inverse;
        norm::rotary(out(&mut x), shape, sl(table), inverse);
        store(x);
    }

    /// The twin of the CUDA kernel (rotary_qknorm.cu): the rotated value stays f32 between the two steps and
    /// only y rounds. With an F32 x this is the trait's two calls exactly (x rotated in place, nothing rounds).
    fn rotary_qknorm_forward(
        &self,
        mut x: ViewMut<'_, Self>,
        shape: Heads,
        table: View<'_, Self>,
        eps: f32,
        mut y: ViewMut<'_, Self>,
        mut rstd: ViewMut<'_, Self>,
    ) {
        let rotated_copy;
        let rotated: &[f32] = match x.buf.1 {
            Storage::F32 => {
                norm::rotary(out(&mut x), shape, sl(table), false);
                sl(x.view())
            }
            // A Bf16 x must keep bf16 values, so the f32 rotation goes to a temporary.
            Storage::Bf16 => {
                let mut r = sl(x.view()).to_vec();
                norm::rotary(&mut r, shape, sl(table), false);
                rotated_copy = r;
                &rotated_copy
            }
        };
        norm::rmsnorm_forward(rotated, shape.rows(), shape.head_dim, eps, out(&mut y), out(&mut rstd));
        store(y);
        store(rstd);
    }
    /// The twin of the CUDA kernel: the norm's input gradient stays f32 through the transpose rotation and dx
    /// rounds once. With an F32 dx this is the trait's two calls exactly.
    fn rotary_qknorm_backward(
        &self,
        y: View<'_, Self>,
        rstd: View<'_, Self>,
        dy: View<'_, Self>,
        shape: Heads,
        table: View<'_, Self>,
        mut dx: ViewMut<'_, Self>,
    ) {
        let g = out(&mut dx);
        norm::rmsnorm_backward(sl(y), sl(rstd), sl(dy), shape.rows(), shape.head_dim, g, false);
        norm::rotary(g, shape, sl(table), true);
        store(dx);
    }

    fn attention_forward(
        &self,
        shape: AttnShape,
        q: View<'_, Self>,
        k: View<'_, Self>,
        v: View<'_, Self>,
        mut o: ViewMut<'_, Self>,
        mut lse: ViewMut<'_, Self>,
    ) {
        let tensors = [(q.buf.1, q.off), (k.buf.1, k.off), (v.buf.1, v.off), (o.buf.1, o.off)];
        let operands = flash_operands(shape.head_dim, &tensors, lse.buf.1);
        attention::forward(shape, sl(q), sl(k), sl(v), out(&mut o), out(&mut lse), operands);
        store(o);
        store(lse);
    }
    fn attention_backward(
        &self,
        shape: AttnShape,
        q: View<'_, Self>,
        k: View<'_, Self>,
        v: View<'_, Self>,
        o: View<'_, Self>,
        lse: View<'_, Self>,
        dout: View<'_, Self>,
        mut dq: ViewMut<'_, Self>,
        mut dk: ViewMut<'_, Self>,
        mut dv: ViewMut<'_, Self>,
    ) {
        let tensors = [
            (q.buf.1, q.off),
            (k.buf.1, k.off),
            (v.buf.1, v.off),
            (o.buf.1, o.off),
            (dout.buf.1, dout.off),
            (dq.buf.1, dq.off),
            (dk.buf.1, dk.off),
            (dv.buf.1, dv.off),
        ];
        let operands = flash_operands(shape.head_dim, &tensors, lse.buf.1);
        attention::backward(
            shape,
            sl(q),
            sl(k),
            sl(v),
            sl(o),
            sl(lse),
            sl(dout),
            out(&mut dq),
            out(&mut dk),
            out(&mut dv),
            operands,
        );
        store(dq);
        store(dk);
        store(dv);
    }

    fn relu2_forward(&self, u: View<'_, Self>, mut h: ViewMut<'_, Self>) {
        elementwise::relu2_forward(sl(u), out(&mut h));
        store(h);
    }
    fn relu2_backward(&self, u: View<'_, Self>, mut dh_to_du: ViewMut<'_, Self>) {
        elementwise::relu2_backward(sl(u), out(&mut dh_to_du));
        store(dh_to_du);
    }
    fn add_inplace(&self, mut x: ViewMut<'_, Self>, y: View<'_, Self>) {
        elementwise::add_inplace(out(&mut x), sl(y));
        store(x);
    }

    fn softcap_cross_entropy(
        &self,
        mut logits: ViewMut<'_, Self>,
        rows: usize,
        vocab: usize,
        cap: f32,
        targets: &CpuIds,
        target_off: usize,
        mut losses: ViewMut<'_, Self>,
        grad_scale: Option<f32>,
    ) {
        let t = &targets.0[target_off..target_off + rows];
        loss::softcap_cross_entropy(out(&mut logits), rows, vocab, cap, t, out(&mut losses), grad_scale);
        store(logits);
        store(losses);
    }
    fn softcap(&self, mut logits: ViewMut<'_, Self>, cap: f32) {
        loss::softcap(out(&mut logits), cap);
        store(logits);
    }

    fn axpby(&self, a: f32, x: View<'_, Self>, b: f32, mut y: ViewMut<'_, Self>) {
        optim_ops::axpby(a, sl(x), b, out(&mut y));
        store(y);
    }
    fn scale(&self, mut x: ViewMut<'_, Self>, a: f32) {
        optim_ops::scale(out(&mut x), a);
        store(x);
    }
    fn sum_squares(&self, x: View<'_, Self>) -> f64 {
        optim_ops::sum_squares(sl(x))
    }
    fn muon_momentum(&self, g: View<'_, Self>, mut buf: ViewMut<'_, Self>, mut update: ViewMut<'_, Self>, mu: f32) {
        optim_ops::muon_momentum(sl(g), out(&mut buf), out(&mut update), mu);
        store(buf);
        store(update);
    }
    fn adamw(
        &self,
        mut p: ViewMut<'_, Self>,
        g: View<'_, Self>,
        mut m: ViewMut<'_, Self>,
        mut v: ViewMut<'_, Self>,
        h: AdamwStep,
    ) {
        optim_ops::adamw(out(&mut p), sl(g), out(&mut m), out(&mut v), h);
        store(p);
        store(m);
        store(v);
    }

    fn host_slice(buf: &CpuBuf) -> Option<&[f32]> {
        Some(&buf.0)
    }
    fn host_slice_mut(buf: &mut CpuBuf) -> Option<&mut [f32]> {
        match buf.1 {
            Storage::F32 => Some(&mut buf.0),
            Storage::Bf16 => None,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::backend::bf16::{is_bf16, round_bf16};

    /// Values in [-0.5, 0.5) from an index hash (no RNG state to thread through); device_like's tests use them.
    pub(crate) fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 16777216.0) - 0.5)
            .collect()
    }

    /// upload, fill and copy into a Bf16 buffer round each value; an F32 buffer keeps them exactly; copy from
    /// Bf16 back to F32 is the exact widening.
    #[test]
    fn stores_into_bf16_round_and_f32_stays_exact() {
        let be = CpuBackend::new();
        let xs = values(100, 7);
        let (mut f, mut h) = (be.alloc(100), be.alloc_as(100, Storage::Bf16));
        assert_eq!(
            (CpuBackend::storage(&f), CpuBackend::storage(&h)),
            (Storage::F32, Storage::Bf16)
        );
        be.upload(ViewMut::all(&mut f), &xs);
        be.upload(ViewMut::all(&mut h), &xs);
        assert_eq!(f.0, xs);
        let rounded: Vec<f32> = xs.iter().map(|&x| round_bf16(x)).collect();
        assert_eq!(h.0, rounded);
        assert!(xs.iter().any(|&x| !is_bf16(x)), "the test values must need rounding");

        let mut h2 = be.alloc_as(100, Storage::Bf16);
        be.copy(View::all(&f), ViewMut::all(&mut h2));
        assert_eq!(h2.0, rounded);
        let mut f2 = be.alloc(100);
        be.copy(View::all(&h2), ViewMut::all(&mut f2));
        assert_eq!(f2.0, rounded);

        be.fill(ViewMut::at(&mut h2, 10, 5), 0.1);
        assert_eq!(h2.0[10..15], [round_bf16(0.1); 5]);
        assert_eq!(h2.0[15], rounded[15]);
        assert!(CpuBackend::host_slice_mut(&mut h2).is_none());
    }

    /// An accumulating matmul into a Bf16 C stores round(old + A B) with the sum in f32, and only the view
    /// written is rounded.
    #[test]
    fn accumulate_into_bf16_rounds_the_f32_sum() {
        let be = CpuBackend::new();
        let (m, n, k) = (4, 6, 5);
        let a = CpuBuf::f32(values(m * k, 1));
        let b = CpuBuf::f32(values(k * n, 2));
        let old: Vec<f32> = values(m * n + 3, 3).iter().map(|&x| round_bf16(x)).collect();
        let accumulate_into = |c: &mut CpuBuf| {
            be.matmul(
                Gemm::nn(m, n, k).accumulating(true),
                View::all(&a),
                View::all(&b),
                ViewMut::at(c, 3, m * n),
            )
        };
        let mut want = CpuBuf::f32(old.clone());
        accumulate_into(&mut want);
        let mut got = CpuBuf::with_storage(old.clone(), Storage::Bf16);
        accumulate_into(&mut got);
        let want: Vec<f32> = want.0.iter().map(|&x| round_bf16(x)).collect();
        assert_eq!(got.0, want);
        assert_eq!(got.0[..3], old[..3]);
        assert!(want[3..].iter().zip(&old[3..]).all(|(w, o)| w != o));
    }
}
