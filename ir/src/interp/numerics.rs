//! Rounding f32 values to the narrower float formats kiln computes in: bf16, f16 and FP8 E4M3.
//!
//! The interpreter keeps every float tensor as f32 values that are exactly representable in the
//! tensor's dtype, so "converting to bf16" means rounding an f32 to the nearest bf16 value and keeping
//! it as an f32. All three formats use round-to-nearest, ties to even, as PyTorch's conversions do.
//!
//! One function, [`round_to_precision`], does the rounding for all of them: it scales the value by a
//! power of two so that the format's last mantissa bit has weight 1, rounds to an integer with ties to
//! even, and scales back. Every step is exact in f64, so the only rounding is the one intended. What
//! differs between the formats is the mantissa width, the smallest normal exponent (below which the
//! quantum stays fixed: subnormals) and what happens past the largest finite value:
//!
//! | format  | mantissa bits | min normal | max finite | past the max            |
//! |---------|---------------|------------|------------|-------------------------|
//! | bf16    | 7             | 2^-126     | ~3.39e38   | ±inf                    |
//! | f16     | 10            | 2^-14      | 65504      | ±inf                    |
//! | f8e4m3  | 3             | 2^-6       | 448        | NaN (no infinities)     |
//!
//! FP8 E4M3 follows `torch.float8_e4m3fn` as torch 2.15 behaves (pinned bit for bit by the golden
//! table `tests/goldens/fp8_dequant/e4m3_table.safetensors`, made by `tools/goldens/make_goldens.py`):
//! bias 7, codes `S.1111.111` (0x7F, 0xFF) are NaN, there is no infinity, the largest finite value
//! is 448 (0x7E) and the smallest subnormal 2^-9; rounding is to nearest, ties to even. The cast
//! **saturates**: every magnitude above 448, ±inf included, becomes ±448 (0x7E / 0xFE); NaN stays
//! NaN with its sign. (Older PyTorch headers, `c10/util/Float8_e4m3fn.h`
//! `fp8e4m3fn_from_fp32_value`, turned |x| > 464 and ±inf into NaN; torch 2.15 on the CPU does not,
//! and the golden table is what kiln copies. It also matches PTX `cvt.rn.satfinite.e4m3x2.f32`.)

use crate::types::DType;

/// Rounds an f32 to the nearest value of a float `dtype` (identity for f32 and non-float dtypes).
pub fn round_to_dtype(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::BF16 => round_bf16(x),
        DType::F16 => round_f16(x),
        DType::F8E4M3 => round_f8e4m3(x),
        DType::F32 | DType::I64 | DType::I32 | DType::Bool => x,
    }
}

/// Rounds `x` to `mantissa_bits` bits after the leading one, with exponents below `min_exp` treated
/// as subnormal (the quantum stays `2^(min_exp - mantissa_bits)`). Ties go to even. The result can
/// exceed the format's largest finite value; callers decide what overflow means. NaN and infinities
/// are returned unchanged.
pub fn round_to_precision(x: f32, mantissa_bits: i32, min_exp: i32) -> f32 {
    if !x.is_finite() || x == 0.0 {
        return x;
    }
    let v = x as f64;
    // The binary exponent of |v|: v = m * 2^e with 1 <= m < 2. f64 has room for every f32 exponent,
    // subnormals included, so this is exact.
    let e = ((v.abs().to_bits() >> 52) as i32 - 1023).max(min_exp);
    let quantum_exp = e - mantissa_bits;
    let scaled = v * pow2(-quantum_exp);
    (scaled.round_ties_even() * pow2(quantum_exp)) as f32
}

/// `2^n` as an f64, exactly, for the exponents f32 rounding needs.
fn pow2(n: i32) -> f64 {
    debug_assert!((-1022..=1023).contains(&n));
    f64::from_bits(((n + 1023) as u64) << 52)
}

const F16_MAX: f32 = 65504.0;
/// The largest finite `f8e4m3` value.
pub const F8E4M3_MAX: f32 = 448.0;

/// Rounds to the nearest bfloat16 value (ties to even). NaN stays NaN; values that round past the
/// largest bf16 become infinities, as in PyTorch's `float -> bfloat16` conversion.
///
/// bf16 is f32's top half, so this is the rounding on the bits (adding just under half the dropped
/// quantum and the kept field's last bit; a carry moves into the exponent and, past the largest
/// bf16, makes infinity), which the tests check against [`round_to_precision`]'s.
pub fn round_bf16(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    let b = x.to_bits();
    f32::from_bits((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF_0000)
}

/// Rounds to the nearest IEEE half-precision value (ties to even), with f16 subnormals down to 2^-24.
/// NaN stays NaN; values that round past 65504 become infinities.
pub fn round_f16(x: f32) -> f32 {
    let y = round_to_precision(x, 10, -14);
    if y.is_finite() && y.abs() > F16_MAX {
        f32::INFINITY.copysign(y)
    } else {
        y
    }
}

/// Encodes `x` as `torch.float8_e4m3fn` bits: round to nearest even, subnormals down to 2^-9,
/// saturation to ±448 above the range (±inf included), NaN (0x7F with the input's sign) for NaN.
/// See the module documentation for the source.
///
/// On the bits, as the formats' shared layout allows (the encoding of a whole checkpoint's random
/// weights, and every `quantize`, go through here): a normal result is the f32's sign, exponent and
/// top 3 mantissa bits, rounded to nearest even by adding just under half the dropped quantum and
/// the kept field's last bit (a carry out of the mantissa moves into the exponent, as it must);
/// below 2^-6 the subnormal quantum 2^-9 is fixed, and `|x| * 2^9` is rounded to an integer by
/// adding and subtracting 2^23, which f32 arithmetic does to nearest even. Every magnitude above
/// 448 rounds either to 448 or past it, and both saturate to 448. The tests check this against
/// [`round_to_precision`]'s rounding.
pub fn f8e4m3_from_f32(x: f32) -> u8 {
    const MIN_NORMAL: u32 = 0x3C80_0000; // 2^-6
    const MAX: u32 = 0x43E0_0000; // 448
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let a = bits & 0x7FFF_FFFF;
    if a > 0x7F80_0000 {
        return sign | 0x7F;
    }
    if a > MAX {
        return sign | 0x7E;
    }
    if a < MIN_NORMAL {
        // Subnormal (or zero): y * 2^9 is exact, and below 8, so 2^23 + it rounds to an integer.
        let scaled = f32::from_bits(a) * 512.0;
        const TWO23: f32 = 8_388_608.0;
        return sign | ((scaled + TWO23) - TWO23) as u8;
    }
    // Normal: keep 3 of the 23 mantissa bits, ties to even; rebias the exponent from 127 to 7.
    let rounded = (a + 0x7_FFFF + ((a >> 20) & 1)) >> 20;
    sign | (rounded - ((127 - 7) << 3)) as u8
}

/// Decodes `torch.float8_e4m3fn` bits. 0x7F and 0xFF are NaN; every other code is finite.
pub fn f8e4m3_to_f32(bits: u8) -> f32 {
    let sign = u32::from(bits & 0x80) << 24;
    let (e, m) = (u32::from((bits >> 3) & 0xF), u32::from(bits & 0x7));
    let mag = match (e, m) {
        (0xF, 7) => return f32::from_bits(sign | 0x7FC0_0000),
        // Subnormal: m * 2^-9, exact.
        (0, _) => m as f32 / 512.0,
        // Normal: the exponent rebiased from 7 to 127, the mantissa's 3 bits on top of f32's 23.
        _ => f32::from_bits(((e + 127 - 7) << 23) | (m << 20)),
    };
    f32::from_bits(sign | mag.to_bits())
}

/// Rounds to the nearest `f8e4m3` value, kept as an f32 (`f8e4m3_to_f32(f8e4m3_from_f32(x))`).
pub fn round_f8e4m3(x: f32) -> f32 {
    f8e4m3_to_f32(f8e4m3_from_f32(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every E4M3 value from its definition: sign, 4-bit exponent with bias 7, 3-bit mantissa,
    /// subnormals at exponent 0, and S.1111.111 NaN.
    fn e4m3_by_definition(code: u8) -> f32 {
        let s = if code & 0x80 != 0 { -1.0 } else { 1.0 };
        let e = (code >> 3) & 0xF;
        let m = (code & 7) as f64;
        if e == 15 && m == 7.0 {
            return f32::NAN;
        }
        let v = if e == 0 { m / 8.0 * 2f64.powi(-6) } else { (1.0 + m / 8.0) * 2f64.powi(e as i32 - 7) };
        (s * v) as f32
    }

    #[test]
    fn e4m3_table_decodes_and_round_trips() {
        for code in 0..=255u8 {
            let v = f8e4m3_to_f32(code);
            let want = e4m3_by_definition(code);
            if code & 0x7F == 0x7F {
                assert!(v.is_nan(), "code {code:#04x} must be NaN");
                assert_eq!(v.is_sign_negative(), code & 0x80 != 0);
                assert_eq!(f8e4m3_from_f32(v), code, "NaN keeps its sign");
                continue;
            }
            assert_eq!(v.to_bits(), want.to_bits(), "code {code:#04x}");
            assert_eq!(f8e4m3_from_f32(v), code, "code {code:#04x} = {v} re-encodes");
            assert_eq!(round_f8e4m3(v).to_bits(), v.to_bits());
        }
        // Landmarks of the format.
        assert_eq!(f8e4m3_to_f32(0x7E), 448.0);
        assert_eq!(f8e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(f8e4m3_to_f32(0x08), 2f32.powi(-6));
        assert_eq!(f8e4m3_to_f32(0x38), 1.0);
        assert_eq!(f8e4m3_to_f32(0xFE), -448.0);
    }

    /// The nearest table value, ties to the even code, or NaN past the largest: an oracle written
    /// from the definition, independent of `round_to_precision`.
    fn e4m3_nearest(x: f32) -> u8 {
        let sign = if x.is_sign_negative() { 0x80 } else { 0 };
        let a = x.abs() as f64;
        let mut best = 0u8;
        for code in 1..=0x7Eu8 {
            let (v, b) = (e4m3_by_definition(code) as f64, e4m3_by_definition(best) as f64);
            if (a - v).abs() < (a - b).abs() || ((a - v).abs() == (a - b).abs() && code % 2 == 0) {
                best = code;
            }
        }
        // Above 448 every value saturates to 448.
        if a > 448.0 {
            return sign | 0x7E;
        }
        sign | best
    }

    /// The encoding as [`round_to_precision`] gives it (how `f8e4m3_from_f32` computed it before
    /// it worked on the bits): the rounded magnitude, then saturation, then the fields.
    fn e4m3_by_rounding(x: f32) -> u8 {
        let sign = if x.is_sign_negative() { 0x80 } else { 0 };
        if x.is_nan() {
            return sign | 0x7F;
        }
        let y = round_to_precision(x, 3, -6).abs();
        if y > F8E4M3_MAX {
            return sign | 0x7E;
        }
        if y == 0.0 {
            return sign;
        }
        let code = if y < 2f32.powi(-6) {
            (y * 512.0) as u8
        } else {
            let e = ((y.to_bits() >> 23) as i32) - 127;
            let m = ((y / 2f32.powi(e) - 1.0) * 8.0) as u8;
            (((e + 7) as u8) << 3) | m
        };
        sign | code
    }

    #[test]
    fn e4m3_bit_encoding_matches_the_rounding() {
        let check = |bits: u32| {
            let x = f32::from_bits(bits);
            assert_eq!(f8e4m3_from_f32(x), e4m3_by_rounding(x), "x = {x:e} ({bits:#010x})");
        };
        // A spread over every exponent and sign (a prime stride through the bit patterns).
        (0..=u32::MAX).step_by(40_009).for_each(check);
        // Around every point where the result changes: each midpoint between neighbouring codes,
        // 448, 464 and the smallest normal, with their f32 neighbours, and the edges of the bits.
        let mut marks: Vec<f32> = (0..0x7Eu8)
            .map(|c| (f8e4m3_to_f32(c) + f8e4m3_to_f32(c + 1)) / 2.0)
            .chain([448.0, 464.0, 2f32.powi(-6), 2f32.powi(-10), f32::MAX, f32::MIN_POSITIVE])
            .collect();
        marks.extend((0..=0x7Eu8).map(f8e4m3_to_f32));
        for m in marks {
            for d in -2i64..=2 {
                let b = (i64::from(m.to_bits()) + d).clamp(0, 0x7FFF_FFFF) as u32;
                check(b);
                check(b | 0x8000_0000);
            }
        }
        [0, 1, 0x7F80_0000, 0x7F80_0001, 0x7FC0_0000, 0xFFFF_FFFF].into_iter().for_each(check);
    }

    #[test]
    fn e4m3_rounding_matches_the_nearest_value() {
        // A dense sweep over the range, including points between every pair of neighbours.
        let mut x = 2f32.powi(-12);
        while x < 600.0 {
            for v in [x, -x] {
                assert_eq!(f8e4m3_from_f32(v), e4m3_nearest(v), "x = {v}");
            }
            x *= 1.0 + 1.0 / 64.0;
        }
        for code in 0..0x7Eu8 {
            let (lo, hi) = (e4m3_by_definition(code), e4m3_by_definition(code + 1));
            let mid = (lo + hi) / 2.0;
            let want = if code % 2 == 0 { code } else { code + 1 };
            assert_eq!(f8e4m3_from_f32(mid), want, "tie between {lo} and {hi}");
            assert_eq!(f8e4m3_from_f32(-mid), 0x80 | want);
        }
    }

    #[test]
    fn e4m3_ties_subnormals_overflow_and_zero() {
        // Ties to even: 1 + 1/16 lies between 1 (mantissa 000) and 1.125 (001).
        assert_eq!(round_f8e4m3(1.0625), 1.0);
        assert_eq!(round_f8e4m3(1.1875), 1.25);
        // Subnormals: quantum 2^-9; 2^-10 is a tie between 0 and 2^-9 and goes to 0.
        assert_eq!(round_f8e4m3(2f32.powi(-10)), 0.0);
        assert_eq!(round_f8e4m3(1.5 * 2f32.powi(-10)), 2f32.powi(-9));
        assert_eq!(round_f8e4m3(3.0 * 2f32.powi(-10)), 2.0 * 2f32.powi(-9));
        assert_eq!(round_f8e4m3(7.4 * 2f32.powi(-9)), 7.0 * 2f32.powi(-9));
        assert_eq!(f8e4m3_from_f32(7.6 * 2f32.powi(-9)), 0x08, "rounds up into the normals");
        // Overflow saturates, as torch 2.15's cast.
        assert_eq!(round_f8e4m3(460.0), 448.0);
        assert_eq!(round_f8e4m3(464.0), 448.0);
        assert_eq!(f8e4m3_from_f32(464.5), 0x7E);
        assert_eq!(f8e4m3_from_f32(-1000.0), 0xFE);
        assert_eq!(f8e4m3_from_f32(f32::INFINITY), 0x7E);
        assert_eq!(f8e4m3_from_f32(f32::NEG_INFINITY), 0xFE);
        assert_eq!(f8e4m3_from_f32(f32::NAN), 0x7F);
        // Signed zero survives.
        assert_eq!(f8e4m3_from_f32(-0.0), 0x80);
        assert!(f8e4m3_to_f32(0x80).is_sign_negative());
        assert_eq!(f8e4m3_from_f32(-1e-30), 0x80);
    }

    #[test]
    fn bf16_bit_rounding_matches_the_rounding() {
        // `(2 - 2^-7) * 2^127`, the largest finite bf16.
        const BF16_MAX: f32 = f32::from_bits(0x7F7F_0000);
        let by_rounding = |x: f32| {
            let y = round_to_precision(x, 7, -126);
            if y.is_finite() && y.abs() > BF16_MAX {
                f32::INFINITY.copysign(y)
            } else {
                y
            }
        };
        let check = |bits: u32| {
            let x = f32::from_bits(bits);
            let (got, want) = (round_bf16(x), by_rounding(x));
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "x = {x:e} ({bits:#010x})"
            );
        };
        (0..=u32::MAX).step_by(40_009).for_each(check);
        // Ties and their neighbours at every exponent, both signs, and the edges of the range.
        for e in 0..255u32 {
            for low in [0x7FFF, 0x8000, 0x8001, 0x1_7FFF, 0x1_8000, 0x1_8001, 0xFFFF, 0] {
                check((e << 23) | 0x7F_0000 | low);
                check((e << 23) | low);
                check(0x8000_0000 | (e << 23) | 0x7F_0000 | low);
            }
        }
        [0x7F7F_7FFF, 0x7F7F_8000, 0x7F7F_FFFF, 0x7F80_0000, 0xFF80_0000, 0x7FC0_0001]
            .into_iter()
            .for_each(check);
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        let ulp = 2f32.powi(-7);
        assert_eq!(round_bf16(1.0 + ulp / 2.0), 1.0, "tie to even (down)");
        assert_eq!(round_bf16(1.0 + 1.5 * ulp), 1.0 + 2.0 * ulp, "tie to even (up)");
        assert_eq!(round_bf16(1.0 + 0.6 * ulp), 1.0 + ulp);
        assert_eq!(round_bf16(-(1.0 + 0.6 * ulp)), -(1.0 + ulp));
        assert_eq!(round_bf16(3.140625), 3.140625);
        assert_eq!(round_bf16(std::f32::consts::PI), 3.140625);
        assert!(round_bf16(f32::NAN).is_nan());
        assert_eq!(round_bf16(f32::MAX), f32::INFINITY);
        assert_eq!(round_bf16(-0.0).to_bits(), (-0.0f32).to_bits());
        // bf16 shares f32's exponent range, subnormals included.
        let tiny = f32::from_bits(0x0000_8001);
        assert_eq!(round_bf16(tiny), f32::from_bits(0x0001_0000));
        assert_eq!(round_bf16(f32::from_bits(0x0000_8000)), 0.0, "tie to even (zero)");
        // Agrees with the classic bit trick on a spread of values.
        for i in 0..10_000u32 {
            let x = f32::from_bits(0x3000_0000u32.wrapping_add(i.wrapping_mul(0x0001_3579)));
            let b = x.to_bits();
            let trick = f32::from_bits((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF_0000);
            assert_eq!(round_bf16(x).to_bits(), trick.to_bits(), "x = {x}");
        }
    }

    #[test]
    fn f16_rounds_with_subnormals_and_overflow() {
        assert_eq!(round_f16(1.0 + 2f32.powi(-11)), 1.0, "tie to even");
        assert_eq!(round_f16(1.0 + 3.0 * 2f32.powi(-11)), 1.0 + 2f32.powi(-9));
        assert_eq!(round_f16(65504.0), 65504.0);
        assert_eq!(round_f16(65519.0), 65504.0);
        assert_eq!(round_f16(65520.0), f32::INFINITY, "tie above the max rounds to infinity");
        assert_eq!(round_f16(2f32.powi(-24)), 2f32.powi(-24), "smallest subnormal");
        assert_eq!(round_f16(2f32.powi(-25)), 0.0, "tie between 0 and 2^-24 goes to 0");
        assert_eq!(round_f16(1.5 * 2f32.powi(-24)), 2.0 * 2f32.powi(-24));
        assert_eq!(round_f16(0.1), 0.099975586);
        assert!(round_f16(f32::NAN).is_nan());
    }
}
