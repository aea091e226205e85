//! NVTX ranges for Nsight Systems: `let _r = nvtx::range("optimizer");` marks the code until the guard drops,
//! on the calling thread's timeline, above the kernels it launched.
//!
//! NVTX 3 is a protocol, not a library: a profiler that wants the ranges (nsys sets this in the environment of
//! the process it profiles) names its injection library in `NVTX_INJECTION64_PATH`; the client dlopens it,
//! calls its `InitializeInjectionNvtx2` with a function that hands out the client's export tables, and the tool
//! writes its own implementations into the client's function-pointer slots (one slot per NVTX call, grouped
//! in modules; the numbering is NVTX's ABI, nvtxDetail/nvtxTypes.h). This file is that client side, so nothing
//! needs libnvToolsExt (gone from CUDA 13) or a CUDA install: without the variable (no profiler attached) no
//! library is opened, and every range costs one relaxed atomic load and a branch; a name built with
//! `range_with` is not even formatted.
//!
//! Backend-agnostic on purpose: the model and the training loop mark their phases the same way on every
//! backend, and the CPU backend's runs can be profiled (CPU sampling) as well as the GPU's.
//! Unverified on a GPU machine with nsys: the protocol side is tested here with a fake tool
//! (tests/tests/nvtx_injection.rs), the real nsys has not loaded it yet.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_uint, c_void, CString};
use std::marker::PhantomData;
use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicU8, Ordering};
use std::sync::OnceLock;

/// What a range call does, decided once per process (a test recorder may switch it to RECORDING).
const UNDECIDED: u8 = 0;
const OFF: u8 = 1;
const TOOL: u8 = 2;
const RECORDING: u8 = 3;
static MODE: AtomicU8 = AtomicU8::new(UNDECIDED);

/// The tool's implementations of the calls this file makes, read out of the slots after its init.
struct ToolCalls {
    push: unsafe extern "C" fn(*const c_char) -> c_int,
    pop: unsafe extern "C" fn() -> c_int,
    /// nvtxNameCuStreamA(CUstream, name): absent when the tool does not trace CUDA.
    name_cu_stream: Option<unsafe extern "C" fn(*mut c_void, *const c_char)>,
}
static TOOL_CALLS: OnceLock<Option<ToolCalls>> = OnceLock::new();

/// An open range; it ends when this guard drops. Tied to its thread (NVTX's push/pop stack is per thread).
#[must_use = "a range ends when its guard drops: bind it with `let _r = ...`"]
pub struct Range {
    open: bool,
    _not_send: PhantomData<*const ()>,
}

impl Drop for Range {
    fn drop(&mut self) {
        if self.open {
            pop();
        }
    }
}

const CLOSED: Range = Range {
    open: false,
    _not_send: PhantomData,
};

/// Open a range named `name` on this thread.
#[inline]
pub fn range(name: &str) -> Range {
    if mode() == OFF {
        return CLOSED;
    }
    push(name)
}

/// Open a range whose name is built only when someone is listening (`|| format!("layer {l} fwd")`).
#[inline]
pub fn range_with(name: impl FnOnce() -> String) -> Range {
    if mode() == OFF {
        return CLOSED;
    }
    push(&name())
}

/// Whether ranges go anywhere (a profiler's tool is loaded, or a test records).
pub fn enabled() -> bool {
    mode() != OFF
}

/// Name a CUDA stream (a `CUstream`) on the profiler's timeline; nothing without a tool that traces CUDA.
pub fn name_cuda_stream(stream: *mut c_void, name: &str) {
    if mode() != TOOL {
        return;
    }
    if let Some(Some(ToolCalls {
        name_cu_stream: Some(f),
        ..
    })) = TOOL_CALLS.get()
    {
        let c = c_name(name);
        // SAFETY: the tool's nvtxNameCuStreamA, given a stream handle and a NUL-terminated name it copies.
        unsafe { f(stream, c.as_ptr()) };
    }
}

#[inline]
fn mode() -> u8 {
    match MODE.load(Ordering::Relaxed) {
        UNDECIDED => decide_mode(),
        m => m,
    }
}

#[cold]
fn decide_mode() -> u8 {
    let found = TOOL_CALLS.get_or_init(load_tool).is_some();
    // a recorder that started meanwhile keeps its mode
    let _ = MODE.compare_exchange(
        UNDECIDED,
        if found { TOOL } else { OFF },
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    MODE.load(Ordering::Relaxed)
}

fn push(name: &str) -> Range {
    let open = match MODE.load(Ordering::Relaxed) {
        TOOL => match TOOL_CALLS.get() {
            Some(Some(t)) => {
                let c = c_name(name);
                // SAFETY: the tool's nvtxRangePushA, given a NUL-terminated name it copies before returning.
                unsafe { (t.push)(c.as_ptr()) };
                true
            }
            _ => false,
        },
        RECORDING => RECORDED.with(|r| match r.borrow_mut().as_mut() {
            Some(events) => {
                events.push(Event::Push(name.to_string()));
                true
            }
            None => false,
        }),
        _ => false,
    };
    Range {
        open,
        _not_send: PhantomData,
    }
}

fn pop() {
    match MODE.load(Ordering::Relaxed) {
        TOOL => {
            if let Some(Some(t)) = TOOL_CALLS.get() {
                // SAFETY: the tool's nvtxRangePop; this thread pushed the range it ends.
                unsafe { (t.pop)() };
            }
        }
        RECORDING => RECORDED.with(|r| {
            if let Some(events) = r.borrow_mut().as_mut() {
                events.push(Event::Pop);
            }
        }),
        _ => {}
    }
}

/// A name as C wants it; an interior NUL (never in this crate's names) cuts it short rather than failing.
fn c_name(name: &str) -> CString {
    let bytes = name.as_bytes();
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    CString::new(&bytes[..end]).expect("no NUL before `end`")
}

// ---- The test recorder: what ranges the code opens, checked without a profiler ----

/// One range call, as `record` saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Push(String),
    Pop,
}

thread_local! {
    static RECORDED: RefCell<Option<Vec<Event>>> = const { RefCell::new(None) };
}

/// Run `f` and return, with its result, the range calls this thread made meanwhile. For tests: once called,
/// this process's ranges go to recorders (any thread not recording pays one thread-local check), never to a
/// profiler.
pub fn record<R>(f: impl FnOnce() -> R) -> (R, Vec<Event>) {
    MODE.store(RECORDING, Ordering::Relaxed);
    RECORDED.with(|r| *r.borrow_mut() = Some(Vec::new()));
    let out = f();
    let events = RECORDED.with(|r| r.borrow_mut().take()).unwrap_or_default();
    (out, events)
}

/// Whether `events` nest: every pop ends an open range and none is left open. Returns the deepest stack of
/// names reached, for messages.
pub fn check_balanced(events: &[Event]) -> Result<usize, String> {
    let mut stack: Vec<&str> = Vec::new();
    let mut deepest = 0;
    for (i, e) in events.iter().enumerate() {
        match e {
            Event::Push(n) => {
                stack.push(n);
                deepest = deepest.max(stack.len());
            }
            Event::Pop => {
                if stack.pop().is_none() {
                    return Err(format!("event {i} pops a range that was never opened"));
                }
            }
        }
    }
    if stack.is_empty() {
        Ok(deepest)
    } else {
        Err(format!("ranges left open: {stack:?}"))
    }
}

/// The names of the ranges open around each push of `name`, outermost first (its parents), one list per time
/// it was opened.
pub fn parents_of(events: &[Event], name: &str) -> Vec<Vec<String>> {
    let mut stack: Vec<&str> = Vec::new();
    let mut found = Vec::new();
    for e in events {
        match e {
            Event::Push(n) => {
                if n == name {
                    found.push(stack.iter().map(|s| s.to_string()).collect());
                }
                stack.push(n);
            }
            Event::Pop => {
                stack.pop();
            }
        }
    }
    found
}

// ---- NVTX's injection protocol (client side) ----

/// NVTX's callback modules (NvtxCallbackModule) and how many slots each has (its NVTX_CBID_*_SIZE).
const MODULE_SIZES: [(c_int, usize); 6] = [
    (1, 16), // CORE
    (2, 9),  // CUDA
    (3, 15), // OPENCL
    (4, 7),  // CUDART
    (5, 16), // CORE2
    (6, 7),  // SYNC
];
const MODULE_CORE: c_int = 1;
const MODULE_CUDA: c_int = 2;
const CORE_RANGE_PUSH_A: usize = 9;
const CORE_RANGE_POP: usize = 11;
const CUDA_NAME_CU_STREAM_A: usize = 5;
/// Export table ids (NvtxExportTableID) and the NVTX version this client speaks.
const ETID_CALLBACKS: u32 = 1;
const ETID_VERSIONINFO: u32 = 3;
const NVTX_VERSION: u32 = 3;

/// One module's slots (filled by the tool) and the table of pointers to them that the tool receives.
struct ModuleTable {
    module: c_int,
    slots: Box<[AtomicPtr<c_void>]>,
    table: Box<[*mut *mut c_void]>,
}

struct Slots(Vec<ModuleTable>);
// SAFETY: the raw pointers point into `slots` of the same never-moved, never-freed boxes; the tool writes the
// slots during its init (on the thread that called it, before anything reads them) and they are read after.
unsafe impl Send for Slots {}
unsafe impl Sync for Slots {}
static SLOTS: OnceLock<Slots> = OnceLock::new();

fn slots() -> &'static Slots {
    SLOTS.get_or_init(|| {
        Slots(
            MODULE_SIZES
                .iter()
                .map(|&(module, size)| {
                    let slots: Box<[AtomicPtr<c_void>]> = (0..size).map(|_| AtomicPtr::new(ptr::null_mut())).collect();
                    // slot 0 is NVTX's INVALID id: no function lives there
                    let table = (0..size)
                        .map(|i| if i == 0 { ptr::null_mut() } else { slots[i].as_ptr() })
                        .collect();
                    ModuleTable { module, slots, table }
                })
                .collect(),
        )
    })
}

fn slot(module: c_int, id: usize) -> *mut c_void {
    slots()
        .0
        .iter()
        .find(|m| m.module == module)
        .map_or(ptr::null_mut(), |m| m.slots[id].load(Ordering::Acquire))
}

#[repr(C)]
struct ExportTableCallbacks {
    struct_size: usize,
    get_module_function_table: unsafe extern "C" fn(c_int, *mut *const *mut *mut c_void, *mut c_uint) -> c_int,
}

#[repr(C)]
struct ExportTableVersionInfo {
    struct_size: usize,
    version: u32,
    reserved0: u32,
    set_injection_nvtx_version: unsafe extern "C" fn(u32),
}

static CALLBACKS: ExportTableCallbacks = ExportTableCallbacks {
    struct_size: std::mem::size_of::<ExportTableCallbacks>(),
    get_module_function_table,
};

static VERSION_INFO: ExportTableVersionInfo = ExportTableVersionInfo {
    struct_size: std::mem::size_of::<ExportTableVersionInfo>(),
    version: NVTX_VERSION,
    reserved0: 0,
    set_injection_nvtx_version,
};

/// The tool asks for a module's table: a pointer to its array of slot pointers and the highest valid id.
unsafe extern "C" fn get_module_function_table(
    module: c_int,
    out_table: *mut *const *mut *mut c_void,
    out_size: *mut c_uint,
) -> c_int {
    let Some(m) = slots().0.iter().find(|m| m.module == module) else {
        return 0;
    };
    if !out_table.is_null() {
        // SAFETY: the tool passes where to write the table pointer (checked non-null).
        unsafe { *out_table = m.table.as_ptr() };
    }
    if !out_size.is_null() {
        // SAFETY: as above, for the size.
        unsafe { *out_size = (m.table.len() - 1) as c_uint };
    }
    1
}

unsafe extern "C" fn set_injection_nvtx_version(_version: u32) {}

unsafe extern "C" fn get_export_table(id: u32) -> *const c_void {
    match id {
        ETID_CALLBACKS => ptr::addr_of!(CALLBACKS).cast(),
        ETID_VERSIONINFO => ptr::addr_of!(VERSION_INFO).cast(),
        _ => ptr::null(),
    }
}

type InitializeInjection = unsafe extern "C" fn(unsafe extern "C" fn(u32) -> *const c_void) -> c_int;

/// Load the profiler's tool named by NVTX_INJECTION64_PATH, let it fill the slots, and read out the calls
/// this file makes. None (ranges off) without the variable; a tool that cannot be used is said once on
/// stderr, since someone asked for a profile and would otherwise get one without ranges.
fn load_tool() -> Option<ToolCalls> {
    let path = std::env::var_os("NVTX_INJECTION64_PATH")?;
    let shown = std::path::Path::new(&path).display().to_string();
    let declined = |why: String| {
        eprintln!("nc: NVTX_INJECTION64_PATH={shown}: {why}; the profile will have no nc ranges");
    };
    // SAFETY: loading the library runs its initializers; it is the profiler's own tool, loaded as every NVTX
    // client loads it.
    let lib = match unsafe { libloading::Library::new(&path) } {
        Ok(l) => l,
        Err(e) => {
            declined(format!("cannot be loaded ({e})"));
            return None;
        }
    };
    // SAFETY: NVTX's entry point has this signature (nvtxDetail/nvtxInit.h).
    let init: InitializeInjection = match unsafe { lib.get::<InitializeInjection>(b"InitializeInjectionNvtx2\0") } {
        Ok(f) => *f,
        Err(e) => {
            declined(format!("has no InitializeInjectionNvtx2 ({e})"));
            return None;
        }
    };
    slots();
    // SAFETY: the export tables and slots it reaches live for the whole process.
    if unsafe { init(get_export_table) } == 0 {
        declined("its InitializeInjectionNvtx2 declined".into());
        return None;
    }
    // the tool's code must stay loaded as long as its functions sit in the slots: for good
    std::mem::forget(lib);
    let (push, pop) = (slot(MODULE_CORE, CORE_RANGE_PUSH_A), slot(MODULE_CORE, CORE_RANGE_POP));
    if push.is_null() || pop.is_null() {
        // a tool that does not take ranges (it may name things only): nothing for this file to do
        return None;
    }
    let stream = slot(MODULE_CUDA, CUDA_NAME_CU_STREAM_A);
    // SAFETY: the tool wrote its implementations of these NVTX calls, whose signatures are NVTX's.
    unsafe {
        Some(ToolCalls {
            push: std::mem::transmute::<*mut c_void, unsafe extern "C" fn(*const c_char) -> c_int>(push),
            pop: std::mem::transmute::<*mut c_void, unsafe extern "C" fn() -> c_int>(pop),
            name_cu_stream: (!stream.is_null())
                .then(|| std::mem::transmute::<*mut c_void, unsafe extern "C" fn(*mut c_void, *const c_char)>(stream)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balance_checker_catches_unbalanced_and_stray_pops() {
        let p = |s: &str| Event::Push(s.into());
        assert_eq!(check_balanced(&[p("a"), p("b"), Event::Pop, Event::Pop]), Ok(2));
        assert!(check_balanced(&[p("a"), p("b"), Event::Pop]).is_err());
        assert!(check_balanced(&[Event::Pop, p("a")]).is_err());
        let ev = [
            p("step"),
            p("micro"),
            p("x"),
            Event::Pop,
            Event::Pop,
            p("x"),
            Event::Pop,
            Event::Pop,
        ];
        assert_eq!(
            parents_of(&ev, "x"),
            vec![vec!["step".to_string(), "micro".into()], vec!["step".into()]]
        );
    }

    #[test]
    fn guards_record_nested_ranges_in_order() {
        let ((), events) = record(|| {
            let _outer = range("outer");
            for l in 0..2 {
                let _inner = range_with(|| format!("layer {l}"));
            }
        });
        let p = |s: &str| Event::Push(s.into());
        assert_eq!(
            events,
            vec![
                p("outer"),
                p("layer 0"),
                Event::Pop,
                p("layer 1"),
                Event::Pop,
                Event::Pop
            ]
        );
    }
}
