//! Column statistics of a problem's scores (max, min, finiteness), shared by the Sinkhorn
//! kernels to pick the domain and shift the exponent. Row chunks as in [`super::chunks`], so the
//! results do not depend on the thread count.

use super::chunks::{n_chunks, rows_per_chunk};
use crate::simd::{dispatch, Real};
use rayon::prelude::*;

/// Per-column max and min of one problem's `[n, k]` scores, written to `cmax`/`cmin`. Returns
/// whether every element is finite (see [`chunk_col_range`]).
pub(crate) fn col_range<T: Real>(
    s: &[T],
    n: usize,
    k: usize,
    cmax: &mut [T],
    cmin: &mut [T],
) -> bool {
    let chunk_rows = rows_per_chunk(k);
    let chunk_count = n_chunks(n, chunk_rows);
    let one = |rows: &[T], mx: &mut [T], mn: &mut [T], nf: &mut [T]| {
        dispatch(
            #[inline(always)]
            || chunk_col_range(rows, k, mx, mn, nf),
        )
    };
    let finite = |nf: &[T]| nf.iter().all(|v| *v == T::ZERO);
    if chunk_count <= 1 {
        // No heap allocation for the narrow problems of a large batch.
        let mut stack = [T::ZERO; 256];
        let mut heap = Vec::new();
        let nf: &mut [T] = if k <= stack.len() {
            &mut stack[..k]
        } else {
            heap.resize(k, T::ZERO);
            &mut heap
        };
        one(s, cmax, cmin, nf);
        return finite(nf);
    }
    let mut parts = vec![T::ZERO; chunk_count * 3 * k];
    s.par_chunks(chunk_rows * k)
        .zip(parts.par_chunks_mut(3 * k))
        .for_each(|(rows, p)| {
            let (mx, rest) = p.split_at_mut(k);
            let (mn, nf) = rest.split_at_mut(k);
            one(rows, mx, mn, nf)
        });
    cmax.fill(T::NEG_INFINITY);
    cmin.fill(T::INFINITY);
    let mut ok = true;
    for p in parts.chunks_exact(3 * k) {
        for j in 0..k {
            cmax[j] = cmax[j].fmax(p[j]);
            cmin[j] = cmin[j].fmin(p[k + j]);
        }
        ok &= finite(&p[2 * k..]);
    }
    ok
}

/// Column max `mx` and min `mn` of a chunk of rows. A column with a NaN or infinite score gets
/// a NaN min (`x - x` is 0 for a finite `x` and NaN otherwise, and NaN survives a sum), so
/// its range comes out NaN. Rows are taken four at a time: the three per-column accumulators
/// are a read-modify-write each, and per single row they, not the memory, would set the pace.
#[inline(always)]
#[allow(clippy::eq_op)]
pub(crate) fn chunk_col_range<T: Real>(
    rows: &[T],
    k: usize,
    mx: &mut [T],
    mn: &mut [T],
    nf: &mut [T],
) {
    let (mx, mn, nf) = (&mut mx[..k], &mut mn[..k], &mut nf[..k]);
    mx.fill(T::NEG_INFINITY);
    mn.fill(T::INFINITY);
    nf.fill(T::ZERO);
    let mut quads = rows.chunks_exact(4 * k);
    for q in &mut quads {
        let (a, b, c, d) = (&q[..k], &q[k..2 * k], &q[2 * k..3 * k], &q[3 * k..4 * k]);
        for j in 0..k {
            let (a, b, c, d) = (a[j], b[j], c[j], d[j]);
            mx[j] = mx[j].fmax(a.fmax(b).fmax(c.fmax(d)));
            mn[j] = mn[j].fmin(a.fmin(b).fmin(c.fmin(d)));
            nf[j] += ((a - a) + (b - b)) + ((c - c) + (d - d));
        }
    }
    for row in quads.remainder().chunks_exact(k) {
        let row = &row[..k];
        for j in 0..k {
            let x = row[j];
            mx[j] = mx[j].fmax(x);
            mn[j] = mn[j].fmin(x);
            nf[j] += x - x;
        }
    }
    for j in 0..k {
        mn[j] += nf[j];
    }
}

/// Column statistics for a batch `[b, n, k]`: fills `cmax` (`[b, k]`) and returns the largest
/// column range max_n S - min_n S over the batch (as f64; NaN if the input has NaN) and whether
/// every element is finite.
pub(crate) fn batch_col_stats<T: Real>(
    s: &[T],
    b: usize,
    n: usize,
    k: usize,
    cmax: &mut [T],
) -> (f64, bool) {
    s.par_chunks(n * k)
        .zip(cmax.par_chunks_mut(k))
        .take(b)
        .map_init(
            || vec![T::ZERO; k],
            |cmin, (sp, mx)| {
                let ok = col_range(sp, n, k, mx, cmin);
                let mut r = if ok { 0.0f64 } else { f64::NAN };
                for j in 0..k {
                    let d = mx[j].to_f64() - cmin[j].to_f64();
                    // propagate NaN: NaN never compares greater
                    if d.is_nan() || r.is_nan() {
                        r = f64::NAN;
                    } else if d > r {
                        r = d;
                    }
                }
                (r, ok)
            },
        )
        .reduce(
            || (0.0, true),
            |(a, oa), (b, ob)| {
                let r = if a.is_nan() || b.is_nan() {
                    f64::NAN
                } else {
                    a.max(b)
                };
                (r, oa && ob)
            },
        )
}
