//! The exact reverse pass of one problem's unrolled iteration.
//!
//! The forward is replayed for the problem's own iteration count, recording every iteration's
//! potentials (`solve.rs`). With `Q = grad ∘ P / e_T`, the adjoints start at `f̄ = Σ_j Q`,
//! `ḡ = Σ_i Q`, `S̄ = Q`; then, from the last iteration down, each step is undone:
//!
//! - row step `f^t = e_t ln r − tau_t e_t LSE_j((S + g^t)/e_t)`, with the row softmax `A^t`:
//!   `S̄ −= tau_t f̄ᵢ A^t`, `ḡ −= tau_t Σ_i f̄ᵢ A^t`;
//! - column step `g^t = e_t ln c − tau_t e_t LSE_i((S + f^{t−1})/e_t)`, with the column
//!   softmax `B^t`: `S̄ −= tau_t ḡⱼ B^t`, `f̄^{t−1} = −tau_t Σ_j ḡⱼ B^t` (`f^{−1} = f0` is a
//!   constant, so the last one is dropped).
//!
//! `f̄^{t−1}_i` is complete once row `i` of the column step is undone, so each reverse
//! iteration is one pass over the rows: the column step of `t`, then the row step of `t − 1`,
//! for each row. The softmaxes come from the recorded log-sum-exps (log domain: one `exp` each
//! per element) or, in the plain domain, from the cached kernel and scalings:
//! `A^t = K u^t v^t / r`, `B^t = K u^{t−1} v^t / c` (multiplications only).

use super::solve::{chunk_rows, hsum, reset, sum_parts, Blk, Problem, Route, Workspace, W};
use super::One;
use crate::simd::{dispatch, Real};
use rayon::prelude::*;
use std::ops::Range;

impl<T: Real> Problem<T> {
    /// The VJP of one problem into the valid block of its padded `out` (the padding is not
    /// written); `grad` is its padded `[N, K]` slice.
    /// Returns whether the plain domain was forced where it is not safe.
    pub(super) fn backward(
        &self,
        one: &One<'_, T>,
        grad: &[T],
        iters: usize,
        ws: &mut Workspace<T>,
        out: &mut [T],
    ) -> bool {
        dispatch(
            #[inline(always)]
            || {
                let (n, k, stride) = (one.n, one.k, one.stride);
                let route = self.route(one, ws);
                let done = match route {
                    Route::TooWide => return true,
                    Route::NonFinite => {
                        for i in 0..n {
                            out[i * stride..i * stride + k].fill(T::from_f64(f64::NAN));
                        }
                        return false;
                    }
                    Route::Plain => self.solve_plain(one, ws, iters, -1.0, true).0,
                    Route::Log => self.solve_log(one, ws, iters, -1.0, true).0,
                };
                if done < iters || self.interrupt.requested() {
                    // Interrupted: the call returns an error.
                    return false;
                }
                pack_grad(one, grad, ws);
                if route == Route::Plain {
                    self.reverse_plain(one, iters, ws);
                } else {
                    self.reverse_log(one, iters, ws);
                }
                let kc = k.div_ceil(W);
                let of = ws.out.as_flattened();
                for i in 0..n {
                    out[i * stride..i * stride + k].copy_from_slice(&of[i * kc * W..][..k]);
                }
                false
            },
        )
    }

    /// The plain domain's reverse pass (balanced, one eps): `ws.x` holds `K`, the history
    /// `u^t`, `v^t`.
    #[inline(always)]
    fn reverse_plain(&self, one: &One<'_, T>, iters: usize, ws: &mut Workspace<T>) {
        let (n, k) = (one.n, one.k);
        let kc = k.div_ceil(W);
        let (r, c) = (&one.row_mass[..n], &one.col_mass[..k]);
        let ie = T::from_f64(1.0 / self.eps);
        ws.clear_reverse(n, kc);
        let Workspace {
            x,
            gp,
            out,
            bg,
            nbg,
            wg,
            hist,
            parts,
            ..
        } = ws;
        let (x, gp) = (&x[..], &gp[..]);
        let last = iters - 1;
        let (ut, vt) = (&hist.row[last * n..][..n], &hist.col[last * kc..][..kc]);
        // The plan's own adjoint, then the last row step; ḡ is the column sums of the result.
        over_rows(
            n,
            kc,
            out,
            parts,
            bg,
            #[inline(always)]
            |rows, outb, part| {
                for (i, orow) in rows.zip(outb.chunks_exact_mut(kc)) {
                    let (xr, gr) = (&x[i * kc..][..kc], &gp[i * kc..][..kc]);
                    let ui = ut[i];
                    let mut bf = [T::ZERO; W];
                    for cb in 0..kc {
                        let (xv, vv, gv) = (xr[cb], vt[cb], gr[cb]);
                        let mut q = [T::ZERO; W];
                        for l in 0..W {
                            q[l] = gv[l] * (xv[l] * vv[l] * ui) * ie;
                            bf[l] += q[l];
                        }
                        orow[cb] = q;
                    }
                    let beta = hsum(bf) / r[i];
                    for cb in 0..kc {
                        let (xv, vv) = (xr[cb], vt[cb]);
                        let (mut o, mut b) = (orow[cb], part[cb]);
                        for l in 0..W {
                            o[l] -= beta * (xv[l] * vv[l] * ui);
                            b[l] += o[l];
                        }
                        orow[cb] = o;
                        part[cb] = b;
                    }
                }
            },
        );
        for t in (0..iters).rev() {
            if self.interrupt.requested() {
                return;
            }
            let vt = &hist.col[t * kc..][..kc];
            {
                let (wf, bf, vf) = (wg.as_flattened_mut(), bg.as_flattened(), vt.as_flattened());
                for j in 0..k {
                    wf[j] = bf[j] * vf[j] / c[j];
                }
            }
            let wg = &wg[..];
            let prev = (t > 0).then(|| {
                (
                    &hist.row[(t - 1) * n..][..n],
                    &hist.col[(t - 1) * kc..][..kc],
                )
            });
            over_rows(
                n,
                kc,
                out,
                parts,
                nbg,
                #[inline(always)]
                |rows, outb, part| {
                    for (i, orow) in rows.zip(outb.chunks_exact_mut(kc)) {
                        let xr = &x[i * kc..][..kc];
                        let a = prev.map_or(T::ONE, |(u, _)| u[i]);
                        let mut d = [T::ZERO; W];
                        for cb in 0..kc {
                            let (xv, wv) = (xr[cb], wg[cb]);
                            for l in 0..W {
                                d[l] += xv[l] * wv[l];
                            }
                        }
                        // f̄^{t−1}_i = −Σ_j ḡ_j B_ij.
                        let bfp = -(a * hsum(d));
                        match prev {
                            Some((_, vp)) => {
                                let gam = a * bfp / r[i];
                                for cb in 0..kc {
                                    let (xv, wv, pv) = (xr[cb], wg[cb], vp[cb]);
                                    let (mut o, mut nb) = (orow[cb], part[cb]);
                                    for l in 0..W {
                                        let av = xv[l] * pv[l] * gam;
                                        o[l] -= xv[l] * (a * wv[l]) + av;
                                        nb[l] -= av;
                                    }
                                    orow[cb] = o;
                                    part[cb] = nb;
                                }
                            }
                            None => {
                                for cb in 0..kc {
                                    let (xv, wv) = (xr[cb], wg[cb]);
                                    let mut o = orow[cb];
                                    for l in 0..W {
                                        o[l] -= xv[l] * (a * wv[l]);
                                    }
                                    orow[cb] = o;
                                }
                            }
                        }
                    }
                },
            );
            std::mem::swap(bg, nbg);
        }
    }

    /// The log domain's reverse pass: `ws.x` holds `S` (pad `-inf`), the history `f^t`, `g^t`,
    /// the row and column log-sum-exps and each iteration's eps.
    #[inline(always)]
    fn reverse_log(&self, one: &One<'_, T>, iters: usize, ws: &mut Workspace<T>) {
        let (n, k) = (one.n, one.k);
        let kc = k.div_ceil(W);
        ws.clear_reverse(n, kc);
        let Workspace {
            x,
            gp,
            out,
            bg,
            nbg,
            wg,
            hist,
            parts,
            ..
        } = ws;
        let (x, gp) = (&x[..], &gp[..]);
        let last = iters - 1;
        let e_last = hist.e[last];
        let (ie, taut) = (T::from_f64(1.0 / e_last), T::from_f64(self.tau(e_last)));
        let (ft, gt) = (&hist.row[last * n..][..n], &hist.col[last * kc..][..kc]);
        let lrt = &hist.lr[last * n..][..n];
        over_rows(
            n,
            kc,
            out,
            parts,
            bg,
            #[inline(always)]
            |rows, outb, part| {
                for (i, orow) in rows.zip(outb.chunks_exact_mut(kc)) {
                    let (xr, gr) = (&x[i * kc..][..kc], &gp[i * kc..][..kc]);
                    let fi = ft[i];
                    let mut bf = [T::ZERO; W];
                    for cb in 0..kc {
                        let (xv, gv, pv) = (xr[cb], gt[cb], gr[cb]);
                        let mut q = [T::ZERO; W];
                        for l in 0..W {
                            let p = ((xv[l] + fi + gv[l]) * ie).exp_fast();
                            q[l] = pv[l] * p * ie;
                            bf[l] += q[l];
                        }
                        orow[cb] = q;
                    }
                    let coef = taut * hsum(bf);
                    let lri = lrt[i];
                    for cb in 0..kc {
                        let (xv, gv) = (xr[cb], gt[cb]);
                        let (mut o, mut b) = (orow[cb], part[cb]);
                        for l in 0..W {
                            let a = ((xv[l] + gv[l]) * ie - lri).exp_fast();
                            o[l] -= coef * a;
                            b[l] += o[l];
                        }
                        orow[cb] = o;
                        part[cb] = b;
                    }
                }
            },
        );
        for t in (0..iters).rev() {
            if self.interrupt.requested() {
                return;
            }
            let e = hist.e[t];
            let (ie, taut) = (T::from_f64(1.0 / e), T::from_f64(self.tau(e)));
            for (w, b) in wg.iter_mut().zip(bg.iter()) {
                let mut wv = *b;
                for x in wv.iter_mut() {
                    *x *= taut;
                }
                *w = wv;
            }
            let wg = &wg[..];
            let lct = &hist.lc[t * kc..][..kc];
            let fprev: &[T] = if t > 0 {
                &hist.row[(t - 1) * n..][..n]
            } else {
                &one.init_f[..n]
            };
            let prev = (t > 0).then(|| {
                let ep = hist.e[t - 1];
                (
                    T::from_f64(1.0 / ep),
                    T::from_f64(self.tau(ep)),
                    &hist.col[(t - 1) * kc..][..kc],
                    &hist.lr[(t - 1) * n..][..n],
                )
            });
            over_rows(
                n,
                kc,
                out,
                parts,
                nbg,
                #[inline(always)]
                |rows, outb, part| {
                    let mut tmp = [[T::ZERO; W]; MAX_STACK_BLOCKS];
                    let mut heap = Vec::new();
                    let tmp: &mut [Blk<T>] = if kc <= MAX_STACK_BLOCKS {
                        &mut tmp[..kc]
                    } else {
                        heap.resize(kc, [T::ZERO; W]);
                        &mut heap[..]
                    };
                    for (i, orow) in rows.zip(outb.chunks_exact_mut(kc)) {
                        let xr = &x[i * kc..][..kc];
                        let fi = fprev[i];
                        let mut d = [T::ZERO; W];
                        for cb in 0..kc {
                            let (xv, lv, wv) = (xr[cb], lct[cb], wg[cb]);
                            let mut bv = [T::ZERO; W];
                            for l in 0..W {
                                bv[l] = ((xv[l] + fi) * ie - lv[l]).exp_fast() * wv[l];
                                d[l] += bv[l];
                            }
                            tmp[cb] = bv;
                        }
                        // f̄^{t−1}_i = −tau_t Σ_j ḡ_j B_ij.
                        let bfp = -hsum(d);
                        match prev {
                            Some((iep, taup, gprev, lrp)) => {
                                let (coef, lri) = (taup * bfp, lrp[i]);
                                for cb in 0..kc {
                                    let (xv, gv, bv) = (xr[cb], gprev[cb], tmp[cb]);
                                    let (mut o, mut nb) = (orow[cb], part[cb]);
                                    for l in 0..W {
                                        let a = coef * ((xv[l] + gv[l]) * iep - lri).exp_fast();
                                        o[l] -= bv[l] + a;
                                        nb[l] -= a;
                                    }
                                    orow[cb] = o;
                                    part[cb] = nb;
                                }
                            }
                            None => {
                                for cb in 0..kc {
                                    let bv = tmp[cb];
                                    let mut o = orow[cb];
                                    for l in 0..W {
                                        o[l] -= bv[l];
                                    }
                                    orow[cb] = o;
                                }
                            }
                        }
                    }
                },
            );
            std::mem::swap(bg, nbg);
        }
    }
}

/// Row scratch blocks kept on the stack (longer rows use the heap).
const MAX_STACK_BLOCKS: usize = 64;

/// Runs `pass(rows, out rows, partial)` over the problem's rows and leaves the sum of the
/// partial column vectors in `acc`: in one piece for a small problem, in fixed row chunks on the
/// pool for a large one (partials added in chunk order, so the result does not depend on the
/// thread count).
#[inline(always)]
fn over_rows<T: Real, F>(
    n: usize,
    kc: usize,
    out: &mut [Blk<T>],
    parts: &mut Vec<Blk<T>>,
    acc: &mut [Blk<T>],
    pass: F,
) where
    F: Fn(Range<usize>, &mut [Blk<T>], &mut [Blk<T>]) + Sync,
{
    match chunk_rows(n, kc) {
        None => {
            acc.fill([T::ZERO; W]);
            pass(0..n, out, acc);
        }
        Some(cr) => {
            reset(parts, n.div_ceil(cr) * kc, [T::ZERO; W]);
            out.par_chunks_mut(cr * kc)
                .zip(parts.par_chunks_mut(kc))
                .enumerate()
                .for_each(|(ci, (ob, pb))| {
                    let rows = ci * cr..(ci * cr + cr).min(n);
                    dispatch(
                        #[inline(always)]
                        || pass(rows, ob, pb),
                    )
                });
            sum_parts(parts, kc, acc);
        }
    }
}

/// The problem's valid `grad` block into `ws.gp` (`[n, kc]`, padding 0).
#[inline(always)]
fn pack_grad<T: Real>(one: &One<'_, T>, grad: &[T], ws: &mut Workspace<T>) {
    let (n, k, stride) = (one.n, one.k, one.stride);
    let kc = k.div_ceil(W);
    reset(&mut ws.gp, n * kc, [T::ZERO; W]);
    let gf = ws.gp.as_flattened_mut();
    for i in 0..n {
        gf[i * kc * W..][..k].copy_from_slice(&grad[i * stride..][..k]);
    }
}

impl<T: Real> Workspace<T> {
    /// Zeroes the reverse pass's gradient `[n, kc]` and its three column adjoints `[kc]`.
    fn clear_reverse(&mut self, n: usize, kc: usize) {
        let zero = [T::ZERO; W];
        reset(&mut self.out, n * kc, zero);
        reset(&mut self.bg, kc, zero);
        reset(&mut self.nbg, kc, zero);
        reset(&mut self.wg, kc, zero);
    }
}
