//! The MLP half of a block: x += c_proj(relu(c_fc(rmsnorm(x)))^2).

use super::linear::Linear;
use super::{all, all_mut, gemm_input, head, head_mut, norm, BlockParams, GradScratch, LayerActs, LayerShapes};
use crate::backend::Backend;

/// Forward over `s.n` tokens (the first rows of each buffer): reads `resid`, saves xn2 and u into `a` and
/// relu(u)^2 into `h`, adds the branch into `resid`.
pub fn forward<B: Backend>(
    be: &B,
    s: &LayerShapes,
    params: &B::Buf,
    w: &BlockParams,
    resid: &mut B::Buf,
    a: &mut LayerActs<B>,
    h: &mut B::Buf,
) {
    let (n, d, ff) = (s.n, s.d, s.ff);
    norm::forward(
        be,
        head(resid, n * d),
        n,
        d,
        head_mut(&mut a.xn2, n * d),
        head_mut(&mut a.rstd2, n),
    );
    Linear::new(n, ff, d, w.c_fc).forward(be, params, head(&a.xn2, n * d), head_mut(&mut a.u, n * ff), false);
    be.relu2_forward(head(&a.u, n * ff), head_mut(h, n * ff));
    // Residual add fused into c_proj's GEMM (accumulate).
    Linear::new(n, d, ff, w.mlp_proj).forward(be, params, head(h, n * ff), head_mut(resid, n * d), true);
}

/// Backward: `scr.dresid` holds dL/d(resid after this half); on return, dL/d(resid before it).
/// `h` must hold relu(u)^2 of this layer (saved, or recomputed under Recompute::Selective).
#[allow(clippy::too_many_arguments)]
pub fn backward<B: Backend>(
    be: &B,
    s: &LayerShapes,
    params: &B::Buf,
    grads: &mut B::Buf,
    w: &BlockParams,
    a: &LayerActs<B>,
    h: &B::Buf,
    scr: &mut GradScratch<B>,
) {
    let (n, d, ff) = (s.n, s.d, s.ff);
    scr.cast_dresid(be);
    let dres = gemm_input::<B>(&scr.dresid, &scr.dresid_cast);
    // c_proj: dh = dresid W (n x ff); dW += dresid^T h.
    let proj = Linear::new(n, d, ff, w.mlp_proj);
    proj.backward_input(be, params, all(dres), all_mut(&mut scr.du), false);
    proj.backward_weight(be, all(dres), all(h), grads);
    be.relu2_backward(all(&a.u), all_mut(&mut scr.du));
    // c_fc: dW += du^T xn2; dxn = du W.
    let fc = Linear::new(n, ff, d, w.c_fc);
    fc.backward_weight(be, all(&scr.du), all(&a.xn2), grads);
    fc.backward_input(be, params, all(&scr.du), all_mut(&mut scr.dxn), false);
    let (xn2, rstd2, dxn) = (all(&a.xn2), all(&a.rstd2), all(&scr.dxn));
    be.rmsnorm_backward(xn2, rstd2, dxn, n, d, all_mut(&mut scr.dresid), true);
}
