//! The per-chunk row kernels of the streaming solver: what one pass does to a chunk of rows.
//! Each is `#[inline(always)]`, so that it is compiled inside the SIMD dispatch of the pass.

use crate::simd::{dot, max, sum, Real};
use std::ops::Range;

/// `E = exp((S − m)/eps)` of a chunk of rows against the chunk's column max `m`, written to
/// `out`, and its column sums.
#[inline(always)]
pub(super) fn chunk_exp<T: Real>(
    rows: &[T],
    k: usize,
    m: &[T],
    inv_eps: T,
    out: &mut [T],
    sums: &mut [T],
) {
    let (m, sums) = (&m[..k], &mut sums[..k]);
    sums.fill(T::ZERO);
    for (srow, orow) in rows.chunks_exact(k).zip(out.chunks_exact_mut(k)) {
        let (srow, orow) = (&srow[..k], &mut orow[..k]);
        for j in 0..k {
            let e = ((srow[j] - m[j]) * inv_eps).exp_fast();
            orow[j] = e;
            sums[j] += e;
        }
    }
}

/// What an iteration's pass leaves behind.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Column sums of the row-normalised plan, for the next iteration's `v`.
    ColumnSums,
    /// The last iteration: the plan, written over the cached `E`.
    Plan,
}

/// One plain-domain iteration over a chunk of rows whose `out` holds the cached `E`.
pub(super) struct PlainStep<'a, T> {
    pub k: usize,
    pub chunk_rows: usize,
    pub row_mass: &'a [T],
    /// The column scaling `v` on the common scale.
    pub v: &'a [T],
    /// Per chunk, the factors from its `E` to the common scale (see `Workspace::corr`).
    pub corr: &'a [T],
    pub step: Step,
}

impl<T: Real> PlainStep<'_, T> {
    /// `u = r / (E w)` for each row, with `w` the chunk's `v` (in `scaled_v`), then the column
    /// sums of `E u` into `partial` or the plan `E w u` into `out`, as `step` says.
    #[inline(always)]
    pub fn chunk(
        &self,
        rows: Range<usize>,
        u: &mut [T],
        out: &mut [T],
        partial: &mut [T],
        scaled_v: &mut [T],
    ) {
        let k = self.k;
        let chunk = rows.start / self.chunk_rows;
        let (p, w, v) = (&mut partial[..k], &mut scaled_v[..k], &self.v[..k]);
        let corr = &self.corr[chunk * k..(chunk + 1) * k];
        // The chunk's E times w is the common-scale E times v.
        for j in 0..k {
            w[j] = v[j] * corr[j];
        }
        p.fill(T::ZERO);
        let first = rows.start;
        for (i, row) in rows.enumerate() {
            let orow = &mut out[i * k..(i + 1) * k];
            let un = self.row_mass[row] / dot(orow, w);
            u[row - first] = un;
            match self.step {
                Step::Plan => {
                    for j in 0..k {
                        orow[j] = orow[j] * w[j] * un;
                    }
                }
                Step::ColumnSums => {
                    for j in 0..k {
                        p[j] += orow[j] * un;
                    }
                }
            }
        }
        if self.step == Step::ColumnSums {
            for j in 0..k {
                p[j] *= corr[j];
            }
        }
    }
}

/// Log pass 0 (`a = 0`) over a chunk of rows: the column sums of `exp((S − colmax)/eps)`
/// into `partial`, and `a` set to 0.
#[inline(always)]
pub(super) fn log_first_pass<T: Real>(
    scores: &[T],
    cmax: &[T],
    inv_eps: T,
    rows: Range<usize>,
    a: &mut [T],
    partial: &mut [T],
) {
    let k = cmax.len();
    let p = &mut partial[..k];
    p.fill(T::ZERO);
    a.fill(T::ZERO);
    for row in rows {
        let srow = &scores[row * k..(row + 1) * k];
        for j in 0..k {
            p[j] += ((srow[j] - cmax[j]) * inv_eps).exp_fast();
        }
    }
}

/// One log-domain iteration over a chunk of rows.
pub(super) struct LogStep<'a, T> {
    pub k: usize,
    pub inv_eps: T,
    pub scores: &'a [T],
    pub cmax: &'a [T],
    pub row_mass: &'a [T],
    /// The column potentials `b = log v`.
    pub b: &'a [T],
    /// The last iteration writes the plan to `out` instead of column sums to `partial`.
    pub last: bool,
}

impl<T: Real> LogStep<'_, T> {
    /// Each row of the plan `t = exp((S − colmax)/eps + b − max)` (in the scratch `t`) times
    /// `r / Σ t`, with the row potential `a = log r − max − log Σ t`.
    #[inline(always)]
    pub fn chunk(
        &self,
        rows: Range<usize>,
        a: &mut [T],
        out: &mut [T],
        partial: &mut [T],
        t: &mut [T],
    ) {
        let (k, inv_eps) = (self.k, self.inv_eps);
        let (p, t, cmax, b) = (
            &mut partial[..k],
            &mut t[..k],
            &self.cmax[..k],
            &self.b[..k],
        );
        p.fill(T::ZERO);
        let first = rows.start;
        for (i, row) in rows.enumerate() {
            let srow = &self.scores[row * k..(row + 1) * k];
            for j in 0..k {
                t[j] = (srow[j] - cmax[j]) * inv_eps + b[j];
            }
            let m = max(t);
            for tj in t.iter_mut() {
                *tj = (*tj - m).exp_fast();
            }
            let z = sum(t);
            let r = self.row_mass[row];
            a[row - first] = r.ln() - m - z.ln();
            let scale = r / z;
            if self.last {
                let orow = &mut out[i * k..(i + 1) * k];
                for j in 0..k {
                    orow[j] = t[j] * scale;
                }
            } else {
                for j in 0..k {
                    p[j] += t[j] * scale;
                }
            }
        }
    }
}
