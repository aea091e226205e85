//! Embedding lookup and scatter-add, relu^2, residual add.

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
    h.par_chunks_mut(CHUNK).zip(u.par_chunks(CHUNK)).for_each(|(h, u)| {
        for (h, &u) in h.iter_mut().zip(u) {
            let r = u.max(0.0);
            *h = r * r;
        }
    });
}

pub fn relu2_backward(u: &[f32], dh: &mut [f32]) {
    dh.par_chunks_mut(CHUNK).zip(u.par_chunks(CHUNK)).for_each(|(dh, u)| {
        for (g, &u) in dh.iter_mut().zip(u) {
            *g *= 2.0 * u.max(0.0);
        }
    });
}

pub fn add_inplace(x: &mut [f32], y: &[f32]) {
    assert_eq!(x.len(), y.len());
    x.par_chunks_mut(CHUNK).zip(y.par_chunks(CHUNK)).for_each(|(x, y)| {
        for (a, b) in x.iter_mut().zip(y) {
            *a += *b;
        }
    });
}
