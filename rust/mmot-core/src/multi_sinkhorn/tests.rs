//! The small-problem path against the streaming path.

use super::forward::Workspace;
use super::*;
use crate::exec::column_stats::batch_col_stats;

/// Uniform in [-1, 1), from a fixed xorshift stream.
fn uniform(len: usize, seed: u64) -> Vec<f64> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        })
        .collect()
}

/// The lanes against the streaming path (`Problem::solve`, one problem at a time) on the
/// same batch: odd shapes, a batch that leaves a short last group of lanes, random masses,
/// and weight pairs with and without an integer ratio.
fn lanes_match_streaming<T: Real>(tol: f64) {
    let shapes = [
        (1, 3, 1),
        (4, 4, 2),
        (5, 7, 3),
        (16, 16, 8),
        (3, 300, 100),
        (33, 31, 30),
    ];
    for (case, &(n, kk, k)) in shapes.iter().enumerate() {
        for (low, normalize) in [(0.25, Normalize::MinMax), (0.3, Normalize::None)] {
            // A single row's T is constant up to rounding: its min-max is noise.
            let normalize = if n == 1 { Normalize::None } else { normalize };
            let b = 37;
            let s: Vec<T> = uniform(b * n * kk, case as u64)
                .iter()
                .map(|&x| T::from_f64(x))
                .collect();
            let mut r: Vec<T> = uniform(b * kk, 99 + case as u64)
                .iter()
                .map(|&x| T::from_f64(x + 1.5))
                .collect();
            for rp in r.chunks_exact_mut(kk) {
                let total = rp.iter().map(|x| x.to_f64()).sum::<f64>();
                rp.iter_mut()
                    .for_each(|x| *x = T::from_f64(x.to_f64() * n as f64 / total));
            }
            let weights: Vec<f64> = (0..kk)
                .map(|m| if m < kk - k { low } else { 1.0 })
                .collect();
            let params = MultiSinkhornParams {
                eps: 0.2,
                n_iters: 9,
                slot_weights: weights,
                k,
                normalize,
                log_domain: LogDomain::Auto,
                check_values: false,
            };
            let p = Problem::new(Dims::new(b, n, kk), &params);
            assert!(small::applies(&p, LogDomain::Auto));
            let mut got = vec![T::from_f64(f64::NAN); b * n * kk];
            assert!(small::solve(&p, &s, &r, &mut got, &params));
            let mut cmax = vec![T::ZERO; b * kk];
            batch_col_stats(&s, b, n, kk, &mut cmax);
            let mut want = vec![T::from_f64(f64::NAN); b * n * kk];
            let mut ws = Workspace::default();
            for i in 0..b {
                let input = Inputs {
                    scores: &s[i * n * kk..][..n * kk],
                    mass: &r[i * kk..][..kk],
                    col_max: &cmax[i * kk..][..kk],
                };
                p.solve(
                    input,
                    &mut want[i * n * kk..][..n * kk],
                    &mut ws,
                    false,
                    None,
                );
            }
            for (e, (x, y)) in got.iter().zip(&want).enumerate() {
                let (x, y) = (x.to_f64(), y.to_f64());
                assert!(
                    (x - y).abs() <= tol * (1.0 + y.abs()),
                    "shape {n}x{kk} k={k} low={low}: element {e}: lanes {x}, streaming {y}"
                );
            }
        }
    }
}

/// One problem of the batch beyond the plain range sends the whole call to the streaming
/// path's log domain, as if the small path did not exist; a NaN gives the streaming path's
/// error.
#[test]
fn one_wide_problem_gives_the_call_to_the_log_domain() {
    let (b, n, kk, k) = (37, 4, 4, 2);
    let mut s: Vec<f32> = uniform(b * n * kk, 7).iter().map(|&x| x as f32).collect();
    let r = vec![1f32; b * kk];
    let params = |log_domain| MultiSinkhornParams {
        eps: 0.1,
        n_iters: 5,
        slot_weights: vec![0.25, 0.25, 1.0, 1.0],
        k,
        normalize: Normalize::None,
        log_domain,
        check_values: false,
    };
    let run = |s: &[f32], mode| {
        let mut out = vec![f32::NAN; b * n * kk];
        let log = multi_sinkhorn(s, &r, &mut out, Dims::new(b, n, kk), &params(mode)).unwrap();
        (log, out)
    };
    assert!(
        !run(&s, LogDomain::Auto).0,
        "uniform scores at eps 0.1 are plain"
    );
    s[20 * n * kk] = 6.0; // range 7 / eps 0.1 = 70 > 50
    let (log, auto) = run(&s, LogDomain::Auto);
    assert!(log);
    assert_eq!(auto, run(&s, LogDomain::On).1);
    s[20 * n * kk] = f32::NAN;
    let mut out = vec![0f32; b * n * kk];
    let checked_params = MultiSinkhornParams {
        check_values: true,
        ..params(LogDomain::Off)
    };
    let checked = multi_sinkhorn(&s, &r, &mut out, Dims::new(b, n, kk), &checked_params);
    assert!(checked.unwrap_err().to_string().contains("finite"));
}

#[test]
fn lanes_match_streaming_f64() {
    lanes_match_streaming::<f64>(1e-11);
}

#[test]
fn lanes_match_streaming_f32() {
    lanes_match_streaming::<f32>(2e-5);
}

/// Scores, masses summing to `n` per problem, and an upstream gradient, from fixed streams.
fn backward_inputs<T: Real>(b: usize, n: usize, kk: usize, seed: u64) -> [Vec<T>; 3] {
    let s = uniform(b * n * kk, seed)
        .iter()
        .map(|&x| T::from_f64(x))
        .collect();
    let mut r: Vec<T> = uniform(b * kk, seed + 1)
        .iter()
        .map(|&x| T::from_f64(x + 1.5))
        .collect();
    for rp in r.chunks_exact_mut(kk) {
        let total = rp.iter().map(|x| x.to_f64()).sum::<f64>();
        rp.iter_mut()
            .for_each(|x| *x = T::from_f64(x.to_f64() * n as f64 / total));
    }
    let g = uniform(b * n * kk, seed + 2)
        .iter()
        .map(|&x| T::from_f64(x))
        .collect();
    [s, r, g]
}

fn two_group_params(
    kk: usize,
    k: usize,
    low: f64,
    normalize: Normalize,
    log_domain: LogDomain,
) -> MultiSinkhornParams {
    MultiSinkhornParams {
        eps: 0.15,
        n_iters: 6,
        slot_weights: (0..kk)
            .map(|m| if m < kk - k { low } else { 1.0 })
            .collect(),
        k,
        normalize,
        log_domain,
        check_values: false,
    }
}

fn assert_close<T: Real>(got: &[T], want: &[T], tol: f64, what: &str) {
    let scale = want.iter().map(|x| x.to_f64().abs()).fold(0.0, f64::max);
    assert!(scale > 0.0, "{what}: a zero gradient tests nothing");
    for (e, (x, y)) in got.iter().zip(want).enumerate() {
        let (x, y) = (x.to_f64(), y.to_f64());
        assert!(
            (x - y).abs() <= tol * scale,
            "{what}: element {e}: {x} against {y}"
        );
    }
}

/// The two-group plain reverse pass (`two_groups_backward`) against the log-domain reverse
/// pass (`backward.rs`, separate code and arithmetic) on streaming-size problems: several row
/// chunks, an odd row count (a row left over from the pairs), K with a vector tail, a weight
/// pair with and without an integer ratio and one with w_1 < w_0; and its result does not
/// depend on the thread count.
fn two_group_backward_matches_log<T: Real>(tol: f64) {
    let cases = [(1001, 64, 32, 0.25), (417, 37, 11, 0.3), (130, 19, 5, 2.0)];
    for (case, &(n, kk, k, low)) in cases.iter().enumerate() {
        for normalize in [Normalize::MinMax, Normalize::None] {
            let b = 2;
            let [s, r, g] = backward_inputs::<T>(b, n, kk, 10 + case as u64);
            let dims = Dims::new(b, n, kk);
            let run = |mode, threads: usize| {
                let mut out = vec![T::from_f64(f64::NAN); b * n * kk];
                let params = two_group_params(kk, k, low, normalize, mode);
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let log = pool
                    .install(|| multi_sinkhorn_backward(&g, &s, &r, &mut out, dims, &params))
                    .unwrap();
                assert_eq!(log, mode == LogDomain::On);
                out
            };
            let plain = run(LogDomain::Off, 2);
            let what = format!("{n}x{kk} k={k} low={low} {normalize:?}");
            assert_close(&plain, &run(LogDomain::On, 2), tol, &what);
            assert!(
                plain
                    .iter()
                    .zip(run(LogDomain::Off, 1))
                    .all(|(x, y)| x.to_f64().to_bits() == y.to_f64().to_bits()),
                "{what}: the result depends on the thread count"
            );
        }
    }
}

#[test]
fn two_group_backward_matches_log_f64() {
    two_group_backward_matches_log::<f64>(1e-10);
}

#[test]
fn two_group_backward_matches_log_f32() {
    two_group_backward_matches_log::<f32>(2e-4);
}

/// The streaming two-group reverse pass against the small-problem lanes (`small_backward`) on
/// the same batch of small problems.
#[test]
fn two_group_backward_matches_lanes() {
    for (case, &(n, kk, k)) in [(5, 7, 3), (16, 16, 8), (33, 31, 30)].iter().enumerate() {
        let b = 19;
        let [s, r, g] = backward_inputs::<f64>(b, n, kk, 40 + case as u64);
        let params = two_group_params(kk, k, 0.25, Normalize::MinMax, LogDomain::Off);
        let p = Problem::new(Dims::new(b, n, kk), &params);
        let mut lanes = vec![f64::NAN; b * n * kk];
        small_backward::backward(&p, &g, &s, &r, &mut lanes);
        let mut cmax = vec![0.0; b * kk];
        batch_col_stats(&s, b, n, kk, &mut cmax);
        let mut streaming = vec![f64::NAN; b * n * kk];
        let mut bw = backward::BackWorkspace::default();
        for i in 0..b {
            let m = n * kk;
            let input = Inputs {
                scores: &s[i * m..][..m],
                mass: &r[i * kk..][..kk],
                col_max: &cmax[i * kk..][..kk],
            };
            p.backward(
                &g[i * m..][..m],
                input,
                &mut streaming[i * m..][..m],
                &mut bw,
                false,
            );
        }
        assert_close(&streaming, &lanes, 1e-11, &format!("{n}x{kk} k={k}"));
    }
}
