//! The reverse pass of two plain-domain groups (SSPC's default weights) on the forward's ratio
//! layout: the replay caches only `D = E_1 / E_0` per row, as the forward does, and each
//! reverse pass streams that cache once with a short, vectorised row update.
//!
//! In iteration `t` a row has `h^{t-1}_G` (before) and `h^t_G` (after), the column scalings
//! `f^t_G` and `ρ = D f^t_1 / f^t_0`. With `b_G = c_G h^{t-1}_G`, the `g` step's normalisation
//! `Σ_G b_G y_G = 1` leaves one free value per element, `β = b_0 y_0 = 1 / (1 + (b_1 / b_0) ρ)`,
//! and `β' = 1 − β = (b_1 / b_0) ρ β` (formed as that product, exact where `β` is near 1).
//! The plans are `B_G = β_G / c_G` after the `g` step and `C_G = ν_G β_G` after the `h` step,
//! with `ν_G = h^t_G / b_G`, `β_0 = β`, `β_1 = β'`.
//!
//! The adjoint entering the step (`backward.rs` writes it out step by step) is `u_G C_G`,
//! with `u_G = top_G ĝ` (the result's adjoint through min-max) in the last iteration, and
//! `u_G = −(φ̄^{t+1}_G / r) f^{t+1}_G / f^t_G` (the next `f` step) before it. Then
//!
//! * `η̄_G = p_G + ν_G Σ_a u_G β_G`, with `p_G` the previous pass's row partial;
//! * `α_G = ν_G (u_G − η̄_G)`, `δ = α_0 − α_1`, `γ̄ = α_1 + β δ`;
//! * the row adjoints of `L_G` are `±β β' δ`, so the scores' adjoint gains
//!   `(w_0 − w_1) β β' δ` (only the weight difference matters: a shift common to both groups
//!   cancels in the `g` step);
//! * the next pass's row partials are `p_G = −Σ_a γ̄ β_G`;
//! * the column partials of `φ̄^t` are `Σ_n ±β β' δ − u_G Σ_n ν_G β_G` (the `f` step term
//!   `u_G C_G` does not depend on `φ^t`), or `±Σ_n β β' δ` in the last iteration.
//!
//! So a pass keeps three column accumulators (`Σ β β' δ`, `Σ ν_0 β`, `Σ ν_1 β'`) and does about
//! twice the forward's arithmetic per element. The `f` step of iteration 1 (pass 0) needs
//! `E_0` itself, which it recomputes with one `exp` per element.

use super::backward::BackWorkspace;
use super::forward::{History, Sweep};
use super::layout::aligned_view;
use super::rows::constant_row;
use super::two_groups::{slot_values, ColumnScales};
use super::{Inputs, Normalize, Problem};
use crate::exec::chunks::{reduce_partials, run_pass, Scratch, Strided};
use crate::simd::{extremes, Real, Vector, VectorOp};
use std::ops::Range;

impl<T: Real> Problem<T> {
    /// [`Problem::backward`] for two plain groups.
    pub(super) fn backward_two_groups(
        &self,
        grad: &[T],
        input: Inputs<T>,
        out: &mut [T],
        bw: &mut BackWorkspace<T>,
    ) {
        let BackWorkspace {
            forward,
            history,
            col_adjoint,
            columns,
            ..
        } = bw;
        // The replay writes T into `out`, which the reverse passes then overwrite row by row.
        self.solve(input, out, forward, false, Some(&mut *history));
        if self.interrupt.requested() {
            return; // the replay stopped early
        }
        let sweep = Sweep::new(self, input, false);
        debug_assert!(sweep.layout.ratio);
        let (n, k, last) = (self.rows, self.anchors, self.n_iters);
        let n_chunks = sweep.chunking.n_chunks;
        for (buf, len) in [
            (&mut *col_adjoint, 2 * k),
            (&mut *columns, 3 * k),
            (&mut forward.col_sums, k),
            (&mut forward.chunk_sums, n_chunks * k),
        ] {
            buf.clear();
            buf.resize(len, T::ZERO);
        }
        let state = aligned_view(&mut forward.state, n * sweep.layout.stride);
        let (w, c, top) = (
            &self.groups.weights,
            &self.groups.counts,
            &self.groups.top_counts,
        );
        let shared = Shared {
            history,
            grad,
            rows: n,
            k,
            stride: sweep.layout.stride,
            last,
            p_at: sweep.layout.scalars_at,
            counts: [c[0], c[1]],
            top_counts: [top[0], top[1]],
            neg_dw: w[0] - w[1],
            minmax: self.normalize == Normalize::MinMax,
        };
        // β and β' of two rows, or (last iteration) of one row, then u_0, u_1, ĝ: `[K]` each.
        let scratch_len = 5 * k;
        for t in (0..=last).rev() {
            if self.interrupt.requested() {
                return;
            }
            if t == 0 {
                let bufs = (
                    &mut *state,
                    &mut *out,
                    &mut forward.chunk_sums[..],
                    &mut forward.scratch,
                );
                self.first_f_step(&sweep, history, col_adjoint, columns, bufs);
                break;
            }
            if t < last {
                next_f_columns(history, t, k, col_adjoint, columns);
            } else {
                let f = history.f(t, 2 * k);
                for j in 0..k {
                    columns[j] = f[k + j] / f[j];
                }
            }
            let cols: &[T] = columns;
            let pass = Pass {
                shared: &shared,
                t,
                fr: &cols[..k],
                u0: &cols[k..2 * k],
                u1: &cols[2 * k..],
            };
            run_pass(
                n,
                sweep.chunking.rows_per_chunk,
                Strided::new(&mut *state, sweep.layout.stride),
                Strided::new(&mut *out, k),
                Strided::new(&mut forward.chunk_sums, k),
                Scratch::new(&mut forward.scratch, scratch_len),
                #[inline(always)]
                |rows, state, out, parts, scratch| {
                    T::with_vector(ChunkOp {
                        pass: &pass,
                        rows,
                        state,
                        out,
                        parts,
                        scratch,
                    })
                },
            );
            reduce_partials(&forward.chunk_sums, n_chunks, &mut forward.col_sums);
            // φ̄^t_G / r = ±A / r + φ̄^{t+1}_G / r (the first term of φ̄^{t+1} = 0), A the
            // column sums of β β' δ: the f-step term's column sums are −φ̄^{t+1}, as the
            // column sums of C_G are r f^t / f^{t+1}.
            let (a, mass) = (&forward.col_sums, input.mass);
            let (adj0, adj1) = col_adjoint.split_at_mut(k);
            for j in 0..k {
                let x = a[j] / mass[j];
                adj0[j] += x;
                adj1[j] -= x;
            }
        }
    }

    /// Pass 0: the `f` step of iteration 1, whose plan is `A_G = E_G f^1_G` (`g = h = 1`), with
    /// `E_0 = exp(w_0 L)` recomputed and `E_1 = E_0 D`; then the `1/eps` of the scores' adjoint.
    fn first_f_step(
        &self,
        sweep: &Sweep<T>,
        history: &History<T>,
        col_adjoint: &[T],
        columns: &mut [T],
        bufs: (&mut [T], &mut [T], &mut [T], &mut Vec<T>),
    ) {
        // `partials` is unused: this pass sums no columns.
        let (state, out, partials, scratch) = bufs;
        let k = self.anchors;
        let (w, f1) = (&self.groups.weights, history.f(1, 2 * k));
        // columns <- w_G (φ̄_G / r) f^1_G, `[2, K]`.
        for x in 0..2 * k {
            columns[x] = w[x / k] * col_adjoint[x] * f1[x];
        }
        let (c0, c1) = columns[..2 * k].split_at(k);
        let (w0, inv_eps) = (w[0], self.inv_eps);
        run_pass(
            self.rows,
            sweep.chunking.rows_per_chunk,
            Strided::new(state, sweep.layout.stride),
            Strided::new(out, k),
            Strided::new(partials, 1),
            Scratch::new(scratch, k),
            #[inline(always)]
            |rows, state, out, _, logits| {
                let logits = &mut logits[..k];
                let rows = rows.zip(state.chunks_exact(sweep.layout.stride));
                for ((row, st), o) in rows.zip(out.chunks_exact_mut(k)) {
                    self.logits(sweep.input, row, logits);
                    first_f_row(logits, &st[..k], [c0, c1], [w0, inv_eps], o);
                }
            },
        );
    }
}

/// One row of pass 0: `o = (o − E_0 (c_0 + D c_1)) / eps` with `E_0 = exp(w_0 L)`; `scalars` is
/// `[w_0, 1/eps]`. (A function of its slices, so that LLVM knows they do not overlap.)
#[inline(always)]
fn first_f_row<T: Real>(logits: &[T], d: &[T], c: [&[T]; 2], scalars: [T; 2], o: &mut [T]) {
    let k = o.len();
    let (logits, d, c0, c1) = (&logits[..k], &d[..k], &c[0][..k], &c[1][..k]);
    let [w0, inv_eps] = scalars;
    for j in 0..k {
        let e0 = (w0 * logits[j]).exp_fast();
        o[j] = (o[j] - e0 * (c0[j] + d[j] * c1[j])) * inv_eps;
    }
}

/// Adjoint of `rows::minmax_row` (as `backward::minmax_row_backward`, with its sums in vector
/// registers): `x` holds the row before min-max, `g` the output's adjoint and receives the
/// input's. Ties at the min or max share their part equally.
#[inline(always)]
fn minmax_backward<T: Real, V: Vector<T>>(x: &[T], g: &mut [T]) {
    let k = g.len();
    let x = &x[..k];
    let (lo, hi) = extremes(x);
    if constant_row(lo, hi) {
        g.fill(T::ZERO);
        return;
    }
    let inv = T::ONE / (hi - lo);
    let full = k - k % V::LANES;
    let (vlo, vinv) = (V::splat(lo), V::splat(inv));
    let (mut sg, mut sgy) = (V::splat(T::ZERO), V::splat(T::ZERO));
    let mut j = 0;
    while j < full {
        // SAFETY: x and g hold k >= j + LANES values.
        unsafe {
            let gv = V::load(g.as_ptr().add(j));
            let y = V::load(x.as_ptr().add(j)).sub(vlo).mul(vinv);
            sg = sg.add(gv);
            sgy = gv.mul_add(y, sgy);
        }
        j += V::LANES;
    }
    let (mut sg, mut sgy) = (sg.sum(), sgy.sum());
    for j in full..k {
        sg += g[j];
        sgy += g[j] * ((x[j] - lo) * inv);
    }
    let (mut nlo, mut nhi) = (0usize, 0usize);
    for &xj in x {
        nlo += usize::from(xj == lo);
        nhi += usize::from(xj == hi);
    }
    // Σ g (y − 1) over the ties at the min, −Σ g y over those at the max.
    let glo = (sgy - sg) * inv / T::from_f64(nlo as f64);
    let ghi = -sgy * inv / T::from_f64(nhi as f64);
    for j in 0..k {
        let at_lo = if x[j] == lo { glo } else { T::ZERO };
        let at_hi = if x[j] == hi { ghi } else { T::ZERO };
        g[j] = g[j] * inv + at_lo + at_hi;
    }
}

/// Before reverse pass `t < T`: `f^t_1 / f^t_0` and `u_G = −(φ̄^{t+1}_G / r) f^{t+1}_G / f^t_G`
/// into `columns` (`[3, K]`).
fn next_f_columns<T: Real>(
    history: &History<T>,
    t: usize,
    k: usize,
    col_adjoint: &[T],
    columns: &mut [T],
) {
    let (f, f_next) = (history.f(t, 2 * k), history.f(t + 1, 2 * k));
    let (fr, u) = columns.split_at_mut(k);
    for j in 0..k {
        fr[j] = f[k + j] / f[j];
    }
    for x in 0..2 * k {
        u[x] = -col_adjoint[x] * (f_next[x] / f[x]);
    }
}

/// What every pass reads.
struct Shared<'a, T> {
    history: &'a History<T>,
    /// The result's adjoint, `[N, K]`.
    grad: &'a [T],
    rows: usize,
    k: usize,
    /// The state blocks' stride.
    stride: usize,
    /// T: the last iteration (and pass).
    last: usize,
    /// Offset of a row's two scalars in its state block: the replay's `h`, then the `p_G`.
    p_at: usize,
    counts: [T; 2],
    top_counts: [T; 2],
    /// `w_0 − w_1`.
    neg_dw: T,
    minmax: bool,
}

/// Reverse pass `t >= 1`: the `f` step of iteration `t + 1` (through `u`), then the `h` and `g`
/// steps of iteration `t`.
struct Pass<'a, T> {
    shared: &'a Shared<'a, T>,
    t: usize,
    /// `f^t_1 / f^t_0`.
    fr: &'a [T],
    /// `u_0`, `u_1` (passes before the last; unused in the last).
    u0: &'a [T],
    u1: &'a [T],
}

/// The pass over one chunk of rows. `parts` (`[K]`) receives the chunk's `Σ β β' δ`.
struct ChunkOp<'a, 'p, T> {
    pass: &'p Pass<'p, T>,
    rows: Range<usize>,
    state: &'a mut [T],
    out: &'a mut [T],
    parts: &'a mut [T],
    scratch: &'a mut [T],
}

/// A row's scalars in pass `t`.
#[derive(Clone, Copy)]
struct RowScalars<T> {
    /// `b_1 / b_0`.
    kq: T,
    /// `ν_G = h^t_G / b_G`.
    nu: [T; 2],
    /// `b_G = c_G h^{t-1}_G`.
    b: [T; 2],
}

impl<T: Real> VectorOp<T> for ChunkOp<'_, '_, T> {
    type Output = ();

    #[inline(always)]
    fn run<V: Vector<T>>(self) {
        let ChunkOp {
            pass,
            rows,
            state,
            out,
            parts,
            scratch,
        } = self;
        let sh = pass.shared;
        let (k, stride) = (sh.k, sh.stride);
        let acc = &mut parts[..k];
        acc.fill(T::ZERO);
        let n_rows = rows.len();
        if pass.t == sh.last {
            for (i, row) in rows.enumerate() {
                let st = &mut state[i * stride..(i + 1) * stride];
                let o = &mut out[i * k..(i + 1) * k];
                pass.top_row::<V>(row, st, o, acc, scratch);
            }
            return;
        }
        let mut i = 0;
        while i + 2 <= n_rows {
            pass.rows::<V, 2>(rows.start + i, state, out, acc, scratch, i);
            i += 2;
        }
        if i < n_rows {
            pass.rows::<V, 1>(rows.start + i, state, out, acc, scratch, i);
        }
    }
}

/// The horizontal sums of `R` rows' two lane accumulators (one reduction tree for a pair, as
/// the forward's `pair_sums`), plus their tails.
#[inline(always)]
fn row_sums<T: Real, V: Vector<T>, const R: usize>(
    lanes: [[V; 2]; R],
    tails: [[T; 2]; R],
) -> [[T; 2]; R] {
    let mut sums: [[T; 2]; R] = if R == 2 {
        let [a0, a1, b0, b1] = V::sum4([lanes[0][0], lanes[0][1], lanes[1][0], lanes[1][1]]);
        std::array::from_fn(|r| [[a0, a1], [b0, b1]][r])
    } else {
        std::array::from_fn(|r| lanes[r].map(V::sum))
    };
    for r in 0..R {
        sums[r][0] += tails[r][0];
        sums[r][1] += tails[r][1];
    }
    sums
}

impl<T: Real> Pass<'_, T> {
    /// `R` consecutive rows of a pass before the last, starting at row `row` of the problem
    /// and `i` of the chunk.
    #[inline(always)]
    fn rows<V: Vector<T>, const R: usize>(
        &self,
        row: usize,
        state: &mut [T],
        out: &mut [T],
        acc: &mut [T],
        scratch: &mut [T],
        i: usize,
    ) {
        let sh = self.shared;
        let (k, stride) = (sh.k, sh.stride);
        let mut states = state[i * stride..(i + R) * stride].chunks_exact_mut(stride);
        let mut outs = out[i * k..(i + R) * k].chunks_exact_mut(k);
        let mut betas = scratch[..2 * R * k].chunks_exact_mut(k);
        let st: [&mut [T]; R] = std::array::from_fn(|_| states.next().unwrap());
        let mut o: [&mut [T]; R] = std::array::from_fn(|_| outs.next().unwrap());
        let mut beta: [[&mut [T]; 2]; R] =
            std::array::from_fn(|_| [betas.next().unwrap(), betas.next().unwrap()]);
        let s: [RowScalars<T>; R] = std::array::from_fn(|r| sh.scalars(self.t, row + r));
        let mut lanes = [[V::splat(T::ZERO); 2]; R];
        let mut tails = [[T::ZERO; 2]; R];
        for r in 0..R {
            let [b, b1] = &mut beta[r];
            (lanes[r], tails[r]) =
                betas_and_sums::<T, V>(&st[r][..k], self.fr, s[r].kq, self.u0, self.u1, b, b1);
        }
        let sums = row_sums::<T, V, R>(lanes, tails);
        let p_at = sh.p_at;
        let terms: [RowTerms<T>; R] = std::array::from_fn(|r| {
            let p = [st[r][p_at], st[r][p_at + 1]];
            s[r].terms(p, sums[r], [self.u0, self.u1], sh.neg_dw)
        });
        let beta: [[&[T]; 2]; R] = std::array::from_fn(|r| [&*beta[r][0], &*beta[r][1]]);
        (lanes, tails) = finish::<T, V, R, false>(&terms, &beta, &mut o, acc);
        let g = row_sums::<T, V, R>(lanes, tails);
        for r in 0..R {
            st[r][p_at] = -g[r][0];
            st[r][p_at + 1] = -g[r][1];
        }
    }

    /// A row of the last pass: `u_G = top_G ĝ` from the result's adjoint, then the same terms.
    #[inline(always)]
    fn top_row<V: Vector<T>>(
        &self,
        row: usize,
        st: &mut [T],
        o: &mut [T],
        acc: &mut [T],
        scratch: &mut [T],
    ) {
        let sh = self.shared;
        let k = sh.k;
        let (beta, rest) = scratch.split_at_mut(k);
        let (beta1, rest) = rest.split_at_mut(k);
        let (u0, rest) = rest.split_at_mut(k);
        let (u1, g_row) = rest.split_at_mut(k);
        let s = sh.scalars(self.t, row);
        let h1 = sh.history.h(self.t, row, sh.rows, 2);
        let d = &st[..k];
        self.top_start::<V>(row, d, h1, s, beta, u0, u1, g_row);
        let (u0, u1) = (&*u0, &*u1);
        let (lanes, tails) = betas_and_sums::<T, V>(d, self.fr, s.kq, u0, u1, beta, beta1);
        let sums = row_sums::<T, V, 1>([lanes], [tails]);
        let terms = s.terms([T::ZERO; 2], sums[0], [u0, u1], sh.neg_dw);
        let (lanes, tails) = finish::<T, V, 1, true>(&[terms], &[[&*beta, &*beta1]], &mut [o], acc);
        let g = row_sums::<T, V, 1>(lanes, tails);
        st[sh.p_at] = -g[0][0];
        st[sh.p_at + 1] = -g[0][1];
    }

    /// The last iteration's start: the row's result `Σ_G top_G h_G y_G` exactly as the forward
    /// forms it (into `result`, scratch), its adjoint `ĝ` through min-max (into `g_row`), and
    /// `u_G = top_G ĝ` into `u0`, `u1`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn top_start<V: Vector<T>>(
        &self,
        row: usize,
        d: &[T],
        h1: &[T],
        s: RowScalars<T>,
        result: &mut [T],
        u0: &mut [T],
        u1: &mut [T],
        g_row: &mut [T],
    ) {
        let sh = self.shared;
        let k = sh.k;
        let scales = ColumnScales {
            f0: &[],
            f1: &[],
            f_ratio: &self.fr[..k],
        };
        let e = [&d[..k], &d[..k]];
        let coef = [sh.top_counts[0] * h1[0], sh.top_counts[1] * h1[1]];
        let full = k - k % V::LANES;
        let result = &mut result[..k];
        let mut j = 0;
        while j < full {
            // SAFETY: d, fr and result hold k >= j + LANES values.
            unsafe {
                let (y0, y1) = slot_values::<T, V, true>(e, scales, s.b, j);
                result_at::<T, V>(coef, sh.top_counts, y0, y1, result, j);
            }
            j += V::LANES;
        }
        for j in full..k {
            // SAFETY: as above, one lane wide.
            unsafe {
                let (y0, y1) = slot_values::<T, T::Single, true>(e, scales, s.b, j);
                result_at::<T, T::Single>(coef, sh.top_counts, y0, y1, result, j);
            }
        }
        let g_row = &mut g_row[..k];
        g_row.copy_from_slice(&sh.grad[row * k..(row + 1) * k]);
        if sh.minmax {
            minmax_backward::<T, V>(result, g_row);
        }
        let (u0, u1) = (&mut u0[..k], &mut u1[..k]);
        for j in 0..k {
            u0[j] = sh.top_counts[0] * g_row[j];
            u1[j] = sh.top_counts[1] * g_row[j];
        }
    }
}

/// `Σ_G top_G h_G y_G` of lanes `j..j + LANES` into `result` (the forward's products and sums).
///
/// # Safety
/// `result` holds at least `j + LANES` values.
#[inline(always)]
unsafe fn result_at<T: Real, W: Vector<T>>(
    coef: [T; 2],
    top_counts: [T; 2],
    y0: W,
    y1: W,
    result: &mut [T],
    j: usize,
) {
    let mut o = W::splat(T::ZERO);
    for (g, y) in [y0, y1].into_iter().enumerate() {
        if top_counts[g] > T::ZERO {
            o = o.add(W::splat(coef[g]).mul(y));
        }
    }
    o.store(result.as_mut_ptr().add(j));
}

/// `β`, `β'` of a row into `beta`, `beta1`, and the lanes and tail of `[Σ u_0 β, Σ u_1 β']`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn betas_and_sums<T: Real, V: Vector<T>>(
    d: &[T],
    fr: &[T],
    kq: T,
    u0: &[T],
    u1: &[T],
    beta: &mut [T],
    beta1: &mut [T],
) -> ([V; 2], [T; 2]) {
    let k = d.len();
    let (fr, u0, u1) = (&fr[..k], &u0[..k], &u1[..k]);
    let (beta, beta1) = (&mut beta[..k], &mut beta1[..k]);
    let full = k - k % V::LANES;
    let mut acc = [V::splat(T::ZERO); 2];
    let mut j = 0;
    // SAFETY (both loops): every slice holds k values and j + LANES <= k.
    while j < full {
        unsafe { beta_at::<T, V>(d, fr, kq, u0, u1, beta, beta1, &mut acc, j) };
        j += V::LANES;
    }
    let mut tail = [<T::Single as Vector<T>>::splat(T::ZERO); 2];
    for j in full..k {
        unsafe { beta_at::<T, T::Single>(d, fr, kq, u0, u1, beta, beta1, &mut tail, j) };
    }
    (acc, tail.map(|x| x.sum()))
}

/// One vector of [`betas_and_sums`].
///
/// # Safety
/// Every slice holds at least `j + LANES` values.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn beta_at<T: Real, W: Vector<T>>(
    d: &[T],
    fr: &[T],
    kq: T,
    u0: &[T],
    u1: &[T],
    beta: &mut [T],
    beta1: &mut [T],
    acc: &mut [W; 2],
    j: usize,
) {
    let rho = W::load(d.as_ptr().add(j)).mul(W::load(fr.as_ptr().add(j)));
    let m = rho.mul(W::splat(kq));
    let b = m.add(W::splat(T::ONE)).recip();
    let b1 = m.mul(b);
    b.store(beta.as_mut_ptr().add(j));
    b1.store(beta1.as_mut_ptr().add(j));
    acc[0] = W::load(u0.as_ptr().add(j)).mul_add(b, acc[0]);
    acc[1] = W::load(u1.as_ptr().add(j)).mul_add(b1, acc[1]);
}

impl<T: Real> Shared<'_, T> {
    /// Row `row`'s scalars in pass `t`.
    #[inline(always)]
    fn scalars(&self, t: usize, row: usize) -> RowScalars<T> {
        let h0 = self.history.h(t - 1, row, self.rows, 2);
        let h1 = self.history.h(t, row, self.rows, 2);
        let b = [self.counts[0] * h0[0], self.counts[1] * h0[1]];
        let inv = [T::ONE / b[0], T::ONE / b[1]];
        RowScalars {
            kq: b[1] * inv[0],
            nu: [h1[0] * inv[0], h1[1] * inv[1]],
            b,
        }
    }
}

impl<T: Real> RowScalars<T> {
    /// The row's [`RowTerms`] from its partials `p` and `[Σ u_0 β, Σ u_1 β']`.
    #[inline(always)]
    fn terms<'r>(&self, p: [T; 2], sums: [T; 2], u: [&'r [T]; 2], neg_dw: T) -> RowTerms<'r, T> {
        let eta = [p[0] + self.nu[0] * sums[0], p[1] + self.nu[1] * sums[1]];
        RowTerms {
            u,
            nu: self.nu,
            neg_nu_eta: [-(self.nu[0] * eta[0]), -(self.nu[1] * eta[1])],
            neg_dw,
        }
    }
}

/// The rest of a row once its `η̄` is known.
struct RowTerms<'r, T> {
    u: [&'r [T]; 2],
    nu: [T; 2],
    /// `−ν_G η̄_G`.
    neg_nu_eta: [T; 2],
    /// `w_0 − w_1`.
    neg_dw: T,
}

/// Adds `R` rows' terms to the scores' adjoint `o` (writes them, in the last iteration, `TOP`)
/// and their `β β' δ` to `acc`; returns the lanes and tails of each row's `[Σ γ̄ β, Σ γ̄ β']`.
#[inline(always)]
fn finish<T: Real, V: Vector<T>, const R: usize, const TOP: bool>(
    terms: &[RowTerms<T>; R],
    beta: &[[&[T]; 2]; R],
    o: &mut [&mut [T]; R],
    acc: &mut [T],
) -> ([[V; 2]; R], [[T; 2]; R]) {
    let k = acc.len();
    let full = k - k % V::LANES;
    let mut g = [[V::splat(T::ZERO); 2]; R];
    let mut j = 0;
    while j < full {
        // SAFETY: every slice holds k values and j + LANES <= k.
        unsafe { terms_at::<T, V, R, TOP>(terms, beta, o, acc, &mut g, j) };
        j += V::LANES;
    }
    let mut tail = [[<T::Single as Vector<T>>::splat(T::ZERO); 2]; R];
    for j in full..k {
        // SAFETY: as above, one lane wide.
        unsafe { terms_at::<T, T::Single, R, TOP>(terms, beta, o, acc, &mut tail, j) };
    }
    (g, tail.map(|t| t.map(|x| x.sum())))
}

/// One vector of [`finish`].
///
/// # Safety
/// Every slice holds at least `j + LANES` values.
#[inline(always)]
unsafe fn terms_at<T: Real, W: Vector<T>, const R: usize, const TOP: bool>(
    terms: &[RowTerms<T>; R],
    beta: &[[&[T]; 2]; R],
    o: &mut [&mut [T]; R],
    acc: &mut [T],
    g: &mut [[W; 2]; R],
    j: usize,
) {
    let pa = acc.as_mut_ptr().add(j);
    let mut a = W::load(pa);
    for r in 0..R {
        let t = &terms[r];
        let ld = |x: &[T]| W::load(x.as_ptr().add(j));
        let (b, b1) = (ld(beta[r][0]), ld(beta[r][1]));
        let a0 = ld(t.u[0]).mul_add(W::splat(t.nu[0]), W::splat(t.neg_nu_eta[0]));
        let a1 = ld(t.u[1]).mul_add(W::splat(t.nu[1]), W::splat(t.neg_nu_eta[1]));
        let delta = a0.sub(a1);
        let qd = b.mul(b1).mul(delta);
        let po = o[r].as_mut_ptr().add(j);
        let neg_dw = W::splat(t.neg_dw);
        if TOP {
            qd.mul(neg_dw).store(po);
        } else {
            qd.mul_add(neg_dw, W::load(po)).store(po);
        }
        let gamma = b.mul_add(delta, a1);
        g[r][0] = gamma.mul_add(b, g[r][0]);
        g[r][1] = gamma.mul_add(b1, g[r][1]);
        a = a.add(qd);
    }
    a.store(pa);
}
