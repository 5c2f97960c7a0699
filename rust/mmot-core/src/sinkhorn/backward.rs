//! The exact reverse pass of the Sinkhorn iteration (see `docs/gradients.md`).
//!
//! The forward is replayed once, recording the `O(T (N + K))` potentials. With `α_t = log u_t`,
//! `β_t = log v_t` and `L = scores / eps`, iteration `t` is `β_t = log c − LSE_n(L + α_{t−1})`
//! followed by `α_t = log r − LSE_a(L + β_t)`, so each step's adjoint is its input adjoint
//! times minus the normalised plan of that step.
//!
//! Plain domain ([`Problem::backward_plain`]): every step's plan is the cached `E` times a row
//! and a column factor, so the gradient is `E / eps` times a sum of `2T` outer products of
//! recorded vectors, and a reverse step only needs `E`'s row dots with one column vector and
//! its column sums with one row vector, like a forward iteration. The replay caches `E` in
//! `out` and stops before its last row step, which the first reverse pass makes while it reads
//! the upstream gradient; the reverse steps `T, …, 2` then read `E` once each and write
//! nothing but `O(N + K)` vectors; a last pass writes the gradient over `E`, row by row. That
//! is `T + 1` passes over `E` after the replay's `T`, against the forward's `T + 1`.
//!
//! Log domain ([`Problem::backward_log`]): every plan of the replay is its last plan `P_T` times
//! row factors `exp(α_t − α_T)` and column factors `exp(β_t − β_T)`. While those factors stay
//! below `e^16` (ε not too small for the iteration count), the replay's history is turned into
//! them and the plain reverse pass runs over `P_T` as its `E`: no exponential per element.
//! Otherwise the plans are recomputed with one exponential per
//! element and step, so the gradient is accumulated in `out` as it goes: reverse pass `t`
//! applies the column step `t`, which only needs the finished column adjoint `β̄_t`, and then
//! the row step `t − 1` of the same row, whose column sums give `β̄_{t−1}` for the next pass.
//! Pass T and reverse pass T take no exponentials: they read the replay's plan `P_T` from
//! `out`, whose rows times `exp(α_{T−1} − α_T)` are reverse pass T's plan (guarded where that
//! factor is large and `P_T` may have flushed to 0).

use super::forward::{History, Workspace};
use super::{Input, Problem};
use crate::exec::chunks::{n_chunks, reduce_partials, rows_per_chunk, run_pass, Scratch, Strided};
use crate::simd::{dot, sum, Real};

#[derive(Default)]
pub(super) struct BackWorkspace<T> {
    fwd: Workspace<T>,
    hist: History<T>,
    /// The plain replay's column max (equal to the caller's: a max is exact).
    cmax: Vec<T>,
    /// `ρ = v_{t−1} / v_t` of the current pass.
    ratio: Vec<T>,
    /// `β̄_t / c` of the current pass.
    col_adjoint_over_mass: Vec<T>,
    /// Log domain: per row, `x = ⟨G, P⟩ / r`.
    row_x: Vec<T>,
    /// Plain domain: per row, `u_T` and `x = ⟨G, P⟩ / r` (`[n, 2]`).
    last: Vec<T>,
    /// Plain domain: `ρ_t = u_{t−1}² ⟨E, w_t⟩ / r` per row at `t · n` (`t = 2..=T`).
    rho: Vec<T>,
    /// Plain domain: `w_t = (β̄_t / c) v_t` at `t · k` (`t = 1..=T`).
    weights: Vec<T>,
}

impl<T: Real> Problem<T> {
    /// The gradient of one problem into `out`, in the domain `log` (see the file's docs).
    pub(super) fn backward(
        &self,
        grad: &[T],
        input: Input<'_, T>,
        cmax: &[T],
        out: &mut [T],
        bw: &mut BackWorkspace<T>,
        log: bool,
    ) {
        if log {
            self.backward_log(grad, input, cmax, out, bw)
        } else {
            self.backward_plain(grad, input, out, bw)
        }
    }

    /// The plain domain's reverse pass (see the file's docs). Writes `out` only in its last
    /// pass (before that, `out` caches `E`).
    fn backward_plain(
        &self,
        grad: &[T],
        input: Input<'_, T>,
        out: &mut [T],
        bw: &mut BackWorkspace<T>,
    ) {
        let BackWorkspace {
            fwd, hist, cmax, ..
        } = bw;
        cmax.resize(self.k, T::ZERO);
        self.solve_plain(input, cmax, out, fwd, Some(hist), false);
        if self.interrupt.requested() {
            return; // the replay stopped early
        }
        self.reverse_scaled(grad, input, out, bw);
    }

    /// The reverse pass over a cached `E` (in `out`, times the per-chunk column factors
    /// `fwd.corr`) whose step plans are `E` times the recorded scalings `hist` (`u_t` for
    /// `t < T`, `v_t` for `t ≤ T`); writes the gradient over `E`.
    fn reverse_scaled(
        &self,
        grad: &[T],
        input: Input<'_, T>,
        out: &mut [T],
        bw: &mut BackWorkspace<T>,
    ) {
        let (n, k, inv_eps, iters) = (self.n, self.k, self.inv_eps, self.n_iters);
        let (r, c) = (input.row_mass, input.col_mass);
        let BackWorkspace {
            fwd,
            hist,
            last,
            rho,
            weights,
            ..
        } = bw;
        let chunk_rows = rows_per_chunk(k);
        let chunk_count = n_chunks(n, chunk_rows);
        let Workspace {
            partials,
            acc,
            scratch,
            corr,
            ..
        } = fwd;
        let corr: &[T] = corr;
        let hist: &History<T> = hist;
        last.clear();
        last.resize(2 * n, T::ZERO);
        rho.clear();
        rho.resize((iters + 1) * n, T::ZERO);
        weights.clear();
        weights.resize((iters + 1) * k, T::ZERO);
        let col = |t: usize| &hist.col[(t - 1) * k..t * k]; // v_t
        let row = |t: usize| &hist.row[t * n..(t + 1) * n]; // u_t, t < T
        let vt = col(iters);

        // Pass T: the last row step u_T = r / (E v_T) and the output's adjoint
        // Y = P (G − x) with x = ⟨G, P⟩ / r, whose column sums are β̄_T.
        run_pass(
            n,
            chunk_rows,
            Strided::new(last, 2),
            Strided::new(out, k),
            Strided::new(partials, k),
            Scratch::new(scratch, 2 * k),
            #[inline(always)]
            |rows, st, o, part, scr| {
                let (sw, ew) = scr.split_at_mut(k);
                let f = &corr[rows.start / chunk_rows * k..][..k];
                for j in 0..k {
                    sw[j] = vt[j] * f[j];
                }
                part.fill(T::ZERO);
                let first = rows.start;
                for (i, row) in rows.enumerate() {
                    let e = &o[i * k..(i + 1) * k];
                    let g = &grad[row * k..(row + 1) * k];
                    for j in 0..k {
                        ew[j] = e[j] * sw[j];
                    }
                    let den = sum(ew);
                    let u = r[row] / den;
                    let x = dot(g, ew) / den;
                    st[2 * (row - first)] = u;
                    st[2 * (row - first) + 1] = x;
                    for j in 0..k {
                        part[j] += e[j] * (g[j] - x) * u;
                    }
                }
                for j in 0..k {
                    part[j] *= sw[j];
                }
            },
        );
        reduce_partials(partials, chunk_count, acc);

        // Reverse steps T, …, 2: w_t, then ρ_t and β̄_{t−1} = v_{t−1} Eᵀ ρ_t.
        for t in (1..=iters).rev() {
            if self.interrupt.requested() {
                return;
            }
            let vt = col(t);
            let w = &mut weights[t * k..(t + 1) * k];
            for j in 0..k {
                w[j] = acc[j] / c[j] * vt[j];
            }
            if t == 1 {
                break;
            }
            let (w, up, vp): (&[T], _, _) = (w, row(t - 1), col(t - 1));
            run_pass(
                n,
                chunk_rows,
                Strided::new(&mut rho[t * n..(t + 1) * n], 1),
                Strided::new(out, k),
                Strided::new(partials, k),
                Scratch::new(scratch, k),
                #[inline(always)]
                |rows, st, o, part, sw| {
                    let f = &corr[rows.start / chunk_rows * k..][..k];
                    for j in 0..k {
                        sw[j] = w[j] * f[j];
                    }
                    part.fill(T::ZERO);
                    let first = rows.start;
                    for (i, row) in rows.enumerate() {
                        let e = &o[i * k..(i + 1) * k];
                        let u = up[row];
                        // (u ⟨E, w⟩ / r) u: u ⟨E, w⟩ is a plan's, bounded, where u² may not be.
                        let p = u * dot(e, sw) / r[row] * u;
                        st[row - first] = p;
                        for j in 0..k {
                            part[j] += e[j] * p;
                        }
                    }
                    for j in 0..k {
                        part[j] *= f[j];
                    }
                },
            );
            reduce_partials(partials, chunk_count, acc);
            for j in 0..k {
                acc[j] *= vp[j];
            }
        }
        if self.interrupt.requested() {
            return;
        }

        // The gradient, over the cached E: E/eps times
        // v_T u_T (G − x) + Σ_t (ρ_t v_{t−1} − u_{t−1} w_t), with ρ_1 = 0 and u_0 = 1.
        let (rho, weights): (&[T], &[T]) = (rho, weights);
        run_pass(
            n,
            chunk_rows,
            Strided::new(last, 2),
            Strided::new(out, k),
            Strided::new(partials, k),
            Scratch::new(scratch, k),
            #[inline(always)]
            |rows, st, o, _, b| {
                let f = &corr[rows.start / chunk_rows * k..][..k];
                let first = rows.start;
                for row in rows {
                    let g = &grad[row * k..(row + 1) * k];
                    let (u, x) = (st[2 * (row - first)], st[2 * (row - first) + 1]);
                    for j in 0..k {
                        b[j] = vt[j] * u * (g[j] - x);
                    }
                    for t in 1..=iters {
                        let (u, w) = (hist.row[(t - 1) * n + row], &weights[t * k..][..k]);
                        if t >= 2 {
                            let (p, vp) = (rho[t * n + row], col(t - 1));
                            for j in 0..k {
                                b[j] += p * vp[j] - u * w[j];
                            }
                        } else {
                            for j in 0..k {
                                b[j] -= u * w[j];
                            }
                        }
                    }
                    let e = &mut o[(row - first) * k..(row - first + 1) * k];
                    for j in 0..k {
                        e[j] = b[j] * (e[j] * f[j]) * inv_eps;
                    }
                }
            },
        );
    }

    /// The log domain's reverse pass (see the file's docs), accumulating the gradient in `out`.
    fn backward_log(
        &self,
        grad: &[T],
        input: Input<'_, T>,
        cmax: &[T],
        out: &mut [T],
        bw: &mut BackWorkspace<T>,
    ) {
        let (n, k, inv_eps, iters) = (self.n, self.k, self.inv_eps, self.n_iters);
        let (s, r, c) = (input.scores, input.row_mass, input.col_mass);
        let BackWorkspace {
            fwd,
            hist,
            ratio,
            col_adjoint_over_mass: bbc,
            row_x,
            ..
        } = bw;
        // The replay's plan P_T goes to `out`; pass T reads it, reverse pass T turns it into
        // that step's plan and then overwrites it with the gradient, row by row.
        self.solve_log(input, cmax, out, fwd, Some(hist));
        if self.interrupt.requested() {
            return; // the replay stopped early
        }
        if scale_by_last_plan(hist, n, k, iters) {
            let chunk_count = n_chunks(n, rows_per_chunk(k));
            fwd.corr.clear();
            fwd.corr.resize(chunk_count * k, T::ONE);
            return self.reverse_scaled(grad, input, out, bw);
        }
        let chunk_rows = rows_per_chunk(k);
        let chunk_count = n_chunks(n, chunk_rows);
        let Workspace {
            partials,
            acc,
            scratch,
            ..
        } = fwd;
        let hist: &History<T> = hist;
        row_x.clear();
        row_x.resize(n, T::ZERO);
        // One row of the plan exp(L + α + β) for row potential `a` and column potentials `bp`.
        let plan_row = |row: usize, a: T, bp: &[T], dst: &mut [T]| {
            let srow = &s[row * k..(row + 1) * k];
            for j in 0..k {
                dst[j] = ((srow[j] - cmax[j]) * inv_eps + bp[j] + a).exp_fast();
            }
        };

        // Pass T: the output's adjoint and the row step T, Y = P (G − x) with
        // x = ⟨G, P⟩_row / r, from the replay's plan (no exponentials): x per row and the
        // column sums β̄_T of Y; reverse pass T forms Y itself.
        run_pass(
            n,
            chunk_rows,
            Strided::new(row_x, 1),
            Strided::new(out, k),
            Strided::new(partials, k),
            Scratch::new(scratch, 0),
            #[inline(always)]
            |rows, st, o, part, _| {
                part.fill(T::ZERO);
                let first = rows.start;
                for (i, row) in rows.enumerate() {
                    let p = &o[i * k..(i + 1) * k];
                    let grow = &grad[row * k..(row + 1) * k];
                    let x = dot(grow, p) / r[row];
                    st[row - first] = x;
                    for j in 0..k {
                        part[j] += p[j] * (grow[j] - x);
                    }
                }
            },
        );
        reduce_partials(partials, chunk_count, acc);
        // Reverse pass T's plan exp(L + α_{T−1} + β_T) is P_T exp(α_{T−1} − α_T): exact but
        // where P_T flushed to 0 and it need not have. For growths up to e^16 that difference
        // stays below e^16 times the exponential's flush point; a row with a larger one takes
        // an exponential per element.
        let guard = T::from_f64(16.0);
        let a_last = &hist.row[iters * n..(iters + 1) * n];

        ratio.clear();
        ratio.resize(k, T::ZERO);
        bbc.clear();
        bbc.resize(k, T::ZERO);
        for t in (1..=iters).rev() {
            if self.interrupt.requested() {
                return;
            }
            // acc holds β̄_t.
            for j in 0..k {
                bbc[j] = acc[j] / c[j];
            }
            let bt = &hist.col[(t - 1) * k..t * k];
            let row_step = t >= 2;
            if row_step {
                let bp = &hist.col[(t - 2) * k..(t - 1) * k];
                for j in 0..k {
                    ratio[j] = (bp[j] - bt[j]).exp_fast();
                }
            }
            let first = t == 1;
            let top = t == iters;
            let at = &hist.row[(t - 1) * n..t * n];
            let (bbc, ratio): (&[T], &[T]) = (bbc, ratio);
            run_pass(
                n,
                chunk_rows,
                Strided::new(row_x, 1),
                Strided::new(out, k),
                Strided::new(partials, k),
                Scratch::new(scratch, k),
                #[inline(always)]
                |rows, st, o, part, pc| {
                    part.fill(T::ZERO);
                    let first_row = rows.start;
                    for (i, row) in rows.enumerate() {
                        let orow = &mut o[i * k..(i + 1) * k];
                        // Column step t: Pc = exp(L + α_{t−1} + β_t), columns summing to c.
                        if top {
                            // `orow` holds P_T: Pc from it, then Y over it.
                            let d = at[row] - a_last[row];
                            if d <= guard {
                                let grow = d.exp_fast();
                                for j in 0..k {
                                    pc[j] = orow[j] * grow;
                                }
                            } else {
                                plan_row(row, at[row], bt, pc);
                            }
                            let (grow, x) = (&grad[row * k..(row + 1) * k], st[row - first_row]);
                            for j in 0..k {
                                orow[j] *= grow[j] - x;
                            }
                        } else {
                            plan_row(row, at[row], bt, pc);
                        }
                        let abar = -dot(bbc, pc);
                        for j in 0..k {
                            orow[j] -= bbc[j] * pc[j];
                        }
                        if row_step {
                            // Row step t − 1: Pr = Pc ρ has rows summing to r.
                            let coef = -abar / r[row];
                            for j in 0..k {
                                let y = coef * pc[j] * ratio[j];
                                orow[j] += y;
                                part[j] += y;
                            }
                        }
                        if first {
                            for x in orow.iter_mut() {
                                *x *= inv_eps;
                            }
                        }
                    }
                },
            );
            if row_step {
                reduce_partials(partials, chunk_count, acc);
            }
        }
    }
}

/// Every plan of the log replay is `P_T` times row factors `exp(α_t − α_T)` and column factors
/// `exp(β_t − β_T)`, so while those stay small the log backward can run the plain domain's
/// reverse pass over `P_T` (no exponential per element). Where `P_T` flushed to 0 a scaled plan
/// is 0 instead of at most `e^16` times the flush point; past that growth this returns false
/// and leaves `hist` alone. Otherwise it turns `hist` into those factors in place.
fn scale_by_last_plan<T: Real>(hist: &mut History<T>, n: usize, k: usize, iters: usize) -> bool {
    let (rows, a_last) = hist.row.split_at_mut(iters * n);
    let (cols, b_last) = hist.col.split_at_mut((iters - 1) * k);
    let growth = |past: &[T], last: &[T]| {
        past.chunks_exact(last.len())
            .flat_map(|p| p.iter().zip(last).map(|(&x, &y)| x - y))
            .fold(T::ZERO, |m, d| if d > m { d } else { m })
    };
    let guard = T::from_f64(16.0);
    if growth(rows, a_last) + growth(cols, b_last) > guard {
        return false;
    }
    for p in rows.chunks_exact_mut(n) {
        for (x, &y) in p.iter_mut().zip(a_last.iter()) {
            *x = (*x - y).exp_fast();
        }
    }
    for p in cols.chunks_exact_mut(k) {
        for (x, &y) in p.iter_mut().zip(b_last.iter()) {
            *x = (*x - y).exp_fast();
        }
    }
    b_last.fill(T::ONE);
    true
}
