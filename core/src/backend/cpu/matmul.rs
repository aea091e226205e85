//! Row-major GEMM with transposes and an accumulate flag, on the `gemm` crate.

use gemm::{gemm, Parallelism};

/// Below this many multiply-adds a GEMM runs on the calling thread: splitting it costs more than it saves
/// (and attention tiles call GEMMs from inside rayon tasks already).
const PARALLEL_MIN_WORK: usize = 1 << 18;

/// C (m x n) = op(A) op(B) [+ C]; see `Backend::matmul`. `threads` 0 = rayon's pool size.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    threads: usize,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_t: bool,
    b: &[f32],
    b_t: bool,
    c: &mut [f32],
    accumulate: bool,
) {
    assert!(
        a.len() >= m * k && b.len() >= k * n && c.len() >= m * n,
        "matmul {m}x{n}x{k}: views too short"
    );
    let par = if m * n * k >= PARALLEL_MIN_WORK {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: the asserts above bound every index the strides below can reach.
    unsafe {
        gemm_strided(
            m,
            n,
            k,
            a.as_ptr(),
            a_t,
            b.as_ptr(),
            b_t,
            c.as_mut_ptr(),
            n,
            accumulate,
            1.0,
            par,
        )
    };
}

/// C (m x n, row stride ldc) = [C +] beta * op(A) op(B) with A, B dense row-major (m x k / k x m,
/// k x n / n x k). Kernels that work on strided tiles call `gemm_raw` directly.
///
/// # Safety
/// The pointers must cover the dense extents implied by the shapes (and ldc for C).
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    a_t: bool,
    b: *const f32,
    b_t: bool,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    beta: f32,
    par: Parallelism,
) {
    // (row stride, col stride) of op(A) and op(B).
    let (a_rs, a_cs) = if a_t { (1, m as isize) } else { (k as isize, 1) };
    let (b_rs, b_cs) = if b_t { (1, k as isize) } else { (n as isize, 1) };
    gemm_raw(
        m,
        n,
        k,
        a,
        a_rs,
        a_cs,
        b,
        b_rs,
        b_cs,
        c,
        ldc as isize,
        accumulate,
        beta,
        par,
    );
}

/// C = [C +] beta * A B with explicit (row, col) strides for A (m x k), B (k x n) and C's row stride.
///
/// # Safety
/// Every element the strides address must be in bounds.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_raw(
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    a_rs: isize,
    a_cs: isize,
    b: *const f32,
    b_rs: isize,
    b_cs: isize,
    c: *mut f32,
    c_rs: isize,
    accumulate: bool,
    beta: f32,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    *c.offset(i as isize * c_rs + j as isize) = 0.0;
                }
            }
        }
        return;
    }
    // gemm computes dst = alpha * dst + beta * lhs * rhs; alpha is read only when read_dst is true.
    gemm(
        m, n, k, c, 1, c_rs, accumulate, a, a_cs, a_rs, b, b_cs, b_rs, 1.0f32, beta, false, false, false, par,
    );
}
