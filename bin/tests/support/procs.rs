//! Helpers for the tests that run nc-train as several processes: finding a supervisor's workers, reading a
//! checkpoint folder's bytes (to show a crash left it untouched), reading a run's output up to the line a test
//! acts at, waiting for a run with a limit, and killing a worker. Each test file uses some of them.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Lines, Read};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The pids of the supervisor's children (the workers) with their RANK.
pub fn workers_of(supervisor: u32) -> Vec<(u32, usize)> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // the fields after the command's closing parenthesis: state, ppid, ...
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let ppid: u32 = after.split(' ').nth(1).unwrap().parse().unwrap();
        if ppid != supervisor {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let rank = env
            .split(|&b| b == 0)
            .filter_map(|kv| std::str::from_utf8(kv).ok()?.strip_prefix("RANK="))
            .next()
            .and_then(|r| r.parse().ok());
        if let Some(r) = rank {
            found.push((pid, r));
        }
    }
    found
}

/// Every file of a checkpoint folder, by name, with its bytes.
pub fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Reads `lines` (a run's output) up to the first that starts with `prefix`, that one included (all of them if
/// none does): what the run printed before the moment the test acts at.
pub fn lines_until(lines: &mut impl Iterator<Item = std::io::Result<String>>, prefix: &str) -> Vec<String> {
    let mut seen = Vec::new();
    for line in lines {
        let line = line.unwrap();
        let go = line.starts_with(prefix);
        seen.push(line);
        if go {
            break;
        }
    }
    seen
}

/// Starts `cmd` with its output piped and reads its stdout up to the first line that starts with `prefix`
/// (`lines_until`): the child, the lines seen, and the rest of its stdout.
pub fn spawn_until(cmd: &mut Command, prefix: &str) -> (Child, Vec<String>, Lines<BufReader<ChildStdout>>) {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let seen = lines_until(&mut lines, prefix);
    (child, seen, lines)
}

/// Waits for a child at most `limit`; None if it is still running then (and it is killed).
pub fn wait_at_most(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    None
}

/// What the SIGKILL of a worker led to.
pub struct Killed {
    /// The supervisor's workers (pid, rank) before the kill.
    pub workers: Vec<(u32, usize)>,
    pub victim: u32,
    /// The supervisor's exit.
    pub status: ExitStatus,
    /// From the kill to the supervisor's exit.
    pub took: Duration,
    /// Everything the supervisor and its workers wrote to stderr.
    pub stderr: String,
}

/// SIGKILLs rank 1 of the two workers of the supervisor `sup` (started with stderr piped; `seen`, what it
/// printed so far, for messages) and waits at most 60 s for the supervisor to exit.
pub fn kill_rank_1(sup: &mut Child, seen: &[String]) -> Killed {
    let workers = workers_of(sup.id());
    assert_eq!(workers.len(), 2, "{workers:?}\n{seen:?}");
    let (victim, _) = *workers.iter().find(|(_, r)| *r == 1).unwrap();
    let t0 = Instant::now();
    // SAFETY: killing a process this test started (through the supervisor).
    assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGKILL) }, 0);
    let status = wait_at_most(sup, Duration::from_secs(60)).expect("the supervisor exits within 60 s");
    let took = t0.elapsed();
    let mut stderr = String::new();
    sup.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    Killed {
        workers,
        victim,
        status,
        took,
        stderr,
    }
}
