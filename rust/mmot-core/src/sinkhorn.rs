//! SwAV-style Sinkhorn-Knopp (DESIGN.md §2.1).
//!
//! Each iteration is a single streaming pass over rows: the column scaling `v` from the previous
//! pass's column sums is applied on the fly, the row scaling `u[n]` is computed, and the row's
//! contribution to the next column sums is accumulated. The last pass writes the output row.
//!
//! Plain domain: `E = exp((S - colmax)/eps)` is computed once and cached *in the output buffer*
//! (it has exactly the right size), so iterations never call `exp`; the column shift is absorbed
//! exactly by `v`.
//!
//! Log domain: nothing is cached; each row recomputes `t = (S - colmax)/eps + b` (b = log v),
//! shifts by its own row max and exponentiates once. The shifted exponentials divided by their
//! sum are exactly the row-normalised transport plan, whose column sums give the next `b` by a
//! multiplicative (log-additive) correction. This needs one `exp` per element per iteration and
//! no per-column log-sum-exp bookkeeping, because after a row normalisation every column mass is
//! bounded below by `col_mass * min(row_mass) / total`, so the sums cannot underflow.

use crate::chunks::{batch_col_stats, n_chunks, reduce_partials, rows_per_chunk, run_pass};
use crate::domain::{use_log_domain, LogDomain};
use crate::error::{check_eps_iters, check_len, Result};
use crate::real::{dot, max, sum, Real};
use rayon::prelude::*;

/// Sinkhorn on a batch of `b` independent `[n, k]` problems.
///
/// `scores`, `out`: `[b, n, k]`; `row_mass`: `[b, n]`; `col_mass`: `[b, k]` (already resolved
/// by the caller: positive, with equal totals per problem). Returns whether the log domain was
/// used (decided once for the whole call).
#[allow(clippy::too_many_arguments)]
pub fn sinkhorn<T: Real>(
    scores: &[T],
    row_mass: &[T],
    col_mass: &[T],
    out: &mut [T],
    b: usize,
    n: usize,
    k: usize,
    eps: f64,
    n_iters: usize,
    log_domain: LogDomain,
) -> Result<bool> {
    let shape = format!("[{b}, {n}, {k}]");
    check_len("scores", scores.len(), b * n * k, &shape)?;
    check_len("out", out.len(), b * n * k, &shape)?;
    check_len("row_mass", row_mass.len(), b * n, &format!("[{b}, {n}]"))?;
    check_len("col_mass", col_mass.len(), b * k, &format!("[{b}, {k}]"))?;
    check_eps_iters(eps, n_iters)?;
    if b * n * k == 0 {
        return Ok(use_log_domain::<T>(log_domain, 0.0));
    }
    let mut cmax = vec![T::ZERO; b * k];
    let range = batch_col_stats(scores, b, n, k, &mut cmax) / eps;
    let log = use_log_domain::<T>(log_domain, range);
    let p = Problem {
        n,
        k,
        inv_eps: T::from_f64(1.0 / eps),
        n_iters,
    };
    out.par_chunks_mut(n * k)
        .zip(scores.par_chunks(n * k))
        .zip(row_mass.par_chunks(n))
        .zip(col_mass.par_chunks(k))
        .zip(cmax.par_chunks(k))
        .for_each_init(Workspace::default, |ws, ((((o, s), r), c), cm)| {
            if log {
                p.solve_log(s, r, c, cm, o, ws)
            } else {
                p.solve_plain(s, r, c, cm, o, ws)
            }
        });
    Ok(log)
}

struct Problem<T> {
    n: usize,
    k: usize,
    inv_eps: T,
    n_iters: usize,
}

/// Per-worker buffers reused across the problems of a batch (a batch of 65536 tiny problems
/// would otherwise spend its time in the allocator).
#[derive(Default)]
struct Workspace<T> {
    /// Per-row state: u (plain) or a = log u (log domain); kept for a future backward pass.
    state: Vec<T>,
    partials: Vec<T>,
    acc: Vec<T>,
    /// v (plain) or b = log v (log domain).
    colpot: Vec<T>,
    scratch: Vec<T>,
}

impl<T: Real> Workspace<T> {
    fn prepare(&mut self, n: usize, k: usize, nch: usize) {
        self.state.clear();
        self.state.resize(n, T::ONE);
        self.partials.clear();
        self.partials.resize(nch * k, T::ZERO);
        self.acc.clear();
        self.acc.resize(k, T::ZERO);
        self.colpot.clear();
        self.colpot.resize(k, T::ZERO);
    }
}

impl<T: Real> Problem<T> {
    fn solve_plain(
        &self,
        s: &[T],
        r: &[T],
        c: &[T],
        cmax: &[T],
        out: &mut [T],
        ws: &mut Workspace<T>,
    ) {
        let (n, k, inv_eps) = (self.n, self.k, self.inv_eps);
        let rpc = rows_per_chunk(k);
        let nch = n_chunks(n, rpc);
        ws.prepare(n, k, nch);
        let Workspace {
            state,
            partials,
            acc,
            colpot: v,
            scratch,
        } = ws;

        // Pass 0: cache E in `out` and take its column sums (u = 1).
        run_pass(
            n,
            rpc,
            state,
            1,
            out,
            k,
            partials,
            k,
            scratch,
            0,
            |rows, _u, o, p, _| {
                p.fill(T::ZERO);
                for (i, row) in rows.enumerate() {
                    let srow = &s[row * k..(row + 1) * k];
                    let orow = &mut o[i * k..(i + 1) * k];
                    for j in 0..k {
                        let e = ((srow[j] - cmax[j]) * inv_eps).exp_fast();
                        orow[j] = e;
                        p[j] += e;
                    }
                }
            },
        );
        reduce_partials(partials, nch, acc);
        for j in 0..k {
            v[j] = c[j] / acc[j];
        }

        for it in 0..self.n_iters {
            let last = it + 1 == self.n_iters;
            let vr: &[T] = v;
            run_pass(
                n,
                rpc,
                state,
                1,
                out,
                k,
                partials,
                k,
                scratch,
                0,
                |rows, u, o, p, _| {
                    p.fill(T::ZERO);
                    let row0 = rows.start;
                    for (i, row) in rows.enumerate() {
                        let orow = &mut o[i * k..(i + 1) * k];
                        let un = r[row] / dot(orow, vr);
                        u[row - row0] = un;
                        if last {
                            for j in 0..k {
                                orow[j] = orow[j] * vr[j] * un;
                            }
                        } else {
                            for j in 0..k {
                                p[j] += orow[j] * un;
                            }
                        }
                    }
                },
            );
            if !last {
                reduce_partials(partials, nch, acc);
                for j in 0..k {
                    v[j] = c[j] / acc[j];
                }
            }
        }
    }

    fn solve_log(
        &self,
        s: &[T],
        r: &[T],
        c: &[T],
        cmax: &[T],
        out: &mut [T],
        ws: &mut Workspace<T>,
    ) {
        let (n, k, inv_eps) = (self.n, self.k, self.inv_eps);
        let rpc = rows_per_chunk(k);
        let nch = n_chunks(n, rpc);
        ws.prepare(n, k, nch);
        let Workspace {
            state,
            partials,
            acc,
            colpot: bpot,
            scratch,
        } = ws;

        // Pass 0 (a = 0): column log-sum-exp of L = (S - colmax)/eps. L <= 0 with a 0 in every
        // column, so the plain sum of exp(L) lies in [1, n] and needs no further shift.
        run_pass(
            n,
            rpc,
            state,
            1,
            out,
            k,
            partials,
            k,
            scratch,
            0,
            |rows, a, _o, p, _| {
                p.fill(T::ZERO);
                a.fill(T::ZERO);
                for row in rows {
                    let srow = &s[row * k..(row + 1) * k];
                    for j in 0..k {
                        p[j] += ((srow[j] - cmax[j]) * inv_eps).exp_fast();
                    }
                }
            },
        );
        reduce_partials(partials, nch, acc);
        for j in 0..k {
            bpot[j] = c[j].ln() - acc[j].ln();
        }

        for it in 0..self.n_iters {
            let last = it + 1 == self.n_iters;
            let br: &[T] = bpot;
            run_pass(
                n,
                rpc,
                state,
                1,
                out,
                k,
                partials,
                k,
                scratch,
                k,
                |rows, a, o, p, t| {
                    p.fill(T::ZERO);
                    let row0 = rows.start;
                    for (i, row) in rows.enumerate() {
                        let srow = &s[row * k..(row + 1) * k];
                        for j in 0..k {
                            t[j] = (srow[j] - cmax[j]) * inv_eps + br[j];
                        }
                        let m = max(t);
                        for tj in t.iter_mut() {
                            *tj = (*tj - m).exp_fast();
                        }
                        let z = sum(t);
                        a[row - row0] = r[row].ln() - m - z.ln();
                        let scale = r[row] / z;
                        if last {
                            let orow = &mut o[i * k..(i + 1) * k];
                            for j in 0..k {
                                orow[j] = t[j] * scale;
                            }
                        } else {
                            for j in 0..k {
                                p[j] += t[j] * scale;
                            }
                        }
                    }
                },
            );
            if !last {
                reduce_partials(partials, nch, acc);
                // b_new = log c - LSE_n(L + a) = b + log(c / colsum(P)).
                for j in 0..k {
                    bpot[j] += (c[j] / acc[j]).ln();
                }
            }
        }
    }
}
