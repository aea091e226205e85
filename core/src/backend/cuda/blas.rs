//! `Backend::matmul` on cuBLAS: the row-major contract mapped onto column-major `cublasSgemm`.
//!
//! A row-major (r x c) matrix is, read column-major, its transpose (c x r) with leading dimension c. So the
//! row-major C = op(A) op(B) (m x n) is, read column-major, C^T = op(B)^T op(A)^T (n x m, ldc = n): one
//! sgemm with the operands swapped (B's memory first, A's second), M = n, N = m, and each operand's op
//! T exactly where the row-major call transposes it:
//! - B stored k x n (b_t false) reads as the n x k matrix op(B)^T itself: op N, ld n;
//!   B stored n x k (b_t true) reads as k x n = op(B), whose transpose we need: op T, ld k.
//! - A stored m x k (a_t false) reads as the k x m matrix op(A)^T itself: op N, ld k;
//!   A stored k x m (a_t true) reads as m x k = op(A): op T, ld m.
//!
//! Strict f32: the handle keeps CUBLAS_DEFAULT_MATH (set explicitly at construction), which never uses
//! TF32 tensor cores for sgemm, so results agree with the CPU GEMM to f32 rounding. beta = 1 accumulates
//! into C; beta = 0 overwrites it without reading it (stale NaNs in C do not leak, as on the CPU).

use super::libs::{check, check_major, Cublas};
use crate::backend::Gemm;
use crate::error::Result;
use cudarc::cublas::sys::{cublasHandle_t, cublasMath_t, cublasOperation_t};

/// The arguments of one `cublasSgemm` call (besides the pointers and alpha = 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct SgemmCall {
    /// Op and leading dimension of cuBLAS's first operand: the row-major B.
    pub op_first: cublasOperation_t,
    pub ld_first: i32,
    /// Op and leading dimension of cuBLAS's second operand: the row-major A.
    pub op_second: cublasOperation_t,
    pub ld_second: i32,
    /// cuBLAS's M, N, K (rows of column-major C, its columns, the inner dimension) = n, m, k.
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub ldc: i32,
    /// 1 to accumulate into C, 0 to overwrite.
    pub beta: f32,
}

fn as_int(v: usize, what: &str) -> i32 {
    i32::try_from(v).unwrap_or_else(|_| panic!("matmul: {what} = {v} does not fit cuBLAS's 32-bit int"))
}

/// The sgemm that computes the row-major `Backend::matmul(shape, a, b, c)`.
/// m, n and k must be at least 1 (the caller handles empty products). Leading dimensions are at least 1
/// as cuBLAS requires, which they are whenever m, n, k are.
pub(crate) fn sgemm_call(shape: Gemm) -> SgemmCall {
    let Gemm {
        m,
        n,
        k,
        a_t,
        b_t,
        accumulate,
    } = shape;
    assert!(m > 0 && n > 0 && k > 0, "sgemm_call: empty product {m}x{n}x{k}");
    let (op_first, ld_first) = if b_t {
        (cublasOperation_t::CUBLAS_OP_T, k)
    } else {
        (cublasOperation_t::CUBLAS_OP_N, n)
    };
    let (op_second, ld_second) = if a_t {
        (cublasOperation_t::CUBLAS_OP_T, m)
    } else {
        (cublasOperation_t::CUBLAS_OP_N, k)
    };
    SgemmCall {
        op_first,
        ld_first: as_int(ld_first, "leading dimension of B"),
        op_second,
        ld_second: as_int(ld_second, "leading dimension of A"),
        m: as_int(n, "n"),
        n: as_int(m, "m"),
        k: as_int(k, "k"),
        ldc: as_int(n, "n"),
        beta: if accumulate { 1.0 } else { 0.0 },
    }
}

/// The cuBLAS library and one handle on the backend's stream, for the strict-f32 GEMMs.
pub(crate) struct Sgemm {
    handle: cublasHandle_t,
    lib: Cublas,
}

// SAFETY: cuBLAS handles may be used from any thread (cuBLAS is thread-safe with a shared handle as long as
// the stream and workspace are not changed concurrently, and they are set once, here, before sharing).
unsafe impl Send for Sgemm {}
unsafe impl Sync for Sgemm {}

impl Sgemm {
    /// Open cuBLAS (versioned soname first, see `libs.rs`), check it is CUDA 13's, create a handle on
    /// `stream` in strict f32 (CUBLAS_DEFAULT_MATH never rounds sgemm inputs to TF32). The caller has made
    /// the backend's context current.
    pub(crate) fn new(stream: *mut std::ffi::c_void) -> Result<Self> {
        let lib = Cublas::load()?;
        let mut handle: cublasHandle_t = std::ptr::null_mut();
        // SAFETY: `handle` is a valid out-pointer.
        check(unsafe { (lib.create)(&mut handle) }, "cublasCreate")?;
        let sgemm = Sgemm { handle, lib };
        let mut version = 0;
        // SAFETY: the handle is live.
        check(
            unsafe { (sgemm.lib.get_version)(sgemm.handle, &mut version) },
            "cublasGetVersion",
        )?;
        check_major(&sgemm.lib.file, version.max(0) as usize)?;
        // SAFETY: the handle is live and the stream belongs to the current context.
        check(
            unsafe { (sgemm.lib.set_stream)(sgemm.handle, stream as _) },
            "cublasSetStream",
        )?;
        sgemm.set_tf32(false)?;
        Ok(sgemm)
    }

    /// TF32 tensor-core math for sgemm (`on`), or strict f32 (the default).
    pub(crate) fn set_tf32(&self, on: bool) -> Result<()> {
        let mode = if on {
            cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
        } else {
            cublasMath_t::CUBLAS_DEFAULT_MATH
        };
        // SAFETY: the handle is live.
        check(
            unsafe { (self.lib.set_math_mode)(self.handle, mode) },
            "cublasSetMathMode",
        )
    }

    /// Run `call` on raw device addresses: `first` is the row-major B, `second` the row-major A, `c` the
    /// row-major C, each already offset to its view.
    ///
    /// # Safety
    /// The addresses must be valid f32 storage on the handle's stream for the extents `call` implies (the
    /// caller asserts each view's length against m, n, k).
    pub(crate) unsafe fn run(&self, call: &SgemmCall, first: u64, second: u64, c: u64) -> Result<()> {
        let alpha = 1.0f32;
        let status = (self.lib.sgemm)(
            self.handle,
            call.op_first,
            call.op_second,
            call.m,
            call.n,
            call.k,
            &alpha,
            first as *const f32,
            call.ld_first,
            second as *const f32,
            call.ld_second,
            &call.beta,
            c as *mut f32,
            call.ldc,
        );
        check(status, &format!("cublasSgemm {}x{}x{}", call.n, call.m, call.k))
    }
}

impl Drop for Sgemm {
    fn drop(&mut self) {
        // SAFETY: the handle is live and dropped once.
        if let Err(e) = check(unsafe { (self.lib.destroy)(self.handle) }, "cublasDestroy") {
            eprintln!("warning: CUDA backend teardown: {e}");
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    //! The mapping checked on the host: a plain column-major sgemm (what cuBLAS computes, by its
    //! definition) run with `sgemm_call`'s arguments must match the CPU backend's row-major matmul.

    use super::*;
    use crate::backend::cpu::{CpuBackend, CpuBuf};
    use crate::backend::{Backend, View, ViewMut};

    /// C = alpha op(A) op(B) + beta C, column-major, the BLAS definition (f64 accumulation: the test
    /// compares index mappings, not rounding).
    #[allow(clippy::too_many_arguments)]
    fn reference_sgemm(call: &SgemmCall, a: &[f32], b: &[f32], c: &mut [f32]) {
        let (m, n, k) = (call.m as usize, call.n as usize, call.k as usize);
        let (lda, ldb, ldc) = (call.ld_first as usize, call.ld_second as usize, call.ldc as usize);
        let at = |i: usize, p: usize| match call.op_first {
            cublasOperation_t::CUBLAS_OP_N => a[i + p * lda],
            _ => a[p + i * lda],
        };
        let bt = |p: usize, j: usize| match call.op_second {
            cublasOperation_t::CUBLAS_OP_N => b[p + j * ldb],
            _ => b[j + p * ldb],
        };
        for j in 0..n {
            for i in 0..m {
                let dot: f64 = (0..k).map(|p| at(i, p) as f64 * bt(p, j) as f64).sum();
                let old = if call.beta == 0.0 {
                    0.0
                } else {
                    call.beta as f64 * c[i + j * ldc] as f64
                };
                c[i + j * ldc] = (dot + old) as f32;
            }
        }
    }

    /// Values in [-1, 1) from an index hash (no RNG state to thread through); blas_lt's tests use them too.
    pub(in crate::backend::cuda) fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let x = (i as u32)
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(seed.wrapping_mul(40_503));
                (x % 1000) as f32 / 500.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn sgemm_mapping_matches_the_row_major_contract() {
        let cpu = CpuBackend::new();
        let (m, n, k) = (5, 7, 3);
        for a_t in [false, true] {
            for b_t in [false, true] {
                for accumulate in [false, true] {
                    let a = values(m * k, 1);
                    let b = values(k * n, 2);
                    let c0 = values(m * n, 3);
                    let mut want = CpuBuf::f32(c0.clone());
                    let (abuf, bbuf) = (CpuBuf::f32(a.clone()), CpuBuf::f32(b.clone()));
                    let shape = Gemm::nn(m, n, k).transposed(a_t, b_t).accumulating(accumulate);
                    cpu.matmul(shape, View::all(&abuf), View::all(&bbuf), ViewMut::all(&mut want));
                    let call = sgemm_call(shape);
                    let mut got = c0.clone();
                    // cuBLAS's first operand is the row-major B, its second the row-major A.
                    reference_sgemm(&call, &b, &a, &mut got);
                    for (i, (g, w)) in got.iter().zip(&want.0).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                            "a_t {a_t} b_t {b_t} accumulate {accumulate}: C[{i}] = {g}, CPU {w}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn leading_dimensions_are_legal_for_cublas() {
        // cuBLAS: lda >= max(1, rows of the stored first operand) and likewise for ldb, ldc >= M.
        for (m, n, k) in [(1, 1, 1), (3, 9, 4), (64, 2, 130)] {
            for a_t in [false, true] {
                for b_t in [false, true] {
                    let c = sgemm_call(Gemm::nn(m, n, k).transposed(a_t, b_t));
                    let rows_first = if c.op_first == cublasOperation_t::CUBLAS_OP_N {
                        c.m
                    } else {
                        c.k
                    };
                    let rows_second = if c.op_second == cublasOperation_t::CUBLAS_OP_N {
                        c.k
                    } else {
                        c.n
                    };
                    assert!(c.ld_first >= rows_first.max(1));
                    assert!(c.ld_second >= rows_second.max(1));
                    assert!(c.ldc >= c.m.max(1));
                }
            }
        }
    }
}
