//! Weightless rmsnorm (used for the residual stream and, per head, for QK-norm) and rotary embeddings.

use super::elementwise::ROWS_PER_TASK;
use rayon::prelude::*;

pub fn rmsnorm_forward(x: &[f32], rows: usize, dim: usize, eps: f32, y: &mut [f32], rstd: &mut [f32]) {
    let (x, y, rstd) = (&x[..rows * dim], &mut y[..rows * dim], &mut rstd[..rows]);
    y.par_chunks_mut(dim * ROWS_PER_TASK)
        .zip(rstd.par_chunks_mut(ROWS_PER_TASK))
        .enumerate()
        .for_each(|(c, (y, rstd))| {
            for (r, (y, rstd)) in y.chunks_mut(dim).zip(rstd.iter_mut()).enumerate() {
                let row = c * ROWS_PER_TASK + r;
                let x = &x[row * dim..(row + 1) * dim];
                let ms = x.iter().map(|v| v * v).sum::<f32>() / dim as f32;
                let s = 1.0 / (ms + eps).sqrt();
                *rstd = s;
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = x * s;
                }
            }
        });
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
            let s = rstd[row];
            let mean_dyy = y.iter().zip(dy).map(|(a, b)| a * b).sum::<f32>() / dim as f32;
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
    });
}

/// Rotary on x (batch, t, heads, head_dim), in place; `inverse` rotates by the opposite angle (backward).
/// table = [cos (max_pos, half) | sin (max_pos, half)].
#[allow(clippy::too_many_arguments)]
pub fn rotary(
    x: &mut [f32],
    batch: usize,
    t: usize,
    heads: usize,
    head_dim: usize,
    pos0: usize,
    table: &[f32],
    inverse: bool,
) {
    let half = head_dim / 2;
    let max_pos = table.len() / (2 * half);
    assert!(
        pos0 + t <= max_pos,
        "rotary: positions up to {} but the table holds {max_pos}",
        pos0 + t
    );
    let (cos, sin) = table.split_at(max_pos * half);
    let row = heads * head_dim;
    x[..batch * t * row]
        .par_chunks_mut(row)
        .enumerate()
        .for_each(|(bt, xrow)| {
            let p = pos0 + bt % t;
            let cos = &cos[p * half..(p + 1) * half];
            let sin = &sin[p * half..(p + 1) * half];
            for h in xrow.chunks_mut(head_dim) {
                let (x1, x2) = h.split_at_mut(half);
                for j in 0..half {
                    let (a, b) = (x1[j], x2[j]);
                    let (c, s) = (cos[j], if inverse { -sin[j] } else { sin[j] });
                    x1[j] = a * c + b * s;
                    x2[j] = -a * s + b * c;
                }
            }
        });
}
