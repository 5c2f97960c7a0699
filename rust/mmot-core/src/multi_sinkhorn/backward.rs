//! The vector-Jacobian product of Multi-SK with respect to the scores, through the unrolled
//! iteration and the min-max step (`docs/gradients.md` gives the adjoints).
//!
//! In log form, with `L_G = w_G S / eps`, iteration `t` is
//! `φ_G = log r − LSE_n(L_G + γ + η_G)`, `γ = −log Σ_G c_G exp(L_G + φ_G + η_G)`,
//! `η_G = −LSE_a(L_G + γ + φ_G)`, with the plans `A_G`, `B_G`, `C_G` after each step. Each
//! step's adjoint is its input adjoint times minus the (c-weighted) softmax, i.e. the plan of
//! that step. The forward is replayed once, recording `f_G` and `h_G` per iteration
//! (`O(T·G·(N + K))`); `g` is recomputed per row. Reverse pass `t` does, for each row: the `f`
//! step of iteration `t + 1` (needs the finished column adjoint `φ̄^{t+1}`), then the `h` and
//! `g` steps of iteration `t`, which are row-local and yield the column partials of `φ̄^t`.
//! That is `T + 1` streaming passes. Two plain groups (SSPC's weights) take
//! `two_groups_backward` instead: the same passes on the forward's `D = E_1 / E_0` cache, with
//! the steps' adjoints folded into a few terms per element.

use super::forward::{History, Sweep, Workspace};
use super::layout::aligned_view;
use super::rows::{constant_row, PerGroup};
use super::{Inputs, Normalize, Problem};
use crate::exec::chunks::reduce_partials;
use crate::exec::spare::{vec_bytes, Footprint};
use crate::simd::{extremes, sum, Real};
use std::ops::Range;

/// The buffers of one problem's backward, kept between calls (see `crate::spare`).
#[derive(Default)]
pub(super) struct BackWorkspace<T> {
    /// The replay's workspace; its state blocks then hold the rows' `η̄` partials.
    pub forward: Workspace<T>,
    pub history: History<T>,
    /// `φ̄_G / r`: the column adjoint of the last finished pass over the masses, `[G, K]`.
    pub col_adjoint: Vec<T>,
    /// `ρ_G = f_G^{t+1} / f_G^t`, `[G, K]`.
    pub f_growth: Vec<T>,
    /// The column values of a two-group reverse pass (`two_groups_backward`), `[3, K]`.
    pub columns: Vec<T>,
}

impl<T: Real> Footprint for BackWorkspace<T> {
    fn bytes(&self) -> usize {
        let BackWorkspace {
            forward,
            history,
            col_adjoint,
            f_growth,
            columns,
        } = self;
        forward.bytes()
            + history.bytes()
            + vec_bytes(col_adjoint)
            + vec_bytes(f_growth)
            + vec_bytes(columns)
    }
}

impl<T: Real> Problem<T> {
    /// The gradient of one problem's result (`grad`, `[N, K]`) with respect to its scores,
    /// into `out`.
    pub(super) fn backward(
        &self,
        grad: &[T],
        input: Inputs<T>,
        out: &mut [T],
        bw: &mut BackWorkspace<T>,
        log: bool,
    ) {
        if !log && self.groups.len() == 2 {
            return self.backward_two_groups(grad, input, out, bw);
        }
        let BackWorkspace {
            forward,
            history,
            col_adjoint,
            f_growth,
            ..
        } = bw;
        // The replay writes T into `out`, which the reverse passes then overwrite row by row.
        self.solve(input, out, forward, log, Some(&mut *history));
        if self.interrupt.requested() {
            return; // the replay stopped early
        }
        let sweep = Sweep::new(self, input, log);
        let group_cols = sweep.group_cols();
        for buf in [&mut *col_adjoint, &mut *f_growth] {
            buf.clear();
            buf.resize(group_cols, T::ZERO);
        }
        let reverse = Reverse {
            sweep,
            grad,
            history,
            weights: &self.groups.weights,
        };
        let Workspace {
            state,
            chunk_sums,
            col_sums,
            scratch,
            ..
        } = forward;
        let state = aligned_view(state, self.rows * sweep.layout.stride);
        // The plans B, C and the row adjoint, `[G, K]` each, then γ̄, the logits and the
        // adjoint of the result row, `[K]` each.
        let scratch_len = 3 * group_cols + 3 * self.anchors;
        for t in (0..=self.n_iters).rev() {
            if self.interrupt.requested() {
                return;
            }
            let pass = ReversePass {
                reverse,
                t,
                col_adjoint,
                f_growth,
            };
            sweep.run(
                state,
                out,
                chunk_sums,
                scratch,
                scratch_len,
                #[inline(always)]
                |rows, state, out, col_parts, scratch| {
                    pass.chunk(rows, state, out, col_parts, scratch)
                },
            );
            if t > 0 {
                reduce_partials(chunk_sums, sweep.chunking.n_chunks, col_sums);
                reverse.finish_column_adjoints(t, col_sums, col_adjoint, f_growth);
            }
        }
    }
}

/// What every reverse pass of one problem reads.
#[derive(Clone, Copy)]
struct Reverse<'a, T> {
    sweep: Sweep<'a, T>,
    /// The result's adjoint, `[N, K]`.
    grad: &'a [T],
    history: &'a History<T>,
    /// `w_G`: the derivative of `L_G` by the scores is `w_G / eps`; the rows apply `1/eps`
    /// once, last (`first_f_step`), so that `w_G / eps` past T's range is no NaN (`inf · 0`).
    weights: &'a [T],
}

impl<T: Real> Reverse<'_, T> {
    /// After reverse pass `t`: `φ̄^t / r` from the pass's column sums and, for the pass before,
    /// `ρ = f^t / f^{t-1}`.
    fn finish_column_adjoints(
        &self,
        t: usize,
        col_sums: &[T],
        col_adjoint: &mut [T],
        f_growth: &mut [T],
    ) {
        let (k, mass) = (self.sweep.problem.anchors, self.sweep.input.mass);
        for (adjoint, sums) in col_adjoint
            .chunks_exact_mut(k)
            .zip(col_sums.chunks_exact(k))
        {
            for j in 0..k {
                adjoint[j] = sums[j] / mass[j];
            }
        }
        if t >= 2 {
            let group_cols = col_sums.len();
            let (f1, f0) = (
                self.history.f(t, group_cols),
                self.history.f(t - 1, group_cols),
            );
            for x in 0..group_cols {
                f_growth[x] = if self.sweep.log {
                    (f1[x] - f0[x]).exp_fast()
                } else {
                    f1[x] / f0[x]
                };
            }
        }
    }
}

/// Reverse pass `t`: the `f` step of iteration `t + 1`, then the `h` and `g` steps of
/// iteration `t` (pass 0: only the `f` step of iteration 1).
struct ReversePass<'a, T> {
    reverse: Reverse<'a, T>,
    t: usize,
    /// `φ̄^{t+1}_G / r`, `[G, K]`.
    col_adjoint: &'a [T],
    /// `ρ_G = f_G^{t+2} / f_G^{t+1}`, `[G, K]`.
    f_growth: &'a [T],
}

/// One row's working values in a reverse pass.
struct RowScratch<'s, T> {
    /// `B_G`, the plan after the `g` step, `[G, K]`.
    plan_g: &'s mut [T],
    /// `C_G`, the plan after the `h` step, `[G, K]`.
    plan_h: &'s mut [T],
    /// The row's adjoint of `L_G`, `[G, K]`.
    adjoint: &'s mut [T],
    /// `γ̄`, the adjoint of the `g` step's log scaling, `[K]`.
    gamma_bar: &'s mut [T],
    /// `[K]`: the row's `L = (S - colmax) / eps`, or scratch.
    logits: &'s mut [T],
    /// `[K]`: the adjoint of the result row before min-max.
    grad_row: &'s mut [T],
    /// `η̄_G`, the adjoint of the `h` step's log scaling, `[G]`.
    eta_bar: &'s mut [T],
}

impl<T: Real> ReversePass<'_, T> {
    /// The pass over one chunk: `state` holds its rows' state blocks (the cached `E_G` and the
    /// `η̄` partials the `g` step leaves for the next pass), `out` its rows of the gradient,
    /// `col_parts` (`[G, K]`) its column partials of `φ̄^t`.
    #[inline(always)]
    fn chunk(
        &self,
        rows: Range<usize>,
        state: &mut [T],
        out: &mut [T],
        col_parts: &mut [T],
        scratch: &mut [T],
    ) {
        let sweep = &self.reverse.sweep;
        let (k, n_groups) = (sweep.problem.anchors, sweep.problem.groups.len());
        let (group_cols, stride) = (n_groups * k, sweep.layout.stride);
        col_parts.fill(T::ZERO);
        let (plan_g, rest) = scratch.split_at_mut(group_cols);
        let (plan_h, rest) = rest.split_at_mut(group_cols);
        let (adjoint, rest) = rest.split_at_mut(group_cols);
        let (gamma_bar, rest) = rest.split_at_mut(k);
        let (logits, grad_row) = rest.split_at_mut(k);
        let mut eta_bar = PerGroup::new(n_groups);
        let mut scratch = RowScratch {
            plan_g,
            plan_h,
            adjoint,
            gamma_bar,
            logits,
            grad_row,
            eta_bar: eta_bar.values(),
        };
        let top = self.t == sweep.problem.n_iters;
        for (i, row) in rows.enumerate() {
            let row_state = &mut state[i * stride..(i + 1) * stride];
            let out_row = &mut out[i * k..(i + 1) * k];
            if self.t == 0 {
                self.first_f_step(row, row_state, out_row, scratch.logits);
                continue;
            }
            self.row_plans(row, row_state, &mut scratch);
            scratch.gamma_bar.fill(T::ZERO);
            if top {
                self.result_adjoint(row, &mut scratch, col_parts);
                out_row.fill(T::ZERO);
            } else {
                self.next_f_step(row_state, &mut scratch);
            }
            self.h_and_g_steps(row_state, &mut scratch, col_parts);
            for (g, adjoint) in scratch.adjoint.chunks_exact(k).enumerate() {
                add_scaled(self.reverse.weights[g], adjoint, out_row);
            }
        }
    }

    /// Pass 0: the `f` step of iteration 1, whose plan is `A_G = E_G f_G^1` (`g = h = 1`).
    #[inline(always)]
    fn first_f_step(&self, row: usize, row_state: &[T], out_row: &mut [T], logits: &mut [T]) {
        let sweep = &self.reverse.sweep;
        let problem = sweep.problem;
        let (k, weights) = (problem.anchors, &problem.groups.weights);
        let f1 = self.reverse.history.f(1, weights.len() * k);
        if sweep.log {
            problem.logits(sweep.input, row, logits);
        }
        for g in 0..weights.len() {
            for j in 0..k {
                let a = if sweep.log {
                    (weights[g] * logits[j] + f1[g * k + j]).exp_fast()
                } else {
                    row_state[g * k + j] * f1[g * k + j]
                };
                out_row[j] -= self.reverse.weights[g] * self.col_adjoint[g * k + j] * a;
            }
        }
        // The last pass: the row's sum of w_G · (adjoint of L_G), times 1/eps (which fits T).
        for v in out_row.iter_mut() {
            *v *= problem.inv_eps;
        }
    }

    /// The plans of iteration `t` for one row, recomputed from the recorded potentials:
    /// `B_G` (after the `g` step) and `C_G` (after the `h` step).
    #[inline(always)]
    fn row_plans(&self, row: usize, row_state: &[T], s: &mut RowScratch<T>) {
        let (sweep, history, t) = (&self.reverse.sweep, self.reverse.history, self.t);
        let problem = sweep.problem;
        let (n, k, groups) = (problem.rows, problem.anchors, &problem.groups);
        let n_groups = groups.len();
        let f = history.f(t, n_groups * k);
        let h0 = history.h(t - 1, row, n, n_groups);
        let h1 = history.h(t, row, n, n_groups);
        let (plan_g, plan_h, logits) = (&mut *s.plan_g, &mut *s.plan_h, &mut *s.logits);
        if sweep.log {
            problem.logits(sweep.input, row, logits);
            // plan_g holds the exponents first, and plan_h's first 2K values the running max
            // and the denominator (G >= 2 here).
            let (max, rest) = plan_h.split_at_mut(k);
            let den = &mut rest[..k];
            max.fill(T::NEG_INFINITY);
            for g in 0..n_groups {
                for j in 0..k {
                    let a = groups.weights[g] * logits[j] + f[g * k + j] + h0[g];
                    plan_g[g * k + j] = a;
                    max[j] = max[j].fmax(a);
                }
            }
            den.fill(T::ZERO);
            // C_G = B_G exp(h1 − h0) from B_G costs one exponential per group, not per
            // element; it is exact but where B_G flushed to 0 and C_G need not have. For growths
            // up to e^16 that difference stays below e^16 times the exponential's flush point;
            // a row with a larger one takes an exponential per element.
            let guard = T::from_f64(16.0);
            if (0..n_groups).all(|g| h1[g] - h0[g] <= guard) {
                for g in 0..n_groups {
                    let (e, count) = (&mut plan_g[g * k..(g + 1) * k], groups.counts[g]);
                    for j in 0..k {
                        let x = (e[j] - max[j]).exp_fast();
                        e[j] = x;
                        den[j] += count * x;
                    }
                }
                // B_G = exp(a − max − log den) = e / den: den >= the count of the max's
                // group, >= 1, so this flushes to 0 exactly where the exponential would.
                for j in 0..k {
                    logits[j] = T::ONE / den[j];
                }
                for g in 0..n_groups {
                    let grow = (h1[g] - h0[g]).exp_fast();
                    let (b, c) = (
                        &mut plan_g[g * k..(g + 1) * k],
                        &mut plan_h[g * k..(g + 1) * k],
                    );
                    plain_plans_from(grow, logits, b, c);
                }
                return;
            }
            for g in 0..n_groups {
                for j in 0..k {
                    den[j] += groups.counts[g] * (plan_g[g * k + j] - max[j]).exp_fast();
                }
            }
            // logits <- max + log den = -γ
            for j in 0..k {
                logits[j] = max[j] + den[j].ln();
            }
            for g in 0..n_groups {
                let d = h1[g] - h0[g];
                for j in 0..k {
                    let a = plan_g[g * k + j] - logits[j];
                    plan_g[g * k + j] = a.exp_fast();
                    plan_h[g * k + j] = (a + d).exp_fast();
                }
            }
        } else {
            let e = &row_state[..n_groups * k];
            // logits holds the g step's denominator, then its inverse.
            logits.fill(T::ZERO);
            for (g, (&count, &h)) in groups.counts.iter().zip(h0).enumerate() {
                let at = g * k..(g + 1) * k;
                plain_values(
                    count * h,
                    &e[at.clone()],
                    &f[at.clone()],
                    &mut plan_g[at],
                    logits,
                );
            }
            for x in logits.iter_mut() {
                *x = T::ONE / *x;
            }
            for g in 0..n_groups {
                let at = g * k..(g + 1) * k;
                let (b, c) = (&mut plan_g[at.clone()], &mut plan_h[at]);
                plain_plans(h0[g], h1[g], logits, b, c);
            }
        }
    }

    /// The top pass: the result `T = Σ_G top_G C_G` and its adjoint (through min-max) start
    /// the row adjoint, `γ̄`, and `η̄`.
    #[inline(always)]
    fn result_adjoint(&self, row: usize, s: &mut RowScratch<T>, col_parts: &mut [T]) {
        let problem = self.reverse.sweep.problem;
        let (k, top_counts) = (problem.anchors, &problem.groups.top_counts);
        let n_groups = top_counts.len();
        let (plan_h, grad_row) = (&*s.plan_h, &mut *s.grad_row);
        grad_row.copy_from_slice(&self.reverse.grad[row * k..(row + 1) * k]);
        if problem.normalize == Normalize::MinMax {
            let result = &mut *s.logits;
            result.fill(T::ZERO);
            for g in 0..n_groups {
                if top_counts[g] > T::ZERO {
                    for j in 0..k {
                        result[j] += top_counts[g] * plan_h[g * k + j];
                    }
                }
            }
            minmax_row_backward(result, grad_row);
        }
        // Row sums apart (with `sum`'s vector accumulators), so that the loops vectorise.
        for g in 0..n_groups {
            let adjoint = &mut s.adjoint[g * k..(g + 1) * k];
            let (parts, plan) = (
                &mut col_parts[g * k..(g + 1) * k],
                &plan_h[g * k..(g + 1) * k],
            );
            start_terms(
                top_counts[g],
                grad_row,
                plan,
                adjoint,
                Some(parts),
                &mut s.gamma_bar[..k],
            );
            s.eta_bar[g] = sum(adjoint);
        }
    }

    /// The other passes: the `f` step of iteration `t + 1`, `V_G = −(φ̄_G / r) C_G ρ_G`, starts
    /// the row adjoint and `γ̄`; `η̄` adds it to the partial the previous pass left in the state.
    #[inline(always)]
    fn next_f_step(&self, row_state: &[T], s: &mut RowScratch<T>) {
        let (k, h_at) = (
            self.reverse.sweep.problem.anchors,
            self.reverse.sweep.layout.scalars_at,
        );
        let (adjoint, rho) = (self.col_adjoint, self.f_growth);
        for g in 0..s.eta_bar.len() {
            let (col_adjoint, rho) = (&adjoint[g * k..(g + 1) * k], &rho[g * k..(g + 1) * k]);
            let (row_adjoint, plan) = (
                &mut s.adjoint[g * k..(g + 1) * k],
                &s.plan_h[g * k..(g + 1) * k],
            );
            next_f_terms(col_adjoint, plan, rho, row_adjoint, &mut s.gamma_bar[..k]);
            s.eta_bar[g] = row_state[h_at + g] + sum(row_adjoint);
        }
    }

    /// The `h` step of iteration `t`, `Z_G = −η̄_G C_G`, then its `g` step, `W_G = −γ̄ c_G B_G`,
    /// whose row sums are the row's part of `η̄^{t−1}`, kept in the state for the next pass.
    #[inline(always)]
    fn h_and_g_steps(&self, row_state: &mut [T], s: &mut RowScratch<T>, col_parts: &mut [T]) {
        let sweep = &self.reverse.sweep;
        let (k, counts) = (sweep.problem.anchors, &sweep.problem.groups.counts);
        let n_groups = counts.len();
        for g in 0..n_groups {
            let e = s.eta_bar[g];
            let (adjoint, plan) = (
                &mut s.adjoint[g * k..(g + 1) * k],
                &s.plan_h[g * k..(g + 1) * k],
            );
            let (parts, gamma_bar) = (&mut col_parts[g * k..(g + 1) * k], &mut s.gamma_bar[..k]);
            h_terms(-e, plan, adjoint, parts, gamma_bar);
        }
        // The g step's terms go through `grad_row` (free by now) for their row sums.
        for g in 0..n_groups {
            let (adjoint, plan) = (
                &mut s.adjoint[g * k..(g + 1) * k],
                &s.plan_g[g * k..(g + 1) * k],
            );
            let (parts, gamma_bar) = (&mut col_parts[g * k..(g + 1) * k], &s.gamma_bar[..k]);
            let terms = &mut s.grad_row[..k];
            g_terms(counts[g], gamma_bar, plan, adjoint, parts, terms);
            row_state[sweep.layout.scalars_at + g] = sum(terms);
        }
    }
}

// The element loops of a reverse step as functions of their slices: inlined, their arguments'
// `noalias` lets LLVM vectorise them without runtime overlap checks (with the slices as fields of
// one scratch, it kept several of these loops scalar).

/// `x = a·p·q`; `adjoint = x`, `parts += x` (if given), `gamma += x`.
#[inline(always)]
fn start_terms<T: Real>(
    a: T,
    p: &[T],
    q: &[T],
    adjoint: &mut [T],
    parts: Option<&mut [T]>,
    gamma: &mut [T],
) {
    let k = adjoint.len();
    let (p, q, gamma) = (&p[..k], &q[..k], &mut gamma[..k]);
    for j in 0..k {
        let x = a * p[j] * q[j];
        adjoint[j] = x;
        gamma[j] += x;
    }
    if let Some(parts) = parts {
        let parts = &mut parts[..k];
        for j in 0..k {
            parts[j] += adjoint[j];
        }
    }
}

/// `v = −a·p·ρ`; `adjoint = v`, `gamma += v`.
#[inline(always)]
fn next_f_terms<T: Real>(a: &[T], p: &[T], rho: &[T], adjoint: &mut [T], gamma: &mut [T]) {
    let k = adjoint.len();
    let (a, p, rho, gamma) = (&a[..k], &p[..k], &rho[..k], &mut gamma[..k]);
    for j in 0..k {
        let v = -a[j] * p[j] * rho[j];
        adjoint[j] = v;
        gamma[j] += v;
    }
}

/// `z = e·p`; `adjoint += z`, `parts += z`, `gamma += z`.
#[inline(always)]
fn h_terms<T: Real>(e: T, p: &[T], adjoint: &mut [T], parts: &mut [T], gamma: &mut [T]) {
    let k = adjoint.len();
    let (p, parts, gamma) = (&p[..k], &mut parts[..k], &mut gamma[..k]);
    for j in 0..k {
        let z = e * p[j];
        adjoint[j] += z;
        parts[j] += z;
        gamma[j] += z;
    }
}

/// `x = −γ̄·c·p`; `adjoint += x`, `parts += x`, `terms = x`.
#[inline(always)]
fn g_terms<T: Real>(
    c: T,
    gamma: &[T],
    p: &[T],
    adjoint: &mut [T],
    parts: &mut [T],
    terms: &mut [T],
) {
    let k = adjoint.len();
    let (gamma, p, parts, terms) = (&gamma[..k], &p[..k], &mut parts[..k], &mut terms[..k]);
    for j in 0..k {
        let x = -gamma[j] * c * p[j];
        adjoint[j] += x;
        parts[j] += x;
        terms[j] = x;
    }
}

/// `dst += a·x`.
#[inline(always)]
fn add_scaled<T: Real>(a: T, x: &[T], dst: &mut [T]) {
    let x = &x[..dst.len()];
    for (d, v) in dst.iter_mut().zip(x) {
        *d += a * *v;
    }
}

/// One group's `v = E·f` into `v` and the `g` step's denominator `den += ch·v`.
#[inline(always)]
fn plain_values<T: Real>(ch: T, e: &[T], f: &[T], v: &mut [T], den: &mut [T]) {
    let k = v.len();
    let (e, f, den) = (&e[..k], &f[..k], &mut den[..k]);
    for j in 0..k {
        let x = e[j] * f[j];
        v[j] = x;
        den[j] += ch * x;
    }
}

/// `b = e · inv`, `c = b · grow` (log domain: the plans from the `g` step's exponentials).
#[inline(always)]
fn plain_plans_from<T: Real>(grow: T, inv: &[T], b: &mut [T], c: &mut [T]) {
    let k = b.len();
    let (inv, c) = (&inv[..k], &mut c[..k]);
    for j in 0..k {
        let x = b[j] * inv[j];
        b[j] = x;
        c[j] = x * grow;
    }
}

/// With `v` in `b` and `inv` the inverse denominators: `B = v·inv·h0` (into `b`) and
/// `C = v·inv·h1` (into `c`).
#[inline(always)]
fn plain_plans<T: Real>(h0: T, h1: T, inv: &[T], b: &mut [T], c: &mut [T]) {
    let k = b.len();
    let (inv, c) = (&inv[..k], &mut c[..k]);
    for j in 0..k {
        let v = b[j] * inv[j];
        b[j] = v * h0;
        c[j] = v * h1;
    }
}

/// Adjoint of `rows::minmax_row`: `x` holds the row before min-max, `g` the output's adjoint
/// and receives the input's. Ties at the min or max share their part equally (as `torch.amin`).
#[inline(always)]
pub(super) fn minmax_row_backward<T: Real>(x: &[T], g: &mut [T]) {
    let (lo, hi) = extremes(x);
    if constant_row(lo, hi) {
        g.fill(T::ZERO);
        return;
    }
    let inv = T::ONE / (hi - lo);
    let (mut glo, mut ghi) = (T::ZERO, T::ZERO);
    let (mut nlo, mut nhi) = (T::ZERO, T::ZERO);
    for (xj, gj) in x.iter().zip(g.iter()) {
        let y = (*xj - lo) * inv;
        glo += *gj * (y - T::ONE);
        ghi -= *gj * y;
        if *xj == lo {
            nlo += T::ONE;
        }
        if *xj == hi {
            nhi += T::ONE;
        }
    }
    let (glo, ghi) = (glo * inv / nlo, ghi * inv / nhi);
    for (xj, gj) in x.iter().zip(g.iter_mut()) {
        let mut v = *gj * inv;
        if *xj == lo {
            v += glo;
        }
        if *xj == hi {
            v += ghi;
        }
        *gj = v;
    }
}
