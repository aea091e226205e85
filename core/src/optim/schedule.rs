//! The learning-rate multiplier and Muon's momentum, as functions of the step (SPEC.md section 4).

/// Muon momentum rises linearly from 0.85 to 0.95 over the first `MUON_MOMENTUM_WARMUP_STEPS` steps.
pub const MUON_MOMENTUM_START: f32 = 0.85;
pub const MUON_MOMENTUM_END: f32 = 0.95;
pub const MUON_MOMENTUM_WARMUP_STEPS: f64 = 300.0;

/// Shape of the schedule, fractions of the run's iterations.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LrSchedule {
    pub num_iterations: u64,
    pub warmup_ratio: f64,
    pub warmdown_ratio: f64,
    pub final_lr_frac: f64,
}

impl LrSchedule {
    /// Python's `round` (ties to even), which nanochat uses to turn ratios into step counts.
    fn steps(&self, ratio: f64) -> u64 {
        (ratio * self.num_iterations as f64).round_ties_even().max(0.0) as u64
    }

    pub fn warmup_iters(&self) -> u64 {
        self.steps(self.warmup_ratio)
    }

    pub fn warmdown_iters(&self) -> u64 {
        self.steps(self.warmdown_ratio)
    }

    /// Multiplier of every group's base lr at step `it` (0-based): linear warmup to 1, flat, then
    /// linear warmdown to `final_lr_frac` over the last `warmdown_iters` steps.
    pub fn lr_multiplier(&self, it: u64) -> f64 {
        let n = self.num_iterations;
        let warmup = self.warmup_iters();
        let warmdown = self.warmdown_iters();
        if it < warmup {
            (it + 1) as f64 / warmup as f64
        } else if it + warmdown <= n {
            1.0
        } else {
            // it > n - warmdown, so warmdown > 0 here.
            let progress = n.saturating_sub(it) as f64 / warmdown as f64;
            progress + (1.0 - progress) * self.final_lr_frac
        }
    }
}

/// Muon momentum at step `it` (0-based).
pub fn muon_momentum(it: u64) -> f32 {
    let frac = (it as f64 / MUON_MOMENTUM_WARMUP_STEPS).min(1.0);
    ((1.0 - frac) * MUON_MOMENTUM_START as f64 + frac * MUON_MOMENTUM_END as f64) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(n: u64, warmup: f64, warmdown: f64, final_frac: f64) -> LrSchedule {
        LrSchedule {
            num_iterations: n,
            warmup_ratio: warmup,
            warmdown_ratio: warmdown,
            final_lr_frac: final_frac,
        }
    }

    #[test]
    fn default_schedule_is_flat_then_linear_warmdown_to_zero() {
        // 100 steps, warmdown 0.2: flat through step 80, then (100 - it) / 20.
        let s = sched(100, 0.0, 0.2, 0.0);
        assert_eq!(s.lr_multiplier(0), 1.0);
        assert_eq!(s.lr_multiplier(80), 1.0);
        assert_eq!(s.lr_multiplier(81), 19.0 / 20.0);
        assert_eq!(s.lr_multiplier(90), 0.5);
        assert_eq!(s.lr_multiplier(99), 1.0 / 20.0);
        assert_eq!(s.lr_multiplier(100), 0.0);
    }

    #[test]
    fn warmup_and_final_fraction() {
        let s = sched(10, 0.3, 0.5, 0.1);
        // warmup 3 steps: 1/3, 2/3, 1; warmdown 5 steps from it = 6.
        assert!((s.lr_multiplier(0) - 1.0 / 3.0).abs() < 1e-12);
        assert!((s.lr_multiplier(1) - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(s.lr_multiplier(2), 1.0);
        assert_eq!(s.lr_multiplier(5), 1.0);
        // it = 6: progress 4/5 -> 0.8 + 0.2 * 0.1
        assert!((s.lr_multiplier(6) - 0.82).abs() < 1e-12);
        assert!((s.lr_multiplier(10) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn rounding_is_ties_to_even_like_python() {
        // 0.5 * 5 = 2.5 -> 2 in Python, 0.5 * 7 = 3.5 -> 4.
        assert_eq!(sched(5, 0.5, 0.0, 0.0).warmup_iters(), 2);
        assert_eq!(sched(7, 0.5, 0.0, 0.0).warmup_iters(), 4);
    }

    #[test]
    fn momentum_ramps_over_300_steps() {
        assert_eq!(muon_momentum(0), 0.85);
        assert!((muon_momentum(150) - 0.90).abs() < 1e-7);
        assert_eq!(muon_momentum(300), 0.95);
        assert_eq!(muon_momentum(10_000), 0.95);
    }
}
