//! The attention half of a block: x += c_proj(attn(rotary+QK-norm(q, k), v)) with q, k, v = linear(rmsnorm(x)).

use super::kv_cache::KvLayer;
use super::linear::Linear;
use super::{all, all_mut, gemm_input, head, head_mut, norm, BlockParams, GradScratch, LayerActs, LayerShapes};
use crate::backend::{AttnShape, Backend, Heads, View, ViewMut};
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
    Linear::new(n, qd, d, w.c_q).forward(be, params, xn1, head_mut(&mut scr.dq, n * qd), false);
    Linear::new(n, kvd, d, w.c_k).forward(be, params, xn1, head_mut(&mut scr.dk, n * kvd), false);
    Linear::new(n, kvd, d, w.c_v).forward(be, params, xn1, head_mut(&mut a.v, n * kvd), false);
    // Rotary, then QK-norm (rmsnorm over the head dim), as one fused op: the rotated value is not stored.
    // For q's heads, then k's: `x` (pre-rotary) -> `y`, with the QK-norm rstd per (token, head).
    let rotary_qknorm = |x: &mut B::Buf, heads: usize, y: &mut B::Buf, rstd: &mut B::Buf| {
        let (x, y, rstd) = (
            head_mut(x, n * heads * hd),
            head_mut(y, n * heads * hd),
            head_mut(rstd, n * heads),
        );
        let shape = Heads::new(batch, t, heads, hd).from_position(pos0);
        be.rotary_qknorm_forward(x, shape, all(rope), RMSNORM_EPS, y, rstd)
    };
    rotary_qknorm(&mut scr.dq, h, &mut a.q, &mut a.rstd_q);
    rotary_qknorm(&mut scr.dk, hkv, &mut a.k, &mut a.rstd_k);
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
    Linear::new(n, d, qd, w.attn_proj).forward(be, params, head(&a.y, n * qd), head_mut(resid, n * d), true);
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
    // c_proj: `scr.dy` = dresid W; its weight grad accumulates dresid^T y.
    scr.cast_dresid(be);
    let dres = all(gemm_input::<B>(&scr.dresid, &scr.dresid_cast));
    let proj = Linear::new(s.n, s.d, s.qd, w.attn_proj);
    proj.backward_input(be, params, dres, all_mut(&mut scr.dy), false);
    proj.backward_weight(be, dres, all(&a.y), grads);
    attention_and_rotary_backward(be, s, batch, t, a, scr, rope);
    qkv_projections_backward(be, s, params, grads, w, a, scr);
    // The norm's grad joins the residual grad flowing past the branch.
    let (xn1, rstd1, dxn) = (all(&a.xn1), all(&a.rstd1), all(&scr.dxn));
    be.rmsnorm_backward(xn1, rstd1, dxn, s.n, s.d, all_mut(&mut scr.dresid), true);
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
    // Through QK-norm and rotary (fused, the mirror of the forward), for q's heads, then k's.
    let (h, hkv) = (s.n_head, s.n_kv_head);
    let back = |y: View<'_, B>, rstd: View<'_, B>, dy: View<'_, B>, heads: usize, dx: ViewMut<'_, B>| {
        be.rotary_qknorm_backward(y, rstd, dy, Heads::new(batch, t, heads, hd), all(rope), dx)
    };
    back(all(&a.q), all(&a.rstd_q), all(&scr.dqn), h, all_mut(&mut scr.dq));
    back(all(&a.k), all(&a.rstd_k), all(&scr.dkn), hkv, all_mut(&mut scr.dk));
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
    let (q, k, v) = (
        Linear::new(n, qd, d, w.c_q),
        Linear::new(n, kvd, d, w.c_k),
        Linear::new(n, kvd, d, w.c_v),
    );
    q.backward_weight(be, all(&scr.dq), all(&a.xn1), grads);
    k.backward_weight(be, all(&scr.dk), all(&a.xn1), grads);
    v.backward_weight(be, all(&scr.dv), all(&a.xn1), grads);
    // dxn sums the three projections' input grads: the first writes, the others add.
    q.backward_input(be, params, all(&scr.dq), all_mut(&mut scr.dxn), false);
    k.backward_input(be, params, all(&scr.dk), all_mut(&mut scr.dxn), true);
    v.backward_input(be, params, all(&scr.dv), all_mut(&mut scr.dxn), true);
}
