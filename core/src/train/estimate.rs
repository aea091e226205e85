//! How long a run will take, said before its first step (from its FLOPs and the stated peak) and again after
//! it (from the measured step), so a run whose steps take minutes (a CPU given nanochat's 524,288-token batch)
//! says so at once, with the flag that makes it quicker, instead of after its first step.

use crate::plan::BatchPlan;

/// The share of the stated peak a step is assumed to reach before one was measured: the planner's default
/// (`--mfu 0.5`). CPU steps measured 30-35% of it, so the first estimate errs on the quick side.
const ASSUMED_MFU: f64 = 0.5;

/// Steps expected to take at least this long draw a warning.
const SLOW_STEP_SECONDS: f64 = 60.0;

/// What the suggested smaller batch aims at per step.
const QUICK_STEP_SECONDS: f64 = 10.0;

/// "45 s", "3.2 min", "2.5 h", "4.1 days".
pub fn duration(seconds: f64) -> String {
    if seconds < 90.0 {
        format!("{seconds:.1} s")
    } else if seconds < 5400.0 {
        format!("{:.1} min", seconds / 60.0)
    } else if seconds < 2.0 * 86400.0 {
        format!("{:.1} h", seconds / 3600.0)
    } else {
        format!("{:.1} days", seconds / 86400.0)
    }
}

/// The lines to print before the first step: the expected time per step and for the `steps` left, and, when a
/// step would take a minute or more, a warning with a smaller --total-batch-size (the largest one that keeps
/// every rank's micro-batch and takes about `QUICK_STEP_SECONDS`). `peak_all_ranks` is the FLOP/s MFU is
/// stated against.
pub fn before_first_step(flops_per_token: f64, batch: &BatchPlan, peak_all_ranks: f64, steps: u64) -> Vec<String> {
    let seconds_per_token = flops_per_token / (peak_all_ranks * ASSUMED_MFU);
    let per_step = seconds_per_token * batch.total_batch_size as f64;
    let mut lines = vec![format!(
        "estimate: about {} per step at {:.0}% of the stated peak, {} for the {steps} step(s) left (measured after \
         the first step)",
        duration(per_step),
        100.0 * ASSUMED_MFU,
        duration(per_step * steps as f64)
    )];
    if per_step >= SLOW_STEP_SECONDS {
        // the total must stay a multiple of one micro-batch of every rank
        let unit = batch.device_batch_size * batch.seq_len * batch.world_size;
        let units = ((QUICK_STEP_SECONDS / (seconds_per_token * unit as f64)).floor() as usize).max(1);
        let smaller = unit * units;
        let hint = if smaller < batch.total_batch_size {
            format!(
                "for a quicker run give a smaller --total-batch-size, e.g. --total-batch-size {smaller} (about {} \
                 per step)",
                duration(seconds_per_token * smaller as f64)
            )
        } else {
            "even one micro-batch is that slow: give a smaller --dbs or --max-seq-len, or a smaller model".into()
        };
        lines.push(format!(
            "warning: {} tokens per step take minutes on this machine (about {} each); {hint}",
            batch.total_batch_size,
            duration(per_step)
        ));
    }
    lines
}

/// The line to print after the first step this process took, `seconds` long, with `steps_left` to go.
pub fn after_first_step(seconds: f64, steps_left: u64) -> String {
    format!(
        "estimate: the first step took {}; at that pace the {steps_left} step(s) left take about {} (the first \
         step includes warm-up)",
        duration(seconds),
        duration(seconds * steps_left as f64)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_in_the_right_unit() {
        assert_eq!(duration(12.34), "12.3 s");
        assert_eq!(duration(150.0), "2.5 min");
        assert_eq!(duration(3.0 * 3600.0), "3.0 h");
        assert_eq!(duration(3.0 * 86400.0), "3.0 days");
    }

    /// nanochat's 524,288 tokens a step on a machine of 100 GFLOP/s for a model of 1e7 FLOPs per token:
    /// 1e7 x 524288 / (1e11 x 0.5) = 104.9 s a step: warned, with a total that is a multiple of 32 x 2048
    /// (one unit of 65,536 tokens already takes 13.1 s, so the suggestion is that one unit). A quick batch draws
    /// no warning.
    #[test]
    fn minutes_per_step_warn_with_a_smaller_batch() {
        let b = BatchPlan::new(32, 2048, 524288, 1).unwrap();
        let lines = before_first_step(1e7, &b, 1e11, 10);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].contains("about 1.7 min per step") && lines[0].contains("17.5 min for the 10"),
            "{lines:?}"
        );
        assert!(
            lines[1].contains("--total-batch-size 65536 (about 13.1 s per step)"),
            "{lines:?}"
        );
        let b = BatchPlan::new(4, 256, 4096, 1).unwrap();
        let lines = before_first_step(1e7, &b, 1e11, 10);
        assert_eq!(lines.len(), 1, "{lines:?}");
        // 1e7 x 4096 / 5e10 = 0.8192 s
        assert!(lines[0].contains("about 0.8 s per step"), "{lines:?}");
        // a unit of 1 x 256 x 2 = 512 tokens (0.1024 s) fits 10 s 97 times: 49,664 tokens, 9.93 s
        let b = BatchPlan::new(1, 256, 1 << 20, 2).unwrap();
        let lines = before_first_step(1e7, &b, 1e11, 1);
        assert!(lines[1].contains("--total-batch-size 49664 (about 9.9 s"), "{lines:?}");
    }
}
