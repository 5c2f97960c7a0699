//! The small-problem path of [`super::multi_sinkhorn`]: batches of problems of at most
//! [`SMALL`] elements with two weight groups (SSPC's weights, any two values) in the plain
//! domain (`docs/multi_sinkhorn.md`, "Small problems").
//!
//! The streaming path solves one problem at a time, and at 4×4 its per-pass bookkeeping is
//! most of the work. Here problems are solved `L` at a time in SIMD lanes, as in
//! `sinkhorn_small` (see [`crate::lanes`]): the same iteration as the streaming path's plain
//! domain (`E_G` cached, potentials `f_G` per column and `h_G` per row), each step a vertical
//! operation over the lanes. Each group of problems takes its column statistics right after
//! gathering them; the call is solved here only if every problem is finite and, under
//! `LogDomain::Auto`, within the plain domain's range. Otherwise this path gives up (the first
//! task to see it stops the others) and the streaming path solves the call.

use super::rows::constant_row;
use super::{MultiSinkhornParams, Normalize, Problem};
use crate::domain::{use_log_domain, LogDomain};
use crate::exec::lanes::{gather, lanes_only, scatter};
use crate::simd::Real;
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

/// Problems of at most this many elements take this path when it applies.
pub(super) const SMALL: usize = 1024;

/// Elements per rayon task (rounded to whole groups of `L` problems), as in `sinkhorn_small`.
const TASK_ELEMS: usize = 1 << 14;

/// Whether this path can solve the problems of `p` under `mode`.
pub(super) fn applies<T: Real>(p: &Problem<T>, mode: LogDomain) -> bool {
    p.groups.len() == 2 && p.rows * p.anchors <= SMALL && mode != LogDomain::On
}

/// Solves the `[b, n, k]` batch `s` with masses `r` (`[b, k]`) into `out` in the plain domain
/// and returns true, or returns false, with `out` partly written, if some problem is not finite
/// or (under `Auto`) needs the log domain. `params.eps` and `params.log_domain` decide the
/// domain exactly as the streaming path does.
pub(super) fn solve<T: Real>(
    p: &Problem<T>,
    s: &[T],
    r: &[T],
    out: &mut [T],
    params: &MultiSinkhornParams,
) -> bool {
    let (eps, mode) = (params.eps, params.log_domain);
    // One 512-bit vector of lanes (two 256-bit ones without AVX-512).
    if std::mem::size_of::<T>() == 4 {
        solve_lanes::<T, 16>(p, s, r, out, eps, mode)
    } else {
        solve_lanes::<T, 8>(p, s, r, out, eps, mode)
    }
}

fn solve_lanes<T: Real, const L: usize>(
    p: &Problem<T>,
    s: &[T],
    r: &[T],
    out: &mut [T],
    eps: f64,
    mode: LogDomain,
) -> bool {
    let (n, k) = (p.rows, p.anchors);
    let nk = n * k;
    let per_task = (TASK_ELEMS / (nk * L)).max(1) * L;
    let give_up = AtomicBool::new(false);
    out.par_chunks_mut(per_task * nk)
        .zip(s.par_chunks(per_task * nk))
        .zip(r.par_chunks(per_task * k))
        .for_each(|((o, s), r)| {
            let mut g = Group::<T, L>::new(n, k);
            crate::simd::dispatch(
                #[inline(always)]
                || {
                    let count = o.len() / nk;
                    for p0 in (0..count).step_by(L) {
                        if give_up.load(Ordering::Relaxed) {
                            return;
                        }
                        let m = (count - p0).min(L);
                        gather(&mut g.e0, &s[p0 * nk..], nk, m);
                        let (range, finite) = col_stats(&g.e0[..nk], &mut g.cmax[..k]);
                        if !finite || use_log_domain::<T>(mode, range * p.groups.max_weight / eps) {
                            give_up.store(true, Ordering::Relaxed);
                            return;
                        }
                        gather(&mut g.r, &r[p0 * k..], k, m);
                        solve_group(p, &mut g);
                        scatter(&g.e0, &mut o[p0 * nk..], nk, m);
                    }
                },
            )
        });
    !give_up.into_inner()
}

/// Column maxima of an `[n, k]` group of problems into `cmax`, the largest column range over
/// them (as the streaming path measures it: the difference in `T`, then as f64), and whether
/// every score is finite.
#[inline(always)]
#[allow(clippy::eq_op)]
fn col_stats<T: Real, const L: usize>(x: &[[T; L]], cmax: &mut [[T; L]]) -> (f64, bool) {
    let k = cmax.len();
    let mut range = [T::ZERO; L];
    // NaN for NaN and for ±Inf, 0 otherwise.
    let mut nf = [T::ZERO; L];
    for (j, cm) in cmax.iter_mut().enumerate() {
        let (mut hi, mut lo) = ([T::NEG_INFINITY; L], [T::INFINITY; L]);
        for e in x[j..].iter().step_by(k) {
            lanes_only();
            let e = *e;
            for l in 0..L {
                hi[l] = hi[l].fmax(e[l]);
                lo[l] = lo[l].fmin(e[l]);
                nf[l] += e[l] - e[l];
            }
        }
        for l in 0..L {
            range[l] = range[l].fmax(hi[l] - lo[l]);
        }
        *cm = hi;
    }
    let finite = nf.iter().all(|&v| v == T::ZERO);
    (range.iter().fold(0.0, |a, v| a.max(v.to_f64())), finite)
}

/// One task's scratch for `L` problems, every buffer `[index][lane]`.
struct Group<T, const L: usize> {
    /// `[n * k]`: the scores, then `E_0`, then the result.
    e0: Vec<[T; L]>,
    /// `[n * k]`: `E_1`.
    e1: Vec<[T; L]>,
    /// `[k]` each: anchor masses, column maxima, `f_0`, `f_1`, and the column sums.
    r: Vec<[T; L]>,
    cmax: Vec<[T; L]>,
    f0: Vec<[T; L]>,
    f1: Vec<[T; L]>,
    p0: Vec<[T; L]>,
    p1: Vec<[T; L]>,
    /// `[n]` each: `h_0`, `h_1`.
    h0: Vec<[T; L]>,
    h1: Vec<[T; L]>,
    /// `[2k]`: one row's slot values `y_0 | y_1`.
    y: Vec<[T; L]>,
}

impl<T: Real, const L: usize> Group<T, L> {
    fn new(n: usize, k: usize) -> Self {
        let buf = |len| vec![[T::ZERO; L]; len];
        Group {
            e0: buf(n * k),
            e1: buf(n * k),
            r: buf(k),
            cmax: buf(k),
            f0: buf(k),
            f1: buf(k),
            p0: buf(k),
            p1: buf(k),
            h0: buf(n),
            h1: buf(n),
            y: buf(2 * k),
        }
    }
}

/// The streaming path's plain two-group iteration (`Problem::solve`) on `L` problems.
#[inline(always)]
fn solve_group<T: Real, const L: usize>(p: &Problem<T>, g: &mut Group<T, L>) {
    let (n, k, inv_eps, groups) = (p.rows, p.anchors, p.inv_eps, &p.groups);
    let w = [groups.weights[0], groups.weights[1]];
    let c = [groups.counts[0], groups.counts[1]];
    let top = [groups.top_counts[0], groups.top_counts[1]];
    let Group {
        e0,
        e1,
        r,
        cmax,
        f0,
        f1,
        p0,
        p1,
        h0,
        h1,
        y,
    } = g;
    let (e0, e1) = (&mut e0[..n * k], &mut e1[..n * k]);
    let (r, cmax, f0, f1) = (&r[..k], &cmax[..k], &mut f0[..k], &mut f1[..k]);
    let (p0, p1, h0, h1) = (&mut p0[..k], &mut p1[..k], &mut h0[..n], &mut h1[..n]);
    let (y0, y1) = y[..2 * k].split_at_mut(k);

    // Pass 0: E_G = exp(w_G (S - colmax) / eps) and its column sums; h = 1.
    p0.fill([T::ZERO; L]);
    p1.fill([T::ZERO; L]);
    for (row0, row1) in e0.chunks_exact_mut(k).zip(e1.chunks_exact_mut(k)) {
        for j in 0..k {
            lanes_only();
            let (x, m, mut s0, mut s1) = (row0[j], cmax[j], p0[j], p1[j]);
            let (mut a, mut b) = ([T::ZERO; L], [T::ZERO; L]);
            for l in 0..L {
                let lv = (x[l] - m[l]) * inv_eps;
                a[l] = (w[0] * lv).exp_fast();
                b[l] = (w[1] * lv).exp_fast();
                s0[l] += a[l];
                s1[l] += b[l];
            }
            (row0[j], row1[j], p0[j], p1[j]) = (a, b, s0, s1);
        }
    }
    scale_columns(r, p0, p1, f0, f1, true);
    h0.fill([T::ONE; L]);
    h1.fill([T::ONE; L]);

    for it in 0..p.n_iters {
        if p.interrupt.requested() {
            break;
        }
        let last = it + 1 == p.n_iters;
        p0.fill([T::ZERO; L]);
        p1.fill([T::ZERO; L]);
        let rows = e0.chunks_exact_mut(k).zip(e1.chunks_exact(k));
        for ((row0, row1), (hr0, hr1)) in rows.zip(h0.iter_mut().zip(h1.iter_mut())) {
            // g update: y_G = E_G f_G / Σ_G c_G h_G E_G f_G, and the row sums of y_G.
            let (mut a, mut b) = (*hr0, *hr1);
            for l in 0..L {
                a[l] *= c[0];
                b[l] *= c[1];
            }
            let (mut s0, mut s1) = ([T::ZERO; L], [T::ZERO; L]);
            for j in 0..k {
                lanes_only();
                let (x0, x1, g0, g1) = (row0[j], row1[j], f0[j], f1[j]);
                let (mut q0, mut q1) = ([T::ZERO; L], [T::ZERO; L]);
                for l in 0..L {
                    let (v0, v1) = (x0[l] * g0[l], x1[l] * g1[l]);
                    let gi = T::ONE / (a[l] * v0 + b[l] * v1);
                    q0[l] = v0 * gi;
                    q1[l] = v1 * gi;
                    s0[l] += q0[l];
                    s1[l] += q1[l];
                }
                (y0[j], y1[j]) = (q0, q1);
            }
            // h update: h_G = 1 / Σ_a y_G; the slot values after it are y_G h_G.
            for l in 0..L {
                s0[l] = T::ONE / s0[l];
                s1[l] = T::ONE / s1[l];
            }
            (*hr0, *hr1) = (s0, s1);
            if last {
                // The result T = Σ_G t_G h_G y_G replaces the row's E_0, no longer needed.
                let (u0, u1) = (scaled(s0, top[0]), scaled(s1, top[1]));
                for j in 0..k {
                    lanes_only();
                    let (q0, q1) = (y0[j], y1[j]);
                    let mut o = [T::ZERO; L];
                    for l in 0..L {
                        if top[0] > T::ZERO {
                            o[l] += u0[l] * q0[l];
                        }
                        if top[1] > T::ZERO {
                            o[l] += u1[l] * q1[l];
                        }
                    }
                    row0[j] = o;
                }
                if p.normalize == Normalize::MinMax {
                    minmax_lanes(row0);
                }
            } else {
                for j in 0..k {
                    lanes_only();
                    let (q0, q1, mut a0, mut a1) = (y0[j], y1[j], p0[j], p1[j]);
                    for l in 0..L {
                        a0[l] += q0[l] * s0[l];
                        a1[l] += q1[l] * s1[l];
                    }
                    (p0[j], p1[j]) = (a0, a1);
                }
            }
        }
        if !last {
            scale_columns(r, p0, p1, f0, f1, false);
        }
    }
}

/// f update: `f_G = r / p_G` after pass 0 (`set`), `f_G *= r / p_G` after the others.
#[inline(always)]
fn scale_columns<T: Real, const L: usize>(
    r: &[[T; L]],
    p0: &[[T; L]],
    p1: &[[T; L]],
    f0: &mut [[T; L]],
    f1: &mut [[T; L]],
    set: bool,
) {
    for j in 0..r.len() {
        lanes_only();
        let (rj, a0, a1, mut g0, mut g1) = (r[j], p0[j], p1[j], f0[j], f1[j]);
        for l in 0..L {
            let (x0, x1) = (rj[l] / a0[l], rj[l] / a1[l]);
            (g0[l], g1[l]) = if set {
                (x0, x1)
            } else {
                (g0[l] * x0, g1[l] * x1)
            };
        }
        (f0[j], f1[j]) = (g0, g1);
    }
}

#[inline(always)]
fn scaled<T: Real, const L: usize>(mut x: [T; L], by: T) -> [T; L] {
    for v in &mut x {
        *v *= by;
    }
    x
}

/// `minmax_row` lane-wise: `(x - min) / (max - min)` per problem's row, zeros for a constant row.
#[inline(always)]
#[allow(clippy::neg_cmp_op_on_partial_ord)]
fn minmax_lanes<T: Real, const L: usize>(row: &mut [[T; L]]) {
    let (mut lo, mut hi) = ([T::INFINITY; L], [T::NEG_INFINITY; L]);
    for x in row.iter() {
        lanes_only();
        let x = *x;
        for l in 0..L {
            lo[l] = lo[l].fmin(x[l]);
            hi[l] = hi[l].fmax(x[l]);
        }
    }
    let mut d = [T::ZERO; L];
    for l in 0..L {
        // As in `minmax_row`: a constant row never reaches the division.
        d[l] = if constant_row(lo[l], hi[l]) {
            T::ZERO
        } else {
            hi[l] - lo[l]
        };
    }
    for x in row.iter_mut() {
        lanes_only();
        let mut v = *x;
        for l in 0..L {
            v[l] = if !(d[l] == T::ZERO) {
                (v[l] - lo[l]) / d[l]
            } else {
                T::ZERO
            };
        }
        *x = v;
    }
}
