//! The NCCL ring's watchdog (`nccl.rs`): one thread per multi-rank communicator that ends the run, with one
//! line naming this rank and the cause, instead of letting it hang, when
//! - a peer's process is gone (the rendezvous's `PeerWatch`);
//! - NCCL reports an asynchronous error on the communicator (`ncclCommGetAsyncError`; `ncclGetLastError`
//!   says more, e.g. which peer);
//! - a collective queued more than the collective timeout ago has not completed (a stuck peer: NCCL never
//!   reports one, its kernels spin).
//!
//! It first aborts the communicator (`ncclCommAbort`: this rank's queued and blocked NCCL work returns), then
//! exits the process with a code for the cause; the other ranks then see this one gone.
//!
//! Completion is counted without touching the CUDA context from this thread: after each group or ungrouped
//! collective, the ring queues a host function on its stream (`CollectiveClock::mark`) that counts one more
//! completed; the watchdog compares the counts and the time each was queued.

use crate::rendezvous::PeerWatch;
use crate::CommError;
use cudarc::driver::CudaStream;
use cudarc::nccl::{result, sys};
use std::collections::VecDeque;
use std::ffi::{c_void, CStr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often the watchdog looks.
pub const WATCHDOG_PERIOD: Duration = Duration::from_millis(500);
/// The exit code of a rank whose watchdog aborted NCCL because a peer died.
pub const EXIT_PEER_GONE: i32 = 75;
/// ... because NCCL reported an asynchronous error.
pub const EXIT_NCCL_ERROR: i32 = 76;
/// ... because a collective did not complete within the collective timeout.
pub const EXIT_COLLECTIVE_TIMEOUT: i32 = 77;

/// Collectives queued on the ring's stream and completed there. Lives as long as the process (leaked once per
/// ring): a host function queued on the stream may run after the ring is gone.
pub(crate) struct CollectiveClock {
    completed: AtomicU64,
    /// (number, when queued) of every collective queued and not yet seen completed by the watchdog.
    pending: Mutex<VecDeque<(u64, Instant)>>,
    queued: AtomicU64,
}

/// The host function queued after each collective: one more completed.
unsafe extern "C" fn count_completed(clock: *mut c_void) {
    // SAFETY: `clock` is a leaked `CollectiveClock` (`CollectiveClock::new`), never freed.
    let clock = unsafe { &*(clock as *const CollectiveClock) };
    clock.completed.fetch_add(1, Ordering::AcqRel);
}

impl CollectiveClock {
    pub(crate) fn new() -> &'static CollectiveClock {
        Box::leak(Box::new(CollectiveClock {
            completed: AtomicU64::new(0),
            pending: Mutex::new(VecDeque::new()),
            queued: AtomicU64::new(0),
        }))
    }

    /// Counts the work just queued on `stream` as one collective: completed when the stream gets past it.
    pub(crate) fn mark(&'static self, stream: &CudaStream) -> Result<(), cudarc::driver::DriverError> {
        let n = self.queued.fetch_add(1, Ordering::AcqRel) + 1;
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back((n, Instant::now()));
        let arg = self as *const CollectiveClock as *mut c_void;
        // SAFETY: the function only bumps an atomic of a never-freed clock; it calls no CUDA function.
        unsafe { cudarc::driver::result::stream::launch_host_function(stream.cu_stream(), count_completed, arg) }
    }

    /// How long the oldest collective not yet completed has been queued, if any.
    fn oldest_pending(&self) -> Option<Duration> {
        let done = self.completed.load(Ordering::Acquire);
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        while pending.front().is_some_and(|(n, _)| *n <= done) {
            pending.pop_front();
        }
        pending.front().map(|(_, at)| at.elapsed())
    }
}

/// The handle, to move into the watchdog thread.
pub(crate) struct SendComm(pub(crate) sys::ncclComm_t);
// SAFETY: ncclCommAbort and ncclCommGetAsyncError are documented as callable from another thread while the
// communicator is in use.
unsafe impl Send for SendComm {}

/// The thread; stopped (and joined) on drop.
pub(crate) struct Watchdog {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the watchdog watches.
pub(crate) struct Watched {
    pub rank: usize,
    pub peers: PeerWatch,
    pub comm: SendComm,
    /// Set before the abort: the ring then neither uses nor destroys the communicator.
    pub aborted: Arc<AtomicBool>,
    pub clock: &'static CollectiveClock,
    pub timeout: Duration,
}

/// An NCCL result as a sentence: the code, NCCL's string for it and `ncclGetLastError`'s text (of `comm`, or
/// of the last call when null).
pub(crate) fn describe_result(code: sys::ncclResult_t, comm: sys::ncclComm_t) -> String {
    // SAFETY: both return NUL-terminated strings owned by NCCL (or null).
    let text = |p: *const std::ffi::c_char| {
        if p.is_null() {
            String::new()
        } else {
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    let what = text(unsafe { sys::ncclGetErrorString(code) });
    let last = text(unsafe { sys::ncclGetLastError(comm) });
    format!("{code:?} ({what}): {last}")
}

/// NCCL's asynchronous error on the communicator, as a sentence, or None.
fn async_error(comm: sys::ncclComm_t) -> Option<String> {
    let mut code = sys::ncclResult_t::ncclSuccess;
    // SAFETY: a live communicator (the ring joins this thread before destroying it); `code` is written.
    let status = unsafe { sys::ncclCommGetAsyncError(comm, &mut code) };
    if status != sys::ncclResult_t::ncclSuccess {
        return Some(format!("ncclCommGetAsyncError itself failed: {status:?}"));
    }
    if code == sys::ncclResult_t::ncclSuccess || code == sys::ncclResult_t::ncclInProgress {
        return None;
    }
    Some(format!(
        "NCCL reported an asynchronous error, {}",
        describe_result(code, comm)
    ))
}

/// Why the run must end now (the line, the exit code), or None.
fn verdict(w: &Watched) -> Option<(String, i32)> {
    if let Err(e) = w.peers.check() {
        return Some((e.to_string(), EXIT_PEER_GONE));
    }
    if let Some(e) = async_error(w.comm.0) {
        return Some((e, EXIT_NCCL_ERROR));
    }
    match w.clock.oldest_pending() {
        Some(waited) if waited > w.timeout => Some((
            format!(
                "an NCCL collective queued {:.0} s ago has not completed (NC_COLLECTIVE_TIMEOUT is {:.0} s): a peer \
                 is stuck, or far slower than this rank",
                waited.as_secs_f64(),
                w.timeout.as_secs_f64()
            ),
            EXIT_COLLECTIVE_TIMEOUT,
        )),
        _ => None,
    }
}

/// Ends the process with `code` without running exit handlers: other threads (the training loop, the CUDA
/// library's stream threads) are still running, and exit-time destructors of a library under them can crash
/// the process and lose the code (seen on the simulated driver).
pub(crate) fn exit_now(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: _exit ends the process at once; nothing after it runs.
    unsafe { libc::_exit(code) }
}

impl Watchdog {
    /// Starts the thread `name`: until the watchdog is dropped, every `WATCHDOG_PERIOD` it calls `end`, which
    /// returns an exit code once the run must end (after saying why); the process then ends with that code
    /// (`exit_now`). The NCCL ring's watchdog is `start`; the peer-to-peer ring's (p2p.rs) only watches peers.
    pub(crate) fn spawn(
        rank: usize,
        name: String,
        mut end: impl FnMut() -> Option<i32> + Send + 'static,
    ) -> Result<Watchdog, CommError> {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_seen = stop.clone();
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                while !stop_seen.load(Ordering::Acquire) {
                    if let Some(code) = end() {
                        exit_now(code);
                    }
                    std::thread::sleep(WATCHDOG_PERIOD);
                }
            })
            .map_err(|e| CommError::at(rank, format!("starting the watchdog thread {name}: {e}")))?;
        Ok(Watchdog {
            stop,
            thread: Some(thread),
        })
    }

    /// The NCCL ring's watchdog: on a `verdict`, aborts the communicator and ends the process.
    pub(crate) fn start(w: Watched) -> Result<Watchdog, CommError> {
        let rank = w.rank;
        Watchdog::spawn(rank, format!("nc-nccl-watchdog{rank}"), move || {
            let (why, code) = verdict(&w)?;
            w.aborted.store(true, Ordering::Release);
            eprintln!(
                "rank {}: {why}; aborting NCCL (ncclCommAbort) so no collective waits forever, and exiting with \
                 code {code}",
                w.rank
            );
            // SAFETY: the handle is live (the ring joins this thread before destroying it) and `aborted` keeps
            // the ring from destroying it afterwards.
            let _ = unsafe { result::comm_abort(w.comm.0) };
            Some(code)
        })
    }
}
