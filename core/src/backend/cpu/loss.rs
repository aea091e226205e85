//! Softcap + cross-entropy over one chunk of lm_head logits, forward and backward fused.
//!
//! The cap bounds every logit to [-cap, cap], so exp(z - cap) needs no running max to stay in range
//! (it lies in [e^-2cap, 1]); one pass computes z and e = exp(z - cap), a second turns them into the
//! gradient without another transcendental. Writing the loss as ln(1 + other / e_target), with `other` the
//! sum of e over every class but the target, keeps it accurate when it is near zero (a confident, right
//! prediction) where lse - z_target would cancel.
//!
//! The per-row work is compiled three times, for baseline x86-64, with AVX2 and with AVX-512 enabled (picked
//! at run time, `isa::selected`): the same operations in the same order, so all give the same bits on every
//! machine; AVX2 is ~2.8x faster than baseline.

use super::isa::{self, CpuIsa};
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
    let kernel = row_kernel();
    softcap_cross_entropy_with(kernel, logits, rows, vocab, cap, targets, losses, grad_scale);
}

#[allow(clippy::too_many_arguments)]
fn softcap_cross_entropy_with(
    kernel: RowFn,
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
                *loss = kernel(row, &mut e[..vocab], t, cap, grad_scale);
            });
        });
}

/// One row: caps `row` in place, fills `e`, returns the loss and, with a grad scale, leaves the gradient
/// in `row`. The same body is compiled twice (baseline and AVX2 below) so both give identical bits.
type RowFn = fn(&mut [f32], &mut [f32], usize, f32, Option<f32>) -> f32;

/// The row kernel for the vector level this process uses (`isa::selected`: the CPU's widest, or NC_CPU_ISA).
fn row_kernel() -> RowFn {
    match isa::selected() {
        #[cfg(target_arch = "x86_64")]
        CpuIsa::Avx512 => row_avx512,
        #[cfg(target_arch = "x86_64")]
        CpuIsa::Avx2 => row_avx2,
        _ => row_baseline,
    }
}

fn row_baseline(row: &mut [f32], e: &mut [f32], t: usize, cap: f32, grad_scale: Option<f32>) -> f32 {
    row_body(row, e, t, cap, grad_scale)
}

/// The build targets baseline x86-64 (SSE2), where these loops vectorize poorly; with AVX2 enabled for this
/// function the inlined body runs 8 lanes wide. FMA is enabled for the target but never used implicitly:
/// Rust does not contract a * b + c, so every element sees the same IEEE operations as the baseline build.
#[cfg(target_arch = "x86_64")]
fn row_avx2(row: &mut [f32], e: &mut [f32], t: usize, cap: f32, grad_scale: Option<f32>) -> f32 {
    #[target_feature(enable = "avx2,fma")]
    unsafe fn inner(row: &mut [f32], e: &mut [f32], t: usize, cap: f32, grad_scale: Option<f32>) -> f32 {
        row_body(row, e, t, cap, grad_scale)
    }
    // SAFETY: only reachable through row_kernel, which checked that this CPU has AVX2 and FMA.
    unsafe { inner(row, e, t, cap, grad_scale) }
}

/// The same body 16 lanes wide. AVX-512 F has every operation the body needs (compares and blends through
/// mask registers); as above, nothing is fused, so the bits are the baseline build's.
#[cfg(target_arch = "x86_64")]
fn row_avx512(row: &mut [f32], e: &mut [f32], t: usize, cap: f32, grad_scale: Option<f32>) -> f32 {
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn inner(row: &mut [f32], e: &mut [f32], t: usize, cap: f32, grad_scale: Option<f32>) -> f32 {
        row_body(row, e, t, cap, grad_scale)
    }
    // SAFETY: only reachable through row_kernel, which checked that this CPU has AVX-512 F, AVX2 and FMA.
    unsafe { inner(row, e, t, cap, grad_scale) }
}

#[inline(always)]
fn row_body(row: &mut [f32], e: &mut [f32], t: usize, cap: f32, grad_scale: Option<f32>) -> f32 {
    let (row, e) = (&mut row[..e.len()], e);
    // Pass 1: cap in place (z = cap * tanh(l / cap)) and e = exp(z - cap). Branch-free element functions
    // and no early exit, so this loop vectorizes; the sum runs in 8 lanes for the same reason.
    for (z, ej) in row.iter_mut().zip(e.iter_mut()) {
        *z = cap * tanh(*z / cap);
        *ej = exp(*z - cap);
    }
    let sum = lane_sum(e);
    let e_t = e[t];
    let other = sum - e_t;
    let loss = (other / e_t).ln_1p();
    // Pass 2: d(s * loss)/d(raw logit) = s * (p - onehot) * (1 - (z/cap)^2), p = e / sum. Every class is
    // written as if it were not the target (a test on j per element would slow the loop), then the target.
    if let Some(s) = grad_scale {
        let inv = 1.0 / sum;
        let z_t = row[t];
        for (z, &ej) in row.iter_mut().zip(e.iter()) {
            let c = *z / cap;
            *z = s * (ej * inv) * (1.0 - c * c);
        }
        // p_t - 1 = -other / sum exactly (no cancellation near p_t = 1).
        let c = z_t / cap;
        row[t] = s * (-other * inv) * (1.0 - c * c);
    }
    loss
}

pub fn softcap(logits: &mut [f32], cap: f32) {
    logits.par_chunks_mut(1 << 14).for_each(|c| {
        for v in c {
            *v = cap * tanh(*v / cap);
        }
    });
}

/// Sum in 8 independent lanes (vectorizable; also a little more accurate than one running sum).
#[inline(always)]
pub(super) fn lane_sum(x: &[f32]) -> f32 {
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
// The coefficients are kept as they were fitted (one of them has digits beyond f32), so the bits never change.
#[allow(clippy::excessive_precision)]
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding then subtracting 1.5 * 2^23 rounds to the nearest integer without a branch or a libm call.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 0.0);
    let k = x * std::f32::consts::LOG2_E + ROUND;
    let n = k - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let er = p * r * r + r + 1.0;
    // 2^n from k's bits rather than `n as i32`: k = 1.5 * 2^23 + n with n in [-126, 0] has ulp 1, so its bits
    // are ROUND's plus n. Same value, but integer adds vectorize where Rust's saturating float->int cast
    // does not (it went lane by lane).
    let biased = k.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127);
    er * f32::from_bits(biased << 23)
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
    #[cfg(target_arch = "x86_64")]
    use super::{isa, CpuIsa};

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

    /// Rows of raw logits from a fixed LCG: spread from ~0 to ~4x the cap, so both tanh branches, the
    /// saturated region and the clamp of exp are all hit.
    fn random_logits(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|i| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let u = (s >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
                let scale = [0.05f32, 1.0, 10.0, 60.0][i % 4];
                (2.0 * u - 1.0) * scale
            })
            .collect()
    }

    /// The AVX2 and AVX-512 builds of the row kernel against the baseline build: the same IEEE operations per
    /// element and the same 8-lane sum order, so losses and gradients must match bit for bit (no tolerance
    /// needed). Vocab sizes cover empty tails and tails of every length mod 8, 16 and 32.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_rows_match_baseline_bit_for_bit() {
        compare_with_baseline(CpuIsa::Avx2, "AVX2+FMA", super::row_avx2);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_rows_match_baseline_bit_for_bit() {
        compare_with_baseline(CpuIsa::Avx512, "AVX-512 F", super::row_avx512);
    }

    /// `wide` (the row kernel built for `isa`) against the baseline build; nothing to compare (a message)
    /// where this CPU lacks `isa`.
    #[cfg(target_arch = "x86_64")]
    fn compare_with_baseline(isa: CpuIsa, isa_name: &str, wide: super::RowFn) {
        if CpuIsa::detected() < isa {
            eprintln!("no {isa_name} on this CPU: nothing to compare");
            return;
        }
        let cap = crate::config::LOGIT_SOFTCAP;
        for (k, &vocab) in [1usize, 3, 8, 13, 16, 17, 31, 32, 33, 47, 100, 257, 1000, 4099, 65536]
            .iter()
            .enumerate()
        {
            let rows = 6;
            let raw = random_logits(rows * vocab, k as u64);
            // Targets at both ends and in the middle; rows 1 and 4 ignored (-1).
            let v = vocab as i32;
            let targets = [0, -1, v / 2, v - 1, -1, (7 * v) / 9];
            for grad in [None, Some(0.37f32)] {
                let run = |kernel: super::RowFn| {
                    let (mut z, mut losses) = (raw.clone(), vec![f32::NAN; rows]);
                    super::softcap_cross_entropy_with(kernel, &mut z, rows, vocab, cap, &targets, &mut losses, grad);
                    (z, losses)
                };
                let (z_base, l_base) = run(super::row_baseline);
                let (z_avx, l_avx) = run(wide);
                for r in 0..rows {
                    assert_eq!(
                        l_avx[r].to_bits(),
                        l_base[r].to_bits(),
                        "loss, vocab {vocab} row {r} grad {grad:?}"
                    );
                }
                for (i, (a, b)) in z_avx.iter().zip(&z_base).enumerate() {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "logit/grad {i}, vocab {vocab} grad {grad:?}: {a} vs {b}"
                    );
                }
            }
        }
    }

    /// The comparisons above only mean something if training uses the kernel of the selected level.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn dispatch_picks_the_selected_level() {
        let level = isa::selected();
        let want: super::RowFn = match level {
            CpuIsa::Avx512 => super::row_avx512,
            CpuIsa::Avx2 => super::row_avx2,
            CpuIsa::Baseline => super::row_baseline,
        };
        assert!(
            std::ptr::fn_addr_eq(super::row_kernel(), want),
            "dispatcher picked the wrong kernel (selected {level:?})"
        );
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
