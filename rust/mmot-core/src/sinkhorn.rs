//! SwAV-style Sinkhorn-Knopp (DESIGN.md §2.1).
//!
//! Each iteration is a single streaming pass over rows: the column scaling `v` from the previous
//! pass's column sums is applied on the fly, the row scaling `u[n]` is computed, and the row's
//! contribution to the next column sums is accumulated. The last pass writes the output row.
//!
//! Plain domain: `E = exp((S - colmax)/eps)` is computed once and cached *in the output buffer*
//! (it has exactly the right size), so iterations never call `exp`; the column shift is absorbed
//! exactly by `v`. The first pass also takes the column statistics (max, range, finiteness), so
//! the scores are read once: each row chunk caches its `E` against its own column max, and the
//! per-chunk factors `exp((chunk max - colmax)/eps)` (bounded below by the plain domain's range
//! limit) are folded into `v` chunk by chunk.
//!
//! Log domain: nothing is cached; each row recomputes `t = (S - colmax)/eps + b` (b = log v),
//! shifts by its own row max and exponentiates once. The shifted exponentials divided by their
//! sum are exactly the row-normalised transport plan, whose column sums give the next `b` by a
//! multiplicative (log-additive) correction. This needs one `exp` per element per iteration and
//! no per-column log-sum-exp bookkeeping, because after a row normalisation every column mass is
//! bounded below by `col_mass * min(row_mass) / total`, so the sums cannot underflow.

use crate::chunks::{
    batch_col_stats, chunk_col_range, n_chunks, not_finite, reduce_partials, rows_per_chunk,
    run_pass,
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
    let p = Problem {
        n,
        k,
        eps,
        inv_eps: T::from_f64(1.0 / eps),
        n_iters,
    };
    let mut cmax = vec![T::ZERO; b * k];
    let log = if log_domain == LogDomain::On {
        let finite = batch_col_stats(scores, b, n, k, &mut cmax).1;
        if check_finite && !finite {
            return Err(not_finite("scores"));
        }
        true
    } else {
        // The plain domain goes first: its first pass also takes the column statistics that
        // decide the domain. In the rare call that turns out to need the log domain, the plain
        // results are discarded (a problem stops after that pass once it knows).
        let auto = log_domain == LogDomain::Auto;
        let range = out
            .par_chunks_mut(n * k)
            .zip(scores.par_chunks(n * k))
            .zip(row_mass.par_chunks(n))
            .zip(col_mass.par_chunks(k))
            .zip(cmax.par_chunks_mut(k))
            .map_init(Workspace::default, |ws, ((((o, s), r), c), cm)| {
                p.solve_plain(s, r, c, cm, o, ws, None, auto)
            })
            .reduce(|| 0.0, max_range);
        if check_finite && range.is_nan() {
            return Err(not_finite("scores"));
        }
        use_log_domain::<T>(log_domain, range / eps)
    };
    if log {
        out.par_chunks_mut(n * k)
            .zip(scores.par_chunks(n * k))
            .zip(row_mass.par_chunks(n))
            .zip(col_mass.par_chunks(k))
            .zip(cmax.par_chunks(k))
            .for_each_init(Workspace::default, |ws, ((((o, s), r), c), cm)| {
                p.solve_log(s, r, c, cm, o, ws, None)
            });
    }
    Ok(log)
}

/// Problems of at most this many elements take the small-problem path ([`small`]).
const SMALL: usize = 1024;

struct Problem<T> {
    n: usize,
    k: usize,
    eps: f64,
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
    /// Plain domain, per row chunk: `exp((chunk column max − column max)/eps)`, the factors
    /// that take the chunk's cached `E` to the common scale `exp((S − column max)/eps)`.
    corr: Vec<T>,
}

impl<T: Real> Workspace<T> {
    fn prepare(&mut self, n: usize, k: usize, nch: usize) {
        self.state.clear();
        self.state.resize(n, T::ONE);
        self.partials.clear();
        // Pass 0 of the plain domain keeps three values per column and chunk.
        self.partials.resize(nch * 3 * k, T::ZERO);
        self.acc.clear();
        self.acc.resize(k, T::ZERO);
        self.colpot.clear();
        self.colpot.resize(k, T::ZERO);
    }
}

impl<T: Real> Problem<T> {
    /// Fills `cmax` and returns the problem's largest column range (NaN for a non-finite
    /// score). With `auto`, stops after the first pass if that range calls for the log domain.
    /// With `hist`, records the potentials of every iteration and leaves the cached `E` (and
    /// `ws.corr`) instead of writing the plan (the backward's forward replay).
    #[allow(clippy::too_many_arguments)]
    fn solve_plain(
        &self,
        s: &[T],
        r: &[T],
        c: &[T],
        cmax: &mut [T],
        out: &mut [T],
        ws: &mut Workspace<T>,
        mut hist: Option<&mut History<T>>,
        auto: bool,
    ) -> f64 {
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
            corr,
        } = ws;

        // Pass 0 (u = 1): per chunk, the column max and min of its rows (read from memory
        // once), then E = exp((S − chunk column max)/eps) of the same rows (now in cache),
        // cached in `out`, and its column sums. The scores are read once in all.
        run_pass(
            n,
            rpc,
            state,
            1,
            out,
            k,
            partials,
            3 * k,
            scratch,
            k,
            #[inline(always)]
            |rows, _u, o, part, nf| {
                let (mx, rest) = part.split_at_mut(k);
                let (mn, sums) = rest.split_at_mut(k);
                let s = &s[rows.start * k..rows.end * k];
                chunk_col_range(s, k, mx, mn, nf);
                chunk_exp(s, k, mx, inv_eps, o, sums);
            },
        );
        let range = crate::simd::dispatch(
            #[inline(always)]
            || merge_pass0(partials, nch, k, inv_eps, cmax, corr, acc),
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
            let last = it + 1 == self.n_iters;
            if let Some(h) = hist.as_deref_mut() {
                h.col[it * k..(it + 1) * k].copy_from_slice(v);
            }
            let write = last && hist.is_none();
            let (vr, corr): (&[T], &[T]) = (v, corr);
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
                |rows, u, o, p, w| {
                    let ch = rows.start / rpc;
                    let (p, w, vr) = (&mut p[..k], &mut w[..k], &vr[..k]);
                    let corr = &corr[ch * k..(ch + 1) * k];
                    // The chunk's E times w is the common-scale E times v.
                    for j in 0..k {
                        w[j] = vr[j] * corr[j];
                    }
                    p.fill(T::ZERO);
                    let row0 = rows.start;
                    for (i, row) in rows.enumerate() {
                        let orow = &mut o[i * k..(i + 1) * k];
                        let un = r[row] / dot(orow, w);
                        u[row - row0] = un;
                        if write {
                            for j in 0..k {
                                orow[j] = orow[j] * w[j] * un;
                            }
                        } else if !last {
                            for j in 0..k {
                                p[j] += orow[j] * un;
                            }
                        }
                    }
                    if !last {
                        for j in 0..k {
                            p[j] *= corr[j];
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
        range
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
            corr: _,
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

/// `E = exp((S − m)/eps)` of a chunk of rows against the chunk's column max `m`, written to
/// `out`, and its column sums.
#[inline(always)]
fn chunk_exp<T: Real>(rows: &[T], k: usize, m: &[T], inv_eps: T, out: &mut [T], sums: &mut [T]) {
    let (m, sums) = (&m[..k], &mut sums[..k]);
    sums.fill(T::ZERO);
    for (srow, orow) in rows.chunks_exact(k).zip(out.chunks_exact_mut(k)) {
        let (srow, orow) = (&srow[..k], &mut orow[..k]);
        for j in 0..k {
            let e = ((srow[j] - m[j]) * inv_eps).exp_fast();
            orow[j] = e;
            sums[j] += e;
        }
    }
}

/// Merges pass 0's per-chunk `[max | min | sums]` in chunk order: the column max `cmax`, the
/// factors `corr` from each chunk's scale to the common one, and the column sums of the
/// common-scale `E` (`acc`). Returns the largest column range, NaN if a score is not finite.
#[inline(always)]
fn merge_pass0<T: Real>(
    parts: &[T],
    nch: usize,
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
    for p in parts.chunks_exact(3 * k).take(nch) {
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
    corr.resize(nch * k, T::ZERO);
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
fn max_range(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
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
        eps,
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
    /// The plain replay's column max (equal to the caller's: a max is exact).
    cmax: Vec<T>,
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
            cmax: plain_cmax,
            ratio,
            bbc,
        } = bw;
        plan.clear();
        plan.resize(n * k, T::ZERO);
        if log {
            self.solve_log(s, r, c, cmax, plan, fwd, Some(hist));
        } else {
            plain_cmax.resize(k, T::ZERO);
            self.solve_plain(s, r, c, plain_cmax, plan, fwd, Some(hist), false);
        }
        let rpc = rows_per_chunk(k);
        let nch = n_chunks(n, rpc);
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
                rpc,
                state,
                1,
                out,
                k,
                partials,
                k,
                scratch,
                2 * k,
                #[inline(always)]
                |rows, _st, o, part, scr| {
                    let (pr, bc) = scr.split_at_mut(k);
                    chunk_cols(rows.start / rpc, bt, bc);
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
                2 * k,
                #[inline(always)]
                |rows, _st, o, part, scr| {
                    let (pc, bc) = scr.split_at_mut(k);
                    chunk_cols(rows.start / rpc, bt, bc);
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
                reduce_partials(partials, nch, acc);
            }
        }
    }
}

#[path = "sinkhorn_small.rs"]
mod small;
