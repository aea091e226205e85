//! Softcap + cross-entropy over one chunk of lm_head logits, forward and backward fused.

use rayon::prelude::*;

pub fn softcap_cross_entropy(
    logits: &mut [f32],
    rows: usize,
    vocab: usize,
    cap: f32,
    targets: &[i32],
    losses: &mut [f32],
    grad_scale: Option<f32>,
) {
    let logits = &mut logits[..rows * vocab];
    logits
        .par_chunks_mut(vocab)
        .zip(losses[..rows].par_iter_mut())
        .enumerate()
        .for_each(|(r, (row, loss))| {
            let target = targets[r];
            if target < 0 {
                *loss = 0.0;
                if grad_scale.is_some() {
                    row.fill(0.0);
                }
                return;
            }
            // Cap in place: z = cap * tanh(l / cap). The backward needs only z (dtanh = 1 - (z/cap)^2).
            let mut max = f32::NEG_INFINITY;
            for v in row.iter_mut() {
                *v = cap * (*v / cap).tanh();
                max = max.max(*v);
            }
            let sum: f32 = row.iter().map(|&z| (z - max).exp()).sum();
            let lse = max + sum.ln();
            *loss = lse - row[target as usize];
            match grad_scale {
                Some(s) => {
                    let inv = 1.0 / sum;
                    for (j, v) in row.iter_mut().enumerate() {
                        let z = *v;
                        let p = (z - max).exp() * inv;
                        let dz = if j == target as usize { p - 1.0 } else { p };
                        let c = z / cap;
                        *v = s * dz * (1.0 - c * c);
                    }
                }
                None => {} // the row keeps the capped logits z
            }
        });
}

pub fn softcap(logits: &mut [f32], cap: f32) {
    logits.par_chunks_mut(1 << 14).for_each(|c| {
        for v in c {
            *v = cap * (*v / cap).tanh();
        }
    });
}
