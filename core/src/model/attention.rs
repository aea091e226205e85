//! The attention half of a block: x += c_proj(attn(rotary+QK-norm(q, k), v)) with q, k, v = linear(rmsnorm(x)).

use super::kv_cache::KvLayer;
use super::{all, all_mut, gemm_input, head, head_mut, norm, BlockParams, GradScratch, LayerActs, LayerShapes};
use crate::backend::{AttnShape, Backend, View, ViewMut};
use crate::config::RMSNORM_EPS;

fn shape(s: &LayerShapes, batch: usize, t: usize) -> AttnShape {
    AttnShape::causal(batch, t, s.n_head, s.n_kv_head, s.head_dim)
}

/// Forward over `s.n` = batch x t tokens: reads `resid`, saves into `a`, adds the branch output into `resid`.
/// `scr.dq` / `scr.dk` serve as scratch for q and k before rotary and QK-norm. Only the first `s.n` tokens'
/// rows of each buffer are touched, so a forward over fewer tokens than the buffers hold (decoding) runs on
/// them too. With `kv` (one sequence, batch 1), the new tokens sit at positions kv.pos0.., their k and v are
/// written into the cache at those rows and attention reads every cached row (the KV-cached decode); without,
/// positions start at 0 and attention reads this call's k and v (training, evaluation).
#[allow(clippy::too_many_arguments)]
pub fn forward<B: Backend>(
    be: &B,
    s: &LayerShapes,
    batch: usize,
    t: usize,
    params: &B::Buf,
    w: &BlockParams,
    resid: &mut B::Buf,
    a: &mut LayerActs<B>,
    scr: &mut GradScratch<B>,
    rope: &B::Buf,
    kv: Option<KvLayer<'_, B>>,
) {
    let (n, d, qd, kvd, hd) = (s.n, s.d, s.qd, s.kvd, s.head_dim);
    let (h, hkv) = (s.n_head, s.n_kv_head);
    let pos0 = kv.as_ref().map_or(0, |c| c.pos0);
    norm::forward(
        be,
        head(resid, n * d),
        n,
        d,
        head_mut(&mut a.xn1, n * d),
        head_mut(&mut a.rstd1, n),
    );
    let xn1 = head::<B>(&a.xn1, n * d);
    be.matmul(
        n,
        qd,
        d,
        xn1,
        false,
        View::at(params, w.c_q, qd * d),
        true,
        head_mut(&mut scr.dq, n * qd),
        false,
    );
    be.matmul(
        n,
        kvd,
        d,
        xn1,
        false,
        View::at(params, w.c_k, kvd * d),
        true,
        head_mut(&mut scr.dk, n * kvd),
        false,
    );
    be.matmul(
        n,
        kvd,
        d,
        xn1,
        false,
        View::at(params, w.c_v, kvd * d),
        true,
        head_mut(&mut a.v, n * kvd),
        false,
    );
    // Rotary, then QK-norm (rmsnorm over the head dim), as one fused op: the rotated value is not stored.
    be.rotary_qknorm_forward(
        head_mut(&mut scr.dq, n * qd),
        batch,
        t,
        h,
        hd,
        pos0,
        all(rope),
        RMSNORM_EPS,
        head_mut(&mut a.q, n * qd),
        head_mut(&mut a.rstd_q, n * h),
    );
    be.rotary_qknorm_forward(
        head_mut(&mut scr.dk, n * kvd),
        batch,
        t,
        hkv,
        hd,
        pos0,
        all(rope),
        RMSNORM_EPS,
        head_mut(&mut a.k, n * kvd),
        head_mut(&mut a.rstd_k, n * hkv),
    );
    let (q, y, lse) = (
        head(&a.q, n * qd),
        head_mut(&mut a.y, n * qd),
        head_mut(&mut a.lse, n * h),
    );
    match kv {
        None => be.attention_forward(shape(s, batch, t), q, head(&a.k, n * kvd), head(&a.v, n * kvd), y, lse),
        Some(c) => {
            assert_eq!(batch, 1, "a KV cache holds one sequence");
            be.copy(head(&a.k, n * kvd), ViewMut::at(&mut *c.k, pos0 * kvd, n * kvd));
            be.copy(head(&a.v, n * kvd), ViewMut::at(&mut *c.v, pos0 * kvd, n * kvd));
            let cached = (pos0 + t) * kvd;
            let shape = AttnShape {
                tk: pos0 + t,
                q_pos0: pos0,
                ..shape(s, 1, t)
            };
            be.attention_forward(shape, q, head(&*c.k, cached), head(&*c.v, cached), y, lse);
        }
    }
    // Residual add fused into c_proj's GEMM (accumulate).
    be.matmul(
        n,
        d,
        qd,
        head(&a.y, n * qd),
        false,
        View::at(params, w.attn_proj, d * qd),
        true,
        head_mut(resid, n * d),
        true,
    );
}

/// Backward: `scr.dresid` holds dL/d(resid after this half); on return it holds dL/d(resid before it).
/// Parameter grads accumulate into `grads`. The phases mirror the forward in reverse.
#[allow(clippy::too_many_arguments)]
pub fn backward<B: Backend>(
    be: &B,
    s: &LayerShapes,
    batch: usize,
    t: usize,
    params: &B::Buf,
    grads: &mut B::Buf,
    w: &BlockParams,
    a: &LayerActs<B>,
    scr: &mut GradScratch<B>,
    rope: &B::Buf,
) {
    scr.cast_dresid(be);
    output_projection_backward(be, s, params, grads, w, a, scr);
    attention_and_rotary_backward(be, s, batch, t, a, scr, rope);
    qkv_projections_backward(be, s, params, grads, w, a, scr);
    // The norm's grad joins the residual grad flowing past the branch.
    norm::backward(
        be,
        all(&a.xn1),
        all(&a.rstd1),
        all(&scr.dxn),
        s.n,
        s.d,
        all_mut(&mut scr.dresid),
        true,
    );
}

/// c_proj: `scr.dy` = dresid W; its weight grad accumulates dresid^T y.
fn output_projection_backward<B: Backend>(
    be: &B,
    s: &LayerShapes,
    params: &B::Buf,
    grads: &mut B::Buf,
    w: &BlockParams,
    a: &LayerActs<B>,
    scr: &mut GradScratch<B>,
) {
    let (n, d, qd) = (s.n, s.d, s.qd);
    let wv = |off: usize, len: usize| View::<B>::at(params, off, len);
    let dres = gemm_input::<B>(&scr.dresid, &scr.dresid_cast);
    be.matmul(
        n,
        qd,
        d,
        all(dres),
        false,
        wv(w.attn_proj, d * qd),
        false,
        all_mut(&mut scr.dy),
        false,
    );
    be.matmul(
        d,
        qd,
        n,
        all(dres),
        true,
        all(&a.y),
        false,
        ViewMut::at(grads, w.attn_proj, d * qd),
        true,
    );
}

/// Attention itself (dy -> the grads of q, k, v after rotary and QK-norm), then back through the fused
/// rotary + QK-norm: `scr.dq`, `scr.dk`, `scr.dv` are the projections' output grads.
fn attention_and_rotary_backward<B: Backend>(
    be: &B,
    s: &LayerShapes,
    batch: usize,
    t: usize,
    a: &LayerActs<B>,
    scr: &mut GradScratch<B>,
    rope: &B::Buf,
) {
    let hd = s.head_dim;
    be.attention_backward(
        shape(s, batch, t),
        all(&a.q),
        all(&a.k),
        all(&a.v),
        all(&a.y),
        all(&a.lse),
        all(&scr.dy),
        all_mut(&mut scr.dqn),
        all_mut(&mut scr.dkn),
        all_mut(&mut scr.dv),
    );
    // Through QK-norm and rotary (fused, the mirror of the forward).
    be.rotary_qknorm_backward(
        all(&a.q),
        all(&a.rstd_q),
        all(&scr.dqn),
        batch,
        t,
        s.n_head,
        hd,
        0,
        all(rope),
        all_mut(&mut scr.dq),
    );
    be.rotary_qknorm_backward(
        all(&a.k),
        all(&a.rstd_k),
        all(&scr.dkn),
        batch,
        t,
        s.n_kv_head,
        hd,
        0,
        all(rope),
        all_mut(&mut scr.dk),
    );
}

/// q, k, v projections: their weight grads accumulate dout^T xn1; `scr.dxn` = the sum of dout W.
fn qkv_projections_backward<B: Backend>(
    be: &B,
    s: &LayerShapes,
    params: &B::Buf,
    grads: &mut B::Buf,
    w: &BlockParams,
    a: &LayerActs<B>,
    scr: &mut GradScratch<B>,
) {
    let (n, d, qd, kvd) = (s.n, s.d, s.qd, s.kvd);
    let wv = |off: usize, len: usize| View::<B>::at(params, off, len);
    be.matmul(
        qd,
        d,
        n,
        all(&scr.dq),
        true,
        all(&a.xn1),
        false,
        ViewMut::at(grads, w.c_q, qd * d),
        true,
    );
    be.matmul(
        kvd,
        d,
        n,
        all(&scr.dk),
        true,
        all(&a.xn1),
        false,
        ViewMut::at(grads, w.c_k, kvd * d),
        true,
    );
    be.matmul(
        kvd,
        d,
        n,
        all(&scr.dv),
        true,
        all(&a.xn1),
        false,
        ViewMut::at(grads, w.c_v, kvd * d),
        true,
    );
    be.matmul(
        n,
        d,
        qd,
        all(&scr.dq),
        false,
        wv(w.c_q, qd * d),
        false,
        all_mut(&mut scr.dxn),
        false,
    );
    be.matmul(
        n,
        d,
        kvd,
        all(&scr.dk),
        false,
        wv(w.c_k, kvd * d),
        false,
        all_mut(&mut scr.dxn),
        true,
    );
    be.matmul(
        n,
        d,
        kvd,
        all(&scr.dv),
        false,
        wv(w.c_v, kvd * d),
        false,
        all_mut(&mut scr.dxn),
        true,
    );
}
