//! The streaming solver of one problem, in either domain (the algorithm is described in
//! [`super`]). The backward replays it with a [`History`] to record the potentials.

use super::rows::{chunk_exp, log_first_pass, LogStep, PlainStep, Step};
use super::{Input, Problem};
use crate::domain::{use_log_domain, LogDomain};
use crate::exec::chunks::{n_chunks, reduce_partials, rows_per_chunk, run_pass, Scratch, Strided};
use crate::exec::column_stats::chunk_col_range;
use crate::simd::{dispatch, Real};

/// Per-worker buffers reused across the problems of a batch (a batch of 65536 tiny problems
/// would otherwise spend its time in the allocator).
#[derive(Default)]
pub(super) struct Workspace<T> {
    /// Per-row state: u (plain) or a = log u (log domain), which the backward's replay records.
    pub state: Vec<T>,
    pub partials: Vec<T>,
    /// Column sums reduced over the chunks.
    pub acc: Vec<T>,
    /// v (plain) or b = log v (log domain).
    pub col_potential: Vec<T>,
    pub scratch: Vec<T>,
    /// Plain domain, per row chunk: `exp((chunk column max − column max)/eps)`, the factors
    /// that take the chunk's cached `E` to the common scale `exp((S − column max)/eps)`.
    pub corr: Vec<T>,
}

impl<T: Real> Workspace<T> {
    fn prepare(&mut self, n: usize, k: usize, chunk_count: usize) {
        self.state.clear();
        self.state.resize(n, T::ONE);
        self.partials.clear();
        // Pass 0 of the plain domain keeps three values per column and chunk.
        self.partials.resize(chunk_count * 3 * k, T::ZERO);
        self.acc.clear();
        self.acc.resize(k, T::ZERO);
        self.col_potential.clear();
        self.col_potential.resize(k, T::ZERO);
    }
}

/// Potentials of every iteration of one problem, recorded by the forward replay of the
/// backward: `row[t]` is `u_t` (or `log u_t`) for `t = 0..=T`, `col[t-1]` is `v_t` (or
/// `log v_t`) for `t = 1..=T`.
#[derive(Default)]
pub(super) struct History<T> {
    pub row: Vec<T>,
    pub col: Vec<T>,
}

impl<T: Real> History<T> {
    fn start(&mut self, n: usize, k: usize, iters: usize, row0: T) {
        self.row.clear();
        self.row.resize((iters + 1) * n, T::ZERO);
        self.row[..n].fill(row0);
        self.col.clear();
        self.col.resize(iters * k, T::ZERO);
    }
}

impl<T: Real> Problem<T> {
    /// Fills `cmax` and returns the problem's largest column range (NaN for a non-finite
    /// score). With `auto`, stops after the first pass if that range calls for the log domain.
    /// With `hist`, records the potentials of every iteration but the last `u_T` and leaves the
    /// cached `E` (and `ws.corr`) instead of writing the plan (the backward's forward replay,
    /// whose first reverse pass makes the last row step).
    pub(super) fn solve_plain(
        &self,
        input: Input<'_, T>,
        cmax: &mut [T],
        out: &mut [T],
        ws: &mut Workspace<T>,
        mut hist: Option<&mut History<T>>,
        auto: bool,
    ) -> f64 {
        let (n, k, inv_eps) = (self.n, self.k, self.inv_eps);
        let (s, r, c) = (input.scores, input.row_mass, input.col_mass);
        let chunk_rows = rows_per_chunk(k);
        let chunk_count = n_chunks(n, chunk_rows);
        ws.prepare(n, k, chunk_count);
        let Workspace {
            state,
            partials,
            acc,
            col_potential: v,
            scratch,
            corr,
        } = ws;

        // Pass 0 (u = 1): per chunk, the column max and min of its rows (read from memory
        // once), then E = exp((S − chunk column max)/eps) of the same rows (now in cache),
        // cached in `out`, and its column sums. The scores are read once in all.
        run_pass(
            n,
            chunk_rows,
            Strided::new(state, 1),
            Strided::new(out, k),
            Strided::new(partials, 3 * k),
            Scratch::new(scratch, k),
            #[inline(always)]
            |rows, _u, o, part, nf| {
                let (mx, rest) = part.split_at_mut(k);
                let (mn, sums) = rest.split_at_mut(k);
                let s = &s[rows.start * k..rows.end * k];
                chunk_col_range(s, k, mx, mn, nf);
                chunk_exp(s, k, mx, inv_eps, o, sums);
            },
        );
        let range = dispatch(
            #[inline(always)]
            || merge_pass0(partials, chunk_count, k, inv_eps, cmax, corr, acc),
        );
        if auto && use_log_domain::<T>(LogDomain::Auto, range / self.eps) {
            return range;
        }
        for j in 0..k {
            v[j] = c[j] / acc[j];
        }

        if let Some(h) = hist.as_deref_mut() {
            h.start(n, k, self.n_iters, T::ONE);
        }
        for it in 0..self.n_iters {
            if self.interrupt.requested() {
                break;
            }
            let last = it + 1 == self.n_iters;
            if let Some(h) = hist.as_deref_mut() {
                h.col[it * k..(it + 1) * k].copy_from_slice(v);
                if last {
                    // The backward's first reverse pass makes the last row step itself.
                    break;
                }
            }
            let step = PlainStep {
                k,
                chunk_rows,
                row_mass: r,
                v,
                corr,
                step: if last { Step::Plan } else { Step::ColumnSums },
            };
            run_pass(
                n,
                chunk_rows,
                Strided::new(state, 1),
                Strided::new(out, k),
                Strided::new(partials, k),
                Scratch::new(scratch, k),
                #[inline(always)]
                |rows, u, o, p, w| step.chunk(rows, u, o, p, w),
            );
            if let Some(h) = hist.as_deref_mut() {
                h.row[(it + 1) * n..(it + 2) * n].copy_from_slice(state);
            }
            if !last {
                reduce_partials(partials, chunk_count, acc);
                for j in 0..k {
                    v[j] = c[j] / acc[j];
                }
            }
        }
        range
    }

    /// With `hist`, records the log potentials of every iteration (the plan is still written).
    pub(super) fn solve_log(
        &self,
        input: Input<'_, T>,
        cmax: &[T],
        out: &mut [T],
        ws: &mut Workspace<T>,
        mut hist: Option<&mut History<T>>,
    ) {
        let (n, k, inv_eps) = (self.n, self.k, self.inv_eps);
        let (s, r, c) = (input.scores, input.row_mass, input.col_mass);
        let chunk_rows = rows_per_chunk(k);
        let chunk_count = n_chunks(n, chunk_rows);
        ws.prepare(n, k, chunk_count);
        let Workspace {
            state,
            partials,
            acc,
            col_potential: bpot,
            scratch,
            corr: _,
        } = ws;

        // Pass 0 (a = 0): column log-sum-exp of L = (S - colmax)/eps. L <= 0 with a 0 in every
        // column, so the plain sum of exp(L) lies in [1, n] and needs no further shift.
        run_pass(
            n,
            chunk_rows,
            Strided::new(state, 1),
            Strided::new(out, k),
            Strided::new(partials, k),
            Scratch::new(scratch, 0),
            #[inline(always)]
            |rows, a, _o, p, _| log_first_pass(s, &cmax[..k], inv_eps, rows, a, p),
        );
        reduce_partials(partials, chunk_count, acc);
        for j in 0..k {
            bpot[j] = c[j].ln() - acc[j].ln();
        }

        if let Some(h) = hist.as_deref_mut() {
            h.start(n, k, self.n_iters, T::ZERO);
        }
        for it in 0..self.n_iters {
            if self.interrupt.requested() {
                break;
            }
            let last = it + 1 == self.n_iters;
            if let Some(h) = hist.as_deref_mut() {
                h.col[it * k..(it + 1) * k].copy_from_slice(bpot);
            }
            let step = LogStep {
                k,
                inv_eps,
                scores: s,
                cmax,
                row_mass: r,
                b: bpot,
                last,
            };
            run_pass(
                n,
                chunk_rows,
                Strided::new(state, 1),
                Strided::new(out, k),
                Strided::new(partials, k),
                Scratch::new(scratch, k),
                #[inline(always)]
                |rows, a, o, p, t| step.chunk(rows, a, o, p, t),
            );
            if let Some(h) = hist.as_deref_mut() {
                h.row[(it + 1) * n..(it + 2) * n].copy_from_slice(state);
            }
            if !last {
                reduce_partials(partials, chunk_count, acc);
                // b_new = log c - LSE_n(L + a) = b + log(c / colsum(P)).
                for j in 0..k {
                    bpot[j] += (c[j] / acc[j]).ln();
                }
            }
        }
    }
}

/// Merges pass 0's per-chunk `[max | min | sums]` in chunk order: the column max `cmax`, the
/// factors `corr` from each chunk's scale to the common one, and the column sums of the
/// common-scale `E` (`acc`). Returns the largest column range, NaN if a score is not finite.
#[inline(always)]
fn merge_pass0<T: Real>(
    parts: &[T],
    chunk_count: usize,
    k: usize,
    inv_eps: T,
    cmax: &mut [T],
    corr: &mut Vec<T>,
    acc: &mut [T],
) -> f64 {
    let (cmax, cmin) = (&mut cmax[..k], &mut acc[..k]);
    cmax.fill(T::NEG_INFINITY);
    cmin.fill(T::INFINITY);
    let mut finite = true;
    for p in parts.chunks_exact(3 * k).take(chunk_count) {
        let (mx, mn) = (&p[..k], &p[k..2 * k]);
        for j in 0..k {
            cmax[j] = cmax[j].fmax(mx[j]);
            cmin[j] = cmin[j].fmin(mn[j]);
        }
        // A chunk's NaN min would not survive `fmin`; look for it here.
        finite &= mn.iter().all(|x| !x.to_f64().is_nan());
    }
    let range = (0..k).fold(0.0f64, |r, j| r.max((cmax[j] - cmin[j]).to_f64()));
    corr.clear();
    corr.resize(chunk_count * k, T::ZERO);
    let acc = cmin;
    acc.fill(T::ZERO);
    for (p, f) in parts.chunks_exact(3 * k).zip(corr.chunks_exact_mut(k)) {
        let (mx, sums, f) = (&p[..k], &p[2 * k..3 * k], &mut f[..k]);
        for j in 0..k {
            f[j] = ((mx[j] - cmax[j]) * inv_eps).exp_fast();
            acc[j] += sums[j] * f[j];
        }
    }
    if finite {
        range
    } else {
        f64::NAN
    }
}

/// The larger of two column ranges, NaN if either is (a reduction over problems).
pub(super) fn max_range(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}
