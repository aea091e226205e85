//! Causal attention with GQA, flash-attention style: tiles of BQ queries x BK keys, online softmax.
//!
//! No (T x T) score matrix exists: each task holds one BQ x BK tile of scores at a time. The forward saves
//! the log-sum-exp of each query row; the backward recomputes the probabilities tile by tile from it.
//! Tile products run through `gemm` on the calling thread; parallelism is across tiles/heads.
//!
//! As the CPU twin of the bf16 engine it can also round where the device's flash kernels round
//! (`ProbOperands::Bf16`): their second products run on tensor cores, which take bf16 operands, so the
//! probabilities P (forward: P V; backward: P^T dO) and dS (dS K, dS^T Q) are rounded to bf16 first, as
//! FlashAttention-2 does. What is rounded is exactly what the kernel rounds: in the forward, P relative to the
//! running max of the keys up to the end of its 64-key tile (the kernel's tile is 64 keys too), with the
//! softmax sum l taken over the unrounded values; in the backward, P = exp(scale s - lse) and dS = P (dP - D)
//! from the unrounded P. The f32 path (`ProbOperands::F32`) is unchanged, bit for bit.

use super::bf16_slice::round_slice_bf16;
use super::isa::isa_dispatched;
use super::loss::{exp, lane_sum};
use super::matmul::gemm_raw;
use super::SendPtr;
use crate::backend::AttnShape;
use gemm::Parallelism;
use rayon::prelude::*;
use std::cell::RefCell;

const BQ: usize = 64;
/// Keys per forward tile: also the flash forward kernel's (FWD_BK in flash_attention.cu), which the bf16
/// rounding of P depends on (P is taken relative to the running max at the end of its tile).
const BK: usize = 64;

/// What the products after the softmax take as P and dS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbOperands {
    /// f32 values (the CPU backend, and the device's f32 kernels).
    F32,
    /// Values rounded to bf16 (the device's bf16 flash kernels; see the module comment).
    Bf16,
}

/// Rounds the first `bk` columns of the first `rows` rows of a tile of row stride `BK`, when the products
/// take bf16 operands.
fn round_tile(tile: &mut [f32], rows: usize, bk: usize, operands: ProbOperands) {
    if operands == ProbOperands::Bf16 {
        for r in 0..rows {
            round_slice_bf16(&mut tile[r * BK..r * BK + bk]);
        }
    }
}

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

isa_dispatched! {
    /// One query row of a forward tile, in place: the first `visible` scores scaled, the rest masked. Returns
    /// the new running max (of `m_old` and the visible scores) and the sum of the row's exp(score - max),
    /// which the row now holds (masked columns 0).
    fn softmax_row / softmax_row_at(row: &mut [f32], visible: usize, scale: f32, m_old: f32) -> (f32, f32)
        => softmax_row_body
}

/// The visible part goes through the branch-free exp of the loss (its argument is <= 0 here), which
/// vectorizes, unlike libm's expf; max and sum run in independent lanes for the same reason.
#[inline(always)]
fn softmax_row_body(row: &mut [f32], visible: usize, scale: f32, m_old: f32) -> (f32, f32) {
    let (seen, hidden) = row.split_at_mut(visible);
    seen.iter_mut().for_each(|x| *x *= scale);
    let mx = lane_max(seen).max(m_old);
    seen.iter_mut().for_each(|x| *x = exp(*x - mx));
    hidden.fill(0.0);
    (mx, lane_sum(seen))
}

isa_dispatched! {
    /// One query row of a backward tile, in place: scores to probabilities exp(scale s - lse) for the first
    /// `visible` columns, 0 for the masked rest.
    fn probs_row / probs_row_at(row: &mut [f32], visible: usize, scale: f32, lse: f32) => probs_row_body
}

#[inline(always)]
fn probs_row_body(row: &mut [f32], visible: usize, scale: f32, lse: f32) {
    let (seen, hidden) = row.split_at_mut(visible);
    // scale s <= lse up to rounding; exp clamps a rounding excess above 0 to exp(0) = 1.
    seen.iter_mut().for_each(|x| *x = exp(*x * scale - lse));
    hidden.fill(0.0);
}

isa_dispatched! {
    /// dS = P (dP - D) for one row (`ds` holds dP on entry).
    fn ds_row / ds_row_at(p: &[f32], ds: &mut [f32], d: f32) => ds_row_body
}

#[inline(always)]
fn ds_row_body(p: &[f32], ds: &mut [f32], d: f32) {
    ds.iter_mut().zip(p).for_each(|(x, &p)| *x = p * (*x - d));
}

/// Max of `x` (-inf when empty) in 16 independent lanes, so it vectorizes; max is exact, so the lanes do not
/// change the result.
#[inline(always)]
fn lane_max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = l.max(v);
        }
    }
    lanes.iter().fold(tail, |a, &b| a.max(b))
}

pub fn forward(
    s: AttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    lse: &mut [f32],
    operands: ProbOperands,
) {
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
                        // Keys j0.. of this tile the row may see (causal): up to and including its own position.
                        let visible = (q_pos0 + i0 + r + 1).saturating_sub(j0).min(bk);
                        let row = &mut sc[r * BK..r * BK + bk];
                        let (mx, sum) = softmax_row(row, visible, scale, m[r]);
                        // Every row sees key 0 in the first tile, so mx is finite here.
                        let corr = (m[r] - mx).exp();
                        l[r] = l[r] * corr + sum;
                        m[r] = mx;
                        for a in &mut acc[r * d..(r + 1) * d] {
                            *a *= corr;
                        }
                    }
                    // After the sums: l is the sum of the unrounded values, as the kernel's.
                    round_tile(sc, bq, bk, operands);
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
    operands: ProbOperands,
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
                            let tile = TilePtrs {
                                q: (qp as *const f32).add(q_row(i0, hh)),
                                dout: (dop as *const f32).add(q_row(i0, hh)),
                                dq: dqp.0.add(q_row(i0, hh)),
                                k: kptr,
                                v: vptr,
                                dk: dkptr,
                                dv: dvptr,
                                q_stride: qrs,
                                kv_stride: krs,
                            };
                            let lse_rows = std::slice::from_raw_parts(lse_h.add(i0), bq);
                            let d_rows = &dvec[g * t + i0..g * t + i0 + bq];
                            backward_tile(&tile, (i0, j0, bq, bk, d), lse_rows, d_rows, scale, operands, p, ds);
                        }
                    }
                }
            }
        });
    });
}

/// One query head's rows i0..i0+bq and one kv head's rows j0..j0+bk of the backward's inputs and gradients.
struct TilePtrs {
    q: *const f32,
    dout: *const f32,
    dq: *mut f32,
    k: *const f32,
    v: *const f32,
    dk: *mut f32,
    dv: *mut f32,
    q_stride: isize,
    kv_stride: isize,
}

/// One (query tile, key tile) step of the backward: P from the saved lse, dP, dS, then dV, dQ and dK
/// accumulated into the tile's rows. `lse_rows` and `d_rows` (D_i = rowsum(dO_i * O_i)) are the query rows'.
///
/// # Safety
/// The pointers cover bq (query side) and bk (kv side) rows of d values at their strides, and no other thread
/// writes the tile's dq, dk and dv rows meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn backward_tile(
    tile: &TilePtrs,
    (i0, j0, bq, bk, d): (usize, usize, usize, usize, usize),
    lse_rows: &[f32],
    d_rows: &[f32],
    scale: f32,
    operands: ProbOperands,
    p: &mut [f32],
    ds: &mut [f32],
) {
    let (qrs, krs) = (tile.q_stride, tile.kv_stride);
    let none = Parallelism::None;
    // P = exp(scale * Q K^T - lse), causal-masked.
    gemm_raw(
        bq,
        bk,
        d,
        tile.q,
        qrs,
        1,
        tile.k,
        1,
        krs,
        p.as_mut_ptr(),
        BK as isize,
        false,
        1.0,
        none,
    );
    for r in 0..bq {
        let visible = (i0 + r + 1).saturating_sub(j0).min(bk);
        probs_row(&mut p[r * BK..r * BK + bk], visible, scale, lse_rows[r]);
    }
    // dP = dO_i V_j^T
    gemm_raw(
        bq,
        bk,
        d,
        tile.dout,
        qrs,
        1,
        tile.v,
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
        let di = d_rows[r];
        ds_row(&p[r * BK..r * BK + bk], &mut ds[r * BK..r * BK + bk], di);
    }
    // dV_j += P^T dO_i, after dS took the unrounded P (the order does not change the f32
    // path: the two use P independently).
    round_tile(p, bq, bk, operands);
    gemm_raw(
        bk,
        d,
        bq,
        p.as_ptr(),
        1,
        BK as isize,
        tile.dout,
        qrs,
        1,
        tile.dv,
        krs,
        true,
        1.0,
        none,
    );
    round_tile(ds, bq, bk, operands);
    // dQ_i += scale * dS K_j ; dK_j += scale * dS^T Q_i
    gemm_raw(
        bq,
        d,
        bk,
        ds.as_ptr(),
        BK as isize,
        1,
        tile.k,
        krs,
        1,
        tile.dq,
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
        tile.q,
        qrs,
        1,
        tile.dk,
        krs,
        true,
        scale,
        none,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::isa::{assert_same_bits, levels_here, test_values};

    /// The row kernels' copies (baseline, AVX2, AVX-512) give the same bits for every visible count of a
    /// full and a tail tile (tails of every length mod 8 and 16), and the forward row's result is the
    /// softmax numerator it claims to be: masked columns exactly 0, the max of the visible scores and the old
    /// max, and exp(score - max) within the fast exp's 2e-7 of f64.
    #[test]
    fn row_kernels_agree_across_levels_and_compute_the_softmax() {
        let levels = levels_here();
        let scale = 0.088;
        for bk in [BK, 41] {
            for visible in [0, 1, 7, 8, 15, 16, 17, 33, bk - 1, bk] {
                let scores = test_values(bk, visible as u64 + 7 * bk as u64);
                let dp = test_values(bk, 99 + visible as u64);
                for m_old in [f32::NEG_INFINITY, 0.5, 4.0] {
                    let mut first: Option<(Vec<f32>, (f32, f32))> = None;
                    for &level in &levels {
                        let mut row = scores.clone();
                        let (mx, sum) = softmax_row_at(level, &mut row, visible, scale, m_old);
                        match &first {
                            None => first = Some((row.clone(), (mx, sum))),
                            Some((r0, (mx0, sum0))) => {
                                assert_same_bits(&format!("softmax_row {level:?} bk {bk} visible {visible}"), &row, r0);
                                assert_eq!((mx.to_bits(), sum.to_bits()), (mx0.to_bits(), sum0.to_bits()));
                            }
                        }
                        if visible == 0 && m_old == f32::NEG_INFINITY {
                            continue;
                        }
                        let want_max = scores[..visible].iter().map(|&x| x * scale).fold(m_old, f32::max);
                        assert_eq!(mx, want_max, "max, visible {visible}");
                        let mut want_sum = 0.0f64;
                        for c in 0..bk {
                            if c >= visible {
                                assert_eq!(row[c].to_bits(), 0, "masked column {c} of {visible}");
                                continue;
                            }
                            let want = ((scores[c] * scale - mx) as f64).exp();
                            want_sum += want;
                            assert!(
                                (row[c] as f64 - want).abs() <= 2e-7 * want,
                                "column {c}: {} vs {want}",
                                row[c]
                            );
                        }
                        assert!(
                            (sum as f64 - want_sum).abs() <= 1e-6 * want_sum,
                            "sum {sum} vs {want_sum}"
                        );
                    }
                    let mut first_p: Option<(Vec<f32>, Vec<f32>)> = None;
                    for &level in &levels {
                        let mut p = scores.clone();
                        probs_row_at(level, &mut p, visible, scale, 3.0);
                        let mut ds = dp.clone();
                        ds_row_at(level, &p, &mut ds, 0.25);
                        match &first_p {
                            None => first_p = Some((p, ds)),
                            Some((p0, ds0)) => {
                                assert_same_bits(&format!("probs_row {level:?} visible {visible}"), &p, p0);
                                assert_same_bits(&format!("ds_row {level:?} visible {visible}"), &ds, ds0);
                            }
                        }
                    }
                }
            }
        }
    }
}
