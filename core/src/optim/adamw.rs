//! AdamW for the embedding and the lm_head: bias-corrected moments, decoupled weight decay.
//!
//! PyTorch's form: p *= 1 - lr * wd; m = lerp(m, g, 1 - b1); v = lerp(v, g^2, 1 - b2);
//! p -= (lr / (1 - b1^t)) * m / (sqrt(v / (1 - b2^t)) + eps), with t the 1-based step count.

use crate::backend::optim_ops::{self, AdamwStep};

/// AdamW's constants (SPEC.md section 4: betas (0.8, 0.95), eps 1e-10).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamParams {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamParams {
    fn default() -> Self {
        AdamParams {
            beta1: 0.8,
            beta2: 0.95,
            eps: 1e-10,
            weight_decay: 0.0,
        }
    }
}

/// nanochat scales both AdamW lrs by (d_model / 768)^-0.5 (tuned at d = 768).
pub fn adam_lr_scale(n_embd: usize) -> f32 {
    (n_embd as f64 / 768.0).powf(-0.5) as f32
}

/// The scalars of AdamW step `t` (1-based) at learning rate `lr`. Bias corrections in f64: b^t for large t
/// underflows gracefully and stays accurate.
pub fn adamw_step(lr: f32, t: u64, h: &AdamParams) -> AdamwStep {
    let bc1 = 1.0 - (h.beta1 as f64).powf(t as f64);
    let bc2 = 1.0 - (h.beta2 as f64).powf(t as f64);
    AdamwStep {
        beta1: h.beta1,
        beta2: h.beta2,
        eps: h.eps,
        decay: 1.0 - lr * h.weight_decay,
        step: (lr as f64 / bc1) as f32,
        inv_bc2: (1.0 / bc2) as f32,
    }
}

/// One AdamW update of a slice; `t` is the 1-based count of steps this state has taken, including this one.
pub fn adamw_update(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], lr: f32, t: u64, h: &AdamParams) {
    optim_ops::adamw(param, grad, m, v, adamw_step(lr, t, h));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_moves_by_lr_times_sign() {
        // t = 1: m_hat = g, v_hat = g^2, so the step is lr * g / (|g| + eps) ~ lr * sign(g).
        let h = AdamParams::default();
        let mut p = vec![1.0f32, -1.0, 0.5];
        let g = [0.3f32, -2.0, 0.0];
        let (mut m, mut v) = (vec![0.0; 3], vec![0.0; 3]);
        adamw_update(&mut p, &g, &mut m, &mut v, 0.01, 1, &h);
        assert!((p[0] - 0.99).abs() < 1e-6 && (p[1] + 0.99).abs() < 1e-6, "{p:?}");
        assert_eq!(p[2], 0.5);
        assert!((m[0] - 0.2 * 0.3).abs() < 1e-7 && (v[1] - 0.05 * 4.0).abs() < 1e-6);
    }

    #[test]
    fn second_step_and_weight_decay_by_hand() {
        let h = AdamParams {
            weight_decay: 0.1,
            ..AdamParams::default()
        };
        let mut p = vec![2.0f32];
        let (mut m, mut v) = (vec![0.0f32], vec![0.0f32]);
        adamw_update(&mut p, &[1.0], &mut m, &mut v, 0.1, 1, &h);
        adamw_update(&mut p, &[-3.0], &mut m, &mut v, 0.1, 2, &h);
        // by hand in f64
        let (b1, b2, lr, wd) = (0.8f64, 0.95f64, 0.1f64, 0.1f64);
        let mut pe = 2.0f64;
        let (m1, v1) = (0.2, 0.05);
        pe = pe * (1.0 - lr * wd) - lr / (1.0 - b1) * m1 / ((v1 / (1.0 - b2)).sqrt() + 1e-10);
        let (m2, v2) = (b1 * m1 + (1.0 - b1) * -3.0, b2 * v1 + (1.0 - b2) * 9.0);
        pe = pe * (1.0 - lr * wd) - lr / (1.0 - b1 * b1) * m2 / ((v2 / (1.0 - b2 * b2)).sqrt() + 1e-10);
        assert!((p[0] as f64 - pe).abs() < 1e-6, "{} vs {pe}", p[0]);
    }

    #[test]
    fn lr_scale_is_one_at_768() {
        assert_eq!(adam_lr_scale(768), 1.0);
        assert!((adam_lr_scale(3072) - 0.5).abs() < 1e-7);
    }
}
