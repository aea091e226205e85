//! The buffers a batched bf16 Newton-Schulz call (`Backend::newton_schulz_bf16`) works in, and the call on
//! them: the device optimizer sizes one set for its largest call, the `ns_bf16` bench and the tests one for
//! the call they make. One place that knows which buffer is stored how (bf16 iterates and Gram matrices,
//! f32 norm partials) and how much of each a call reads.

use crate::backend::ns_bf16::NS_NORM_SCRATCH_PER_MATRIX;
use crate::backend::{Backend, NsBatch, Storage, View, ViewMut};

/// Newton-Schulz's working buffers for calls of up to a given size; the momentum updates it reads (f32) are
/// the caller's.
pub struct NsBf16Buffers<B: Backend> {
    /// The iterate (the call's result, `batch x rows x cols`, after `run`) and its ping-pong partner (Bf16).
    pub x: B::Buf,
    pub x_tmp: B::Buf,
    /// A and b A + c A A per matrix (Bf16).
    pub gram: B::Buf,
    pub poly: B::Buf,
    /// The norms' partial sums (f32 elements holding f64s on a device).
    pub norms: B::Buf,
}

impl<B: Backend> NsBf16Buffers<B> {
    /// Room for any call of at most `iterate` matrix elements and `gram` Gram elements in all, over at most
    /// `batch` matrices.
    pub fn new(be: &B, iterate: usize, gram: usize, batch: usize) -> Self {
        NsBf16Buffers {
            x: be.alloc_as(iterate, Storage::Bf16),
            x_tmp: be.alloc_as(iterate, Storage::Bf16),
            gram: be.alloc_as(gram, Storage::Bf16),
            poly: be.alloc_as(gram, Storage::Bf16),
            norms: be.alloc(batch * NS_NORM_SCRATCH_PER_MATRIX),
        }
    }

    /// Exactly the room of the call `ns`.
    pub fn for_call(be: &B, ns: &NsBatch) -> Self {
        Self::new(be, ns.batch * ns.numel(), ns.batch * ns.gram_numel(), ns.batch)
    }

    /// Orthogonalizes the `ns.batch` matrices at the start of `g` (f32) into the start of `x`.
    pub fn run(&mut self, be: &B, ns: &NsBatch, g: View<'_, B>) {
        let (n, sq) = (ns.batch * ns.numel(), ns.batch * ns.gram_numel());
        be.newton_schulz_bf16(
            ns,
            g,
            ViewMut::at(&mut self.x, 0, n),
            ViewMut::at(&mut self.x_tmp, 0, n),
            ViewMut::at(&mut self.gram, 0, sq),
            ViewMut::at(&mut self.poly, 0, sq),
            ViewMut::at(&mut self.norms, 0, ns.batch * NS_NORM_SCRATCH_PER_MATRIX),
        );
    }

    /// Bytes of the buffers as a device stores them.
    pub fn bytes(&self) -> usize {
        [&self.x, &self.x_tmp, &self.gram, &self.poly, &self.norms]
            .iter()
            .map(|b| B::buf_len(b) * B::storage(b).bytes_per_element())
            .sum()
    }
}

/// Bytes `NsBf16Buffers::new(be, iterate, gram, batch)` allocates on a device (what the plan prices).
pub fn ns_bf16_buffer_bytes(iterate: usize, gram: usize, batch: usize) -> usize {
    Storage::Bf16.bytes_per_element() * 2 * (iterate + gram)
        + Storage::F32.bytes_per_element() * batch * NS_NORM_SCRATCH_PER_MATRIX
}
