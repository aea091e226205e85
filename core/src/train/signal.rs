//! SIGINT/SIGTERM: the first one asks the loop to save a checkpoint and stop between steps, and says so at once
//! (a CPU step may take minutes); a second one exits at once (the last complete checkpoint is intact: saves are
//! atomic).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Set by the signal handler; the training loop reads it between steps.
static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

/// Whether this process says what the first signal does (the process that logs: rank 0).
static ANNOUNCE: AtomicBool = AtomicBool::new(false);

/// What the first signal prints, from the handler itself: the loop may be minutes away from its next look.
const STOPPING: &[u8] = b"\nnc-train: stopping: the run saves a checkpoint and stops after the current step (Ctrl-C \
again quits at once, without saving)\n";

extern "C" fn on_signal(_sig: libc::c_int) {
    // Only async-signal-safe work here: an atomic swap, write(2), and _exit on the second signal.
    if STOP_REQUESTED.swap(true, Ordering::SeqCst) {
        // SAFETY: _exit is async-signal-safe and ends the process without running destructors.
        unsafe { libc::_exit(130) };
    }
    if ANNOUNCE.load(Ordering::SeqCst) {
        // SAFETY: write(2) on stderr is async-signal-safe; a short or failed write only loses the message.
        unsafe { libc::write(2, STOPPING.as_ptr() as *const libc::c_void, STOPPING.len()) };
    }
}

/// Install the handlers for SIGINT and SIGTERM (the binary calls this once; tests drive the flag directly).
/// `announce`: the first signal prints at once that the run will save and stop (the process that logs; other
/// ranks stay quiet so the message is printed once).
pub fn install_handlers(announce: bool) {
    ANNOUNCE.store(announce, Ordering::SeqCst);
    on_int_and_term(on_signal);
}

/// Whether a stop was asked for (by a signal or by `request_stop`).
pub fn stop_requested() -> bool {
    STOP_REQUESTED.load(Ordering::SeqCst)
}

/// Ask the loop to save and stop at the next step boundary.
pub fn request_stop() {
    STOP_REQUESTED.store(true, Ordering::SeqCst);
}

/// Forget a past request (a process running several trainings in a row, as the tests do).
pub fn clear_stop() {
    STOP_REQUESTED.store(false, Ordering::SeqCst);
}

/// Signals the supervisor received (it forwards each to its workers, and never stops by itself).
static SUPERVISOR_SIGNALS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_supervisor_signal(_sig: libc::c_int) {
    SUPERVISOR_SIGNALS.fetch_add(1, Ordering::SeqCst);
}

/// The supervisor's SIGINT/SIGTERM handlers: count, for `signals_received`.
pub fn install_supervisor_handlers() {
    on_int_and_term(on_supervisor_signal);
}

/// How many SIGINT/SIGTERM the supervisor has received so far.
pub fn signals_received() -> usize {
    SUPERVISOR_SIGNALS.load(Ordering::SeqCst)
}

/// Install `handler` for SIGINT and SIGTERM. The handlers given here (`on_signal`, `on_supervisor_signal`)
/// only touch atomics and call `_exit`: async-signal-safe.
fn on_int_and_term(handler: extern "C" fn(libc::c_int)) {
    // SAFETY: installing a handler has no other effect; what it does when called is safe (above).
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
}
