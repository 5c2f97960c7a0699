//! Explicit SIMD vectors for the hot loops that LLVM's auto-vectoriser handles badly.
//!
//! Most kernel loops are plain element-wise maps, which LLVM vectorises well inside
//! [`dispatch`](super::dispatch). Per-row reductions are the exception: spelled-out lane arrays get
//! interleaved into narrow shuffles, and re-reading a row just written with wide stores stalls
//! on store forwarding. The few loops where that dominates are written against [`Vector`], a
//! fixed-width register type with a fixed horizontal summation order, so results depend on the
//! instruction set (see [`super::dispatch`]) but never on the thread count.
//!
//! Each element type names its vector types per instruction set through [`Vectors`];
//! [`Vectors::with_vector`] picks the one for the detected level. It must be called inside
//! [`dispatch`](super::dispatch), so that the intrinsics inline into code compiled for that
//! level. The reductions built on them are in `reduce.rs`; this file knows nothing of [`Real`].
//!
//! [`Real`]: super::Real

use super::dispatch::{level, Level};
#[cfg(target_arch = "x86_64")]
use super::x86;

/// A register of `LANES` values of `T`. Only ever instantiated through [`Vectors::with_vector`],
/// which checks that the CPU supports the instructions.
pub trait Vector<T>: Copy {
    const LANES: usize;
    fn splat(x: T) -> Self;
    /// # Safety
    /// `p` must point to `LANES` readable values.
    unsafe fn load(p: *const T) -> Self;
    /// # Safety
    /// `p` must point to `LANES` writable values.
    unsafe fn store(self, p: *mut T);
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
    /// Lane-wise `if self < o { self } else { o }`, as [`Real::fmin`](super::Real::fmin).
    fn min(self, o: Self) -> Self;
    /// Lane-wise `if self > o { self } else { o }`, as [`Real::fmax`](super::Real::fmax).
    fn max(self, o: Self) -> Self;
    /// `self * m + a`, rounded once where the instruction set has FMA (twice for `Single`).
    fn mul_add(self, m: Self, a: Self) -> Self;
    /// `1 / self` to within about an ulp (a hardware estimate refined by a Newton step where
    /// the instruction set has one; exact division otherwise).
    fn recip(self) -> Self;
    /// Sum of the lanes in a fixed order.
    fn sum(self) -> T;
    /// The lane sums of four vectors, each in a fixed order (not necessarily that of `sum`):
    /// one interleaved reduction tree costs about a third of four separate ones.
    fn sum4(v: [Self; 4]) -> [T; 4];
    /// Smallest lane (for lanes without NaN).
    fn reduce_min(self) -> T;
    /// Largest lane (for lanes without NaN).
    fn reduce_max(self) -> T;
}

/// A kernel body generic over the vector type.
pub trait VectorOp<T> {
    type Output;
    fn run<V: Vector<T>>(self) -> Self::Output;
}

/// The vector types of an element type, one per [`Level`].
pub trait Vectors: Sized + Copy {
    type Wide: Vector<Self>;
    type Narrow: Vector<Self>;
    type Single: Vector<Self>;
    /// Runs `op` with the vector type of the detected level.
    #[inline(always)]
    fn with_vector<O: VectorOp<Self>>(op: O) -> O::Output {
        match level() {
            Level::Avx512 => op.run::<Self::Wide>(),
            Level::Avx2 => op.run::<Self::Narrow>(),
            Level::Generic => op.run::<Self::Single>(),
        }
    }
}

/// One value per "register": the portable fallback.
#[derive(Clone, Copy)]
pub struct Scalar<T>(T);

macro_rules! scalar_vector {
    ($t:ty) => {
        impl Vector<$t> for Scalar<$t> {
            const LANES: usize = 1;
            #[inline(always)]
            fn splat(x: $t) -> Self {
                Scalar(x)
            }
            #[inline(always)]
            unsafe fn load(p: *const $t) -> Self {
                Scalar(*p)
            }
            #[inline(always)]
            unsafe fn store(self, p: *mut $t) {
                *p = self.0
            }
            #[inline(always)]
            fn add(self, o: Self) -> Self {
                Scalar(self.0 + o.0)
            }
            #[inline(always)]
            fn sub(self, o: Self) -> Self {
                Scalar(self.0 - o.0)
            }
            #[inline(always)]
            fn mul(self, o: Self) -> Self {
                Scalar(self.0 * o.0)
            }
            #[inline(always)]
            fn min(self, o: Self) -> Self {
                if self.0 < o.0 {
                    self
                } else {
                    o
                }
            }
            #[inline(always)]
            fn max(self, o: Self) -> Self {
                if self.0 > o.0 {
                    self
                } else {
                    o
                }
            }
            #[inline(always)]
            fn div(self, o: Self) -> Self {
                Scalar(self.0 / o.0)
            }
            #[inline(always)]
            fn mul_add(self, m: Self, a: Self) -> Self {
                // Not `f32::mul_add`: without FMA hardware that is a slow libm call.
                Scalar(self.0 * m.0 + a.0)
            }
            #[inline(always)]
            fn recip(self) -> Self {
                Scalar(1.0 / self.0)
            }
            #[inline(always)]
            fn sum(self) -> $t {
                self.0
            }
            #[inline(always)]
            fn sum4(v: [Self; 4]) -> [$t; 4] {
                v.map(|x| x.0)
            }
            #[inline(always)]
            fn reduce_min(self) -> $t {
                self.0
            }
            #[inline(always)]
            fn reduce_max(self) -> $t {
                self.0
            }
        }
    };
}
scalar_vector!(f32);
scalar_vector!(f64);

#[cfg(target_arch = "x86_64")]
impl Vectors for f32 {
    type Wide = x86::F32x16;
    type Narrow = x86::F32x8;
    type Single = Scalar<f32>;
}

#[cfg(target_arch = "x86_64")]
impl Vectors for f64 {
    type Wide = x86::F64x8;
    type Narrow = x86::F64x4;
    type Single = Scalar<f64>;
}

#[cfg(not(target_arch = "x86_64"))]
impl Vectors for f32 {
    type Wide = Scalar<f32>;
    type Narrow = Scalar<f32>;
    type Single = Scalar<f32>;
}

#[cfg(not(target_arch = "x86_64"))]
impl Vectors for f64 {
    type Wide = Scalar<f64>;
    type Narrow = Scalar<f64>;
    type Single = Scalar<f64>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::dispatch::dispatch;

    #[test]
    fn sum4_matches_the_lane_sums() {
        fn check<T: Copy + Into<f64> + std::fmt::Debug, V: Vector<T>>(x: &[T]) {
            let v: [V; 4] =
                std::array::from_fn(|i| unsafe { V::load(x.as_ptr().add(i * V::LANES)) });
            let got = V::sum4(v);
            for (i, g) in got.iter().enumerate() {
                let want: f64 = x[i * V::LANES..(i + 1) * V::LANES]
                    .iter()
                    .map(|&v| v.into())
                    .sum();
                assert!(
                    (Into::<f64>::into(*g) - want).abs() < 1e-5,
                    "vector {i} of {} lanes: {g:?} vs {want}",
                    V::LANES
                );
            }
        }
        // Distinct powers of two per lane and a distinct factor per vector, so that a lane
        // summed twice or missed, or vectors swapped, show.
        let x: Vec<f64> = (0..64usize)
            .map(|i| 2f64.powi(i as i32 % 16) * [1.0, -0.5, 0.25, 3.0][i / 16])
            .collect();
        let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        check::<f64, Scalar<f64>>(&x);
        check::<f32, Scalar<f32>>(&xf);
        if level() >= Level::Avx2 {
            dispatch(|| check::<f64, <f64 as Vectors>::Narrow>(&x));
            dispatch(|| check::<f32, <f32 as Vectors>::Narrow>(&xf));
        }
        if level() >= Level::Avx512 {
            dispatch(|| check::<f64, <f64 as Vectors>::Wide>(&x));
            dispatch(|| check::<f32, <f32 as Vectors>::Wide>(&xf));
        }
    }

    #[test]
    fn recip_is_within_two_ulp_of_division() {
        let xs: Vec<f32> = (0..64)
            .map(|i| 10f32.powi(i % 60 - 30) * (1.0 + i as f32 / 7.0))
            .collect();
        let check = |r: &[f32]| {
            for (x, r) in xs.iter().zip(r) {
                let exact = 1.0 / x;
                assert!(
                    ((r - exact) / exact).abs() <= 2.0 * f32::EPSILON,
                    "1/{x}: {r} vs {exact}"
                );
            }
        };
        fn recips<V: Vector<f32>>(xs: &[f32]) -> Vec<f32> {
            let mut out = vec![f32::NAN; xs.len()];
            for (x, o) in xs
                .chunks_exact(V::LANES)
                .zip(out.chunks_exact_mut(V::LANES))
            {
                // SAFETY: both chunks hold LANES values.
                unsafe { V::load(x.as_ptr()).recip().store(o.as_mut_ptr()) };
            }
            out
        }
        check(&recips::<Scalar<f32>>(&xs));
        if level() >= Level::Avx2 {
            check(&dispatch(|| recips::<<f32 as Vectors>::Narrow>(&xs)));
        }
        if level() >= Level::Avx512 {
            check(&dispatch(|| recips::<<f32 as Vectors>::Wide>(&xs)));
        }
    }
}
