//! metrics.jsonl (one JSON object per step and per evaluation) and the per-step log line.

use crate::error::{NcError, Result};
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub const METRICS_FILE: &str = "metrics.jsonl";

pub struct MetricsWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

fn step_of(line: &str) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(line)
        .ok()?
        .get("step")?
        .as_u64()
}

impl MetricsWriter {
    /// A fresh file for a new run; on resume from `resume_step`, the lines of steps before it are kept
    /// (what a crashed run logged after its last checkpoint is dropped: those steps are run again).
    pub fn open(out_dir: &Path, resume_step: Option<u64>) -> Result<Self> {
        let path = out_dir.join(METRICS_FILE);
        let err = |e: std::io::Error| NcError::new(format!("{}: {e}", path.display()));
        let kept: Vec<String> = match resume_step {
            Some(s) if path.exists() => fs::read_to_string(&path)
                .map_err(err)?
                .lines()
                .filter(|l| step_of(l).is_some_and(|st| st < s))
                .map(String::from)
                .collect(),
            _ => Vec::new(),
        };
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)
            .map_err(err)?;
        let mut out = BufWriter::new(file);
        for l in kept {
            writeln!(out, "{l}").map_err(err)?;
        }
        out.flush().map_err(err)?;
        Ok(MetricsWriter { path, out })
    }

    pub fn write(&mut self, record: &serde_json::Value) -> Result<()> {
        let err = |e: std::io::Error| NcError::new(format!("{}: {e}", self.path.display()));
        writeln!(self.out, "{record}").map_err(err)?;
        self.out.flush().map_err(err)
    }
}

/// Peak resident memory of this process (VmHWM), in bytes, where /proc says.
pub fn peak_rss_bytes() -> Option<u64> {
    let text = fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The CPU's dense f32 peak that MFU is stated against: threads x 32 FLOP/cycle (two 8-wide AVX2 FMA units)
/// x the highest clock /proc/cpuinfo reports (3 GHz when it says nothing).
pub fn cpu_peak_flops(threads: usize) -> (f64, String) {
    let mhz = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .filter(|l| l.starts_with("cpu MHz"))
                .filter_map(|l| l.split(':').nth(1)?.trim().parse::<f64>().ok())
                .reduce(f64::max)
        })
        .unwrap_or(3000.0);
    let peak = threads as f64 * 32.0 * mhz * 1e6;
    let how = format!(
        "{threads} threads x 32 f32 FLOP/cycle (AVX2 FMA) x {:.2} GHz",
        mhz / 1e3
    );
    (peak, how)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_keeps_only_earlier_steps() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = MetricsWriter::open(dir.path(), None).unwrap();
        for s in 0..5u64 {
            w.write(&serde_json::json!({"step": s, "loss": 1.0})).unwrap();
        }
        drop(w);
        let mut w = MetricsWriter::open(dir.path(), Some(3)).unwrap();
        w.write(&serde_json::json!({"step": 3, "loss": 2.0})).unwrap();
        drop(w);
        let text = fs::read_to_string(dir.path().join(METRICS_FILE)).unwrap();
        let steps: Vec<u64> = text.lines().filter_map(step_of).collect();
        assert_eq!(steps, vec![0, 1, 2, 3]);
        assert!(text.lines().last().unwrap().contains("2.0"));
        // a fresh run starts an empty file
        drop(MetricsWriter::open(dir.path(), None).unwrap());
        assert_eq!(fs::read_to_string(dir.path().join(METRICS_FILE)).unwrap(), "");
    }
}
