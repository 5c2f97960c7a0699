//! Explicit SIMD vectors for the hot loops that LLVM's auto-vectoriser handles badly.
//!
//! Most kernel loops are plain element-wise maps, which LLVM vectorises well inside
//! [`crate::simd::dispatch`]. Per-row reductions are the exception: spelled-out lane arrays get
//! interleaved into narrow shuffles, and re-reading a row just written with wide stores stalls
//! on store forwarding. The few loops where that dominates are written against [`Vector`], a
//! fixed-width register type with a fixed horizontal summation order, so results depend on the
//! instruction set (as documented in `simd.rs`) but never on the thread count.
//!
//! Each element type names its vector types per instruction set through [`Vectors`];
//! [`Vectors::with_vector`] picks the one for the detected level. It must be called inside
//! [`crate::simd::dispatch`], so that the intrinsics inline into code compiled for that level.

use crate::real::Real;
use crate::simd::{level, Level};

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
    /// Lane-wise `if self < o { self } else { o }`, as [`crate::real::Real::fmin`].
    fn min(self, o: Self) -> Self;
    /// Lane-wise `if self > o { self } else { o }`, as [`crate::real::Real::fmax`].
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

/// `Σ x[i] y[i]` in four vector accumulators (a fixed order). With `y` absent, `Σ x[i]`.
struct Dot<'a, T> {
    x: &'a [T],
    y: Option<&'a [T]>,
}

impl<T: Real> VectorOp<T> for Dot<'_, T> {
    type Output = T;

    #[inline(always)]
    fn run<V: Vector<T>>(self) -> T {
        let n = self.y.map_or(self.x.len(), |y| y.len().min(self.x.len()));
        let (x, lanes) = (&self.x[..n], V::LANES);
        let y = self.y.map(|y| &y[..n]);
        // SAFETY (both loads): i + lanes <= n, the length of x and y.
        let term = |i: usize| unsafe {
            let a = V::load(x.as_ptr().add(i));
            y.map_or(a, |y| a.mul(V::load(y.as_ptr().add(i))))
        };
        let mut acc = [V::splat(T::ZERO); 4];
        let mut i = 0;
        while i + 4 * lanes <= n {
            for (u, a) in acc.iter_mut().enumerate() {
                *a = a.add(term(i + u * lanes));
            }
            i += 4 * lanes;
        }
        while i + lanes <= n {
            acc[0] = acc[0].add(term(i));
            i += lanes;
        }
        let mut s = acc[0].add(acc[1]).add(acc[2].add(acc[3])).sum();
        for j in i..n {
            s += y.map_or(x[j], |y| x[j] * y[j]);
        }
        s
    }
}

/// Sum of a slice in vector registers, for the level of the running code.
#[inline(always)]
pub(crate) fn sum<T: Real>(x: &[T]) -> T {
    crate::simd::dispatch(
        #[inline(always)]
        || T::with_vector(Dot { x, y: None }),
    )
}

/// Dot product in vector registers; `x` and `y` have the same length.
#[inline(always)]
pub(crate) fn dot<T: Real>(x: &[T], y: &[T]) -> T {
    debug_assert_eq!(x.len(), y.len());
    crate::simd::dispatch(
        #[inline(always)]
        || T::with_vector(Dot { x, y: Some(y) }),
    )
}

/// The smallest and largest value of a slice, in two vector accumulators each.
struct Extremes<'a, T> {
    x: &'a [T],
}

impl<T: Real> VectorOp<T> for Extremes<'_, T> {
    type Output = (T, T);

    #[inline(always)]
    fn run<V: Vector<T>>(self) -> (T, T) {
        let (x, lanes) = (self.x, V::LANES);
        let mut lo = [V::splat(T::INFINITY); 2];
        let mut hi = [V::splat(T::NEG_INFINITY); 2];
        let mut i = 0;
        while i + 2 * lanes <= x.len() {
            for u in 0..2 {
                // SAFETY: i + (u + 1) * lanes <= x.len().
                let v = unsafe { V::load(x.as_ptr().add(i + u * lanes)) };
                lo[u] = lo[u].min(v);
                hi[u] = hi[u].max(v);
            }
            i += 2 * lanes;
        }
        let (mut l, mut h) = (lo[0].min(lo[1]).reduce_min(), hi[0].max(hi[1]).reduce_max());
        for &v in &x[i..] {
            l = l.fmin(v);
            h = h.fmax(v);
        }
        (l, h)
    }
}

/// `(min, max)` of a slice (`(+inf, -inf)` for an empty one) in vector registers, for the level
/// of the running code. Meant for slices without NaN (the lane order of a NaN is unspecified).
#[inline(always)]
pub(crate) fn extremes<T: Real>(x: &[T]) -> (T, T) {
    crate::simd::dispatch(
        #[inline(always)]
        || T::with_vector(Extremes { x }),
    )
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
                Scalar(self.0.fmin(o.0))
            }
            #[inline(always)]
            fn max(self, o: Self) -> Self {
                Scalar(self.0.fmax(o.0))
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
mod x86 {
    use super::Vector;
    use std::arch::x86_64::*;

    /// Implements [`Vector`] for a newtype over an intrinsic register type. The intrinsics are
    /// target-feature functions; the level check in `with_vector` makes calling them sound.
    macro_rules! intrinsic_vector {
        ($name:ident, $reg:ty, $t:ty, $lanes:expr, $set1:ident, $loadu:ident, $storeu:ident,
         $add:ident, $sub:ident, $mul:ident, $div:ident, $min:ident, $max:ident, $fmadd:ident,
         $recip:ident, $reduce:ident, $reduce4:ident, $reduce_min:ident, $reduce_max:ident) => {
            #[derive(Clone, Copy)]
            pub struct $name($reg);
            impl Vector<$t> for $name {
                const LANES: usize = $lanes;
                #[inline(always)]
                fn splat(x: $t) -> Self {
                    unsafe { $name($set1(x)) }
                }
                #[inline(always)]
                unsafe fn load(p: *const $t) -> Self {
                    $name($loadu(p))
                }
                #[inline(always)]
                unsafe fn store(self, p: *mut $t) {
                    $storeu(p, self.0)
                }
                #[inline(always)]
                fn add(self, o: Self) -> Self {
                    unsafe { $name($add(self.0, o.0)) }
                }
                #[inline(always)]
                fn sub(self, o: Self) -> Self {
                    unsafe { $name($sub(self.0, o.0)) }
                }
                #[inline(always)]
                fn mul(self, o: Self) -> Self {
                    unsafe { $name($mul(self.0, o.0)) }
                }
                #[inline(always)]
                fn min(self, o: Self) -> Self {
                    unsafe { $name($min(self.0, o.0)) }
                }
                #[inline(always)]
                fn max(self, o: Self) -> Self {
                    unsafe { $name($max(self.0, o.0)) }
                }
                #[inline(always)]
                fn div(self, o: Self) -> Self {
                    unsafe { $name($div(self.0, o.0)) }
                }
                #[inline(always)]
                fn mul_add(self, m: Self, a: Self) -> Self {
                    unsafe { $name($fmadd(self.0, m.0, a.0)) }
                }
                #[inline(always)]
                fn recip(self) -> Self {
                    unsafe { $name($recip(self.0)) }
                }
                #[inline(always)]
                fn sum(self) -> $t {
                    unsafe { $reduce(self.0) }
                }
                #[inline(always)]
                fn sum4(v: [Self; 4]) -> [$t; 4] {
                    unsafe { $reduce4(v.map(|x| x.0)) }
                }
                #[inline(always)]
                fn reduce_min(self) -> $t {
                    unsafe { $reduce_min(self.0) }
                }
                #[inline(always)]
                fn reduce_max(self) -> $t {
                    unsafe { $reduce_max(self.0) }
                }
            }
        };
    }
    // Horizontal sums in registers (halves added pairwise, a fixed order); going through memory
    // instead would stall on store forwarding.
    #[inline(always)]
    unsafe fn reduce_add_256_ps(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    #[inline(always)]
    unsafe fn reduce_add_256_pd(v: __m256d) -> f64 {
        let s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd::<1>(v));
        _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)))
    }

    // Four horizontal sums of 512-bit vectors as one tree: pairs of vectors are folded
    // 512 -> 256 bits into one register, those pairs 256 -> 128, and each 128-bit quarter is
    // then summed in place; lane 4i ends up holding the sum of vector i.
    #[inline(always)]
    unsafe fn reduce_add4_512_ps(v: [__m512; 4]) -> [f32; 4] {
        let fold = |a: __m512, b: __m512| {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b),
                _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b),
            )
        };
        let (ab, cd) = (fold(v[0], v[1]), fold(v[2], v[3]));
        let t = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(ab, cd),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(ab, cd),
        );
        let t = _mm512_add_ps(t, _mm512_permute_ps::<0b01_00_11_10>(t));
        let t = _mm512_add_ps(t, _mm512_permute_ps::<0b10_11_00_01>(t));
        let mut lanes = [0f32; 16];
        _mm512_storeu_ps(lanes.as_mut_ptr(), t);
        [lanes[0], lanes[4], lanes[8], lanes[12]]
    }
    #[inline(always)]
    unsafe fn reduce_add4_512_pd(v: [__m512d; 4]) -> [f64; 4] {
        let fold = |a: __m512d, b: __m512d| {
            _mm512_add_pd(
                _mm512_shuffle_f64x2::<0b01_00_01_00>(a, b),
                _mm512_shuffle_f64x2::<0b11_10_11_10>(a, b),
            )
        };
        let (ab, cd) = (fold(v[0], v[1]), fold(v[2], v[3]));
        let t = _mm512_add_pd(
            _mm512_shuffle_f64x2::<0b10_00_10_00>(ab, cd),
            _mm512_shuffle_f64x2::<0b11_01_11_01>(ab, cd),
        );
        let t = _mm512_add_pd(t, _mm512_permute_pd::<0b0101_0101>(t));
        let mut lanes = [0f64; 8];
        _mm512_storeu_pd(lanes.as_mut_ptr(), t);
        [lanes[0], lanes[2], lanes[4], lanes[6]]
    }
    #[inline(always)]
    unsafe fn reduce_add4_256_ps(v: [__m256; 4]) -> [f32; 4] {
        v.map(|x| reduce_add_256_ps(x))
    }
    #[inline(always)]
    unsafe fn reduce_add4_256_pd(v: [__m256d; 4]) -> [f64; 4] {
        v.map(|x| reduce_add_256_pd(x))
    }
    // Horizontal min and max of the 256-bit types, by halving as the sums do.
    #[inline(always)]
    unsafe fn reduce_min_256_ps(v: __m256) -> f32 {
        let s = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_min_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_min_ss(s, _mm_movehdup_ps(s)))
    }
    #[inline(always)]
    unsafe fn reduce_max_256_ps(v: __m256) -> f32 {
        let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)))
    }
    #[inline(always)]
    unsafe fn reduce_min_256_pd(v: __m256d) -> f64 {
        let s = _mm_min_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd::<1>(v));
        _mm_cvtsd_f64(_mm_min_sd(s, _mm_unpackhi_pd(s, s)))
    }
    #[inline(always)]
    unsafe fn reduce_max_256_pd(v: __m256d) -> f64 {
        let s = _mm_max_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd::<1>(v));
        _mm_cvtsd_f64(_mm_max_sd(s, _mm_unpackhi_pd(s, s)))
    }
    // Reciprocals: the f32 estimates (14 and 12 bits) are refined by one Newton step,
    // r' = r (2 - x r), to within about an ulp, at a fraction of a division's cost. f64 keeps
    // the exact division (two Newton steps would cost about as much).
    #[inline(always)]
    unsafe fn recip_512_ps(x: __m512) -> __m512 {
        let r = _mm512_rcp14_ps(x);
        _mm512_mul_ps(r, _mm512_fnmadd_ps(x, r, _mm512_set1_ps(2.0)))
    }

    #[inline(always)]
    unsafe fn recip_256_ps(x: __m256) -> __m256 {
        let r = _mm256_rcp_ps(x);
        _mm256_mul_ps(r, _mm256_fnmadd_ps(x, r, _mm256_set1_ps(2.0)))
    }

    #[inline(always)]
    unsafe fn recip_512_pd(x: __m512d) -> __m512d {
        _mm512_div_pd(_mm512_set1_pd(1.0), x)
    }

    #[inline(always)]
    unsafe fn recip_256_pd(x: __m256d) -> __m256d {
        _mm256_div_pd(_mm256_set1_pd(1.0), x)
    }

    intrinsic_vector!(
        F32x16,
        __m512,
        f32,
        16,
        _mm512_set1_ps,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_add_ps,
        _mm512_sub_ps,
        _mm512_mul_ps,
        _mm512_div_ps,
        _mm512_min_ps,
        _mm512_max_ps,
        _mm512_fmadd_ps,
        recip_512_ps,
        _mm512_reduce_add_ps,
        reduce_add4_512_ps,
        _mm512_reduce_min_ps,
        _mm512_reduce_max_ps
    );
    intrinsic_vector!(
        F32x8,
        __m256,
        f32,
        8,
        _mm256_set1_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_add_ps,
        _mm256_sub_ps,
        _mm256_mul_ps,
        _mm256_div_ps,
        _mm256_min_ps,
        _mm256_max_ps,
        _mm256_fmadd_ps,
        recip_256_ps,
        reduce_add_256_ps,
        reduce_add4_256_ps,
        reduce_min_256_ps,
        reduce_max_256_ps
    );
    intrinsic_vector!(
        F64x8,
        __m512d,
        f64,
        8,
        _mm512_set1_pd,
        _mm512_loadu_pd,
        _mm512_storeu_pd,
        _mm512_add_pd,
        _mm512_sub_pd,
        _mm512_mul_pd,
        _mm512_div_pd,
        _mm512_min_pd,
        _mm512_max_pd,
        _mm512_fmadd_pd,
        recip_512_pd,
        _mm512_reduce_add_pd,
        reduce_add4_512_pd,
        _mm512_reduce_min_pd,
        _mm512_reduce_max_pd
    );
    intrinsic_vector!(
        F64x4,
        __m256d,
        f64,
        4,
        _mm256_set1_pd,
        _mm256_loadu_pd,
        _mm256_storeu_pd,
        _mm256_add_pd,
        _mm256_sub_pd,
        _mm256_mul_pd,
        _mm256_div_pd,
        _mm256_min_pd,
        _mm256_max_pd,
        _mm256_fmadd_pd,
        recip_256_pd,
        reduce_add_256_pd,
        reduce_add4_256_pd,
        reduce_min_256_pd,
        reduce_max_256_pd
    );
}

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
    use crate::real::Real;

    /// Runs `Dot` with every vector type this CPU supports.
    fn dots<T: Real>(x: &[T], y: Option<&[T]>) -> Vec<T> {
        let mut out = vec![Dot { x, y }.run::<T::Single>()];
        if level() >= Level::Avx2 {
            out.push(crate::simd::dispatch(|| Dot { x, y }.run::<T::Narrow>()));
        }
        if level() >= Level::Avx512 {
            out.push(crate::simd::dispatch(|| Dot { x, y }.run::<T::Wide>()));
        }
        out
    }

    #[test]
    fn dot_and_sum_match_a_naive_loop_at_odd_lengths() {
        for n in [0usize, 1, 3, 7, 8, 15, 16, 17, 63, 64, 65, 129, 3001] {
            let x: Vec<f64> = (0..n)
                .map(|i| ((i * 7919) % 101) as f64 / 37.0 - 1.3)
                .collect();
            let y: Vec<f64> = (0..n)
                .map(|i| ((i * 104729) % 89) as f64 / 23.0 + 0.2)
                .collect();
            let naive_dot: f64 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
            let naive_sum: f64 = x.iter().sum();
            for d in dots(&x, Some(&y)) {
                assert!(
                    (d - naive_dot).abs() <= 1e-12 * (1.0 + naive_dot.abs()),
                    "n={n}"
                );
            }
            for s in dots(&x, None) {
                assert!(
                    (s - naive_sum).abs() <= 1e-12 * (1.0 + naive_sum.abs()),
                    "n={n}"
                );
            }
            let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
            for s in dots(&xf, None) {
                assert!(
                    (s as f64 - naive_sum).abs() <= 1e-4 * (1.0 + naive_sum.abs()),
                    "n={n}"
                );
            }
        }
    }

    #[test]
    fn sum4_matches_the_lane_sums() {
        fn check<T: Real, V: Vector<T>>(x: &[T]) {
            let v: [V; 4] =
                std::array::from_fn(|i| unsafe { V::load(x.as_ptr().add(i * V::LANES)) });
            let got = V::sum4(v);
            for (i, g) in got.iter().enumerate() {
                let want: f64 = x[i * V::LANES..(i + 1) * V::LANES]
                    .iter()
                    .map(|v| v.to_f64())
                    .sum();
                assert!(
                    (g.to_f64() - want).abs() < 1e-5,
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
            crate::simd::dispatch(|| check::<f64, <f64 as Vectors>::Narrow>(&x));
            crate::simd::dispatch(|| check::<f32, <f32 as Vectors>::Narrow>(&xf));
        }
        if level() >= Level::Avx512 {
            crate::simd::dispatch(|| check::<f64, <f64 as Vectors>::Wide>(&x));
            crate::simd::dispatch(|| check::<f32, <f32 as Vectors>::Wide>(&xf));
        }
    }

    #[test]
    fn extremes_match_a_naive_fold_at_odd_lengths() {
        fn all<T: Real>(x: &[T]) -> Vec<(T, T)> {
            let mut out = vec![Extremes { x }.run::<T::Single>()];
            if level() >= Level::Avx2 {
                out.push(crate::simd::dispatch(|| Extremes { x }.run::<T::Narrow>()));
            }
            if level() >= Level::Avx512 {
                out.push(crate::simd::dispatch(|| Extremes { x }.run::<T::Wide>()));
            }
            out
        }
        for n in [2usize, 3, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 129] {
            // The extremes move around: at either end and in the middle.
            for at in [0, n / 2, n - 1] {
                let mut x: Vec<f64> = (0..n)
                    .map(|i| ((i * 7919) % 101) as f64 / 37.0 - 1.3)
                    .collect();
                x[at] = 9.5;
                let lo_at = if n - 1 - at == at {
                    (at + 1) % n
                } else {
                    n - 1 - at
                };
                x[lo_at] = -7.25;
                let want = (-7.25, 9.5);
                assert!(all(&x).iter().all(|&e| e == want), "f64 n={n} at={at}");
                let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
                assert!(
                    all(&xf).iter().all(|&e| e == (-7.25f32, 9.5f32)),
                    "f32 n={n} at={at}"
                );
            }
        }
        assert_eq!(extremes::<f32>(&[]), (f32::INFINITY, f32::NEG_INFINITY));
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
            check(&crate::simd::dispatch(|| {
                recips::<<f32 as Vectors>::Narrow>(&xs)
            }));
        }
        if level() >= Level::Avx512 {
            check(&crate::simd::dispatch(|| {
                recips::<<f32 as Vectors>::Wide>(&xs)
            }));
        }
    }
}
