//! The exact reverse pass of the Sinkhorn iteration (see `docs/gradients.md`).
//!
//! The forward is replayed once, recording the `O(T (N + K))` potentials; the reverse sweep is
//! then `T + 1` streaming passes over rows. With `α_t = log u_t`, `β_t = log v_t` and
//! `L = scores / eps`, iteration `t` is `β_t = log c − LSE_n(L + α_{t−1})` followed by
//! `α_t = log r − LSE_a(L + β_t)`, so each step's adjoint is its input adjoint times minus
//! the normalised plan of that step. Reverse pass `t` applies the column step `t`, which only
//! needs the finished column adjoint `β̄_t`, and then the row step `t − 1` of the same row,
//! whose column sums give `β̄_{t−1}` for the next pass.

use super::forward::{History, Workspace};
use super::{Input, Problem};
use crate::exec::chunks::{n_chunks, reduce_partials, rows_per_chunk, run_pass, Scratch, Strided};
use crate::simd::{dot, Real};

#[derive(Default)]
pub(super) struct BackWorkspace<T> {
    fwd: Workspace<T>,
    hist: History<T>,
    /// The forward's output buffer: the cached `E` (plain) or the unused plan (log).
    plan: Vec<T>,
    /// The plain replay's column max (equal to the caller's: a max is exact).
    cmax: Vec<T>,
    /// `ρ = v_{t−1} / v_t` of the current pass.
    ratio: Vec<T>,
    /// `β̄_t / c` of the current pass.
    col_adjoint_over_mass: Vec<T>,
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
        let (n, k, inv_eps, iters) = (self.n, self.k, self.inv_eps, self.n_iters);
        let (s, r, c) = (input.scores, input.row_mass, input.col_mass);
        let BackWorkspace {
            fwd,
            hist,
            plan,
            cmax: plain_cmax,
            ratio,
            col_adjoint_over_mass: bbc,
        } = bw;
        plan.clear();
        plan.resize(n * k, T::ZERO);
        if log {
            self.solve_log(input, cmax, plan, fwd, Some(hist));
        } else {
            plain_cmax.resize(k, T::ZERO);
            self.solve_plain(input, plain_cmax, plan, fwd, Some(hist), false);
        }
        if self.interrupt.requested() {
            return; // the replay stopped early
        }
        let chunk_rows = rows_per_chunk(k);
        let chunk_count = n_chunks(n, chunk_rows);
        let Workspace {
            state,
            partials,
            acc,
            scratch,
            corr,
            ..
        } = fwd;
        let (cache, corr): (&[T], &[T]) = (plan, corr);
        let hist: &History<T> = hist;
        // The column potentials `bp` as the rows of chunk `ch` need them: in the plain domain,
        // times the chunk's factors from its cached E to the common scale.
        let chunk_cols = |ch: usize, bp: &[T], dst: &mut [T]| {
            if log {
                dst.copy_from_slice(bp);
            } else {
                let f = &corr[ch * k..(ch + 1) * k];
                for j in 0..k {
                    dst[j] = bp[j] * f[j];
                }
            }
        };
        // One row of the plan exp(L + α + β) for row potential `a` and the chunk's column
        // potentials `bp` (from `chunk_cols`).
        let plan_row = |row: usize, a: T, bp: &[T], dst: &mut [T]| {
            if log {
                let srow = &s[row * k..(row + 1) * k];
                for j in 0..k {
                    dst[j] = ((srow[j] - cmax[j]) * inv_eps + bp[j] + a).exp_fast();
                }
            } else {
                let erow = &cache[row * k..(row + 1) * k];
                for j in 0..k {
                    dst[j] = erow[j] * bp[j] * a;
                }
            }
        };

        // Pass T: the output's adjoint and the row step T. Y = P (G − ⟨G, P⟩_row / r_n).
        {
            let (at, bt) = (
                &hist.row[iters * n..(iters + 1) * n],
                &hist.col[(iters - 1) * k..iters * k],
            );
            run_pass(
                n,
                chunk_rows,
                Strided::new(state, 1),
                Strided::new(out, k),
                Strided::new(partials, k),
                Scratch::new(scratch, 2 * k),
                #[inline(always)]
                |rows, _st, o, part, scr| {
                    let (pr, bc) = scr.split_at_mut(k);
                    chunk_cols(rows.start / chunk_rows, bt, bc);
                    part.fill(T::ZERO);
                    for (i, row) in rows.enumerate() {
                        plan_row(row, at[row], bc, pr);
                        let grow = &grad[row * k..(row + 1) * k];
                        let x = dot(grow, pr) / r[row];
                        let orow = &mut o[i * k..(i + 1) * k];
                        for j in 0..k {
                            let y = pr[j] * (grow[j] - x);
                            orow[j] = y;
                            part[j] += y;
                        }
                    }
                },
            );
            reduce_partials(partials, chunk_count, acc);
        }

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
                    ratio[j] = if log {
                        (bp[j] - bt[j]).exp_fast()
                    } else {
                        bp[j] / bt[j]
                    };
                }
            }
            let first = t == 1;
            let at = &hist.row[(t - 1) * n..t * n];
            let (bbc, ratio): (&[T], &[T]) = (bbc, ratio);
            run_pass(
                n,
                chunk_rows,
                Strided::new(state, 1),
                Strided::new(out, k),
                Strided::new(partials, k),
                Scratch::new(scratch, 2 * k),
                #[inline(always)]
                |rows, _st, o, part, scr| {
                    let (pc, bc) = scr.split_at_mut(k);
                    chunk_cols(rows.start / chunk_rows, bt, bc);
                    part.fill(T::ZERO);
                    for (i, row) in rows.enumerate() {
                        // Column step t: Pc = exp(L + α_{t−1} + β_t), columns summing to c.
                        plan_row(row, at[row], bc, pc);
                        let orow = &mut o[i * k..(i + 1) * k];
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
