//! Seeded, reproducible initialization (SPEC.md section 3) and the small RNG used for it and for sampling.

use crate::config::{ParamSpec, ROPE_BASE};

/// xoshiro256** seeded through splitmix64: small, fast, and the same on every platform.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut st = seed;
        Rng {
            s: [
                splitmix64(&mut st),
                splitmix64(&mut st),
                splitmix64(&mut st),
                splitmix64(&mut st),
            ],
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal by Box-Muller (one of the pair is used; simplicity over speed).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // in (0, 1]: ln is finite
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// The init std of a parameter: wte 1; lm_head and both c_proj 0; other linears
/// 1/sqrt(fan_in) * min(1, sqrt(fan_out / fan_in)) with fan_in = cols, fan_out = rows.
pub fn init_std(spec: &ParamSpec) -> f64 {
    let name = spec.name.as_str();
    if name == "transformer.wte.weight" {
        1.0
    } else if name == "lm_head.weight" || name.ends_with(".c_proj.weight") {
        0.0
    } else {
        let (fan_out, fan_in) = (spec.rows as f64, spec.cols as f64);
        1.0 / fan_in.sqrt() * (fan_out / fan_in).sqrt().min(1.0)
    }
}

/// Fill `params` (the whole contiguous buffer, host side). Each tensor draws from its own stream
/// (seed, tensor index), so a tensor's values do not depend on the shapes of the others.
pub fn init_params(specs: &[ParamSpec], params: &mut [f32], seed: u64) {
    for (i, spec) in specs.iter().enumerate() {
        let std = init_std(spec);
        let dst = &mut params[spec.range()];
        if std == 0.0 {
            dst.fill(0.0);
            continue;
        }
        let mut rng = Rng::new(seed ^ (i as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
        for v in dst.iter_mut() {
            *v = (rng.normal() * std) as f32;
        }
    }
}

/// Rotary table [cos (max_pos, D/2) | sin (max_pos, D/2)], angle(t, j) = t / base^(2j/D).
/// Computed in f64 and rounded once to f32 (closest to the exact angles the f64 reference uses).
pub fn rotary_table(max_pos: usize, head_dim: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut table = vec![0.0f32; 2 * max_pos * half];
    let (cos, sin) = table.split_at_mut(max_pos * half);
    for t in 0..max_pos {
        for j in 0..half {
            let inv_freq = 1.0 / ROPE_BASE.powf(2.0 * j as f64 / head_dim as f64);
            let angle = t as f64 * inv_freq;
            cos[t * half + j] = angle.cos() as f32;
            sin[t * half + j] = angle.sin() as f32;
        }
    }
    table
}
