//! The optimizer's elementwise arithmetic on host slices: the CPU backend runs these directly, and the
//! `Backend` trait's default methods run them on downloaded copies (any backend without its own kernels).
//! A device's kernels must compute the same formulas in the same order (kernels-ptx/cuda/optim.cu).
//!
//! Each pass runs the copy compiled for this process's vector level (`isa_dispatched!`): the same IEEE
//! operations per element in every copy, so the bits do not depend on the machine.

use super::cpu::isa::isa_dispatched;

/// The host-computed scalars of one AdamW step (see `optim::adamw::adamw_update`, whose arithmetic this is).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamwStep {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// 1 - lr * weight_decay.
    pub decay: f32,
    /// lr / (1 - beta1^t), computed in f64 then rounded.
    pub step: f32,
    /// 1 / (1 - beta2^t), computed in f64 then rounded.
    pub inv_bc2: f32,
}

isa_dispatched! {
    /// y = a x + b y; with b = 0, y = a x (y is not read, so a NaN in it does not survive).
    pub fn axpby / axpby_at(a: f32, x: &[f32], b: f32, y: &mut [f32]) => axpby_body
}

#[inline(always)]
fn axpby_body(a: f32, x: &[f32], b: f32, y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "axpby: x and y differ in length");
    if b == 0.0 {
        y.iter_mut().zip(x).for_each(|(y, &x)| *y = a * x);
    } else {
        y.iter_mut().zip(x).for_each(|(y, &x)| *y = a * x + b * *y);
    }
}

isa_dispatched! {
    /// x *= a.
    pub fn scale / scale_at(x: &mut [f32], a: f32) => scale_body
}

#[inline(always)]
fn scale_body(x: &mut [f32], a: f32) {
    x.iter_mut().for_each(|v| *v *= a);
}

/// Sum of squares accumulated in f64.
pub fn sum_squares(x: &[f32]) -> f64 {
    x.iter().map(|&v| (v as f64) * (v as f64)).sum()
}

isa_dispatched! {
    /// Muon's momentum with nesterov: buf = buf + (1 - mu)(g - buf); update = g + mu (buf - g).
    pub fn muon_momentum / muon_momentum_at(g: &[f32], buf: &mut [f32], update: &mut [f32], mu: f32)
        => muon_momentum_body
}

#[inline(always)]
fn muon_momentum_body(g: &[f32], buf: &mut [f32], update: &mut [f32], mu: f32) {
    assert!(
        buf.len() == g.len() && update.len() == g.len(),
        "muon_momentum: lengths differ"
    );
    for i in 0..g.len() {
        let gi = g[i];
        let b = buf[i] + (1.0 - mu) * (gi - buf[i]);
        buf[i] = b;
        update[i] = gi + mu * (b - gi);
    }
}

isa_dispatched! {
    /// One AdamW step over a slice.
    pub fn adamw / adamw_at(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], h: AdamwStep) => adamw_body
}

#[inline(always)]
fn adamw_body(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], h: AdamwStep) {
    let n = p.len();
    assert!(g.len() == n && m.len() == n && v.len() == n, "adamw: lengths differ");
    for i in 0..n {
        let gi = g[i];
        let mi = m[i] + (1.0 - h.beta1) * (gi - m[i]);
        let vi = v[i] + (1.0 - h.beta2) * (gi * gi - v[i]);
        m[i] = mi;
        v[i] = vi;
        let denom = (vi * h.inv_bc2).sqrt() + h.eps;
        p[i] = p[i] * h.decay - h.step * mi / denom;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::isa::{assert_same_bits, levels_here, test_values};

    /// Every optimizer pass gives the same bits in each copy this CPU can run (baseline, AVX2, AVX-512), over
    /// lengths with tails of every size mod 16: the twin-vs-device and resume promises then hold whichever
    /// copy a machine picks.
    #[test]
    fn passes_agree_across_levels() {
        let h = AdamwStep {
            beta1: 0.8,
            beta2: 0.95,
            eps: 1e-10,
            decay: 0.999,
            step: 3e-3,
            inv_bc2: 1.7,
        };
        for n in [1usize, 15, 16, 17, 1000, 4099] {
            let g = test_values(n, 1);
            let mut out: Vec<Vec<Vec<f32>>> = Vec::new();
            for &level in &levels_here() {
                let (mut p, mut m, mut v) = (test_values(n, 2), test_values(n, 3), test_values(n, 4));
                v.iter_mut().for_each(|x| *x = x.abs());
                adamw_at(level, &mut p, &g, &mut m, &mut v, h);
                let (mut buf, mut upd) = (test_values(n, 5), vec![0.0; n]);
                muon_momentum_at(level, &g, &mut buf, &mut upd, 0.95);
                let (mut y, mut y0) = (test_values(n, 6), vec![f32::NAN; n]);
                axpby_at(level, 0.3, &g, -1.7, &mut y);
                axpby_at(level, 0.3, &g, 0.0, &mut y0);
                let mut x = test_values(n, 7);
                scale_at(level, &mut x, 0.37);
                out.push(vec![p, m, v, buf, upd, y, y0, x]);
            }
            for (l, o) in out.iter().enumerate().skip(1) {
                let names = [
                    "adamw p",
                    "adamw m",
                    "adamw v",
                    "momentum buf",
                    "momentum update",
                    "axpby",
                    "axpby b=0",
                    "scale",
                ];
                for ((name, got), want) in names.iter().zip(o).zip(&out[0]) {
                    assert_same_bits(&format!("{name}, level {l}, n {n}"), got, want);
                }
            }
        }
    }
}
