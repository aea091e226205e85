//! An independent f64 re-implementation of the model's math, written naively from SPEC.md section 2,
//! for gradient checks by central finite differences. Shared by the gradient-check tests.
#![allow(dead_code)]

use nc_core::config::{ModelConfig, LOGIT_SOFTCAP, RMSNORM_EPS, ROPE_BASE};

pub fn rmsnorm(x: &[f64], dim: usize) -> Vec<f64> {
    let mut y = vec![0.0; x.len()];
    for (xr, yr) in x.chunks(dim).zip(y.chunks_mut(dim)) {
        let ms = xr.iter().map(|v| v * v).sum::<f64>() / dim as f64;
        let s = 1.0 / (ms + RMSNORM_EPS as f64).sqrt();
        for (a, b) in yr.iter_mut().zip(xr) {
            *a = b * s;
        }
    }
    y
}

/// x (B, T, heads, D) rotated by position t + pos0, half-split layout.
pub fn rotary(x: &[f64], t: usize, heads: usize, hd: usize, pos0: usize) -> Vec<f64> {
    let half = hd / 2;
    let mut y = x.to_vec();
    for (row, chunk) in y.chunks_mut(heads * hd).enumerate() {
        let p = (pos0 + row % t) as f64;
        for head in chunk.chunks_mut(hd) {
            for j in 0..half {
                let ang = p / ROPE_BASE.powf(2.0 * j as f64 / hd as f64);
                let (c, s) = (ang.cos(), ang.sin());
                let (a, b) = (head[j], head[j + half]);
                head[j] = a * c + b * s;
                head[j + half] = -a * s + b * c;
            }
        }
    }
    y
}

/// Causal attention with GQA, materializing the scores (fine at test sizes).
/// q (B, T, H, D), k/v (B, T, Hkv, D) -> (B, T, H, D).
pub fn attention(q: &[f64], k: &[f64], v: &[f64], b: usize, t: usize, h: usize, hkv: usize, d: usize) -> Vec<f64> {
    let mut out = vec![0.0; b * t * h * d];
    let scale = 1.0 / (d as f64).sqrt();
    for bb in 0..b {
        for hh in 0..h {
            let kh = hh / (h / hkv);
            for i in 0..t {
                let qi = &q[((bb * t + i) * h + hh) * d..][..d];
                let s: Vec<f64> = (0..=i)
                    .map(|j| {
                        let kj = &k[((bb * t + j) * hkv + kh) * d..][..d];
                        qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>() * scale
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                let o = &mut out[((bb * t + i) * h + hh) * d..][..d];
                for (j, sj) in s.iter().enumerate() {
                    let p = (sj - m).exp() / z;
                    let vj = &v[((bb * t + j) * hkv + kh) * d..][..d];
                    for c in 0..d {
                        o[c] += p * vj[c];
                    }
                }
            }
        }
    }
    out
}

/// y (n x out) = x (n x in) W^T, W (out, in).
pub fn linear(x: &[f64], w: &[f64], n: usize, din: usize, dout: usize) -> Vec<f64> {
    let mut y = vec![0.0; n * dout];
    for i in 0..n {
        for o in 0..dout {
            y[i * dout + o] = (0..din).map(|c| x[i * din + c] * w[o * din + c]).sum();
        }
    }
    y
}

/// Per-token softcapped cross-entropy (0 for target -1).
pub fn softcap_ce(logits: &[f64], v: usize, targets: &[i32]) -> Vec<f64> {
    let cap = LOGIT_SOFTCAP as f64;
    logits
        .chunks(v)
        .zip(targets)
        .map(|(row, &t)| {
            if t < 0 {
                return 0.0;
            }
            let z: Vec<f64> = row.iter().map(|l| cap * (l / cap).tanh()).collect();
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            lse - z[t as usize]
        })
        .collect()
}

/// The whole model's mean loss, in f64, from the flat parameter vector laid out by param_specs.
pub fn model_loss(cfg: &ModelConfig, p: &[f64], b: usize, t: usize, inputs: &[u32], targets: &[i32]) -> f64 {
    let specs = cfg.param_specs();
    let get = |name: &str| {
        let s = specs.iter().find(|s| s.name == name).unwrap();
        &p[s.range()]
    };
    let (d, h, hkv, hd, vocab) = (cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.vocab_size);
    let n = b * t;
    let wte = get("transformer.wte.weight");
    let mut x: Vec<f64> = inputs
        .iter()
        .flat_map(|&i| wte[i as usize * d..(i as usize + 1) * d].to_vec())
        .collect();
    x = rmsnorm(&x, d);
    for l in 0..cfg.n_layer {
        let pre = format!("transformer.h.{l}");
        let xn = rmsnorm(&x, d);
        let q = linear(&xn, get(&format!("{pre}.attn.c_q.weight")), n, d, h * hd);
        let k = linear(&xn, get(&format!("{pre}.attn.c_k.weight")), n, d, hkv * hd);
        let v = linear(&xn, get(&format!("{pre}.attn.c_v.weight")), n, d, hkv * hd);
        let q = rmsnorm(&rotary(&q, t, h, hd, 0), hd);
        let k = rmsnorm(&rotary(&k, t, hkv, hd, 0), hd);
        let y = attention(&q, &k, &v, b, t, h, hkv, hd);
        let o = linear(&y, get(&format!("{pre}.attn.c_proj.weight")), n, h * hd, d);
        x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        let xn = rmsnorm(&x, d);
        let u = linear(&xn, get(&format!("{pre}.mlp.c_fc.weight")), n, d, 4 * d);
        let hh: Vec<f64> = u.iter().map(|&u| u.max(0.0) * u.max(0.0)).collect();
        let o = linear(&hh, get(&format!("{pre}.mlp.c_proj.weight")), n, 4 * d, d);
        x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
    }
    let xf = rmsnorm(&x, d);
    let logits = linear(&xf, get("lm_head.weight"), n, d, vocab);
    let losses = softcap_ce(&logits, vocab, targets);
    let counted = targets.iter().filter(|&&t| t >= 0).count();
    losses.iter().sum::<f64>() / counted as f64
}

/// A tiny deterministic generator for test data (tests do not depend on the engine's RNG).
pub struct TestRng(pub u64);
impl TestRng {
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 11
    }
    pub fn uniform(&mut self) -> f64 {
        self.next() as f64 / (1u64 << 53) as f64
    }
    /// Roughly normal (sum of uniforms), enough for test values.
    pub fn normal(&mut self) -> f64 {
        (0..4).map(|_| self.uniform()).sum::<f64>() * (3.0f64).sqrt() - 2.0 * (3.0f64).sqrt()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}
