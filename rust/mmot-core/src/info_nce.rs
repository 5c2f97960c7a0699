//! Fused InfoNCE / NormSoftmax loss without the N×N logits (DESIGN.md §2.3).
//!
//! With s[i,j] = â_i·b̂_j / τ (â, b̂ the L2-normalised rows when `normalize`) and w the 0/1
//! validity of each pair, the per-pair loss is
//!
//! ```text
//! loss[i] = w_i (lse_a[i] − s[i,i]) + [symmetric] w_i (lse_b[i] − s[i,i])
//! lse_a[i] = log Σ_j w_j exp(s[i,j])          (row direction)
//! lse_b[j] = log Σ_i w_i exp(s[i,j])          (column direction)
//! ```
//!
//! The forward walks row chunks of `a` against column tiles of `b` keeping an online
//! log-sum-exp per row, and then the same with the roles swapped for `lse_b`. The backward
//! recomputes the tiles (the Inf-CL approach): with upstream gradient g,
//!
//! ```text
//! G[i,j] = w_i w_j (g_i exp(s[i,j] − lse_a[i]) + [sym] g_j exp(s[i,j] − lse_b[j]))
//!          − δ_ij g_i w_i (1 + [sym])
//! ∂/∂â_i = Σ_j G[i,j] b̂_j / τ,    ∂/∂b̂_j = Σ_i G[i,j] â_i / τ
//! ```
//!
//! and the two sums are two row-streaming passes, the second with `a` and `b` swapped (G has
//! the same form with lse_a and lse_b exchanged). Normalised copies are never written: the dot
//! products are scaled by the inverse row norms. Extra memory is O(N) plus one tile per task.
//!
//! Row chunks have a fixed size and every row's arithmetic is independent of the others, so
//! results do not depend on the thread count.

use crate::error::{check_len, MmotError, Result};
use crate::gemm::gemm;
use crate::real::{Real, LANES};
use rayon::prelude::*;

/// Rows per parallel task in the element-wise loops and the backward.
const RB: usize = TR;
/// Rows per logit tile.
const TR: usize = 256;
/// Columns per tile: a tile of raw dot products is TR × TC (256 KiB in f32).
const TC: usize = 256;
/// Row blocks in the forward's column log-sum-exp partials (bounds them to O(M) memory).
const MAX_BLOCKS: usize = 64;
/// Norm floor, as `torch.nn.functional.normalize(eps=1e-12)`.
const NORM_EPS: f64 = 1e-12;

/// The loss's parameters.
#[derive(Clone, Copy, Debug)]
pub struct InfoNceParams {
    /// τ > 0: logits are similarities divided by it.
    pub temperature: f64,
    /// Add the column direction (b against a) to the row direction (a against b).
    pub symmetric: bool,
    /// L2-normalise the rows of a and b first (cosine similarities).
    pub normalize: bool,
}

fn check(
    params: &InfoNceParams,
    a: &[impl Real],
    b: &[impl Real],
    valid: &[impl Real],
    n: usize,
    d: usize,
) -> Result<()> {
    if !(params.temperature.is_finite() && params.temperature > 0.0) {
        return Err(MmotError::InvalidArgument(format!(
            "temperature must be a finite number > 0, got {}",
            params.temperature
        )));
    }
    check_len("a", a.len(), n * d, &format!("[{n}, {d}]"))?;
    check_len("b", b.len(), n * d, &format!("[{n}, {d}]"))?;
    check_len("valid", valid.len(), n, &format!("[{n}]"))
}

/// Per-pair losses and the two log-sum-exps (`loss`, `lse_a`, `lse_b`: `[n]` each).
///
/// `a`, `b`: `[n, d]`; `valid`: `[n]` of 0 or 1. Without `symmetric`, `lse_b` is filled with 0.
/// An invalid pair gets loss 0; a row with no valid column gets lse −∞.
#[allow(clippy::too_many_arguments)]
pub fn info_nce_forward<T: Real>(
    a: &[T],
    b: &[T],
    valid: &[T],
    n: usize,
    d: usize,
    params: &InfoNceParams,
    loss: &mut [T],
    lse_a: &mut [T],
    lse_b: &mut [T],
) -> Result<()> {
    info_nce_forward_checked(a, b, valid, n, d, params, loss, lse_a, lse_b, false)
}

/// [`info_nce_forward`], and with `check_finite` an error (not a result) for NaN or Inf in `a`
/// or `b`, found in the row-norm pass (so the caller need not scan the inputs first).
#[allow(clippy::too_many_arguments)]
pub fn info_nce_forward_checked<T: Real>(
    a: &[T],
    b: &[T],
    valid: &[T],
    n: usize,
    d: usize,
    params: &InfoNceParams,
    loss: &mut [T],
    lse_a: &mut [T],
    lse_b: &mut [T],
    check_finite: bool,
) -> Result<()> {
    check(params, a, b, valid, n, d)?;
    for (name, v) in [("loss", &*loss), ("lse_a", &*lse_a), ("lse_b", &*lse_b)] {
        check_len(name, v.len(), n, &format!("[{n}]"))?;
    }
    let scale = T::from_f64(1.0 / params.temperature);
    let (ia, finite_a) = inv_norms_checked(a, n, d, params.normalize, check_finite);
    if !finite_a {
        return Err(crate::chunks::not_finite("a"));
    }
    let (ib, finite_b) = inv_norms_checked(b, n, d, params.normalize, check_finite);
    if !finite_b {
        return Err(crate::chunks::not_finite("b"));
    }
    if params.symmetric {
        lse_fused(
            a,
            b,
            &ia,
            &ib,
            valid,
            valid,
            d,
            scale,
            lse_a,
            Some(&mut *lse_b),
        );
    } else {
        lse_fused(a, b, &ia, &ib, valid, valid, d, scale, lse_a, None);
        lse_b.fill(T::ZERO);
    }
    let (la, lb) = (&*lse_a, &*lse_b);
    loss.par_chunks_mut(RB).enumerate().for_each(|(c, out)| {
        for (r, o) in out.iter_mut().enumerate() {
            let i = c * RB + r;
            *o = if valid[i] == T::ZERO {
                T::ZERO
            } else {
                let diag = crate::real::dot(&a[i * d..(i + 1) * d], &b[i * d..(i + 1) * d])
                    * (scale * ia[i] * ib[i]);
                let mut l = la[i] - diag;
                if params.symmetric {
                    l += lb[i] - diag;
                }
                l
            };
        }
    });
    Ok(())
}

/// Gradients of Σ_i grad[i]·loss[i] with respect to `a` and `b` (`grad_a`, `grad_b`: `[n, d]`),
/// recomputing the logits tile by tile from the saved `lse_a` and `lse_b`.
#[allow(clippy::too_many_arguments)]
pub fn info_nce_backward<T: Real>(
    grad: &[T],
    a: &[T],
    b: &[T],
    valid: &[T],
    lse_a: &[T],
    lse_b: &[T],
    n: usize,
    d: usize,
    params: &InfoNceParams,
    grad_a: &mut [T],
    grad_b: &mut [T],
) -> Result<()> {
    check(params, a, b, valid, n, d)?;
    for (name, v) in [("grad", grad), ("lse_a", lse_a), ("lse_b", lse_b)] {
        check_len(name, v.len(), n, &format!("[{n}]"))?;
    }
    check_len("grad_a", grad_a.len(), n * d, &format!("[{n}, {d}]"))?;
    check_len("grad_b", grad_b.len(), n * d, &format!("[{n}, {d}]"))?;
    let scale = T::from_f64(1.0 / params.temperature);
    let ia = inv_norms(a, n, d, params.normalize);
    let ib = inv_norms(b, n, d, params.normalize);
    backward_tiles(
        a,
        b,
        &ia,
        &ib,
        valid,
        grad,
        lse_a,
        lse_b,
        n,
        d,
        scale,
        params.symmetric,
        grad_a,
        grad_b,
    );
    finish_rows(a, &ia, d, scale, params.normalize, grad_a);
    finish_rows(b, &ib, d, scale, params.normalize, grad_b);
    Ok(())
}

/// Inverse row norms (all ones without `normalize`) and, with `check`, whether every element of
/// `x` is finite (`v − v` is 0 for finite `v` and NaN otherwise, summed in the same pass).
#[allow(clippy::eq_op)]
fn inv_norms_checked<T: Real>(
    x: &[T],
    n: usize,
    d: usize,
    normalize: bool,
    check: bool,
) -> (Vec<T>, bool) {
    if !check {
        return (inv_norms(x, n, d, normalize), true);
    }
    let tiny = T::from_f64(NORM_EPS);
    let mut v = vec![T::ONE; n];
    let ok = v
        .par_chunks_mut(1024)
        .enumerate()
        .map(|(c, vs)| {
            let mut nf = T::ZERO;
            for (k, vi) in vs.iter_mut().enumerate() {
                let row = &x[(c * 1024 + k) * d..(c * 1024 + k + 1) * d];
                let mut z = [T::ZERO; LANES];
                let mut it = row.chunks_exact(LANES);
                for ch in &mut it {
                    for l in 0..LANES {
                        z[l] += ch[l] - ch[l];
                    }
                }
                for q in it.remainder() {
                    nf += *q - *q;
                }
                nf += crate::real::sum(&z);
                if normalize {
                    *vi = T::ONE / crate::real::dot(row, row).sqrt().fmax(tiny);
                }
            }
            nf == T::ZERO
        })
        .reduce(|| true, |p, q| p && q);
    (v, ok)
}

fn inv_norms<T: Real>(x: &[T], n: usize, d: usize, normalize: bool) -> Vec<T> {
    let mut v = vec![T::ONE; n];
    if normalize {
        let tiny = T::from_f64(NORM_EPS);
        v.par_chunks_mut(1024).enumerate().for_each(|(c, vs)| {
            for (k, vi) in vs.iter_mut().enumerate() {
                let row = &x[(c * 1024 + k) * d..(c * 1024 + k + 1) * d];
                *vi = T::ONE / crate::real::dot(row, row).sqrt().fmax(tiny);
            }
        });
    }
    v
}

/// Both log-sum-exps from one GEMM per tile:
/// `lse_x[i] = log Σ_j wy_j exp(s[i,j])` (online max per row) and, when `lse_y` is given,
/// `lse_y[j] = log Σ_i wx_i exp(s[i,j])` with `s[i,j] = scale · ix_i · iy_j · x_i·y_j`.
///
/// Each task owns a fixed block of rows (its size depends only on the problem size) and keeps,
/// for every column, a running (max, sum) over its rows; the blocks' column partials are then
/// merged in block order. At most `MAX_BLOCKS` blocks, so the partials take O(M) memory.
#[allow(clippy::too_many_arguments)]
fn lse_fused<T: Real>(
    x: &[T],
    y: &[T],
    ix: &[T],
    iy: &[T],
    wx: &[T],
    wy: &[T],
    d: usize,
    scale: T,
    lse_x: &mut [T],
    lse_y: Option<&mut [T]>,
) {
    let n = ix.len();
    let m = iy.len();
    let want_cols = lse_y.is_some();
    let block = block_rows(n);
    let nblocks = n.div_ceil(block);
    // Column partials of every block: [nblocks, m] maxima and sums.
    let pcols = if want_cols { m } else { 0 };
    let mut pmax = vec![T::NEG_INFINITY; nblocks * pcols];
    let mut psum = vec![T::ZERO; nblocks * pcols];
    let neg = |w: T| {
        if w == T::ZERO {
            T::NEG_INFINITY
        } else {
            T::ZERO
        }
    };
    let pm_chunks: Vec<&mut [T]> = if want_cols {
        pmax.chunks_mut(m).collect()
    } else {
        (0..nblocks).map(|_| &mut [][..]).collect()
    };
    let ps_chunks: Vec<&mut [T]> = if want_cols {
        psum.chunks_mut(m).collect()
    } else {
        (0..nblocks).map(|_| &mut [][..]).collect()
    };
    lse_x
        .par_chunks_mut(block)
        .zip(pm_chunks.into_par_iter().zip(ps_chunks.into_par_iter()))
        .enumerate()
        .for_each(|(c, (out, (cmax, csum)))| {
            let mut tile = vec![T::ZERO; TR * TC];
            let mut mj = [T::ZERO; TC];
            let mut sj = [T::ZERO; TC];
            let mut tmax = [T::ZERO; TC];
            let mut mi = [T::ZERO; TR];
            let mut sx = [T::ZERO; TR];
            let mut run_max = [T::NEG_INFINITY; TR];
            let mut run_sum = [T::ZERO; TR];
            for r0 in (0..out.len()).step_by(TR) {
                let i0 = c * block + r0;
                let rows = TR.min(out.len() - r0);
                for r in 0..rows {
                    mi[r] = neg(wx[i0 + r]);
                    sx[r] = scale * ix[i0 + r];
                }
                run_max[..rows].fill(T::NEG_INFINITY);
                run_sum[..rows].fill(T::ZERO);
                let xs = &x[i0 * d..(i0 + rows) * d];
                for j0 in (0..m).step_by(TC) {
                    let cols = TC.min(m - j0);
                    dot_tile(xs, &y[j0 * d..(j0 + cols) * d], d, rows, cols, &mut tile);
                    crate::simd::dispatch(
                        #[inline(always)]
                        || {
                            for q in 0..cols {
                                mj[q] = neg(wy[j0 + q]);
                                sj[q] = iy[j0 + q];
                            }
                            tmax[..cols].fill(T::NEG_INFINITY);
                            for r in 0..rows {
                                let t = &mut tile[r * TC..r * TC + cols];
                                let f = sx[r];
                                let mut rmax = T::NEG_INFINITY;
                                for q in 0..cols {
                                    let v = t[q] * f * sj[q];
                                    t[q] = v;
                                    rmax = rmax.fmax(v + mj[q]);
                                }
                                if want_cols {
                                    let mr = mi[r];
                                    for q in 0..cols {
                                        tmax[q] = tmax[q].fmax(t[q] + mr);
                                    }
                                }
                                if rmax == T::NEG_INFINITY {
                                    continue;
                                }
                                if rmax > run_max[r] {
                                    run_sum[r] *= (run_max[r] - rmax).exp_fast();
                                    run_max[r] = rmax;
                                }
                                let sh = run_max[r];
                                run_sum[r] += exp_sum(t, &mj[..cols], sh);
                            }
                            if want_cols {
                                let (cm, cs) = (&mut cmax[j0..j0 + cols], &mut csum[j0..j0 + cols]);
                                // New shift per column; a column with no valid row yet keeps shift 0
                                // so that no −∞ − (−∞) appears.
                                for q in 0..cols {
                                    let nm = cm[q].fmax(tmax[q]);
                                    let sh = if nm == T::NEG_INFINITY { T::ZERO } else { nm };
                                    cs[q] *= (cm[q] - sh).exp_fast();
                                    cm[q] = nm;
                                    tmax[q] = sh;
                                }
                                for r in 0..rows {
                                    let t = &tile[r * TC..r * TC + cols];
                                    let mr = mi[r];
                                    for q in 0..cols {
                                        cs[q] += (t[q] + mr - tmax[q]).exp_fast();
                                    }
                                }
                            }
                        },
                    );
                }
                for r in 0..rows {
                    out[r0 + r] = if run_max[r] == T::NEG_INFINITY {
                        T::NEG_INFINITY
                    } else {
                        run_max[r] + run_sum[r].ln()
                    };
                }
            }
        });
    if let Some(lse_y) = lse_y {
        lse_y.par_chunks_mut(TC).enumerate().for_each(|(c, out)| {
            for (k, o) in out.iter_mut().enumerate() {
                let j = c * TC + k;
                let mut mx = T::NEG_INFINITY;
                for b in 0..nblocks {
                    mx = mx.fmax(pmax[b * m + j]);
                }
                *o = if mx == T::NEG_INFINITY {
                    T::NEG_INFINITY
                } else {
                    let mut s = T::ZERO;
                    for b in 0..nblocks {
                        s += psum[b * m + j] * (pmax[b * m + j] - mx).exp_fast();
                    }
                    mx + s.ln()
                };
            }
        });
    }
}

/// Rows per task block: a multiple of `TR`, large enough that there are at most `MAX_BLOCKS`.
fn block_rows(n: usize) -> usize {
    let tiles = n.div_ceil(TR).max(1);
    tiles.div_ceil(MAX_BLOCKS) * TR
}

/// `Σ_q exp(t[q] + mask[q] − shift)` with a fixed 8-lane summation order.
#[inline(always)]
fn exp_sum<T: Real>(t: &[T], mask: &[T], shift: T) -> T {
    let mut acc = [T::ZERO; LANES];
    let mut it = t.chunks_exact(LANES);
    let mut im = mask.chunks_exact(LANES);
    for (ch, mk) in (&mut it).zip(&mut im) {
        for l in 0..LANES {
            acc[l] += (ch[l] + mk[l] - shift).exp_fast();
        }
    }
    let mut tail = T::ZERO;
    for (v, mk) in it.remainder().iter().zip(im.remainder()) {
        tail += (*v + *mk - shift).exp_fast();
    }
    crate::real::sum(&acc) + tail
}

/// A raw pointer the wavefront tasks share; each task writes only rows no other task of the
/// same step touches.
#[derive(Clone, Copy)]
struct SharedMut<T>(*mut T);
// SAFETY: used only as described on the type (disjoint rows per step, steps separated by joins).
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// A method, so that closures capture the whole wrapper and not the bare pointer field.
    fn at(self, offset: usize) -> *mut T {
        self.0.wrapping_add(offset)
    }
}

/// Raw gradients (before the 1/τ scale and the normalisation) of both sides, each logit tile
/// recomputed once:
///
/// ```text
/// grad_a[i] += Σ_j G[i,j] ib_j b_j        grad_b[j] += Σ_i G[i,j] ia_i a_i
/// ```
///
/// The tiles (I, J) of the block grid (TR = TC, so a and b share it) are visited in `nb`
/// wavefront steps: step k runs the tiles (I, (I + k) mod nb) for every I in parallel, so within
/// a step every task owns one row block of `grad_a` and one of `grad_b`. Each output block
/// receives its contributions in a fixed order (k = 0, 1, …), whatever the thread count.
#[allow(clippy::too_many_arguments)]
fn backward_tiles<T: Real>(
    a: &[T],
    b: &[T],
    ia: &[T],
    ib: &[T],
    w: &[T],
    g: &[T],
    lse_a: &[T],
    lse_b: &[T],
    n: usize,
    d: usize,
    scale: T,
    sym: bool,
    grad_a: &mut [T],
    grad_b: &mut [T],
) {
    const { assert!(TR == TC) };
    grad_a
        .par_chunks_mut(RB * d.max(1))
        .for_each(|c| c.fill(T::ZERO));
    grad_b
        .par_chunks_mut(RB * d.max(1))
        .for_each(|c| c.fill(T::ZERO));
    if n == 0 || d == 0 {
        return;
    }
    let nb = n.div_ceil(TR);
    let diag_count = T::from_f64(if sym { 2.0 } else { 1.0 });
    let (pa, pb) = (
        SharedMut(grad_a.as_mut_ptr()),
        SharedMut(grad_b.as_mut_ptr()),
    );
    for k in 0..nb {
        (0..nb).into_par_iter().for_each_init(
            || (vec![T::ZERO; TR * TC], vec![T::ZERO; TR * TC]),
            |(ta, tb), bi| {
                let bj = (bi + k) % nb;
                let (i0, j0) = (bi * TR, bj * TC);
                let (rows, cols) = (TR.min(n - i0), TC.min(n - j0));
                let xs = &a[i0 * d..(i0 + rows) * d];
                let ys = &b[j0 * d..(j0 + cols) * d];
                dot_tile(xs, ys, d, rows, cols, ta);
                crate::simd::dispatch(
                    #[inline(always)]
                    || {
                        for r in 0..rows {
                            let i = i0 + r;
                            let (ra, rb) = (
                                &mut ta[r * TC..r * TC + cols],
                                &mut tb[r * TC..r * TC + cols],
                            );
                            if w[i] == T::ZERO {
                                ra.fill(T::ZERO);
                                rb.fill(T::ZERO);
                                continue;
                            }
                            let (sx, gi, li, iai) = (scale * ia[i], g[i], lse_a[i], ia[i]);
                            let gd = gi * diag_count;
                            let (wj, ibj) = (&w[j0..j0 + cols], &ib[j0..j0 + cols]);
                            let (gj, lj) = (&g[j0..j0 + cols], &lse_b[j0..j0 + cols]);
                            for q in 0..cols {
                                let s = ra[q] * sx * ibj[q];
                                let mut c = gi * (s - li).exp_fast();
                                if sym {
                                    c += gj[q] * (s - lj[q]).exp_fast();
                                }
                                let c = if j0 + q == i { c - gd } else { c };
                                let c = if wj[q] == T::ZERO { T::ZERO } else { c };
                                ra[q] = c * ibj[q];
                                rb[q] = c * iai;
                            }
                        }
                    },
                );
                // SAFETY: in this step block bi of grad_a and block bj of grad_b belong to this
                // task alone ((bi + k) mod nb is a bijection); the bounds are those of the slices.
                unsafe {
                    gemm(
                        rows,
                        cols,
                        d,
                        ta.as_ptr(),
                        TC as isize,
                        1,
                        ys.as_ptr(),
                        d as isize,
                        1,
                        T::ONE,
                        pa.at(i0 * d),
                        d as isize,
                    );
                    gemm(
                        cols,
                        rows,
                        d,
                        tb.as_ptr(),
                        1,
                        TC as isize,
                        xs.as_ptr(),
                        d as isize,
                        1,
                        T::ONE,
                        pb.at(j0 * d),
                        d as isize,
                    );
                }
            },
        );
    }
}

/// From the raw gradient Σ_j C[i,j] y_j to the gradient of the input rows: times `scale`, then
/// through the normalisation x̂ = x / ‖x‖ when `normalize`.
fn finish_rows<T: Real>(x: &[T], ix: &[T], d: usize, scale: T, normalize: bool, out: &mut [T]) {
    if d == 0 {
        return;
    }
    let tiny = T::from_f64(NORM_EPS);
    out.par_chunks_mut(RB * d).enumerate().for_each(|(c, acc)| {
        for (r, gr) in acc.chunks_exact_mut(d).enumerate() {
            let i = c * RB + r;
            for v in gr.iter_mut() {
                *v *= scale;
            }
            if normalize {
                let xr = &x[i * d..(i + 1) * d];
                let inv = ix[i];
                if T::ONE / inv >= tiny {
                    // x̂ = x / ‖x‖: ∂x = (∂x̂ − x̂ (x̂·∂x̂)) / ‖x‖
                    let proj = crate::real::dot(xr, gr) * inv;
                    for (v, xv) in gr.iter_mut().zip(xr) {
                        *v = (*v - *xv * inv * proj) * inv;
                    }
                } else {
                    for v in gr.iter_mut() {
                        *v *= inv;
                    }
                }
            }
        }
    });
}

/// `tile[r*TC + q] = x_r · y_q` for `rows` rows of `xs` and `cols` rows of `ys` (both `[·, d]`):
/// one GEMM (matrixmultiply, which picks AVX-512/AVX2+FMA kernels at run time). Its summation
/// order depends only on the shapes, so results do not depend on the thread count.
fn dot_tile<T: Real>(xs: &[T], ys: &[T], d: usize, rows: usize, cols: usize, tile: &mut [T]) {
    assert!(xs.len() >= rows * d && ys.len() >= cols * d && tile.len() >= (rows - 1) * TC + cols);
    // SAFETY: the bounds above cover every element the strides reach.
    unsafe {
        gemm(
            rows,
            d,
            cols,
            xs.as_ptr(),
            d as isize,
            1,
            ys.as_ptr(),
            1,
            d as isize,
            T::ZERO,
            tile.as_mut_ptr(),
            TC as isize,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }

    /// The dense form, straight from the definition.
    fn dense(a: &[f64], b: &[f64], w: &[f64], n: usize, d: usize, p: &InfoNceParams) -> Vec<f64> {
        let norm = |x: &[f64]| {
            if p.normalize {
                x.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12)
            } else {
                1.0
            }
        };
        let s = |i: usize, j: usize| {
            let (x, y) = (&a[i * d..(i + 1) * d], &b[j * d..(j + 1) * d]);
            x.iter().zip(y).map(|(u, v)| u * v).sum::<f64>() / norm(x) / norm(y) / p.temperature
        };
        (0..n)
            .map(|i| {
                if w[i] == 0.0 {
                    return 0.0;
                }
                let row: f64 = (0..n)
                    .filter(|&j| w[j] != 0.0)
                    .map(|j| s(i, j).exp())
                    .sum::<f64>()
                    .ln();
                let col: f64 = (0..n)
                    .filter(|&j| w[j] != 0.0)
                    .map(|j| s(j, i).exp())
                    .sum::<f64>()
                    .ln();
                row - s(i, i) + if p.symmetric { col - s(i, i) } else { 0.0 }
            })
            .collect()
    }

    #[test]
    fn forward_matches_dense_and_gradient_matches_finite_differences() {
        let (n, d) = (75, 13);
        let mut seed = 7u64;
        let a: Vec<f64> = (0..n * d).map(|_| lcg(&mut seed)).collect();
        let b: Vec<f64> = (0..n * d).map(|_| lcg(&mut seed)).collect();
        let w: Vec<f64> = (0..n).map(|i| if i % 7 == 3 { 0.0 } else { 1.0 }).collect();
        let g: Vec<f64> = (0..n).map(|_| lcg(&mut seed)).collect();
        for symmetric in [true, false] {
            for normalize in [true, false] {
                let p = InfoNceParams {
                    temperature: 0.3,
                    symmetric,
                    normalize,
                };
                let (mut loss, mut la, mut lb) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
                info_nce_forward(&a, &b, &w, n, d, &p, &mut loss, &mut la, &mut lb).unwrap();
                let want = dense(&a, &b, &w, n, d, &p);
                for i in 0..n {
                    assert!(
                        (loss[i] - want[i]).abs() < 1e-10,
                        "{i}: {} vs {}",
                        loss[i],
                        want[i]
                    );
                }
                let (mut ga, mut gb) = (vec![0.0; n * d], vec![0.0; n * d]);
                info_nce_backward(&g, &a, &b, &w, &la, &lb, n, d, &p, &mut ga, &mut gb).unwrap();
                let obj = |a: &[f64], b: &[f64]| {
                    dense(a, b, &w, n, d, &p)
                        .iter()
                        .zip(&g)
                        .map(|(l, g)| l * g)
                        .sum::<f64>()
                };
                let h = 1e-6;
                for &k in &[0usize, 5, 40, 13 * 3 + 2, n * d - 1] {
                    let (mut ap, mut am) = (a.clone(), a.clone());
                    ap[k] += h;
                    am[k] -= h;
                    let fd = (obj(&ap, &b) - obj(&am, &b)) / (2.0 * h);
                    assert!((fd - ga[k]).abs() < 1e-6, "grad_a[{k}]: {fd} vs {}", ga[k]);
                    let (mut bp, mut bm) = (b.clone(), b.clone());
                    bp[k] += h;
                    bm[k] -= h;
                    let fd = (obj(&a, &bp) - obj(&a, &bm)) / (2.0 * h);
                    assert!((fd - gb[k]).abs() < 1e-6, "grad_b[{k}]: {fd} vs {}", gb[k]);
                }
            }
        }
    }

    #[test]
    fn rejects_bad_temperature_and_lengths() {
        let p = InfoNceParams {
            temperature: 0.0,
            symmetric: true,
            normalize: true,
        };
        let (mut l, mut x, mut y) = (vec![0.0f32; 2], vec![0.0f32; 2], vec![0.0f32; 2]);
        let a = vec![1.0f32; 6];
        assert!(info_nce_forward(&a, &a, &[1.0; 2], 2, 3, &p, &mut l, &mut x, &mut y).is_err());
        let p = InfoNceParams {
            temperature: 0.1,
            ..p
        };
        assert!(
            info_nce_forward(&a, &a[..5], &[1.0; 2], 2, 3, &p, &mut l, &mut x, &mut y).is_err()
        );
    }
}

/// Elements per task in the anchor-consistency reductions (fixed, so sums are deterministic).
const ACL_CHUNK: usize = 4096;

fn check_acl(sim_len: usize, target_len: usize, temperature: f64) -> Result<()> {
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(MmotError::InvalidArgument(format!(
            "temperature must be a finite number > 0, got {temperature}"
        )));
    }
    check_len("target", target_len, sim_len, &format!("[{sim_len}]"))
}

/// SSPC's anchor-consistency loss: the mean over all entries of
/// BCE-with-logits(z, t) = softplus(z) − t·z with z = exp(sim/τ) (> 0, so
/// softplus(z) = z + ln(1 + e^{−z})). Partial sums are taken per fixed chunk in f64 and added
/// in order. Returns 0 for empty input.
pub fn anchor_consistency_forward<T: Real>(
    sim: &[T],
    target: &[T],
    temperature: f64,
) -> Result<f64> {
    check_acl(sim.len(), target.len(), temperature)?;
    if sim.is_empty() {
        return Ok(0.0);
    }
    let inv = T::from_f64(1.0 / temperature);
    let partials: Vec<f64> = sim
        .par_chunks(ACL_CHUNK)
        .zip(target.par_chunks(ACL_CHUNK))
        .map(|(s, t)| {
            let mut acc = 0.0f64;
            for (sv, tv) in s.iter().zip(t) {
                let z = (*sv * inv).exp_fast();
                let l = z + (T::ONE + (-z).exp_fast()).ln() - *tv * z;
                acc += l.to_f64();
            }
            acc
        })
        .collect();
    Ok(partials.iter().sum::<f64>() / sim.len() as f64)
}

/// Gradient of `grad · anchor_consistency_forward` with respect to `sim`:
/// out = grad/count · (σ(z) − t) · z / τ.
pub fn anchor_consistency_backward<T: Real>(
    grad: f64,
    sim: &[T],
    target: &[T],
    temperature: f64,
    out: &mut [T],
) -> Result<()> {
    check_acl(sim.len(), target.len(), temperature)?;
    check_len("out", out.len(), sim.len(), &format!("[{}]", sim.len()))?;
    if sim.is_empty() {
        return Ok(());
    }
    let inv = T::from_f64(1.0 / temperature);
    let g = T::from_f64(grad / sim.len() as f64) * inv;
    out.par_chunks_mut(ACL_CHUNK)
        .zip(sim.par_chunks(ACL_CHUNK).zip(target.par_chunks(ACL_CHUNK)))
        .for_each(|(o, (s, t))| {
            for ((ov, sv), tv) in o.iter_mut().zip(s).zip(t) {
                let z = (*sv * inv).exp_fast();
                let sig = T::ONE / (T::ONE + (-z).exp_fast());
                *ov = g * (sig - *tv) * z;
            }
        });
    Ok(())
}

#[cfg(test)]
mod acl_tests {
    use super::*;

    #[test]
    fn anchor_consistency_matches_definition_and_finite_differences() {
        let sim: Vec<f64> = (0..9000).map(|i| ((i as f64) * 0.37).sin()).collect();
        let target: Vec<f64> = (0..9000).map(|i| ((i as f64) * 0.11).cos().abs()).collect();
        let tau = 0.1;
        let term = |s: f64, t: f64| {
            let z = (s / tau).exp();
            z + (-z).exp().ln_1p() - t * z
        };
        let loss = |s: &[f64]| {
            s.iter()
                .zip(&target)
                .map(|(s, t)| term(*s, *t))
                .sum::<f64>()
                / s.len() as f64
        };
        let got = anchor_consistency_forward(&sim, &target, tau).unwrap();
        assert!(
            (got - loss(&sim)).abs() < 1e-12 * got.abs(),
            "{got} vs {}",
            loss(&sim)
        );
        let mut g = vec![0.0; sim.len()];
        anchor_consistency_backward(2.0, &sim, &target, tau, &mut g).unwrap();
        for &k in &[0usize, 17, 4500, 8999] {
            // The loss is a sum of per-entry terms: difference the one that moves.
            let h = 1e-6;
            let fd = 2.0 / sim.len() as f64
                * (term(sim[k] + h, target[k]) - term(sim[k] - h, target[k]))
                / (2.0 * h);
            assert!(
                (fd - g[k]).abs() < 1e-8 + 1e-5 * g[k].abs(),
                "{k}: {fd} vs {}",
                g[k]
            );
        }
        assert!(anchor_consistency_forward(&sim, &target[..3], tau).is_err());
        assert!(anchor_consistency_forward(&sim, &target, 0.0).is_err());
    }
}
