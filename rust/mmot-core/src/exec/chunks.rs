//! Row chunking shared by the streaming kernels.
//!
//! Every kernel pass walks the rows of one problem in fixed-size chunks. Each chunk writes its
//! own column partial sums, and the partials are then added in chunk order. The chunk size
//! depends only on the row width, never on the thread count, so results are bitwise identical
//! whether the chunks run on one thread or many.

use crate::simd::{dispatch, Real};
use rayon::prelude::*;
use std::ops::Range;

/// Rows per chunk: about 8K elements (32 KiB of f32, roughly L1-sized), at least 32 rows so
/// that wide problems still amortise the per-chunk bookkeeping.
pub(crate) fn rows_per_chunk(width: usize) -> usize {
    (8192 / width.max(1)).clamp(32, 2048)
}

/// About `chunk_rows` rows per chunk, adjusted so that `n_rows` splits into a power-of-two
/// number of equal chunks (the one nearest the count `chunk_rows` gives): rayon halves the chunk
/// range, so every power-of-two team then gets the same share. Depends only on `n_rows` and
/// `chunk_rows`, not on the thread count.
pub(crate) fn balanced(n_rows: usize, chunk_rows: usize) -> usize {
    let count = n_chunks(n_rows, chunk_rows);
    if count <= 1 {
        return chunk_rows;
    }
    let up = count.next_power_of_two();
    let count = if up - count <= count - up / 2 {
        up
    } else {
        up / 2
    };
    let even = n_rows.div_ceil(count);
    // Chunks of a few rows cannot always come out even; those keep `chunk_rows`.
    if n_chunks(n_rows, even) == count {
        even
    } else {
        chunk_rows
    }
}

/// Chunks of `chunk_rows` rows that cover `n_rows` rows.
pub(crate) fn n_chunks(n_rows: usize, chunk_rows: usize) -> usize {
    n_rows.div_ceil(chunk_rows)
}

/// A buffer of `width` values per row (or, for a pass's partials, per chunk).
pub(crate) struct Strided<'a, T> {
    pub values: &'a mut [T],
    pub width: usize,
}

impl<'a, T> Strided<'a, T> {
    pub fn new(values: &'a mut [T], width: usize) -> Self {
        Self { values, width }
    }
}

/// The scratch of a pass: `len` values per chunk, from `single` when there is one chunk and
/// from the running thread's own buffer otherwise ([`with_thread_scratch`]).
pub(crate) struct Scratch<'a, T> {
    pub single: &'a mut Vec<T>,
    pub len: usize,
}

impl<'a, T> Scratch<'a, T> {
    pub fn new(single: &'a mut Vec<T>, len: usize) -> Self {
        Self { single, len }
    }
}

/// Runs `f(rows, state_rows, out_rows, partials, scratch)` once per chunk of `chunk_rows`
/// rows: sequentially when there is a single chunk (the common case for batches of tiny
/// problems, where a rayon fork-join per pass would dominate), in parallel otherwise.
/// `state` and `out` are split by rows, `partials` by chunks.
pub(crate) fn run_pass<T, F>(
    n_rows: usize,
    chunk_rows: usize,
    state: Strided<'_, T>,
    out: Strided<'_, T>,
    partials: Strided<'_, T>,
    scratch: Scratch<'_, T>,
    f: F,
) where
    T: Real,
    F: Fn(Range<usize>, &mut [T], &mut [T], &mut [T], &mut [T]) + Sync,
{
    let chunk_count = n_chunks(n_rows, chunk_rows);
    let (state_width, out_width, partial_width) = (state.width, out.width, partials.width);
    debug_assert!(state_width > 0 && out_width > 0 && partial_width > 0);
    debug_assert_eq!(state.values.len(), n_rows * state_width);
    debug_assert_eq!(out.values.len(), n_rows * out_width);
    debug_assert!(partials.values.len() >= chunk_count * partial_width);
    if chunk_count <= 1 {
        let buf = scratch.single;
        buf.clear();
        buf.resize(scratch.len, T::ZERO);
        dispatch(
            #[inline(always)]
            || {
                f(
                    0..n_rows,
                    state.values,
                    out.values,
                    &mut partials.values[..partial_width],
                    buf,
                )
            },
        );
        return;
    }
    state
        .values
        .par_chunks_mut(chunk_rows * state_width)
        .zip(out.values.par_chunks_mut(chunk_rows * out_width))
        .zip(partials.values[..chunk_count * partial_width].par_chunks_mut(partial_width))
        .enumerate()
        .for_each(|(chunk, ((state_rows, out_rows), partial))| {
            let first = chunk * chunk_rows;
            let rows = first..(first + chunk_rows).min(n_rows);
            with_thread_scratch(scratch.len, |buf| {
                dispatch(
                    #[inline(always)]
                    || f(rows, state_rows, out_rows, partial, buf),
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

/// `acc = Σ_c partials[c]` over the first `chunk_count` chunks, summed in chunk order.
pub(crate) fn reduce_partials<T: Real>(partials: &[T], chunk_count: usize, acc: &mut [T]) {
    let width = acc.len();
    acc.copy_from_slice(&partials[..width]);
    for chunk in 1..chunk_count {
        for (a, p) in acc
            .iter_mut()
            .zip(&partials[chunk * width..(chunk + 1) * width])
        {
            *a += *p;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_chunks_are_a_power_of_two_that_covers_the_rows() {
        for (n, chunk_rows) in [
            (7660, 408),
            (7660, 512),
            (1000, 100),
            (5, 4),
            (4096, 512),
            (1 << 20, 32),
        ] {
            let b = balanced(n, chunk_rows);
            let count = n_chunks(n, b);
            let case = format!("n={n} chunk_rows={chunk_rows}");
            assert!(count.is_power_of_two(), "{case}: {count} chunks of {b}");
            assert!(b * count >= n && b * (count - 1) < n, "{case}");
            // The nearest power of two to the count chunk_rows gives, so chunks stay about
            // chunk_rows rows.
            assert!(
                b * 3 >= chunk_rows * 2 && b * 2 <= chunk_rows * 3,
                "{case}: {b}"
            );
        }
        assert_eq!(balanced(300, 512), 512);
        assert_eq!(balanced(12, 1), 1, "12 rows cannot make 16 chunks");
    }
}
