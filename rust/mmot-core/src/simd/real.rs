//! The float abstraction shared by every kernel.
//!
//! Kernels are written once and instantiated for `f32` and `f64`; accumulation always happens in
//! the input type (see `docs/numerics.md`, accumulation dtypes). The trait is deliberately tiny
//! and hand-rolled so the core crate has no numeric dependencies.

use super::vector::Vectors;
use std::cell::RefCell;
use std::fmt::Debug;
use std::ops::{Add, AddAssign, Div, DivAssign, Mul, MulAssign, Neg, Sub, SubAssign};
use std::thread::LocalKey;

/// A floating-point element type a kernel can run on.
pub trait Real:
    Copy
    + Send
    + Sync
    + Debug
    + PartialOrd
    + Default
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Vectors
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    const INFINITY: Self;
    const NEG_INFINITY: Self;
    /// Largest dynamic range (in units of the exponent argument) for which the plain-domain
    /// kernels are trusted not to overflow or underflow (`docs/numerics.md`; rule in `domain.rs`).
    const PLAIN_RANGE_LIMIT: f64;
    /// Largest exponent range the log domain can represent: an eighth of the largest finite
    /// value, so that centred logits and the potentials summed with them stay finite.
    const LOG_RANGE_LIMIT: f64;
    /// A sum of exponentials below this may have lost its leading terms to underflow (it is
    /// about 2^24 times the smallest normal), so the log-domain kernels recompute it exactly.
    const TINY: Self;

    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    /// Branch-free exponential that LLVM can vectorise inside loops (libm's `exp` is an opaque
    /// call and keeps every loop that uses it scalar). Accurate to a few ulp; returns exactly 0
    /// below the normal range and +inf above it.
    fn exp_fast(self) -> Self;
    /// This thread's reusable scratch buffer (see `exec::chunks::with_thread_scratch`).
    fn thread_scratch() -> &'static LocalKey<RefCell<Vec<Self>>>;

    /// `max` without NaN special-casing, so that it lowers to a single vector instruction.
    #[inline(always)]
    fn fmax(self, o: Self) -> Self {
        if self > o {
            self
        } else {
            o
        }
    }
    /// `min` without NaN special-casing, see [`Real::fmax`].
    #[inline(always)]
    fn fmin(self, o: Self) -> Self {
        if self < o {
            self
        } else {
            o
        }
    }
}

impl Real for f32 {
    fn thread_scratch() -> &'static LocalKey<RefCell<Vec<Self>>> {
        thread_local!(static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) });
        &SCRATCH
    }
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const INFINITY: Self = f32::INFINITY;
    const NEG_INFINITY: Self = f32::NEG_INFINITY;
    const PLAIN_RANGE_LIMIT: f64 = 50.0;
    const LOG_RANGE_LIMIT: f64 = f32::MAX as f64 / 8.0;
    const TINY: Self = 1e-30;

    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f32::ln(self)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn exp_fast(self) -> Self {
        // Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, then a degree-7 Taylor
        // polynomial (truncation error < 5e-9 relative) and 2^n assembled from the exponent bits.
        const LO: f32 = -87.0;
        const HI: f32 = 88.0;
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        const LN2_HI: f32 = 0.693_145_75;
        const LN2_LO: f32 = 1.428_606_8e-6;
        // 1.5 * 2^23: adding it rounds to an integer that then sits in the low mantissa bits.
        const MAGIC: f32 = 12_582_912.0;
        let x = self;
        let xc = x.fmax(LO).fmin(HI);
        let y = xc * LOG2E + MAGIC;
        let n = y - MAGIC;
        let r = (xc - n * LN2_HI) - n * LN2_LO;
        let mut p = 1.0 / 5040.0;
        p = p * r + 1.0 / 720.0;
        p = p * r + 1.0 / 120.0;
        p = p * r + 1.0 / 24.0;
        p = p * r + 1.0 / 6.0;
        p = p * r + 0.5;
        p = p * r + 1.0;
        p = p * r + 1.0;
        let ni = y.to_bits().wrapping_sub(MAGIC.to_bits());
        let scale = f32::from_bits(ni.wrapping_add(127) << 23);
        let v = p * scale;
        let v = if x < LO { 0.0 } else { v };
        if x > HI {
            f32::INFINITY
        } else {
            v
        }
    }
}

impl Real for f64 {
    fn thread_scratch() -> &'static LocalKey<RefCell<Vec<Self>>> {
        thread_local!(static SCRATCH: RefCell<Vec<f64>> = const { RefCell::new(Vec::new()) });
        &SCRATCH
    }
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const INFINITY: Self = f64::INFINITY;
    const NEG_INFINITY: Self = f64::NEG_INFINITY;
    const PLAIN_RANGE_LIMIT: f64 = 300.0;
    const LOG_RANGE_LIMIT: f64 = f64::MAX / 8.0;
    const TINY: Self = 1e-280;

    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f64::ln(self)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    #[inline(always)]
    fn exp_fast(self) -> Self {
        // Same scheme as f32 with a degree-13 Taylor polynomial (truncation error < 1e-17).
        const LO: f64 = -708.0;
        const HI: f64 = 709.0;
        const LOG2E: f64 = std::f64::consts::LOG2_E;
        const LN2_HI: f64 = 6.931_471_803_691_238e-1;
        const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
        // 1.5 * 2^52
        const MAGIC: f64 = 6_755_399_441_055_744.0;
        let x = self;
        let xc = x.fmax(LO).fmin(HI);
        let y = xc * LOG2E + MAGIC;
        let n = y - MAGIC;
        let r = (xc - n * LN2_HI) - n * LN2_LO;
        let mut p = 1.0 / 6_227_020_800.0; // 1/13!
        p = p * r + 1.0 / 479_001_600.0;
        p = p * r + 1.0 / 39_916_800.0;
        p = p * r + 1.0 / 3_628_800.0;
        p = p * r + 1.0 / 362_880.0;
        p = p * r + 1.0 / 40_320.0;
        p = p * r + 1.0 / 5_040.0;
        p = p * r + 1.0 / 720.0;
        p = p * r + 1.0 / 120.0;
        p = p * r + 1.0 / 24.0;
        p = p * r + 1.0 / 6.0;
        p = p * r + 0.5;
        p = p * r + 1.0;
        p = p * r + 1.0;
        let ni = y.to_bits().wrapping_sub(MAGIC.to_bits());
        let scale = f64::from_bits(ni.wrapping_add(1023) << 52);
        let v = p * scale;
        let v = if x < LO { 0.0 } else { v };
        if x > HI {
            f64::INFINITY
        } else {
            v
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_fast_matches_std_f64() {
        let mut worst = 0.0f64;
        let mut x = -700.0f64;
        while x < 700.0 {
            let e = x.exp();
            let f = x.exp_fast();
            worst = worst.max(((f - e) / e).abs());
            x += 0.0137;
        }
        assert!(worst < 1e-15, "worst rel err {worst}");
        assert_eq!((-800.0f64).exp_fast(), 0.0);
        assert_eq!(800.0f64.exp_fast(), f64::INFINITY);
        assert_eq!(0.0f64.exp_fast(), 1.0);
    }

    #[test]
    fn exp_fast_matches_std_f32() {
        let mut worst = 0.0f64;
        let mut x = -86.0f32;
        while x < 87.0 {
            let e = (x as f64).exp();
            let f = x.exp_fast() as f64;
            worst = worst.max(((f - e) / e).abs());
            x += 0.00731;
        }
        assert!(worst < 4.0 * f32::EPSILON as f64, "worst rel err {worst}");
        assert_eq!((-100.0f32).exp_fast(), 0.0);
        assert_eq!(100.0f32.exp_fast(), f32::INFINITY);
        assert_eq!(0.0f32.exp_fast(), 1.0);
    }
}
