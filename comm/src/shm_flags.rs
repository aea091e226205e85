//! The flag protocol between neighbours of a ring, and how a rank waits on it.
//!
//! Rank r sends its k-th slice (k counts from 0 over the ring's whole life) to rank r+1 through its slot
//! k mod S:
//! 1. wait until rank r+1's `consumed` >= k + 1 - S (acquire): the slot's previous slice was read;
//! 2. write the slot (header + payload) with ordinary stores;
//! 3. store `sent` = k + 1 (release): the payload is visible before the flag.
//!
//! Rank r+1 receives slice k:
//! 1. wait until rank r's `sent` >= k + 1 (acquire): the payload written before the release is visible;
//! 2. read the slot;
//! 3. store `consumed` = k + 1 (release): its reads are done before the sender may overwrite.
//!
//! The counters only grow, so no flag is ever reset under a reader and a slot reused S slices later can't
//! be mistaken for the old one. The GPU ring runs the same protocol with st.release.sys / ld.acquire.sys.
//!
//! Waiting spins briefly (the neighbour is usually a few hundred nanoseconds behind), then yields, then
//! sleeps in short naps (ranks may outnumber cores). Every few milliseconds it checks that every other
//! rank is still there (state in the segment, process alive by pid and start time, the rendezvous's
//! watch), and it gives up after the timeout, naming the rank it waited for.

use crate::rendezvous::PeerWatch;
use crate::shm_segment::{Segment, STATE_ABSENT, STATE_FAILED, STATE_JOINED, STATE_LEFT};
use crate::CommError;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Busy polls before the first yield.
const SPIN_POLLS: u32 = 2000;
/// Time spent yielding before napping.
const YIELD_FOR: Duration = Duration::from_millis(2);
const NAP: Duration = Duration::from_micros(50);
/// How often a waiting rank checks that its peers are alive.
const LIVENESS_EVERY: Duration = Duration::from_millis(10);

/// The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat), and whether it is
/// a zombie. None if the process does not exist.
fn proc_stat(pid: u64) -> Option<(u64, bool)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces; fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((start, *state == "Z" || *state == "X"))
}

/// This process's pid and start time, for the segment.
pub fn own_identity() -> (u64, u64) {
    let pid = std::process::id() as u64;
    (pid, proc_stat(pid).map(|(start, _)| start).unwrap_or(0))
}

/// Whether the process recorded as (pid, start_time) still runs. A zombie (killed, not yet reaped by its
/// parent) counts as gone; so does a live process that reused the pid (its start time differs).
fn process_alive(pid: u64, start_time: u64) -> bool {
    if pid == 0 {
        return false;
    }
    match proc_stat(pid) {
        Some((start, zombie)) => !zombie && (start_time == 0 || start == start_time),
        // No /proc entry: gone, unless /proc is not mounted, where kill(pid, 0) says.
        None => {
            if std::path::Path::new("/proc/self/stat").exists() {
                return false;
            }
            let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
            rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
        }
    }
}

/// What a waiting rank needs to know about its ring.
pub struct Waiter<'a> {
    pub seg: &'a Segment,
    pub rank: usize,
    pub timeout: Duration,
    pub watch: Option<&'a PeerWatch>,
}

impl Waiter<'_> {
    /// Err naming the rank that is gone, Ok if all are present: first a dead process, then a rank the
    /// rendezvous saw go, then `awaited` if it left the ring, then a rank whose collective failed (named
    /// with the rank it blamed). A rank that finished and left is fine unless it is the one this rank waits
    /// on (at the end of a run ranks leave one by one while others finish their last slices).
    pub fn check_peers(&self, awaited: usize) -> Result<(), CommError> {
        let others = || (0..self.seg.world_size).filter(|&r| r != self.rank);
        let fail = |culprit: usize, why: String| {
            // Recorded so ranks that see this rank fail name the culprit too.
            self.seg
                .record(self.rank)
                .blame
                .store(culprit as u64 + 1, Ordering::Release);
            Err(CommError::at(self.rank, why))
        };
        for r in others() {
            let rec = self.seg.record(r);
            let pid = rec.pid.load(Ordering::Acquire);
            match rec.state.load(Ordering::Acquire) {
                STATE_JOINED if !process_alive(pid, rec.start_time.load(Ordering::Acquire)) => {
                    return fail(
                        r,
                        format!("rank {r} (pid {pid}) is gone: its process exited, crashed or was killed"),
                    );
                }
                STATE_ABSENT => return fail(r, format!("rank {r} never joined the ring")),
                STATE_JOINED | STATE_LEFT | STATE_FAILED => {}
                _ => return fail(r, format!("rank {r}'s record in the segment is corrupt")),
            }
        }
        if let Some(w) = self.watch {
            if let Err(e) = w.check() {
                return fail(awaited, e.to_string());
            }
        }
        if self.seg.record(awaited).state.load(Ordering::Acquire) == STATE_LEFT {
            return fail(
                awaited,
                format!("rank {awaited} left the ring (its ShmRing was dropped) before sending"),
            );
        }
        for r in others() {
            let rec = self.seg.record(r);
            if rec.state.load(Ordering::Acquire) == STATE_FAILED {
                let blamed = rec.blame.load(Ordering::Acquire);
                let culprit = if blamed == 0 { r } else { blamed as usize - 1 };
                return fail(
                    culprit,
                    format!("a collective failed on rank {r}, because of rank {culprit} (see rank {r}'s error)"),
                );
            }
        }
        Ok(())
    }

    /// Waits until `flag` >= `target` (acquire). `peer` is the rank that advances the flag; `what` says
    /// what was awaited, for the error.
    pub fn wait_for(
        &self,
        flag: &AtomicU64,
        target: u64,
        peer: usize,
        what: &dyn Fn() -> String,
    ) -> Result<(), CommError> {
        let ready = || flag.load(Ordering::Acquire) >= target;
        for _ in 0..SPIN_POLLS {
            if ready() {
                return Ok(());
            }
            std::hint::spin_loop();
        }
        let start = Instant::now();
        let mut last_check = start;
        loop {
            if ready() {
                return Ok(());
            }
            let now = Instant::now();
            if now.duration_since(last_check) >= LIVENESS_EVERY {
                last_check = now;
                if let Err(e) = self.check_peers(peer) {
                    // The peer may have published just before it went away: take what it sent.
                    return if ready() {
                        Ok(())
                    } else {
                        Err(CommError {
                            rank: e.rank,
                            reason: format!("{} (while waiting for rank {peer} to {})", e.reason, what()),
                        })
                    };
                }
            }
            if now.duration_since(start) >= self.timeout {
                self.seg
                    .record(self.rank)
                    .blame
                    .store(peer as u64 + 1, Ordering::Release);
                return Err(CommError::at(
                    self.rank,
                    format!(
                        "waited {:?} for rank {peer}, which is alive but did not {}; did the ranks call \
                         different collectives?",
                        self.timeout,
                        what()
                    ),
                ));
            }
            if now.duration_since(start) < YIELD_FOR {
                thread::yield_now();
            } else {
                thread::sleep(NAP);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_reaped_child_is_not() {
        let (pid, start) = own_identity();
        assert!(start > 0, "no start time from /proc/self/stat");
        assert!(process_alive(pid, start));
        assert!(
            !process_alive(pid, start + 1),
            "a different start time must mean another process"
        );
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let child_pid = child.id() as u64;
        // Once it exited and before it is reaped it is a zombie: gone.
        std::thread::sleep(Duration::from_millis(200));
        let (child_start, _) = proc_stat(child_pid).unwrap();
        assert!(!process_alive(child_pid, child_start), "a zombie must count as gone");
        child.wait().unwrap();
        assert!(!process_alive(child_pid, child_start));
    }
}
