//! A bias-free linear layer's three GEMMs, in the one orientation the whole model uses: the weight is an
//! (out x inp) matrix at `off` in the parameter buffer (its grad at the same offset in the grad buffer), the
//! activations are (rows x width), row-major. Every projection (q, k, v, both c_proj, c_fc, lm_head) goes
//! through here, so the transposes and the weight's extent are written once.

use crate::backend::{Backend, Gemm, View, ViewMut};

/// One linear layer applied to `rows` tokens.
#[derive(Debug, Clone, Copy)]
pub struct Linear {
    pub rows: usize,
    pub out: usize,
    pub inp: usize,
    /// Where the weight starts in the parameter (and the grad) buffer.
    pub off: usize,
}

impl Linear {
    pub fn new(rows: usize, out: usize, inp: usize, off: usize) -> Self {
        Linear { rows, out, inp, off }
    }

    /// The weight (out x inp) in `params` (what the GEMMs read: the bf16 working copy under bf16).
    fn weight<'a, B: Backend>(&self, params: &'a B::Buf) -> View<'a, B> {
        View::at(params, self.off, self.out * self.inp)
    }

    /// y (rows x out) = x W^T; added into y with `accumulate` (a residual add fused into the GEMM).
    pub fn forward<B: Backend>(&self, be: &B, params: &B::Buf, x: View<'_, B>, y: ViewMut<'_, B>, accumulate: bool) {
        let shape = Gemm::nt(self.rows, self.out, self.inp).accumulating(accumulate);
        be.matmul(shape, x, self.weight(params), y);
    }

    /// dx (rows x inp) = dy W; added into dx with `accumulate` (several projections read the same input).
    pub fn backward_input<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        dy: View<'_, B>,
        dx: ViewMut<'_, B>,
        accumulate: bool,
    ) {
        let shape = Gemm::nn(self.rows, self.inp, self.out).accumulating(accumulate);
        be.matmul(shape, dy, self.weight(params), dx);
    }

    /// dW += dy^T x: parameter grads always accumulate (over micro-batches and loss chunks).
    pub fn backward_weight<B: Backend>(&self, be: &B, dy: View<'_, B>, x: View<'_, B>, grads: &mut B::Buf) {
        let dw = ViewMut::at(grads, self.off, self.out * self.inp);
        be.matmul(Gemm::tn(self.out, self.inp, self.rows).accumulating(true), dy, x, dw);
    }
}
