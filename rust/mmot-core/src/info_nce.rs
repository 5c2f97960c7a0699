//! Fused InfoNCE / NormSoftmax loss without the N×N logits (reverse pass in `docs/gradients.md`).
//!
//! With `s[i,j] = â_i·b̂_j / τ` (â, b̂ the L2-normalised rows when `normalize`) and w the 0/1
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
//! products are scaled by the inverse row norms, then by 1/τ (so the cosine, at most 1, is
//! formed before it meets 1/τ, which may be near the dtype's largest value). Rows whose squared
//! norm would over- or underflow are rescaled by a power of two in a copy first
//! (`exec::row_norms`). Extra memory is O(N) plus one tile per task.
//!
//! Row chunks have a fixed size and every row's arithmetic is independent of the others, so
//! results do not depend on the thread count.

use crate::error::{check_len, not_finite, MmotError, Result};
use crate::exec::row_norms::{unit_rows, UnitRows};
use crate::exec::shared_mut::SharedMut;
use crate::interrupt::Interrupt;
use crate::simd::gemm::{gemm, MatrixRef};
use crate::simd::{dispatch, dot, sum, Real, LANES};
use rayon::prelude::*;

/// Rows per parallel task in the element-wise loops and the backward.
const RB: usize = TR;
/// Rows per logit tile.
const TR: usize = 256;
/// Columns per tile: a tile of raw dot products is TR × TC (256 KiB in f32).
const TC: usize = 256;
/// Row blocks in the forward's column log-sum-exp partials (bounds them to O(M) memory).
const MAX_BLOCKS: usize = 64;

/// The loss's parameters.
#[derive(Clone, Copy, Debug)]
pub struct InfoNceParams {
    /// τ > 0: logits are similarities divided by it.
    pub temperature: f64,
    /// Add the column direction (b against a) to the row direction (a against b).
    pub symmetric: bool,
    /// L2-normalise the rows of a and b first (cosine similarities).
    pub normalize: bool,
    /// Return an error (not a result) for NaN or Inf in `a` or `b`, found in the row-norm pass
    /// (so the caller need not scan the inputs first).
    pub check_finite: bool,
}

/// The arrays both directions read: pair `i` is row `i` of `a` and of `b`.
#[derive(Clone, Copy, Debug)]
pub struct InfoNceInput<'a, T> {
    /// `[rows, features]` each.
    pub a: &'a [T],
    pub b: &'a [T],
    /// `[rows]`: 1 for a pair that counts, 0 for padding.
    pub valid: &'a [T],
    pub rows: usize,
    pub features: usize,
}

fn check<T>(params: &InfoNceParams, input: &InfoNceInput<'_, T>) -> Result<()> {
    if !(params.temperature.is_finite() && params.temperature > 0.0) {
        return Err(MmotError::InvalidArgument(format!(
            "temperature must be a finite number > 0, got {}",
            params.temperature
        )));
    }
    let (n, d) = (input.rows, input.features);
    check_len("a", input.a.len(), [n, d])?;
    check_len("b", input.b.len(), [n, d])?;
    check_len("valid", input.valid.len(), [n])
}

/// The logits `s[i,j] = ((a_i·b_j · ia_i) · ib_j) · scale` (`a`, `b` the kernel's rows, `ia`,
/// `ib` their normalising factors, or ones) and the pairs' validity: what the tiled passes of
/// both directions share.
#[derive(Clone, Copy)]
struct Logits<'a, T> {
    a: &'a [T],
    b: &'a [T],
    ia: &'a [T],
    ib: &'a [T],
    valid: &'a [T],
    d: usize,
    scale: T,
    /// Read once per row block (forward) or wavefront step (backward): Ctrl-C.
    stop: &'a Interrupt,
}

/// Per-pair losses and the two log-sum-exps (`loss`, `lse_a`, `lse_b`: `[rows]` each).
///
/// Without `symmetric`, `lse_b` is filled with 0. An invalid pair gets loss 0; a row with no
/// valid column gets lse −∞.
pub fn info_nce_forward<T: Real>(
    input: InfoNceInput<'_, T>,
    loss: &mut [T],
    lse_a: &mut [T],
    lse_b: &mut [T],
    params: &InfoNceParams,
) -> Result<()> {
    check(params, &input)?;
    let InfoNceInput {
        valid,
        rows: n,
        features: d,
        ..
    } = input;
    for (name, v) in [("loss", &*loss), ("lse_a", &*lse_a), ("lse_b", &*lse_b)] {
        check_len(name, v.len(), [n])?;
    }
    let scale = T::from_f64(1.0 / params.temperature);
    let (ua, ub) = checked_norms(&input, params)?;
    let (a, b, ia, ib) = (&*ua.rows, &*ub.rows, &ua.unit, &ub.unit);
    let stop = Interrupt::current();
    let logits = Logits {
        a,
        b,
        ia,
        ib,
        valid,
        d,
        scale,
        stop: &stop,
    };
    if params.symmetric {
        lse_fused(&logits, lse_a, Some(&mut *lse_b));
    } else {
        lse_fused(&logits, lse_a, None);
        lse_b.fill(T::ZERO);
    }
    stop.check()?;
    let (la, lb) = (&*lse_a, &*lse_b);
    loss.par_chunks_mut(RB).enumerate().for_each(|(c, out)| {
        for (r, o) in out.iter_mut().enumerate() {
            let i = c * RB + r;
            *o = if valid[i] == T::ZERO {
                T::ZERO
            } else {
                let diag =
                    dot(&a[i * d..(i + 1) * d], &b[i * d..(i + 1) * d]) * ia[i] * ib[i] * scale;
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

/// Gradients of `Σ_i grad[i]·loss[i]` with respect to `a` and `b` (`grad_a`, `grad_b`: `[rows,
/// features]`), recomputing the logits tile by tile from the saved `lse_a` and `lse_b`.
/// `check_finite` works as in the forward.
pub fn info_nce_backward<T: Real>(
    grad: &[T],
    input: InfoNceInput<'_, T>,
    lse_a: &[T],
    lse_b: &[T],
    grad_a: &mut [T],
    grad_b: &mut [T],
    params: &InfoNceParams,
) -> Result<()> {
    check(params, &input)?;
    let InfoNceInput {
        valid,
        rows: n,
        features: d,
        ..
    } = input;
    for (name, v) in [("grad", grad), ("lse_a", lse_a), ("lse_b", lse_b)] {
        check_len(name, v.len(), [n])?;
    }
    check_len("grad_a", grad_a.len(), [n, d])?;
    check_len("grad_b", grad_b.len(), [n, d])?;
    let scale = T::from_f64(1.0 / params.temperature);
    let (ua, ub) = checked_norms(&input, params)?;
    let (a, b, ia, ib) = (&*ua.rows, &*ub.rows, &ua.unit, &ub.unit);
    let stop = Interrupt::current();
    let logits = Logits {
        a,
        b,
        ia,
        ib,
        valid,
        d,
        scale,
        stop: &stop,
    };
    backward_tiles(
        &logits,
        grad,
        lse_a,
        lse_b,
        params.symmetric,
        grad_a,
        grad_b,
    );
    stop.check()?;
    ua.finish_gradient(d, scale, params.normalize, grad_a);
    ub.finish_gradient(d, scale, params.normalize, grad_b);
    Ok(())
}

/// The (scale-safe) rows and inverse row norms of `a` and `b` (ones without `normalize`), or
/// the error for a non-finite input when `check_finite` asks.
fn checked_norms<'a, T: Real>(
    input: &InfoNceInput<'a, T>,
    params: &InfoNceParams,
) -> Result<(UnitRows<'a, T>, UnitRows<'a, T>)> {
    let (n, d, check) = (input.rows, input.features, params.check_finite);
    let ua = unit_rows(input.a, n, d, params.normalize, check);
    if !ua.finite {
        return Err(not_finite("a"));
    }
    let ub = unit_rows(input.b, n, d, params.normalize, check);
    if !ub.finite {
        return Err(not_finite("b"));
    }
    Ok((ua, ub))
}

/// Both log-sum-exps from one GEMM per tile:
/// `lse_x[i] = log Σ_j wy_j exp(s[i,j])` (online max per row) and, when `lse_y` is given,
/// `lse_y[j] = log Σ_i wx_i exp(s[i,j])` with `s[i,j] = ((x_i·y_j · ix_i) · iy_j) · scale`.
///
/// Each task owns a fixed block of rows (its size depends only on the problem size) and keeps,
/// for every column, a running (max, sum) over its rows; the blocks' column partials are then
/// merged in block order. At most `MAX_BLOCKS` blocks, so the partials take O(M) memory.
fn lse_fused<T: Real>(logits: &Logits<'_, T>, lse_x: &mut [T], lse_y: Option<&mut [T]>) {
    let Logits {
        a: x,
        b: y,
        ia: ix,
        ib: iy,
        valid: wx,
        d,
        scale,
        stop,
    } = *logits;
    let wy = wx;
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
                if stop.requested() {
                    return;
                }
                let i0 = c * block + r0;
                let rows = TR.min(out.len() - r0);
                for r in 0..rows {
                    mi[r] = neg(wx[i0 + r]);
                    sx[r] = ix[i0 + r];
                }
                run_max[..rows].fill(T::NEG_INFINITY);
                run_sum[..rows].fill(T::ZERO);
                let xs = &x[i0 * d..(i0 + rows) * d];
                for j0 in (0..m).step_by(TC) {
                    let cols = TC.min(m - j0);
                    dot_tile(xs, &y[j0 * d..(j0 + cols) * d], d, rows, cols, &mut tile);
                    dispatch(
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
                                for q in 0..cols {
                                    t[q] = t[q] * f * sj[q] * scale;
                                }
                                let rmax = masked_max(t, &mj[..cols]);
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

/// `max_q (t[q] + mask[q])` in 8 lanes: a scalar fold would be one long dependency chain.
#[inline(always)]
fn masked_max<T: Real>(t: &[T], mask: &[T]) -> T {
    let mut acc = [T::NEG_INFINITY; LANES];
    let mut it = t.chunks_exact(LANES);
    let mut im = mask.chunks_exact(LANES);
    for (ch, mk) in (&mut it).zip(&mut im) {
        for l in 0..LANES {
            acc[l] = acc[l].fmax(ch[l] + mk[l]);
        }
    }
    let tail = it
        .remainder()
        .iter()
        .zip(im.remainder())
        .fold(T::NEG_INFINITY, |m, (v, mk)| m.fmax(*v + *mk));
    acc.iter().fold(tail, |m, &v| m.fmax(v))
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
    sum(&acc) + tail
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
fn backward_tiles<T: Real>(
    logits: &Logits<'_, T>,
    g: &[T],
    lse_a: &[T],
    lse_b: &[T],
    sym: bool,
    grad_a: &mut [T],
    grad_b: &mut [T],
) {
    let Logits {
        a,
        b,
        ia,
        ib,
        valid: w,
        d,
        scale,
        stop,
    } = *logits;
    let n = ia.len();
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
        if stop.requested() {
            return;
        }
        (0..nb).into_par_iter().for_each_init(
            || (vec![T::ZERO; TR * TC], vec![T::ZERO; TR * TC]),
            |(ta, tb), bi| {
                let bj = (bi + k) % nb;
                let (i0, j0) = (bi * TR, bj * TC);
                let (rows, cols) = (TR.min(n - i0), TC.min(n - j0));
                let xs = &a[i0 * d..(i0 + rows) * d];
                let ys = &b[j0 * d..(j0 + cols) * d];
                dot_tile(xs, ys, d, rows, cols, ta);
                dispatch(
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
                            let (gi, li, iai) = (g[i], lse_a[i], ia[i]);
                            let gd = gi * diag_count;
                            let (wj, ibj) = (&w[j0..j0 + cols], &ib[j0..j0 + cols]);
                            let (gj, lj) = (&g[j0..j0 + cols], &lse_b[j0..j0 + cols]);
                            for q in 0..cols {
                                let s = ra[q] * iai * ibj[q] * scale;
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
                        [rows, cols, d],
                        MatrixRef::row_major(ta.as_ptr(), TC),
                        MatrixRef::row_major(ys.as_ptr(), d),
                        T::ONE,
                        pa.at(i0 * d),
                        d,
                    );
                    gemm(
                        [cols, rows, d],
                        MatrixRef::transpose_of(tb.as_ptr(), TC),
                        MatrixRef::row_major(xs.as_ptr(), d),
                        T::ONE,
                        pb.at(j0 * d),
                        d,
                    );
                }
            },
        );
    }
}

/// `tile[r*TC + q] = x_r · y_q` for `rows` rows of `xs` and `cols` rows of `ys` (both `[·, d]`):
/// one GEMM (matrixmultiply, which picks AVX-512/AVX2+FMA kernels at run time). Its summation
/// order depends only on the shapes, so results do not depend on the thread count.
fn dot_tile<T: Real>(xs: &[T], ys: &[T], d: usize, rows: usize, cols: usize, tile: &mut [T]) {
    assert!(xs.len() >= rows * d && ys.len() >= cols * d && tile.len() >= (rows - 1) * TC + cols);
    // SAFETY: the bounds above cover every element the strides reach.
    unsafe {
        gemm(
            [rows, d, cols],
            MatrixRef::row_major(xs.as_ptr(), d),
            MatrixRef::transpose_of(ys.as_ptr(), d),
            T::ZERO,
            tile.as_mut_ptr(),
            TC,
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
                    check_finite: false,
                };
                let input = InfoNceInput {
                    a: &a,
                    b: &b,
                    valid: &w,
                    rows: n,
                    features: d,
                };
                let (mut loss, mut la, mut lb) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
                info_nce_forward(input, &mut loss, &mut la, &mut lb, &p).unwrap();
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
                info_nce_backward(&g, input, &la, &lb, &mut ga, &mut gb, &p).unwrap();
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
    fn rejects_bad_temperature_lengths_and_values() {
        let p = InfoNceParams {
            temperature: 0.0,
            symmetric: true,
            normalize: true,
            check_finite: false,
        };
        let (mut l, mut x, mut y) = (vec![0.0f32; 2], vec![0.0f32; 2], vec![0.0f32; 2]);
        let mut a = vec![1.0f32; 6];
        fn input(a: &[f32], b_len: usize) -> InfoNceInput<'_, f32> {
            InfoNceInput {
                a: &a[..6],
                b: &a[..b_len],
                valid: &[1.0; 2],
                rows: 2,
                features: 3,
            }
        }
        assert!(info_nce_forward(input(&a, 6), &mut l, &mut x, &mut y, &p).is_err());
        let p = InfoNceParams {
            temperature: 0.1,
            ..p
        };
        assert!(info_nce_forward(input(&a, 6), &mut l, &mut x, &mut y, &p).is_ok());
        assert!(info_nce_forward(input(&a, 5), &mut l, &mut x, &mut y, &p).is_err());
        a[4] = f32::NAN;
        assert!(info_nce_forward(input(&a, 6), &mut l, &mut x, &mut y, &p).is_ok());
        let checked = InfoNceParams {
            check_finite: true,
            ..p
        };
        let err = info_nce_forward(input(&a, 6), &mut l, &mut x, &mut y, &checked).unwrap_err();
        assert_eq!(
            err.to_string(),
            "argument 'a' must be finite; found NaN or Inf"
        );
    }
}
