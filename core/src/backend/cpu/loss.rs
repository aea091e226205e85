//! Softcap + cross-entropy over one chunk of lm_head logits, forward and backward fused.
//!
//! The cap bounds every logit to [-cap, cap], so exp(z - cap) needs no running max to stay in range
//! (it lies in [e^-2cap, 1]); one pass computes z and e = exp(z - cap), a second turns them into the
//! gradient without another transcendental. Writing the loss as ln(1 + other / e_target), with `other` the
//! sum of e over every class but the target, keeps it accurate when it is near zero (a confident, right
//! prediction) where lse - z_target would cancel.

use rayon::prelude::*;
use std::cell::RefCell;

thread_local! {
    // exp(z - cap) of one row, grown once to the vocabulary size.
    static EXPS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

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
            let t = target as usize;
            EXPS.with(|e| {
                let mut e = e.borrow_mut();
                if e.len() < vocab {
                    e.resize(vocab, 0.0);
                }
                let e = &mut e[..vocab];
                // Pass 1: cap in place (z = cap * tanh(l / cap)) and e = exp(z - cap). Branch-free element
                // functions, so this loop vectorizes; the sum runs in 8 lanes for the same reason.
                for (z, ej) in row.iter_mut().zip(e.iter_mut()) {
                    *z = cap * tanh(*z / cap);
                    *ej = exp(*z - cap);
                }
                let sum = lane_sum(e);
                let e_t = e[t];
                let other = sum - e_t;
                *loss = (other / e_t).ln_1p();
                // Pass 2: d(s * loss)/d(raw logit) = s * (p - onehot) * (1 - (z/cap)^2), p = e / sum.
                if let Some(s) = grad_scale {
                    let inv = 1.0 / sum;
                    for (j, (z, &ej)) in row.iter_mut().zip(e.iter()).enumerate() {
                        // p_t - 1 = -other / sum exactly (no cancellation near p_t = 1).
                        let dz = if j == t { -other * inv } else { ej * inv };
                        let c = *z / cap;
                        *z = s * dz * (1.0 - c * c);
                    }
                }
            });
        });
}

pub fn softcap(logits: &mut [f32], cap: f32) {
    logits.par_chunks_mut(1 << 14).for_each(|c| {
        for v in c {
            *v = cap * tanh(*v / cap);
        }
    });
}

/// Sum in 8 independent lanes (vectorizable; also a little more accurate than one running sum).
fn lane_sum(x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += *v;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// e^x for x <= 0 (below -87 it returns ~e^-87 instead of underflowing; the loss never gets there:
/// its arguments lie in [-2 cap, 0]). Branch-free so loops over it vectorize, unlike libm's expf.
/// Range reduction x = n ln2 + r with ln2 split in two (exact n ln2_hi), a degree-7 polynomial for e^r on
/// |r| <= ln2/2 (Cephes' expf coefficients), and 2^n built in the exponent bits. Max relative error 1e-7.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding then subtracting 1.5 * 2^23 rounds to the nearest integer without a branch or a libm call.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 0.0);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let er = p * r * r + r + 1.0;
    er * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// tanh, branch-free and with no libm call (libm's tanhf dominated the loss): a Taylor polynomial near 0,
/// where 1 - e^(-2|y|) would cancel, and (1 - e) / (1 + e) with e = e^(-2|y|) elsewhere.
/// Max relative error 2e-7 (tested below against f64).
#[inline(always)]
pub fn tanh(y: f32) -> f32 {
    let a = y.abs();
    let y2 = y * y;
    // y - y^3/3 + 2y^5/15 - 17y^7/315 + 62y^9/2835 - 1382y^11/155925, for |y| < 0.3
    let mut p = -1382.0 / 155925.0f32;
    p = p * y2 + 62.0 / 2835.0;
    p = p * y2 - 17.0 / 315.0;
    p = p * y2 + 2.0 / 15.0;
    p = p * y2 - 1.0 / 3.0;
    let small = a + a * y2 * p;
    let e = exp(-2.0 * a);
    let big = (1.0 - e) / (1.0 + e);
    let t = if a < 0.3 { small } else { big };
    t.copysign(y)
}

#[cfg(test)]
mod tests {
    #[test]
    fn fast_exp_matches_f64_exp() {
        let mut worst = 0.0f64;
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4; // 0 .. -87
            let want = (x as f64).exp();
            let rel = ((super::exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 2e-7, "fast exp: worst relative error {worst:e}");
        assert_eq!(super::exp(0.0), 1.0);
        assert!(super::exp(-1000.0) > 0.0 && super::exp(-1000.0) < 1e-37);
    }

    #[test]
    fn lane_sum_adds_everything() {
        for n in 0..40 {
            let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
            assert_eq!(super::lane_sum(&x), (n * (n.max(1) - 1) / 2) as f32, "n {n}");
        }
    }

    #[test]
    fn fast_tanh_matches_f64_tanh() {
        let mut worst = 0.0f64;
        for i in -200_000..=200_000 {
            let y = i as f32 * 1e-4; // -20 .. 20, both branches and the switch at 0.3
            let want = (y as f64).tanh();
            let got = super::tanh(y) as f64;
            let rel = if want == 0.0 {
                got.abs()
            } else {
                ((got - want) / want).abs()
            };
            worst = worst.max(rel);
        }
        assert!(worst < 3e-7, "fast tanh: worst relative error {worst:e}");
        assert_eq!(super::tanh(0.0), 0.0);
        assert_eq!(super::tanh(1e4), 1.0);
        assert_eq!(super::tanh(-1e4), -1.0);
    }
}
