//! bf16 rounding of whole slices on the CPU, compiled once per vector level (`isa_dispatched!`): the CPU
//! backend's stores into Bf16 buffers. Each value rounds as `backend::bf16::round_bf16` does; this lives in
//! cpu/ so that bf16.rs stays a leaf (it imported the CPU backend's dispatch, which imports it back).

use crate::backend::bf16::round_bf16;

super::isa::isa_dispatched! {
    /// Rounds every element of `xs` to bf16 in place (integer operations only: the same bits in every copy).
    pub fn round_slice_bf16 / round_slice_bf16_at(xs: &mut [f32]) => round_slice_bf16_body
}

#[inline(always)]
fn round_slice_bf16_body(xs: &mut [f32]) {
    for x in xs {
        *x = round_bf16(*x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::isa::{assert_same_bits, levels_here, test_values};

    /// The slice rounding gives round_bf16's bits in every copy this CPU can run, specials included.
    #[test]
    fn slice_rounding_agrees_with_round_bf16_at_every_level() {
        let mut xs = test_values(4099, 11);
        let specials = [
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7f80_0001),
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            -0.0,
            f32::from_bits(1),
        ];
        xs[..specials.len()].copy_from_slice(&specials);
        let want: Vec<f32> = xs.iter().map(|&x| round_bf16(x)).collect();
        for level in levels_here() {
            for n in [xs.len(), 17, 16, 15] {
                let mut got = xs[..n].to_vec();
                round_slice_bf16_at(level, &mut got);
                assert_same_bits(&format!("round_slice_bf16 {level:?} n {n}"), &got, &want[..n]);
            }
        }
    }
}
