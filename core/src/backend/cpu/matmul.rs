//! Row-major GEMM with transposes and an accumulate flag, on the `gemm` crate.
//!
//! The crate is built with its AVX-512 kernels (feature `x86-v4`) and picks them at run time where the CPU
//! has AVX-512 F, else its AVX2 + FMA ones. Every nc GEMM goes through `gemm_f32`, which also honours
//! `NC_CPU_ISA` (isa.rs): forced below AVX-512 on an AVX-512 CPU it calls the crate's AVX2 + FMA kernels
//! itself, the ones an AVX2 machine runs.

use super::isa::{self, CpuIsa};
use crate::backend::Gemm;
use gemm::{gemm, Parallelism};

/// Below this many multiply-adds a GEMM runs on the calling thread: splitting it costs more than it saves
/// (and attention tiles call GEMMs from inside rayon tasks already).
const PARALLEL_MIN_WORK: usize = 1 << 18;

/// C (m x n) = op(A) op(B) [+ C]; see `Backend::matmul`. `threads` 0 = rayon's pool size.
pub fn matmul(threads: usize, shape: Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
    let Gemm { m, n, k, .. } = shape;
    assert!(
        a.len() >= shape.a_len() && b.len() >= shape.b_len() && c.len() >= shape.c_len(),
        "matmul {m}x{n}x{k}: views too short"
    );
    let par = if m * n * k >= PARALLEL_MIN_WORK {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: the asserts above bound every index the strides below can reach.
    unsafe { gemm_strided(shape, a.as_ptr(), b.as_ptr(), c.as_mut_ptr(), n, 1.0, par) };
}

/// C (m x n, row stride ldc) = [C +] beta * op(A) op(B) with A, B dense row-major (m x k / k x m,
/// k x n / n x k). Kernels that work on strided tiles call `gemm_raw` directly.
///
/// # Safety
/// The pointers must cover the dense extents implied by the shape (and ldc for C).
pub unsafe fn gemm_strided(
    shape: Gemm,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    beta: f32,
    par: Parallelism,
) {
    let Gemm {
        m,
        n,
        k,
        a_t,
        b_t,
        accumulate,
    } = shape;
    // (row stride, col stride) of op(A) and op(B).
    let (a_rs, a_cs) = op_strides(m, k, a_t);
    let (b_rs, b_cs) = op_strides(k, n, b_t);
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

/// (row stride, column stride) of op(X), an r x c operand stored dense row-major as r x c, or as c x r when
/// `transposed`.
fn op_strides(rows: usize, cols: usize, transposed: bool) -> (isize, isize) {
    if transposed {
        (1, rows as isize)
    } else {
        (cols as isize, 1)
    }
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
    // dst = alpha * dst + beta * lhs * rhs; alpha is read only when read_dst is true.
    gemm_f32(
        m, n, k, c, 1, c_rs, accumulate, a, a_cs, a_rs, b, b_cs, b_rs, 1.0f32, beta, par,
    );
}

/// dst (m x n) = [alpha dst +] beta lhs (m x k) rhs (k x n): the `gemm` crate's f32 call (strides as it takes
/// them, column stride first; no conjugation), on the kernels of the vector level this process uses.
///
/// # Safety
/// As `gemm::gemm`: every element the strides address must be in bounds, dst must not alias lhs or rhs, and
/// the strides must not be negative.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_cs: isize,
    dst_rs: isize,
    read_dst: bool,
    lhs: *const f32,
    lhs_cs: isize,
    lhs_rs: isize,
    rhs: *const f32,
    rhs_cs: isize,
    rhs_rs: isize,
    alpha: f32,
    beta: f32,
    par: Parallelism,
) {
    #[cfg(target_arch = "x86_64")]
    if isa::selected() < CpuIsa::Avx512 && CpuIsa::detected() == CpuIsa::Avx512 {
        if let Some(simd) = <fma_path::V3 as fma_path::MixedSimd<f32, f32, f32, f32>>::try_new() {
            let args = (dst_cs, dst_rs, read_dst, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs);
            fma_path::gemm(simd, m, n, k, dst, args, alpha, beta, par);
            return;
        }
    }
    gemm(
        m, n, k, dst, dst_cs, dst_rs, read_dst, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs, alpha, beta, false, false,
        false, par,
    );
}

/// The crate's AVX2 + FMA f32 kernels called directly: on an AVX-512 CPU `gemm::gemm` always takes its
/// AVX-512 kernels, so forcing the AVX2 path needs the generic driver with the FMA microkernel tables, which
/// is what the crate's own AVX2 entry point is (8 f32 lanes per vector).
#[cfg(target_arch = "x86_64")]
mod fma_path {
    use gemm::Parallelism;
    use gemm_common::gemm::gemm_basic_generic;
    pub use gemm_common::simd::{MixedSimd, V3};
    use gemm_f32::microkernel::fma::f32::{H_M, H_N, H_UKR, MR_DIV_N, NR, UKR};

    /// f32 lanes of one AVX2 vector: the microkernels' N.
    const LANES: usize = 8;

    /// dst = [alpha dst +] beta lhs rhs with gemm::gemm's arguments (`args` = dst_cs, dst_rs, read_dst, lhs,
    /// lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs).
    ///
    /// # Safety
    /// As `super::gemm_f32`.
    #[allow(clippy::type_complexity)]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm(
        simd: V3,
        m: usize,
        n: usize,
        k: usize,
        dst: *mut f32,
        args: (isize, isize, bool, *const f32, isize, isize, *const f32, isize, isize),
        alpha: f32,
        beta: f32,
        par: Parallelism,
    ) {
        let (dst_cs, dst_rs, read_dst, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs) = args;
        debug_assert!(dst_cs >= 0 && dst_rs >= 0 && lhs_cs >= 0 && lhs_rs >= 0 && rhs_cs >= 0 && rhs_rs >= 0);
        // The microkernels run down columns of dst. A row-major dst is computed as its transpose,
        // C^T = rhs^T lhs^T, as gemm::gemm does: same kernels, same blocking, same bits as an AVX2 machine.
        let (m, n, dst_cs, dst_rs, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs) = if dst_cs < dst_rs {
            (n, m, dst_rs, dst_cs, rhs, rhs_rs, rhs_cs, lhs, lhs_rs, lhs_cs)
        } else {
            (m, n, dst_cs, dst_rs, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs)
        };
        gemm_basic_generic::<V3, f32, LANES, { MR_DIV_N * LANES }, NR, MR_DIV_N, H_M, H_N>(
            simd,
            m,
            n,
            k,
            dst,
            dst_cs,
            dst_rs,
            read_dst,
            lhs,
            lhs_cs,
            lhs_rs,
            rhs,
            rhs_cs,
            rhs_rs,
            alpha,
            beta,
            false,
            false,
            false,
            |a, b, c| a * b + c,
            &UKR,
            &H_UKR,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::matmul_f64::matmul_f64;
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Runs one GEMM through `gemm::gemm` (the crate's own dispatch: AVX-512 where the CPU has it) and through
    /// the directly called AVX2 + FMA kernels.
    #[cfg(target_arch = "x86_64")]
    fn both_paths(shape: Gemm, a: &[f32], b: &[f32], c0: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let Gemm {
            m,
            n,
            k,
            accumulate: acc,
            ..
        } = shape;
        let (a_rs, a_cs) = op_strides(m, k, shape.a_t);
        let (b_rs, b_cs) = op_strides(k, n, shape.b_t);
        let (mut wide, mut narrow) = (c0.to_vec(), c0.to_vec());
        let simd = <fma_path::V3 as fma_path::MixedSimd<f32, f32, f32, f32>>::try_new().expect("AVX2 + FMA");
        // SAFETY: dense operands of the stated shapes; C is m x n, row stride n.
        unsafe {
            gemm(
                m,
                n,
                k,
                wide.as_mut_ptr(),
                1,
                n as isize,
                acc,
                a.as_ptr(),
                a_cs,
                a_rs,
                b.as_ptr(),
                b_cs,
                b_rs,
                1.0,
                0.5,
                false,
                false,
                false,
                Parallelism::None,
            );
            let args = (1, n as isize, acc, a.as_ptr(), a_cs, a_rs, b.as_ptr(), b_cs, b_rs);
            fma_path::gemm(simd, m, n, k, narrow.as_mut_ptr(), args, 1.0, 0.5, Parallelism::None);
        }
        (wide, narrow)
    }

    /// Shapes with one depth block (k <= 256) and several, every transpose pair, accumulating or not.
    #[cfg(target_arch = "x86_64")]
    const SHAPES: [(usize, usize, usize); 6] = [
        (5, 7, 3),
        (64, 64, 128),
        (128, 300, 256),
        (100, 33, 1000),
        (256, 1024, 256),
        (37, 513, 4100),
    ];

    /// Both vector paths compute the product to f32 accuracy: every element within 4 k eps sum|a b| (+ |c|) of
    /// the f64 value. On an AVX2-only CPU both calls take the same kernels and must agree to the bit; on an
    /// AVX-512 CPU they agree to the bit while k fits one of the crate's depth blocks (256 here) and differ in
    /// the last bits beyond (the 16-lane kernels block k differently), which is why GEMM results depend on
    /// the machine (BENCHMARKS.md and docs/cpu_isa.md say so).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_kernels_and_crate_dispatch_agree() {
        if CpuIsa::detected() < CpuIsa::Avx2 {
            eprintln!("no AVX2 + FMA on this CPU: nothing to compare");
            return;
        }
        for (s, &(m, n, k)) in SHAPES.iter().enumerate() {
            for (a_t, b_t, acc) in [
                (false, false, false),
                (false, true, true),
                (true, false, true),
                (true, true, false),
            ] {
                let a = values(m * k, 3 * s as u64 + 1);
                let b = values(k * n, 3 * s as u64 + 2);
                let c0 = values(m * n, 3 * s as u64 + 3);
                let shape = Gemm::nn(m, n, k).transposed(a_t, b_t).accumulating(acc);
                let (wide, narrow) = both_paths(shape, &a, &b, &c0);
                let exact = matmul_f64(m, n, k, &a, a_t, &b, b_t);
                for (name, got) in [("crate dispatch", &wide), ("AVX2 kernels", &narrow)] {
                    for i in 0..m * n {
                        let old = if acc { c0[i] as f64 } else { 0.0 };
                        let want = old + 0.5 * exact.value[i];
                        let bound =
                            4.0 * k as f64 * f32::EPSILON as f64 * (0.5 * exact.magnitude[i] + old.abs()) + 1e-30;
                        let err = (got[i] as f64 - want).abs();
                        assert!(
                            err <= bound,
                            "{name} {m}x{n}x{k} a_t {a_t} b_t {b_t} acc {acc} [{i}]: error {err:e} > {bound:e}"
                        );
                    }
                }
                if CpuIsa::detected() == CpuIsa::Avx2 || k <= 256 {
                    let same = wide.iter().zip(&narrow).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(
                        same,
                        "{m}x{n}x{k} a_t {a_t} b_t {b_t} acc {acc}: the two paths differ in bits"
                    );
                }
            }
        }
    }
}
