//! Inverse L2 norms of rows for the cosine kernels (similarity, InfoNCE), with the input's
//! finiteness check in the same pass.

use crate::simd::{dispatch, dot, Real, LANES};
use rayon::prelude::*;

/// Rows per parallel task.
const TASK_ROWS: usize = 1024;
/// Norm floor, as `torch.nn.functional.normalize(eps=1e-12)`.
pub(crate) const NORM_EPS: f64 = 1e-12;

/// `1 / max(‖row‖₂, 1e-12)` for each of the `rows` rows of `d` values in `a` (all ones without
/// `normalize`), and, with `check_finite`, whether every element is finite (`v - v` is 0 for a
/// finite `v` and NaN otherwise, summed beside the squares). Without the check the flag is
/// `true`, and without either nothing is read.
#[allow(clippy::eq_op)]
pub(crate) fn inv_row_norms<T: Real>(
    a: &[T],
    rows: usize,
    d: usize,
    normalize: bool,
    check_finite: bool,
) -> (Vec<T>, bool) {
    let mut inv = vec![T::ONE; rows];
    if !normalize && !check_finite {
        return (inv, true);
    }
    let tiny = T::from_f64(NORM_EPS);
    let finite = inv
        .par_chunks_mut(TASK_ROWS)
        .enumerate()
        .map(|(task, inv)| {
            dispatch(
                #[inline(always)]
                || {
                    let mut nf = [T::ZERO; LANES];
                    for (i, iv) in inv.iter_mut().enumerate() {
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
                            *iv = T::ONE / dot(row, row).sqrt().fmax(tiny);
                        }
                    }
                    nf.iter().all(|z| *z == T::ZERO)
                },
            )
        })
        .reduce(|| true, |a, b| a && b);
    (inv, finite)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norms_floor_and_finiteness() {
        let (rows, d) = (2500, 5);
        let mut a: Vec<f64> = (0..rows * d).map(|i| (i % 7) as f64 - 3.0).collect();
        a[..d].fill(0.0);
        let (inv, finite) = inv_row_norms(&a, rows, d, true, true);
        assert!(finite);
        assert_eq!(inv[0], 1e12);
        for r in 1..rows {
            let norm = a[r * d..(r + 1) * d]
                .iter()
                .map(|v| v * v)
                .sum::<f64>()
                .sqrt();
            assert!((inv[r] * norm - 1.0).abs() < 1e-14, "row {r}");
        }
        assert_eq!(inv_row_norms(&a, rows, d, false, true).0, vec![1.0; rows]);
        for bad in [f64::NAN, f64::INFINITY] {
            a[2049 * d + 3] = bad;
            assert!(!inv_row_norms(&a, rows, d, false, true).1);
            assert!(
                inv_row_norms(&a, rows, d, true, false).1,
                "unchecked is always true"
            );
        }
    }
}
