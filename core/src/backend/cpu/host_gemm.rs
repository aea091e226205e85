//! Row-major f32 matrix products on host slices, `dst = alpha dst + beta op(lhs) op(rhs)`, through the same
//! `gemm_f32` as the CPU backend's matmul.
//!
//! For code that holds plain slices rather than backend buffers: the host optimizer's Newton-Schulz
//! (optim/muon.rs) and the bf16 Newton-Schulz reference (backend/ns_bf16.rs). It lives with the CPU GEMM, a
//! leaf both import, so the optimizer and the backend folders do not import each other.

use super::matmul::gemm_f32;
use gemm::Parallelism;

/// A row-major matrix operand: `data` holds `rows x cols` as stored; `transposed` reads it as its transpose.
#[derive(Clone, Copy)]
pub struct Operand<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub transposed: bool,
}

impl<'a> Operand<'a> {
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Operand {
            data,
            rows,
            cols,
            transposed: false,
        }
    }
    pub fn t(self) -> Self {
        Operand {
            transposed: !self.transposed,
            ..self
        }
    }
    /// Shape as read (after the optional transpose).
    fn shape(&self) -> (usize, usize) {
        if self.transposed {
            (self.cols, self.rows)
        } else {
            (self.rows, self.cols)
        }
    }
    /// (row stride, column stride) of the matrix as read.
    fn strides(&self) -> (isize, isize) {
        if self.transposed {
            (1, self.cols as isize)
        } else {
            (self.cols as isize, 1)
        }
    }
}

/// `dst = alpha * dst + beta * lhs * rhs`, dst row-major (m x n). With `alpha == 0` dst is only written.
pub fn matmul(dst: &mut [f32], alpha: f32, lhs: Operand, rhs: Operand, beta: f32) {
    let (m, k) = lhs.shape();
    let (k2, n) = rhs.shape();
    assert_eq!(k, k2, "matmul: inner dimensions differ");
    assert!(dst.len() >= m * n && lhs.data.len() >= lhs.rows * lhs.cols && rhs.data.len() >= rhs.rows * rhs.cols);
    let (lrs, lcs) = lhs.strides();
    let (rrs, rcs) = rhs.strides();
    // SAFETY: the asserts above keep every index the strides reach inside the three slices, and dst does
    // not alias lhs or rhs (it is a distinct &mut).
    unsafe {
        gemm_f32(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            alpha != 0.0,
            lhs.data.as_ptr(),
            lcs,
            lrs,
            rhs.data.as_ptr(),
            rcs,
            rrs,
            alpha,
            beta,
            Parallelism::Rayon(0),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::matmul_f64::matmul_f64;
    use super::*;

    /// The f64 product of the operands as read (their transposes applied), rounded to f32.
    fn naive(lhs: Operand, rhs: Operand) -> Vec<f32> {
        let ((m, k), (_, n)) = (lhs.shape(), rhs.shape());
        let p = matmul_f64(m, n, k, lhs.data, lhs.transposed, rhs.data, rhs.transposed);
        p.value.iter().map(|&x| x as f32).collect()
    }

    #[test]
    fn matches_naive_with_transposes() {
        let a: Vec<f32> = (0..15).map(|i| (i as f32 * 0.37).sin()).collect(); // 3 x 5
        let b: Vec<f32> = (0..20).map(|i| (i as f32 * 0.11).cos()).collect(); // 5 x 4
        let c: Vec<f32> = (0..12).map(|i| (i as f32 * 0.7).sin()).collect(); // 4 x 3 (b^T is 4x5)
        let mut d = vec![0.0f32; 12];
        matmul(&mut d, 0.0, Operand::new(&a, 3, 5), Operand::new(&b, 5, 4), 1.0);
        let e = naive(Operand::new(&a, 3, 5), Operand::new(&b, 5, 4));
        d.iter()
            .zip(&e)
            .for_each(|(x, y)| assert!((x - y).abs() < 1e-5, "{x} {y}"));
        // a * a^T (3 x 3)
        let mut d = vec![0.0f32; 9];
        matmul(&mut d, 0.0, Operand::new(&a, 3, 5), Operand::new(&a, 3, 5).t(), 1.0);
        let e = naive(Operand::new(&a, 3, 5), Operand::new(&a, 3, 5).t());
        d.iter()
            .zip(&e)
            .for_each(|(x, y)| assert!((x - y).abs() < 1e-5, "{x} {y}"));
        // c^T (3 x 4) * b^T (4 x 5), accumulated onto 2 * ones with beta 0.5
        let mut d = vec![1.0f32; 15];
        matmul(&mut d, 2.0, Operand::new(&c, 4, 3).t(), Operand::new(&b, 5, 4).t(), 0.5);
        let e = naive(Operand::new(&c, 4, 3).t(), Operand::new(&b, 5, 4).t());
        d.iter()
            .zip(&e)
            .for_each(|(x, y)| assert!((x - (2.0 + 0.5 * y)).abs() < 1e-5, "{x} {y}"));
    }
}
