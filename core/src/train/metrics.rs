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

/// f32 FLOPs per cycle per core of the widest FMA this CPU has: two FMA units of 16 lanes (AVX-512) or of
/// 8 lanes (AVX2), x 2 FLOPs per FMA; 8 without FMA.
fn f32_flops_per_cycle() -> (f64, &'static str) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return (64.0, "AVX-512 FMA");
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return (32.0, "AVX2 FMA");
        }
    }
    (8.0, "no wide FMA")
}

/// The CPU's dense f32 peak that MFU is stated against: threads x FLOPs per cycle of its widest FMA x the
/// highest clock /proc/cpuinfo reports (3 GHz when it says nothing).
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
    let (per_cycle, isa) = f32_flops_per_cycle();
    let peak = threads as f64 * per_cycle * mhz * 1e6;
    let how = format!(
        "{threads} threads x {per_cycle} f32 FLOP/cycle ({isa}) x {:.2} GHz",
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
