//! The iteration rows of two plain-domain groups (SSPC's default weights), written with
//! explicit vectors: this loop is the whole cost of a call, and LLVM turns its row sums into
//! narrow shuffles. Rows of at most four vectors take `single_sweep`; longer rows take two
//! sweeps over a chunk, first every row's `g` and `h` steps into a scratch of slot values, then
//! the column sums (or the result rows), which need each row's new `h`.

use super::layout::StateLayout;
use super::rows::minmax_row;
use super::single_sweep::{fusable, pair_sums, single_sweep_chunk, Sink};
use crate::simd::{Real, Vector, VectorOp};

/// One iteration pass over a chunk of rows with two plain groups: per row the `g` and `h`
/// steps, then the row's contributions to the next column sums or its row of the result.
pub(super) struct TwoGroupChunk<'a, T> {
    /// The chunk's state rows ([`StateLayout`]): cached `E_0`, `E_1` (or `D`), then `h_0`, `h_1`.
    pub state: &'a mut [T],
    pub layout: StateLayout,
    /// K: values per row.
    pub k: usize,
    /// `f_0`, `f_1` (`[2, K]`).
    pub f: &'a [T],
    /// `f_1 / f_0` when the layout caches `D`, else empty.
    pub f_ratio: &'a [T],
    /// Slot counts `c_0`, `c_1`.
    pub counts: [T; 2],
    /// Scratch for the chunk's slot values, `[rows, 2, K]`.
    pub slots: &'a mut [T],
    /// The chunk's next column sums, `[2, K]`, accumulated.
    pub col_sums: &'a mut [T],
    /// In the last pass: where the result goes instead of the column sums.
    pub result: Option<ResultRows<'a, T>>,
}

/// The chunk's rows of the result `T = Σ_G top_G h_G q_G`, and their post-processing.
pub(super) struct ResultRows<'a, T> {
    pub rows: &'a mut [T],
    /// `top_G`: the number of the output's (last k) slots in each group.
    pub top_counts: [T; 2],
    pub minmax: bool,
}

/// The column scalings a two-group pass reads.
#[derive(Clone, Copy)]
pub(super) struct ColumnScales<'a, T> {
    pub f0: &'a [T],
    pub f1: &'a [T],
    /// `f_1 / f_0`, read only when the layout caches `D`.
    pub f_ratio: &'a [T],
}

impl<T: Real> VectorOp<T> for TwoGroupChunk<'_, T> {
    type Output = ();

    #[inline(always)]
    fn run<V: Vector<T>>(self) {
        let k = self.k;
        let (f0, f1) = self.f[..2 * k].split_at(k);
        let scales = ColumnScales {
            f0,
            f1,
            f_ratio: self.f_ratio,
        };
        if fusable::<T, V>(k) {
            let sink = match self.result {
                None => Sink::ColumnSums(&mut self.col_sums[..2 * k]),
                Some(result) => Sink::Result(result),
            };
            if self.layout.ratio {
                single_sweep_chunk::<T, V, true>(
                    self.state,
                    self.layout,
                    scales,
                    self.counts,
                    sink,
                    k,
                )
            } else {
                single_sweep_chunk::<T, V, false>(
                    self.state,
                    self.layout,
                    scales,
                    self.counts,
                    sink,
                    k,
                )
            }
            return;
        }
        if self.layout.ratio {
            update_chunk::<T, V, true>(self.state, self.slots, self.layout, scales, self.counts, k)
        } else {
            update_chunk::<T, V, false>(self.state, self.slots, self.layout, scales, self.counts, k)
        }
        match self.result {
            Some(result) => write_results(self.state, self.slots, self.layout, result, k),
            None => add_column_sums::<T, V>(self.state, self.slots, self.layout, self.col_sums, k),
        }
    }
}

/// The last pass's second sweep: each row's result `T = Σ_G top_G h_G q_G`, min-maxed.
#[inline(always)]
fn write_results<T: Real>(
    state: &[T],
    slots: &[T],
    layout: StateLayout,
    result: ResultRows<T>,
    k: usize,
) {
    let rows = state
        .chunks_exact(layout.stride)
        .zip(slots.chunks_exact(2 * k));
    for ((row_state, q), out_row) in rows.zip(result.rows.chunks_exact_mut(k)) {
        let (q0, q1) = q.split_at(k);
        let out_row = &mut out_row[..k];
        out_row.fill(T::ZERO);
        for (g, qg) in [q0, q1].into_iter().enumerate() {
            if result.top_counts[g] > T::ZERO {
                let coef = result.top_counts[g] * row_state[layout.scalars_at + g];
                for j in 0..k {
                    out_row[j] += coef * qg[j];
                }
            }
        }
        if result.minmax {
            minmax_row(out_row);
        }
    }
}

/// The second sweep of the other passes: column sums `p_G += Σ_rows h_G q_G`, a block of columns
/// at a time held in registers (accumulating through memory would chain every row's loads on
/// the previous stores).
#[inline(always)]
fn add_column_sums<T: Real, V: Vector<T>>(
    state: &[T],
    slots: &[T],
    layout: StateLayout,
    col_sums: &mut [T],
    k: usize,
) {
    const BLOCK: usize = 4;
    let lanes = V::LANES;
    let full = k - k % lanes;
    let (p0, p1) = col_sums[..2 * k].split_at_mut(k);
    let rows = || {
        state
            .chunks_exact(layout.stride)
            .map(|st| (st[layout.scalars_at], st[layout.scalars_at + 1]))
            .zip(slots.chunks_exact(2 * k))
    };
    let mut j0 = 0;
    while j0 < full {
        let nv = ((full - j0) / lanes).min(BLOCK);
        let mut acc = [[V::splat(T::ZERO); BLOCK]; 2];
        for ((h0, h1), q) in rows() {
            let (vh0, vh1) = (V::splat(h0), V::splat(h1));
            // A constant trip count with a guard (not `0..nv`) keeps `acc` in registers.
            #[allow(clippy::needless_range_loop)]
            for u in 0..BLOCK {
                if u < nv {
                    let j = j0 + u * lanes;
                    // SAFETY: q has length 2k and j + lanes <= full <= k.
                    unsafe {
                        acc[0][u] = V::load(q.as_ptr().add(j)).mul_add(vh0, acc[0][u]);
                        acc[1][u] = V::load(q.as_ptr().add(k + j)).mul_add(vh1, acc[1][u]);
                    }
                }
            }
        }
        for (u, (a0, a1)) in acc[0].iter().zip(&acc[1]).take(nv).enumerate() {
            let j = j0 + u * lanes;
            // SAFETY: p0 and p1 have length k.
            unsafe {
                let (pp0, pp1) = (p0.as_mut_ptr().add(j), p1.as_mut_ptr().add(j));
                V::load(pp0).add(*a0).store(pp0);
                V::load(pp1).add(*a1).store(pp1);
            }
        }
        j0 += nv * lanes;
    }
    for ((h0, h1), q) in rows() {
        for j in full..k {
            p0[j] += q[j] * h0;
            p1[j] += q[k + j] * h1;
        }
    }
}

/// The first sweep: the `g` and `h` steps of a chunk's rows, two rows at a time so that their
/// dependency chains (division, row sums) interleave. `RATIO` is the layout's `ratio`.
#[inline(always)]
fn update_chunk<T: Real, V: Vector<T>, const RATIO: bool>(
    state: &mut [T],
    slots: &mut [T],
    layout: StateLayout,
    f: ColumnScales<T>,
    counts: [T; 2],
    k: usize,
) {
    const ROWS: usize = 2;
    let (stride, two_k) = (layout.stride, 2 * k);
    let mut state_pairs = state.chunks_exact_mut(ROWS * stride);
    let mut slot_pairs = slots.chunks_exact_mut(ROWS * two_k);
    for (st, q) in (&mut state_pairs).zip(&mut slot_pairs) {
        let mut st = st.chunks_exact_mut(stride);
        let mut q = q.chunks_exact_mut(two_k);
        let st: [&mut [T]; ROWS] = std::array::from_fn(|_| st.next().unwrap());
        let q: [&mut [T]; ROWS] = std::array::from_fn(|_| q.next().unwrap());
        update_rows::<T, V, ROWS, RATIO>(st, q, f, counts, layout.scalars_at, k);
    }
    let rest = state_pairs.into_remainder().chunks_exact_mut(stride);
    for (st, q) in rest.zip(slot_pairs.into_remainder().chunks_exact_mut(two_k)) {
        update_rows::<T, V, 1, RATIO>([st], [q], f, counts, layout.scalars_at, k);
    }
}

/// The slot values `y_G = E_G f_G g` (after the g step) of lanes `j..j + LANES` of a row
/// whose cache `e` holds `[E_0, E_1]`, or `[D]` with `RATIO`, and `ch = [c_0 h_0, c_1 h_1]`.
///
/// # Safety
/// `e[0]` and `f.f_ratio` (with `RATIO`) or `e[0]`, `e[1]`, `f.f0`, `f.f1` (without) hold at
/// least `j + LANES` values.
#[inline(always)]
pub(super) unsafe fn slot_values<T: Real, V: Vector<T>, const RATIO: bool>(
    e: [&[T]; 2],
    f: ColumnScales<T>,
    ch: [T; 2],
    j: usize,
) -> (V, V) {
    if !RATIO {
        let v0 = V::load(e[0].as_ptr().add(j)).mul(V::load(f.f0.as_ptr().add(j)));
        let v1 = V::load(e[1].as_ptr().add(j)).mul(V::load(f.f1.as_ptr().add(j)));
        let den = V::splat(ch[1]).mul_add(v1, V::splat(ch[0]).mul(v0));
        let gi = den.recip();
        (v0.mul(gi), v1.mul(gi))
    } else {
        // y_0 = v_0 / (a v_0 + b v_1) = 1 / (a + b ρ) with ρ = v_1 / v_0 = D f_1 / f_0.
        let rho = V::load(e[0].as_ptr().add(j)).mul(V::load(f.f_ratio.as_ptr().add(j)));
        let y0 = V::splat(ch[1]).mul_add(rho, V::splat(ch[0])).recip();
        (y0, rho.mul(y0))
    }
}

/// A row's cached `[E_0, E_1]`, or with `RATIO` `[D, D]` (the second a stand-in never read).
#[inline(always)]
pub(super) fn cached_rows<T, const RATIO: bool>(cache: &[T], k: usize) -> [&[T]; 2] {
    [
        &cache[..k],
        if RATIO { &cache[..k] } else { &cache[k..2 * k] },
    ]
}

/// The g and h steps of `R` rows: writes each row's slot values `q_G = E_G f_G g` (`[2, K]`,
/// without the old `h_G` factor) and its new `h_G = 1 / Σ_a q_G`. `states[r]` is the row's
/// state block (cached `E_0`, `E_1`, or `D` with `RATIO`, and `h_0`, `h_1` at `h_at`).
#[inline(always)]
fn update_rows<T: Real, V: Vector<T>, const R: usize, const RATIO: bool>(
    states: [&mut [T]; R],
    slots: [&mut [T]; R],
    f: ColumnScales<T>,
    counts: [T; 2],
    h_at: usize,
    k: usize,
) {
    let lanes = V::LANES;
    let full = k - k % lanes;
    let f = ColumnScales {
        f0: &f.f0[..k],
        f1: &f.f1[..k],
        f_ratio: if RATIO { &f.f_ratio[..k] } else { f.f_ratio },
    };
    let mut rows = states.map(|st| {
        let (cache, h) = st.split_at_mut(h_at);
        (&*cache, h)
    });
    let e: [[&[T]; 2]; R] = std::array::from_fn(|r| cached_rows::<T, RATIO>(rows[r].0, k));
    let ch: [[T; 2]; R] =
        std::array::from_fn(|r| [counts[0] * rows[r].1[0], counts[1] * rows[r].1[1]]);
    for q in &slots {
        assert!(q.len() >= 2 * k);
    }
    let mut acc = [[V::splat(T::ZERO); 2]; R];
    let mut j = 0;
    while j < full {
        for r in 0..R {
            // SAFETY: e[r][g] and f0, f1 have length k, slots[r] at least 2k, j + lanes <= k.
            unsafe {
                let (y0, y1) = slot_values::<T, V, RATIO>(e[r], f, ch[r], j);
                y0.store(slots[r].as_mut_ptr().add(j));
                y1.store(slots[r].as_mut_ptr().add(k + j));
                acc[r][0] = acc[r][0].add(y0);
                acc[r][1] = acc[r][1].add(y1);
            }
        }
        j += lanes;
    }
    // Pairs are summed as the single-sweep passes sum them, so both give the same bits.
    let sums: [[T; 2]; R] = if R == 2 {
        let [a, b] = pair_sums(&acc[0], &acc[1]);
        std::array::from_fn(|r| [a, b][r])
    } else {
        std::array::from_fn(|r| acc[r].map(V::sum))
    };
    for r in 0..R {
        let [mut s0, mut s1] = sums[r];
        let (q0, q1) = slots[r].split_at_mut(k);
        for j in full..k {
            // The same formula one lane wide. SAFETY: every slice read holds k > j values.
            let (y0, y1) = unsafe { slot_values::<T, T::Single, RATIO>(e[r], f, ch[r], j) };
            (q0[j], q1[j]) = (y0.sum(), y1.sum());
            s0 += q0[j];
            s1 += q1[j];
        }
        // The new h is 1 / Σ_a E f g; the slot values after the h step are q · h_new.
        let h = &mut rows[r].1;
        h[0] = T::ONE / s0;
        h[1] = T::ONE / s1;
    }
}
