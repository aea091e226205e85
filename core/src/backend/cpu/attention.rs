//! Causal attention with GQA, flash-attention style: tiles of BQ queries x BK keys, online softmax.
//!
//! No (T x T) score matrix exists: each task holds one BQ x BK tile of scores at a time. The forward saves
//! the log-sum-exp of each query row; the backward recomputes the probabilities tile by tile from it.
//! Tile products run through `gemm` on the calling thread; parallelism is across tiles/heads.

use super::matmul::gemm_raw;
use super::SendPtr;
use crate::backend::AttnShape;
use gemm::Parallelism;
use rayon::prelude::*;
use std::cell::RefCell;

const BQ: usize = 64;
const BK: usize = 64;

thread_local! {
    // Per-thread tile scratch, grown once and then reused (no allocation per step once warm).
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < len {
            s.resize(len, 0.0);
        }
        f(&mut s[..len])
    })
}

fn check(s: &AttnShape, q: usize, k: usize, v: usize, out: usize, lse: usize) {
    assert!(
        s.n_head.is_multiple_of(s.n_kv_head),
        "attention: n_kv_head must divide n_head"
    );
    assert!(s.q_pos0 + s.tq <= s.tk, "attention: queries reach past the keys");
    assert!(q >= s.q_len() && out >= s.q_len(), "attention: q/out views too short");
    assert!(k >= s.kv_len() && v >= s.kv_len(), "attention: k/v views too short");
    assert!(lse >= s.lse_len(), "attention: lse view too short");
}

pub fn forward(s: AttnShape, q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], lse: &mut [f32]) {
    check(&s, q.len(), k.len(), v.len(), out.len(), lse.len());
    let AttnShape {
        batch,
        tq,
        tk,
        n_head: h,
        n_kv_head: hkv,
        head_dim: d,
        q_pos0,
    } = s;
    let group = h / hkv;
    let scale = 1.0 / (d as f32).sqrt();
    let n_qt = tq.div_ceil(BQ);
    let (qp, kp, vp) = (q.as_ptr() as usize, k.as_ptr() as usize, v.as_ptr() as usize);
    let (outp, lsep) = (SendPtr(out.as_mut_ptr()), SendPtr(lse.as_mut_ptr()));
    (0..batch * h * n_qt).into_par_iter().for_each(|task| {
        let (outp, lsep) = (outp, lsep);
        let qt = task % n_qt;
        let hh = (task / n_qt) % h;
        let bb = task / (n_qt * h);
        let kvh = hh / group;
        let i0 = qt * BQ;
        let bq = BQ.min(tq - i0);
        // Keys visible to the last row of this tile (exclusive end).
        let kend = q_pos0 + i0 + bq;
        with_scratch(BQ * BK + BQ * d + 2 * BQ, |scr| {
            let (sc, rest) = scr.split_at_mut(BQ * BK);
            let (acc, rest) = rest.split_at_mut(BQ * d);
            let (m, l) = rest.split_at_mut(BQ);
            acc.fill(0.0);
            m.fill(f32::NEG_INFINITY);
            l.fill(0.0);
            // SAFETY: offsets stay inside q/k/v (checked lengths); this task writes only its own rows
            // (bb, i0..i0+bq, hh) of out and lse, which no other task touches.
            unsafe {
                let qptr = (qp as *const f32).add(((bb * tq + i0) * h + hh) * d);
                for j0 in (0..kend).step_by(BK) {
                    let bk = BK.min(kend - j0);
                    let kptr = (kp as *const f32).add(((bb * tk + j0) * hkv + kvh) * d);
                    let vptr = (vp as *const f32).add(((bb * tk + j0) * hkv + kvh) * d);
                    let krs = (hkv * d) as isize;
                    // S = Q K^T (bq x bk)
                    let (qrs, none) = ((h * d) as isize, Parallelism::None);
                    gemm_raw(
                        bq,
                        bk,
                        d,
                        qptr,
                        qrs,
                        1,
                        kptr,
                        1,
                        krs,
                        sc.as_mut_ptr(),
                        BK as isize,
                        false,
                        1.0,
                        none,
                    );
                    for r in 0..bq {
                        let last_key = q_pos0 + i0 + r;
                        let row = &mut sc[r * BK..r * BK + bk];
                        let mut mx = m[r];
                        for (c, x) in row.iter_mut().enumerate() {
                            if j0 + c > last_key {
                                *x = f32::NEG_INFINITY;
                            } else {
                                *x *= scale;
                                mx = mx.max(*x);
                            }
                        }
                        // Every row sees key 0 in the first tile, so mx is finite here.
                        let corr = (m[r] - mx).exp();
                        let mut sum = 0.0;
                        for x in row.iter_mut() {
                            *x = (*x - mx).exp();
                            sum += *x;
                        }
                        l[r] = l[r] * corr + sum;
                        m[r] = mx;
                        for a in &mut acc[r * d..(r + 1) * d] {
                            *a *= corr;
                        }
                    }
                    // acc += P V (bq x d)
                    gemm_raw(
                        bq,
                        d,
                        bk,
                        sc.as_ptr(),
                        BK as isize,
                        1,
                        vptr,
                        krs,
                        1,
                        acc.as_mut_ptr(),
                        d as isize,
                        true,
                        1.0,
                        none,
                    );
                }
                for r in 0..bq {
                    let o = outp.0.add(((bb * tq + i0 + r) * h + hh) * d);
                    let inv = 1.0 / l[r];
                    for c in 0..d {
                        *o.add(c) = acc[r * d + c] * inv;
                    }
                    *lsep.0.add((bb * h + hh) * tq + i0 + r) = m[r] + l[r].ln();
                }
            }
        });
    });
}

#[allow(clippy::too_many_arguments)]
pub fn backward(
    s: AttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    check(&s, q.len(), k.len(), v.len(), out.len(), lse.len());
    assert!(
        s.tq == s.tk && s.q_pos0 == 0,
        "attention backward supports the training shape only"
    );
    assert!(
        dout.len() >= s.q_len() && dq.len() >= s.q_len(),
        "attention backward: dout/dq too short"
    );
    assert!(
        dk.len() >= s.kv_len() && dv.len() >= s.kv_len(),
        "attention backward: dk/dv too short"
    );
    let AttnShape {
        batch,
        tq: t,
        n_head: h,
        n_kv_head: hkv,
        head_dim: d,
        ..
    } = s;
    let group = h / hkv;
    let scale = 1.0 / (d as f32).sqrt();
    let addr = |x: &[f32]| x.as_ptr() as usize;
    let (qp, kp, vp, op, lp, dop) = (addr(q), addr(k), addr(v), addr(out), addr(lse), addr(dout));
    let (dqp, dkp, dvp) = (
        SendPtr(dq.as_mut_ptr()),
        SendPtr(dk.as_mut_ptr()),
        SendPtr(dv.as_mut_ptr()),
    );
    let (qrs, krs) = ((h * d) as isize, (hkv * d) as isize);
    let none = Parallelism::None;
    // One task per (batch, kv head): it owns dk/dv of that kv head and dq of the query heads sharing it.
    (0..batch * hkv).into_par_iter().for_each(|task| {
        let (dqp, dkp, dvp) = (dqp, dkp, dvp);
        let (bb, kvh) = (task / hkv, task % hkv);
        with_scratch(group * t + 2 * BQ * BK, |scr| {
            let (dvec, rest) = scr.split_at_mut(group * t);
            let (p, ds) = rest.split_at_mut(BQ * BK);
            // SAFETY: reads stay inside the checked inputs; writes touch only rows (bb, *, kvh) of dk/dv and
            // (bb, *, kvh*group..(kvh+1)*group) of dq, owned by this task alone.
            unsafe {
                let kv_row = |j: usize| ((bb * t + j) * hkv + kvh) * d;
                let q_row = |i: usize, hh: usize| ((bb * t + i) * h + hh) * d;
                for j in 0..t {
                    std::ptr::write_bytes(dkp.0.add(kv_row(j)), 0, d);
                    std::ptr::write_bytes(dvp.0.add(kv_row(j)), 0, d);
                }
                for g in 0..group {
                    let hh = kvh * group + g;
                    for i in 0..t {
                        std::ptr::write_bytes(dqp.0.add(q_row(i, hh)), 0, d);
                        // D_i = rowsum(dO_i * O_i): the softmax backward's per-row correction.
                        let o = std::slice::from_raw_parts((op as *const f32).add(q_row(i, hh)), d);
                        let g_o = std::slice::from_raw_parts((dop as *const f32).add(q_row(i, hh)), d);
                        dvec[g * t + i] = o.iter().zip(g_o).map(|(a, b)| a * b).sum();
                    }
                }
                for j0 in (0..t).step_by(BK) {
                    let bk = BK.min(t - j0);
                    let kptr = (kp as *const f32).add(kv_row(j0));
                    let vptr = (vp as *const f32).add(kv_row(j0));
                    let dkptr = dkp.0.add(kv_row(j0));
                    let dvptr = dvp.0.add(kv_row(j0));
                    for g in 0..group {
                        let hh = kvh * group + g;
                        let lse_h = (lp as *const f32).add((bb * h + hh) * t);
                        // Query tiles that can see key j0 start at the tile holding row j0.
                        for i0 in ((j0 / BQ) * BQ..t).step_by(BQ) {
                            let bq = BQ.min(t - i0);
                            let qptr = (qp as *const f32).add(q_row(i0, hh));
                            let doptr = (dop as *const f32).add(q_row(i0, hh));
                            let dqptr = dqp.0.add(q_row(i0, hh));
                            // P = exp(scale * Q K^T - lse), causal-masked.
                            gemm_raw(
                                bq,
                                bk,
                                d,
                                qptr,
                                qrs,
                                1,
                                kptr,
                                1,
                                krs,
                                p.as_mut_ptr(),
                                BK as isize,
                                false,
                                1.0,
                                none,
                            );
                            for r in 0..bq {
                                let lse_r = *lse_h.add(i0 + r);
                                for c in 0..bk {
                                    let x = &mut p[r * BK + c];
                                    *x = if j0 + c > i0 + r {
                                        0.0
                                    } else {
                                        (*x * scale - lse_r).exp()
                                    };
                                }
                            }
                            // dV_j += P^T dO_i
                            gemm_raw(
                                bk,
                                d,
                                bq,
                                p.as_ptr(),
                                1,
                                BK as isize,
                                doptr,
                                qrs,
                                1,
                                dvptr,
                                krs,
                                true,
                                1.0,
                                none,
                            );
                            // dP = dO_i V_j^T
                            gemm_raw(
                                bq,
                                bk,
                                d,
                                doptr,
                                qrs,
                                1,
                                vptr,
                                1,
                                krs,
                                ds.as_mut_ptr(),
                                BK as isize,
                                false,
                                1.0,
                                none,
                            );
                            // dS = P * (dP - D_i); the score scale is folded into the two products below.
                            for r in 0..bq {
                                let di = dvec[g * t + i0 + r];
                                for c in 0..bk {
                                    ds[r * BK + c] = p[r * BK + c] * (ds[r * BK + c] - di);
                                }
                            }
                            // dQ_i += scale * dS K_j ; dK_j += scale * dS^T Q_i
                            gemm_raw(
                                bq,
                                d,
                                bk,
                                ds.as_ptr(),
                                BK as isize,
                                1,
                                kptr,
                                krs,
                                1,
                                dqptr,
                                qrs,
                                true,
                                scale,
                                none,
                            );
                            gemm_raw(
                                bk,
                                d,
                                bq,
                                ds.as_ptr(),
                                1,
                                BK as isize,
                                qptr,
                                qrs,
                                1,
                                dkptr,
                                krs,
                                true,
                                scale,
                                none,
                            );
                        }
                    }
                }
            }
        });
    });
}
