//! The MLP half of a block: x += c_proj(relu(c_fc(rmsnorm(x)))^2).

use super::{all, all_mut, gemm_input, head, head_mut, norm, BlockParams, GradScratch, LayerActs, LayerShapes};
use crate::backend::{Backend, View, ViewMut};

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
    be.matmul(
        n,
        ff,
        d,
        head(&a.xn2, n * d),
        false,
        View::at(params, w.c_fc, ff * d),
        true,
        head_mut(&mut a.u, n * ff),
        false,
    );
    be.relu2_forward(head(&a.u, n * ff), head_mut(h, n * ff));
    // Residual add fused into c_proj's GEMM (accumulate).
    be.matmul(
        n,
        d,
        ff,
        head(h, n * ff),
        false,
        View::at(params, w.mlp_proj, d * ff),
        true,
        head_mut(resid, n * d),
        true,
    );
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
    be.matmul(
        n,
        ff,
        d,
        all(dres),
        false,
        View::at(params, w.mlp_proj, d * ff),
        false,
        all_mut(&mut scr.du),
        false,
    );
    be.matmul(
        d,
        ff,
        n,
        all(dres),
        true,
        all(h),
        false,
        ViewMut::at(grads, w.mlp_proj, d * ff),
        true,
    );
    be.relu2_backward(all(&a.u), all_mut(&mut scr.du));
    // c_fc: dW += du^T xn2; dxn = du W.
    be.matmul(
        ff,
        d,
        n,
        all(&scr.du),
        true,
        all(&a.xn2),
        false,
        ViewMut::at(grads, w.c_fc, ff * d),
        true,
    );
    be.matmul(
        n,
        d,
        ff,
        all(&scr.du),
        false,
        View::at(params, w.c_fc, ff * d),
        false,
        all_mut(&mut scr.dxn),
        false,
    );
    norm::backward(
        be,
        all(&a.xn2),
        all(&a.rstd2),
        all(&scr.dxn),
        n,
        d,
        all_mut(&mut scr.dresid),
        true,
    );
}
