//! The f64 product that every GEMM test checks an f32 GEMM against (the CPU GEMM's own tests, the host
//! optimizer's wrapper, the CUDA backend's parity tests): one copy, exported for the test crates.

/// `op(A) op(B)` in f64, row-major m x n, and per element the sum of the products' magnitudes
/// (sum_p |op(A)_ip op(B)_pj|): the scale an f32 dot product's rounding error grows with.
pub struct ProductF64 {
    pub value: Vec<f64>,
    pub magnitude: Vec<f64>,
}

/// `op(A)` is m x k: A is stored m x k, or k x m when `a_t`; `op(B)` is k x n: B is stored k x n, or n x k
/// when `b_t` (the layouts of `Backend::matmul`).
#[allow(clippy::too_many_arguments)]
pub fn matmul_f64(m: usize, n: usize, k: usize, a: &[f32], a_t: bool, b: &[f32], b_t: bool) -> ProductF64 {
    assert!(
        a.len() >= m * k && b.len() >= k * n,
        "matmul_f64 {m}x{n}x{k}: operands too short"
    );
    let mut value = vec![0.0f64; m * n];
    let mut magnitude = vec![0.0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let (mut sum, mut sum_abs) = (0.0f64, 0.0f64);
            for p in 0..k {
                let x = if a_t { a[p * m + i] } else { a[i * k + p] } as f64;
                let y = if b_t { b[j * k + p] } else { b[p * n + j] } as f64;
                sum += x * y;
                sum_abs += (x * y).abs();
            }
            value[i * n + j] = sum;
            magnitude[i * n + j] = sum_abs;
        }
    }
    ProductF64 { value, magnitude }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2 x 3 times 3 x 2 product worked by hand, read through each transpose.
    #[test]
    fn hand_worked_product_through_every_transpose() {
        let a = [1.0f32, -2.0, 3.0, 0.5, 4.0, -1.0]; // 2 x 3
        let b = [2.0f32, 1.0, -1.0, 0.0, 0.25, 3.0]; // 3 x 2
        let want = [
            1.0 * 2.0 + 2.0 * 1.0 + 3.0 * 0.25,
            1.0 + 9.0,
            1.0 - 4.0 - 0.25,
            0.5 - 3.0,
        ];
        let want_abs = [2.0 + 2.0 + 0.75, 1.0 + 9.0, 1.0 + 4.0 + 0.25, 0.5 + 3.0];
        let a_t = [1.0f32, 0.5, -2.0, 4.0, 3.0, -1.0]; // A stored as its transpose, 3 x 2
        let b_t = [2.0f32, -1.0, 0.25, 1.0, 0.0, 3.0]; // B stored as its transpose, 2 x 3
        for (a, at, b, bt) in [
            (&a, false, &b, false),
            (&a_t, true, &b, false),
            (&a, false, &b_t, true),
            (&a_t, true, &b_t, true),
        ] {
            let p = matmul_f64(2, 2, 3, a, at, b, bt);
            assert_eq!(p.value, want, "a_t {at} b_t {bt}");
            assert_eq!(p.magnitude, want_abs, "a_t {at} b_t {bt}");
        }
    }
}
