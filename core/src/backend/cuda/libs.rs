//! cuBLAS and cuBLASLt, opened by the CUDA 13 sonames first and checked to be version 13.
//!
//! cudarc's own loader tries the unversioned `libcublas.so` before `libcublas.so.13`, so a machine whose
//! default `libcublas.so` is another major version (a CUDA 12 toolkit next to PyTorch's CUDA 13 wheels) got
//! that one, with enums and structs laid out for a different release. Here each library is opened by its
//! versioned soname first, the unversioned name only as a fallback, and the version the library reports is
//! checked before any other call; a missing library or symbol is an `NcError` naming what was tried, never
//! a panic at the first call.
//!
//! Every entry point is resolved once, when the backend starts, into a plain function pointer. Status codes
//! come back as raw integers (not cudarc's enums) so a status this code does not know cannot be an invalid
//! enum value; `status_name` spells the known ones.

use crate::error::{NcError, Result};
use cudarc::cublas::sys as blas;
use cudarc::cublaslt::sys as lt;
use libloading::Library;
use std::ffi::{c_int, c_void};

/// The CUDA major version the engine is built against (cudarc's `cuda-13000` bindings).
pub(crate) const CUDA_MAJOR: u32 = 13;

/// A raw cuBLAS / cuBLASLt status (cublasStatus_t as an int).
pub(crate) type Status = c_int;

/// The names to try for a library, most specific first: `lib<stem>.so.13`, then `lib<stem>.so`.
pub(crate) fn candidates(stem: &str) -> Vec<String> {
    vec![format!("lib{stem}.so.{CUDA_MAJOR}"), format!("lib{stem}.so")]
}

/// The first of `candidates(stem)` that opens, with the name that did.
fn open(stem: &str) -> Result<(Library, String)> {
    let names = candidates(stem);
    let mut errors = Vec::new();
    for name in &names {
        // SAFETY: loading cuBLAS runs its initializers, which have no preconditions on our side.
        match unsafe { Library::new(name) } {
            Ok(lib) => return Ok((lib, name.clone())),
            Err(e) => errors.push(format!("{name}: {e}")),
        }
    }
    Err(NcError::new(format!(
        "the {stem} library was not found (tried {}): install the CUDA {CUDA_MAJOR} runtime libraries (the \
         toolkit, or the nvidia-cublas wheel) and put their folder on LD_LIBRARY_PATH",
        errors.join("; ")
    )))
}

/// A function pointer of type `F` for `symbol` in `lib` (which the caller keeps alive alongside it).
fn symbol<F: Copy>(lib: &Library, lib_name: &str, symbol: &str) -> Result<F> {
    // SAFETY: the caller names the C signature `F` of `symbol` as the CUDA 13 headers declare it.
    unsafe { lib.get::<F>(symbol.as_bytes()) }.map(|s| *s).map_err(|e| {
        NcError::new(format!(
            "{lib_name} has no {symbol} ({e}): it is not a CUDA {CUDA_MAJOR} cuBLAS; point LD_LIBRARY_PATH \
                 at the CUDA {CUDA_MAJOR} libraries"
        ))
    })
}

/// The name of a cuBLAS status (the values are cublas_api.h's, shared by cuBLASLt).
pub(crate) fn status_name(s: Status) -> String {
    match s {
        0 => "CUBLAS_STATUS_SUCCESS".into(),
        1 => "CUBLAS_STATUS_NOT_INITIALIZED".into(),
        3 => "CUBLAS_STATUS_ALLOC_FAILED".into(),
        7 => "CUBLAS_STATUS_INVALID_VALUE".into(),
        8 => "CUBLAS_STATUS_ARCH_MISMATCH".into(),
        11 => "CUBLAS_STATUS_MAPPING_ERROR".into(),
        13 => "CUBLAS_STATUS_EXECUTION_FAILED".into(),
        14 => "CUBLAS_STATUS_INTERNAL_ERROR".into(),
        15 => "CUBLAS_STATUS_NOT_SUPPORTED".into(),
        16 => "CUBLAS_STATUS_LICENSE_ERROR".into(),
        other => format!("cuBLAS status {other}"),
    }
}

/// Ok for success, else an error naming what was being done.
pub(crate) fn check(status: Status, doing: &str) -> Result<()> {
    if status == 0 {
        Ok(())
    } else {
        Err(NcError::new(format!("{doing} failed: {}", status_name(status))))
    }
}

type Handle = blas::cublasHandle_t;
type Op = blas::cublasOperation_t;

/// The cuBLAS entry points of the strict-f32 GEMM path.
pub(crate) struct Cublas {
    pub create: unsafe extern "C" fn(*mut Handle) -> Status,
    pub destroy: unsafe extern "C" fn(Handle) -> Status,
    pub get_version: unsafe extern "C" fn(Handle, *mut c_int) -> Status,
    pub set_stream: unsafe extern "C" fn(Handle, blas::cudaStream_t) -> Status,
    pub set_math_mode: unsafe extern "C" fn(Handle, blas::cublasMath_t) -> Status,
    #[allow(clippy::type_complexity)]
    pub sgemm: unsafe extern "C" fn(
        Handle,
        Op,
        Op,
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
    ) -> Status,
    /// Which file was opened (for messages).
    pub file: String,
    _lib: Library,
}

impl Cublas {
    pub(crate) fn load() -> Result<Self> {
        let (lib, file) = open("cublas")?;
        let f = &file;
        Ok(Cublas {
            create: symbol(&lib, f, "cublasCreate_v2")?,
            destroy: symbol(&lib, f, "cublasDestroy_v2")?,
            get_version: symbol(&lib, f, "cublasGetVersion_v2")?,
            set_stream: symbol(&lib, f, "cublasSetStream_v2")?,
            set_math_mode: symbol(&lib, f, "cublasSetMathMode")?,
            sgemm: symbol(&lib, f, "cublasSgemm_v2")?,
            file,
            _lib: lib,
        })
    }
}

type LtHandle = lt::cublasLtHandle_t;
type Desc = lt::cublasLtMatmulDesc_t;
type Layout = lt::cublasLtMatrixLayout_t;
type Pref = lt::cublasLtMatmulPreference_t;

/// The cuBLASLt entry points of the bf16 GEMM path (`blas_lt.rs`).
pub(crate) struct CublasLt {
    pub create: unsafe extern "C" fn(*mut LtHandle) -> Status,
    pub destroy: unsafe extern "C" fn(LtHandle) -> Status,
    pub desc_create: unsafe extern "C" fn(*mut Desc, lt::cublasComputeType_t, lt::cudaDataType_t) -> Status,
    pub desc_destroy: unsafe extern "C" fn(Desc) -> Status,
    pub desc_set: unsafe extern "C" fn(Desc, lt::cublasLtMatmulDescAttributes_t, *const c_void, usize) -> Status,
    pub layout_create: unsafe extern "C" fn(*mut Layout, lt::cudaDataType_t, u64, u64, i64) -> Status,
    pub layout_destroy: unsafe extern "C" fn(Layout) -> Status,
    pub layout_set: unsafe extern "C" fn(Layout, lt::cublasLtMatrixLayoutAttribute_t, *const c_void, usize) -> Status,
    pub pref_create: unsafe extern "C" fn(*mut Pref) -> Status,
    pub pref_destroy: unsafe extern "C" fn(Pref) -> Status,
    pub pref_set: unsafe extern "C" fn(Pref, lt::cublasLtMatmulPreferenceAttributes_t, *const c_void, usize) -> Status,
    #[allow(clippy::type_complexity)]
    pub heuristic: unsafe extern "C" fn(
        LtHandle,
        Desc,
        Layout,
        Layout,
        Layout,
        Layout,
        Pref,
        c_int,
        *mut lt::cublasLtMatmulHeuristicResult_t,
        *mut c_int,
    ) -> Status,
    #[allow(clippy::type_complexity)]
    pub matmul: unsafe extern "C" fn(
        LtHandle,
        Desc,
        *const c_void,
        *const c_void,
        Layout,
        *const c_void,
        Layout,
        *const c_void,
        *const c_void,
        Layout,
        *mut c_void,
        Layout,
        *const lt::cublasLtMatmulAlgo_t,
        *mut c_void,
        usize,
        lt::cudaStream_t,
    ) -> Status,
    pub file: String,
    _lib: Library,
}

impl CublasLt {
    pub(crate) fn load() -> Result<Self> {
        let (lib, file) = open("cublasLt")?;
        let f = &file;
        let lib_version: unsafe extern "C" fn() -> usize = symbol(&lib, f, "cublasLtGetVersion")?;
        // SAFETY: cublasLtGetVersion takes nothing and only returns a number.
        check_major(f, unsafe { lib_version() })?;
        Ok(CublasLt {
            create: symbol(&lib, f, "cublasLtCreate")?,
            destroy: symbol(&lib, f, "cublasLtDestroy")?,
            desc_create: symbol(&lib, f, "cublasLtMatmulDescCreate")?,
            desc_destroy: symbol(&lib, f, "cublasLtMatmulDescDestroy")?,
            desc_set: symbol(&lib, f, "cublasLtMatmulDescSetAttribute")?,
            layout_create: symbol(&lib, f, "cublasLtMatrixLayoutCreate")?,
            layout_destroy: symbol(&lib, f, "cublasLtMatrixLayoutDestroy")?,
            layout_set: symbol(&lib, f, "cublasLtMatrixLayoutSetAttribute")?,
            pref_create: symbol(&lib, f, "cublasLtMatmulPreferenceCreate")?,
            pref_destroy: symbol(&lib, f, "cublasLtMatmulPreferenceDestroy")?,
            pref_set: symbol(&lib, f, "cublasLtMatmulPreferenceSetAttribute")?,
            heuristic: symbol(&lib, f, "cublasLtMatmulAlgoGetHeuristic")?,
            matmul: symbol(&lib, f, "cublasLtMatmul")?,
            file,
            _lib: lib,
        })
    }
}

/// cuBLAS encodes its version as major * 10000 + minor * 100 + patch (13.0.2 is 130002); anything but
/// major 13 has other struct layouts than the bindings, so it is refused.
pub(crate) fn check_major(file: &str, version: usize) -> Result<()> {
    let major = version / 10_000;
    if major == CUDA_MAJOR as usize {
        Ok(())
    } else {
        Err(NcError::new(format!(
            "{file} is cuBLAS version {version} (major {major}); nc is built for CUDA {CUDA_MAJOR}: put the \
             CUDA {CUDA_MAJOR} libraries first on LD_LIBRARY_PATH"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_versioned_soname_is_tried_before_the_bare_name() {
        assert_eq!(candidates("cublas"), ["libcublas.so.13", "libcublas.so"]);
        assert_eq!(candidates("cublasLt"), ["libcublasLt.so.13", "libcublasLt.so"]);
    }

    #[test]
    fn another_major_version_is_refused_with_what_to_do() {
        assert!(check_major("libcublas.so", 130_002).is_ok());
        assert!(check_major("libcublas.so", 130_100).is_ok());
        let e = check_major("libcublas.so", 120_904).unwrap_err().to_string();
        assert!(e.contains("120904") && e.contains("LD_LIBRARY_PATH"), "{e}");
        assert!(check_major("x", 140_000).is_err());
    }

    #[test]
    fn a_missing_library_is_an_error_naming_every_name_tried() {
        // No machine has this library: the error lists both names, and nothing panics.
        match open("nc_no_such_blas") {
            Ok(_) => panic!("opened a library that cannot exist"),
            Err(e) => {
                let e = e.to_string();
                assert!(
                    e.contains("libnc_no_such_blas.so.13") && e.contains("libnc_no_such_blas.so:"),
                    "{e}"
                );
            }
        }
    }

    #[test]
    fn statuses_are_named_and_unknown_ones_do_not_panic() {
        assert!(check(0, "x").is_ok());
        let e = check(13, "cublasLtMatmul").unwrap_err().to_string();
        assert!(e.contains("cublasLtMatmul") && e.contains("EXECUTION_FAILED"), "{e}");
        assert!(status_name(12345).contains("12345"));
    }
}
