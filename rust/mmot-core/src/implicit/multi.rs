//! The implicit reverse pass of grouped Multi-SK: CG on the per-group anchor and row adjoints.
//!
//! With `P_G = exp((w_G S + F_G + Γ + H_G)/eps)` (present groups only), `c_G` the slot counts,
//! `W_G = P_G/c_G`, `D = Σ_G c_G P_G` and `Ĝ_G = top_G ĝ` (`ĝ` = ∂L/∂T_raw), the per-element
//! sample adjoint is eliminated: for `v_G[n,a] = α_G[a] + γ_G[n]`,
//! `e_G(v) = v_G − c_G Σ_G' P_G' v_G' / D`, and `x = (α, γ)` solves
//! `Mx = (Σ_n W_G e_G(v), Σ_a W_G e_G(v)) = (Σ_n W_G ê_G, Σ_a W_G ê_G)`, `ê_G = e_G(Ĝ)`. Then
//! `∂S = Σ_G w_G P_G (ê_G − e_G(v))/eps`. The preconditioner is `diag(Σ_n W_G, Σ_a W_G)`.
//!
//! With min-max normalisation the upstream is ∂L/∂T of the normalised target: the setup pass
//! has each row's `T_raw = Σ_G top_G P_G` at hand and applies the min-max VJP there
//! (`multi_sinkhorn_ext`'s, the rule the forward normalised by), so the caller never rebuilds
//! `T_raw`.
//!
//! The plans, `1/D` and `ĝ` are computed once, in the setup pass, into a per-row cache of
//! `(G + 2)·K` values (`O(G·N·K)` memory; the forward's potentials are `O(G·(N + K) + N·K)`),
//! kept between calls (`exec::spare`). Each CG iteration is one pass over it; the `γ` part of
//! the CG vectors lives per row. The row sums are taken in vector registers (`simd::sum`): a
//! float sum inside an element loop keeps LLVM from vectorising the loop.

use super::{check_counts, check_eps, update, Cg};
use crate::dims::Dims;
use crate::error::{check_len, MmotError, Result};
use crate::exec::chunks::{n_chunks, reduce_partials, rows_per_chunk, run_pass, Scratch, Strided};
use crate::exec::spare::{vec_bytes, Footprint, Spare};
use crate::interrupt::Interrupt;
use crate::multi_sinkhorn::Normalize;
use crate::multi_sinkhorn_ext::minmax_row_vjp;
use crate::simd::{dot, sum, Real};
use rayon::prelude::*;

/// The parameters of a Multi-SK implicit backward call.
#[derive(Clone, Debug)]
pub struct MultiImplicitParams {
    /// Entropic regularisation, finite and > 0.
    pub eps: f64,
    /// One weight per slot group (`G`), shared by the batch.
    pub weights: Vec<f64>,
    /// `MinMax`: `grad` is ∂L/∂T of the min-max-normalised target; `None`: ∂L/∂T_raw.
    pub normalize: Normalize,
}

/// The gradient of the scores of converged grouped Multi-SK for the upstream `grad` (∂L/∂T,
/// see [`MultiImplicitParams::normalize`]) on a padded ragged batch. `scores`, `grad`, `gam`,
/// `out`: `dims`; `f`: `[problems, G, cols]`; `h`: `[problems, G, rows]`; `counts`, `tops`:
/// `[problems, G]` (a group with count 0 is absent); `row_counts`, `col_counts`, `iters`:
/// `[problems]`. Writes each problem's CG iteration count into `iters`.
#[allow(clippy::too_many_arguments)]
pub fn multi_sinkhorn_implicit_backward<T: Real>(
    grad: &[T],
    scores: &[T],
    f: &[T],
    gam: &[T],
    h: &[T],
    row_counts: &[i64],
    col_counts: &[i64],
    counts: &[T],
    tops: &[T],
    out: &mut [T],
    iters: &mut [i64],
    dims: Dims,
    params: &MultiImplicitParams,
) -> Result<()> {
    let g = params.weights.len();
    let bsz = dims.problems;
    check_len("grad", grad.len(), dims)?;
    check_len("scores", scores.len(), dims)?;
    check_len("Gam", gam.len(), dims)?;
    check_len("F", f.len(), [bsz, g, dims.cols])?;
    check_len("H", h.len(), [bsz, g, dims.rows])?;
    check_len("counts", counts.len(), [bsz, g])?;
    check_len("tops", tops.len(), [bsz, g])?;
    check_len("out", out.len(), dims)?;
    check_len("iters", iters.len(), [bsz])?;
    check_counts("row_counts", row_counts, bsz, dims.rows)?;
    check_counts("col_counts", col_counts, bsz, dims.cols)?;
    check_eps(params.eps)?;
    if g == 0 {
        return Err(MmotError::InvalidArgument(
            "weights must hold at least one group".into(),
        ));
    }
    if dims.is_empty() {
        iters.fill(0);
        return Ok(());
    }
    let interrupt = Interrupt::current();
    let m = dims.matrix_len();
    let (n_pad, k_pad) = (dims.rows, dims.cols);
    out.par_chunks_mut(m)
        .zip(iters.par_iter_mut())
        .enumerate()
        .for_each_init(Spare::<Work<T>>::take, |ws, (b, (o, it))| {
            let cnt = &counts[b * g..(b + 1) * g];
            let groups: Vec<Group<T>> = (0..g)
                .filter(|&i| cnt[i] > T::ZERO)
                .map(|i| Group {
                    weight: T::from_f64(params.weights[i]),
                    count: cnt[i],
                    inv_count: T::ONE / cnt[i],
                    top: tops[b * g + i],
                    f: &f[(b * g + i) * k_pad..(b * g + i + 1) * k_pad],
                    h: &h[(b * g + i) * n_pad..(b * g + i + 1) * n_pad],
                })
                .collect();
            let prob = Problem {
                n: row_counts[b] as usize,
                k: col_counts[b] as usize,
                stride: k_pad,
                grad: &grad[b * m..(b + 1) * m],
                scores: &scores[b * m..(b + 1) * m],
                gam: &gam[b * m..(b + 1) * m],
                groups: &groups,
                inv_eps: T::from_f64(1.0 / params.eps),
                minmax: params.normalize == Normalize::MinMax,
            };
            *it = prob.solve(o, ws, &interrupt) as i64;
        });
    interrupt.check()
}

struct Group<'a, T> {
    weight: T,
    count: T,
    inv_count: T,
    top: T,
    f: &'a [T],
    h: &'a [T],
}

struct Problem<'a, T> {
    n: usize,
    k: usize,
    stride: usize,
    grad: &'a [T],
    scores: &'a [T],
    gam: &'a [T],
    groups: &'a [Group<'a, T>],
    inv_eps: T,
    minmax: bool,
}

/// Per-row state: `[x, r, z, p, q, pre]`, each one value per group.
const X: usize = 0;
const R: usize = 1;
const Z: usize = 2;
const P: usize = 3;
const Q: usize = 4;
const PRE: usize = 5;
const STATE: usize = 6;

#[derive(Default)]
struct Work<T> {
    /// Per row: the plans of the present groups, `1/D`, then `ĝ` (`(G + 2)·k`).
    planes: Vec<T>,
    rows: Vec<T>,
    partials: Vec<T>,
    scratch: Vec<T>,
    acc: Vec<T>,
    /// The `α` blocks of the CG vectors (`G·k` each).
    x: Vec<T>,
    r: Vec<T>,
    z: Vec<T>,
    p: Vec<T>,
    q: Vec<T>,
    pre: Vec<T>,
}

impl<T: Real> Footprint for Work<T> {
    fn bytes(&self) -> usize {
        let Work {
            planes,
            rows,
            partials,
            scratch,
            acc,
            x,
            r,
            z,
            p,
            q,
            pre,
        } = self;
        [planes, rows, partials, scratch, acc, x, r, z, p, q, pre]
            .into_iter()
            .map(vec_bytes)
            .sum()
    }
}

/// The first `len` values of `v`, grown if need be. What they hold is left as it was: every
/// caller writes them all before reading (a fresh zero fill of the plan cache cost about as
/// much as a CG iteration).
fn first<T: Real>(v: &mut Vec<T>, len: usize) -> &mut [T] {
    if v.len() < len {
        v.resize(len, T::ZERO);
    }
    &mut v[..len]
}

impl<T: Real> Problem<'_, T> {
    fn solve(&self, out: &mut [T], ws: &mut Work<T>, interrupt: &Interrupt) -> usize {
        let (n, k, stride) = (self.n, self.k, self.stride);
        let gp = self.groups.len();
        if gp < 2 {
            // One group: g makes every slot value 1/c, so T does not depend on the scores.
            out.fill(T::ZERO);
            return 0;
        }
        out[n * stride..].fill(T::ZERO);
        let out = &mut out[..n * stride];
        let rw = (gp + 2) * k;
        let ga = gp * k;
        let chunk_rows = rows_per_chunk(rw);
        let chunks = n_chunks(n, chunk_rows);
        let Work {
            planes,
            rows,
            partials,
            scratch,
            acc,
            x,
            r,
            z,
            p,
            q,
            pre,
        } = ws;
        let planes = first(planes, n * rw);
        let rows = first(rows, n * STATE * gp);
        let partials = first(partials, chunks * (2 * ga + 2));
        let acc = first(acc, 2 * ga + 2);
        let groups = self.groups;
        let inv_eps = self.inv_eps;

        // Setup: the plans, 1/D and ĝ; rhs and preconditioner, per row (γ) and in partials (α).
        run_pass(
            n,
            chunk_rows,
            Strided::new(rows, STATE * gp),
            Strided::new(planes, rw),
            Strided::new(partials, 2 * ga + 2),
            Scratch::new(scratch, 2 * k),
            #[inline(always)]
            |range, st, cache, part, scr| {
                part.fill(T::ZERO);
                let (u, y) = scr.split_at_mut(k);
                let first = range.start;
                for i in range {
                    let l = i - first;
                    let srow = &self.scores[i * stride..i * stride + k];
                    let gmrow = &self.gam[i * stride..i * stride + k];
                    let prow = &mut cache[l * rw..(l + 1) * rw];
                    let (pg, rest) = prow.split_at_mut(ga);
                    let (inv_d, ghat) = rest.split_at_mut(k);
                    // u = T_raw = Σ top_G P_G, inv_d = D for now.
                    inv_d.fill(T::ZERO);
                    u.fill(T::ZERO);
                    for (gi, grp) in groups.iter().enumerate() {
                        let hg = grp.h[i];
                        let pl = &mut pg[gi * k..(gi + 1) * k];
                        let (f, u, inv_d) = (&grp.f[..k], &mut u[..k], &mut inv_d[..k]);
                        for a in 0..k {
                            let e = ((grp.weight * srow[a] + f[a] + gmrow[a] + hg) * inv_eps)
                                .exp_fast();
                            pl[a] = e;
                            inv_d[a] += grp.count * e;
                            u[a] += grp.top * e;
                        }
                    }
                    for d in inv_d.iter_mut() {
                        *d = if *d > T::ZERO { T::ONE / *d } else { T::ZERO };
                    }
                    let grow = &self.grad[i * stride..i * stride + k];
                    if self.minmax {
                        minmax_row_vjp(u, grow, ghat);
                    } else {
                        ghat.copy_from_slice(grow);
                    }
                    // u = ĝ T_raw / D: the Ĝ-weighted mean that e_G(Ĝ) subtracts.
                    for a in 0..k {
                        u[a] *= ghat[a] * inv_d[a];
                    }
                    let st = &mut st[l * STATE * gp..(l + 1) * STATE * gp];
                    let (rhs_part, rest) = part.split_at_mut(ga);
                    let (diag_part, dots) = rest.split_at_mut(ga);
                    for (gi, grp) in groups.iter().enumerate() {
                        let pl = &pg[gi * k..(gi + 1) * k];
                        let rp = &mut rhs_part[gi * k..(gi + 1) * k];
                        let dp = &mut diag_part[gi * k..(gi + 1) * k];
                        let (ghat, u, y) = (&ghat[..k], &u[..k], &mut y[..k]);
                        for a in 0..k {
                            let w = pl[a] * grp.inv_count;
                            y[a] = w * (grp.top * ghat[a] - grp.count * u[a]);
                            rp[a] += y[a];
                            dp[a] += w;
                        }
                        let rs = sum(y);
                        let ds = sum(pl) * grp.inv_count;
                        let pre = if ds > T::ZERO { T::ONE / ds } else { T::ZERO };
                        st[X * gp + gi] = T::ZERO;
                        st[R * gp + gi] = rs;
                        st[Z * gp + gi] = pre * rs;
                        st[P * gp + gi] = pre * rs;
                        st[Q * gp + gi] = T::ZERO;
                        st[PRE * gp + gi] = pre;
                        dots[0] += rs * pre * rs;
                        dots[1] += rs * rs;
                    }
                }
            },
        );
        reduce_partials(partials, chunks, acc);
        for v in [&mut *x, &mut *r, &mut *z, &mut *p, &mut *q, &mut *pre] {
            v.clear();
            v.resize(ga, T::ZERO);
        }
        for j in 0..ga {
            r[j] = acc[j];
            let d = acc[ga + j];
            pre[j] = if d > T::ZERO { T::ONE / d } else { T::ZERO };
            z[j] = pre[j] * r[j];
            p[j] = z[j];
        }
        let (rz0, rr0) = (dot(r, z) + acc[2 * ga], dot(r, r) + acc[2 * ga + 1]);
        let planes: &[T] = planes;
        let mut iterations = 0;
        if let Some(mut cg) = Cg::start(rz0, rr0) {
            loop {
                if interrupt.requested() {
                    return cg.iters;
                }
                // q = M p (γ part into the rows, α part and ⟨p_γ, q_γ⟩ into the partials).
                let pa: &[T] = p;
                run_pass(
                    n,
                    chunk_rows,
                    Strided::new(rows, STATE * gp),
                    Strided::new(out, stride),
                    Strided::new(partials, ga + 1),
                    Scratch::new(scratch, 2 * k),
                    #[inline(always)]
                    |range, st, _o, part, scr| {
                        part.fill(T::ZERO);
                        let (t, y) = scr.split_at_mut(k);
                        let first = range.start;
                        for i in range {
                            let l = i - first;
                            let prow = &planes[i * rw..(i + 1) * rw];
                            let inv_d = &prow[ga..ga + k];
                            let st = &mut st[l * STATE * gp..(l + 1) * STATE * gp];
                            // t = Σ_G P_G v_G / D, v = α + γ of p.
                            t.fill(T::ZERO);
                            for gi in 0..gp {
                                let (pl, pv, pg) = (
                                    &prow[gi * k..(gi + 1) * k],
                                    &pa[gi * k..(gi + 1) * k],
                                    st[P * gp + gi],
                                );
                                for a in 0..k {
                                    t[a] += pl[a] * (pv[a] + pg);
                                }
                            }
                            for a in 0..k {
                                t[a] *= inv_d[a];
                            }
                            let mut pq = T::ZERO;
                            for (gi, grp) in groups.iter().enumerate() {
                                let (pl, pv, pg) = (
                                    &prow[gi * k..(gi + 1) * k],
                                    &pa[gi * k..(gi + 1) * k],
                                    st[P * gp + gi],
                                );
                                let qp = &mut part[gi * k..(gi + 1) * k];
                                let (t, y) = (&t[..k], &mut y[..k]);
                                for a in 0..k {
                                    // W_G e_G(v) = P_G (v_G / c_G − t).
                                    y[a] = pl[a] * ((pv[a] + pg) * grp.inv_count - t[a]);
                                    qp[a] += y[a];
                                }
                                let qs = sum(y);
                                st[Q * gp + gi] = qs;
                                pq += pg * qs;
                            }
                            part[ga] += pq;
                        }
                    },
                );
                reduce_partials(partials, chunks, &mut acc[..ga + 1]);
                q.copy_from_slice(&acc[..ga]);
                let Some(step) = cg.step(dot(p, q) + acc[ga]) else {
                    break;
                };
                let (mut rz, mut rr) = update(step, x, r, z, p, q, pre);
                for st in rows.chunks_exact_mut(STATE * gp) {
                    for gi in 0..gp {
                        st[X * gp + gi] += step * st[P * gp + gi];
                        st[R * gp + gi] -= step * st[Q * gp + gi];
                        let rv = st[R * gp + gi];
                        let zv = st[PRE * gp + gi] * rv;
                        st[Z * gp + gi] = zv;
                        rz += rv * zv;
                        rr += rv * rv;
                    }
                }
                match cg.next(rz, rr) {
                    Some(beta) => {
                        for j in 0..ga {
                            p[j] = z[j] + beta * p[j];
                        }
                        for st in rows.chunks_exact_mut(STATE * gp) {
                            for gi in 0..gp {
                                st[P * gp + gi] = st[Z * gp + gi] + beta * st[P * gp + gi];
                            }
                        }
                    }
                    None => break,
                }
            }
            iterations = cg.iters;
        }

        // Output: ∂S = Σ_G w_G P_G (ê_G − e_G(v)) / eps, v = α + γ from x.
        let xa: &[T] = x;
        run_pass(
            n,
            chunk_rows,
            Strided::new(rows, STATE * gp),
            Strided::new(out, stride),
            Strided::new(partials, 1),
            Scratch::new(scratch, 2 * k),
            #[inline(always)]
            |range, st, o, _, scr| {
                let (t, u) = scr.split_at_mut(k);
                let first = range.start;
                for i in range {
                    let l = i - first;
                    let prow = &planes[i * rw..(i + 1) * rw];
                    let inv_d = &prow[ga..ga + k];
                    let ghat = &prow[ga + k..ga + 2 * k];
                    let st = &st[l * STATE * gp..(l + 1) * STATE * gp];
                    t.fill(T::ZERO);
                    u.fill(T::ZERO);
                    for (gi, grp) in groups.iter().enumerate() {
                        let (pl, xv, xg) = (
                            &prow[gi * k..(gi + 1) * k],
                            &xa[gi * k..(gi + 1) * k],
                            st[X * gp + gi],
                        );
                        for a in 0..k {
                            t[a] += pl[a] * (xv[a] + xg);
                            u[a] += grp.top * pl[a];
                        }
                    }
                    for a in 0..k {
                        t[a] *= inv_d[a];
                        u[a] *= ghat[a] * inv_d[a];
                    }
                    let orow = &mut o[l * stride..(l + 1) * stride];
                    orow.fill(T::ZERO);
                    for (gi, grp) in groups.iter().enumerate() {
                        let (pl, xv, xg) = (
                            &prow[gi * k..(gi + 1) * k],
                            &xa[gi * k..(gi + 1) * k],
                            st[X * gp + gi],
                        );
                        let ws = grp.weight * inv_eps;
                        for a in 0..k {
                            let resid = grp.top * ghat[a]
                                - grp.count * u[a]
                                - (xv[a] + xg - grp.count * t[a]);
                            orow[a] += ws * pl[a] * resid;
                        }
                    }
                }
            },
        );
        iterations
    }
}
