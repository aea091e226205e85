//! Weightless rmsnorm (used for the residual stream and, per head, for QK-norm) and rotary embeddings.

use super::elementwise::ROWS_PER_TASK;
use super::isa::isa_dispatched;
use crate::backend::Heads;
use rayon::prelude::*;

pub fn rmsnorm_forward(x: &[f32], rows: usize, dim: usize, eps: f32, y: &mut [f32], rstd: &mut [f32]) {
    let (x, y, rstd) = (&x[..rows * dim], &mut y[..rows * dim], &mut rstd[..rows]);
    y.par_chunks_mut(dim * ROWS_PER_TASK)
        .zip(rstd.par_chunks_mut(ROWS_PER_TASK))
        .enumerate()
        .for_each(|(c, (y, rstd))| {
            for (r, (y, rstd)) in y.chunks_mut(dim).zip(rstd.iter_mut()).enumerate() {
                let row = c * ROWS_PER_TASK + r;
                *rstd = rmsnorm_row(&x[row * dim..(row + 1) * dim], eps, y);
            }
        });
}

isa_dispatched! {
    /// y = x / rms(x) for one row; returns 1 / rms. The copy for this process's vector level (same bits).
    fn rmsnorm_row / rmsnorm_row_at(x: &[f32], eps: f32, y: &mut [f32]) -> f32 => rmsnorm_row_body
}

#[inline(always)]
fn rmsnorm_row_body(x: &[f32], eps: f32, y: &mut [f32]) -> f32 {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let s = 1.0 / (ms + eps).sqrt();
    for (y, &x) in y.iter_mut().zip(x) {
        *y = x * s;
    }
    s
}

isa_dispatched! {
    /// dx [+]= s (dy - y mean(dy y)) for one row. The copy for this process's vector level (same bits).
    fn rmsnorm_backward_row / rmsnorm_backward_row_at(y: &[f32], dy: &[f32], s: f32, dx: &mut [f32], accumulate: bool)
        => rmsnorm_backward_row_body
}

#[inline(always)]
fn rmsnorm_backward_row_body(y: &[f32], dy: &[f32], s: f32, dx: &mut [f32], accumulate: bool) {
    let mean_dyy = y.iter().zip(dy).map(|(a, b)| a * b).sum::<f32>() / y.len() as f32;
    if accumulate {
        for ((dx, &y), &dy) in dx.iter_mut().zip(y).zip(dy) {
            *dx += s * (dy - y * mean_dyy);
        }
    } else {
        for ((dx, &y), &dy) in dx.iter_mut().zip(y).zip(dy) {
            *dx = s * (dy - y * mean_dyy);
        }
    }
}

/// dx = rstd * (dy - y * mean(dy * y)); derivation: y = x r, dr/dx = -r^3 x / dim.
pub fn rmsnorm_backward(
    y: &[f32],
    rstd: &[f32],
    dy: &[f32],
    rows: usize,
    dim: usize,
    dx: &mut [f32],
    accumulate: bool,
) {
    let dx = &mut dx[..rows * dim];
    dx.par_chunks_mut(dim * ROWS_PER_TASK).enumerate().for_each(|(c, dx)| {
        for (r, dx) in dx.chunks_mut(dim).enumerate() {
            let row = c * ROWS_PER_TASK + r;
            let y = &y[row * dim..(row + 1) * dim];
            let dy = &dy[row * dim..(row + 1) * dim];
            rmsnorm_backward_row(y, dy, rstd[row], dx, accumulate);
        }
    });
}

/// Rotary on x (batch, t, heads, head_dim), in place; `inverse` rotates by the opposite angle (backward).
/// table = [cos (max_pos, half) | sin (max_pos, half)].
pub fn rotary(x: &mut [f32], shape: Heads, table: &[f32], inverse: bool) {
    let (t, heads, head_dim, pos0) = (shape.t, shape.heads, shape.head_dim, shape.pos0);
    let half = head_dim / 2;
    let max_pos = table.len() / (2 * half);
    assert!(
        pos0 + t <= max_pos,
        "rotary: positions up to {} but the table holds {max_pos}",
        pos0 + t
    );
    let (cos, sin) = table.split_at(max_pos * half);
    let row = heads * head_dim;
    x[..shape.numel()]
        .par_chunks_mut(row)
        .enumerate()
        .for_each(|(bt, xrow)| {
            let p = pos0 + bt % t;
            let cos = &cos[p * half..(p + 1) * half];
            let sin = &sin[p * half..(p + 1) * half];
            rotary_row(xrow, head_dim, cos, sin, inverse);
        });
}

isa_dispatched! {
    /// Rotary on one position's heads (`xrow`: heads x head_dim). The copy for this process's vector level.
    fn rotary_row / rotary_row_at(xrow: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32], inverse: bool)
        => rotary_row_body
}

#[inline(always)]
fn rotary_row_body(xrow: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32], inverse: bool) {
    let half = head_dim / 2;
    for h in xrow.chunks_mut(head_dim) {
        let (x1, x2) = h.split_at_mut(half);
        for j in 0..half {
            let (a, b) = (x1[j], x2[j]);
            let (c, s) = (cos[j], if inverse { -sin[j] } else { sin[j] });
            x1[j] = a * c + b * s;
            x2[j] = -a * s + b * c;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::isa::{assert_same_bits, levels_here, test_values};

    /// rmsnorm (forward, backward written and accumulated) and rotary (both directions) give the same bits in
    /// every copy this CPU can run, for row lengths with tails of every size mod 16.
    #[test]
    fn row_kernels_agree_across_levels() {
        for dim in [2usize, 14, 16, 34, 128, 258] {
            let (x, dy, old) = (test_values(dim, 1), test_values(dim, 2), test_values(dim, 3));
            let table = test_values(dim, 4);
            let (cos, sin) = table.split_at(dim / 2);
            let mut first: Option<Vec<Vec<f32>>> = None;
            for level in levels_here() {
                let mut y = vec![0.0; dim];
                let s = rmsnorm_row_at(level, &x, 1e-6, &mut y);
                let mut dx = vec![0.0; dim];
                rmsnorm_backward_row_at(level, &y, &dy, s, &mut dx, false);
                let mut dx_acc = old.clone();
                rmsnorm_backward_row_at(level, &y, &dy, s, &mut dx_acc, true);
                let (mut fwd, mut inv) = (x.clone(), x.clone());
                rotary_row_at(level, &mut fwd, dim / 2, cos, sin, false);
                rotary_row_at(level, &mut inv, dim / 2, cos, sin, true);
                let got = vec![vec![s], y, dx, dx_acc, fwd, inv];
                match &first {
                    None => first = Some(got),
                    Some(want) => {
                        let names = [
                            "rstd",
                            "rmsnorm y",
                            "rmsnorm dx",
                            "rmsnorm dx accumulated",
                            "rotary",
                            "rotary inverse",
                        ];
                        for ((name, g), w) in names.iter().zip(&got).zip(want) {
                            assert_same_bits(&format!("{name}, {level:?}, dim {dim}"), g, w);
                        }
                    }
                }
            }
        }
    }
}
