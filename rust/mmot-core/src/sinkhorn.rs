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

use crate::chunks::{
    batch_col_stats, n_chunks, not_finite, reduce_partials, rows_per_chunk, run_pass,
};
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
    sinkhorn_checked(
        scores, row_mass, col_mass, out, b, n, k, eps, n_iters, log_domain, false,
    )
}

/// [`sinkhorn`], and with `check_finite` an error (not a result) for NaN or Inf in `scores`,
/// found in the column-statistics pass the kernel makes anyway.
#[allow(clippy::too_many_arguments)]
pub fn sinkhorn_checked<T: Real>(
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
    check_finite: bool,
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
    if n * k <= SMALL {
        return small::sinkhorn(
            scores,
            row_mass,
            col_mass,
            out,
            b,
            n,
            k,
            eps,
            n_iters,
            log_domain,
            check_finite,
        );
    }
    let mut cmax = vec![T::ZERO; b * k];
    let (range, finite) = batch_col_stats(scores, b, n, k, &mut cmax);
    if check_finite && !finite {
        return Err(not_finite("scores"));
    }
    let range = range / eps;
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
                p.solve_log(s, r, c, cm, o, ws, None)
            } else {
                p.solve_plain(s, r, c, cm, o, ws, None)
            }
        });
    Ok(log)
}

/// Problems of at most this many elements take the small-problem path ([`small`]).
const SMALL: usize = 1024;

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
    /// With `hist`, records the potentials of every iteration and leaves the cached `E` in
    /// `out` instead of writing the plan (the backward's forward replay).
    #[allow(clippy::too_many_arguments)]
    fn solve_plain(
        &self,
        s: &[T],
        r: &[T],
        c: &[T],
        cmax: &[T],
        out: &mut [T],
        ws: &mut Workspace<T>,
        mut hist: Option<&mut History<T>>,
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
            #[inline(always)]
            |rows, _u, o, p, _| {
                // Re-sliced to exactly k so that the loops carry no bounds checks and vectorise.
                let p = &mut p[..k];
                let cmax = &cmax[..k];
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

        if let Some(h) = hist.as_deref_mut() {
            h.start(n, k, self.n_iters, T::ONE);
        }
        for it in 0..self.n_iters {
            let last = it + 1 == self.n_iters;
            if let Some(h) = hist.as_deref_mut() {
                h.col[it * k..(it + 1) * k].copy_from_slice(v);
            }
            let write = last && hist.is_none();
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
                #[inline(always)]
                |rows, u, o, p, _| {
                    let p = &mut p[..k];
                    let vr = &vr[..k];
                    p.fill(T::ZERO);
                    let row0 = rows.start;
                    for (i, row) in rows.enumerate() {
                        let orow = &mut o[i * k..(i + 1) * k];
                        let un = r[row] / dot(orow, vr);
                        u[row - row0] = un;
                        if write {
                            for j in 0..k {
                                orow[j] = orow[j] * vr[j] * un;
                            }
                        } else if !last {
                            for j in 0..k {
                                p[j] += orow[j] * un;
                            }
                        }
                    }
                },
            );
            if let Some(h) = hist.as_deref_mut() {
                h.row[(it + 1) * n..(it + 2) * n].copy_from_slice(state);
            }
            if !last {
                reduce_partials(partials, nch, acc);
                for j in 0..k {
                    v[j] = c[j] / acc[j];
                }
            }
        }
    }

    /// With `hist`, records the log potentials of every iteration (the plan is still written).
    #[allow(clippy::too_many_arguments)]
    fn solve_log(
        &self,
        s: &[T],
        r: &[T],
        c: &[T],
        cmax: &[T],
        out: &mut [T],
        ws: &mut Workspace<T>,
        mut hist: Option<&mut History<T>>,
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
            #[inline(always)]
            |rows, a, _o, p, _| {
                let p = &mut p[..k];
                let cmax = &cmax[..k];
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

        if let Some(h) = hist.as_deref_mut() {
            h.start(n, k, self.n_iters, T::ZERO);
        }
        for it in 0..self.n_iters {
            let last = it + 1 == self.n_iters;
            if let Some(h) = hist.as_deref_mut() {
                h.col[it * k..(it + 1) * k].copy_from_slice(bpot);
            }
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
                #[inline(always)]
                |rows, a, o, p, t| {
                    let (p, t, cmax, br) = (&mut p[..k], &mut t[..k], &cmax[..k], &br[..k]);
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
            if let Some(h) = hist.as_deref_mut() {
                h.row[(it + 1) * n..(it + 2) * n].copy_from_slice(state);
            }
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

/// Potentials of every iteration of one problem, recorded by the forward replay of the
/// backward: `row[t]` is `u_t` (or `log u_t`) for `t = 0..=T`, `col[t-1]` is `v_t` (or
/// `log v_t`) for `t = 1..=T`.
#[derive(Default)]
struct History<T> {
    row: Vec<T>,
    col: Vec<T>,
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

/// The exact vector-Jacobian product of [`sinkhorn`] with respect to `scores`: `out =
/// (∂P/∂scores)ᵀ grad` for the unrolled `n_iters` iterations (DESIGN.md §2.4).
///
/// The forward is replayed once, recording the `O(T (N + K))` potentials; the reverse sweep is
/// then `T + 1` streaming passes over rows. With `α_t = log u_t`, `β_t = log v_t` and
/// `L = scores / eps`, iteration `t` is `β_t = log c − LSE_n(L + α_{t−1})` followed by
/// `α_t = log r − LSE_a(L + β_t)`, so each step's adjoint is its input adjoint times minus
/// the normalised plan of that step. Reverse pass `t` applies the column step `t`, which only
/// needs the finished column adjoint `β̄_t`, and then the row step `t − 1` of the same row,
/// whose column sums give `β̄_{t−1}` for the next pass. The domain is chosen exactly as in the
/// forward, so the gradient is as stable as the forward.
#[allow(clippy::too_many_arguments)]
pub fn sinkhorn_backward<T: Real>(
    grad: &[T],
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
    check_len("grad", grad.len(), b * n * k, &shape)?;
    check_len("scores", scores.len(), b * n * k, &shape)?;
    check_len("out", out.len(), b * n * k, &shape)?;
    check_len("row_mass", row_mass.len(), b * n, &format!("[{b}, {n}]"))?;
    check_len("col_mass", col_mass.len(), b * k, &format!("[{b}, {k}]"))?;
    check_eps_iters(eps, n_iters)?;
    if b * n * k == 0 {
        return Ok(use_log_domain::<T>(log_domain, 0.0));
    }
    let mut cmax = vec![T::ZERO; b * k];
    let range = batch_col_stats(scores, b, n, k, &mut cmax).0 / eps;
    let log = use_log_domain::<T>(log_domain, range);
    let p = Problem {
        n,
        k,
        inv_eps: T::from_f64(1.0 / eps),
        n_iters,
    };
    out.par_chunks_mut(n * k)
        .zip(grad.par_chunks(n * k))
        .zip(scores.par_chunks(n * k))
        .zip(row_mass.par_chunks(n))
        .zip(col_mass.par_chunks(k))
        .zip(cmax.par_chunks(k))
        .for_each_init(BackWorkspace::default, |bw, (((((o, g), s), r), c), cm)| {
            p.backward(g, s, r, c, cm, o, bw, log)
        });
    Ok(log)
}

#[derive(Default)]
struct BackWorkspace<T> {
    fwd: Workspace<T>,
    hist: History<T>,
    /// The forward's output buffer: the cached `E` (plain) or the unused plan (log).
    plan: Vec<T>,
    /// `ρ = v_{t−1} / v_t` and `β̄_t / c` of the current pass.
    ratio: Vec<T>,
    bbc: Vec<T>,
}

impl<T: Real> Problem<T> {
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        grad: &[T],
        s: &[T],
        r: &[T],
        c: &[T],
        cmax: &[T],
        out: &mut [T],
        bw: &mut BackWorkspace<T>,
        log: bool,
    ) {
        let (n, k, inv_eps, iters) = (self.n, self.k, self.inv_eps, self.n_iters);
        let BackWorkspace {
            fwd,
            hist,
            plan,
            ratio,
            bbc,
        } = bw;
        plan.clear();
        plan.resize(n * k, T::ZERO);
        if log {
            self.solve_log(s, r, c, cmax, plan, fwd, Some(hist));
        } else {
            self.solve_plain(s, r, c, cmax, plan, fwd, Some(hist));
        }
        let rpc = rows_per_chunk(k);
        let nch = n_chunks(n, rpc);
        let Workspace {
            state,
            partials,
            acc,
            scratch,
            ..
        } = fwd;
        let cache: &[T] = plan;
        let hist: &History<T> = hist;
        // One row of the plan exp(L + α + β) for row potential `a` and column potentials `bp`.
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
                &hist.col[(iters - 1) * k..],
            );
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
                #[inline(always)]
                |rows, _st, o, part, pr| {
                    part.fill(T::ZERO);
                    for (i, row) in rows.enumerate() {
                        plan_row(row, at[row], bt, pr);
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
            reduce_partials(partials, nch, acc);
        }

        ratio.clear();
        ratio.resize(k, T::ZERO);
        bbc.clear();
        bbc.resize(k, T::ZERO);
        for t in (1..=iters).rev() {
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
                rpc,
                state,
                1,
                out,
                k,
                partials,
                k,
                scratch,
                k,
                #[inline(always)]
                |rows, _st, o, part, pc| {
                    part.fill(T::ZERO);
                    for (i, row) in rows.enumerate() {
                        // Column step t: Pc = exp(L + α_{t−1} + β_t), columns summing to c.
                        plan_row(row, at[row], bt, pc);
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
                reduce_partials(partials, nch, acc);
            }
        }
    }
}

#[path = "sinkhorn_small.rs"]
mod small;
