//! Small programs against the CUDA driver API, one per scenario, for tests/tests/sim_driver.rs: run under the
//! simulated driver (scripts/sim.sh), each either prints what it measured on stdout or is stopped by one of the
//! simulator's checks (stderr, exit status 1). The kernels are nc's own (nc_kernels' PTX), launched through
//! cudarc's driver API as nc launches them.
//!
//! Usage: nc-sim-probe SCENARIO [planted]: with `planted` the scenario carries its bug (a launch argument of the
//! wrong width, a grid one block short, a read one element past a buffer, a read of unwritten memory, a missing
//! cuStreamWaitEvent, a PTX whose stamp differs from its source...), without it the same program runs correctly.

use cudarc::driver::result::{self as cu, stream::StreamKind};
use cudarc::driver::sys;
use std::ffi::{c_void, CString};

type Ptr = sys::CUdeviceptr;

fn check<T>(what: &str, r: Result<T, cu::DriverError>) -> T {
    r.unwrap_or_else(|e| {
        println!(
            "{what} error: {}",
            e.error_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        std::process::exit(0)
    })
}

fn start() {
    check("init", cu::init());
    let dev = check("device", cu::device::get(0));
    // SAFETY: the device came from device::get; the context stays retained for the life of the process.
    let ctx = check("context", unsafe { cu::primary_ctx::retain(dev) });
    check("set current", unsafe { cu::ctx::set_current(ctx) });
}

fn module(ptx: &str) -> sys::CUmodule {
    let text = CString::new(ptx).expect("PTX has no NUL");
    // SAFETY: a NUL-terminated PTX text.
    check("load", unsafe { cu::module::load_data(text.as_ptr() as *const c_void) })
}

fn function(m: sys::CUmodule, name: &str) -> sys::CUfunction {
    let name = CString::new(name).expect("name");
    // SAFETY: a live module and a NUL-terminated name.
    check("function", unsafe { cu::module::get_function(m, name) })
}

fn alloc_f32(n: usize) -> Ptr {
    // SAFETY: plain device allocation.
    check("alloc", unsafe { cu::malloc_sync(n * 4) })
}

fn upload(dst: Ptr, src: &[f32]) {
    // SAFETY: dst holds at least src.len() floats (the simulator checks it).
    check("upload", unsafe { cu::memcpy_htod_sync(dst, src) });
}

fn download(src: Ptr, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    // SAFETY: src holds n floats.
    check("download", unsafe { cu::memcpy_dtoh_sync(&mut out, src) });
    out
}

/// Launches `f` with one pointer per argument value (as cudarc's launch builder passes them).
fn launch(f: sys::CUfunction, grid: u32, block: u32, stream: sys::CUstream, args: &mut [*mut c_void]) {
    // SAFETY: the arguments point to live values for the duration of the call (the driver copies them).
    check("launch", unsafe {
        cu::launch_kernel(f, (grid, 1, 1), (block, 1, 1), 0, stream, args)
    });
    println!("launched");
}

fn elementwise() -> sys::CUmodule {
    module(nc_kernels::ptx::ELEMENTWISE)
}

fn arg<T>(v: &T) -> *mut c_void {
    v as *const T as *mut c_void
}

/// Every module of nc_kernels loads and every `.entry` of its PTX resolves to a function, the P2P ring's
/// module (kernels-ptx/emu/p2p_emu_sim.h, issue 20) included.
fn modules() {
    let (mut mods, mut entries) = (0, 0);
    for (name, ptx) in nc_kernels::MODULES {
        entries += entries_resolve(ptx);
        mods += 1;
        println!("module {name} ok");
    }
    println!("loaded {mods} modules, {entries} entries");
    let p2p = entries_resolve(nc_kernels::p2p::PTX);
    println!("p2p_ring ok, {p2p} entries");
}

/// Loads a module and resolves every `.entry` of its PTX; how many.
fn entries_resolve(ptx: &str) -> usize {
    let m = module(ptx);
    let mut entries = 0;
    for line in ptx.lines().filter(|l| l.contains(".entry ")) {
        let entry = line
            .split(".entry ")
            .nth(1)
            .and_then(|s| s.split('(').next())
            .unwrap_or("")
            .trim();
        function(m, entry);
        entries += 1;
    }
    entries
}

/// nc_fill_f32(f32* x, u64 n, f32 value): planted, n is passed as a u32 whose neighbour in memory is a float (as
/// in an argument struct of (u32 n, f32 value)); the driver reads 8 bytes from it.
fn wrong_width(planted: bool) {
    let f = function(elementwise(), "nc_fill_f32");
    let n = 1000usize;
    let x = alloc_f32(n);
    let value = 3.5f32;
    #[repr(C)]
    struct Narrow {
        n: u32,
        value: f32,
    }
    let narrow = Narrow { n: n as u32, value };
    let wide = n as u64;
    let n_arg = if planted { arg(&narrow.n) } else { arg(&wide) };
    launch(f, 4, 256, std::ptr::null_mut(), &mut [arg(&x), n_arg, arg(&value)]);
    let got = download(x, n);
    println!("fill correct: {}", got.iter().all(|&v| v == value));
    let _ = narrow.value;
}

/// The same launch through `extra` (a packed parameter buffer with its size): planted, n packed as 4 bytes.
fn wrong_width_extra(planted: bool) {
    let f = function(elementwise(), "nc_fill_f32");
    let x = alloc_f32(1000);
    let mut buf = Vec::new();
    buf.extend_from_slice(&x.to_le_bytes());
    if planted {
        buf.extend_from_slice(&1000u32.to_le_bytes());
    } else {
        buf.extend_from_slice(&1000u64.to_le_bytes());
    }
    buf.extend_from_slice(&3.5f32.to_le_bytes());
    let mut size = buf.len();
    let mut extra = [
        1 as *mut c_void, // CU_LAUNCH_PARAM_BUFFER_POINTER
        buf.as_mut_ptr() as *mut c_void,
        2 as *mut c_void, // CU_LAUNCH_PARAM_BUFFER_SIZE
        &mut size as *mut usize as *mut c_void,
        std::ptr::null_mut(), // CU_LAUNCH_PARAM_END
    ];
    // SAFETY: a well-formed `extra` list whose buffer outlives the call.
    let r = unsafe {
        sys::cuLaunchKernel(
            f,
            4,
            1,
            1,
            256,
            1,
            1,
            0,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            extra.as_mut_ptr(),
        )
    };
    check("launch", r.result());
    println!("launched");
    println!("fill correct: {}", download(x, 1000).iter().all(|&v| v == 3.5));
}

/// nc_rmsnorm_forward_f32, one block per row, against the CPU: planted, the grid is one block short.
fn grid(planted: bool) {
    let f = function(module(nc_kernels::ptx::RMSNORM), "nc_rmsnorm_forward_f32");
    let (rows, dim) = (5usize, 64usize);
    let xs: Vec<f32> = (0..rows * dim).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
    let (x, y, rstd) = (alloc_f32(rows * dim), alloc_f32(rows * dim), alloc_f32(rows));
    upload(x, &xs);
    let (r, d, eps) = (rows as i32, dim as i32, 1e-6f32);
    let blocks = if planted { rows - 1 } else { rows } as u32;
    launch(
        f,
        blocks,
        256,
        std::ptr::null_mut(),
        &mut [arg(&x), arg(&y), arg(&rstd), arg(&r), arg(&d), arg(&eps)],
    );
    let got = download(y, rows * dim);
    let mut worst = 0f64;
    for row in 0..rows {
        let xr = &xs[row * dim..(row + 1) * dim];
        let ms = xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / dim as f64;
        let s = 1.0 / (ms + eps as f64).sqrt();
        for c in 0..dim {
            let e = (got[row * dim + c] as f64 - xr[c] as f64 * s).abs();
            worst = if e.is_nan() { f64::INFINITY } else { worst.max(e) };
        }
    }
    println!("max abs error vs CPU: {worst:e}");
}

/// nc_add_inplace_f32(x, y, n) with y one element shorter than n: planted, the kernel reads y[n - 1], the first
/// bytes past y: on the guard page when y is 4096 bytes (n = 1025), in the slack before it when y is 4000 bytes
/// (n = 1001).
fn past_end(planted: bool, n: usize) {
    let f = function(elementwise(), "nc_add_inplace_f32");
    let x = alloc_f32(n);
    let y = alloc_f32(n - 1);
    upload(x, &vec![1.0; n]);
    upload(y, &vec![2.0; n - 1]);
    let count = if planted { n as u64 } else { (n - 1) as u64 };
    launch(
        f,
        n.div_ceil(256) as u32,
        256,
        std::ptr::null_mut(),
        &mut [arg(&x), arg(&y), arg(&count)],
    );
    println!("sum ok: {}", download(x, n - 1).iter().all(|&v| v == 3.0));
}

/// nc_fill_f32 writing one element past a 4000-byte allocation (into the bytes before its guard page).
fn write_past_end(planted: bool) {
    let f = function(elementwise(), "nc_fill_f32");
    let n = 1000usize;
    let x = alloc_f32(n);
    let count = if planted { n as u64 + 1 } else { n as u64 };
    let value = 1.0f32;
    launch(
        f,
        4,
        256,
        std::ptr::null_mut(),
        &mut [arg(&x), arg(&count), arg(&value)],
    );
    println!("fill ok: {}", download(x, n).iter().all(|&v| v == 1.0));
}

/// x += y where y was never written (planted) or uploaded first.
fn unwritten(planted: bool) {
    let f = function(elementwise(), "nc_add_inplace_f32");
    let n = 256usize;
    let (x, y) = (alloc_f32(n), alloc_f32(n));
    upload(x, &vec![1.0; n]);
    if !planted {
        upload(y, &vec![0.5; n]);
    }
    let count = n as u64;
    launch(f, 1, 256, std::ptr::null_mut(), &mut [arg(&x), arg(&y), arg(&count)]);
    let got = download(x, n);
    println!("nan results: {}", got.iter().filter(|v| v.is_nan()).count());
}

/// Stream A fills x, stream B adds x into z after waiting for A's event; planted, B does not wait.
fn race(planted: bool) {
    let m = elementwise();
    let (fill, add) = (function(m, "nc_fill_f32"), function(m, "nc_add_inplace_f32"));
    let a = check("stream", cu::stream::create(StreamKind::NonBlocking));
    let b = check("stream", cu::stream::create(StreamKind::NonBlocking));
    let n = 1usize << 16;
    let (x, z) = (alloc_f32(n), alloc_f32(n));
    upload(z, &vec![1.0; n]);
    let (count, two) = (n as u64, 2.0f32);
    let event = check("event", cu::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING));
    launch(fill, 256, 256, a, &mut [arg(&x), arg(&count), arg(&two)]);
    // SAFETY: live event and streams.
    check("record", unsafe { cu::event::record(event, a) });
    if !planted {
        check("wait", unsafe {
            cu::stream::wait_event(b, event, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT)
        });
    }
    launch(add, 256, 256, b, &mut [arg(&z), arg(&x), arg(&count)]);
    check("sync", unsafe { cu::stream::synchronize(b) });
    check("sync", unsafe { cu::stream::synchronize(a) });
    println!("z correct: {}", download(z, n).iter().all(|&v| v == 3.0));
}

/// The elementwise PTX with its first-line source stamp changed (planted) or as checked in.
fn stamp(planted: bool) {
    let ptx = nc_kernels::ptx::ELEMENTWISE;
    let text = if planted {
        let (first, rest) = ptx.split_once('\n').expect("PTX has lines");
        let hash = first.rsplit(' ').next().unwrap_or("");
        let other = if hash.starts_with('0') { "1" } else { "0" };
        format!("// nc-source-fnv1a64: {other}{}\n{rest}", &hash[1..])
    } else {
        ptx.to_string()
    };
    let m = module(&text);
    function(m, "nc_fill_f32");
    println!("module loaded");
}

/// Two allocations of 48 MiB under NC_SIM_MEM=64M: the second is out of memory (planted) or the first was freed.
fn oom(planted: bool) {
    let (free0, total) = check("info", cu::mem_get_info());
    println!("total {total} free {free0}");
    // SAFETY: plain allocations.
    let a = check("first alloc", unsafe { cu::malloc_sync(48 << 20) });
    let (free1, _) = check("info", cu::mem_get_info());
    println!("free after 48 MiB: {free1}");
    if !planted {
        check("free", unsafe { cu::free_sync(a) });
    }
    check("second alloc", unsafe { cu::malloc_sync(48 << 20) });
    println!("second allocation ok");
}

/// A kernel reading memory freed before the launch (planted) or still live.
fn use_after_free(planted: bool) {
    let f = function(elementwise(), "nc_add_inplace_f32");
    let n = 256usize;
    let (x, y) = (alloc_f32(n), alloc_f32(n));
    upload(x, &vec![1.0; n]);
    upload(y, &vec![1.0; n]);
    if planted {
        check("free", unsafe { cu::free_sync(y) });
    }
    let count = n as u64;
    launch(f, 1, 256, std::ptr::null_mut(), &mut [arg(&x), arg(&y), arg(&count)]);
    println!("sum ok: {}", download(x, n).iter().all(|&v| v == 2.0));
}

/// An upload one element longer than its destination (planted).
fn copy_bounds(planted: bool) {
    let n = 1000usize;
    let x = alloc_f32(n);
    upload(x, &vec![1.0; if planted { n + 1 } else { n }]);
    println!("upload done");
}

/// Two CUDA backends of nc, on devices 0 and 1 (NC_SIM_DEVICES=2), each with its cuBLAS and cuBLASLt handles
/// (an f32 and a bf16 GEMM); the backend on device 0 is dropped while device 1's context is current on this
/// thread (the last one used). Its handles must be destroyed in device 0's context.
fn backends_dropped_across_devices() {
    use nc_core::backend::{Backend, Gemm, Storage, View, ViewMut};
    let gemms = |be: &nc_core::backend::cuda::CudaBackend| {
        for storage in [Storage::F32, Storage::Bf16] {
            let (a, b) = (be.alloc_as(64, storage), be.alloc_as(64, storage));
            let mut c = be.alloc(64);
            be.fill(ViewMut::all(&mut c), 0.0);
            be.matmul(Gemm::nn(8, 8, 8), View::all(&a), View::all(&b), ViewMut::all(&mut c));
        }
        be.synchronize();
    };
    let start = |ordinal| {
        nc_core::backend::cuda::CudaBackend::new(ordinal).unwrap_or_else(|e| {
            println!("backend {ordinal} error: {e}");
            std::process::exit(0)
        })
    };
    let first = start(0);
    gemms(&first);
    let second = start(1);
    gemms(&second);
    drop(first);
    println!("dropped the device-0 backend");
    drop(second);
    println!("dropped the device-1 backend");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let scenario = args.get(1).map(String::as_str).unwrap_or("");
    let planted = args.get(2).map(String::as_str) == Some("planted");
    if scenario == "backends-across-devices" {
        return backends_dropped_across_devices(); // nc's backends make their own contexts
    }
    start();
    match scenario {
        "modules" => modules(),
        "wrong-width" => wrong_width(planted),
        "wrong-width-extra" => wrong_width_extra(planted),
        "grid" => grid(planted),
        "past-end" => past_end(planted, 1025),
        "past-end-slack" => past_end(planted, 1001),
        "write-past-end" => write_past_end(planted),
        "unwritten" => unwritten(planted),
        "race" => race(planted),
        "stamp" => stamp(planted),
        "oom" => oom(planted),
        "use-after-free" => use_after_free(planted),
        "copy-bounds" => copy_bounds(planted),
        other => {
            eprintln!("nc-sim-probe: unknown scenario '{other}'");
            std::process::exit(2);
        }
    }
}
