//! GEMMs on cuBLASLt: bf16 (or f32) inputs, f32 accumulation, bf16 or f32 output as the destination's
//! storage says, alpha and beta free (beta = 1 accumulates into the destination in place), and strided
//! batches (Newton-Schulz over all same-shape matrices in one call).
//!
//! Layout: the row-major contract of `Backend::matmul` becomes the column-major product of `blas.rs`
//! (C^T = op(B)^T op(A)^T: cuBLASLt's first operand is the row-major B, its second the row-major A, and
//! M = n, N = m), with the same ops and leading dimensions; `lt_call` derives it from `sgemm_call`, so the
//! two paths cannot disagree about the mapping. The tests emulate what cuBLASLt computes from the layouts
//! (the BLAS definition) on the host and compare with the CPU backend's row-major matmul.
//!
//! Planning: a matmul descriptor, four matrix layouts and the heuristic's first algorithm are made once per
//! `GemmKey` (shape, transposes, batch and strides, element types, whether C is read, and the pointers'
//! alignment, which bounds the algorithms the heuristic may pick) and cached; a training step repeats a
//! few dozen keys, so after the first step no call plans. `PlanCache` is generic over its `Planner` so the
//! caching is tested on the host with a counting fake.
//!
//! Element types: cuBLASLt with CUBLAS_COMPUTE_32F takes A and B both bf16 (D bf16 or f32) or both f32 (D
//! f32); `lt_types` refuses anything else, and the backend converts before calling (mod.rs says where).
//!
//! Unverified: nothing here has run on a GPU (the session that wrote it had none).

use super::libs::{check, CublasLt, Status};
use super::memory::Block;
use crate::backend::Gemm;
use crate::error::{NcError, Result};
use cudarc::cublaslt::sys as lt;
use nc_alloc::CudaSource;
use std::collections::HashMap;
use std::ffi::c_void;

/// An element type a GEMM operand is stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Elem {
    F32,
    Bf16,
}

impl Elem {
    fn cuda_type(self) -> lt::cudaDataType_t {
        match self {
            Elem::F32 => lt::cudaDataType_t::CUDA_R_32F,
            Elem::Bf16 => lt::cudaDataType_t::CUDA_R_16BF,
        }
    }
}

/// cuBLASLt's alignment preferences go up to 256 bytes (its default assumption); pointers less aligned
/// than an algorithm needs must exclude it, so the alignment is part of the plan.
pub(crate) const MAX_ALIGNMENT: u32 = 256;

/// The largest power of two (at most 256) dividing a device address.
pub(crate) fn alignment(addr: u64) -> u32 {
    if addr == 0 {
        return MAX_ALIGNMENT;
    }
    (1u64 << addr.trailing_zeros().min(8)) as u32
}

/// Everything a plan depends on. Sizes and strides in elements, row-major as `Backend::matmul` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct GemmKey {
    /// Sizes and transposes of each product; `accumulate`: whether C is read (beta != 0).
    pub shape: Gemm,
    pub a: Elem,
    pub b: Elem,
    pub c: Elem,
    /// 1 for a single product; strides are then unused (0).
    pub batch: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
    /// `alignment` of the A, B and C pointers (of the first matrix of a batch).
    pub align_a: u32,
    pub align_b: u32,
    pub align_c: u32,
}

/// One column-major matrix layout as cuBLASLt's `cublasLtMatrixLayoutCreate` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LtLayout {
    pub elem: Elem,
    /// Rows and columns of the matrix as stored (before its op).
    pub rows: u64,
    pub cols: u64,
    pub ld: i64,
    pub batch: i32,
    pub stride: i64,
}

/// The column-major call for a key: ops (0 = N, 1 = T) and layouts of cuBLASLt's operands. `first` is the
/// row-major B, `second` the row-major A, `c` the row-major C (C and D share one layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LtCall {
    pub op_first: i32,
    pub op_second: i32,
    pub first: LtLayout,
    pub second: LtLayout,
    pub c: LtLayout,
}

fn as_i32(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| NcError::new(format!("cuBLASLt GEMM: {what} = {v} does not fit a 32-bit int")))
}

/// Whether cuBLASLt (CUBLAS_COMPUTE_32F, f32 scale) takes these element types.
pub(crate) fn lt_types_supported(a: Elem, b: Elem, c: Elem) -> bool {
    matches!(
        (a, b, c),
        (Elem::Bf16, Elem::Bf16, _) | (Elem::F32, Elem::F32, Elem::F32)
    )
}

/// The column-major call that computes the row-major `key` (see the module comment).
pub(crate) fn lt_call(key: &GemmKey) -> Result<LtCall> {
    if !lt_types_supported(key.a, key.b, key.c) {
        return Err(NcError::new(format!(
            "cuBLASLt GEMM: inputs {:?} x {:?} into {:?} is not a supported combination (both bf16, or all f32)",
            key.a, key.b, key.c
        )));
    }
    let Gemm { m, n, k, .. } = key.shape;
    if key.batch == 0 || m == 0 || n == 0 || k == 0 {
        return Err(NcError::new(format!(
            "cuBLASLt GEMM: empty product {m}x{n}x{k} batch {}",
            key.batch
        )));
    }
    let s = super::blas::sgemm_call(key.shape);
    let (big_m, big_n, big_k) = (s.m as u64, s.n as u64, s.k as u64);
    let op = |o: cudarc::cublas::sys::cublasOperation_t| match o {
        cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N => 0,
        _ => 1,
    };
    let batch = as_i32(key.batch, "batch")?;
    let stride = |v: usize| if key.batch > 1 { v as i64 } else { 0 };
    // Stored shapes: an operand used as is (N) is stored with the op's rows x cols; transposed (T), the
    // other way round. First: op(first) is M x K. Second: op(second) is K x N. C: M x N.
    let (op_first, op_second) = (op(s.op_first), op(s.op_second));
    let first = LtLayout {
        elem: key.b,
        rows: if op_first == 0 { big_m } else { big_k },
        cols: if op_first == 0 { big_k } else { big_m },
        ld: s.ld_first as i64,
        batch,
        stride: stride(key.stride_b),
    };
    let second = LtLayout {
        elem: key.a,
        rows: if op_second == 0 { big_k } else { big_n },
        cols: if op_second == 0 { big_n } else { big_k },
        ld: s.ld_second as i64,
        batch,
        stride: stride(key.stride_a),
    };
    let c = LtLayout {
        elem: key.c,
        rows: big_m,
        cols: big_n,
        ld: s.ldc as i64,
        batch,
        stride: stride(key.stride_c),
    };
    Ok(LtCall {
        op_first,
        op_second,
        first,
        second,
        c,
    })
}

/// Makes a plan for a key (the real one asks cuBLASLt; the tests count calls).
pub(crate) trait Planner {
    type Plan;
    fn plan(&mut self, key: &GemmKey, call: &LtCall) -> Result<Self::Plan>;
}

/// Plans by key, made on first use and kept.
pub(crate) struct PlanCache<P: Planner> {
    /// Plans first, so they are destroyed before the planner's handle.
    plans: HashMap<GemmKey, P::Plan>,
    planner: P,
    /// Calls that found their plan cached / had to plan (for tests and the end-of-run summary).
    pub hits: u64,
    pub misses: u64,
}

impl<P: Planner> PlanCache<P> {
    pub(crate) fn new(planner: P) -> Self {
        PlanCache {
            planner,
            plans: HashMap::new(),
            hits: 0,
            misses: 0,
        }
    }

    /// The plan for `key`, planned now if this is the first call with it. A failed plan is not cached (the
    /// error goes back to the caller, and a later call tries again).
    pub(crate) fn get(&mut self, key: &GemmKey) -> Result<(&P, &P::Plan)> {
        if self.plans.contains_key(key) {
            self.hits += 1;
        } else {
            let call = lt_call(key)?;
            let plan = self.planner.plan(key, &call)?;
            self.misses += 1;
            self.plans.insert(*key, plan);
        }
        Ok((&self.planner, &self.plans[key]))
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.plans.len()
    }
}

/// Bytes of cuBLASLt workspace: 32 MiB, what NVIDIA recommends for Hopper (Ampere needs 4 MiB); taken from
/// the caching allocator once, at the first cuBLASLt GEMM, so `--precision fp32` runs never hold it.
pub(crate) const WORKSPACE_BYTES: usize = 32 << 20;

/// A descriptor, its layouts and the heuristic's algorithm, destroyed with the plan.
pub(crate) struct LtPlan {
    desc: lt::cublasLtMatmulDesc_t,
    first: lt::cublasLtMatrixLayout_t,
    second: lt::cublasLtMatrixLayout_t,
    c: lt::cublasLtMatrixLayout_t,
    algo: lt::cublasLtMatmulAlgo_t,
    destroy_desc: unsafe extern "C" fn(lt::cublasLtMatmulDesc_t) -> Status,
    destroy_layout: unsafe extern "C" fn(lt::cublasLtMatrixLayout_t) -> Status,
}

impl Drop for LtPlan {
    fn drop(&mut self) {
        // SAFETY: each handle was created by the plan and is destroyed once.
        let results = unsafe {
            [
                (self.destroy_layout)(self.first),
                (self.destroy_layout)(self.second),
                (self.destroy_layout)(self.c),
                (self.destroy_desc)(self.desc),
            ]
        };
        for status in results {
            if let Err(e) = check(status, "destroying a cuBLASLt plan") {
                eprintln!("warning: {e}");
            }
        }
    }
}

/// The real planner: the cuBLASLt library, its handle and the workspace every plan may use.
pub(crate) struct LtPlanner {
    lib: CublasLt,
    handle: lt::cublasLtHandle_t,
    workspace: Block<CudaSource>,
}

impl LtPlanner {
    pub(crate) fn new(lib: CublasLt, workspace: Block<CudaSource>) -> Result<Self> {
        let mut handle: lt::cublasLtHandle_t = std::ptr::null_mut();
        // SAFETY: a valid out-pointer.
        check(unsafe { (lib.create)(&mut handle) }, "cublasLtCreate")?;
        Ok(LtPlanner { lib, handle, workspace })
    }

    fn layout(&self, l: &LtLayout) -> Result<lt::cublasLtMatrixLayout_t> {
        let mut layout: lt::cublasLtMatrixLayout_t = std::ptr::null_mut();
        // SAFETY: a valid out-pointer; sizes come from `lt_call`.
        check(
            unsafe { (self.lib.layout_create)(&mut layout, l.elem.cuda_type(), l.rows, l.cols, l.ld) },
            "cublasLtMatrixLayoutCreate",
        )?;
        if l.batch > 1 {
            use lt::cublasLtMatrixLayoutAttribute_t as A;
            let set = |attr: A, value: *const c_void, size: usize| {
                // SAFETY: the layout is live; value points at `size` bytes of the attribute's type.
                check(
                    unsafe { (self.lib.layout_set)(layout, attr, value, size) },
                    "cublasLtMatrixLayoutSetAttribute",
                )
            };
            let result = set(A::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &l.batch as *const i32 as _, 4).and_then(|_| {
                set(
                    A::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                    &l.stride as *const i64 as _,
                    8,
                )
            });
            if let Err(e) = result {
                // SAFETY: created above, not yet owned by a plan.
                unsafe { (self.lib.layout_destroy)(layout) };
                return Err(e);
            }
        }
        Ok(layout)
    }

    /// Run a planned GEMM: D = alpha op(A) op(B) + beta C, C and D in the same layout (C may be D itself, in
    /// place; Newton-Schulz reads C from one buffer and writes D to another, optim_bf16.rs). Addresses are the
    /// row-major A, B, C and D of the key, already offset to their views.
    ///
    /// # Safety
    /// The addresses must hold the extents the key implies, in the key's element types, on `stream`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn run(
        &self,
        plan: &LtPlan,
        alpha: f32,
        a: u64,
        b: u64,
        beta: f32,
        c: u64,
        d: u64,
        stream: *mut c_void,
    ) -> Result<()> {
        let status = (self.lib.matmul)(
            self.handle,
            plan.desc,
            &alpha as *const f32 as _,
            b as *const c_void,
            plan.first,
            a as *const c_void,
            plan.second,
            &beta as *const f32 as _,
            c as *const c_void,
            plan.c,
            d as *mut c_void,
            plan.c,
            &plan.algo,
            self.workspace.addr() as *mut c_void,
            WORKSPACE_BYTES,
            stream as lt::cudaStream_t,
        );
        check(status, "cublasLtMatmul")
    }
}

/// Open cuBLASLt (CUDA 13 soname first, version checked) and take its workspace from the allocator.
pub(crate) fn load_with_workspace(
    memory: &std::sync::Arc<super::memory::DeviceMemory<CudaSource>>,
) -> Result<LtPlanner> {
    let lib = CublasLt::load()?;
    let workspace = memory.block(WORKSPACE_BYTES, 1, "the cuBLASLt workspace")?;
    LtPlanner::new(lib, workspace)
}

impl Drop for LtPlanner {
    fn drop(&mut self) {
        // SAFETY: created in new, destroyed once (plans are dropped before the planner: see PlanCache).
        if let Err(e) = check(unsafe { (self.lib.destroy)(self.handle) }, "cublasLtDestroy") {
            eprintln!("warning: CUDA backend teardown: {e}");
        }
    }
}

// SAFETY: cuBLASLt handles and descriptors may be used from any thread; the backend keeps the cache behind
// a mutex, so no two threads plan at once.
unsafe impl Send for LtPlanner {}
unsafe impl Send for LtPlan {}

impl Planner for LtPlanner {
    type Plan = LtPlan;

    fn plan(&mut self, key: &GemmKey, call: &LtCall) -> Result<LtPlan> {
        let lib = &self.lib;
        let mut desc: lt::cublasLtMatmulDesc_t = std::ptr::null_mut();
        // SAFETY: a valid out-pointer.
        check(
            unsafe {
                (lib.desc_create)(
                    &mut desc,
                    lt::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    lt::cudaDataType_t::CUDA_R_32F,
                )
            },
            "cublasLtMatmulDescCreate",
        )?;
        // From here on the plan owns what is made, so an error drops (destroys) it.
        let mut plan = LtPlan {
            desc,
            first: std::ptr::null_mut(),
            second: std::ptr::null_mut(),
            c: std::ptr::null_mut(),
            algo: lt::cublasLtMatmulAlgo_t { data: [0; 8] },
            destroy_desc: lib.desc_destroy,
            destroy_layout: lib.layout_destroy,
        };
        use lt::cublasLtMatmulDescAttributes_t as D;
        for (attr, op) in [
            (D::CUBLASLT_MATMUL_DESC_TRANSA, call.op_first),
            (D::CUBLASLT_MATMUL_DESC_TRANSB, call.op_second),
        ] {
            // SAFETY: the descriptor is live; the attribute is an int32 cublasOperation_t.
            check(
                unsafe { (lib.desc_set)(plan.desc, attr, &op as *const i32 as _, 4) },
                "cublasLtMatmulDescSetAttribute",
            )?;
        }
        plan.first = self.layout(&call.first)?;
        plan.second = self.layout(&call.second)?;
        plan.c = self.layout(&call.c)?;

        let mut pref: lt::cublasLtMatmulPreference_t = std::ptr::null_mut();
        // SAFETY: a valid out-pointer.
        check(
            unsafe { (lib.pref_create)(&mut pref) },
            "cublasLtMatmulPreferenceCreate",
        )?;
        let workspace = WORKSPACE_BYTES as u64;
        use lt::cublasLtMatmulPreferenceAttributes_t as P;
        // cuBLASLt's first operand ("A" in its terms) is our B, its second our A.
        let settings: [(P, u64); 5] = [
            (P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, workspace),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.align_b as u64),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.align_a as u64),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.align_c as u64),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.align_c as u64),
        ];
        let mut result = Ok(());
        for (attr, value) in settings {
            // The workspace size is a uint64; the alignments are uint32.
            let (ptr, size) = if attr == P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES {
                (&value as *const u64 as *const c_void, 8)
            } else {
                (&(value as u32) as *const u32 as *const c_void, 4)
            };
            // SAFETY: the preference is live; ptr points at `size` bytes of the attribute's type.
            result = check(
                unsafe { (lib.pref_set)(pref, attr, ptr, size) },
                "cublasLtMatmulPreferenceSetAttribute",
            );
            if result.is_err() {
                break;
            }
        }
        let mut heuristic: lt::cublasLtMatmulHeuristicResult_t = unsafe { std::mem::zeroed() };
        let mut found = 0;
        if result.is_ok() {
            // SAFETY: every handle is live; one result is asked for and there is room for one.
            result = check(
                unsafe {
                    (lib.heuristic)(
                        self.handle,
                        plan.desc,
                        plan.first,
                        plan.second,
                        plan.c,
                        plan.c,
                        pref,
                        1,
                        &mut heuristic,
                        &mut found,
                    )
                },
                "cublasLtMatmulAlgoGetHeuristic",
            );
        }
        // SAFETY: created above, destroyed once.
        unsafe { (lib.pref_destroy)(pref) };
        result?;
        if found < 1 {
            return Err(NcError::new(format!(
                "cuBLASLt ({}) has no algorithm for the GEMM {key:?} (within a {} workspace)",
                lib.file,
                nc_alloc::fmt_bytes(WORKSPACE_BYTES)
            )));
        }
        plan.algo = heuristic.algo;
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    //! The layouts checked on the host: a plain column-major batched GEMM (cuBLASLt's definition, read
    //! through the layouts `lt_call` makes) must match the CPU backend's row-major matmul for every
    //! transpose combination, alpha and beta, and batch strides; and the cache must plan each key once.

    use super::*;
    use crate::backend::cpu::{CpuBackend, CpuBuf};
    use crate::backend::cuda::blas::tests::values;
    use crate::backend::{Backend, View, ViewMut};

    fn key(shape: Gemm) -> GemmKey {
        GemmKey {
            shape,
            a: Elem::Bf16,
            b: Elem::Bf16,
            c: Elem::F32,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
            align_a: 256,
            align_b: 256,
            align_c: 256,
        }
    }

    /// What cuBLASLt computes from the call's layouts: for each batch i, D = alpha op(first) op(second) +
    /// beta C, column-major with the layouts' leading dimensions and batch strides.
    fn emulate(call: &LtCall, alpha: f32, first: &[f32], second: &[f32], beta: f32, c: &mut [f32]) {
        let (big_m, big_n) = (call.c.rows as usize, call.c.cols as usize);
        let big_k = if call.op_first == 0 {
            call.first.cols
        } else {
            call.first.rows
        } as usize;
        // The other operand must agree on K and N (a wrong layout fails here, before any number).
        let (second_k, second_n) = if call.op_second == 0 {
            (call.second.rows, call.second.cols)
        } else {
            (call.second.cols, call.second.rows)
        };
        assert_eq!((second_k as usize, second_n as usize), (big_k, big_n));
        for bi in 0..call.c.batch as usize {
            let (f0, s0, c0) = (
                bi * call.first.stride as usize,
                bi * call.second.stride as usize,
                bi * call.c.stride as usize,
            );
            let fa = |i: usize, p: usize| {
                let (r, col) = if call.op_first == 0 { (i, p) } else { (p, i) };
                first[f0 + r + col * call.first.ld as usize]
            };
            let sb = |p: usize, j: usize| {
                let (r, col) = if call.op_second == 0 { (p, j) } else { (j, p) };
                second[s0 + r + col * call.second.ld as usize]
            };
            for j in 0..big_n {
                for i in 0..big_m {
                    let dot: f64 = (0..big_k).map(|p| fa(i, p) as f64 * sb(p, j) as f64).sum();
                    let at = c0 + i + j * call.c.ld as usize;
                    let old = if beta == 0.0 { 0.0 } else { beta as f64 * c[at] as f64 };
                    c[at] = (alpha as f64 * dot + old) as f32;
                }
            }
        }
    }

    #[test]
    fn every_transpose_alpha_beta_and_batch_matches_the_row_major_contract() {
        let cpu = CpuBackend::new();
        let (m, n, k) = (5, 7, 3);
        for batch in [1usize, 3] {
            for a_t in [false, true] {
                for b_t in [false, true] {
                    for (alpha, beta) in [(1.0f32, 0.0f32), (1.0, 1.0), (-0.5, 2.0)] {
                        // Strides larger than a matrix, so a layout that ignores them reads the gap.
                        let (sa, sb, sc) = (m * k + 2, k * n + 5, m * n + 1);
                        let a = values(sa * batch, 1);
                        let b = values(sb * batch, 2);
                        let c0 = values(sc * batch, 3);
                        let mut want = c0.clone();
                        for i in 0..batch {
                            let (ab, bb) = (
                                CpuBuf::f32(a[i * sa..i * sa + m * k].to_vec()),
                                CpuBuf::f32(b[i * sb..i * sb + k * n].to_vec()),
                            );
                            let mut prod = CpuBuf::f32(vec![0.0; m * n]);
                            let shape = Gemm::nn(m, n, k).transposed(a_t, b_t);
                            cpu.matmul(shape, View::all(&ab), View::all(&bb), ViewMut::all(&mut prod));
                            for (j, p) in prod.0.iter().enumerate() {
                                let w = &mut want[i * sc + j];
                                *w = alpha * p + if beta == 0.0 { 0.0 } else { beta * *w };
                            }
                        }
                        let mut kk = key(Gemm::nn(m, n, k).transposed(a_t, b_t).accumulating(beta != 0.0));
                        (kk.batch, kk.stride_a, kk.stride_b, kk.stride_c) = (batch, sa, sb, sc);
                        let call = lt_call(&kk).unwrap();
                        let mut got = c0.clone();
                        // cuBLASLt's first operand is the row-major B, its second the row-major A.
                        emulate(&call, alpha, &b, &a, beta, &mut got);
                        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                            assert!(
                                (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                                "batch {batch} a_t {a_t} b_t {b_t} alpha {alpha} beta {beta}: C[{i}] = {g}, CPU {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn unsupported_types_and_empty_products_are_errors() {
        let mut k = key(Gemm::nn(2, 2, 2));
        k.a = Elem::F32; // f32 x bf16: cuBLASLt has no such kernel
        assert!(lt_call(&k)
            .unwrap_err()
            .to_string()
            .contains("not a supported combination"));
        let (mut all_f32, mut bf16_out) = (k, key(Gemm::nn(2, 2, 2)));
        (all_f32.b, all_f32.c) = (Elem::F32, Elem::F32);
        assert!(lt_call(&all_f32).is_ok());
        bf16_out.c = Elem::Bf16;
        assert!(lt_call(&bf16_out).is_ok());
        (all_f32.c) = Elem::Bf16; // f32 inputs into bf16: not supported either
        assert!(lt_call(&all_f32).is_err());
        assert!(lt_call(&key(Gemm::nn(0, 2, 2))).is_err());
    }

    #[test]
    fn alignment_is_the_largest_power_of_two_up_to_256() {
        assert_eq!(alignment(0x1000), 256);
        assert_eq!(alignment(0x1002), 2);
        assert_eq!(alignment(0x1010), 16);
        assert_eq!(alignment(0x1080), 128);
        assert_eq!(alignment(0), 256);
    }

    /// A planner that counts its calls and can be told to fail.
    struct Counting {
        planned: Vec<GemmKey>,
        fail: bool,
    }
    impl Planner for Counting {
        type Plan = usize;
        fn plan(&mut self, key: &GemmKey, _call: &LtCall) -> Result<usize> {
            if self.fail {
                return Err(NcError::new("no algorithm"));
            }
            self.planned.push(*key);
            Ok(self.planned.len())
        }
    }

    #[test]
    fn each_key_is_planned_once_and_failures_are_not_cached() {
        let mut cache = PlanCache::new(Counting {
            planned: vec![],
            fail: false,
        });
        let (k1, k2) = (key(Gemm::nt(4, 8, 16)), key(Gemm::nt(4, 8, 16).accumulating(true)));
        let mut k3 = k1;
        k3.align_a = 2; // the same shape with a less aligned pointer needs its own plan
        for _ in 0..5 {
            for k in [&k1, &k2, &k3] {
                cache.get(k).unwrap();
            }
        }
        assert_eq!(cache.misses, 3);
        assert_eq!(cache.hits, 12);
        assert_eq!(cache.len(), 3);
        assert_eq!(
            *cache.get(&k2).unwrap().1,
            2,
            "the plan made for k2 is the one returned for k2"
        );
        let mut k4 = k1;
        k4.shape.m = 5;
        cache.planner.fail = true;
        assert!(cache.get(&k4).is_err());
        cache.planner.fail = false;
        assert_eq!(*cache.get(&k4).unwrap().1, 4);
        assert_eq!(cache.misses, 4);
    }
}
