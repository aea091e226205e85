//! A run of several ranks watched line by line, and the check that a device failure injected on one rank (the
//! simulator's NC_SIM_FAIL_ALLOC, NC_SIM_FAULT_KERNEL) ends every rank, naming it and the cause, never a hang.
//! For the tests of nc-train's supervisor over NCCL and over the P2P ring on simulated GPUs; each includes
//! this file and `procs.rs` (for a checkpoint's files).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Starts `cmd` with its stderr lines arriving on the receiver as they come (stdout is read and dropped).
pub fn spawn_reading_stderr(cmd: &mut Command) -> (Child, mpsc::Receiver<String>) {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || for _ in BufReader::new(stdout).lines() {});
    let stderr = child.stderr.take().unwrap();
    let (send, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
            if send.send(line).is_err() {
                break;
            }
        }
    });
    (child, lines)
}

/// Waits for a stderr line containing `needle` (at most `limit`); every line seen goes into `seen`.
pub fn wait_for_line(lines: &mpsc::Receiver<String>, needle: &str, limit: Duration, seen: &mut Vec<String>) -> bool {
    let t0 = Instant::now();
    while let Some(left) = limit.checked_sub(t0.elapsed()) {
        match lines.recv_timeout(left) {
            Ok(line) => {
                let hit = line.contains(needle);
                seen.push(line);
                if hit {
                    return true;
                }
            }
            Err(_) => return false,
        }
    }
    false
}

/// Waits for the child at most `limit` (killing it if it is still running then), then collects the rest of
/// its stderr into `seen`.
pub fn finish(
    child: &mut Child,
    lines: &mpsc::Receiver<String>,
    limit: Duration,
    seen: &mut Vec<String>,
) -> Option<ExitStatus> {
    let t0 = Instant::now();
    let mut status = None;
    while t0.elapsed() < limit {
        if let Some(st) = child.try_wait().unwrap() {
            status = Some(st);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(2)) {
        seen.push(line);
    }
    status
}

/// Every complete checkpoint under `out` with its files' bytes.
pub fn complete_checkpoints(out: &Path) -> Vec<(String, Vec<(String, Vec<u8>)>)> {
    let mut all = Vec::new();
    let Ok(rd) = std::fs::read_dir(out.join("checkpoints")) else {
        return all;
    };
    for d in rd.flatten() {
        if !d.path().join("COMPLETE").is_file() {
            continue;
        }
        all.push((
            d.file_name().to_string_lossy().into_owned(),
            crate::procs::files(&d.path()),
        ));
    }
    all.sort();
    all
}

/// Panics unless rank 0 ended with a line of its own naming rank 1 (its watchdog's, or its failed collective's).
pub fn assert_rank_0_names_rank_1(stderr: &str) {
    assert!(
        stderr.lines().any(|l| l.starts_with("rank 0:") && l.contains("rank 1")),
        "rank 0 names rank 1\n{stderr}"
    );
}

/// Panics if the supervisor had to kill a rank that outlived its grace: every rank must end by itself.
pub fn assert_none_was_killed(stderr: &str) {
    assert!(!stderr.contains("killing it"), "every rank ended by itself\n{stderr}");
}

/// The 2-rank run `cmd` (its supervisor; out dir `out`), with a device failure injected on rank 1 that the
/// simulator announces with a stderr line containing `injected`, after the run's first checkpoint: within 60 s
/// of that line every rank has ended by itself (none killed by the supervisor's grace), the supervisor
/// exits non-zero naming rank 1 as the first to fail, rank 0 names rank 1, and rank 1's own error is one line
/// `nc-train: error: rank 1: ...` naming `cause` (and no other rank as the cause), after which it prints nothing (every later line is the
/// supervisor's or rank 0's: no backtrace, no warnings of destructors, no rank-less continuation line); the
/// checkpoints complete when the failure came are byte for byte what they were, and none was added.
pub fn injected_failure_on_rank_1_ends_every_rank(cmd: &mut Command, out: &Path, injected: &str, cause: &str) {
    // a backtrace is what RUST_BACKTRACE asks for; the run's own lines are under test
    cmd.env_remove("RUST_BACKTRACE");
    let (mut sup, lines) = spawn_reading_stderr(cmd);
    let mut seen = Vec::new();
    let hit = wait_for_line(&lines, injected, Duration::from_secs(300), &mut seen);
    if !hit {
        let _ = sup.kill();
        let _ = sup.wait();
        panic!(
            "no '{injected}' line: the fault was never injected\n{}",
            seen.join("\n")
        );
    }
    let before = complete_checkpoints(out);
    let names: Vec<&String> = before.iter().map(|c| &c.0).collect();
    assert!(
        !before.is_empty(),
        "the failure should come mid-run, after a checkpoint was complete\n{}",
        seen.join("\n")
    );
    let status = finish(&mut sup, &lines, Duration::from_secs(60), &mut seen);
    let stderr = seen.join("\n");
    let status = status.unwrap_or_else(|| panic!("the run did not end within 60 s of the failure:\n{stderr}"));
    assert!(
        status.code().is_some_and(|c| c != 0),
        "the supervisor exits with a failure code: {status:?}\n{stderr}"
    );
    let errors: Vec<(usize, &str)> = stderr
        .lines()
        .enumerate()
        .filter(|(_, l)| l.starts_with("nc-train: error: "))
        .collect();
    assert_eq!(errors.len(), 1, "one error line, rank 1's\n{stderr}");
    let (at, line) = errors[0];
    assert!(
        line.starts_with("nc-train: error: rank 1: ") && line.contains(cause),
        "rank 1's error line names the rank and the cause ('{cause}'): {line}\n{stderr}"
    );
    assert!(
        !line.contains("another rank"),
        "rank 1's failure is its own, not another rank's: {line}"
    );
    for later in stderr.lines().skip(at + 1) {
        assert!(
            later.starts_with("nc-train: supervisor: ")
                || later.starts_with("rank 0: ")
                || later.starts_with("nc-sim NCCL: rank 0: "),
            "rank 1 printed after its error line: '{later}'\n{stderr}"
        );
    }
    let first = stderr
        .lines()
        .find(|l| l.starts_with("nc-train: supervisor: rank "))
        .unwrap_or_else(|| panic!("the supervisor names the failed rank\n{stderr}"));
    assert!(
        first.starts_with("nc-train: supervisor: rank 1 (pid ") && first.contains("exited with code"),
        "the supervisor names rank 1 first: {first}\n{stderr}"
    );
    assert_rank_0_names_rank_1(&stderr);
    assert_none_was_killed(&stderr);
    assert!(
        complete_checkpoints(out) == before,
        "the complete checkpoints {names:?} changed, or one was added"
    );
}
