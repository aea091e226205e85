//! The optimizer's elementwise arithmetic on host slices: the CPU backend runs these directly, and the
//! `Backend` trait's default methods run them on downloaded copies (any backend without its own kernels).
//! A device's kernels must compute the same formulas in the same order (kernels-ptx/cuda/optim.cu).

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

/// y = a x + b y; with b = 0, y = a x (y is not read, so a NaN in it does not survive).
pub fn axpby(a: f32, x: &[f32], b: f32, y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "axpby: x and y differ in length");
    if b == 0.0 {
        y.iter_mut().zip(x).for_each(|(y, &x)| *y = a * x);
    } else {
        y.iter_mut().zip(x).for_each(|(y, &x)| *y = a * x + b * *y);
    }
}

/// x *= a.
pub fn scale(x: &mut [f32], a: f32) {
    x.iter_mut().for_each(|v| *v *= a);
}

/// Sum of squares accumulated in f64.
pub fn sum_squares(x: &[f32]) -> f64 {
    x.iter().map(|&v| (v as f64) * (v as f64)).sum()
}

/// Muon's momentum with nesterov: buf = buf + (1 - mu)(g - buf); update = g + mu (buf - g).
pub fn muon_momentum(g: &[f32], buf: &mut [f32], update: &mut [f32], mu: f32) {
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

/// One AdamW step over a slice.
pub fn adamw(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], h: AdamwStep) {
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
