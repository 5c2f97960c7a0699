//! Row chunking shared by the streaming kernels.
//!
//! Every kernel pass walks the rows of one problem in fixed-size chunks. Each chunk writes its
//! own column partial sums, and the partials are then added in chunk order. The chunk size
//! depends only on the row width, never on the thread count, so results are bitwise identical
//! whether the chunks run on one thread or many.

use crate::real::Real;
use rayon::prelude::*;
use std::ops::Range;

/// Rows per chunk: about 8K elements (32 KiB of f32, roughly L1-sized), at least 32 rows so
/// that wide problems still amortise the per-chunk bookkeeping.
pub(crate) fn rows_per_chunk(width: usize) -> usize {
    (8192 / width.max(1)).clamp(32, 2048)
}

/// About `rpc` rows per chunk, adjusted so that `n_rows` splits into a power-of-two number of
/// equal chunks (the one nearest the count `rpc` gives): rayon halves the chunk range, so every
/// power-of-two team then gets the same share. Depends only on `n_rows` and `rpc`, not on the
/// thread count.
pub(crate) fn balanced(n_rows: usize, rpc: usize) -> usize {
    let nch = n_chunks(n_rows, rpc);
    if nch <= 1 {
        return rpc;
    }
    let up = nch.next_power_of_two();
    let nch = if up - nch <= nch - up / 2 { up } else { up / 2 };
    let even = n_rows.div_ceil(nch);
    // Chunks of a few rows cannot always come out even; those keep `rpc`.
    if n_chunks(n_rows, even) == nch {
        even
    } else {
        rpc
    }
}

pub(crate) fn n_chunks(n_rows: usize, rpc: usize) -> usize {
    n_rows.div_ceil(rpc)
}

/// Runs `f(rows, state_rows, out_rows, partial, scratch)` once per row chunk: sequentially when
/// there is a single chunk (the common case for batches of tiny problems, where a rayon
/// fork-join per pass would dominate), in parallel otherwise. `state` has `sw` values per row,
/// `out` has `ow` per row, and `partials` holds `pw` values per chunk.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_pass<T, F>(
    n_rows: usize,
    rpc: usize,
    state: &mut [T],
    sw: usize,
    out: &mut [T],
    ow: usize,
    partials: &mut [T],
    pw: usize,
    scratch: &mut Vec<T>,
    scratch_len: usize,
    f: F,
) where
    T: Real,
    F: Fn(Range<usize>, &mut [T], &mut [T], &mut [T], &mut [T]) + Sync,
{
    let nch = n_chunks(n_rows, rpc);
    debug_assert!(sw > 0 && ow > 0 && pw > 0);
    debug_assert_eq!(state.len(), n_rows * sw);
    debug_assert_eq!(out.len(), n_rows * ow);
    debug_assert!(partials.len() >= nch * pw);
    if nch <= 1 {
        scratch.clear();
        scratch.resize(scratch_len, T::ZERO);
        crate::simd::dispatch(
            #[inline(always)]
            || f(0..n_rows, state, out, &mut partials[..pw], scratch),
        );
        return;
    }
    state
        .par_chunks_mut(rpc * sw)
        .zip(out.par_chunks_mut(rpc * ow))
        .zip(partials[..nch * pw].par_chunks_mut(pw))
        .enumerate()
        .for_each(|(ci, ((st, o), p))| {
            let r0 = ci * rpc;
            with_thread_scratch(scratch_len, |scr| {
                crate::simd::dispatch(
                    #[inline(always)]
                    || f(r0..(r0 + rpc).min(n_rows), st, o, p, scr),
                )
            })
        });
}

/// Runs `f` on `len` values of this thread's scratch buffer, which persists across passes and
/// calls and holds whatever an earlier job left. A fresh buffer per rayon split cost a
/// Multi-SK call about a tenth of its time in zeroing (its slot-value scratch is ~200 KiB and
/// a call makes 21 passes); the buffer a thread keeps is the largest it was asked for.
fn with_thread_scratch<T: Real, R>(len: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
    T::thread_scratch().with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, T::ZERO);
            }
            f(&mut buf[..len])
        }
        // Only a job that runs a pass inside itself gets here; it pays for a buffer of its own.
        Err(_) => f(&mut vec![T::ZERO; len]),
    })
}

/// `acc = Σ_c partials[c]`, summed in chunk order.
pub(crate) fn reduce_partials<T: Real>(partials: &[T], nch: usize, acc: &mut [T]) {
    let w = acc.len();
    acc.copy_from_slice(&partials[..w]);
    for c in 1..nch {
        for (a, p) in acc.iter_mut().zip(&partials[c * w..(c + 1) * w]) {
            *a += *p;
        }
    }
}

/// Per-column max and min of one problem's `[n, k]` scores, written to `cmax`/`cmin`. Returns
/// whether every element is finite (see [`chunk_col_range`]).
pub(crate) fn col_range<T: Real>(
    s: &[T],
    n: usize,
    k: usize,
    cmax: &mut [T],
    cmin: &mut [T],
) -> bool {
    let rpc = rows_per_chunk(k);
    let nch = n_chunks(n, rpc);
    let one = |rows: &[T], mx: &mut [T], mn: &mut [T], nf: &mut [T]| {
        crate::simd::dispatch(
            #[inline(always)]
            || chunk_col_range(rows, k, mx, mn, nf),
        )
    };
    let finite = |nf: &[T]| nf.iter().all(|v| *v == T::ZERO);
    if nch <= 1 {
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
    let mut parts = vec![T::ZERO; nch * 3 * k];
    s.par_chunks(rpc * k)
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
                    let d = (mx[j] - cmin[j]).to_f64();
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

/// The error a kernel returns for a non-finite input when asked to check.
pub(crate) fn not_finite(name: &str) -> crate::error::MmotError {
    crate::error::MmotError::InvalidArgument(format!(
        "argument '{name}' must be finite; found NaN or Inf"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_chunks_are_a_power_of_two_that_covers_the_rows() {
        for (n, rpc) in [
            (7660, 408),
            (7660, 512),
            (1000, 100),
            (5, 4),
            (4096, 512),
            (1 << 20, 32),
        ] {
            let b = balanced(n, rpc);
            let nch = n_chunks(n, b);
            assert!(
                nch.is_power_of_two(),
                "n={n} rpc={rpc}: {nch} chunks of {b}"
            );
            assert!(b * nch >= n && b * (nch - 1) < n, "n={n} rpc={rpc}");
            // The nearest power of two to the count rpc gives, so chunks stay about rpc rows.
            assert!(b * 3 >= rpc * 2 && b * 2 <= rpc * 3, "n={n} rpc={rpc}: {b}");
        }
        assert_eq!(balanced(300, 512), 512);
        assert_eq!(balanced(12, 1), 1, "12 rows cannot make 16 chunks");
    }
}
