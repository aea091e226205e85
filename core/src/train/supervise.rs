//! The supervisor: `nc-train --world-size N` (or `--nproc-per-node N`) on one machine starts N workers of
//! its own executable with the launcher's variables set (as torchrun would), forwards Ctrl-C and SIGTERM to
//! them, and watches them: when one fails, the others fail too (their collectives name the dead peer), and
//! any still running after a grace period are killed; it exits with the first failure's code.
//!
//! Workers run in their own process group, so a Ctrl-C in the terminal reaches the supervisor alone and each
//! worker gets exactly one forwarded signal (a second one ends a worker at once, as in a single process);
//! and each asks the kernel for SIGTERM when the supervisor dies, so killing the supervisor stops them with
//! a checkpoint instead of orphaning them.

use crate::error::{NcError, Result};
use crate::train::signal;
use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// How long the other workers may take to exit after the first failure before they are killed. Their
/// collectives notice a dead peer within a second or two; this covers a rank busy evaluating or saving.
pub const GRACE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);

pub struct SupervisorConfig {
    /// Workers to start on this machine (the world size).
    pub nprocs: usize,
    /// Each CPU worker gets its share of the cores as rayon threads; GPU workers use GPU LOCAL_RANK.
    pub cpu: bool,
    pub exe: PathBuf,
    /// The supervisor's own arguments, passed to every worker unchanged.
    pub args: Vec<OsString>,
    pub grace: Duration,
}

/// A worker's end, for messages and the exit code.
fn describe(status: ExitStatus) -> (String, i32) {
    match (status.code(), status.signal()) {
        (Some(c), _) => (format!("exited with code {c}"), c),
        (None, Some(s)) => {
            let name = match s {
                libc::SIGKILL => " (SIGKILL: killed, or out of memory)",
                libc::SIGSEGV => " (SIGSEGV)",
                libc::SIGABRT => " (SIGABRT)",
                libc::SIGTERM => " (SIGTERM)",
                libc::SIGINT => " (SIGINT)",
                _ => "",
            };
            (format!("was killed by signal {s}{name}"), 128 + s)
        }
        (None, None) => ("ended".into(), 1),
    }
}

/// A port nobody listens on now, for MASTER_PORT (the OS picks it; rank 0 binds it again moments later).
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| NcError::new(format!("finding a free port for the rendezvous: {e}")))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| NcError::new(format!("finding a free port for the rendezvous: {e}")))
}

fn spawn_worker(cfg: &SupervisorConfig, rank: usize, port: u16, threads: Option<usize>) -> Result<Child> {
    let mut cmd = Command::new(&cfg.exe);
    cmd.args(&cfg.args)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", cfg.nprocs.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("LOCAL_WORLD_SIZE", cfg.nprocs.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .process_group(0);
    if let Some(t) = threads {
        cmd.env("RAYON_NUM_THREADS", t.to_string());
    }
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: between fork and exec only async-signal-safe calls: prctl, getppid, _exit.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // the supervisor died before the request took effect: no signal will come
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    cmd.spawn()
        .map_err(|e| NcError::new(format!("starting worker rank {rank} ({}): {e}", cfg.exe.display())))
}

/// Start the workers and watch them until all have ended; returns the exit code for this process: 0 if all
/// succeeded, otherwise the first failure's (128 + the signal for a worker killed by one).
pub fn supervise(cfg: &SupervisorConfig) -> Result<i32> {
    signal::install_supervisor_handlers();
    let port = free_port()?;
    // rayon threads per CPU worker: the cores shared out, unless the user chose
    let threads = if cfg.cpu && std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        Some((cores / cfg.nprocs).max(1))
    } else {
        None
    };
    let mut workers: Vec<(usize, Child)> = Vec::new();
    for rank in 0..cfg.nprocs {
        match spawn_worker(cfg, rank, port, threads) {
            Ok(c) => workers.push((rank, c)),
            Err(e) => {
                for (_, c) in workers.iter_mut() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(e);
            }
        }
    }
    let mut running: Vec<(usize, Child)> = workers;
    let mut first_failure: Option<(usize, i32, Instant)> = None;
    let mut forwarded = 0usize;
    while !running.is_empty() {
        // forward each new Ctrl-C / SIGTERM once to every worker
        let received = signal::signals_received();
        while forwarded < received {
            for (_, c) in &running {
                // SAFETY: signalling our own child.
                unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            }
            forwarded += 1;
        }
        // collect the workers that ended in this round; a death by signal is reported before an error exit
        // of the same round, which is usually its consequence
        let mut ended: Vec<(usize, u32, ExitStatus)> = Vec::new();
        let mut still = Vec::new();
        for (rank, mut c) in running {
            match c.try_wait() {
                Ok(Some(st)) => ended.push((rank, c.id(), st)),
                Ok(None) => still.push((rank, c)),
                Err(e) => {
                    eprintln!("nc-train: supervisor: waiting on rank {rank}: {e}");
                    still.push((rank, c));
                }
            }
        }
        running = still;
        ended.sort_by_key(|(rank, _, st)| (st.signal().is_none(), *rank));
        for (rank, pid, st) in ended {
            let (what, code) = describe(st);
            if code == 0 {
                continue;
            }
            // a stop (Ctrl-C, SIGTERM, --stop-at-step) ends every worker with 130 after its checkpoint
            let stop = code == 130;
            if first_failure.is_none() {
                first_failure = Some((rank, code, Instant::now()));
                if !stop {
                    eprintln!(
                        "nc-train: supervisor: rank {rank} (pid {pid}) {what}; the other ranks stop (their \
                         collectives fail naming it), and any still running in {} s are killed",
                        cfg.grace.as_secs()
                    );
                }
            } else if !stop {
                eprintln!("nc-train: supervisor: rank {rank} {what}");
            }
        }
        if let Some((failed, code, at)) = first_failure {
            if code != 130 && at.elapsed() > cfg.grace && !running.is_empty() {
                for (rank, c) in running.iter_mut() {
                    eprintln!(
                        "nc-train: supervisor: rank {rank} still running {} s after rank {failed} failed; killing it",
                        cfg.grace.as_secs()
                    );
                    let _ = c.kill();
                }
            }
        }
        std::thread::sleep(POLL);
    }
    Ok(first_failure.map(|(_, code, _)| code).unwrap_or(0))
}
