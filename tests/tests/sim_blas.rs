//! The simulated cuBLAS and cuBLASLt (sim/blas/, issue 19 item 5), built with g++ as scripts/sim.sh builds
//! them and run on a fake of the simulated driver's ncsim_* functions (sim/blas/tests/fake_ncsim.cpp: host
//! memory poisoned with NaN, range checks, work queued until a sync; built as libcuda.so.1), so they are
//! tested without the driver.
//!
//! - `the_simulated_libraries_match_their_references`: sim/blas/tests/blas_check.cpp, which checks every GEMM
//!   bit for bit against the documented accumulation order and within the f32 error bound of an f64
//!   reference (transposes, padded leading dimensions, strided batches with gaps, alpha/beta, beta = 0 over
//!   NaN poison, C == D and C != D, bf16/f32 outputs, TF32 math), bf16 round-to-nearest-even cases worked out
//!   by hand, the declared accesses, asynchrony and trace line of a GEMM, device pointer mode (alpha and beta
//!   read when the stream runs), and the statuses and stderr lines of refused arguments.
//! - `nc_row_major_matmul_on_the_simulated_libraries_equals_the_cpu_backend`: the fake driver opened
//!   RTLD_LOCAL as cudarc opens libcuda.so.1, then nc's row-major `matmul`
//!   mapped onto the column-major libraries the way core/src/backend/cuda/blas.rs (`sgemm_call`) and
//!   blas_lt.rs (`lt_call`) map it (restated below: those are private to nc-core), compared with the CPU
//!   backend's `matmul`, the contract the CUDA backend must meet. Integer inputs make every sum exact, so the
//!   comparison is to the bit whatever the order. A transposed cuBLASLt layout fails here.
//!
//! Cost: four g++ compiles (a few seconds; in parallel) and well under a second of checks.

use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
use nc_core::backend::cpu::{CpuBackend, CpuBuf};
use nc_core::backend::{Backend, Gemm, Storage, View, ViewMut};
use std::ffi::{c_int, c_void};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Compiles the two libraries (the flags scripts/sim.sh uses), the fake driver and the check program into
/// a folder of the target directory, once per test process; None when there is no g++.
fn built() -> Option<&'static Path> {
    static BUILT: OnceLock<Option<PathBuf>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            if Command::new("g++").arg("--version").output().is_err() {
                eprintln!("no g++: the simulated cuBLAS checks were not run");
                return None;
            }
            let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sim_blas");
            std::fs::create_dir_all(&out).unwrap();
            let sim = repo().join("sim");
            let include = format!("-I{}", sim.join("include").display());
            let library = |src: &str, name: &str| {
                let mut c = Command::new("g++");
                c.args(["-std=c++20", "-O2", "-shared", "-fPIC", &include])
                    .arg(sim.join("blas").join(src))
                    .arg("-o")
                    .arg(out.join(name));
                c
            };
            let mut jobs = vec![
                library("cublas.cpp", "libcublas.so.13"),
                library("cublaslt.cpp", "libcublasLt.so.13"),
                // Named and sonamed as the driver, so the libraries find it as they find the simulated one.
                library("tests/fake_ncsim.cpp", "libcuda.so.1"),
            ];
            jobs[2].arg("-Wl,-soname,libcuda.so.1");
            let children: Vec<_> = jobs
                .iter_mut()
                .map(|c| (format!("{c:?}"), c.spawn().unwrap()))
                .collect();
            for (what, child) in children {
                let status = child.wait_with_output().unwrap().status;
                assert!(status.success(), "{what} failed");
            }
            let status = Command::new("g++")
                .args(["-std=c++20", "-O2", "-ffp-contract=off", "-Wall"])
                .arg(sim.join("blas/tests/blas_check.cpp"))
                .arg(format!("-L{}", out.display()))
                .args(["-l:libcuda.so.1", "-l:libcublas.so.13", "-l:libcublasLt.so.13"])
                .arg(format!("-Wl,-rpath,{}", out.display()))
                .arg("-o")
                .arg(out.join("blas_check"))
                .status()
                .unwrap();
            assert!(status.success(), "compiling blas_check failed");
            Some(out)
        })
        .as_deref()
}

#[test]
fn the_simulated_libraries_match_their_references() {
    let Some(dir) = built() else { return };
    // Three GEMM threads whatever the machine, so the large shape is split and must still match to the bit.
    let output = Command::new(dir.join("blas_check"))
        .env("NC_SIM_BLAS_THREADS", "3")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "blas_check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The summary line, with enough checks that none of the loops was skipped.
    let last = stdout.lines().last().unwrap_or("");
    let checks: usize = last.split(' ').next().unwrap().parse().unwrap();
    assert!(last.ends_with("checks, 0 failed") && checks > 1_800_000, "{stdout}");
}

// ---- nc's mapping on the simulated libraries, through their C API ----

const CUDA_R_32F: c_int = 0;
const CUDA_R_16BF: c_int = 14;
const CUBLAS_COMPUTE_32F: c_int = 68;
const DESC_TRANSA: c_int = 3;
const DESC_TRANSB: c_int = 4;
const LAYOUT_BATCH_COUNT: c_int = 5;
const LAYOUT_STRIDED_BATCH_OFFSET: c_int = 6;
const PREF_MAX_WORKSPACE_BYTES: c_int = 1;

type P = *mut c_void;

/// The entry points used here (the C signatures of sim/blas/blas_api.h).
struct Libs {
    fake_alloc: unsafe extern "C" fn(usize) -> P,
    fake_free: unsafe extern "C" fn(P),
    fake_sync: unsafe extern "C" fn() -> c_int,
    lt_create: unsafe extern "C" fn(*mut P) -> c_int,
    desc_create: unsafe extern "C" fn(*mut P, c_int, c_int) -> c_int,
    desc_set: unsafe extern "C" fn(P, c_int, *const c_void, usize) -> c_int,
    layout_create: unsafe extern "C" fn(*mut P, c_int, u64, u64, i64) -> c_int,
    layout_set: unsafe extern "C" fn(P, c_int, *const c_void, usize) -> c_int,
    pref_create: unsafe extern "C" fn(*mut P) -> c_int,
    pref_set: unsafe extern "C" fn(P, c_int, *const c_void, usize) -> c_int,
    #[allow(clippy::type_complexity)]
    heuristic: unsafe extern "C" fn(P, P, P, P, P, P, P, c_int, *mut [u64; 12], *mut c_int) -> c_int,
    #[allow(clippy::type_complexity)]
    matmul: unsafe extern "C" fn(
        P,
        P,
        *const f32,
        *const c_void,
        P,
        *const c_void,
        P,
        *const f32,
        *const c_void,
        P,
        P,
        P,
        *const [u64; 8],
        P,
        usize,
        P,
    ) -> c_int,
    blas_create: unsafe extern "C" fn(*mut P) -> c_int,
    #[allow(clippy::type_complexity)]
    sgemm: unsafe extern "C" fn(
        P,
        c_int,
        c_int,
        c_int,
        c_int,
        c_int,
        *const f32,
        *const f32,
        c_int,
        *const f32,
        c_int,
        *const f32,
        *mut f32,
        c_int,
    ) -> c_int,
    _libs: [Library; 3],
}

fn load(dir: &Path) -> Libs {
    // SAFETY: the fake driver and the two libraries have no load-time preconditions. The fake goes first and
    // local, as cudarc opens libcuda.so.1 (dlopen's default RTLD_LOCAL): its ncsim_* symbols are then not in
    // the global scope, and the libraries must find them in the loaded driver itself.
    unsafe {
        let fake = Library::open(Some(dir.join("libcuda.so.1")), RTLD_NOW | RTLD_LOCAL).unwrap();
        let lt = Library::open(Some(dir.join("libcublasLt.so.13")), RTLD_NOW).unwrap();
        let blas = Library::open(Some(dir.join("libcublas.so.13")), RTLD_NOW).unwrap();
        macro_rules! sym {
            ($lib:expr, $name:literal) => {
                *$lib.get($name.as_bytes()).unwrap()
            };
        }
        Libs {
            fake_alloc: sym!(fake, "fake_alloc"),
            fake_free: sym!(fake, "fake_free"),
            fake_sync: sym!(fake, "fake_sync"),
            lt_create: sym!(lt, "cublasLtCreate"),
            desc_create: sym!(lt, "cublasLtMatmulDescCreate"),
            desc_set: sym!(lt, "cublasLtMatmulDescSetAttribute"),
            layout_create: sym!(lt, "cublasLtMatrixLayoutCreate"),
            layout_set: sym!(lt, "cublasLtMatrixLayoutSetAttribute"),
            pref_create: sym!(lt, "cublasLtMatmulPreferenceCreate"),
            pref_set: sym!(lt, "cublasLtMatmulPreferenceSetAttribute"),
            heuristic: sym!(lt, "cublasLtMatmulAlgoGetHeuristic"),
            matmul: sym!(lt, "cublasLtMatmul"),
            blas_create: sym!(blas, "cublasCreate_v2"),
            sgemm: sym!(blas, "cublasSgemm_v2"),
            _libs: [fake, lt, blas],
        }
    }
}

/// nc's column-major call for the row-major C (m x n) = op(A) (m x k) op(B) (k x n), restated from blas.rs's
/// `sgemm_call`: C^T = op(B)^T op(A)^T, so cuBLAS's first operand is the row-major B and its second the
/// row-major A, M = n, N = m, ldc = n; B stored k x n reads as op N with ld n, stored n x k (b_t) as op T
/// with ld k; A stored m x k reads as op N with ld k, stored k x m (a_t) as op T with ld m.
struct ColumnMajor {
    op_first: c_int,
    ld_first: i64,
    op_second: c_int,
    ld_second: i64,
    big_m: u64,
    big_n: u64,
    big_k: u64,
}

fn nc_mapping(m: usize, n: usize, k: usize, a_t: bool, b_t: bool) -> ColumnMajor {
    let (op_first, ld_first) = if b_t { (1, k) } else { (0, n) };
    let (op_second, ld_second) = if a_t { (1, m) } else { (0, k) };
    ColumnMajor {
        op_first,
        ld_first: ld_first as i64,
        op_second,
        ld_second: ld_second as i64,
        big_m: n as u64,
        big_n: m as u64,
        big_k: k as u64,
    }
}

/// Stored rows and columns of cuBLASLt's operands, as blas_lt.rs's `lt_call` makes its layouts: an operand
/// used as is (N) is stored with the op's shape, transposed (T) the other way round.
fn stored(op: c_int, rows_of_op: u64, cols_of_op: u64) -> (u64, u64) {
    if op == 0 {
        (rows_of_op, cols_of_op)
    } else {
        (cols_of_op, rows_of_op)
    }
}

/// Small integers: every product and sum below is exact in f32 and bf16, in any order.
fn integers(len: usize, seed: usize) -> Vec<f32> {
    (0..len).map(|i| ((i * 7 + seed * 13) % 5) as f32 - 2.0).collect()
}

fn bf16_bits(v: f32) -> u16 {
    (v.to_bits() >> 16) as u16 // exact for these integers
}

/// Device (fake) memory holding `values` as f32 or bf16.
unsafe fn upload(libs: &Libs, values: &[f32], storage: Storage) -> P {
    let bytes = values.len() * if storage == Storage::Bf16 { 2 } else { 4 };
    let p = (libs.fake_alloc)(bytes.max(1));
    for (i, v) in values.iter().enumerate() {
        match storage {
            Storage::Bf16 => *(p as *mut u16).add(i) = bf16_bits(*v),
            Storage::F32 => *(p as *mut f32).add(i) = *v,
        }
    }
    p
}

unsafe fn download(p: P, len: usize, storage: Storage) -> Vec<f32> {
    (0..len)
        .map(|i| match storage {
            Storage::Bf16 => f32::from_bits((*(p as *const u16).add(i) as u32) << 16),
            Storage::F32 => *(p as *const f32).add(i),
        })
        .collect()
}

/// One strided-batched bf16 GEMM through cuBLASLt the way nc plans and runs it (blas_lt.rs): layouts from the
/// mapping, batch attributes only for batch > 1, the heuristic's first algorithm within a 32 MiB workspace,
/// D = alpha op(A) op(B) + beta C with C and D at separate addresses (Newton-Schulz's `run_cd`).
#[allow(clippy::too_many_arguments)]
unsafe fn lt_row_major(
    libs: &Libs,
    handle: P,
    (m, n, k, batch): (usize, usize, usize, usize),
    (a_t, b_t): (bool, bool),
    (alpha, beta): (f32, f32),
    (a, b, c, d): (P, P, P, P),
    c_storage: Storage,
    workspace: P,
) {
    let call = nc_mapping(m, n, k, a_t, b_t);
    let (sa, sb, sc) = ((m * k) as i64, (k * n) as i64, (m * n) as i64);
    let mut desc: P = std::ptr::null_mut();
    assert_eq!((libs.desc_create)(&mut desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), 0);
    assert_eq!(
        (libs.desc_set)(desc, DESC_TRANSA, &call.op_first as *const c_int as _, 4),
        0
    );
    assert_eq!(
        (libs.desc_set)(desc, DESC_TRANSB, &call.op_second as *const c_int as _, 4),
        0
    );
    let layout = |ty: c_int, (rows, cols): (u64, u64), ld: i64, stride: i64| {
        let mut l: P = std::ptr::null_mut();
        assert_eq!((libs.layout_create)(&mut l, ty, rows, cols, ld), 0);
        if batch > 1 {
            let count = batch as i32;
            assert_eq!(
                (libs.layout_set)(l, LAYOUT_BATCH_COUNT, &count as *const i32 as _, 4),
                0
            );
            assert_eq!(
                (libs.layout_set)(l, LAYOUT_STRIDED_BATCH_OFFSET, &stride as *const i64 as _, 8),
                0
            );
        }
        l
    };
    let c_type = if c_storage == Storage::Bf16 {
        CUDA_R_16BF
    } else {
        CUDA_R_32F
    };
    let first = layout(
        CUDA_R_16BF,
        stored(call.op_first, call.big_m, call.big_k),
        call.ld_first,
        sb,
    );
    let second = layout(
        CUDA_R_16BF,
        stored(call.op_second, call.big_k, call.big_n),
        call.ld_second,
        sa,
    );
    let lc = layout(c_type, (call.big_m, call.big_n), call.big_m as i64, sc);
    let mut pref: P = std::ptr::null_mut();
    assert_eq!((libs.pref_create)(&mut pref), 0);
    let limit: u64 = 32 << 20;
    assert_eq!(
        (libs.pref_set)(pref, PREF_MAX_WORKSPACE_BYTES, &limit as *const u64 as _, 8),
        0
    );
    // cublasLtMatmulHeuristicResult_t: algo (8 x u64), workspaceSize, state, wavesCount, reserved[4].
    let mut result = [0u64; 12];
    let mut found = 0;
    let status = (libs.heuristic)(handle, desc, first, second, lc, lc, pref, 1, &mut result, &mut found);
    assert_eq!((status, found), (0, 1), "heuristic for {m}x{n}x{k} a_t {a_t} b_t {b_t}");
    let algo: [u64; 8] = result[..8].try_into().unwrap();
    let status = (libs.matmul)(
        handle,
        desc,
        &alpha,
        b,
        first,
        a,
        second,
        &beta,
        c,
        lc,
        d,
        lc,
        &algo,
        workspace,
        32 << 20,
        std::ptr::null_mut(),
    );
    assert_eq!(status, 0, "cublasLtMatmul {m}x{n}x{k} a_t {a_t} b_t {b_t}");
    (libs.fake_sync)();
}

/// The CPU backend's row-major answer for one batch matrix: alpha * op(A) op(B) + beta * C (integers: exact
/// in every step and in bf16, so no rounding to the output storage is needed).
#[allow(clippy::too_many_arguments)]
fn cpu_row_major(
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    a_t: bool,
    b: &[f32],
    b_t: bool,
    alpha: f32,
    beta: f32,
    c: &[f32],
) -> Vec<f32> {
    let cpu = CpuBackend::new();
    let (abuf, bbuf) = (CpuBuf::f32(a.to_vec()), CpuBuf::f32(b.to_vec()));
    let mut prod = CpuBuf::f32(vec![0.0; m * n]);
    let shape = Gemm::nn(m, n, k).transposed(a_t, b_t);
    cpu.matmul(shape, View::all(&abuf), View::all(&bbuf), ViewMut::all(&mut prod));
    prod.0.iter().zip(c).map(|(p, old)| alpha * p + beta * old).collect()
}

#[test]
fn nc_row_major_matmul_on_the_simulated_libraries_equals_the_cpu_backend() {
    let Some(dir) = built() else { return };
    let libs = load(dir);
    // SAFETY: every pointer below is a fake allocation sized for the GEMM that uses it.
    unsafe {
        let mut lt: P = std::ptr::null_mut();
        assert_eq!((libs.lt_create)(&mut lt), 0);
        let mut blas: P = std::ptr::null_mut();
        assert_eq!((libs.blas_create)(&mut blas), 0);
        let workspace = (libs.fake_alloc)(32 << 20);
        // A square shape too: there a transposed layout passes the shape checks and only the numbers show it.
        for (m, n, k, a_t) in [(5, 7, 3, false), (5, 7, 3, true), (4, 4, 4, false), (4, 4, 4, true)] {
            for b_t in [false, true] {
                // cuBLASLt, bf16 inputs: nc's bf16 matmul (alpha 1, beta 0 or 1, C == D) and Newton-Schulz's
                // batched form (alpha, beta free, C != D), into bf16 and f32.
                for (batch, alpha, beta, storage) in [
                    (1, 1.0f32, 0.0f32, Storage::Bf16),
                    (1, 1.0, 1.0, Storage::F32),
                    (3, -0.5, 2.0, Storage::Bf16),
                    (3, 1.0, 0.0, Storage::F32),
                ] {
                    let a = integers(m * k * batch, 1);
                    let b = integers(k * n * batch, 2);
                    let c = integers(m * n * batch, 3);
                    let (pa, pb) = (upload(&libs, &a, Storage::Bf16), upload(&libs, &b, Storage::Bf16));
                    let pc = upload(&libs, &c, storage);
                    let pd = (libs.fake_alloc)(m * n * batch * 4);
                    lt_row_major(
                        &libs,
                        lt,
                        (m, n, k, batch),
                        (a_t, b_t),
                        (alpha, beta),
                        (pa, pb, pc, pd),
                        storage,
                        workspace,
                    );
                    let got = download(pd, m * n * batch, storage);
                    for i in 0..batch {
                        let (sa, sb, sc) = (i * m * k, i * k * n, i * m * n);
                        let want = cpu_row_major(
                            (m, n, k),
                            &a[sa..sa + m * k],
                            a_t,
                            &b[sb..sb + k * n],
                            b_t,
                            alpha,
                            beta,
                            &c[sc..sc + m * n],
                        );
                        assert_eq!(
                            &got[sc..sc + m * n],
                            &want[..],
                            "cuBLASLt a_t {a_t} b_t {b_t} batch {i}/{batch} alpha {alpha} beta {beta} {storage:?}"
                        );
                    }
                    for p in [pa, pb, pc, pd] {
                        (libs.fake_free)(p);
                    }
                }
                // cuBLAS sgemm, nc's strict-f32 matmul (mod.rs: beta 0 or 1 into C itself).
                for accumulate in [false, true] {
                    let (a, b, c) = (integers(m * k, 4), integers(k * n, 5), integers(m * n, 6));
                    let (pa, pb) = (upload(&libs, &a, Storage::F32), upload(&libs, &b, Storage::F32));
                    let pc = upload(&libs, &c, Storage::F32);
                    let call = nc_mapping(m, n, k, a_t, b_t);
                    let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
                    let status = (libs.sgemm)(
                        blas,
                        call.op_first,
                        call.op_second,
                        call.big_m as c_int,
                        call.big_n as c_int,
                        call.big_k as c_int,
                        &alpha,
                        pb as *const f32,
                        call.ld_first as c_int,
                        pa as *const f32,
                        call.ld_second as c_int,
                        &beta,
                        pc as *mut f32,
                        call.big_m as c_int,
                    );
                    assert_eq!(status, 0);
                    (libs.fake_sync)();
                    let want = cpu_row_major((m, n, k), &a, a_t, &b, b_t, 1.0, beta, &c);
                    assert_eq!(
                        download(pc, m * n, Storage::F32),
                        want,
                        "cublasSgemm a_t {a_t} b_t {b_t} accumulate {accumulate}"
                    );
                    for p in [pa, pb, pc] {
                        (libs.fake_free)(p);
                    }
                }
            }
        }
    }
}
