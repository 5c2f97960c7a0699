//! Reductions of a slice in vector registers: sum, dot product, min and max. Each runs in a
//! fixed order for the instruction set of the running code (see [`super::vector`]), so it
//! never depends on the thread count.

use super::dispatch::dispatch;
use super::real::Real;
use super::vector::{Vector, VectorOp};

/// Number of independent accumulators in some kernels' lane-array reductions. Float addition is
/// not associative, so LLVM will not vectorise a plain `sum()`; spelling out the lanes lets it,
/// and fixes the summation order. [`sum`], [`dot`], [`extremes`] and [`max`] use explicit
/// vectors instead, which LLVM cannot turn into narrow shuffles.
pub(crate) const LANES: usize = 8;

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
    dispatch(
        #[inline(always)]
        || T::with_vector(Dot { x, y: None }),
    )
}

/// Dot product in vector registers; `x` and `y` have the same length.
#[inline(always)]
pub(crate) fn dot<T: Real>(x: &[T], y: &[T]) -> T {
    debug_assert_eq!(x.len(), y.len());
    dispatch(
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
    dispatch(
        #[inline(always)]
        || T::with_vector(Extremes { x }),
    )
}

/// Maximum of a slice (-inf for an empty one).
#[inline(always)]
pub(crate) fn max<T: Real>(x: &[T]) -> T {
    extremes(x).1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::dispatch::{dispatch, level, Level};

    /// Runs `Dot` with every vector type this CPU supports.
    fn dots<T: Real>(x: &[T], y: Option<&[T]>) -> Vec<T> {
        let mut out = vec![Dot { x, y }.run::<T::Single>()];
        if level() >= Level::Avx2 {
            out.push(dispatch(|| Dot { x, y }.run::<T::Narrow>()));
        }
        if level() >= Level::Avx512 {
            out.push(dispatch(|| Dot { x, y }.run::<T::Wide>()));
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
    fn extremes_match_a_naive_fold_at_odd_lengths() {
        fn all<T: Real>(x: &[T]) -> Vec<(T, T)> {
            let mut out = vec![Extremes { x }.run::<T::Single>()];
            if level() >= Level::Avx2 {
                out.push(dispatch(|| Extremes { x }.run::<T::Narrow>()));
            }
            if level() >= Level::Avx512 {
                out.push(dispatch(|| Extremes { x }.run::<T::Wide>()));
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
    fn reductions() {
        let x: Vec<f64> = (0..37).map(|i| (i as f64 * 0.7).sin()).collect();
        let y: Vec<f64> = (0..37).map(|i| (i as f64 * 0.3).cos()).collect();
        let s: f64 = x.iter().sum();
        let d: f64 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
        assert!((sum(&x) - s).abs() < 1e-12);
        assert!((dot(&x, &y) - d).abs() < 1e-12);
        assert_eq!(max(&x), x.iter().cloned().fold(f64::MIN, f64::max));
        assert_eq!(extremes(&x).0, x.iter().cloned().fold(f64::MAX, f64::min));
    }
}
