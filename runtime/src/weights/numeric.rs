//! The narrow float formats of checkpoints, converted exactly where exactness is possible.
//!
//! - bf16 and f16 widen to f32 exactly; f32 narrows to them with round-to-nearest-even, the rounding
//!   PyTorch's `.to(torch.bfloat16)` / `.half()` use, so a value stored by kiln reads back as PyTorch
//!   would have stored it.
//! - FP8 E4M3 (`torch.float8_e4m3fn`) decoding and rounding to any dtype are the reference
//!   interpreter's (`kiln_ir::interp::numerics`), re-exported here: one definition of each format.

/// The f32 with the given bf16 bit pattern (exact: bf16 is the top half of an f32).
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// `x` rounded to bf16 (nearest, ties to even); NaN stays a quiet NaN of the same sign.
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x0040;
    }
    // Adding 0x7FFF plus the kept part's lowest bit rounds half to even; a carry out of the mantissa
    // correctly bumps the exponent (and the largest finite values correctly round to infinity).
    let lsb = (b >> 16) & 1;
    (b.wrapping_add(0x7FFF + lsb) >> 16) as u16
}

/// The f32 with the given IEEE binary16 bit pattern (exact).
pub fn f16_to_f32(bits: u16) -> f32 {
    let sign = u32::from(bits >> 15) << 31;
    let exp = u32::from((bits >> 10) & 0x1F);
    let man = u32::from(bits & 0x3FF);
    let magnitude = match exp {
        // Subnormal: man * 2^-24, exact in f32.
        0 => man as f32 * f32::from_bits(0x3380_0000),
        0x1F => return f32::from_bits(sign | 0x7F80_0000 | (man << 13)),
        _ => return f32::from_bits(sign | ((exp + 112) << 23) | (man << 13)),
    };
    f32::from_bits(sign | magnitude.to_bits())
}

/// `x` rounded to binary16 (nearest, ties to even; overflow to infinity as IEEE does).
pub fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let a = b & 0x7FFF_FFFF;
    if a > 0x7F80_0000 {
        return sign | 0x7E00;
    }
    // 65520 is halfway between 65504 (odd mantissa) and 65536: ties to even go up, to infinity.
    if a >= 0x477F_F000 {
        return sign | 0x7C00;
    }
    if a >= 0x3880_0000 {
        // Normal in f16: rebias the exponent (127 -> 15) and round the mantissa from 23 to 10 bits.
        let rebiased = a - (112 << 23);
        let lsb = (rebiased >> 13) & 1;
        return sign | ((rebiased + 0xFFF + lsb) >> 13) as u16;
    }
    // Subnormal or zero: the number of 2^-24 steps, rounded half to even. Scaling by 2^24 is exact in
    // f64; 1024 steps is the smallest normal, whose bit pattern is also 1024.
    let steps = (f64::from(f32::from_bits(a)) * 16_777_216.0).round_ties_even();
    sign | steps as u16
}

// FP8 decoding and rounding to a dtype are the interpreter's (one definition of each number format,
// pinned against torch by the golden tests).
pub use kiln_ir::interp::numerics::{
    f8e4m3_to_f32 as e4m3_to_f32, round_f8e4m3 as round_e4m3, round_to_dtype as round_to,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_half_to_even() {
        let ulp = 2f32.powi(-7);
        assert_eq!(bf16_to_f32(f32_to_bf16(1.0 + ulp / 2.0)), 1.0);
        assert_eq!(bf16_to_f32(f32_to_bf16(1.0 + 1.5 * ulp)), 1.0 + 2.0 * ulp);
        assert_eq!(bf16_to_f32(f32_to_bf16(1.0 + 0.51 * ulp)), 1.0 + ulp);
        assert_eq!(f32_to_bf16(-2.0), 0xC000);
        assert_eq!(bf16_to_f32(f32_to_bf16(f32::MAX)), f32::INFINITY);
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
        for bits in 0..=u16::MAX {
            let v = bf16_to_f32(bits);
            if !v.is_nan() {
                assert_eq!(f32_to_bf16(v), bits);
            }
        }
    }

    #[test]
    fn f16_round_trips_and_rounds_half_to_even() {
        for bits in 0..=u16::MAX {
            let v = f16_to_f32(bits);
            if v.is_nan() {
                assert!(f16_to_f32(f32_to_f16(v)).is_nan());
                continue;
            }
            assert_eq!(f32_to_f16(v), bits, "{bits:#06x} = {v}");
        }
        // Midpoints between neighbours (exact in f32) go to the even pattern; anything off the
        // midpoint goes to the nearer one. Covers subnormals, the normal range and the top binade.
        for bits in 0..0x7BFFu16 {
            let (lo, hi) = (f16_to_f32(bits), f16_to_f32(bits + 1));
            let mid = (lo + hi) / 2.0;
            let even = if bits % 2 == 0 { bits } else { bits + 1 };
            assert_eq!(f32_to_f16(mid), even, "midpoint of {bits:#06x}");
            assert_eq!(f32_to_f16(f32::from_bits(mid.to_bits() - 1)), bits);
            assert_eq!(f32_to_f16(f32::from_bits(mid.to_bits() + 1)), bits + 1);
        }
        assert_eq!(f32_to_f16(65519.0), 0x7BFF);
        assert_eq!(f32_to_f16(65520.0), 0x7C00);
        assert_eq!(f32_to_f16(-1e9), 0xFC00);
        assert_eq!(f32_to_f16(2f32.powi(-25)), 0);
        assert_eq!(f32_to_f16(2f32.powi(-25) * 1.5), 1);
    }
}
