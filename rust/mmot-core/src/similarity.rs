//! Batched (cosine) similarity `scale · x̂ ŷᵀ` (DESIGN.md §2.3).
//!
//! The forward writes no normalised copies of `x` and `y`: only the inverse row norms (`O(N+M)`
//! values) are computed, and each dot product is scaled by `scale · 1/‖x_i‖ · 1/‖y_j‖`. The
//! backward's products are GEMMs against normalised rows: a copy of `y` and blocks of `x`. The batch
//! broadcast is resolved by the caller into index vectors, so one output problem may reuse the
//! same `x` or `y` problem many times without copies.

use crate::chunks::not_finite;
use crate::error::{check_len, MmotError, Result};
use crate::gemm::gemm;
use crate::real::{Real, LANES};
use rayon::prelude::*;

/// Rows of `x` normalised at a time in the backward's `gy` products (a scratch of this many
/// rows per task, reused across the blocks).
const X_BLOCK: usize = 256;
/// `gy` rows per parallel task in the backward: small, so that the few y rows of a typical
/// call (an anchor set) still make a task per thread.
const Y_TILE_ROWS: usize = 32;
/// Output rows per parallel task: one GEMM each, large enough to amortise its packing.
const ROWS_PER_TASK: usize = 256;

/// `out[o] = scale · x̂[x_index[o]] ŷ[y_index[o]]ᵀ`.
///
/// `x`: `[bx, n, d]`, `y`: `[by, m, d]`, `x_index`/`y_index`: `[bo]`, `out`: `[bo, n, m]`.
/// With `normalize`, rows are divided by `max(‖row‖₂, 1e-12)`.
#[allow(clippy::too_many_arguments)]
pub fn similarity<T: Real>(
    x: &[T],
    y: &[T],
    x_index: &[i64],
    y_index: &[i64],
    out: &mut [T],
    bx: usize,
    n: usize,
    by: usize,
    m: usize,
    d: usize,
    normalize: bool,
    scale: f64,
) -> Result<()> {
    similarity_checked(
        x, y, x_index, y_index, out, bx, n, by, m, d, normalize, scale, false,
    )
}

/// [`similarity`], and with `check_finite` an error (not a result) for NaN or Inf in `x` or
/// `y`, found in the row-norm pass (a pass of its own when `normalize` is off).
#[allow(clippy::too_many_arguments, clippy::eq_op)]
pub fn similarity_checked<T: Real>(
    x: &[T],
    y: &[T],
    x_index: &[i64],
    y_index: &[i64],
    out: &mut [T],
    bx: usize,
    n: usize,
    by: usize,
    m: usize,
    d: usize,
    normalize: bool,
    scale: f64,
    check_finite: bool,
) -> Result<()> {
    check_problems(
        x,
        y,
        x_index,
        y_index,
        ("out", out.len()),
        [bx, n, by, m, d],
    )?;
    if out.is_empty() && !check_finite {
        return Ok(());
    }
    let sc = T::from_f64(scale);
    // Inverse row norms (all ones without `normalize`) and whether every element is finite
    // (`v - v` is 0 for finite `v`, NaN otherwise; summed beside the squares in the same pass).
    let inv_norms = |a: &[T], rows: usize| -> (Vec<T>, bool) {
        let tiny = T::from_f64(1e-12);
        let mut v = vec![T::ONE; rows];
        if !normalize && !check_finite {
            return (v, true);
        }
        let ok = v
            .par_chunks_mut(1024)
            .enumerate()
            .map(|(c, vs)| {
                crate::simd::dispatch(
                    #[inline(always)]
                    || {
                        let mut nf = [T::ZERO; LANES];
                        for (i, vi) in vs.iter_mut().enumerate() {
                            let r = c * 1024 + i;
                            let row = &a[r * d..(r + 1) * d];
                            if check_finite {
                                let mut ch = row.chunks_exact(LANES);
                                for q in &mut ch {
                                    for l in 0..LANES {
                                        nf[l] += q[l] - q[l];
                                    }
                                }
                                for (l, q) in ch.remainder().iter().enumerate() {
                                    nf[l] += *q - *q;
                                }
                            }
                            if normalize {
                                *vi = T::ONE / crate::real::dot(row, row).sqrt().fmax(tiny);
                            }
                        }
                        nf.iter().all(|z| *z == T::ZERO)
                    },
                )
            })
            .reduce(|| true, |a, b| a && b);
        (v, ok)
    };
    let (ix, okx) = inv_norms(x, bx * n);
    let (iy, oky) = inv_norms(y, by * m);
    if check_finite && !okx {
        return Err(not_finite("x"));
    }
    if check_finite && !oky {
        return Err(not_finite("y"));
    }
    if out.is_empty() {
        return Ok(());
    }

    out.par_chunks_mut(n * m).enumerate().for_each(|(o, op)| {
        let xb = x_index[o] as usize;
        let yb = y_index[o] as usize;
        let xs = &x[xb * n * d..(xb + 1) * n * d];
        let ys = &y[yb * m * d..(yb + 1) * m * d];
        let ixs = &ix[xb * n..(xb + 1) * n];
        let iys = &iy[yb * m..(yb + 1) * m];
        op.par_chunks_mut(ROWS_PER_TASK * m)
            .enumerate()
            .for_each(|(t, tile)| {
                let i0 = t * ROWS_PER_TASK;
                let rows = tile.len() / m;
                tile_kernel(
                    &xs[i0 * d..(i0 + rows) * d],
                    ys,
                    &ixs[i0..i0 + rows],
                    iys,
                    tile,
                    d,
                    sc,
                );
            });
    });
    Ok(())
}

/// Shapes shared by the forward and the backward: `x` `[bx, n, d]`, `y` `[by, m, d]`, the
/// `[bo, n, m]` output (or its adjoint) named `output.0`, and index arrays of length `bo`
/// whose entries address existing problems.
fn check_problems<T>(
    x: &[T],
    y: &[T],
    x_index: &[i64],
    y_index: &[i64],
    output: (&str, usize),
    [bx, n, by, m, d]: [usize; 5],
) -> Result<()> {
    check_len("x", x.len(), bx * n * d, &format!("[{bx}, {n}, {d}]"))?;
    check_len("y", y.len(), by * m * d, &format!("[{by}, {m}, {d}]"))?;
    let bo = x_index.len();
    if y_index.len() != bo {
        return Err(MmotError::Shape(format!(
            "x_index and y_index must have the same length, got {bo} and {}",
            y_index.len()
        )));
    }
    check_len(output.0, output.1, bo * n * m, &format!("[{bo}, {n}, {m}]"))?;
    for (name, idx, lim) in [("x_index", x_index, bx), ("y_index", y_index, by)] {
        if let Some(bad) = idx.iter().find(|&&i| i < 0 || i as u64 >= lim as u64) {
            return Err(MmotError::InvalidArgument(format!(
                "{name} entries must be in 0..{lim}, got {bad}"
            )));
        }
    }
    Ok(())
}

/// One tile of output rows against all `m` columns: a GEMM, then the scale and inverse norms.
fn tile_kernel<T: Real>(xs: &[T], ys: &[T], ix: &[T], iy: &[T], out: &mut [T], d: usize, sc: T) {
    let rows = ix.len();
    let m = iy.len();
    if d == 0 {
        out.iter_mut().for_each(|o| *o = T::ZERO);
        return;
    }
    assert!(xs.len() >= rows * d && ys.len() >= m * d && out.len() >= rows * m);
    // SAFETY: the bounds above cover every element the strides reach.
    unsafe {
        gemm(
            rows,
            d,
            m,
            xs.as_ptr(),
            d as isize,
            1,
            ys.as_ptr(),
            1,
            d as isize,
            T::ZERO,
            out.as_mut_ptr(),
            m as isize,
        )
    }
    for (row, &xi) in out.chunks_exact_mut(m).zip(ix) {
        let s = sc * xi;
        for (o, &yj) in row.iter_mut().zip(iy) {
            *o *= s * yj;
        }
    }
}

/// Gradients of [`similarity`]: given `grad` `[bo, n, m]` (the adjoint of `out`), writes
/// `gx` `[bx, n, d]` and `gy` `[by, m, d]`, summed over the output problems that share an
/// input problem (the broadcast).
///
/// With `ŷ = y / ν_y`, the adjoint of `x̂` is `u = scale · G ŷ`; through the normalisation
/// `x̂ = x / max(‖x‖, 1e-12)` it becomes `(u − x̂ ⟨x̂, u⟩) / ‖x‖` (or `u / 1e-12` below the
/// clamp). The products are GEMMs over fixed row blocks, summed in a fixed order
/// (deterministic for any thread count).
#[allow(clippy::too_many_arguments)]
pub fn similarity_backward<T: Real>(
    grad: &[T],
    x: &[T],
    y: &[T],
    x_index: &[i64],
    y_index: &[i64],
    gx: &mut [T],
    gy: &mut [T],
    bx: usize,
    n: usize,
    by: usize,
    m: usize,
    d: usize,
    normalize: bool,
    scale: f64,
) -> Result<()> {
    check_problems(
        x,
        y,
        x_index,
        y_index,
        ("grad", grad.len()),
        [bx, n, by, m, d],
    )?;
    check_len("gx", gx.len(), bx * n * d, &format!("[{bx}, {n}, {d}]"))?;
    check_len("gy", gy.len(), by * m * d, &format!("[{by}, {m}, {d}]"))?;
    let sc = T::from_f64(scale);
    let ix = inv_norms(x, bx * n, d, normalize);
    let iy = inv_norms(y, by * m, d, normalize);
    // Output problems reading each input problem, in order.
    let users = |idx: &[i64], nb: usize| -> Vec<Vec<usize>> {
        let mut u = vec![Vec::new(); nb];
        for (o, &i) in idx.iter().enumerate() {
            u[i as usize].push(o);
        }
        u
    };
    let xu = users(x_index, bx);
    let yu = users(y_index, by);
    let nm = n * m;

    // gx[xb, i] = scale Σ_o Σ_j G_o[i, j] ŷ[j]: per block of x rows, one GEMM per output
    // problem against the normalised y (a copy of y's size, which is the small side).
    let y_hat = scaled_rows(y, &iy, d);
    if n * d > 0 {
        gx.par_chunks_mut(n * d).enumerate().for_each(|(xb, gxp)| {
            gxp.par_chunks_mut(ROWS_PER_TASK * d)
                .enumerate()
                .for_each(|(t, tile)| {
                    tile.fill(T::ZERO);
                    let (i0, rows) = (t * ROWS_PER_TASK, tile.len() / d);
                    for &o in &xu[xb] {
                        let yb = y_index[o] as usize;
                        let g = &grad[o * nm + i0 * m..o * nm + (i0 + rows) * m];
                        let yh = &y_hat[yb * m * d..(yb + 1) * m * d];
                        // SAFETY: g is rows × m, yh is m × d and tile rows × d, all row-major.
                        unsafe {
                            gemm(
                                rows,
                                m,
                                d,
                                g.as_ptr(),
                                m as isize,
                                1,
                                yh.as_ptr(),
                                d as isize,
                                1,
                                T::ONE,
                                tile.as_mut_ptr(),
                                d as isize,
                            )
                        };
                    }
                    let xs = &x[(xb * n + i0) * d..];
                    let ixs = &ix[xb * n + i0..];
                    finish_rows(tile, xs, ixs, d, sc, normalize);
                });
        });
    }
    // gy[yb, j] = scale Σ_o Σ_i G_o[i, j] x̂[i]: per block of y rows, GEMMs of Gᵀ against
    // blocks of normalised x rows, formed one block at a time (x is the large side).
    if m * d > 0 {
        gy.par_chunks_mut(m * d).enumerate().for_each(|(yb, gyp)| {
            gyp.par_chunks_mut(Y_TILE_ROWS * d)
                .enumerate()
                .for_each(|(t, tile)| {
                    tile.fill(T::ZERO);
                    let (j0, rows) = (t * Y_TILE_ROWS, tile.len() / d);
                    let mut x_block = vec![T::ZERO; X_BLOCK * d];
                    for &o in &yu[yb] {
                        let xb = x_index[o] as usize;
                        for i0 in (0..n).step_by(X_BLOCK) {
                            let len = X_BLOCK.min(n - i0);
                            let xs = &x[(xb * n + i0) * d..(xb * n + i0 + len) * d];
                            let xh = &mut x_block[..len * d];
                            scale_rows_into(xs, &ix[xb * n + i0..xb * n + i0 + len], d, xh);
                            let g = &grad
                                [o * nm + i0 * m + j0..o * nm + (i0 + len - 1) * m + j0 + rows];
                            // SAFETY: Gᵀ is read as rows × len with strides (1, m) inside g;
                            // xh is len × d and tile rows × d, row-major.
                            unsafe {
                                gemm(
                                    rows,
                                    len,
                                    d,
                                    g.as_ptr(),
                                    1,
                                    m as isize,
                                    xh.as_ptr(),
                                    d as isize,
                                    1,
                                    T::ONE,
                                    tile.as_mut_ptr(),
                                    d as isize,
                                )
                            };
                        }
                    }
                    let ys = &y[(yb * m + j0) * d..];
                    let iys = &iy[yb * m + j0..];
                    finish_rows(tile, ys, iys, d, sc, normalize);
                });
        });
    }
    Ok(())
}

/// `1 / max(‖row‖, 1e-12)` per row (or ones without normalisation).
fn inv_norms<T: Real>(a: &[T], rows: usize, d: usize, normalize: bool) -> Vec<T> {
    if !normalize {
        return vec![T::ONE; rows];
    }
    let tiny = T::from_f64(1e-12);
    let mut v = vec![T::ZERO; rows];
    v.par_chunks_mut(1024).enumerate().for_each(|(c, vs)| {
        for (i, vi) in vs.iter_mut().enumerate() {
            let r = c * 1024 + i;
            let row = &a[r * d..(r + 1) * d];
            *vi = T::ONE / crate::real::dot(row, row).sqrt().fmax(tiny);
        }
    });
    v
}

/// `out[r] = w[r] · src[r]` for rows of `d` values.
fn scale_rows_into<T: Real>(src: &[T], w: &[T], d: usize, out: &mut [T]) {
    for ((o, s), &wr) in out.chunks_exact_mut(d).zip(src.chunks_exact(d)).zip(w) {
        for (o, &s) in o.iter_mut().zip(s) {
            *o = wr * s;
        }
    }
}

/// A copy of `src` with row `r` scaled by `w[r]`, rows in parallel.
fn scaled_rows<T: Real>(src: &[T], w: &[T], d: usize) -> Vec<T> {
    let mut out = vec![T::ZERO; src.len()];
    if d > 0 {
        out.par_chunks_mut(1024 * d)
            .zip(src.par_chunks(1024 * d))
            .zip(w.par_chunks(1024))
            .for_each(|((o, s), w)| scale_rows_into(s, w, d, o));
    }
    out
}

/// Scales the accumulated `u` rows by `scale` and applies the normalisation's adjoint.
fn finish_rows<T: Real>(tile: &mut [T], xs: &[T], inv: &[T], d: usize, sc: T, normalize: bool) {
    let clamp = T::from_f64(0.999e12);
    for (r, u) in tile.chunks_exact_mut(d).enumerate() {
        let iv = inv[r];
        if !normalize {
            for v in u.iter_mut() {
                *v *= sc;
            }
            continue;
        }
        if iv >= clamp {
            // ‖x‖ <= 1e-12: x̂ = x / 1e-12 is linear in x.
            for v in u.iter_mut() {
                *v *= sc * iv;
            }
            continue;
        }
        let xr = &xs[r * d..(r + 1) * d];
        let proj = crate::real::dot(xr, u) * iv * iv;
        for p in 0..d {
            u[p] = (u[p] - xr[p] * proj) * (sc * iv);
        }
    }
}
