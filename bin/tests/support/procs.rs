//! Helpers for the tests that run nc-train as several processes: finding a supervisor's workers, and reading a
//! checkpoint folder's bytes (to show a crash left it untouched). Each test file uses some of them.
#![allow(dead_code)]

use std::path::Path;

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
