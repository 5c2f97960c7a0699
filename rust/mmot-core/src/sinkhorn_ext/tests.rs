//! Unit checks of the lane path on its own (the Python tests compare every path with a naive
//! form): a ragged batch's problems, solved `L` at a time, give bitwise the results of each
//! problem solved alone and of any thread count.

use super::*;

/// A padded `[b, nn, kk]` batch of problems of very different sizes: 1×1, the largest the lanes
/// take (64×64), one too large for them, and random ones; NaN on the padding.
struct Batch<T> {
    dims: Dims,
    scores: Vec<T>,
    row_mass: Vec<T>,
    col_mass: Vec<T>,
    rows: Vec<i64>,
    cols: Vec<i64>,
    init_f: Vec<T>,
    eps_start: Vec<f64>,
}

fn batch<T: Real>(b: usize, seed: u64) -> Batch<T> {
    let (nn, kk) = (70, 64);
    let mut state = seed;
    let mut next = move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let nan = T::from_f64(f64::NAN);
    let mut out = Batch {
        dims: Dims::new(b, nn, kk),
        scores: vec![nan; b * nn * kk],
        row_mass: vec![nan; b * nn],
        col_mass: vec![nan; b * kk],
        rows: vec![0; b],
        cols: vec![0; b],
        init_f: vec![nan; b * nn],
        eps_start: vec![0.1; b],
    };
    for p in 0..b {
        let (n, k) = match p {
            0 => (1, 1),
            1 => (64, 64),
            2 => (70, 61),
            _ => (1 + (next() * 64.0) as usize, 1 + (next() * 64.0) as usize),
        };
        (out.rows[p], out.cols[p]) = (n as i64, k as i64);
        for i in 0..n {
            for j in 0..k {
                out.scores[(p * nn + i) * kk + j] = T::from_f64(next() - 0.5);
            }
            out.row_mass[p * nn + i] = T::from_f64(0.5 + next());
            out.init_f[p * nn + i] = T::from_f64(0.2 * (next() - 0.5));
        }
        let total: f64 = (0..n).map(|i| out.row_mass[p * nn + i].to_f64()).sum();
        for j in 0..k {
            out.col_mass[p * kk + j] = T::from_f64(total / k as f64);
        }
    }
    out
}

struct Results<T> {
    plan: Vec<T>,
    f: Vec<T>,
    g: Vec<T>,
    iters: Vec<i64>,
    err: Vec<T>,
}

fn forward<T: Real>(x: &Batch<T>, tol: f64, threads: usize) -> Results<T> {
    let Dims {
        problems: b,
        rows: nn,
        cols: kk,
    } = x.dims;
    let nan = T::from_f64(f64::NAN);
    let mut r = Results {
        plan: poisoned(x),
        f: vec![nan; b * nn],
        g: vec![nan; b * kk],
        iters: vec![-1; b],
        err: vec![nan; b],
    };
    let input = SinkhornExtInput {
        scores: &x.scores,
        row_mass: &x.row_mass,
        col_mass: &x.col_mass,
        row_counts: &x.rows,
        col_counts: &x.cols,
        init_f: &x.init_f,
        eps_start: &x.eps_start,
    };
    let output = SinkhornExtOutput {
        plan: &mut r.plan,
        f: &mut r.f,
        g: &mut r.g,
        iters: &mut r.iters,
        err: &mut r.err,
    };
    let params = SinkhornExtParams {
        eps: 0.1,
        decay: 0.5,
        n_iters: 30,
        tol,
        reach: f64::INFINITY,
        log_domain: LogDomain::Auto,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| sinkhorn_ext_forward(&input, output, x.dims, &params))
        .unwrap();
    r
}

/// What the padding of the `[B, N, K]` outputs holds before a call (callers give zeros); the
/// kernels never write it, so any other value there shows a stray write.
const PAD: f64 = 0.25;

/// A `[B, N, K]` output buffer for `x`: NaN on the valid blocks (the kernels write every valid
/// entry), [`PAD`] on the padding.
fn poisoned<T: Real>(x: &Batch<T>) -> Vec<T> {
    let Dims {
        problems: b,
        rows: nn,
        cols: kk,
    } = x.dims;
    let mut out = vec![T::from_f64(PAD); b * nn * kk];
    for p in 0..b {
        for i in 0..x.rows[p] as usize {
            out[(p * nn + i) * kk..][..x.cols[p] as usize].fill(T::from_f64(f64::NAN));
        }
    }
    out
}

/// The VJP of `x`'s forward (counts `iters`) for the upstream gradient `grad` (NaN on padding).
fn backward<T: Real>(x: &Batch<T>, grad: &[T], iters: &[i64], threads: usize) -> Vec<T> {
    let mut out = poisoned(x);
    let input = SinkhornExtInput {
        scores: &x.scores,
        row_mass: &x.row_mass,
        col_mass: &x.col_mass,
        row_counts: &x.rows,
        col_counts: &x.cols,
        init_f: &x.init_f,
        eps_start: &x.eps_start,
    };
    let params = SinkhornExtParams {
        eps: 0.1,
        decay: 0.5,
        n_iters: 1,
        tol: -1.0,
        reach: f64::INFINITY,
        log_domain: LogDomain::Auto,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| sinkhorn_ext_backward(grad, &input, iters, &mut out, x.dims, &params))
        .unwrap();
    out
}

/// An upstream gradient for `x`: values on the valid blocks, NaN on the padding.
fn upstream<T: Real>(x: &Batch<T>) -> Vec<T> {
    x.scores
        .iter()
        .enumerate()
        .map(|(e, s)| {
            let v = s.to_f64();
            T::from_f64(if v.is_nan() {
                v
            } else {
                ((e * 37 % 101) as f64 - 50.0) / 50.0
            })
        })
        .collect()
}

/// Problem `p` of `x` alone, cut to its own size.
fn alone<T: Real>(x: &Batch<T>, p: usize) -> Batch<T> {
    let (nn, kk) = (x.dims.rows, x.dims.cols);
    let (n, k) = (x.rows[p] as usize, x.cols[p] as usize);
    Batch {
        dims: Dims::new(1, n, k),
        scores: (0..n)
            .flat_map(|i| x.scores[(p * nn + i) * kk..][..k].to_vec())
            .collect(),
        row_mass: x.row_mass[p * nn..][..n].to_vec(),
        col_mass: x.col_mass[p * kk..][..k].to_vec(),
        rows: vec![n as i64],
        cols: vec![k as i64],
        init_f: x.init_f[p * nn..][..n].to_vec(),
        eps_start: vec![x.eps_start[p]],
    }
}

fn bits<T: Real>(v: &[T]) -> Vec<u64> {
    v.iter().map(|x| x.to_f64().to_bits()).collect()
}

fn lanes_match_single_problems<T: Real>() {
    // 41: a short last group for 16 and for 8 lanes.
    let x = batch::<T>(41, 7);
    let (nn, kk) = (x.dims.rows, x.dims.cols);
    for tol in [-1.0, 1e-4] {
        let all = forward(&x, tol, 2);
        let grad = upstream(&x);
        let grads = backward(&x, &grad, &all.iters, 2);
        if tol >= 0.0 {
            let mut stops = all.iters.clone();
            stops.sort_unstable();
            stops.dedup();
            assert!(stops.len() > 3, "stop points {stops:?}");
        }
        for p in 0..x.dims.problems {
            let (n, k) = (x.rows[p] as usize, x.cols[p] as usize);
            let single = alone(&x, p);
            let one = forward(&single, tol, 1);
            let one_grad = upstream(&single);
            let one_grads = backward(&single, &one_grad, &one.iters, 1);
            for i in 0..nn {
                let row = &all.plan[(p * nn + i) * kk..][..kk];
                let grow = &grads[(p * nn + i) * kk..][..kk];
                let pad = |v: &[T]| v.iter().all(|&v| v.to_f64() == PAD);
                if i < n {
                    assert_eq!(bits(&row[..k]), bits(&one.plan[i * k..][..k]), "{p} {i}");
                    assert!(pad(&row[k..]) && pad(&grow[k..]), "{p} {i}");
                } else {
                    assert!(pad(row) && pad(grow), "{p} {i}");
                }
            }
            // The same upstream values: the batch's gradient of problem p is the single call's.
            let mut want = vec![T::ZERO; n * k];
            for i in 0..n {
                want[i * k..][..k].copy_from_slice(&grad[(p * nn + i) * kk..][..k]);
            }
            let one_grads_same = backward(&single, &want, &one.iters, 1);
            for i in 0..n {
                assert_eq!(
                    bits(&grads[(p * nn + i) * kk..][..k]),
                    bits(&one_grads_same[i * k..][..k]),
                    "grad {p} {i}"
                );
            }
            assert!(one_grads.iter().all(|v| v.to_f64().is_finite()));
            assert_eq!(bits(&all.f[p * nn..][..n]), bits(&one.f));
            assert_eq!(bits(&all.g[p * kk..][..k]), bits(&one.g));
            assert_eq!(all.iters[p], one.iters[0]);
            assert_eq!(bits(&all.err[p..][..1]), bits(&one.err));
            // The row step makes the row sums the row masses.
            for i in 0..n {
                let sum: f64 = all.plan[(p * nn + i) * kk..][..k]
                    .iter()
                    .map(|v| v.to_f64())
                    .sum();
                let want = x.row_mass[p * nn + i].to_f64();
                assert!((sum - want).abs() <= 1e-4 * want, "{p} {i}: {sum} {want}");
            }
        }
        for threads in [1, 3] {
            let other = forward(&x, tol, threads);
            assert_eq!(bits(&all.plan), bits(&other.plan));
            assert_eq!(bits(&all.f), bits(&other.f));
            assert_eq!(bits(&all.g), bits(&other.g));
            assert_eq!(all.iters, other.iters);
            assert_eq!(bits(&all.err), bits(&other.err));
            assert_eq!(
                bits(&grads),
                bits(&backward(&x, &grad, &all.iters, threads))
            );
        }
    }
}

#[test]
fn lanes_match_single_problems_f32() {
    lanes_match_single_problems::<f32>();
}

#[test]
fn lanes_match_single_problems_f64() {
    lanes_match_single_problems::<f64>();
}
