//! The vector-Jacobian product on the small-problem path: batches of problems of at most
//! [`SMALL`] elements with two weight groups in the plain domain, `L` problems at a time in
//! SIMD lanes as the forward of `small.rs` solves them (same lane independence, so results do
//! not depend on the group, the lane or the thread count).
//!
//! The algorithm is the streaming reverse pass of `backward.rs` (its docs give the adjoints),
//! specialised to two plain groups, with the whole group of problems in cache: the replay
//! records `f_G^t` and `h_G^t` (`O(T (N + K))` per lane) and keeps `E_G`; it stops one row step
//! short, because the top reverse pass computes `h^T` from the same slot values it needs
//! anyway. Each reverse pass then recomputes one iteration's slot values per row and applies
//! the `f` step of the next iteration and the `h` and `g` steps of its own.

use super::rows::constant_row;
use super::small::SMALL;
use super::{Normalize, Problem};
use crate::exec::lanes::{gather, lanes_only, scatter};
use crate::simd::{dispatch, Real};
use rayon::prelude::*;

/// Elements per rayon task (rounded to whole groups of `L` problems), as in `small.rs`.
const TASK_ELEMS: usize = 1 << 14;

/// The gradient of the `[b, n, k]` batch `s` (masses `r`, `[b, k]`) for the upstream `grad`
/// into `out`, in the plain domain (the caller has checked that [`super::small::applies`] and
/// that the call runs in the plain domain).
pub(super) fn backward<T: Real>(p: &Problem<T>, grad: &[T], s: &[T], r: &[T], out: &mut [T]) {
    debug_assert!(p.groups.len() == 2 && p.rows * p.anchors <= SMALL);
    if std::mem::size_of::<T>() == 4 {
        backward_lanes::<T, 16>(p, grad, s, r, out)
    } else {
        backward_lanes::<T, 8>(p, grad, s, r, out)
    }
}

fn backward_lanes<T: Real, const L: usize>(
    p: &Problem<T>,
    grad: &[T],
    s: &[T],
    r: &[T],
    out: &mut [T],
) {
    let (n, k) = (p.rows, p.anchors);
    let nk = n * k;
    let per_task = (TASK_ELEMS / (nk * L)).max(1) * L;
    out.par_chunks_mut(per_task * nk)
        .zip(grad.par_chunks(per_task * nk))
        .zip(s.par_chunks(per_task * nk))
        .zip(r.par_chunks(per_task * k))
        .for_each(|(((o, gr), s), r)| {
            let mut b = BackGroup::<T, L>::new(n, k, p.n_iters);
            dispatch(
                #[inline(always)]
                || {
                    let count = o.len() / nk;
                    for p0 in (0..count).step_by(L) {
                        if p.interrupt.requested() {
                            return;
                        }
                        let m = (count - p0).min(L);
                        gather(&mut b.e0, &s[p0 * nk..], nk, m);
                        gather(&mut b.out, &gr[p0 * nk..], nk, m);
                        gather(&mut b.r, &r[p0 * k..], k, m);
                        backward_group(p, &mut b);
                        scatter(&b.out, &mut o[p0 * nk..], nk, m);
                    }
                },
            )
        });
}

/// One task's scratch for `L` problems, every buffer `[index][lane]`.
struct BackGroup<T, const L: usize> {
    /// `[n * k]` each: the scores then `E_0`, and `E_1`.
    e0: Vec<[T; L]>,
    e1: Vec<[T; L]>,
    /// `[n * k]`: the upstream gradient, then the gradient.
    out: Vec<[T; L]>,
    /// `[k]`: anchor masses, then column maxima.
    r: Vec<[T; L]>,
    cmax: Vec<[T; L]>,
    /// `[T * k]` each: `f_G^t` of iterations `t = 1..=T`.
    f0: Vec<[T; L]>,
    f1: Vec<[T; L]>,
    /// `[(T + 1) * n]` each: `h_G^t` for `t = 0..=T` (`h^0 = 1`).
    h0: Vec<[T; L]>,
    h1: Vec<[T; L]>,
    /// `[k]` each: column sums (`p_G`), then the column adjoints `φ̄_G / r` (`a_G`) and the
    /// growths `ρ_G = f_G^{t+1} / f_G^t` (`g_G`).
    p0: Vec<[T; L]>,
    p1: Vec<[T; L]>,
    a0: Vec<[T; L]>,
    a1: Vec<[T; L]>,
    g0: Vec<[T; L]>,
    g1: Vec<[T; L]>,
    /// `[n]` each: the rows' `η̄_G` partials the `g` step leaves for the next pass.
    eta0: Vec<[T; L]>,
    eta1: Vec<[T; L]>,
    /// `[k]` each, one row's: slot values `q_G`, adjoints of `L_G`, `γ̄`, and the result.
    q0: Vec<[T; L]>,
    q1: Vec<[T; L]>,
    adj0: Vec<[T; L]>,
    adj1: Vec<[T; L]>,
    gamma: Vec<[T; L]>,
    res: Vec<[T; L]>,
}

impl<T: Real, const L: usize> BackGroup<T, L> {
    fn new(n: usize, k: usize, iters: usize) -> Self {
        let buf = |len| vec![[T::ZERO; L]; len];
        BackGroup {
            e0: buf(n * k),
            e1: buf(n * k),
            out: buf(n * k),
            r: buf(k),
            cmax: buf(k),
            f0: buf(iters * k),
            f1: buf(iters * k),
            h0: buf((iters + 1) * n),
            h1: buf((iters + 1) * n),
            p0: buf(k),
            p1: buf(k),
            a0: buf(k),
            a1: buf(k),
            g0: buf(k),
            g1: buf(k),
            eta0: buf(n),
            eta1: buf(n),
            q0: buf(k),
            q1: buf(k),
            adj0: buf(k),
            adj1: buf(k),
            gamma: buf(k),
            res: buf(k),
        }
    }
}

/// `x * by` lane-wise.
#[inline(always)]
fn times<T: Real, const L: usize>(mut x: [T; L], by: [T; L]) -> [T; L] {
    for l in 0..L {
        x[l] *= by[l];
    }
    x
}

/// The gradient of one group of `L` problems: `b.out` holds the upstream gradient in, the
/// gradient out.
#[inline(always)]
fn backward_group<T: Real, const L: usize>(p: &Problem<T>, b: &mut BackGroup<T, L>) {
    let (n, k, iters, inv_eps, groups) = (p.rows, p.anchors, p.n_iters, p.inv_eps, &p.groups);
    let w = [groups.weights[0], groups.weights[1]];
    let c = [groups.counts[0], groups.counts[1]];
    let top = [groups.top_counts[0], groups.top_counts[1]];
    let BackGroup {
        e0,
        e1,
        out,
        r,
        cmax,
        f0,
        f1,
        h0,
        h1,
        p0,
        p1,
        a0,
        a1,
        g0,
        g1,
        eta0,
        eta1,
        q0,
        q1,
        adj0,
        adj1,
        gamma,
        res,
    } = b;
    let (e0, e1, out) = (&mut e0[..n * k], &mut e1[..n * k], &mut out[..n * k]);
    let (r, cmax, p0, p1) = (&r[..k], &mut cmax[..k], &mut p0[..k], &mut p1[..k]);
    let (a0, a1, g0, g1) = (&mut a0[..k], &mut a1[..k], &mut g0[..k], &mut g1[..k]);
    let (q0, q1, adj0, adj1) = (&mut q0[..k], &mut q1[..k], &mut adj0[..k], &mut adj1[..k]);
    let (gamma, res, eta0, eta1) = (
        &mut gamma[..k],
        &mut res[..k],
        &mut eta0[..n],
        &mut eta1[..n],
    );

    // The replay (`small::solve_group`'s passes): E_G and its column sums, then T − 1 full
    // iterations, recording f^t and h^t.
    col_max(e0, cmax);
    p0.fill([T::ZERO; L]);
    p1.fill([T::ZERO; L]);
    for (row0, row1) in e0.chunks_exact_mut(k).zip(e1.chunks_exact_mut(k)) {
        for j in 0..k {
            lanes_only();
            let (x, m, mut s0, mut s1) = (row0[j], cmax[j], p0[j], p1[j]);
            let (mut a, mut bb) = ([T::ZERO; L], [T::ZERO; L]);
            for l in 0..L {
                let lv = (x[l] - m[l]) * inv_eps;
                a[l] = (w[0] * lv).exp_fast();
                bb[l] = (w[1] * lv).exp_fast();
                s0[l] += a[l];
                s1[l] += bb[l];
            }
            (row0[j], row1[j], p0[j], p1[j]) = (a, bb, s0, s1);
        }
    }
    for j in 0..k {
        lanes_only();
        let (rj, s0, s1) = (r[j], p0[j], p1[j]);
        let (mut x0, mut x1) = ([T::ZERO; L], [T::ZERO; L]);
        for l in 0..L {
            x0[l] = rj[l] / s0[l];
            x1[l] = rj[l] / s1[l];
        }
        (f0[j], f1[j]) = (x0, x1);
    }
    h0[..n].fill([T::ONE; L]);
    h1[..n].fill([T::ONE; L]);
    for it in 0..iters - 1 {
        p0.fill([T::ZERO; L]);
        p1.fill([T::ZERO; L]);
        let (fa, fb) = (&f0[it * k..(it + 1) * k], &f1[it * k..(it + 1) * k]);
        for i in 0..n {
            let (hp0, hp1) = (h0[it * n + i], h1[it * n + i]);
            let (row0, row1) = (&e0[i * k..(i + 1) * k], &e1[i * k..(i + 1) * k]);
            let (s0, s1) = slot_values(row0, row1, fa, fb, hp0, hp1, c, q0, q1);
            h0[(it + 1) * n + i] = s0;
            h1[(it + 1) * n + i] = s1;
            for j in 0..k {
                lanes_only();
                let (x0, x1, mut c0, mut c1) = (q0[j], q1[j], p0[j], p1[j]);
                for l in 0..L {
                    c0[l] += x0[l] * s0[l];
                    c1[l] += x1[l] * s1[l];
                }
                (p0[j], p1[j]) = (c0, c1);
            }
        }
        let (fa, fb) = (f0.split_at_mut((it + 1) * k), f1.split_at_mut((it + 1) * k));
        for j in 0..k {
            lanes_only();
            let (rj, s0, s1, o0, o1) = (r[j], p0[j], p1[j], fa.0[it * k + j], fb.0[it * k + j]);
            let (mut x0, mut x1) = ([T::ZERO; L], [T::ZERO; L]);
            for l in 0..L {
                x0[l] = o0[l] * (rj[l] / s0[l]);
                x1[l] = o1[l] * (rj[l] / s1[l]);
            }
            (fa.1[j], fb.1[j]) = (x0, x1);
        }
    }
    if p.interrupt.requested() {
        return;
    }

    // Reverse passes t = T, …, 1.
    for t in (1..=iters).rev() {
        let is_top = t == iters;
        let (fa, fb) = (&f0[(t - 1) * k..t * k], &f1[(t - 1) * k..t * k]);
        p0.fill([T::ZERO; L]);
        p1.fill([T::ZERO; L]);
        for i in 0..n {
            let (row0, row1) = (&e0[i * k..(i + 1) * k], &e1[i * k..(i + 1) * k]);
            let (hp0, hp1) = (h0[(t - 1) * n + i], h1[(t - 1) * n + i]);
            let (s0, s1) = slot_values(row0, row1, fa, fb, hp0, hp1, c, q0, q1);
            let (hc0, hc1) = if is_top {
                h0[t * n + i] = s0;
                h1[t * n + i] = s1;
                (s0, s1)
            } else {
                (h0[t * n + i], h1[t * n + i])
            };
            let orow = &mut out[i * k..(i + 1) * k];
            // Start the row adjoint: the result's adjoint at the top, else the f step of
            // iteration t + 1, V_G = −(φ̄_G / r) C_G ρ_G. C_G = q_G h_G^t.
            let (mut e_0, mut e_1) = ([T::ZERO; L], [T::ZERO; L]);
            if is_top {
                if p.normalize == Normalize::MinMax {
                    for j in 0..k {
                        lanes_only();
                        let (x0, x1) = (times(q0[j], hc0), times(q1[j], hc1));
                        let mut v = [T::ZERO; L];
                        for l in 0..L {
                            if top[0] > T::ZERO {
                                v[l] += top[0] * x0[l];
                            }
                            if top[1] > T::ZERO {
                                v[l] += top[1] * x1[l];
                            }
                        }
                        res[j] = v;
                    }
                    minmax_backward_lanes(res, orow);
                }
                for j in 0..k {
                    lanes_only();
                    let (x0, x1) = (times(q0[j], hc0), times(q1[j], hc1));
                    let (gj, mut u0, mut u1, mut gm) =
                        (orow[j], [T::ZERO; L], [T::ZERO; L], [T::ZERO; L]);
                    let (mut c0, mut c1) = (p0[j], p1[j]);
                    for l in 0..L {
                        u0[l] = top[0] * gj[l] * x0[l];
                        u1[l] = top[1] * gj[l] * x1[l];
                        c0[l] += u0[l];
                        c1[l] += u1[l];
                        gm[l] = u0[l] + u1[l];
                        e_0[l] += u0[l];
                        e_1[l] += u1[l];
                    }
                    (adj0[j], adj1[j], gamma[j], p0[j], p1[j]) = (u0, u1, gm, c0, c1);
                }
            } else {
                for j in 0..k {
                    lanes_only();
                    let (x0, x1) = (times(q0[j], hc0), times(q1[j], hc1));
                    let (mut u0, mut u1, mut gm) = ([T::ZERO; L], [T::ZERO; L], [T::ZERO; L]);
                    let (b0, b1, r0, r1) = (a0[j], a1[j], g0[j], g1[j]);
                    for l in 0..L {
                        u0[l] = -b0[l] * x0[l] * r0[l];
                        u1[l] = -b1[l] * x1[l] * r1[l];
                        gm[l] = u0[l] + u1[l];
                        e_0[l] += u0[l];
                        e_1[l] += u1[l];
                    }
                    (adj0[j], adj1[j], gamma[j]) = (u0, u1, gm);
                }
                let (s0, s1) = (eta0[i], eta1[i]);
                for l in 0..L {
                    e_0[l] = s0[l] + e_0[l];
                    e_1[l] = s1[l] + e_1[l];
                }
            }
            // The h step, Z_G = −η̄_G C_G, then the g step, X_G = −γ̄ c_G B_G (B_G = q_G h^{t−1}),
            // whose row sums are the row's η̄ partial for the next pass; the gradient row gains
            // Σ_G w_G (adjoint of L_G).
            let (mut rs0, mut rs1) = ([T::ZERO; L], [T::ZERO; L]);
            for j in 0..k {
                lanes_only();
                let (y0, y1) = (q0[j], q1[j]);
                let (mut u0, mut u1, mut gm) = (adj0[j], adj1[j], gamma[j]);
                let (mut c0, mut c1) = (p0[j], p1[j]);
                let mut o = if is_top { [T::ZERO; L] } else { orow[j] };
                for l in 0..L {
                    let z0 = -e_0[l] * (y0[l] * hc0[l]);
                    let z1 = -e_1[l] * (y1[l] * hc1[l]);
                    u0[l] += z0;
                    u1[l] += z1;
                    c0[l] += z0;
                    c1[l] += z1;
                    gm[l] += z0;
                    gm[l] += z1;
                    let x0 = -gm[l] * c[0] * (y0[l] * hp0[l]);
                    let x1 = -gm[l] * c[1] * (y1[l] * hp1[l]);
                    u0[l] += x0;
                    u1[l] += x1;
                    c0[l] += x0;
                    c1[l] += x1;
                    rs0[l] += x0;
                    rs1[l] += x1;
                    o[l] += w[0] * u0[l];
                    o[l] += w[1] * u1[l];
                }
                (p0[j], p1[j], orow[j]) = (c0, c1, o);
            }
            (eta0[i], eta1[i]) = (rs0, rs1);
        }
        // φ̄^t / r, and for the pass before, ρ = f^t / f^{t−1}.
        for j in 0..k {
            lanes_only();
            let (rj, s0, s1) = (r[j], p0[j], p1[j]);
            let (mut x0, mut x1) = ([T::ZERO; L], [T::ZERO; L]);
            for l in 0..L {
                x0[l] = s0[l] / rj[l];
                x1[l] = s1[l] / rj[l];
            }
            (a0[j], a1[j]) = (x0, x1);
        }
        if t >= 2 {
            let (fp0, fp1) = (&f0[(t - 2) * k..(t - 1) * k], &f1[(t - 2) * k..(t - 1) * k]);
            for j in 0..k {
                lanes_only();
                let (n0, n1, o0, o1) = (fa[j], fb[j], fp0[j], fp1[j]);
                let (mut x0, mut x1) = ([T::ZERO; L], [T::ZERO; L]);
                for l in 0..L {
                    x0[l] = n0[l] / o0[l];
                    x1[l] = n1[l] / o1[l];
                }
                (g0[j], g1[j]) = (x0, x1);
            }
        }
    }
    // Pass 0: the f step of iteration 1, A_G = E_G f_G^1, then the factor 1/eps.
    let (fa, fb) = (&f0[..k], &f1[..k]);
    for (i, orow) in out.chunks_exact_mut(k).enumerate() {
        let (row0, row1) = (&e0[i * k..(i + 1) * k], &e1[i * k..(i + 1) * k]);
        for j in 0..k {
            lanes_only();
            let (x0, x1, b0, b1, y0, y1) = (row0[j], row1[j], a0[j], a1[j], fa[j], fb[j]);
            let mut o = orow[j];
            for l in 0..L {
                o[l] -= w[0] * b0[l] * (x0[l] * y0[l]);
                o[l] -= w[1] * b1[l] * (x1[l] * y1[l]);
                o[l] *= inv_eps;
            }
            orow[j] = o;
        }
    }
}

/// One row's slot values after the `g` step without its `h` factor, `q_G = E_G f_G / Σ_G c_G
/// h_G E_G f_G` (into `q0`, `q1`), and the new `h_G = 1 / Σ_a q_G`, as `small::solve_group`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn slot_values<T: Real, const L: usize>(
    row0: &[[T; L]],
    row1: &[[T; L]],
    f0: &[[T; L]],
    f1: &[[T; L]],
    h0: [T; L],
    h1: [T; L],
    c: [T; 2],
    q0: &mut [[T; L]],
    q1: &mut [[T; L]],
) -> ([T; L], [T; L]) {
    let k = q0.len();
    let (mut a, mut b) = (h0, h1);
    for l in 0..L {
        a[l] *= c[0];
        b[l] *= c[1];
    }
    let (mut s0, mut s1) = ([T::ZERO; L], [T::ZERO; L]);
    for j in 0..k {
        lanes_only();
        let (x0, x1, g0, g1) = (row0[j], row1[j], f0[j], f1[j]);
        let (mut y0, mut y1) = ([T::ZERO; L], [T::ZERO; L]);
        for l in 0..L {
            let (v0, v1) = (x0[l] * g0[l], x1[l] * g1[l]);
            let gi = T::ONE / (a[l] * v0 + b[l] * v1);
            y0[l] = v0 * gi;
            y1[l] = v1 * gi;
            s0[l] += y0[l];
            s1[l] += y1[l];
        }
        (q0[j], q1[j]) = (y0, y1);
    }
    for l in 0..L {
        s0[l] = T::ONE / s0[l];
        s1[l] = T::ONE / s1[l];
    }
    (s0, s1)
}

/// Column maxima of an `[n, k]` group into `cmax`.
#[inline(always)]
fn col_max<T: Real, const L: usize>(x: &[[T; L]], cmax: &mut [[T; L]]) {
    let k = cmax.len();
    for (j, cm) in cmax.iter_mut().enumerate() {
        let mut hi = [T::NEG_INFINITY; L];
        for e in x[j..].iter().step_by(k) {
            lanes_only();
            let e = *e;
            for l in 0..L {
                hi[l] = hi[l].fmax(e[l]);
            }
        }
        *cm = hi;
    }
}

/// `backward::minmax_row_backward` lane-wise: `x` holds the row before min-max, `g` the
/// output's adjoint and receives the input's.
#[inline(always)]
fn minmax_backward_lanes<T: Real, const L: usize>(x: &[[T; L]], g: &mut [[T; L]]) {
    let (mut lo, mut hi) = ([T::INFINITY; L], [T::NEG_INFINITY; L]);
    for v in x.iter() {
        lanes_only();
        let v = *v;
        for l in 0..L {
            lo[l] = lo[l].fmin(v[l]);
            hi[l] = hi[l].fmax(v[l]);
        }
    }
    let (mut inv, mut flat) = ([T::ZERO; L], [false; L]);
    for l in 0..L {
        flat[l] = constant_row(lo[l], hi[l]);
        inv[l] = if flat[l] {
            T::ZERO
        } else {
            T::ONE / (hi[l] - lo[l])
        };
    }
    let (mut glo, mut ghi) = ([T::ZERO; L], [T::ZERO; L]);
    let (mut nlo, mut nhi) = ([T::ZERO; L], [T::ZERO; L]);
    for (xv, gv) in x.iter().zip(g.iter()) {
        lanes_only();
        let (xv, gv) = (*xv, *gv);
        for l in 0..L {
            let y = (xv[l] - lo[l]) * inv[l];
            glo[l] += gv[l] * (y - T::ONE);
            ghi[l] -= gv[l] * y;
            if xv[l] == lo[l] {
                nlo[l] += T::ONE;
            }
            if xv[l] == hi[l] {
                nhi[l] += T::ONE;
            }
        }
    }
    for l in 0..L {
        glo[l] = glo[l] * inv[l] / nlo[l];
        ghi[l] = ghi[l] * inv[l] / nhi[l];
    }
    for (xv, gv) in x.iter().zip(g.iter_mut()) {
        lanes_only();
        let (xv, mut v) = (*xv, *gv);
        for l in 0..L {
            let mut y = v[l] * inv[l];
            if xv[l] == lo[l] {
                y += glo[l];
            }
            if xv[l] == hi[l] {
                y += ghi[l];
            }
            v[l] = if flat[l] { T::ZERO } else { y };
        }
        *gv = v;
    }
}
