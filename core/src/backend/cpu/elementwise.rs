//! Embedding lookup and scatter-add, relu^2, residual add.

use super::isa::isa_dispatched;
use rayon::prelude::*;

/// Rows per rayon task for row-wise kernels: big enough that scheduling is noise.
pub(crate) const ROWS_PER_TASK: usize = 16;

pub fn embedding_forward(ids: &[i32], wte: &[f32], d: usize, out: &mut [f32]) {
    out[..ids.len() * d]
        .par_chunks_mut(d * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(c, rows)| {
            for (r, row) in rows.chunks_mut(d).enumerate() {
                let id = ids[c * ROWS_PER_TASK + r] as usize;
                row.copy_from_slice(&wte[id * d..(id + 1) * d]);
            }
        });
}

/// Sequential on purpose: repeated ids add into the same row, and a fixed order keeps it deterministic.
pub fn embedding_backward(ids: &[i32], dout: &[f32], d: usize, dwte: &mut [f32]) {
    for (i, &id) in ids.iter().enumerate() {
        let id = id as usize;
        let dst = &mut dwte[id * d..(id + 1) * d];
        for (a, b) in dst.iter_mut().zip(&dout[i * d..(i + 1) * d]) {
            *a += *b;
        }
    }
}

const CHUNK: usize = 1 << 14;

pub fn relu2_forward(u: &[f32], h: &mut [f32]) {
    h.par_chunks_mut(CHUNK)
        .zip(u.par_chunks(CHUNK))
        .for_each(|(h, u)| relu2_forward_chunk(u, h));
}

pub fn relu2_backward(u: &[f32], dh: &mut [f32]) {
    dh.par_chunks_mut(CHUNK)
        .zip(u.par_chunks(CHUNK))
        .for_each(|(dh, u)| relu2_backward_chunk(u, dh));
}

pub fn add_inplace(x: &mut [f32], y: &[f32]) {
    assert_eq!(x.len(), y.len());
    x.par_chunks_mut(CHUNK)
        .zip(y.par_chunks(CHUNK))
        .for_each(|(x, y)| add_chunk(x, y));
}

// The chunks' loops, compiled per vector level (`isa_dispatched!`: the same bits in every copy).
isa_dispatched! {
    fn relu2_forward_chunk / relu2_forward_chunk_at(u: &[f32], h: &mut [f32]) => relu2_forward_body
}
isa_dispatched! {
    fn relu2_backward_chunk / relu2_backward_chunk_at(u: &[f32], dh: &mut [f32]) => relu2_backward_body
}
isa_dispatched! {
    fn add_chunk / add_chunk_at(x: &mut [f32], y: &[f32]) => add_body
}

#[inline(always)]
fn relu2_forward_body(u: &[f32], h: &mut [f32]) {
    for (h, &u) in h.iter_mut().zip(u) {
        let r = u.max(0.0);
        *h = r * r;
    }
}

#[inline(always)]
fn relu2_backward_body(u: &[f32], dh: &mut [f32]) {
    for (g, &u) in dh.iter_mut().zip(u) {
        *g *= 2.0 * u.max(0.0);
    }
}

#[inline(always)]
fn add_body(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += *b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::isa::{assert_same_bits, levels_here, test_values};

    /// relu^2 forward and backward and the residual add give the same bits in every copy this CPU can run.
    #[test]
    fn chunks_agree_across_levels() {
        for n in [1usize, 15, 16, 17, 1000] {
            let (u, g, x) = (test_values(n, 1), test_values(n, 2), test_values(n, 3));
            let mut first: Option<Vec<Vec<f32>>> = None;
            for level in levels_here() {
                let mut h = vec![0.0; n];
                relu2_forward_chunk_at(level, &u, &mut h);
                let mut dh = g.clone();
                relu2_backward_chunk_at(level, &u, &mut dh);
                let mut sum = x.clone();
                add_chunk_at(level, &mut sum, &g);
                let got = vec![h, dh, sum];
                match &first {
                    None => first = Some(got),
                    Some(want) => {
                        for ((name, a), b) in ["relu2", "relu2 backward", "add"].iter().zip(&got).zip(want) {
                            assert_same_bits(&format!("{name}, {level:?}, n {n}"), a, b);
                        }
                    }
                }
            }
        }
    }
}
