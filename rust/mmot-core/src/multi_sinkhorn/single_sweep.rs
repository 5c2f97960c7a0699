//! Two-group iteration rows in a single sweep, for rows of at most four vectors (SSPC's K = 64
//! in f32 with AVX-512): a row's slot values stay in registers while its new `h` is formed, and
//! go straight into the column sums or the result row, instead of through a scratch that a
//! second sweep reads back. Bitwise the same sums and results as the two sweeps of
//! `two_groups`.

use super::layout::StateLayout;
use super::rows::constant_row;
use super::two_groups::{cached_rows, slot_values, ColumnScales, ResultRows};
use crate::simd::{Real, Vector};

/// Whether rows of `k` values take [`single_sweep_chunk`]: whole vectors, at most four of them.
#[inline(always)]
pub(super) fn fusable<T: Real, V: Vector<T>>(k: usize) -> bool {
    k.is_multiple_of(V::LANES) && k / V::LANES <= 4
}

/// Where a single-sweep pass puts each row's slot values after its h step.
pub(super) enum Sink<'a, T> {
    /// Added to the column sums (`[2, K]`).
    ColumnSums(&'a mut [T]),
    /// The last pass: the chunk's rows of the result.
    Result(ResultRows<'a, T>),
}

/// One pass over a chunk's rows (their state blocks in `state`) in a single sweep.
#[inline(always)]
pub(super) fn single_sweep_chunk<T: Real, V: Vector<T>, const RATIO: bool>(
    state: &mut [T],
    layout: StateLayout,
    f: ColumnScales<T>,
    counts: [T; 2],
    sink: Sink<T>,
    k: usize,
) {
    let rows = Rows {
        layout,
        f,
        counts,
        k,
    };
    match k / V::LANES {
        1 => rows.sweep::<V, RATIO, 1>(state, sink),
        2 => rows.sweep::<V, RATIO, 2>(state, sink),
        3 => rows.sweep::<V, RATIO, 3>(state, sink),
        4 => rows.sweep::<V, RATIO, 4>(state, sink),
        _ => unreachable!("single_sweep_chunk takes rows of one to four vectors"),
    }
}

/// What every row of a single-sweep pass reads.
#[derive(Clone, Copy)]
struct Rows<'a, T> {
    layout: StateLayout,
    f: ColumnScales<'a, T>,
    counts: [T; 2],
    k: usize,
}

impl<T: Real> Rows<'_, T> {
    /// The rows of [`single_sweep_chunk`], two at a time: a row's reductions and `1 / row sum`
    /// wait on a long dependency chain, and the slot values of an independent row fill it.
    #[inline(always)]
    fn sweep<V: Vector<T>, const RATIO: bool, const NV: usize>(
        self,
        state: &mut [T],
        sink: Sink<T>,
    ) {
        let k = self.k;
        let rows = Rows {
            f: ColumnScales {
                f0: &self.f.f0[..k],
                f1: &self.f.f1[..k],
                f_ratio: if RATIO {
                    &self.f.f_ratio[..k]
                } else {
                    self.f.f_ratio
                },
            },
            ..self
        };
        match sink {
            Sink::ColumnSums(col_sums) => rows.into_column_sums::<V, RATIO, NV>(state, col_sums),
            Sink::Result(result) => rows.into_results::<V, RATIO, NV>(state, result),
        }
    }

    #[inline(always)]
    fn into_column_sums<V: Vector<T>, const RATIO: bool, const NV: usize>(
        self,
        state: &mut [T],
        col_sums: &mut [T],
    ) {
        let (k, stride, h_at) = (self.k, self.layout.stride, self.layout.scalars_at);
        let mut acc = [[V::splat(T::ZERO); NV]; 2];
        let mut pairs = state.chunks_exact_mut(2 * stride);
        for pair in &mut pairs {
            let (a, b) = pair.split_at_mut(stride);
            let (ya, yb) = (self.slots::<V, RATIO, NV>(a), self.slots::<V, RATIO, NV>(b));
            let [sa, sb] = pair_sums(&ya.1, &yb.1);
            finish_row(&mut a[h_at..h_at + 2], ya.0, sa, &mut acc);
            finish_row(&mut b[h_at..h_at + 2], yb.0, sb, &mut acc);
        }
        for st in pairs.into_remainder().chunks_exact_mut(stride) {
            let (y, row_sums) = self.slots::<V, RATIO, NV>(st);
            finish_row(&mut st[h_at..h_at + 2], y, row_sums.map(V::sum), &mut acc);
        }
        for (g, sums) in col_sums.chunks_exact_mut(k).enumerate() {
            for (u, a) in acc[g].iter().enumerate() {
                // SAFETY: sums holds k = NV * LANES values.
                unsafe {
                    let at = sums.as_mut_ptr().add(u * V::LANES);
                    V::load(at).add(*a).store(at);
                }
            }
        }
    }

    #[inline(always)]
    fn into_results<V: Vector<T>, const RATIO: bool, const NV: usize>(
        self,
        state: &mut [T],
        result: ResultRows<T>,
    ) {
        let (k, stride, h_at) = (self.k, self.layout.stride, self.layout.scalars_at);
        let ResultRows {
            rows,
            top_counts,
            minmax,
        } = result;
        let paired = state.len() / stride / 2 * 2;
        let (state, state_rest) = state.split_at_mut(paired * stride);
        let (rows, rows_rest) = rows.split_at_mut(paired * k);
        let pairs = state
            .chunks_exact_mut(2 * stride)
            .zip(rows.chunks_exact_mut(2 * k));
        for (pair, out_rows) in pairs {
            let (a, b) = pair.split_at_mut(stride);
            let (out_a, out_b) = out_rows.split_at_mut(k);
            let (ya, yb) = (self.slots::<V, RATIO, NV>(a), self.slots::<V, RATIO, NV>(b));
            let [sa, sb] = pair_sums(&ya.1, &yb.1);
            output_row(&mut a[h_at..h_at + 2], ya.0, sa, top_counts, minmax, out_a);
            output_row(&mut b[h_at..h_at + 2], yb.0, sb, top_counts, minmax, out_b);
        }
        let rest = state_rest
            .chunks_exact_mut(stride)
            .zip(rows_rest.chunks_exact_mut(k));
        for (st, out_row) in rest {
            let (y, row_sums) = self.slots::<V, RATIO, NV>(st);
            let sums = row_sums.map(V::sum);
            output_row(
                &mut st[h_at..h_at + 2],
                y,
                sums,
                top_counts,
                minmax,
                out_row,
            );
        }
    }

    /// A row's slot values `y_G` after the g step (`NV` vectors per group, in registers) and
    /// their lane-wise row sums.
    #[inline(always)]
    fn slots<V: Vector<T>, const RATIO: bool, const NV: usize>(
        &self,
        row_state: &[T],
    ) -> ([[V; NV]; 2], [V; 2]) {
        let h_at = self.layout.scalars_at;
        let e = cached_rows::<T, RATIO>(&row_state[..h_at], self.k);
        let c = self.counts;
        let ch = [c[0] * row_state[h_at], c[1] * row_state[h_at + 1]];
        let mut y = [[V::splat(T::ZERO); NV]; 2];
        let mut row_sums = [V::splat(T::ZERO); 2];
        let [y_0, y_1] = &mut y;
        for (u, (y0, y1)) in y_0.iter_mut().zip(y_1).enumerate() {
            // SAFETY: every slice read holds k = NV * LANES values.
            (*y0, *y1) = unsafe { slot_values::<T, V, RATIO>(e, self.f, ch, u * V::LANES) };
            row_sums[0] = row_sums[0].add(*y0);
            row_sums[1] = row_sums[1].add(*y1);
        }
        (y, row_sums)
    }
}

/// The row sums `[[Σ y_0, Σ y_1]; 2]` of a pair of rows from their lane-wise sums, in one
/// reduction tree. Every pass pairs rows the same way, from the start of each chunk.
#[inline(always)]
pub(super) fn pair_sums<T: Real, V: Vector<T>>(a: &[V; 2], b: &[V; 2]) -> [[T; 2]; 2] {
    let [a0, a1, b0, b1] = V::sum4([a[0], a[1], b[0], b[1]]);
    [[a0, a1], [b0, b1]]
}

/// Sets a row's new `h_G = 1 / Σ_a E f g` (`sums` holds the two row sums) and adds its slot
/// values after the h step, `y_G · h_G`, to the column sums `acc`.
#[inline(always)]
fn finish_row<T: Real, V: Vector<T>, const NV: usize>(
    h: &mut [T],
    y: [[V; NV]; 2],
    sums: [T; 2],
    acc: &mut [[V; NV]; 2],
) {
    for g in 0..2 {
        h[g] = T::ONE / sums[g];
        let hv = V::splat(h[g]);
        for (a, yv) in acc[g].iter_mut().zip(&y[g]) {
            *a = yv.mul_add(hv, *a);
        }
    }
}

/// The last pass's [`finish_row`]: sets the row's new `h_G` and writes its result
/// `T = Σ_G top_G h_G y_G` (the same products and sums as the two-sweep output), min-maxed.
#[inline(always)]
fn output_row<T: Real, V: Vector<T>, const NV: usize>(
    h: &mut [T],
    y: [[V; NV]; 2],
    sums: [T; 2],
    top_counts: [T; 2],
    minmax: bool,
    out_row: &mut [T],
) {
    let mut o = [V::splat(T::ZERO); NV];
    for g in 0..2 {
        h[g] = T::ONE / sums[g];
        if top_counts[g] > T::ZERO {
            let coef = V::splat(top_counts[g] * h[g]);
            for (ov, yv) in o.iter_mut().zip(&y[g]) {
                *ov = ov.add(coef.mul(*yv));
            }
        }
    }
    if minmax {
        // minmax_row on the registers: the same (x - lo) / (hi - lo), and zeros for a constant row.
        let (lo, hi) = o[1..]
            .iter()
            .fold((o[0], o[0]), |(l, h), v| (l.min(*v), h.max(*v)));
        let (lo, hi) = (lo.reduce_min(), hi.reduce_max());
        let degenerate = constant_row(lo, hi);
        let (l, d) = (V::splat(lo), V::splat(hi - lo));
        for ov in &mut o {
            *ov = if degenerate {
                V::splat(T::ZERO)
            } else {
                ov.sub(l).div(d)
            };
        }
    }
    let out_row = &mut out_row[..NV * V::LANES];
    for (u, ov) in o.iter().enumerate() {
        // SAFETY: out_row holds NV * LANES values.
        unsafe { ov.store(out_row.as_mut_ptr().add(u * V::LANES)) };
    }
}
