//! The forward of one problem, in a per-worker contiguous scratch, in either domain. The
//! backward replays it with `record` set to keep every iteration's potentials.
//!
//! Scratch layout: the valid `[n, k]` block, rows padded to `kc` blocks of [`W`] lanes (so
//! `ks = kc * W >= k` columns), as `Vec<[T; W]>`; every inner loop is a fixed-width lane
//! operation that LLVM vectorises, and the padding lanes are neutral: 0 in the plain domain's
//! cached kernel and its scalings, `-inf` scores and column potentials in the log domain (so
//! their exponentials are 0). Reductions run in a fixed order.
//!
//! Plain domain (balanced, no schedule): `K = exp((S + f0 − m)/eps)` with `m` the column max of
//! `S + f0`, cached once; `v = c / Kᵀu`, `u = r / (K v)` with `u = exp((f − f0)/eps)`,
//! `v = exp((g + m)/eps)`, so an iteration is one pass of two multiply-adds per element.
//! Log domain: the row step is one `exp` per element (row max shift), and it also accumulates
//! the column sums `C` of the new plan, which give both the marginal error and, while eps
//! stays the same, the next column step's log-sum-exp (`LSE_i((S+f)/e) = ln C − g/e`); when eps
//! changes (the schedule), at the start, or when a `C` is too small to trust, the column step
//! takes an exact two-pass (max, then sum) log-sum-exp instead.

use super::One;
use crate::domain::LogDomain;
use crate::interrupt::Interrupt;
use crate::simd::{dispatch, Real};
use rayon::prelude::*;
use std::marker::PhantomData;

/// Lanes per block of a scratch row (one 512-bit register of f32; measured ~9% faster than 8
/// on the ragged 4..64 benchmark despite the extra row padding).
pub(super) const W: usize = 16;
pub(super) type Blk<T> = [T; W];

/// What every problem of a call shares (built in `mod.rs`).
pub(crate) struct Problem<T> {
    pub eps: f64,
    pub decay: f64,
    pub n_iters: usize,
    pub tol: f64,
    pub reach: f64,
    pub log_domain: LogDomain,
    pub interrupt: Interrupt,
    pub _t: PhantomData<T>,
}

/// Per-worker buffers, reused across the problems of a batch.
#[derive(Default)]
pub(crate) struct Workspace<T> {
    /// `[n, kc]`: plain `K`, or log `S` (pad `-inf`).
    pub x: Vec<Blk<T>>,
    /// `[kc]`: plain `v` (pad 0), or log `g` (pad `-inf`).
    pub col: Vec<Blk<T>>,
    /// `[kc]`: column sums.
    pub acc: Vec<Blk<T>>,
    /// `[kc]`: column max (plain shift `m`; log column max).
    pub cmax: Vec<Blk<T>>,
    /// `[kc]`: log domain, the column log-sum-exp of the last column step (pad 0).
    pub lc: Vec<Blk<T>>,
    /// `[n]`: plain `u`, or log `f`.
    pub row: Vec<T>,
    /// `[n]`: log domain, the row log-sum-exp of the last row step.
    pub lr: Vec<T>,
    /// `[kc]`: one row's exponentials.
    pub t: Vec<Blk<T>>,
    /// Large problems: per row chunk, partial column sums (or maxima), `[chunks, kc]`.
    pub parts: Vec<Blk<T>>,
    /// `[k]` column max and min of `S + f0` (domain statistics).
    pub mx: Vec<T>,
    pub mn: Vec<T>,
    /// `[k]` per-column finiteness sums (see [`column_stats`]).
    pub nf: Vec<T>,
    pub hist: History<T>,
    /// Backward: `[n, kc]` gradient and result, `[kc]` column adjoints.
    pub gp: Vec<Blk<T>>,
    pub out: Vec<Blk<T>>,
    pub bg: Vec<Blk<T>>,
    pub nbg: Vec<Blk<T>>,
    pub wg: Vec<Blk<T>>,
}

/// Every iteration's state, recorded by the backward's replay: iteration `t` has `row[t]`
/// (`[n]`: u or f), `col[t]` (`[kc]`: v or g); in the log domain also `lr[t]` (`[n]`), `lc[t]`
/// (`[kc]`) and its eps `e[t]`.
#[derive(Default)]
pub(crate) struct History<T> {
    pub row: Vec<T>,
    pub col: Vec<Blk<T>>,
    pub lr: Vec<T>,
    pub lc: Vec<Blk<T>>,
    pub e: Vec<f64>,
}

impl<T: Real> History<T> {
    fn clear(&mut self) {
        self.row.clear();
        self.col.clear();
        self.lr.clear();
        self.lc.clear();
        self.e.clear();
    }
}

/// The result of one problem's forward.
pub(crate) struct Solved<T> {
    pub iters: usize,
    pub err: T,
    /// `log_domain = "off"` where the plain domain is not safe (the call fails).
    pub too_wide: bool,
}

/// How a problem is solved.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    Plain,
    Log,
    /// A non-finite valid score: all-NaN results.
    NonFinite,
    /// Forced plain where it is not safe.
    TooWide,
}

/// The outputs of one problem: its padded `[N, K]` plan, `[N]` f and `[K]` g.
pub(super) type Outs<'a, T> = (&'a mut [T], &'a mut [T], &'a mut [T]);

impl<T: Real> Problem<T> {
    pub(super) fn balanced(&self) -> bool {
        self.reach == f64::INFINITY
    }

    /// `tau` at eps `e`.
    pub(super) fn tau(&self, e: f64) -> f64 {
        if self.balanced() {
            1.0
        } else {
            self.reach / (self.reach + e)
        }
    }

    /// The forward of one problem into its padded outputs (the plan's padding is not written).
    pub(super) fn forward(
        &self,
        one: &One<'_, T>,
        ws: &mut Workspace<T>,
        (plan, f, g): Outs<'_, T>,
    ) -> Solved<T> {
        dispatch(
            #[inline(always)]
            || {
                let (n, k, stride) = (one.n, one.k, one.stride);
                f.fill(T::ZERO);
                g.fill(T::ZERO);
                let route = self.route(one, ws);
                let nan = T::from_f64(f64::NAN);
                match route {
                    Route::NonFinite | Route::TooWide => {
                        if route == Route::NonFinite {
                            for i in 0..n {
                                plan[i * stride..i * stride + k].fill(nan);
                            }
                            f[..n].fill(nan);
                            g[..k].fill(nan);
                        }
                        Solved {
                            iters: self.n_iters,
                            err: nan,
                            too_wide: route == Route::TooWide,
                        }
                    }
                    Route::Plain => {
                        let (iters, err) = self.solve_plain(one, ws, self.n_iters, self.tol, false);
                        self.write_plain(one, ws, plan, f, g);
                        Solved {
                            iters,
                            err,
                            too_wide: false,
                        }
                    }
                    Route::Log => {
                        let (iters, err, e) =
                            self.solve_log(one, ws, self.n_iters, self.tol, false);
                        self.write_log(one, ws, e, plan, f, g);
                        Solved {
                            iters,
                            err,
                            too_wide: false,
                        }
                    }
                }
            },
        )
    }

    /// The domain of one problem, from the call's mode, its schedule and reach, and the column
    /// spread of its valid `S + f0` (also its finiteness), taken in one pass.
    #[inline(always)]
    pub(super) fn route(&self, one: &One<'_, T>, ws: &mut Workspace<T>) -> Route {
        if !column_stats(one, &mut ws.mx, &mut ws.mn, &mut ws.nf) {
            return Route::NonFinite;
        }
        self.route_of(one.eps_start, column_range(&ws.mx, &ws.mn))
    }

    /// The domain of a finite problem from its schedule start and the largest column spread
    /// of its valid `S + f0` (shared with the lane path, which takes the statistics itself).
    #[inline(always)]
    pub(super) fn route_of(&self, eps_start: f64, spread: f64) -> Route {
        let scheduled = eps_start > self.eps;
        let log_only = scheduled || !self.balanced();
        let range = spread / self.eps;
        let wide = range.is_nan() || range > T::PLAIN_RANGE_LIMIT;
        match self.log_domain {
            LogDomain::On => Route::Log,
            _ if log_only => Route::Log,
            LogDomain::Off if wide => Route::TooWide,
            LogDomain::Off => Route::Plain,
            LogDomain::Auto if wide => Route::Log,
            LogDomain::Auto => Route::Plain,
        }
    }

    /// Plain domain: caches `K` in `ws.x` (from `ws.mx`, the column max of `S + f0` left by
    /// [`Problem::route`]), then runs up to `max_iters` iterations (stopping at `tol` if >= 0).
    /// Leaves `u` in `ws.row`, `v` in `ws.col`, the shift `m` in `ws.cmax`; returns the
    /// iterations run and the last marginal error. With `record`, keeps every `u`, `v`.
    #[inline(always)]
    pub(super) fn solve_plain(
        &self,
        one: &One<'_, T>,
        ws: &mut Workspace<T>,
        max_iters: usize,
        tol: f64,
        record: bool,
    ) -> (usize, T) {
        let (n, k, stride) = (one.n, one.k, one.stride);
        let kc = k.div_ceil(W);
        let ie = T::from_f64(1.0 / self.eps);
        let (r, c, f0) = (&one.row_mass[..n], &one.col_mass[..k], &one.init_f[..n]);
        let zero = [T::ZERO; W];
        let Workspace {
            x,
            col: v,
            acc,
            cmax,
            row: u,
            mx,
            hist,
            parts,
            ..
        } = ws;
        reset(x, n * kc, zero);
        reset(v, kc, zero);
        reset(acc, kc, zero);
        reset(cmax, kc, zero);
        u.clear();
        u.resize(n, T::ONE);
        hist.clear();
        cmax.as_flattened_mut()[..k].copy_from_slice(&mx[..k]);
        let m = &cmax.as_flattened()[..k];
        {
            let xf = x.as_flattened_mut();
            let accf = acc.as_flattened_mut();
            for i in 0..n {
                let (srow, fi) = (&one.scores[i * stride..i * stride + k], f0[i]);
                let xrow = &mut xf[i * kc * W..i * kc * W + k];
                for j in 0..k {
                    let e = ((srow[j] + fi - m[j]) * ie).exp_fast();
                    xrow[j] = e;
                    accf[j] += e;
                }
            }
        }
        set_ratio(c, &acc.as_flattened()[..k], &mut v.as_flattened_mut()[..k]);
        let mut err = T::ZERO;
        let mut iters = 0;
        for it in 0..max_iters {
            if self.interrupt.requested() {
                break;
            }
            match chunk_rows(n, kc) {
                None => {
                    acc.fill(zero);
                    plain_pass(x, kc, v, r, u, acc);
                }
                Some(cr) => {
                    reset(parts, n.div_ceil(cr) * kc, zero);
                    let v = &v[..];
                    x.par_chunks(cr * kc)
                        .zip(r.par_chunks(cr))
                        .zip(u.par_chunks_mut(cr))
                        .zip(parts.par_chunks_mut(kc))
                        .for_each(|(((xb, rb), ub), pb)| {
                            dispatch(
                                #[inline(always)]
                                || plain_pass(xb, kc, v, rb, ub, pb),
                            )
                        });
                    sum_parts(parts, kc, acc);
                }
            }
            // The plan's column sums are v * (Kᵀu).
            let (vf, af) = (&v.as_flattened()[..k], &acc.as_flattened()[..k]);
            err = (0..k).fold(T::ZERO, |e, j| {
                nan_max(e, ((vf[j] * af[j] - c[j]) / c[j]).abs())
            });
            if record {
                hist.row.extend_from_slice(u);
                hist.col.extend_from_slice(v);
            }
            iters = it + 1;
            if iters == max_iters || (tol >= 0.0 && err.to_f64() <= tol) {
                break;
            }
            set_ratio(c, af, &mut v.as_flattened_mut()[..k]);
        }
        (iters, err)
    }

    /// The plain domain's outputs: plan `K v u`, `f = f0 + eps ln u`, `g = eps ln v − m`.
    #[inline(always)]
    fn write_plain(
        &self,
        one: &One<'_, T>,
        ws: &Workspace<T>,
        plan: &mut [T],
        f: &mut [T],
        g: &mut [T],
    ) {
        let (n, k, stride) = (one.n, one.k, one.stride);
        let kc = k.div_ceil(W);
        let eps = T::from_f64(self.eps);
        let (xf, v, u) = (ws.x.as_flattened(), &ws.col.as_flattened()[..k], &ws.row);
        let m = &ws.cmax.as_flattened()[..k];
        for i in 0..n {
            let (xrow, prow) = (
                &xf[i * kc * W..i * kc * W + k],
                &mut plan[i * stride..i * stride + k],
            );
            let ui = u[i];
            for j in 0..k {
                prow[j] = xrow[j] * v[j] * ui;
            }
            f[i] = one.init_f[i] + eps * u[i].ln();
        }
        for j in 0..k {
            g[j] = eps * v[j].ln() - m[j];
        }
    }

    /// Log domain: packs `S` into `ws.x` and runs up to `max_iters` iterations of the schedule
    /// (stopping at `tol` if >= 0, at the final eps only). Leaves `f` in `ws.row`, `g` in
    /// `ws.col`; returns the iterations run, the last marginal error and the last eps. With
    /// `record`, keeps every iteration's `f`, `g`, row and column log-sum-exps and eps.
    #[inline(always)]
    pub(super) fn solve_log(
        &self,
        one: &One<'_, T>,
        ws: &mut Workspace<T>,
        max_iters: usize,
        tol: f64,
        record: bool,
    ) -> (usize, T, f64) {
        let (n, k, stride) = (one.n, one.k, one.stride);
        let kc = k.div_ceil(W);
        let (r, c) = (&one.row_mass[..n], &one.col_mass[..k]);
        let balanced = self.balanced();
        let Workspace {
            x,
            col: g,
            acc,
            cmax,
            lc,
            row: f,
            lr,
            t,
            hist,
            parts,
            ..
        } = ws;
        let ninf = [T::NEG_INFINITY; W];
        let zero = [T::ZERO; W];
        reset(x, n * kc, ninf);
        reset(g, kc, ninf);
        reset(acc, kc, zero);
        reset(cmax, kc, zero);
        reset(lc, kc, zero);
        reset(t, kc, zero);
        f.clear();
        f.extend_from_slice(&one.init_f[..n]);
        lr.clear();
        lr.resize(n, T::ZERO);
        hist.clear();
        {
            let xf = x.as_flattened_mut();
            for i in 0..n {
                xf[i * kc * W..i * kc * W + k]
                    .copy_from_slice(&one.scores[i * stride..i * stride + k]);
            }
        }
        let mut e_sched = one.eps_start;
        let mut prev_e = f64::NAN;
        let mut sums_ok = false;
        let (mut err, mut iters, mut e_last) = (T::ZERO, 0, self.eps);
        for it in 0..max_iters {
            if self.interrupt.requested() {
                break;
            }
            let e = self.eps.max(e_sched);
            e_sched *= self.decay;
            let tau = self.tau(e);
            let (et, ie, taut) = (T::from_f64(e), T::from_f64(1.0 / e), T::from_f64(tau));
            let (gf, lcf) = (
                &mut g.as_flattened_mut()[..k],
                &mut lc.as_flattened_mut()[..k],
            );
            if e == prev_e && sums_ok {
                // LSE_i((S + f)/e) = ln C − g/e, with C the current plan's column sums.
                let cs = &acc.as_flattened()[..k];
                for j in 0..k {
                    let lnc = cs[j].ln();
                    lcf[j] = lnc - gf[j] * ie;
                    gf[j] = if balanced {
                        gf[j] + et * (c[j].ln() - lnc)
                    } else {
                        et * c[j].ln() - taut * et * lcf[j]
                    };
                }
            } else {
                col_lse(x, kc, f, ie, cmax, acc, parts);
                let (mf, sf) = (&cmax.as_flattened()[..k], &acc.as_flattened()[..k]);
                for j in 0..k {
                    lcf[j] = mf[j] * ie + sf[j].ln();
                    gf[j] = et * c[j].ln() - taut * et * lcf[j];
                }
            }
            // Row step, with the new plan's column sums.
            let step = LogRows {
                kc,
                ie,
                et,
                taut,
                balanced,
            };
            match chunk_rows(n, kc) {
                None => {
                    acc.fill(zero);
                    step.pass(x, g, r, f, lr, t, acc);
                }
                Some(cr) => {
                    reset(parts, n.div_ceil(cr) * kc, zero);
                    let g = &g[..];
                    x.par_chunks(cr * kc)
                        .zip(r.par_chunks(cr))
                        .zip(f.par_chunks_mut(cr))
                        .zip(lr.par_chunks_mut(cr))
                        .zip(parts.par_chunks_mut(kc))
                        .for_each(|((((xb, rb), fb), lb), pb)| {
                            let mut t = vec![zero; kc];
                            dispatch(
                                #[inline(always)]
                                || step.pass(xb, g, rb, fb, lb, &mut t, pb),
                            )
                        });
                    sum_parts(parts, kc, acc);
                }
            }
            let (cs, gf) = (&acc.as_flattened()[..k], &g.as_flattened()[..k]);
            sums_ok = cs.iter().all(|&s| s >= T::TINY && s < T::INFINITY);
            err = if balanced {
                (0..k).fold(T::ZERO, |a, j| nan_max(a, ((cs[j] - c[j]) / c[j]).abs()))
            } else {
                let one_minus = T::from_f64(1.0 - tau);
                (0..k).fold(T::ZERO, |a, j| {
                    let ratio = (taut * cs[j].ln() - c[j].ln() + one_minus * gf[j] * ie).exp_fast();
                    nan_max(a, (ratio - T::ONE).abs())
                })
            };
            if record {
                hist.row.extend_from_slice(f);
                hist.col.extend_from_slice(g);
                hist.lr.extend_from_slice(lr);
                hist.lc.extend_from_slice(lc);
                hist.e.push(e);
            }
            prev_e = e;
            e_last = e;
            iters = it + 1;
            if tol >= 0.0 && e == self.eps && err.to_f64() <= tol {
                break;
            }
        }
        (iters, err, e_last)
    }

    /// The log domain's outputs: plan `exp((S + f + g)/e)`, f and g.
    #[inline(always)]
    fn write_log(
        &self,
        one: &One<'_, T>,
        ws: &Workspace<T>,
        e: f64,
        plan: &mut [T],
        f: &mut [T],
        g: &mut [T],
    ) {
        let (n, k, stride) = (one.n, one.k, one.stride);
        let kc = k.div_ceil(W);
        let ie = T::from_f64(1.0 / e);
        let (xf, gf) = (ws.x.as_flattened(), &ws.col.as_flattened()[..k]);
        for i in 0..n {
            let (xrow, prow) = (
                &xf[i * kc * W..i * kc * W + k],
                &mut plan[i * stride..i * stride + k],
            );
            let fi = ws.row[i];
            for j in 0..k {
                prow[j] = ((xrow[j] + fi + gf[j]) * ie).exp_fast();
            }
            f[i] = fi;
        }
        g[..k].copy_from_slice(gf);
    }
}

/// Rows per block of [`plain_rows`].
const ROWS: usize = 4;

/// One plain-domain row step for `R` rows `x` (`[R, kc]`) with masses `r`: `u = r / (x · v)`,
/// then `acc += x u` (the column sums of `K u`).
#[inline(always)]
fn plain_rows<T: Real, const R: usize>(
    x: &[Blk<T>],
    kc: usize,
    v: &[Blk<T>],
    r: &[T],
    u: &mut [T],
    acc: &mut [Blk<T>],
) {
    let mut d = [[T::ZERO; W]; R];
    for c in 0..kc {
        let vc = v[c];
        for i in 0..R {
            let xv = x[i * kc + c];
            for l in 0..W {
                d[i][l] += xv[l] * vc[l];
            }
        }
    }
    let mut ui = [T::ZERO; R];
    for i in 0..R {
        ui[i] = r[i] / hsum(d[i]);
        u[i] = ui[i];
    }
    for (c, a) in acc.iter_mut().enumerate().take(kc) {
        let mut av = *a;
        for i in 0..R {
            let xv = x[i * kc + c];
            for l in 0..W {
                av[l] += xv[l] * ui[i];
            }
        }
        *a = av;
    }
}

/// Sum of a block's lanes, in a fixed order.
#[inline(always)]
pub(super) fn hsum<T: Real>(d: Blk<T>) -> T {
    let mut a = d;
    let mut w = W;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            let hi = a[l + w];
            a[l] += hi;
        }
    }
    a[0]
}

/// Max of a block's lanes.
#[inline(always)]
fn hmax<T: Real>(d: Blk<T>) -> T {
    let mut a = d;
    let mut w = W;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            a[l] = a[l].fmax(a[l + w]);
        }
    }
    a[0]
}

/// One log-domain row: `t = exp((s + g)/e − m)` with `m` the row max; returns `(m, Σ t)`.
#[inline(always)]
pub(super) fn row_exp<T: Real>(srow: &[Blk<T>], g: &[Blk<T>], ie: T, t: &mut [Blk<T>]) -> (T, T) {
    let mut mx = [T::NEG_INFINITY; W];
    for ((tb, sb), gb) in t.iter_mut().zip(srow).zip(g) {
        let (sv, gv) = (*sb, *gb);
        let mut tv = [T::ZERO; W];
        for l in 0..W {
            tv[l] = (sv[l] + gv[l]) * ie;
            mx[l] = mx[l].fmax(tv[l]);
        }
        *tb = tv;
    }
    let m = hmax(mx);
    let mut z = [T::ZERO; W];
    for tb in t.iter_mut() {
        let mut tv = *tb;
        for l in 0..W {
            tv[l] = (tv[l] - m).exp_fast();
            z[l] += tv[l];
        }
        *tb = tv;
    }
    (m, hsum(z))
}

/// The exact column log-sum-exp of `(S + f)/e` in two passes: the column max of `S + f` into
/// `cmax`, then `Σ_i exp((S + f − cmax)/e)` into `sums` (padding lanes hold NaN, unused); in
/// row chunks on the pool for a large problem.
#[inline(always)]
fn col_lse<T: Real>(
    x: &[Blk<T>],
    kc: usize,
    f: &[T],
    ie: T,
    cmax: &mut [Blk<T>],
    sums: &mut [Blk<T>],
    parts: &mut Vec<Blk<T>>,
) {
    let n = f.len();
    cmax.fill([T::NEG_INFINITY; W]);
    sums.fill([T::ZERO; W]);
    match chunk_rows(n, kc) {
        None => {
            col_max(x, kc, f, cmax);
            col_sum(x, kc, f, ie, cmax, sums);
        }
        Some(cr) => {
            reset(parts, n.div_ceil(cr) * kc, [T::NEG_INFINITY; W]);
            x.par_chunks(cr * kc)
                .zip(f.par_chunks(cr))
                .zip(parts.par_chunks_mut(kc))
                .for_each(|((xb, fb), pb)| {
                    dispatch(
                        #[inline(always)]
                        || col_max(xb, kc, fb, pb),
                    )
                });
            for p in parts.chunks_exact(kc) {
                for (m, pb) in cmax.iter_mut().zip(p) {
                    let (mut mv, pv) = (*m, *pb);
                    for l in 0..W {
                        mv[l] = mv[l].fmax(pv[l]);
                    }
                    *m = mv;
                }
            }
            parts.fill([T::ZERO; W]);
            let cmax = &cmax[..];
            x.par_chunks(cr * kc)
                .zip(f.par_chunks(cr))
                .zip(parts.par_chunks_mut(kc))
                .for_each(|((xb, fb), pb)| {
                    dispatch(
                        #[inline(always)]
                        || col_sum(xb, kc, fb, ie, cmax, pb),
                    )
                });
            sum_parts(parts, kc, sums);
        }
    }
}

/// `cmax = max(cmax, column max of S + f)` over the rows of `x`.
#[inline(always)]
fn col_max<T: Real>(x: &[Blk<T>], kc: usize, f: &[T], cmax: &mut [Blk<T>]) {
    for (xrow, &fi) in x.chunks_exact(kc).zip(f) {
        for (m, xb) in cmax.iter_mut().zip(xrow) {
            let (mut mv, xv) = (*m, *xb);
            for l in 0..W {
                mv[l] = mv[l].fmax(xv[l] + fi);
            }
            *m = mv;
        }
    }
}

/// `sums += Σ_i exp((S + f − cmax)/e)` over the rows of `x`.
#[inline(always)]
fn col_sum<T: Real>(x: &[Blk<T>], kc: usize, f: &[T], ie: T, cmax: &[Blk<T>], sums: &mut [Blk<T>]) {
    for (xrow, &fi) in x.chunks_exact(kc).zip(f) {
        for ((s, xb), m) in sums.iter_mut().zip(xrow).zip(cmax.iter()) {
            let (mut sv, xv, mv) = (*s, *xb, *m);
            for l in 0..W {
                sv[l] += ((xv[l] + fi - mv[l]) * ie).exp_fast();
            }
            *s = sv;
        }
    }
}

/// Problems of at least this many scratch elements run their row passes in row chunks on the
/// pool (chunks fixed by the problem's shape, partial sums added in chunk order: results do
/// not depend on the thread count).
const PAR_MIN_ELEMS: usize = 1 << 15;
/// Target scratch elements per row chunk.
const CHUNK_ELEMS: usize = 1 << 13;

/// Rows per chunk for a large problem (a multiple of [`ROWS`]), `None` for a small one.
#[inline(always)]
pub(super) fn chunk_rows(n: usize, kc: usize) -> Option<usize> {
    let row = kc * W;
    (n * row >= PAR_MIN_ELEMS).then(|| ((CHUNK_ELEMS / row) / ROWS).max(1) * ROWS)
}

/// `acc = Σ` of the chunks' partials (`[chunks, kc]`), in chunk order.
#[inline(always)]
pub(super) fn sum_parts<T: Real>(parts: &[Blk<T>], kc: usize, acc: &mut [Blk<T>]) {
    acc.fill([T::ZERO; W]);
    for p in parts.chunks_exact(kc) {
        for (a, pb) in acc.iter_mut().zip(p) {
            let (mut av, pv) = (*a, *pb);
            for l in 0..W {
                av[l] += pv[l];
            }
            *a = av;
        }
    }
}

/// The plain domain's row step over some rows (`x` `[rows, kc]`, masses `r`): `u` and the
/// column sums of `K u` added to `acc`, four rows at a time.
#[inline(always)]
fn plain_pass<T: Real>(
    x: &[Blk<T>],
    kc: usize,
    v: &[Blk<T>],
    r: &[T],
    u: &mut [T],
    acc: &mut [Blk<T>],
) {
    let mut rows = x.chunks_exact(ROWS * kc);
    let mut rr = r.chunks_exact(ROWS);
    let mut ur = u.chunks_exact_mut(ROWS);
    for ((xb, rb), ub) in (&mut rows).zip(&mut rr).zip(&mut ur) {
        plain_rows::<T, ROWS>(xb, kc, v, rb, ub, acc);
    }
    let rows = rows.remainder().chunks_exact(kc);
    for ((xb, rb), ub) in rows
        .zip(rr.remainder().chunks_exact(1))
        .zip(ur.into_remainder().chunks_exact_mut(1))
    {
        plain_rows::<T, 1>(xb, kc, v, rb, ub, acc);
    }
}

/// The log domain's row step at one eps.
#[derive(Clone, Copy)]
struct LogRows<T> {
    kc: usize,
    ie: T,
    et: T,
    taut: T,
    balanced: bool,
}

impl<T: Real> LogRows<T> {
    /// Over some rows (`x` `[rows, kc]`, masses `r`): `f`, the row log-sum-exps `lr`, and the
    /// new plan's column sums added to `acc`; `t` is a `[kc]` scratch.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn pass(
        &self,
        x: &[Blk<T>],
        g: &[Blk<T>],
        r: &[T],
        f: &mut [T],
        lr: &mut [T],
        t: &mut [Blk<T>],
        acc: &mut [Blk<T>],
    ) {
        let (ie, et, taut) = (self.ie, self.et, self.taut);
        for (i, xrow) in x.chunks_exact(self.kc).enumerate() {
            let (m, z) = row_exp(xrow, g, ie, t);
            let lse = m + z.ln();
            lr[i] = lse;
            let fi = et * r[i].ln() - taut * et * lse;
            f[i] = fi;
            let w = if self.balanced {
                r[i] / z
            } else {
                (m + fi * ie).exp_fast()
            };
            for (a, tb) in acc.iter_mut().zip(t.iter()) {
                let (mut av, tv) = (*a, *tb);
                for l in 0..W {
                    av[l] += tv[l] * w;
                }
                *a = av;
            }
        }
    }
}

/// `y = x / y` elementwise.
#[inline(always)]
fn set_ratio<T: Real>(x: &[T], y_in: &[T], y: &mut [T]) {
    for j in 0..y.len() {
        y[j] = x[j] / y_in[j];
    }
}

/// The column max and min of a problem's valid `S + f0` into `mx`, `mn` (`[k]`); returns
/// whether it is all finite. Every accumulator is per column (finiteness too: `nf` sums
/// `y − y`, NaN for NaN or ±Inf), so that the loop vectorises along the rows.
#[inline(always)]
#[allow(clippy::eq_op)]
pub(super) fn column_stats<T: Real>(
    one: &One<'_, T>,
    mx: &mut Vec<T>,
    mn: &mut Vec<T>,
    nf: &mut Vec<T>,
) -> bool {
    let (n, k, stride) = (one.n, one.k, one.stride);
    reset(mx, k, T::NEG_INFINITY);
    reset(mn, k, T::INFINITY);
    reset(nf, k, T::ZERO);
    let (mx, mn, nf) = (&mut mx[..k], &mut mn[..k], &mut nf[..k]);
    for i in 0..n {
        let (srow, fi) = (&one.scores[i * stride..][..k], one.init_f[i]);
        for j in 0..k {
            let y = srow[j] + fi;
            mx[j] = mx[j].fmax(y);
            mn[j] = mn[j].fmin(y);
            nf[j] += y - y;
        }
    }
    nf.iter().all(|&x| x == T::ZERO)
}

/// The largest spread `max − min` over the columns of a (finite) problem, in f64.
#[inline(always)]
pub(super) fn column_range<T: Real>(mx: &[T], mn: &[T]) -> f64 {
    mx.iter()
        .zip(mn)
        .fold(0.0f64, |a, (&hi, &lo)| a.max((hi - lo).to_f64()))
}

/// The larger of two errors, NaN if either is.
#[inline(always)]
#[allow(clippy::eq_op)]
pub(super) fn nan_max<T: Real>(a: T, b: T) -> T {
    if a != a || b != b {
        T::from_f64(f64::NAN)
    } else {
        a.fmax(b)
    }
}

/// Clears `v` and fills it with `len` copies of `fill`.
#[inline(always)]
pub(super) fn reset<X: Copy>(v: &mut Vec<X>, len: usize, fill: X) {
    v.clear();
    v.resize(len, fill);
}

/// `|x|` for a [`Real`].
trait Abs {
    fn abs(self) -> Self;
}

impl<T: Real> Abs for T {
    #[inline(always)]
    fn abs(self) -> Self {
        if self < T::ZERO {
            -self
        } else {
            self
        }
    }
}
