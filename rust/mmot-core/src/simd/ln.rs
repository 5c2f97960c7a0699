//! A natural logarithm that LLVM can vectorise, for loops that take one per element or lane.

use super::Real;

/// Natural logarithm that LLVM can vectorise (libm's `ln` is an opaque call): fdlibm's
/// reduction `x = 2^e (1 + f)` with `1 + f` in `[√2/2, √2)` and its polynomial in
/// `s = f / (2 + f)`, evaluated in f64, so within about an ulp for f64 and correctly rounded
/// for nearly every f32. Special values as libm: `ln 0 = -inf`, `ln inf = inf`, NaN below 0.
#[inline(always)]
pub(crate) fn ln_fast<T: Real>(x: T) -> T {
    const LN2_HI: f64 = 6.931_471_803_691_238e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    const LG1: f64 = 6.666_666_666_666_735e-1;
    const LG2: f64 = 3.999_999_999_940_942e-1;
    const LG3: f64 = 2.857_142_874_366_239e-1;
    const LG4: f64 = 2.222_219_843_214_978_4e-1;
    const LG5: f64 = 1.818_357_216_161_805e-1;
    const LG6: f64 = 1.531_383_769_920_937_3e-1;
    const LG7: f64 = 1.479_819_860_511_658_6e-1;
    // 2^54 lifts subnormals into the normal range.
    const TWO54: f64 = 18_014_398_509_481_984.0;
    // 2^52: adding an integer below it to its bits' float gives the integer as a float.
    const TWO52: f64 = 4_503_599_627_370_496.0;
    let x = x.to_f64();
    let sub = x < f64::MIN_POSITIVE;
    let xs = if sub { x * TWO54 } else { x };
    let bits = xs.to_bits();
    let hx = bits >> 32;
    // 0x100000 where the mantissa is >= √2: then halve it and count one more in the exponent.
    let i = ((hx & 0x000f_ffff) + 0x95f64) & 0x10_0000;
    let m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | ((i ^ 0x3ff0_0000) << 32));
    let biased = ((hx >> 20) & 0x7ff) + (i >> 20);
    let e = f64::from_bits(TWO52.to_bits() | biased) - TWO52 - 1023.0;
    let e = if sub { e - 54.0 } else { e };
    let f = m - 1.0;
    let s = f / (2.0 + f);
    let z = s * s;
    let w = z * z;
    let t1 = w * (LG2 + w * (LG4 + w * LG6));
    let t2 = z * (LG1 + w * (LG3 + w * (LG5 + w * LG7)));
    let hfsq = 0.5 * f * f;
    let y = e * LN2_HI - ((hfsq - (s * (hfsq + (t1 + t2)) + e * LN2_LO)) - f);
    let y = if x == f64::INFINITY { x } else { y };
    let y = if x > 0.0 { y } else { f64::NAN };
    let y = if x == 0.0 { f64::NEG_INFINITY } else { y };
    T::from_f64(y)
}

#[cfg(test)]
mod tests {
    use super::ln_fast;

    /// Relative error in units of `eps`, against the f64 `ln` (exact zeros compare absolutely).
    fn ulps(got: f64, x: f64, eps: f64) -> f64 {
        let want = x.ln();
        (got - want).abs() / (want.abs().max(f64::MIN_POSITIVE) * eps)
    }

    #[test]
    fn ln_fast_matches_std() {
        let (mut worst64, mut worst32) = (0.0f64, 0.0f64);
        // Geometric steps over the whole range, and fine steps around 1 where ln is small.
        let mut xs: Vec<f64> = (0..)
            .map(|i| 1e-320 * 1.000_731f64.powi(i))
            .take_while(|x| *x < 1e308)
            .collect();
        xs.extend((0..200_000).map(|i| 0.5 + i as f64 * 7.5e-6));
        for x in xs {
            worst64 = worst64.max(ulps(ln_fast(x), x, f64::EPSILON));
            let x32 = x as f32;
            if x32 > 0.0 && x32.is_finite() {
                let got = ln_fast(x32) as f64;
                worst32 = worst32.max(ulps(got, x32 as f64, f32::EPSILON as f64));
            }
        }
        assert!(worst64 < 2.0, "f64: {worst64} ulp");
        assert!(worst32 < 1.0, "f32: {worst32} ulp");
        assert_eq!(ln_fast(1.0f64), 0.0);
        assert_eq!(ln_fast(1.0f32), 0.0);
        assert_eq!(ln_fast(0.0f64), f64::NEG_INFINITY);
        assert_eq!(ln_fast(f64::INFINITY), f64::INFINITY);
        assert!(ln_fast(-1.0f64).is_nan() && ln_fast(f64::NAN).is_nan());
    }
}
