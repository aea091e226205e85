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
            let (mut max, mut imax) = (f32::NEG_INFINITY, 0);
            for (j, v) in row.iter_mut().enumerate() {
                *v = cap * (*v / cap).tanh();
                if *v > max {
                    (max, imax) = (*v, j);
                }
            }
            // lse = max + ln(1 + rest) with rest the sum over all but the max: ln_1p keeps a near-zero loss
            // (a confident, correct prediction) accurate instead of losing it to 1 + rest rounding.
            let rest: f32 = row
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != imax)
                .map(|(_, &z)| (z - max).exp())
                .sum();
            *loss = (max - row[target as usize]) + rest.ln_1p();
            let sum = 1.0 + rest;
            match grad_scale {
                Some(s) => {
                    let inv = 1.0 / sum;
                    for (j, v) in row.iter_mut().enumerate() {
                        let z = *v;
                        let p = (z - max).exp() * inv;
                        // p - 1 for the target, as -rest/sum when it is the max (no cancellation near p = 1).
                        let dz = if j != target as usize {
                            p
                        } else if j == imax {
                            -rest * inv
                        } else {
                            p - 1.0
                        };
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
