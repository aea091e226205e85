//! Muon for the block matrices: momentum, nesterov, Newton-Schulz orthogonalization, shape-scaled step.
//!
//! Per matrix G of shape (out, in), SPEC.md section 4:
//!   buf = lerp(buf, g, 1 - mu); g = lerp(g, buf, mu)              (nesterov)
//!   X = g, transposed if out > in; X /= ||X||_F + 1e-7
//!   5 x { A = X X^T; B = b A + c A A; X = a X + B X }              (quintic Newton-Schulz)
//!   p -= lr * max(1, out / in)^0.5 * X^(T if transposed)
//! This host optimizer runs Newton-Schulz in f32 (the CPU's fp32 runs); a bf16 run, on any backend (the CPU
//! twin included), takes `optim::device`'s batched bf16 Newton-Schulz.

use crate::backend::cpu::host_gemm::{matmul, Operand};
use crate::backend::NsBatch;

/// Coefficients of the quintic Newton-Schulz iteration (a, b, c).
pub const NS_COEFFS: (f32, f32, f32) = (3.4445, -4.7750, 2.0315);
pub const NS_STEPS: usize = 5;
/// Added to the Frobenius norm before normalizing, so a zero gradient stays zero.
pub const NS_EPS: f32 = 1e-7;

/// One batched Newton-Schulz call (`Backend::newton_schulz_bf16`) of `batch` rows x cols matrices with Muon's
/// iteration: these coefficients, steps and epsilon.
pub fn muon_ns_batch(batch: usize, rows: usize, cols: usize) -> NsBatch {
    NsBatch {
        batch,
        rows,
        cols,
        coeffs: NS_COEFFS,
        steps: NS_STEPS,
        eps: NS_EPS,
    }
}

/// Scratch for Newton-Schulz, sized once for the largest matrix the optimizer owns (nothing is allocated
/// per step).
pub struct NsWorkspace {
    x: Vec<f32>,
    x_next: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
}

impl NsWorkspace {
    /// Room for any matrix with at most `max_numel` elements whose shorter side is at most `max_short`.
    pub fn new(max_numel: usize, max_short: usize) -> Self {
        NsWorkspace {
            x: vec![0.0; max_numel],
            x_next: vec![0.0; max_numel],
            a: vec![0.0; max_short * max_short],
            b: vec![0.0; max_short * max_short],
        }
    }

    /// Sized for the given (rows, cols) shapes.
    pub fn for_shapes(shapes: impl Iterator<Item = (usize, usize)>) -> Self {
        let (numel, short) = scratch_dims(shapes);
        Self::new(numel, short)
    }
}

/// The largest element count and the largest shorter side among (rows, cols) matrix shapes: what Muon's
/// scratch is sized by (the host's `NsWorkspace` and the device's `MuonScratch` alike).
pub fn scratch_dims(shapes: impl Iterator<Item = (usize, usize)>) -> (usize, usize) {
    shapes.fold((0, 0), |(numel, short), (r, c)| (numel.max(r * c), short.max(r.min(c))))
}

/// Elements of Muon's scratch for these shapes: three matrices (the momentum update, X, X_next) and two
/// Gram-sized ones (A and b A + c A A), as both optimizers allocate.
pub fn scratch_elems(shapes: impl Iterator<Item = (usize, usize)>) -> usize {
    let (numel, short) = scratch_dims(shapes);
    3 * numel + 2 * short * short
}

/// Orthogonalize `g` (rows x cols, row-major) in place with `NS_STEPS` quintic Newton-Schulz iterations.
pub fn newton_schulz5(g: &mut [f32], rows: usize, cols: usize, ws: &mut NsWorkspace) {
    let n_el = rows * cols;
    assert_eq!(g.len(), n_el);
    // Work on the wide orientation (m <= n) so X X^T is the small m x m Gram matrix.
    let transposed = rows > cols;
    let (m, n) = if transposed { (cols, rows) } else { (rows, cols) };
    assert!(
        ws.x.len() >= n_el && ws.a.len() >= m * m,
        "NsWorkspace too small for {rows}x{cols}"
    );
    let x = &mut ws.x[..n_el];
    if transposed {
        transpose_into(g, rows, cols, x);
    } else {
        x.copy_from_slice(g);
    }
    let norm = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt() as f32;
    let inv = 1.0 / (norm + NS_EPS);
    x.iter_mut().for_each(|v| *v *= inv);

    let (ca, cb, cc) = NS_COEFFS;
    let a = &mut ws.a[..m * m];
    let b = &mut ws.b[..m * m];
    let x_next = &mut ws.x_next[..n_el];
    for _ in 0..NS_STEPS {
        // A = X X^T
        matmul(a, 0.0, Operand::new(x, m, n), Operand::new(x, m, n).t(), 1.0);
        // B = b A + c A A
        b.iter_mut().zip(a.iter()).for_each(|(bv, &av)| *bv = cb * av);
        matmul(b, 1.0, Operand::new(a, m, m), Operand::new(a, m, m), cc);
        // X = a X + B X
        x_next.iter_mut().zip(x.iter()).for_each(|(y, &v)| *y = ca * v);
        matmul(x_next, 1.0, Operand::new(b, m, m), Operand::new(x, m, n), 1.0);
        x.copy_from_slice(x_next);
    }

    if transposed {
        // x is the cols x rows transpose: transposing it back gives the rows x cols result.
        transpose_into(x, cols, rows, g);
    } else {
        g.copy_from_slice(x);
    }
}

/// `dst` (cols x rows, row-major) = the transpose of `src` (rows x cols, row-major).
fn transpose_into(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    for r in 0..rows {
        for c in 0..cols {
            dst[c * rows + r] = src[r * cols + c];
        }
    }
}

/// The Muon step-size factor for a (rows, cols) matrix: max(1, rows / cols)^0.5.
pub fn shape_scale(rows: usize, cols: usize) -> f32 {
    (rows as f32 / cols as f32).max(1.0).sqrt()
}

/// One Muon update of one whole matrix. `update` is scratch of the matrix's size (it receives the
/// orthogonalized update); `buf` is the matrix's momentum buffer.
#[allow(clippy::too_many_arguments)]
pub fn muon_update(
    param: &mut [f32],
    grad: &[f32],
    buf: &mut [f32],
    update: &mut [f32],
    rows: usize,
    cols: usize,
    lr: f32,
    momentum: f32,
    ws: &mut NsWorkspace,
) {
    let n = rows * cols;
    assert!(param.len() == n && grad.len() == n && buf.len() == n && update.len() == n);
    // buf = lerp(buf, g, 1 - mu); nesterov: update = lerp(g, buf, mu)
    crate::backend::optim_ops::muon_momentum(grad, buf, update, momentum);
    newton_schulz5(update, rows, cols, ws);
    let step = lr * shape_scale(rows, cols);
    param.iter_mut().zip(update.iter()).for_each(|(p, &u)| *p -= step * u);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scalar map Newton-Schulz applies to each singular value.
    fn ns_poly(mut s: f64) -> f64 {
        let (a, b, c) = (NS_COEFFS.0 as f64, NS_COEFFS.1 as f64, NS_COEFFS.2 as f64);
        for _ in 0..NS_STEPS {
            s = a * s + b * s.powi(3) + c * s.powi(5);
        }
        s
    }

    /// An orthogonal n x n matrix built from Givens rotations at fixed angles (row-major, f64).
    fn orthogonal(n: usize, seed: f64) -> Vec<f64> {
        let mut q = vec![0.0f64; n * n];
        (0..n).for_each(|i| q[i * n + i] = 1.0);
        for i in 0..n {
            for j in (i + 1)..n {
                let th = seed * (1.0 + i as f64 * 0.7 + j as f64 * 0.3);
                let (s, c) = th.sin_cos();
                for r in 0..n {
                    let (qi, qj) = (q[r * n + i], q[r * n + j]);
                    q[r * n + i] = c * qi - s * qj;
                    q[r * n + j] = s * qi + c * qj;
                }
            }
        }
        q
    }

    /// U diag(s) V^T for a (rows x cols) matrix, in f64.
    fn compose(u: &[f64], s: &[f64], v: &[f64], rows: usize, cols: usize) -> Vec<f64> {
        let k = rows.min(cols);
        let mut out = vec![0.0f64; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                out[r * cols + c] = (0..k).map(|i| u[r * rows + i] * s[i] * v[c * cols + i]).sum();
            }
        }
        out
    }

    /// Newton-Schulz acts on singular values only: for G = U diag(s) V^T the result is
    /// U diag(p(s / ||s||)) V^T with p the quintic iterated 5 times. Checked for wide and tall shapes.
    #[test]
    fn newton_schulz_maps_singular_values_through_the_quintic() {
        for (rows, cols) in [(4usize, 7usize), (9, 5), (6, 6)] {
            let k = rows.min(cols);
            let s: Vec<f64> = (0..k).map(|i| 0.3 + 1.7 * i as f64).collect();
            let u = orthogonal(rows, 0.41);
            let v = orthogonal(cols, 0.23);
            let g64 = compose(&u, &s, &v, rows, cols);
            let fro = s.iter().map(|x| x * x).sum::<f64>().sqrt();
            let expected_s: Vec<f64> = s.iter().map(|x| ns_poly(x / fro)).collect();
            let expected = compose(&u, &expected_s, &v, rows, cols);
            let mut g: Vec<f32> = g64.iter().map(|&x| x as f32).collect();
            let mut ws = NsWorkspace::for_shapes([(rows, cols)].into_iter());
            newton_schulz5(&mut g, rows, cols, &mut ws);
            for (i, (&got, &want)) in g.iter().zip(&expected).enumerate() {
                assert!((got as f64 - want).abs() < 2e-5, "{rows}x{cols} [{i}]: {got} vs {want}");
            }
        }
    }

    #[test]
    fn zero_gradient_gives_zero_update() {
        let mut g = vec![0.0f32; 12];
        let mut ws = NsWorkspace::for_shapes([(3, 4)].into_iter());
        newton_schulz5(&mut g, 3, 4, &mut ws);
        assert!(g.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn shape_scale_grows_for_tall_matrices_only() {
        assert_eq!(shape_scale(4, 1), 2.0);
        assert_eq!(shape_scale(1, 4), 1.0);
        assert_eq!(shape_scale(5, 5), 1.0);
    }

    /// Momentum and nesterov in isolation: with a 1x1 matrix Newton-Schulz maps any nonzero u to
    /// p(u/|u|) = sign(u) * p(1), so the step is -lr * p(1) * sign(nesterov update).
    #[test]
    fn one_by_one_matrix_follows_momentum_sign() {
        let mut p = vec![1.0f32];
        let mut buf = vec![0.5f32];
        let mut upd = vec![0.0f32];
        let mut ws = NsWorkspace::for_shapes([(1, 1)].into_iter());
        // buf = 0.5 + 0.1 * (-2 - 0.5) = 0.25; u = -2 + 0.9 * (0.25 + 2) = 0.025 > 0
        muon_update(&mut p, &[-2.0], &mut buf, &mut upd, 1, 1, 0.1, 0.9, &mut ws);
        assert!((buf[0] - 0.25).abs() < 1e-7);
        let p1 = ns_poly(1.0) as f32;
        assert!((p[0] - (1.0 - 0.1 * p1)).abs() < 1e-5, "{} vs {}", p[0], 1.0 - 0.1 * p1);
    }
}
