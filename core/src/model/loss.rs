//! lm_head + softcap + cross-entropy, in chunks of tokens: the (tokens x vocab) logits never exist at once.
//! The chunks are `LossChunks`: at least 1024 tokens each when the micro-batch has that many, so the lm_head
//! weight-gradient GEMM (whose K is the chunk's rows) accumulates over >= 1024 tokens per call, the dxf GEMM
//! has K = vocab, the logits and dxf GEMMs have M >= 1024, and the cross-entropy runs on >= 1024 rows per
//! launch. (The logits GEMM's K is d, the model width, which no chunking changes.)

use super::linear::Linear;
use super::{gemm_input, LossChunks};
use crate::backend::{Backend, View, ViewMut};
use crate::config::LOGIT_SOFTCAP;

/// What the backward of the loss writes: lm_head's grad (accumulated) and d(final norm output) (written).
pub struct LossGrad<'a, B: Backend> {
    /// d(loss_scale * mean loss)/d(sum of losses) = loss_scale / (number of counted targets).
    pub scale: f32,
    pub grads: &'a mut B::Buf,
    pub dxf: &'a mut B::Buf,
}

/// Per-token losses (nats, 0 where the target is -1) into `losses`; with `grad`, the backward as well.
/// `params` is what the GEMMs read (the bf16 working copy under bf16); the logits chunk is f32 and
/// `dlogits_cast` (empty without casts) the GEMM-input copy of its gradient.
#[allow(clippy::too_many_arguments)]
pub fn forward_backward<B: Backend>(
    be: &B,
    n: usize,
    d: usize,
    vocab: usize,
    chunks: LossChunks,
    params: &B::Buf,
    lm_head_off: usize,
    xf: &B::Buf,
    targets: &B::Ids,
    logits_ws: &mut B::Buf,
    dlogits_cast: &mut B::Buf,
    losses: &mut B::Buf,
    mut grad: Option<LossGrad<'_, B>>,
) {
    assert_eq!(chunks.tokens, n, "the loss chunks are for another micro-batch");
    for (c0, rows) in chunks.iter() {
        let lm_head = Linear::new(rows, vocab, d, lm_head_off);
        let x = View::<B>::at(xf, c0 * d, rows * d);
        lm_head.forward(be, params, x, ViewMut::at(logits_ws, 0, rows * vocab), false);
        be.softcap_cross_entropy(
            ViewMut::at(logits_ws, 0, rows * vocab),
            rows,
            vocab,
            LOGIT_SOFTCAP,
            targets,
            c0,
            ViewMut::at(losses, c0, rows),
            grad.as_ref().map(|g| g.scale),
        );
        if let Some(g) = grad.as_mut() {
            // With casts (bf16), the f32 gradient is rounded into its own buffer for the two GEMMs.
            if B::buf_len(dlogits_cast) > 0 {
                be.copy(
                    View::at(logits_ws, 0, rows * vocab),
                    ViewMut::at(dlogits_cast, 0, rows * vocab),
                );
            }
            let dlogits = View::<B>::at(gemm_input::<B>(logits_ws, dlogits_cast), 0, rows * vocab);
            lm_head.backward_input(be, params, dlogits, ViewMut::at(g.dxf, c0 * d, rows * d), false);
            lm_head.backward_weight(be, dlogits, x, g.grads);
        }
    }
}
