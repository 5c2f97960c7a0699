//! Scale-safe row normalisation for the cosine kernels (similarity, InfoNCE), with the input's
//! finiteness check in the same pass.

use crate::simd::{dispatch, dot, extremes, Real, LANES};
use rayon::prelude::*;
use std::borrow::Cow;

/// Rows per parallel task.
const TASK_ROWS: usize = 1024;
/// Norm floor, as `torch.nn.functional.normalize(eps=1e-12)`.
pub(crate) const NORM_EPS: f64 = 1e-12;

/// The rows of one input as the cosine kernels read them: `x̂_r = rows_r · unit_r`, and
/// `inv()[r] = 1 / max(‖x_r‖, 1e-12)`.
///
/// A row whose plain sum of squares lies in [1e-24, max/8], or that is all zeros, is taken as
/// it is with `unit = 1 / max(‖x‖, 1e-12)`: the fast path, one pass, no copy. Raw dot products
/// of such rows, times `unit`, neither overflow (|x·y| ≤ max/8) nor lose digits to underflow.
/// If any finite row is outside that range (its sum of squares overflowed, or it is below the
/// 1e-12 floor, where squares and raw products underflow), `rows` is a normalised copy of the
/// whole input and `unit` is all ones; such a row is first multiplied by the power of two that
/// brings its largest magnitude into [0.5, 1) (exact), as `mmot.reference.unit_rows` does. A
/// non-finite row gets the factor NaN, so that it gives NaN rather than a number.
pub(crate) struct UnitRows<'a, T: Clone> {
    pub rows: Cow<'a, [T]>,
    pub unit: Vec<T>,
    /// Every element is finite (always true without the check).
    pub finite: bool,
    recip: Vec<T>,
}

impl<T: Real> UnitRows<'_, T> {
    /// `1 / max(‖x_r‖, 1e-12)` per row (ones without `normalize`); underflows only for rows
    /// past the dtype's range.
    pub(crate) fn inv(&self) -> &[T] {
        &self.recip
    }

    /// From the raw gradient with respect to the unit rows (Σ_j C[i,j] y_j) to the gradient of
    /// the input rows: through the normalisation x̂ = x / ‖x‖ when `normalize` (x̂ = unit · row,
    /// the rows as the kernels read them), then times `scale`, last, so that only a gradient
    /// beyond the dtype overflows.
    pub(crate) fn finish_gradient(&self, d: usize, scale: T, normalize: bool, out: &mut [T]) {
        if d == 0 {
            return;
        }
        let tiny = T::from_f64(NORM_EPS);
        let (x, unit, ix) = (&*self.rows, &self.unit, self.inv());
        out.par_chunks_mut(TASK_ROWS * d)
            .enumerate()
            .for_each(|(c, acc)| {
                for (r, gr) in acc.chunks_exact_mut(d).enumerate() {
                    let i = c * TASK_ROWS + r;
                    if !normalize {
                        for v in gr.iter_mut() {
                            *v *= scale;
                        }
                        continue;
                    }
                    let inv = ix[i];
                    if T::ONE / inv >= tiny {
                        // x̂ = x / ‖x‖: ∂x = (∂x̂ − x̂ (x̂·∂x̂)) / ‖x‖
                        let (xr, w) = (&x[i * d..(i + 1) * d], unit[i]);
                        let proj = dot(xr, gr) * w;
                        for (v, xv) in gr.iter_mut().zip(xr) {
                            *v = (*v - *xv * w * proj) * inv * scale;
                        }
                    } else {
                        for v in gr.iter_mut() {
                            *v = *v * inv * scale;
                        }
                    }
                }
            });
    }
}

/// [`UnitRows`] of the `rows` rows of `d` values in `a` (the rows as they are, factors 1,
/// without `normalize`), and, with `check_finite`, whether every element is finite (`v - v` is
/// 0 for a finite `v` and NaN otherwise, summed beside the squares). Without either nothing is
/// read.
#[allow(clippy::eq_op)]
pub(crate) fn unit_rows<T: Real>(
    a: &[T],
    rows: usize,
    d: usize,
    normalize: bool,
    check_finite: bool,
) -> UnitRows<'_, T> {
    let mut inv = vec![T::ONE; rows];
    let mut step = vec![T::ONE; rows];
    if !normalize && !check_finite {
        let recip = inv.clone();
        return UnitRows {
            rows: Cow::Borrowed(a),
            unit: inv,
            finite: true,
            recip,
        };
    }
    let (finite, plain) = inv
        .par_chunks_mut(TASK_ROWS)
        .zip(step.par_chunks_mut(TASK_ROWS))
        .enumerate()
        .map(|(task, (inv, step))| {
            dispatch(
                #[inline(always)]
                || {
                    let mut nf = [T::ZERO; LANES];
                    let mut plain = true;
                    for (i, (iv, st)) in inv.iter_mut().zip(step.iter_mut()).enumerate() {
                        let r = task * TASK_ROWS + i;
                        let row = &a[r * d..(r + 1) * d];
                        if check_finite {
                            let mut lanes = row.chunks_exact(LANES);
                            for q in &mut lanes {
                                for l in 0..LANES {
                                    nf[l] += q[l] - q[l];
                                }
                            }
                            for (l, q) in lanes.remainder().iter().enumerate() {
                                nf[l] += *q - *q;
                            }
                        }
                        if normalize {
                            plain &= row_scale(row, iv, st);
                        }
                    }
                    (nf.iter().all(|z| *z == T::ZERO), plain)
                },
            )
        })
        .reduce(|| (true, true), |a, b| (a.0 && b.0, a.1 && b.1));
    let recip: Vec<T> = inv.iter().zip(&step).map(|(&iv, &st)| iv * st).collect();
    if plain {
        return UnitRows {
            rows: Cow::Borrowed(a),
            unit: inv,
            finite,
            recip,
        };
    }
    let mut copy = vec![T::ZERO; a.len()];
    if d > 0 {
        copy.par_chunks_mut(TASK_ROWS * d)
            .zip(a.par_chunks(TASK_ROWS * d))
            .zip(inv.par_chunks(TASK_ROWS))
            .zip(step.par_chunks(TASK_ROWS))
            .for_each(|(((o, s), iv), st)| {
                for (((o, s), &iv), &st) in
                    o.chunks_exact_mut(d).zip(s.chunks_exact(d)).zip(iv).zip(st)
                {
                    for (o, &s) in o.iter_mut().zip(s) {
                        *o = (s * st) * iv;
                    }
                }
            });
    }
    UnitRows {
        rows: Cow::Owned(copy),
        unit: vec![T::ONE; rows],
        finite,
        recip,
    }
}

/// One row's factor `inv` and power of two `step` (`x̂ = (x · step) · inv`); false when the row
/// had to be rescaled.
#[inline(always)]
#[allow(clippy::eq_op)]
fn row_scale<T: Real>(row: &[T], inv: &mut T, step: &mut T) -> bool {
    let tiny = T::from_f64(NORM_EPS);
    let ss = dot(row, row);
    if ss >= tiny * tiny && ss <= T::from_f64(T::LOG_RANGE_LIMIT) {
        *inv = T::ONE / ss.sqrt().fmax(tiny);
        return true;
    }
    let (lo, hi) = extremes(row);
    let peak = hi.fmax(-lo);
    if ss != ss || peak == T::INFINITY {
        *inv = ss - ss; // NaN: a non-finite row gives NaN, never a number
        return true;
    }
    if peak == T::ZERO {
        *inv = T::ONE / tiny;
        return true;
    }
    *step = T::from_f64(pow2(
        -exponent(peak.to_f64()).clamp(min_exp::<T>(), max_exp::<T>()),
    ));
    let s = *step;
    let scaled_ss = row.iter().fold(T::ZERO, |acc, &v| acc + (v * s) * (v * s));
    *inv = T::ONE / scaled_ss.sqrt().fmax(tiny * s);
    false
}

/// `e` with `x = f · 2^e`, `f` in [0.5, 1), for a finite `x > 0` (subnormals count as 2^-1022).
fn exponent(x: f64) -> i32 {
    ((x.to_bits() >> 52) & 0x7ff) as i32 - 1022
}

/// 2^k for a k in the normal range of f64 (exact).
fn pow2(k: i32) -> f64 {
    f64::from_bits(((k + 1023) as u64) << 52)
}

/// The range of k whose 2^k is a normal `T`, so that the steps are exact and finite.
fn min_exp<T: Real>() -> i32 {
    if std::mem::size_of::<T>() == 4 {
        -126
    } else {
        -1022
    }
}

fn max_exp<T: Real>() -> i32 {
    if std::mem::size_of::<T>() == 4 {
        127
    } else {
        1023
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norms_floor_and_finiteness() {
        let (rows, d) = (2500, 5);
        let mut a: Vec<f64> = (0..rows * d).map(|i| (i % 7) as f64 - 3.0).collect();
        a[..d].fill(0.0);
        let u = unit_rows(&a, rows, d, true, true);
        assert!(u.finite && matches!(u.rows, Cow::Borrowed(_)));
        assert_eq!(u.unit[0], 1e12);
        for r in 1..rows {
            let norm = a[r * d..(r + 1) * d]
                .iter()
                .map(|v| v * v)
                .sum::<f64>()
                .sqrt();
            assert!((u.inv()[r] * norm - 1.0).abs() < 1e-14, "row {r}");
        }
        assert_eq!(unit_rows(&a, rows, d, false, true).unit, vec![1.0; rows]);
        for bad in [f64::NAN, f64::INFINITY] {
            a[2049 * d + 3] = bad;
            assert!(!unit_rows(&a, rows, d, false, true).finite);
            let unchecked = unit_rows(&a, rows, d, true, false);
            assert!(unchecked.finite, "unchecked is always true");
            assert!(unchecked.unit[2049].is_nan(), "{bad} gives NaN");
        }
    }

    #[test]
    fn huge_and_tiny_rows_are_rescaled_exactly() {
        // f32 rows past sqrt(max) (squares overflow), near max, and below the floor (squares
        // underflow), against an f64 evaluation.
        let base = [3.0f32, -4.0, 12.0, 0.5];
        for scale in [1e20f32, 3e38 / 12.0, 1e-30, 1e-44] {
            let row: Vec<f32> = base.iter().map(|v| v * scale).collect();
            let u = unit_rows(&row, 1, 4, true, true);
            assert!(
                matches!(u.rows, Cow::Owned(_)) && u.unit == [1.0],
                "{scale}"
            );
            let norm = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
            for (got, &v) in u.rows.iter().zip(&row) {
                let want = v as f64 / norm.max(1e-12);
                assert!(
                    (*got as f64 - want).abs() <= 1e-6 * want.abs(),
                    "{scale}: {got} vs {want}"
                );
            }
            let (recip, want) = (u.inv()[0] as f64, 1.0 / norm.max(1e-12));
            assert!(
                (recip - want).abs() <= 1e-6 * want,
                "{scale}: {recip} vs {want}"
            );
        }
    }
}
