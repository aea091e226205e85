//! Gradient clipping by the global norm of the synchronized gradient.
//!
//! nanochat clips each rank's local gradient before the all-reduce; we clip after the gradients are
//! synchronized (SPEC.md section 4), so every rank scales by the same factor.

/// Sum of squares of a slice, accumulated in f64 so the norm of ~1e9 elements stays accurate.
/// Ranks that own disjoint shards add their partial sums (then all-reduce) to get the global norm.
pub fn sum_of_squares(grads: &[f32]) -> f64 {
    crate::backend::optim_ops::sum_squares(grads)
}

/// The factor PyTorch's `clip_grad_norm_` applies: `max_norm / (norm + 1e-6)`, capped at 1.
pub fn clip_factor(global_norm: f64, max_norm: f64) -> f32 {
    let coef = max_norm / (global_norm + 1e-6);
    coef.min(1.0) as f32
}

/// Clip `grads` (the whole synchronized gradient) to `max_norm` in place; returns the norm before
/// clipping. `max_norm <= 0` disables clipping (the norm is still returned, for the log).
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f64) -> f64 {
    let norm = sum_of_squares(grads).sqrt();
    if max_norm > 0.0 {
        let f = clip_factor(norm, max_norm);
        if f < 1.0 {
            grads.iter_mut().for_each(|g| *g *= f);
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clips_only_above_the_threshold() {
        // norm of (3, 4) is 5.
        let mut g = vec![3.0f32, 4.0];
        let n = clip_grad_norm(&mut g, 10.0);
        assert_eq!(n, 5.0);
        assert_eq!(g, vec![3.0, 4.0]);
        let n = clip_grad_norm(&mut g, 1.0);
        assert_eq!(n, 5.0);
        let f = 1.0 / (5.0 + 1e-6);
        assert!(
            (g[0] - 3.0 * f as f32).abs() < 1e-7 && (g[1] - 4.0 * f as f32).abs() < 1e-7,
            "{g:?}"
        );
        let after = sum_of_squares(&g).sqrt();
        assert!((after - 1.0).abs() < 1e-5, "{after}");
    }

    #[test]
    fn zero_max_norm_disables() {
        let mut g = vec![30.0f32, 40.0];
        assert_eq!(clip_grad_norm(&mut g, 0.0), 50.0);
        assert_eq!(g, vec![30.0, 40.0]);
    }
}
