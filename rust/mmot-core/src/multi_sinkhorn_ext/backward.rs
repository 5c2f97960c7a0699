//! The exact VJP of one problem's unrolled iteration with respect to the scores.
//!
//! Iteration `t` at `e = eps_t` maps `(Gam_{t-1}, H_{t-1})` to `F_t` (step A), then
//! `(F_t, H_{t-1})` to `Gam_t` (step B), then `(F_t, Gam_t)` to `H_t` (step C). Their
//! derivatives are softmaxes, so with adjoints `F̄`, `Γ̄`, `H̄`:
//!
//! ```text
//! A: X̄_G[n,a] = -F̄_G[a] P^A_G[n,a] / r     P^A = exp((w S + Gam_{t-1} + H_{t-1} + F_t) / e)
//! B: Ȳ_G[n,a] = -Γ̄[n,a] c_G P^B_G[n,a]     P^B = exp((w S + F_t + Gam_t + H_{t-1}) / e)
//! C: Z̄_G[n,a] = -H̄_G[n] P_G[n,a]           P   = exp((w S + F_t + Gam_t + H_t) / e)
//! ```
//!
//! and each of `X̄`, `Ȳ`, `Z̄` (and the output's `W̄_G = top_G T̄ P_G / e`) passes on to its
//! arguments by sums: `S̄ += w_G ·`, `Γ̄ += Σ_G ·`, `H̄_G += Σ_a ·`, `F̄_G += Σ_n ·`. Only the
//! `F̄` sums cross rows. So one row pass per iteration suffices: the pass for `t` runs step
//! A's reverse of iteration `t` (which needs the complete `F̄_t`), then steps C and B of
//! iteration `t - 1` for the same row (whose `H̄_{t-1}` and `Γ̄_{t-1}` are then complete),
//! collecting `F̄_{t-1}`'s column partials for the next pass. `Γ̄` never leaves the row; `H̄`
//! is kept per row between passes. The plans are rebuilt from the recorded `F_t` and `H_t`
//! by the forward's own row step, so they are the forward's bit for bit.

use super::forward::Solver;
use super::rows::{gam_row, minmax_row_vjp, reduce, run_chunks, Rows, Source};
use super::{schedule, MultiSinkhornExtParams, Problem};
use crate::interrupt::Interrupt;
use crate::multi_sinkhorn::Normalize;
use crate::simd::{sum, Real};

/// The recorded forward: `F_t` `[iters, Ga, k]`, `H_t` for `t = -1..iters` `[iters + 1, n, Ga]`,
/// and, where `eps_t == eps_{t-1}`, the factor `P^A_t / P_{t-1} = r / colsum(P_{t-1})`.
struct History<T> {
    /// The plain domain's `E_G` rows (`[n, Ga, k]`; empty in the log domain), whose `F` and `H`
    /// are the scalings `u` and `v`.
    cache: Vec<T>,
    f: Vec<T>,
    h: Vec<T>,
    factor: Vec<Option<Vec<T>>>,
}

/// Writes the VJP of one problem into `out` (`[N, K]`, padding 0).
pub(super) fn backward<T: Real>(
    p: &Problem<T>,
    params: &MultiSinkhornExtParams,
    grad: &[T],
    iters: usize,
    out: &mut [T],
    interrupt: &Interrupt,
) {
    out.fill(T::ZERO);
    let (n, k, ga, stride) = (p.n, p.k, p.groups.len(), p.stride);
    let (col_max, col_min, finite) = p.column_extremes();
    if !finite {
        for i in 0..n {
            out[i * stride..][..k].fill(T::from_f64(f64::NAN));
        }
        return;
    }
    let sched = schedule(p.eps_start, params.eps, params.decay, iters);
    let plain = p.plain_domain(&col_max, &col_min, params);
    let Some(hist) = replay(p, plain, &col_max, &sched, interrupt) else {
        return;
    };
    let (gk, nga) = (ga * k, n * ga);
    let cache = plain.then_some(&hist.cache[..]);
    let f_at = |t: usize| &hist.f[t * gk..][..gk];
    let h_at = |t: isize| &hist.h[((t + 1) as usize) * nga..][..nga];
    let inv_r = T::ONE / p.r;
    let last = iters - 1;
    let mut hbar = vec![T::ZERO; nga];
    let mut fbar = vec![T::ZERO; gk];
    let mut partials = vec![T::ZERO; p.n_chunks * gk];
    let mut scratch = super::rows::RowScratch::new(ga, k);
    let groups = &p.groups[..];
    let out = &mut out[..n * stride];

    // The output, then steps C and B of the last iteration.
    {
        let e = sched[last];
        let inv_e = T::from_f64(1.0 / e);
        let source = Source::new(cache, e);
        let (f, hold) = (f_at(last), h_at(last as isize - 1));
        let minmax = params.normalize == Normalize::MinMax;
        run_chunks(
            p,
            [
                Rows {
                    values: &mut hbar[..],
                    width: ga,
                },
                Rows {
                    values: &mut out[..],
                    width: stride,
                },
                super::forward::empty(),
            ],
            &mut partials,
            gk,
            &mut scratch,
            #[inline(always)]
            |chunk, sc| {
                let cs = &mut chunk.partials[..gk];
                cs.fill(T::ZERO);
                let mut dummy = [T::ZERO; 64];
                let mut heap = Vec::new();
                let hnew = per_group(&mut dummy, &mut heap, ga);
                let first = chunk.rows.start;
                for i in chunk.rows {
                    let local = i - first;
                    source.step(p, i, f, &hold[i * ga..][..ga], sc, hnew);
                    let gy = &grad[i * stride..][..k];
                    // tb (col2): the upstream gradient of the raw target row.
                    if minmax {
                        let x = &mut sc.col[..k];
                        x.fill(T::ZERO);
                        for (g, grp) in groups.iter().enumerate() {
                            let pg = &sc.p[g * k..][..k];
                            for a in 0..k {
                                x[a] += grp.top * pg[a];
                            }
                        }
                        minmax_row_vjp(&sc.col[..k], gy, &mut sc.col2[..k]);
                    } else {
                        sc.col2[..k].copy_from_slice(gy);
                    }
                    let (tb, gb) = (&sc.col2[..k], &mut sc.col[..k]);
                    gb.fill(T::ZERO);
                    // d_G = W̄_G + Z̄_G into p, with H̄_G = Σ_a W̄_G.
                    for (g, grp) in groups.iter().enumerate() {
                        let pg = &mut sc.p[g * k..][..k];
                        let coef = grp.top * inv_e;
                        let wbar = &mut sc.z[..k];
                        for a in 0..k {
                            wbar[a] = coef * tb[a] * pg[a];
                        }
                        let hb = sum(wbar);
                        for a in 0..k {
                            let d = coef * tb[a] * pg[a] - hb * pg[a];
                            pg[a] = d;
                            gb[a] += d;
                        }
                    }
                    let srow = &mut chunk.b[local * stride..][..k];
                    step_b(
                        sc,
                        groups,
                        k,
                        cs,
                        srow,
                        &mut chunk.a[local * ga..][..ga],
                        true,
                    );
                }
            },
        );
        reduce(&partials, p.n_chunks, &mut fbar);
    }

    // Pass t: step A of iteration t, then steps C and B of iteration t - 1.
    for t in (0..=last).rev() {
        if interrupt.requested() {
            return;
        }
        let e = sched[t];
        let inv_e_t = T::from_f64(1.0 / e);
        let f_t = f_at(t);
        let (prev, factor) = if t > 0 {
            let ep = sched[t - 1];
            (
                Some((ep, f_at(t - 1), h_at(t as isize - 2), h_at(t as isize - 1))),
                hist.factor[t].as_deref(),
            )
        } else {
            (None, None)
        };
        let fbar_t = &fbar[..];
        run_chunks(
            p,
            [
                Rows {
                    values: &mut hbar[..],
                    width: ga,
                },
                Rows {
                    values: &mut out[..],
                    width: stride,
                },
                super::forward::empty(),
            ],
            &mut partials,
            gk,
            &mut scratch,
            #[inline(always)]
            |chunk, sc| {
                let cs = &mut chunk.partials[..gk];
                cs.fill(T::ZERO);
                let mut dummy = [T::ZERO; 64];
                let mut heap = Vec::new();
                let hnew = per_group(&mut dummy, &mut heap, ga);
                let first = chunk.rows.start;
                for i in chunk.rows {
                    let local = i - first;
                    let s = p.row(i);
                    let srow = &mut chunk.b[local * stride..][..k];
                    let hb_row = &mut chunk.a[local * ga..][..ga];
                    sc.col[..k].fill(T::ZERO);
                    match prev {
                        None => {
                            // P^A_0 = exp((w S + F_0) / e_0), or E_G u_0 (plain).
                            for (g, grp) in groups.iter().enumerate() {
                                let (fg, fbg) = (&f_t[g * k..][..k], &fbar_t[g * k..][..k]);
                                let wx = grp.w * inv_e_t;
                                if let Some(cache) = cache {
                                    let eg = &cache[(i * ga + g) * k..][..k];
                                    for a in 0..k {
                                        let x = -fbg[a] * (eg[a] * fg[a]) * inv_r;
                                        srow[a] += grp.w * x;
                                    }
                                    continue;
                                }
                                for a in 0..k {
                                    let pa = (s[a] * wx + fg[a] * inv_e_t).exp_fast();
                                    let x = -fbg[a] * pa * inv_r;
                                    srow[a] += grp.w * x;
                                }
                            }
                        }
                        Some((ep, f_p, h_pp, h_p)) => {
                            let et_p = T::from_f64(ep);
                            let source = Source::new(cache, ep);
                            source.step(p, i, f_p, &h_pp[i * ga..][..ga], sc, hnew);
                            if factor.is_none() {
                                let (m, z) = (&sc.m[..k], &sc.z[..k]);
                                gam_row(m, z, et_p, &mut sc.col2[..k]);
                            }
                            let gb = &mut sc.col[..k];
                            for (g, grp) in groups.iter().enumerate() {
                                let (fg, fbg) = (&f_t[g * k..][..k], &fbar_t[g * k..][..k]);
                                let pg = &mut sc.p[g * k..][..k];
                                // X̄_G, for its row sum (m is free after the row step).
                                let xs = &mut sc.m[..k];
                                match factor {
                                    Some(fac) => {
                                        let fac = &fac[g * k..][..k];
                                        for a in 0..k {
                                            let x = -fbg[a] * (pg[a] * fac[a]) * inv_r;
                                            srow[a] += grp.w * x;
                                            gb[a] += x;
                                            xs[a] = x;
                                        }
                                    }
                                    None => {
                                        let (gam, hg) = (&sc.col2[..k], h_p[i * ga + g]);
                                        for a in 0..k {
                                            let pa = ((grp.w * s[a] + gam[a] + hg + fg[a])
                                                * inv_e_t)
                                                .exp_fast();
                                            let x = -fbg[a] * pa * inv_r;
                                            srow[a] += grp.w * x;
                                            gb[a] += x;
                                            xs[a] = x;
                                        }
                                    }
                                }
                                // Step C of iteration t - 1: d_G = -H̄_G P_G, into p.
                                let hb = hb_row[g] + sum(xs);
                                for a in 0..k {
                                    let d = -hb * pg[a];
                                    pg[a] = d;
                                    gb[a] += d;
                                }
                            }
                            step_b(sc, groups, k, cs, srow, hb_row, false);
                        }
                    }
                }
            },
        );
        if t > 0 {
            reduce(&partials, p.n_chunks, &mut fbar);
        }
    }
}

/// Step B's reverse for a row, after step C's `d_G` (in `sc.p`) and `Γ̄` (in `sc.col`):
/// `Ȳ_G = -Γ̄ c_G P^B_G`; adds `w_G (d_G + Ȳ_G)` to the row's `S̄` (`srow`, set when `set`),
/// `d_G + Ȳ_G` to the `F̄` partials `cs`, and leaves `H̄_G = Σ_a Ȳ_G` in `hb_row`.
#[inline(always)]
fn step_b<T: Real>(
    sc: &mut super::rows::RowScratch<T>,
    groups: &[super::Group<T>],
    k: usize,
    cs: &mut [T],
    srow: &mut [T],
    hb_row: &mut [T],
    set: bool,
) {
    let gb = &sc.col[..k];
    if set {
        srow.fill(T::ZERO);
    }
    for (g, grp) in groups.iter().enumerate() {
        let (d, pb) = (&sc.p[g * k..][..k], &mut sc.pb[g * k..][..k]);
        let csg = &mut cs[g * k..][..k];
        // Ȳ_G replaces P^B_G, for its row sum.
        for a in 0..k {
            let y = -gb[a] * grp.c * pb[a];
            let tot = d[a] + y;
            srow[a] += grp.w * tot;
            csg[a] += tot;
            pb[a] = y;
        }
        hb_row[g] = sum(pb);
    }
}

/// `ga` values: on the stack for up to 64 groups.
fn per_group<'x, T: Real>(stack: &'x mut [T; 64], heap: &'x mut Vec<T>, ga: usize) -> &'x mut [T] {
    if ga <= 64 {
        &mut stack[..ga]
    } else {
        heap.resize(ga, T::ZERO);
        &mut heap[..]
    }
}

/// Replays the forward for `sched.len()` iterations, recording `F_t`, `H_t` and the column
/// factors. `None` when interrupted.
fn replay<T: Real>(
    p: &Problem<T>,
    plain: bool,
    col_max: &[T],
    sched: &[f64],
    interrupt: &Interrupt,
) -> Option<History<T>> {
    let iters = sched.len();
    let (n, k, ga) = (p.n, p.k, p.groups.len());
    let mut solver = Solver::new(p, plain);
    solver.start(col_max, sched[0]);
    let mut hist = History {
        cache: Vec::new(),
        f: Vec::with_capacity(iters * ga * k),
        h: Vec::with_capacity((iters + 1) * n * ga),
        factor: vec![None; iters],
    };
    hist.f.extend_from_slice(&solver.f);
    hist.h.resize(n * ga, if plain { T::ONE } else { T::ZERO });
    for t in 0..iters {
        if interrupt.requested() {
            return None;
        }
        let e = sched[t];
        let e_next = if t + 1 < iters { sched[t + 1] } else { e };
        solver.pass(e, e_next, None);
        hist.h.extend_from_slice(&solver.h);
        if t + 1 < iters {
            if e_next == e {
                hist.factor[t + 1] = Some(solver.sums[..ga * k].iter().map(|&s| p.r / s).collect());
            }
            solver.update_f(e, e_next);
            hist.f.extend_from_slice(&solver.f);
        }
    }
    hist.cache = std::mem::take(&mut solver.cache);
    Some(hist)
}
