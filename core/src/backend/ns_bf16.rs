//! Muon's Newton-Schulz in bf16, on the host: the CPU twin of the device path (`Backend::newton_schulz_bf16`,
//! whose default body runs this, and the CUDA backend's cuBLASLt strided-batched version in
//! core/src/backend/cuda/optim_bf16.rs).
//!
//! The device iterates with bf16 operands and f32 accumulation, the quintic's a, b, c folded into the GEMMs'
//! alpha and beta (SPEC.md section 4; X is the matrix in its wide orientation):
//!   X  = bf16(G / (||G||_F + eps))           the norm's sum in f64, its root rounded to f32
//!   A  = bf16(X X^T)                          alpha 1, beta 0
//!   B  = bf16(c (A A) + b A)                  alpha c, beta b, C = A
//!   X' = bf16((B X) + a X)                    alpha 1, beta a, C = X
//! Each GEMM accumulates its products in f32 and then applies its epilogue alpha acc + beta C in f32 (two
//! rounded multiplies and a rounded add), rounding the result to bf16 on store, as a GEMM with bf16 D does.
//! This twin rounds at exactly those points; only the order of the f32 accumulation inside a dot product
//! differs from the device's (cuBLASLt's is its own), so the two agree to a few bf16 ulps, not bit for bit.
//!
//! A tall matrix (rows > cols) is iterated as Y = X^T, the matrix as stored, exactly as the f32 device path
//! (optim/device.rs) does: A = Y^T Y, B as above, Y' = Y B^T + a Y.
//!
//! Every matrix of a batch is computed on its own with the same code, so batching cannot change a result.

use super::bf16::round_bf16;
use super::optim_ops;
use crate::backend::cpu::host_gemm::{matmul, Operand};

/// A batch of same-shape matrices for one batched Newton-Schulz: `batch` row-major `rows x cols` matrices,
/// back to back, and the iteration's constants.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NsBatch {
    pub batch: usize,
    pub rows: usize,
    pub cols: usize,
    /// The quintic's (a, b, c).
    pub coeffs: (f32, f32, f32),
    pub steps: usize,
    /// Added to the Frobenius norm before dividing (a zero matrix stays zero).
    pub eps: f32,
}

impl NsBatch {
    /// Elements of one matrix.
    pub fn numel(&self) -> usize {
        self.rows * self.cols
    }
    /// The shorter side: the Gram matrix is short x short.
    pub fn short(&self) -> usize {
        self.rows.min(self.cols)
    }
    /// Elements of one Gram matrix.
    pub fn gram_numel(&self) -> usize {
        self.short() * self.short()
    }
    /// Iterated as Y = X^T (the Gram matrix is Y^T Y).
    pub fn tall(&self) -> bool {
        self.rows > self.cols
    }
}

/// f32 elements of `norms` scratch a device needs per matrix (64 f64 partial sums of squares).
pub const NS_NORM_SCRATCH_PER_MATRIX: usize = 128;

super::cpu::isa::isa_dispatched! {
    /// A GEMM's epilogue into a bf16 destination: d = bf16(alpha acc + beta c) in f32; with beta 0 (c None),
    /// d = bf16(alpha acc). The copy for this process's vector level; the same bits in every copy.
    fn epilogue / epilogue_at(acc: &[f32], alpha: f32, beta_c: Option<(f32, &[f32])>, d: &mut [f32]) => epilogue_body
}

#[inline(always)]
fn epilogue_body(acc: &[f32], alpha: f32, beta_c: Option<(f32, &[f32])>, d: &mut [f32]) {
    match beta_c {
        None => d.iter_mut().zip(acc).for_each(|(d, &a)| *d = round_bf16(alpha * a)),
        Some((beta, c)) => d
            .iter_mut()
            .zip(acc)
            .zip(c)
            .for_each(|((d, &a), &c)| *d = round_bf16(alpha * a + beta * c)),
    }
}

/// X = bf16(G inv), inv = 1 / ((f32)sqrt(sum of squares in f64) + eps): one matrix.
pub fn normalize_into_bf16(g: &[f32], eps: f32, x: &mut [f32]) {
    assert_eq!(g.len(), x.len(), "normalize_into_bf16: lengths differ");
    let norm = optim_ops::sum_squares(g).sqrt() as f32;
    let inv = 1.0 / (norm + eps);
    x.iter_mut().zip(g).for_each(|(x, &g)| *x = round_bf16(g * inv));
}

/// Scratch for one matrix's iteration on the host (f32 accumulators and the bf16-valued Gram matrices).
pub struct NsHostScratch {
    acc_gram: Vec<f32>,
    gram: Vec<f32>,
    poly: Vec<f32>,
    acc_x: Vec<f32>,
}

impl NsHostScratch {
    pub fn new(rows: usize, cols: usize) -> Self {
        let short = rows.min(cols);
        NsHostScratch {
            acc_gram: vec![0.0; short * short],
            gram: vec![0.0; short * short],
            poly: vec![0.0; short * short],
            acc_x: vec![0.0; rows * cols],
        }
    }
}

/// One Newton-Schulz iteration of one bf16-valued matrix `x` (rows x cols as stored) into `x_next`, rounding
/// where the device stores bf16 (the module comment's A, B and X').
pub fn iteration(
    x: &[f32],
    rows: usize,
    cols: usize,
    coeffs: (f32, f32, f32),
    s: &mut NsHostScratch,
    x_next: &mut [f32],
) {
    let n = rows * cols;
    let short = rows.min(cols);
    let sq = short * short;
    assert!(
        x.len() == n && x_next.len() == n && s.gram.len() == sq,
        "iteration: sizes"
    );
    let (ca, cb, cc) = coeffs;
    let tall = rows > cols;
    // A = X X^T (wide), Y^T Y (tall): f32 accumulation, then rounded.
    if tall {
        matmul(
            &mut s.acc_gram,
            0.0,
            Operand::new(x, rows, cols).t(),
            Operand::new(x, rows, cols),
            1.0,
        );
    } else {
        matmul(
            &mut s.acc_gram,
            0.0,
            Operand::new(x, rows, cols),
            Operand::new(x, rows, cols).t(),
            1.0,
        );
    }
    epilogue(&s.acc_gram, 1.0, None, &mut s.gram);
    // B = c (A A) + b A
    matmul(
        &mut s.acc_gram,
        0.0,
        Operand::new(&s.gram, short, short),
        Operand::new(&s.gram, short, short),
        1.0,
    );
    epilogue(&s.acc_gram, cc, Some((cb, &s.gram)), &mut s.poly);
    // X' = B X + a X (wide); Y' = Y B^T + a Y (tall)
    if tall {
        matmul(
            &mut s.acc_x,
            0.0,
            Operand::new(x, rows, cols),
            Operand::new(&s.poly, short, short).t(),
            1.0,
        );
    } else {
        matmul(
            &mut s.acc_x,
            0.0,
            Operand::new(&s.poly, short, short),
            Operand::new(x, rows, cols),
            1.0,
        );
    }
    epilogue(&s.acc_x, 1.0, Some((ca, x)), x_next);
}

/// The whole batched Newton-Schulz on the host: `g` holds `ns.batch` matrices back to back (f32), `x`
/// receives their orthogonalized updates (bf16 values), matrix by matrix.
pub fn newton_schulz_bf16(ns: &NsBatch, g: &[f32], x: &mut [f32]) {
    let n = ns.numel();
    assert!(
        g.len() == ns.batch * n && x.len() == ns.batch * n,
        "newton_schulz_bf16: {} and {} values for {} matrices of {n}",
        g.len(),
        x.len(),
        ns.batch
    );
    let mut s = NsHostScratch::new(ns.rows, ns.cols);
    let mut other = vec![0.0f32; n];
    for (gb, xb) in g.chunks_exact(n.max(1)).zip(x.chunks_exact_mut(n.max(1))) {
        normalize_into_bf16(gb, ns.eps, xb);
        for _ in 0..ns.steps {
            iteration(xb, ns.rows, ns.cols, ns.coeffs, &mut s, &mut other);
            xb.copy_from_slice(&other);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::bf16::is_bf16;

    /// The epilogue's rounding point: the f32 sum first, one rounding to bf16 after.
    #[test]
    fn epilogue_rounds_once_after_the_f32_sum() {
        // bf16's ulp at 1 is 2^-7. acc = 1 + 3 2^-10 alone rounds to 1; acc + 2^-9 = 1 + 5 2^-10 is past the
        // midpoint 1 + 2^-8, so the sum rounded once is 1 + 2^-7 (rounding acc first would give 1 again).
        let acc = [1.0f32 + 3.0 * 2f32.powi(-10)];
        let c = [2f32.powi(-9)];
        let mut d = [0.0f32];
        epilogue(&acc, 1.0, Some((1.0, &c)), &mut d);
        assert_eq!(d[0], 1.0 + 2f32.powi(-7));
        epilogue(&acc, 1.0, None, &mut d);
        assert_eq!(d[0], 1.0);
    }

    /// The epilogue's copies (baseline, AVX2, AVX-512) store the same bits, with and without the beta term.
    #[test]
    fn epilogue_agrees_across_levels() {
        use crate::backend::cpu::isa::{assert_same_bits, levels_here, test_values};
        let (mut acc, mut c) = (test_values(1031, 1), test_values(1031, 2));
        // Random values almost never sit where one rounding more or less shows through bf16, so a copy that
        // contracted alpha acc + beta c into an FMA would pass on them alone: add the pairs where it shows.
        let (alpha, beta) = (-4.775f32, 2.0315f32);
        let (wa, wc) = (test_values(2_000_000, 3), test_values(2_000_000, 4));
        let mut sensitive = 0;
        for (&a, &cc) in wa.iter().zip(&wc) {
            if round_bf16(alpha.mul_add(a, beta * cc)).to_bits() != round_bf16(alpha * a + beta * cc).to_bits() {
                acc.push(a);
                c.push(cc);
                sensitive += 1;
            }
        }
        assert!(sensitive >= 16, "only {sensitive} FMA-sensitive pairs found");
        let mut first: Option<(Vec<f32>, Vec<f32>)> = None;
        for level in levels_here() {
            let (mut d1, mut d2) = (vec![0.0; acc.len()], vec![0.0; acc.len()]);
            epilogue_at(level, &acc, alpha, Some((beta, &c)), &mut d1);
            epilogue_at(level, &acc, 1.0, None, &mut d2);
            match &first {
                None => first = Some((d1, d2)),
                Some((w1, w2)) => {
                    assert_same_bits(&format!("epilogue with beta, {level:?}"), &d1, w1);
                    assert_same_bits(&format!("epilogue without beta, {level:?}"), &d2, w2);
                }
            }
        }
    }

    #[test]
    fn every_stored_value_is_bf16_and_zero_stays_zero() {
        let ns = NsBatch {
            batch: 2,
            rows: 3,
            cols: 5,
            coeffs: (3.4445, -4.7750, 2.0315),
            steps: 5,
            eps: 1e-7,
        };
        let mut g: Vec<f32> = (0..30).map(|i| (i as f32 * 0.77).sin()).collect();
        g[15..].fill(0.0);
        let mut x = vec![1.0f32; 30];
        newton_schulz_bf16(&ns, &g, &mut x);
        assert!(x.iter().all(|&v| is_bf16(v) && v.is_finite()));
        assert!(x[15..].iter().all(|&v| v == 0.0), "a zero matrix stays zero");
        assert!(x[..15].iter().any(|&v| v != 0.0));
    }
}
