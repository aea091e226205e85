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

impl MetricsWriter {
    /// Open the out dir's metrics.jsonl for appending: it is never truncated, so nothing a run logged is lost,
    /// not even by a resume that fails. A resumed run first writes a marker record (`"event": "resume"`, the
    /// step and the checkpoint); steps a crashed run logged after its last checkpoint are logged again after
    /// the marker, so readers take the last record of each step (`last_per_step`).
    pub fn open(out_dir: &Path, resumed_from: Option<(u64, &Path)>) -> Result<Self> {
        let path = out_dir.join(METRICS_FILE);
        let err = |e: std::io::Error| NcError::new(format!("{}: {e}", path.display()));
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(err)?;
        let mut w = MetricsWriter {
            out: BufWriter::new(file),
            path,
        };
        if let Some((step, checkpoint)) = resumed_from {
            w.write(&serde_json::json!({
                "event": "resume", "step": step, "checkpoint": checkpoint.display().to_string(),
            }))?;
        }
        Ok(w)
    }

    pub fn write(&mut self, record: &serde_json::Value) -> Result<()> {
        let err = |e: std::io::Error| NcError::new(format!("{}: {e}", self.path.display()));
        writeln!(self.out, "{record}").map_err(err)?;
        self.out.flush().map_err(err)
    }
}

/// The records of metrics.jsonl text that carry `key` (e.g. "raw_loss", "val_bpb"), the last one of each step,
/// by step: what the run that reached each step last logged (a resumed run logs again the steps a crashed one
/// logged after its last checkpoint). Lines that are not JSON objects with a step are skipped.
pub fn last_per_step(text: &str, key: &str) -> Vec<(u64, serde_json::Value)> {
    let mut by_step = std::collections::BTreeMap::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if let (Some(step), true) = (v.get("step").and_then(|s| s.as_u64()), v.get(key).is_some()) {
            by_step.insert(step, v);
        }
    }
    by_step.into_iter().collect()
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

/// The highest clock of this machine's cores, in MHz: cpufreq's maximum where the kernel exposes it (a constant,
/// so every process of a run states the same peak), else the highest "cpu MHz" of /proc/cpuinfo.
fn max_clock_mhz() -> Option<f64> {
    let cpufreq = fs::read_to_string("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
        .ok()
        .and_then(|t| t.trim().parse::<f64>().ok())
        .map(|khz| khz / 1e3);
    cpufreq.or_else(|| {
        fs::read_to_string("/proc/cpuinfo").ok().and_then(|t| {
            t.lines()
                .filter(|l| l.starts_with("cpu MHz"))
                .filter_map(|l| l.split(':').nth(1)?.trim().parse::<f64>().ok())
                .reduce(f64::max)
        })
    })
}

/// One rank's share of the CPU's dense f32 peak, which MFU is stated against: the machine's cores (those this
/// process may run on) shared evenly by the `sharing` ranks on it x FLOPs per cycle of the widest FMA x the
/// highest clock /proc/cpuinfo reports (3 GHz when it says nothing). A share of the cores, not of the rayon
/// threads: the ranks of one machine together own its cores, so the peaks of all ranks add up to the
/// machine's whatever the world size (nanochat's MFU: FLOPs of all ranks over the peak of all ranks).
pub fn cpu_peak_flops(cores: usize, sharing: usize) -> (f64, String) {
    let mhz = max_clock_mhz().unwrap_or(3000.0);
    let (per_cycle, isa) = f32_flops_per_cycle();
    let (cores, sharing) = (cores.max(1), sharing.max(1));
    let peak = cores as f64 / sharing as f64 * per_cycle * mhz * 1e6;
    let share = if sharing > 1 {
        format!("{cores} cores / {sharing} ranks")
    } else {
        format!("{cores} cores")
    };
    let how = format!("{share} x {per_cycle} f32 FLOP/cycle ({isa}) x {:.2} GHz", mhz / 1e3);
    (peak, how)
}

/// Model FLOPs utilization of a step (nanochat's definition): the model FLOPs of every rank (the step's tokens
/// over all ranks x FLOPs per token) per second, over the peak of every rank (`world_size` x one rank's peak).
pub fn mfu(flops_per_token: f64, tokens_per_step: usize, seconds: f64, peak_per_rank: f64, world_size: usize) -> f64 {
    flops_per_token * tokens_per_step as f64 / seconds / (peak_per_rank * world_size.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nothing is ever cut: a resume appends its marker and the steps again; the reader takes the last record
    /// of each step.
    #[test]
    fn resume_appends_and_readers_take_the_last_record_of_each_step() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = MetricsWriter::open(dir.path(), None).unwrap();
        for s in 0..5u64 {
            w.write(&serde_json::json!({"step": s, "raw_loss": 1.0})).unwrap();
        }
        drop(w);
        let before = fs::read_to_string(dir.path().join(METRICS_FILE)).unwrap();
        let mut w = MetricsWriter::open(dir.path(), Some((3, Path::new("ck/step_000003")))).unwrap();
        w.write(&serde_json::json!({"step": 3, "raw_loss": 2.0})).unwrap();
        drop(w);
        let text = fs::read_to_string(dir.path().join(METRICS_FILE)).unwrap();
        assert!(text.starts_with(&before), "appended only:\n{text}");
        let added: Vec<&str> = text[before.len()..].lines().collect();
        assert_eq!(added.len(), 2, "{text}");
        assert!(
            added[0].contains("\"event\":\"resume\"") && added[0].contains("ck/step_000003"),
            "{text}"
        );
        let losses: Vec<(u64, f64)> = last_per_step(&text, "raw_loss")
            .iter()
            .map(|(s, v)| (*s, v["raw_loss"].as_f64().unwrap()))
            .collect();
        assert_eq!(losses, [(0, 1.0), (1, 1.0), (2, 1.0), (3, 2.0), (4, 1.0)]);
        // a fresh open appends too (the out dir check refuses fresh runs into a used folder before this)
        drop(MetricsWriter::open(dir.path(), None).unwrap());
        assert_eq!(fs::read_to_string(dir.path().join(METRICS_FILE)).unwrap(), text);
    }
}
