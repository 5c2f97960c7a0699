//! Batched (cosine) similarity `scale · x̂ ŷᵀ` (DESIGN.md §2.3).
//!
//! Normalised copies of `x` and `y` are never written: only the inverse row norms (`O(N+M)`
//! values) are computed, and each dot product is scaled by `scale · 1/‖x_i‖ · 1/‖y_j‖`. The batch
//! broadcast is resolved by the caller into index vectors, so one output problem may reuse the
//! same `x` or `y` problem many times without copies.

use crate::chunks::not_finite;
use crate::error::{check_len, MmotError, Result};
use crate::gemm::gemm;
use crate::real::{Real, LANES};
use rayon::prelude::*;

/// Gradient rows accumulated together in the backward: each loaded row serves this many.
const IB: usize = 4;
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
/// clamp). The products are computed without normalised copies, row block by row block, in a
/// fixed order (deterministic for any thread count).
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

    // gx[xb, i] = scale Σ_o Σ_j G_o[i, j] iy[j] y[j]: blocks of x rows, all y rows.
    if n * d > 0 {
        gx.par_chunks_mut(n * d).enumerate().for_each(|(xb, gxp)| {
            gxp.par_chunks_mut(ROWS_PER_TASK * d)
                .enumerate()
                .for_each(|(t, tile)| {
                    tile.fill(T::ZERO);
                    let i0 = t * ROWS_PER_TASK;
                    for &o in &xu[xb] {
                        let yb = y_index[o] as usize;
                        let gp = &grad[o * nm..(o + 1) * nm];
                        accumulate_rows(
                            tile,
                            &gp[i0 * m..],
                            m,
                            1,
                            &y[yb * m * d..(yb + 1) * m * d],
                            &iy[yb * m..(yb + 1) * m],
                            d,
                        );
                    }
                    let xs = &x[(xb * n + i0) * d..];
                    let ixs = &ix[xb * n + i0..];
                    finish_rows(tile, xs, ixs, d, sc, normalize);
                });
        });
    }
    // gy[yb, j] = scale Σ_o Σ_i G_o[i, j] ix[i] x[i]: blocks of y rows, all x rows.
    if m * d > 0 {
        gy.par_chunks_mut(m * d).enumerate().for_each(|(yb, gyp)| {
            gyp.par_chunks_mut(ROWS_PER_TASK * d)
                .enumerate()
                .for_each(|(t, tile)| {
                    tile.fill(T::ZERO);
                    let j0 = t * ROWS_PER_TASK;
                    for &o in &yu[yb] {
                        let xb = x_index[o] as usize;
                        let gp = &grad[o * nm..(o + 1) * nm];
                        accumulate_rows(
                            tile,
                            &gp[j0..],
                            1,
                            m,
                            &x[xb * n * d..(xb + 1) * n * d],
                            &ix[xb * n..(xb + 1) * n],
                            d,
                        );
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

/// `acc[i] += Σ_j G[i·rs + j·cs] w[j] src[j]` for the `acc.len() / d` rows of `acc`, where
/// `src` has one `d`-row per `j` (its length fixes the number of `j`).
fn accumulate_rows<T: Real>(
    acc: &mut [T],
    g: &[T],
    rs: usize,
    cs: usize,
    src: &[T],
    w: &[T],
    d: usize,
) {
    let rows = acc.len() / d;
    let nj = w.len();
    let mut i = 0;
    while i + IB <= rows {
        let (a0, rest) = acc[i * d..].split_at_mut(d);
        let (a1, rest) = rest.split_at_mut(d);
        let (a2, rest) = rest.split_at_mut(d);
        let a3 = &mut rest[..d];
        for j in 0..nj {
            let cf: [T; IB] = std::array::from_fn(|u| g[(i + u) * rs + j * cs] * w[j]);
            let sr = &src[j * d..(j + 1) * d];
            for p in 0..d {
                let s = sr[p];
                a0[p] += cf[0] * s;
                a1[p] += cf[1] * s;
                a2[p] += cf[2] * s;
                a3[p] += cf[3] * s;
            }
        }
        i += IB;
    }
    while i < rows {
        let a = &mut acc[i * d..(i + 1) * d];
        for j in 0..nj {
            let cf = g[i * rs + j * cs] * w[j];
            let sr = &src[j * d..(j + 1) * d];
            for p in 0..d {
                a[p] += cf * sr[p];
            }
        }
        i += 1;
    }
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
