//! bf16 rounding as the device does it, for the CPU twin of the bf16 engine.
//!
//! bf16 is the top half of an f32 (1 sign, 8 exponent, 7 mantissa bits), so every bf16 value is exactly an
//! f32 and "storing in bf16" is rounding an f32 to the nearest f32 whose low 16 bits are zero. The CUDA side
//! stores with `__float2bfloat16_rn`: round to nearest, ties to even, overflow to infinity, and a NaN stays a
//! quiet NaN with its sign and top mantissa bits. `round_bf16` reproduces that bit for bit (checked against
//! the emulation's shim, kernels-ptx/emu/shim/cuda_bf16.h, on every bf16 pattern and random floats).

/// The bf16 bit pattern `__float2bfloat16_rn` stores for `x`.
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        // NaN: keep sign and top mantissa bits, set the quiet bit so truncation cannot make it an infinity.
        return ((u >> 16) | 0x0040) as u16;
    }
    // Adding 0x7fff rounds up exactly when the low half is past the midpoint; the extra 1 when the kept part
    // is odd turns a tie into round-to-even. A carry into the exponent is the correct next binade/infinity.
    let rounding = 0x7fff + ((u >> 16) & 1);
    (u.wrapping_add(rounding) >> 16) as u16
}

/// The f32 value of a bf16 bit pattern (exact).
#[inline(always)]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// `x` rounded to the nearest bf16 (ties to even), as an f32: what reading back a bf16 store of `x` yields.
#[inline(always)]
pub fn round_bf16(x: f32) -> f32 {
    bf16_to_f32(bf16_bits(x))
}

/// Whether `x` is exactly a bf16 value (its low 16 bits are zero): what every element of a Bf16 buffer is.
#[inline]
pub fn is_bf16(x: f32) -> bool {
    x.to_bits() & 0xffff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known values worked out by hand from the bit layout.
    #[test]
    fn rounds_known_values() {
        // exact values pass unchanged
        for x in [
            0.0f32,
            -0.0,
            1.0,
            -2.0,
            0.5,
            3.0,
            65280.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ] {
            assert_eq!(round_bf16(x).to_bits(), x.to_bits(), "{x}");
        }
        // 1 + 2^-8 is exactly halfway between 1 and 1 + 2^-7: ties to even (mantissa 0) gives 1
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even): rounds up to 1 + 2^-6
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 1.0 / 64.0);
        // just above the midpoint rounds up, just below rounds down
        assert_eq!(round_bf16(f32::from_bits(0x3f80_8001)), f32::from_bits(0x3f81_0000));
        assert_eq!(round_bf16(f32::from_bits(0x3f80_7fff)), 1.0);
        // negative values round symmetrically
        assert_eq!(round_bf16(-(1.0 + 3.0 / 256.0)), -(1.0 + 1.0 / 64.0));
        // pi = 0x40490fdb -> 0x4049 (3.140625)
        assert_eq!(round_bf16(std::f32::consts::PI), 3.140625);
        // the largest finite f32 overflows to infinity; the largest bf16 stays
        assert_eq!(round_bf16(f32::MAX), f32::INFINITY);
        assert_eq!(round_bf16(f32::from_bits(0x7f7f_0000)).to_bits(), 0x7f7f_0000);
        // subnormals round like any other value: 2^-149 (0x00000001) goes to +0
        assert_eq!(round_bf16(f32::from_bits(1)).to_bits(), 0);
        // NaN stays NaN (a signalling one becomes quiet, sign kept)
        assert!(round_bf16(f32::NAN).is_nan());
        assert_eq!(bf16_bits(f32::from_bits(0xff80_0001)), 0xffc0);
        assert!(is_bf16(round_bf16(0.1)) && !is_bf16(0.1));
    }

    /// Agrees with the `half` crate's conversion (an independent implementation) on a sweep of floats.
    #[test]
    fn agrees_with_half_crate() {
        let mut u: u32 = 0x1234_5678;
        for _ in 0..200_000 {
            u ^= u << 13;
            u ^= u >> 17;
            u ^= u << 5;
            let x = f32::from_bits(u);
            assert_eq!(bf16_bits(x), half::bf16::from_f32(x).to_bits(), "{u:#x}");
        }
    }
}
