//! The reverse pass of the small-problem path in the plain domain: [`super::sinkhorn_backward`]
//! for batches of problems of at most [`super::SMALL`] elements, `L` problems at a time in SIMD
//! lanes exactly as the forward of `small.rs` (same layout, same independence of lanes, groups
//! and threads).
//!
//! Per group, the forward is replayed once with the forward's own row kernels (so `u_t` and
//! `v_t` are bitwise the forward's), keeping every `u_t` and `v_t` (`O(T (N + K))` per lane); the
//! cached `E = exp((S − colmax)/eps)` stays in the group's scratch. The reverse sweep then
//! needs, per iteration, one row dot with `E` and one column sum over `E`, as a forward
//! iteration does, because every step's plan is `E` scaled by row and column factors:
//!
//! - the last replay iteration also starts the reverse pass: `x_n = ⟨G_n, P_n⟩ / r_n` and the
//!   gradient buffer becomes `v_T u_T (G − x)`, the output's adjoint divided by `E`;
//! - reverse step `t = T, …, 2`, with `w = (β̄_t / c) v_t`: `ρ_n = u_{t−1,n}² ⟨E_n, w⟩ / r_n`,
//!   the buffer gains `ρ_n v_{t−1} − u_{t−1,n} w` and `β̄_{t−1} = v_{t−1} Eᵀρ`;
//! - step 1 subtracts `w = (β̄_1 / c) v_1` (`u_0 = 1`) and the buffer times `E / eps` is the
//!   gradient.
//!
//! This is the streaming reverse pass (`backward.rs`) with each step's plan left factored.

use super::small::{col_max, exp_shifted, ratio, ROWS, TASK_ELEMS};
use super::{Problem, SinkhornParams};
use crate::dims::Dims;
use crate::exec::lanes::{gather, lanes_only, scatter};
use crate::simd::{dispatch, Real};
use rayon::prelude::*;

/// `(grad, scores, row_mass, col_mass, out)` of a batch or of one task.
type BackIo<'a, T> = (&'a [T], &'a [T], &'a [T], &'a [T], &'a mut [T]);

/// The plain-domain gradient of a batch of small problems into `out`.
pub(super) fn backward<T: Real>(
    grad: &[T],
    scores: &[T],
    row_mass: &[T],
    col_mass: &[T],
    out: &mut [T],
    dims: Dims,
    params: &SinkhornParams,
) {
    let p = Problem::new(dims, params);
    let io = (grad, scores, row_mass, col_mass, out);
    if std::mem::size_of::<T>() == 4 {
        p.backward_batch::<16>(io)
    } else {
        p.backward_batch::<8>(io)
    }
}

impl<T: Real> Problem<T> {
    fn backward_batch<const L: usize>(&self, (g, s, r, c, out): BackIo<T>) {
        let (n, k) = (self.n, self.k);
        let nk = n * k;
        let per_task = (TASK_ELEMS / (nk * L)).max(1) * L;
        out.par_chunks_mut(per_task * nk)
            .zip(g.par_chunks(per_task * nk))
            .zip(s.par_chunks(per_task * nk))
            .zip(r.par_chunks(per_task * n))
            .zip(c.par_chunks(per_task * k))
            .for_each(|((((o, g), s), r), c)| self.backward_task::<L>((g, s, r, c, o)));
    }

    /// One task's problems, `L` at a time.
    fn backward_task<const L: usize>(&self, (gr, s, r, c, o): BackIo<T>) {
        let (n, k) = (self.n, self.k);
        let nk = n * k;
        let mut b = BackGroup::<T, L>::new(n, k, self.n_iters);
        dispatch(
            #[inline(always)]
            || {
                for p0 in (0..o.len() / nk).step_by(L) {
                    if self.interrupt.requested() {
                        return;
                    }
                    let m = (o.len() / nk - p0).min(L);
                    gather(&mut b.x, &s[p0 * nk..], nk, m);
                    gather(&mut b.g, &gr[p0 * nk..], nk, m);
                    gather(&mut b.r, &r[p0 * n..], n, m);
                    gather(&mut b.c, &c[p0 * k..], k, m);
                    self.backward_plain_lanes(&mut b);
                    scatter(&b.g, &mut o[p0 * nk..], nk, m);
                }
            },
        )
    }

    /// The gradient of `L` problems (see the file's docs): `b.g` holds the upstream gradient
    /// in, the gradient out.
    #[inline(always)]
    fn backward_plain_lanes<const L: usize>(&self, b: &mut BackGroup<T, L>) {
        let (n, k, iters) = (self.n, self.k, self.n_iters);
        let BackGroup {
            x,
            g,
            r,
            c,
            acc,
            w,
            u,
            v,
        } = b;
        let (x, g, r, c) = (&mut x[..n * k], &mut g[..n * k], &r[..n], &c[..k]);
        let (acc, w) = (&mut acc[..k], &mut w[..k]);
        // The replay: the forward's passes, keeping u_t (`u[t]`, u_0 = 1) and v_t (`v[t − 1]`).
        col_max(x, acc);
        exp_shifted(x, acc, self.inv_eps, &mut v[..k]);
        ratio(c, &mut v[..k]);
        u[..n].fill([T::ONE; L]);
        for it in 0..iters {
            let (done, next) = v.split_at_mut((it + 1) * k);
            let vt = &done[it * k..];
            let ut = &mut u[(it + 1) * n..(it + 2) * n];
            acc.fill([T::ZERO; L]);
            let last = it + 1 == iters;
            let mut i = 0;
            while i + ROWS <= n {
                let (xb, rb, ub) = (&x[i * k..(i + ROWS) * k], &r[i..i + ROWS], &mut ut[i..]);
                if last {
                    last_rows::<T, L, ROWS>(xb, &mut g[i * k..(i + ROWS) * k], rb, vt, acc, ub);
                } else {
                    replay_rows::<T, L, ROWS>(xb, rb, vt, acc, ub);
                }
                i += ROWS;
            }
            while i < n {
                let (xb, rb, ub) = (&x[i * k..(i + 1) * k], &r[i..i + 1], &mut ut[i..]);
                if last {
                    last_rows::<T, L, 1>(xb, &mut g[i * k..(i + 1) * k], rb, vt, acc, ub);
                } else {
                    replay_rows::<T, L, 1>(xb, rb, vt, acc, ub);
                }
                i += 1;
            }
            if !last {
                let vn = &mut next[..k];
                vn.copy_from_slice(acc);
                ratio(c, vn);
            }
        }
        // acc holds β̄_T. The reverse steps T, …, 2.
        for t in (2..=iters).rev() {
            let (vp, vt) = (&v[(t - 2) * k..(t - 1) * k], &v[(t - 1) * k..t * k]);
            col_weights(acc, c, vt, w);
            let up = &u[(t - 1) * n..t * n];
            acc.fill([T::ZERO; L]);
            let mut i = 0;
            while i + ROWS <= n {
                let (xb, gb) = (&x[i * k..(i + ROWS) * k], &mut g[i * k..(i + ROWS) * k]);
                reverse_rows::<T, L, ROWS>(xb, gb, &r[i..], &up[i..], w, vp, acc);
                i += ROWS;
            }
            while i < n {
                let (xb, gb) = (&x[i * k..(i + 1) * k], &mut g[i * k..(i + 1) * k]);
                reverse_rows::<T, L, 1>(xb, gb, &r[i..], &up[i..], w, vp, acc);
                i += 1;
            }
            scale(acc, vp);
        }
        // Step 1 (u_0 = 1), then the factor E / eps.
        col_weights(acc, c, &v[..k], w);
        let inv_eps = self.inv_eps;
        for (grow, xrow) in g.chunks_exact_mut(k).zip(x.chunks_exact(k)) {
            for j in 0..k {
                lanes_only();
                let (mut gj, e, wj) = (grow[j], xrow[j], w[j]);
                for l in 0..L {
                    gj[l] = (gj[l] - wj[l]) * e[l] * inv_eps;
                }
                grow[j] = gj;
            }
        }
    }
}

/// One task's scratch for a group of `L` problems, every buffer `[index][lane]`.
struct BackGroup<T, const L: usize> {
    /// `[n * k]`: the scores, then the cached `E`.
    x: Vec<[T; L]>,
    /// `[n * k]`: the upstream gradient, then the gradient divided by `E`, then the gradient.
    g: Vec<[T; L]>,
    r: Vec<[T; L]>,
    c: Vec<[T; L]>,
    /// `[k]`: column maxima, column sums, then the column adjoints `β̄`.
    acc: Vec<[T; L]>,
    /// `[k]`: the reverse step's column weights `(β̄ / c) v`.
    w: Vec<[T; L]>,
    /// `[(T + 1) * n]`: `u_0 = 1, u_1, …, u_T`.
    u: Vec<[T; L]>,
    /// `[T * k]`: `v_1, …, v_T`.
    v: Vec<[T; L]>,
}

impl<T: Real, const L: usize> BackGroup<T, L> {
    fn new(n: usize, k: usize, iters: usize) -> Self {
        let buf = |len| vec![[T::ZERO; L]; len];
        BackGroup {
            x: buf(n * k),
            g: buf(n * k),
            r: buf(n),
            c: buf(k),
            acc: buf(k),
            w: buf(k),
            u: buf((iters + 1) * n),
            v: buf(iters * k),
        }
    }
}

/// `w = (adjoint / c) * v` lane-wise.
#[inline(always)]
fn col_weights<T: Real, const L: usize>(
    adjoint: &[[T; L]],
    c: &[[T; L]],
    v: &[[T; L]],
    w: &mut [[T; L]],
) {
    for j in 0..w.len() {
        lanes_only();
        let (a, cj, vj) = (adjoint[j], c[j], v[j]);
        let mut wj = [T::ZERO; L];
        for l in 0..L {
            wj[l] = a[l] / cj[l] * vj[l];
        }
        w[j] = wj;
    }
}

/// `x *= y` lane-wise.
#[inline(always)]
fn scale<T: Real, const L: usize>(x: &mut [[T; L]], y: &[[T; L]]) {
    for (xr, yr) in x.iter_mut().zip(y) {
        lanes_only();
        let (mut xi, yi) = (*xr, *yr);
        for l in 0..L {
            xi[l] *= yi[l];
        }
        *xr = xi;
    }
}

/// The rows `x` (`[R, k]`, the cached `E`) as an array of `R` rows.
#[inline(always)]
fn row_array<T, const R: usize>(x: &[T], k: usize) -> [&[T]; R] {
    let mut rows = x.chunks_exact(k);
    std::array::from_fn(|_| rows.next().unwrap())
}

/// The forward's row step for `R` rows (`small::plain_rows` without the plan): `u = r / (E v)`
/// into `u_out`, and the next column sums `acc += E u`, in the forward's order of operations.
#[inline(always)]
fn replay_rows<T: Real, const L: usize, const R: usize>(
    x: &[[T; L]],
    r: &[[T; L]],
    v: &[[T; L]],
    acc: &mut [[T; L]],
    u_out: &mut [[T; L]],
) {
    let k = v.len();
    let rows = row_array::<_, R>(x, k);
    let mut u = [[T::ZERO; L]; R];
    for j in 0..k {
        lanes_only();
        let vj = v[j];
        for i in 0..R {
            let e = rows[i][j];
            for l in 0..L {
                u[i][l] += e[l] * vj[l];
            }
        }
    }
    for i in 0..R {
        for l in 0..L {
            u[i][l] = r[i][l] / u[i][l];
        }
        u_out[i] = u[i];
    }
    for j in 0..k {
        lanes_only();
        let mut a = acc[j];
        for i in 0..R {
            let e = rows[i][j];
            for l in 0..L {
                a[l] += e[l] * u[i][l];
            }
        }
        acc[j] = a;
    }
}

/// The last row step for `R` rows (its `u = r / (E v)` as the forward's) fused with the
/// output's adjoint: `x_n = ⟨G_n, P_n⟩ / r_n = ⟨G_n, E_n v⟩ / (E v)_n`, `g = v u (G − x)` and
/// `acc += E g` (the column adjoint β̄_T).
#[inline(always)]
fn last_rows<T: Real, const L: usize, const R: usize>(
    x: &[[T; L]],
    g: &mut [[T; L]],
    r: &[[T; L]],
    v: &[[T; L]],
    acc: &mut [[T; L]],
    u_out: &mut [[T; L]],
) {
    let k = v.len();
    let rows = row_array::<_, R>(x, k);
    let mut grows = g.chunks_exact_mut(k);
    let grows: [&mut [[T; L]]; R] = std::array::from_fn(|_| grows.next().unwrap());
    let (mut ev, mut gev) = ([[T::ZERO; L]; R], [[T::ZERO; L]; R]);
    for j in 0..k {
        lanes_only();
        let vj = v[j];
        for i in 0..R {
            let (e, gj) = (rows[i][j], grows[i][j]);
            for l in 0..L {
                let p = e[l] * vj[l];
                ev[i][l] += p;
                gev[i][l] += gj[l] * p;
            }
        }
    }
    let mut u = [[T::ZERO; L]; R];
    let mut xn = [[T::ZERO; L]; R];
    for i in 0..R {
        for l in 0..L {
            u[i][l] = r[i][l] / ev[i][l];
            xn[i][l] = gev[i][l] / ev[i][l];
        }
        u_out[i] = u[i];
    }
    for j in 0..k {
        lanes_only();
        let (vj, mut a) = (v[j], acc[j]);
        for i in 0..R {
            let (e, mut gj) = (rows[i][j], grows[i][j]);
            for l in 0..L {
                gj[l] = vj[l] * u[i][l] * (gj[l] - xn[i][l]);
                a[l] += e[l] * gj[l];
            }
            grows[i][j] = gj;
        }
        acc[j] = a;
    }
}

/// Reverse step `t >= 2` for `R` rows with `up = u_{t−1}`, `w = (β̄_t / c) v_t` and
/// `vp = v_{t−1}`: `ρ = (u ⟨E, w⟩ / r) u`, `g += ρ vp − u w` and `acc += E ρ` (times `vp`
/// after the sweep, the column adjoint β̄_{t−1}).
#[inline(always)]
fn reverse_rows<T: Real, const L: usize, const R: usize>(
    x: &[[T; L]],
    g: &mut [[T; L]],
    r: &[[T; L]],
    up: &[[T; L]],
    w: &[[T; L]],
    vp: &[[T; L]],
    acc: &mut [[T; L]],
) {
    let k = w.len();
    let vp = &vp[..k];
    let rows = row_array::<_, R>(x, k);
    let mut grows = g.chunks_exact_mut(k);
    let grows: [&mut [[T; L]]; R] = std::array::from_fn(|_| grows.next().unwrap());
    let mut d = [[T::ZERO; L]; R];
    for j in 0..k {
        lanes_only();
        let wj = w[j];
        for i in 0..R {
            let e = rows[i][j];
            for l in 0..L {
                d[i][l] += e[l] * wj[l];
            }
        }
    }
    let mut rho = [[T::ZERO; L]; R];
    let mut ui = [[T::ZERO; L]; R];
    for i in 0..R {
        ui[i] = up[i];
        for l in 0..L {
            // u (u ⟨E, w⟩ / r): the product u ⟨E, w⟩ is a plan's, bounded, where u² may not be.
            rho[i][l] = ui[i][l] * d[i][l] / r[i][l] * ui[i][l];
        }
    }
    for j in 0..k {
        lanes_only();
        let (wj, vj, mut a) = (w[j], vp[j], acc[j]);
        for i in 0..R {
            let (e, mut gj) = (rows[i][j], grows[i][j]);
            for l in 0..L {
                a[l] += e[l] * rho[i][l];
                gj[l] += rho[i][l] * vj[l] - ui[i][l] * wj[l];
            }
            grows[i][j] = gj;
        }
        acc[j] = a;
    }
}
