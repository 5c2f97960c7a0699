//! Geometric consistency of two modalities through D×D Grams, never N×N (math in
//! `python/mmot/reverse/geometric_consistency.py`).
//!
//! With x̂, ŷ the rows of `a`, `b` (L2-normalised when `normalize`) and ê = ŷ − x̂, the two terms
//!
//! ```text
//! T1 = Σ_ij (S_ij − S_ji)²,  S = x̂ ŷᵀ      (cross-modal similarity is symmetric)
//! T2 = Σ_ij (P_ij − Q_ij)²,  P = x̂ x̂ᵀ, Q = ŷ ŷᵀ (intra-modal structures agree)
//! ```
//!
//! come from A = x̂ᵀx̂, F = x̂ᵀê, G = êᵀê as
//!
//! ```text
//! T1 = 2⟨A,G⟩ − 2 tr(F²)
//! T2 = 2⟨A,G⟩ + 2 tr(F²) + ‖G‖² + 4⟨F,G⟩
//! ```
//!
//! each clamped at 0 (NaN passes). Working with the difference ê rather than ŷ keeps every
//! product at the size of the loss: the plain form 2⟨A,B⟩ − 2tr(C²) subtracts O(N²) numbers
//! whose difference vanishes as a → b. The Grams are summed over fixed row parts, each part a
//! sequence of fixed chunks, the parts added in order: results do not depend on the thread
//! count. The backward needs only the saved Grams: with the cotangents c1, c2 of T1, T2,
//! `[∂x̂, ∂ŷ] = [x̂, ê] · W`, W a 2D×2D matrix of A, F, G (see [`backward_matrix`]), one GEMM
//! per row chunk, then through the normalisation (`exec::row_norms`).

use crate::error::{check_len, not_finite, Result};
use crate::exec::row_norms::{unit_rows, UnitRows};
use crate::interrupt::Interrupt;
use crate::simd::gemm::{gemm, MatrixRef};
use crate::simd::{dot, Real};
use rayon::prelude::*;

/// Rows per chunk: the unit of the scratch copies and of the backward's tasks.
const CHUNK: usize = 256;
/// Gram columns per forward task, so that wide features still give parallel work.
const COLUMNS: usize = 128;
/// The partial Grams of all row parts together hold at most this many elements (8 MiB of
/// float32: the forward stays within 16 MiB of extra memory at N = 65536, D = 256).
const PARTIAL_BUDGET: usize = 1 << 21;
/// At most this many row parts.
const MAX_PARTS: usize = 64;

/// The op's flags.
#[derive(Clone, Copy, Debug)]
pub struct GeometricConsistencyParams {
    /// L2-normalise the rows of a and b first.
    pub normalize: bool,
    /// Return an error (not a result) for NaN or Inf in `a` or `b`, found in the row-norm pass.
    pub check_finite: bool,
}

/// The two embeddings: row `i` of `a` and row `i` of `b` are a pair.
#[derive(Clone, Copy, Debug)]
pub struct GeometricConsistencyInput<'a, T> {
    /// `[rows, features]` each.
    pub a: &'a [T],
    pub b: &'a [T],
    pub rows: usize,
    pub features: usize,
}

fn check<T>(input: &GeometricConsistencyInput<'_, T>) -> Result<()> {
    let (n, d) = (input.rows, input.features);
    check_len("a", input.a.len(), [n, d])?;
    check_len("b", input.b.len(), [n, d])
}

fn read<'a, T: Real>(
    name: &str,
    data: &'a [T],
    input: &GeometricConsistencyInput<'a, T>,
    params: &GeometricConsistencyParams,
) -> Result<UnitRows<'a, T>> {
    let unit = unit_rows(
        data,
        input.rows,
        input.features,
        params.normalize,
        params.check_finite,
    );
    if unit.finite {
        Ok(unit)
    } else {
        Err(not_finite(name))
    }
}

/// Rows `r0..r0 + rows` as `[x̂ | ê]` (each `d` wide) into `z` (`rows` × 2d).
fn fill_chunk<T: Real>(
    x: &UnitRows<'_, T>,
    y: &UnitRows<'_, T>,
    d: usize,
    r0: usize,
    rows: usize,
    z: &mut [T],
) {
    for r in 0..rows {
        let i = r0 + r;
        let (xr, yr) = (&x.rows[i * d..(i + 1) * d], &y.rows[i * d..(i + 1) * d]);
        let (fx, fy) = (x.unit[i], y.unit[i]);
        let (zx, ze) = z[r * 2 * d..(r + 1) * 2 * d].split_at_mut(d);
        for q in 0..d {
            let xv = xr[q] * fx;
            zx[q] = xv;
            ze[q] = yr[q] * fy - xv;
        }
    }
}

/// The row parts of the forward: `(parts, chunks per part)`, from the shape alone.
fn row_parts(n: usize, d: usize) -> (usize, usize) {
    let chunks = n.div_ceil(CHUNK).max(1);
    let budget = (PARTIAL_BUDGET / (3 * d * d).max(1)).clamp(1, MAX_PARTS);
    let per = chunks.div_ceil(budget.min(chunks));
    (chunks.div_ceil(per), per)
}

/// The two terms `[T1, T2]` (sums over the N² entries, each clamped at 0) into `terms`, and
/// the Grams A = x̂ᵀx̂, F = x̂ᵀê, G = êᵀê into `grams` (`[3, features, features]`).
pub fn geometric_consistency_forward<T: Real>(
    input: GeometricConsistencyInput<'_, T>,
    terms: &mut [T],
    grams: &mut [T],
    params: &GeometricConsistencyParams,
) -> Result<()> {
    check(&input)?;
    let (n, d) = (input.rows, input.features);
    check_len("terms", terms.len(), [2])?;
    check_len("grams", grams.len(), [3, d, d])?;
    let x = read("a", input.a, &input, params)?;
    let y = read("b", input.b, &input, params)?;
    let stop = Interrupt::current();
    grams.fill(T::ZERO);
    if n > 0 && d > 0 {
        let (parts, per) = row_parts(n, d);
        let blocks = d.div_ceil(COLUMNS);
        // Task (part, block): Grams[:, block] of the part's rows, as [3, d, width].
        let partials: Vec<Vec<T>> = (0..parts * blocks)
            .into_par_iter()
            .map(|task| {
                let (part, block) = (task / blocks, task % blocks);
                let (c0, w) = (block * COLUMNS, COLUMNS.min(d - block * COLUMNS));
                let mut out = vec![T::ZERO; 3 * d * w];
                let mut z = vec![T::ZERO; CHUNK * 2 * d];
                let first = part * per * CHUNK;
                let last = n.min((part + 1) * per * CHUNK);
                for r0 in (first..last).step_by(CHUNK) {
                    if stop.requested() {
                        break;
                    }
                    let rows = CHUNK.min(last - r0);
                    fill_chunk(&x, &y, d, r0, rows, &mut z);
                    let col = |k: usize| z[k * d + c0..].as_ptr();
                    // (left, right) halves of z: A = x̂ᵀx̂, F = x̂ᵀê, G = êᵀê.
                    for (g, (left, right)) in [(0, 0), (0, 1), (1, 1)].into_iter().enumerate() {
                        // SAFETY: rows × d (left) and rows × w (right) values 2d apart lie in
                        // z; the output block is d × w.
                        unsafe {
                            gemm(
                                [d, rows, w],
                                MatrixRef::transpose_of(z[left * d..].as_ptr(), 2 * d),
                                MatrixRef::row_major(col(right), 2 * d),
                                T::ONE,
                                out[g * d * w..].as_mut_ptr(),
                                w,
                            );
                        }
                    }
                }
                out
            })
            .collect();
        stop.check()?;
        // The parts added in order, per column block.
        for (task, partial) in partials.iter().enumerate() {
            let block = task % blocks;
            let (c0, w) = (block * COLUMNS, COLUMNS.min(d - block * COLUMNS));
            for g in 0..3 {
                for k in 0..d {
                    let src = &partial[(g * d + k) * w..(g * d + k + 1) * w];
                    let dst = &mut grams[(g * d + k) * d + c0..(g * d + k) * d + c0 + w];
                    for (o, &v) in dst.iter_mut().zip(src) {
                        *o += v;
                    }
                }
            }
        }
    }
    let [t1, t2] = terms_from_grams(grams, d);
    terms[0] = t1;
    terms[1] = t2;
    Ok(())
}

/// `[T1, T2]` from the Grams, each clamped at 0 (a NaN stays NaN).
fn terms_from_grams<T: Real>(grams: &[T], d: usize) -> [T; 2] {
    let (a, rest) = grams.split_at(d * d);
    let (f, g) = rest.split_at(d * d);
    let ag = dot(a, g);
    let gg = dot(g, g);
    let fg = dot(f, g);
    // tr(F²) = Σ_ij F_ij F_ji, row by row in a fixed order.
    let mut ff = T::ZERO;
    for i in 0..d {
        let mut row = T::ZERO;
        for j in 0..d {
            row += f[i * d + j] * f[j * d + i];
        }
        ff += row;
    }
    let two = T::from_f64(2.0);
    let t1 = two * ag - two * ff;
    let t2 = two * ag + two * ff + gg + T::from_f64(4.0) * fg;
    [clamp_at_zero(t1), clamp_at_zero(t2)]
}

/// max(v, 0) that keeps a NaN (a plain `fmax` would turn it into 0).
fn clamp_at_zero<T: Real>(v: T) -> T {
    if v < T::ZERO {
        T::ZERO
    } else {
        v
    }
}

/// W (`[2d, 2d]`, row-major) with `[∂x̂, ∂ŷ] = [x̂, ê] · W` for the cotangents `c` of the terms:
///
/// ```text
/// M1 = 4(c1+c2) G                    M2 = 4(c2−c1) F + 4c2 G
/// N1 = 4(c1+c2) A + 4c2 (G + F + Fᵀ)  N2 = 4(c2−c1) Fᵀ + 4c2 G
/// W  = [[M1 − N2, N2], [M2 − N1, N1]]
/// ```
fn backward_matrix<T: Real>(grams: &[T], c: [T; 2], d: usize) -> Vec<T> {
    let four = T::from_f64(4.0);
    let (plus, minus, c2) = (four * (c[0] + c[1]), four * (c[1] - c[0]), four * c[1]);
    let at = |g: usize, i: usize, j: usize| grams[(g * d + i) * d + j];
    let mut w = vec![T::ZERO; 4 * d * d];
    for i in 0..d {
        for j in 0..d {
            let (a, f, ft, g) = (at(0, i, j), at(1, i, j), at(1, j, i), at(2, i, j));
            let m1 = plus * g;
            let m2 = minus * f + c2 * g;
            let n1 = plus * a + c2 * (g + f + ft);
            let n2 = minus * ft + c2 * g;
            w[i * 2 * d + j] = m1 - n2;
            w[i * 2 * d + d + j] = n2;
            w[(d + i) * 2 * d + j] = m2 - n1;
            w[(d + i) * 2 * d + d + j] = n1;
        }
    }
    w
}

/// Gradients of `c1·T1 + c2·T2` (`grad` = `[c1, c2]`) with respect to `a` and `b`
/// (`[rows, features]` each), from the forward's Grams.
pub fn geometric_consistency_backward<T: Real>(
    grad: &[T],
    input: GeometricConsistencyInput<'_, T>,
    grams: &[T],
    grad_a: &mut [T],
    grad_b: &mut [T],
    params: &GeometricConsistencyParams,
) -> Result<()> {
    check(&input)?;
    let (n, d) = (input.rows, input.features);
    check_len("grad", grad.len(), [2])?;
    check_len("grams", grams.len(), [3, d, d])?;
    check_len("grad_a", grad_a.len(), [n, d])?;
    check_len("grad_b", grad_b.len(), [n, d])?;
    if n == 0 || d == 0 {
        return Ok(());
    }
    let unchecked = GeometricConsistencyParams {
        check_finite: false,
        ..*params
    };
    let x = read("a", input.a, &input, &unchecked)?;
    let y = read("b", input.b, &input, &unchecked)?;
    let w = backward_matrix(grams, [grad[0], grad[1]], d);
    let stop = Interrupt::current();
    grad_a
        .par_chunks_mut(CHUNK * d)
        .zip(grad_b.par_chunks_mut(CHUNK * d))
        .enumerate()
        .for_each_init(
            || (vec![T::ZERO; CHUNK * 2 * d], vec![T::ZERO; CHUNK * 2 * d]),
            |(z, out), (c, (ga, gb))| {
                if stop.requested() {
                    return;
                }
                let rows = ga.len() / d;
                fill_chunk(&x, &y, d, c * CHUNK, rows, z);
                // SAFETY: z holds rows × 2d values, W 2d × 2d, out rows × 2d.
                unsafe {
                    gemm(
                        [rows, 2 * d, 2 * d],
                        MatrixRef::row_major(z.as_ptr(), 2 * d),
                        MatrixRef::row_major(w.as_ptr(), 2 * d),
                        T::ZERO,
                        out.as_mut_ptr(),
                        2 * d,
                    );
                }
                for r in 0..rows {
                    let (ox, oy) = out[r * 2 * d..(r + 1) * 2 * d].split_at(d);
                    ga[r * d..(r + 1) * d].copy_from_slice(ox);
                    gb[r * d..(r + 1) * d].copy_from_slice(oy);
                }
            },
        );
    stop.check()?;
    x.finish_gradient(d, T::ONE, params.normalize, grad_a);
    y.finish_gradient(d, T::ONE, params.normalize, grad_b);
    Ok(())
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

    /// The two sums straight from the N×N matrices.
    fn dense(a: &[f64], b: &[f64], n: usize, d: usize, normalize: bool) -> [f64; 2] {
        let unit = |v: &[f64]| -> Vec<f64> {
            let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt().max(1e-12);
            v.iter()
                .map(|a| if normalize { a / norm } else { *a })
                .collect()
        };
        let x: Vec<Vec<f64>> = (0..n).map(|i| unit(&a[i * d..(i + 1) * d])).collect();
        let y: Vec<Vec<f64>> = (0..n).map(|i| unit(&b[i * d..(i + 1) * d])).collect();
        let dotv = |p: &[f64], q: &[f64]| p.iter().zip(q).map(|(p, q)| p * q).sum::<f64>();
        let mut out = [0.0; 2];
        for i in 0..n {
            for j in 0..n {
                out[0] += (dotv(&x[i], &y[j]) - dotv(&x[j], &y[i])).powi(2);
                out[1] += (dotv(&x[i], &x[j]) - dotv(&y[i], &y[j])).powi(2);
            }
        }
        out
    }

    #[test]
    fn matches_dense_and_finite_differences_over_several_chunks() {
        // 300 rows: two chunks, one ragged; 130 features: two column blocks.
        for (n, d) in [(300, 7), (70, 130)] {
            let mut seed = 5u64;
            let mut a: Vec<f64> = (0..n * d).map(|_| lcg(&mut seed)).collect();
            let b0: Vec<f64> = a.iter().map(|v| v + 0.3 * lcg(&mut seed)).collect();
            let c = [0.7, -1.3];
            for normalize in [true, false] {
                let params = GeometricConsistencyParams {
                    normalize,
                    check_finite: true,
                };
                let run = |a: &[f64], b: &[f64]| {
                    let input = GeometricConsistencyInput {
                        a,
                        b,
                        rows: n,
                        features: d,
                    };
                    let (mut terms, mut grams) = (vec![0.0; 2], vec![0.0; 3 * d * d]);
                    geometric_consistency_forward(input, &mut terms, &mut grams, &params).unwrap();
                    (terms, grams)
                };
                let (terms, grams) = run(&a, &b0);
                let want = dense(&a, &b0, n, d, normalize);
                for k in 0..2 {
                    assert!(
                        (terms[k] - want[k]).abs() <= 1e-9 * (1.0 + want[k]),
                        "{k}: {} vs {}",
                        terms[k],
                        want[k]
                    );
                }
                let (mut ga, mut gb) = (vec![0.0; n * d], vec![0.0; n * d]);
                let input = GeometricConsistencyInput {
                    a: &a,
                    b: &b0,
                    rows: n,
                    features: d,
                };
                geometric_consistency_backward(&c, input, &grams, &mut ga, &mut gb, &params)
                    .unwrap();
                let objective = |a: &[f64], b: &[f64]| {
                    let t = run(a, b).0;
                    c[0] * t[0] + c[1] * t[1]
                };
                let h = 1e-6;
                let mut b = b0.clone();
                for &e in &[0usize, 5, 13 * d + 2, n * d - 1] {
                    for side in 0..2 {
                        let v = if side == 0 { &mut a } else { &mut b };
                        let keep = v[e];
                        v[e] = keep + h;
                        let up = objective(&a, &b);
                        let v = if side == 0 { &mut a } else { &mut b };
                        v[e] = keep - h;
                        let down = objective(&a, &b);
                        let v = if side == 0 { &mut a } else { &mut b };
                        v[e] = keep;
                        let fd = (up - down) / (2.0 * h);
                        let got = if side == 0 { ga[e] } else { gb[e] };
                        assert!(
                            (fd - got).abs() < 1e-5 * (1.0 + fd.abs()),
                            "side {side} [{e}]: {fd} vs {got}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rejects_bad_lengths_and_non_finite_rows() {
        let mut rows = vec![1.0f32; 6];
        let (mut terms, mut grams) = ([0.0f32; 2], [0.0f32; 27]);
        let params = GeometricConsistencyParams {
            normalize: true,
            check_finite: true,
        };
        let input = |a: &[f32], len: usize| {
            let (a, b) = (a[..6].to_vec(), a[..len].to_vec());
            (a, b)
        };
        let (a, b) = input(&rows, 5);
        let err = geometric_consistency_forward(
            GeometricConsistencyInput {
                a: &a,
                b: &b,
                rows: 2,
                features: 3,
            },
            &mut terms,
            &mut grams,
            &params,
        );
        assert!(err.unwrap_err().to_string().starts_with("b has 5 elements"));
        rows[4] = f32::NAN;
        let (a, b) = input(&rows, 6);
        let make = || GeometricConsistencyInput {
            a: &a,
            b: &b,
            rows: 2,
            features: 3,
        };
        let err = geometric_consistency_forward(make(), &mut terms, &mut grams, &params);
        assert_eq!(
            err.unwrap_err().to_string(),
            "argument 'a' must be finite; found NaN or Inf"
        );
        let unchecked = GeometricConsistencyParams {
            check_finite: false,
            ..params
        };
        geometric_consistency_forward(make(), &mut terms, &mut grams, &unchecked).unwrap();
        assert!(terms.iter().all(|t| t.is_nan()), "{terms:?}");
    }
}
