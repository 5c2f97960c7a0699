//! Kernels against naive dense implementations of their definitions (`docs/numerics.md`,
//! `docs/multi_sinkhorn.md`), in f64.

mod common;

use common::{dense_sinkhorn, Rng};
use mmot_core::*;

/// Dense Multi-SK of one [n, kk] problem: the (K, N, K) tensor with its three normalisations
/// (`kk` is the number of slot weights; the log domain is ignored).
fn dense_multi(s: &[f64], r: &[f64], n: usize, params: &MultiSinkhornParams) -> Vec<f64> {
    let (w, k, eps, iters) = (&params.slot_weights, params.k, params.eps, params.n_iters);
    let kk = w.len();
    let minmax = params.normalize == Normalize::MinMax;
    let idx = |m: usize, i: usize, a: usize| (m * n + i) * kk + a;
    let mut p = vec![0.0; kk * n * kk];
    for m in 0..kk {
        for i in 0..n {
            for a in 0..kk {
                p[idx(m, i, a)] = (w[m] * s[i * kk + a] / eps).exp();
            }
        }
    }
    for _ in 0..iters {
        for m in 0..kk {
            for a in 0..kk {
                let cs: f64 = (0..n).map(|i| p[idx(m, i, a)]).sum();
                for i in 0..n {
                    p[idx(m, i, a)] *= r[a] / cs;
                }
            }
        }
        for i in 0..n {
            for a in 0..kk {
                let ss: f64 = (0..kk).map(|m| p[idx(m, i, a)]).sum();
                for m in 0..kk {
                    p[idx(m, i, a)] /= ss;
                }
            }
        }
        for m in 0..kk {
            for i in 0..n {
                let rs: f64 = (0..kk).map(|a| p[idx(m, i, a)]).sum();
                for a in 0..kk {
                    p[idx(m, i, a)] /= rs;
                }
            }
        }
    }
    let mut t = vec![0.0; n * kk];
    for m in kk - k..kk {
        for i in 0..n {
            for a in 0..kk {
                t[i * kk + a] += p[idx(m, i, a)];
            }
        }
    }
    if minmax {
        for row in t.chunks_mut(kk) {
            let lo = row.iter().cloned().fold(f64::INFINITY, f64::min);
            let hi = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            for x in row.iter_mut() {
                *x = if hi > lo { (*x - lo) / (hi - lo) } else { 0.0 };
            }
        }
    }
    t
}

fn row_min(x: &[f64]) -> f64 {
    x.iter().cloned().fold(f64::INFINITY, f64::min)
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn max_rel_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / x.abs().max(y.abs()).max(1e-300))
        .fold(0.0, f64::max)
}

const SK_SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (1, 1, 5),
    (2, 6, 1),
    (3, 3, 7),
    (2, 17, 4),
    (1, 100, 300),
    (2, 2000, 7),
];

#[test]
fn sinkhorn_matches_dense_both_domains() {
    let mut rng = Rng(7);
    for &(b, n, k) in SK_SHAPES {
        let s = rng.vec(b * n * k, -1.0, 1.0);
        let r: Vec<f64> = rng.vec(b * n, 0.5, 1.5);
        // col masses with the same total per problem
        let mut c = rng.vec(b * k, 0.5, 1.5);
        for p in 0..b {
            let tr: f64 = r[p * n..(p + 1) * n].iter().sum();
            let tc: f64 = c[p * k..(p + 1) * k].iter().sum();
            c[p * k..(p + 1) * k].iter_mut().for_each(|x| *x *= tr / tc);
        }
        let eps = 0.1;
        for iters in [1, 3, 10] {
            let mut want = Vec::new();
            for p in 0..b {
                want.extend(dense_sinkhorn(
                    &s[p * n * k..(p + 1) * n * k],
                    &r[p * n..(p + 1) * n],
                    &c[p * k..(p + 1) * k],
                    n,
                    k,
                    eps,
                    iters,
                ));
            }
            for mode in [LogDomain::Off, LogDomain::On] {
                let mut out = vec![f64::NAN; b * n * k];
                let used = sinkhorn(
                    &s,
                    &r,
                    &c,
                    &mut out,
                    Dims::new(b, n, k),
                    &SinkhornParams::new(eps, iters, mode),
                )
                .unwrap();
                assert_eq!(used, mode == LogDomain::On);
                let err = max_rel_diff(&out, &want);
                assert!(
                    err < 1e-10,
                    "shape {:?} iters {iters} mode {mode:?}: rel err {err}",
                    (b, n, k)
                );
            }
        }
    }
}

#[test]
fn sinkhorn_plain_domain_with_column_maxima_in_different_row_chunks() {
    // The plain domain caches each row chunk's E against that chunk's own column max and
    // rescales between chunks. Scores that trend up (even columns) or down (odd columns) over
    // the rows put every column's max in the first or last chunk, with the other chunks up to
    // e^-45 below it, close to the plain domain's limit.
    let mut rng = Rng(23);
    let (n, k, eps) = (3000, 64, 0.05);
    let noise = rng.vec(n * k, -0.125, 0.125);
    let s: Vec<f64> = (0..n * k)
        .map(|e| {
            let t = (e / k) as f64 / n as f64 * 2.0 - 1.0;
            noise[e] + if e % 2 == 0 { t } else { -t }
        })
        .collect();
    let r = vec![1.0; n];
    let c = vec![n as f64 / k as f64; k];
    let want = dense_sinkhorn(&s, &r, &c, n, k, eps, 3);
    let mut out = vec![f64::NAN; n * k];
    assert!(!sinkhorn(
        &s,
        &r,
        &c,
        &mut out,
        Dims::new(1, n, k),
        &SinkhornParams::new(eps, 3, LogDomain::Off)
    )
    .unwrap());
    let err = max_rel_diff(&out, &want);
    assert!(err < 1e-10, "rel err {err}");
}

#[test]
fn sinkhorn_rows_exact_and_small_eps_stable() {
    let mut rng = Rng(11);
    let (b, n, k) = (2, 300, 40);
    let s = rng.vec(b * n * k, -1.0, 1.0);
    let r = vec![1.0; b * n];
    let c = vec![n as f64 / k as f64; b * k];
    for eps in [1e-3f64, 0.05] {
        let s32: Vec<f32> = s.iter().map(|&x| x as f32).collect();
        let r32: Vec<f32> = r.iter().map(|&x| x as f32).collect();
        let c32: Vec<f32> = c.iter().map(|&x| x as f32).collect();
        let mut out = vec![0f32; b * n * k];
        let log = sinkhorn(
            &s32,
            &r32,
            &c32,
            &mut out,
            Dims::new(b, n, k),
            &SinkhornParams::new(eps, 50, LogDomain::Auto),
        )
        .unwrap();
        assert_eq!(log, eps < 0.01);
        assert!(out.iter().all(|x| x.is_finite() && *x >= 0.0));
        for row in out.chunks(k) {
            let rs: f32 = row.iter().sum();
            assert!((rs - 1.0).abs() < 1e-5, "row sum {rs}");
        }
    }
}

/// Slot weights: the SSPC default and arbitrary repeated weights in mixed order.
fn weight_sets(kk: usize, rng: &mut Rng) -> Vec<Vec<f64>> {
    let mut sets = vec![(0..kk)
        .map(|m| if m < kk - kk / 2 { 0.25 } else { 1.0 })
        .collect::<Vec<_>>()];
    let pool = [0.5, 1.0, 0.25, 0.8];
    sets.push(
        (0..kk)
            .map(|_| pool[(rng.next() * 4.0) as usize % 4])
            .collect(),
    );
    sets.push(vec![0.7; kk]);
    sets
}

const MULTI_SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (1, 3, 1),
    (2, 1, 4),
    (1, 3, 5),
    (2, 7, 4),
    (1, 40, 9),
    (1, 70, 130),
];

#[test]
fn multi_sinkhorn_matches_dense_both_domains() {
    let mut rng = Rng(3);
    for &(b, n, kk) in MULTI_SHAPES {
        let s = rng.vec(b * n * kk, -1.0, 1.0);
        let mut r = rng.vec(b * kk, 0.5, 1.5);
        for p in 0..b {
            let t: f64 = r[p * kk..(p + 1) * kk].iter().sum();
            r[p * kk..(p + 1) * kk]
                .iter_mut()
                .for_each(|x| *x *= n as f64 / t);
        }
        for w in weight_sets(kk, &mut rng) {
            // the largest shape (several row chunks) runs one k only, to keep debug builds quick
            let ks = if n * kk * kk > 100_000 {
                vec![kk.div_ceil(2)]
            } else {
                vec![1, kk.div_ceil(2), kk]
            };
            for k in ks {
                for (iters, minmax) in [(1, false), (5, true), (20, false)] {
                    let dense = MultiSinkhornParams {
                        eps: 0.2,
                        n_iters: iters,
                        slot_weights: w.clone(),
                        k,
                        normalize: if minmax {
                            Normalize::MinMax
                        } else {
                            Normalize::None
                        },
                        log_domain: LogDomain::Auto,
                        check_values: false,
                    };
                    let raw = MultiSinkhornParams {
                        normalize: Normalize::None,
                        ..dense.clone()
                    };
                    let mut want = Vec::new();
                    let mut want_raw = Vec::new();
                    for p in 0..b {
                        let (s, r) = (&s[p * n * kk..(p + 1) * n * kk], &r[p * kk..(p + 1) * kk]);
                        want.extend(dense_multi(s, r, n, &dense));
                        want_raw.extend(dense_multi(s, r, n, &raw));
                    }
                    for mode in [LogDomain::Off, LogDomain::On] {
                        let params = MultiSinkhornParams {
                            log_domain: mode,
                            ..dense.clone()
                        };
                        let mut out = vec![f64::NAN; b * n * kk];
                        multi_sinkhorn(&s, &r, &mut out, Dims::new(b, n, kk), &params).unwrap();
                        if minmax && w.iter().all(|&x| x == w[0]) {
                            // One group: T rows are constant in exact arithmetic, so the dense
                            // reference's min-max only amplifies rounding; the kernel keeps
                            // them exactly constant and returns the MinMaxScaler zeros.
                            assert!(
                                out.iter().all(|&x| x == 0.0),
                                "constant rows must give zeros"
                            );
                            continue;
                        }
                        // Min-max divides by the row range, which amplifies rounding by as much.
                        let mut err = 0.0f64;
                        for (row, (o, wv)) in
                            want_raw.chunks(kk).zip(out.chunks(kk).zip(want.chunks(kk)))
                        {
                            let range = if minmax {
                                let lo = row_min(row);
                                let hi = -row_min(&row.iter().map(|x| -x).collect::<Vec<_>>());
                                (hi - lo).min(1.0)
                            } else {
                                1.0
                            };
                            err = err.max(max_abs_diff(o, wv) * range);
                        }
                        assert!(
                            err < 1e-10,
                            "shape {:?} w {w:?} k {k} iters {iters} mode {mode:?}: err {err}",
                            (b, n, kk)
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn multi_sinkhorn_properties_f32_small_eps() {
    // Cosine-like scores with eps down to 1e-3 stay finite and keep the row marginals. (Entries
    // lie in [0, 1] only at convergence, which takes far more iterations at tiny eps.)
    let mut rng = Rng(5);
    let (n, kk, k) = (500, 16, 8);
    let s: Vec<f32> = rng
        .vec(n * kk, -1.0, 1.0)
        .into_iter()
        .map(|x| x as f32)
        .collect();
    let r = vec![n as f32 / kk as f32; kk];
    for eps in [1e-3, 0.07] {
        let params = MultiSinkhornParams {
            eps,
            n_iters: 200,
            slot_weights: (0..kk)
                .map(|m| if m < kk - k { 0.25 } else { 1.0 })
                .collect(),
            k,
            normalize: Normalize::None,
            log_domain: LogDomain::Auto,
            check_values: false,
        };
        let mut out = vec![0f32; n * kk];
        let log = multi_sinkhorn(&s, &r, &mut out, Dims::new(1, n, kk), &params).unwrap();
        assert_eq!(log, eps < 0.01);
        assert!(out
            .iter()
            .all(|x| x.is_finite() && *x >= 0.0 && *x <= k as f32 + 1e-4));
        for row in out.chunks(kk) {
            let rs: f32 = row.iter().sum();
            assert!((rs - k as f32).abs() < 1e-4 * k as f32, "row sum {rs}");
        }
    }
}

#[test]
fn multi_sinkhorn_constant_result_rows_min_max_to_zero() {
    // Scores that vary only between rows make every column alike, so each result row is
    // constant and its min-max is all zeros (not 0/0). Wide enough for the streaming path, and
    // K = 32 takes the single-sweep rows in f32 (two AVX-512 or four AVX2 vectors) and f64.
    fn check<T: Real>(kk: usize) {
        let n = 53;
        let s: Vec<T> = (0..n * kk)
            .map(|i| T::from_f64(((i / kk) as f64 * 0.37).sin()))
            .collect();
        let r = vec![T::from_f64(n as f64 / kk as f64); kk];
        let params = MultiSinkhornParams {
            eps: 0.07,
            n_iters: 5,
            slot_weights: (0..kk)
                .map(|m| if m < kk / 2 { 0.25 } else { 1.0 })
                .collect(),
            k: kk / 2,
            normalize: Normalize::MinMax,
            log_domain: LogDomain::Auto,
            check_values: false,
        };
        let mut out = vec![T::from_f64(f64::NAN); n * kk];
        multi_sinkhorn(&s, &r, &mut out, Dims::new(1, n, kk), &params).unwrap();
        assert!(
            out.iter().all(|x| *x == T::ZERO),
            "K={kk}: {:?}",
            &out[..kk]
        );
    }
    check::<f32>(32);
    check::<f32>(64);
    check::<f64>(32);
}

#[test]
fn plain_and_log_agree_near_switch_over() {
    let mut rng = Rng(9);
    let (n, kk) = (300, 12);
    let s = rng.vec(n * kk, -1.0, 1.0);
    let r = vec![n as f64 / kk as f64; kk];
    let w: Vec<f64> = (0..kk)
        .map(|m| if m < kk / 2 { 0.25 } else { 1.0 })
        .collect();
    // column ranges are just under 2, so R = 2/eps; put R just below the f32 limit of 50
    let eps = 2.0 / 49.0;
    let s32: Vec<f32> = s.iter().map(|&x| x as f32).collect();
    let r32: Vec<f32> = r.iter().map(|&x| x as f32).collect();
    let params = |mode| MultiSinkhornParams {
        eps,
        n_iters: 20,
        slot_weights: w.clone(),
        k: kk / 2,
        normalize: Normalize::MinMax,
        log_domain: mode,
        check_values: false,
    };
    let mut plain = vec![0f32; n * kk];
    let mut log = vec![0f32; n * kk];
    assert!(!multi_sinkhorn(
        &s32,
        &r32,
        &mut plain,
        Dims::new(1, n, kk),
        &params(LogDomain::Auto)
    )
    .unwrap());
    assert!(multi_sinkhorn(
        &s32,
        &r32,
        &mut log,
        Dims::new(1, n, kk),
        &params(LogDomain::On)
    )
    .unwrap());
    let d = plain
        .iter()
        .zip(&log)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(d < 2e-4, "plain vs log {d}");

    let c = vec![n as f64 / kk as f64; kk];
    let rr = vec![1.0f64; n];
    let c32: Vec<f32> = c.iter().map(|&x| x as f32).collect();
    let rr32: Vec<f32> = rr.iter().map(|&x| x as f32).collect();
    let mut plain = vec![0f32; n * kk];
    let mut log = vec![0f32; n * kk];
    assert!(!sinkhorn(
        &s32,
        &rr32,
        &c32,
        &mut plain,
        Dims::new(1, n, kk),
        &SinkhornParams::new(eps, 10, LogDomain::Auto)
    )
    .unwrap());
    assert!(sinkhorn(
        &s32,
        &rr32,
        &c32,
        &mut log,
        Dims::new(1, n, kk),
        &SinkhornParams::new(eps, 10, LogDomain::On)
    )
    .unwrap());
    let d = plain
        .iter()
        .zip(&log)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(d < 1e-5, "sinkhorn plain vs log {d}");
    // just above the limit, auto switches
    assert!(sinkhorn(
        &s32,
        &rr32,
        &c32,
        &mut log,
        Dims::new(1, n, kk),
        &SinkhornParams::new(2.0 / 52.0, 10, LogDomain::Auto)
    )
    .unwrap());
}

#[test]
fn f32_agrees_with_f64() {
    let mut rng = Rng(13);
    let (b, n, kk) = (2, 257, 64);
    let s = rng.vec(b * n * kk, -1.0, 1.0);
    let r = vec![n as f64 / kk as f64; b * kk];
    let s32: Vec<f32> = s.iter().map(|&x| x as f32).collect();
    let r32: Vec<f32> = r.iter().map(|&x| x as f32).collect();
    for mode in [LogDomain::Off, LogDomain::On] {
        let params = MultiSinkhornParams {
            eps: 0.07,
            n_iters: 20,
            slot_weights: (0..kk)
                .map(|m| if m < kk / 2 { 0.25 } else { 1.0 })
                .collect(),
            k: kk / 2,
            normalize: Normalize::MinMax,
            log_domain: mode,
            check_values: false,
        };
        let mut o64 = vec![0f64; b * n * kk];
        let mut o32 = vec![0f32; b * n * kk];
        multi_sinkhorn(&s, &r, &mut o64, Dims::new(b, n, kk), &params).unwrap();
        multi_sinkhorn(&s32, &r32, &mut o32, Dims::new(b, n, kk), &params).unwrap();
        let d = o64
            .iter()
            .zip(&o32)
            .map(|(a, b)| (a - *b as f64).abs())
            .fold(0.0, f64::max);
        assert!(d < 1e-4, "multi f32 vs f64 ({mode:?}): {d}");

        let rr = vec![1.0f64; b * n];
        let rr32 = vec![1.0f32; b * n];
        let mut o64 = vec![0f64; b * n * kk];
        let mut o32 = vec![0f32; b * n * kk];
        sinkhorn(
            &s,
            &rr,
            &r,
            &mut o64,
            Dims::new(b, n, kk),
            &SinkhornParams::new(0.05, 3, mode),
        )
        .unwrap();
        sinkhorn(
            &s32,
            &rr32,
            &r32,
            &mut o32,
            Dims::new(b, n, kk),
            &SinkhornParams::new(0.05, 3, mode),
        )
        .unwrap();
        let d = max_rel_diff(&o64, &o32.iter().map(|&x| x as f64).collect::<Vec<_>>());
        assert!(d < 1e-3, "sinkhorn f32 vs f64 ({mode:?}): {d}");
    }
}

#[test]
fn deterministic_across_thread_counts() {
    let mut rng = Rng(17);
    let (b, n, kk) = (3, 1000, 24);
    let s: Vec<f32> = rng
        .vec(b * n * kk, -1.0, 1.0)
        .into_iter()
        .map(|x| x as f32)
        .collect();
    let r = vec![n as f32 / kk as f32; b * kk];
    let rr = vec![1.0f32; b * n];
    let run = |threads: usize, log: LogDomain| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let params = MultiSinkhornParams {
                eps: 0.07,
                n_iters: 7,
                slot_weights: (0..kk).map(|m| [0.25, 1.0, 0.5][m % 3]).collect(),
                k: 10,
                normalize: Normalize::MinMax,
                log_domain: log,
                check_values: false,
            };
            let mut o = vec![0f32; b * n * kk];
            multi_sinkhorn(&s, &r, &mut o, Dims::new(b, n, kk), &params).unwrap();
            let mut o2 = vec![0f32; b * n * kk];
            sinkhorn(
                &s,
                &rr,
                &r,
                &mut o2,
                Dims::new(b, n, kk),
                &SinkhornParams::new(0.05, 3, log),
            )
            .unwrap();
            (o, o2)
        })
    };
    for log in [LogDomain::Off, LogDomain::On] {
        let one = run(1, log);
        for t in [2, 3, 5] {
            let other = run(t, log);
            assert!(
                one.0
                    .iter()
                    .zip(&other.0)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "multi differs at {t} threads"
            );
            assert!(
                one.1
                    .iter()
                    .zip(&other.1)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "sinkhorn differs at {t} threads"
            );
        }
    }
}

#[test]
fn similarity_matches_naive() {
    let mut rng = Rng(21);
    for &(bx, by, n, m, d) in &[
        (1, 1, 1, 1, 1),
        (2, 3, 5, 7, 3),
        (1, 2, 37, 70, 19),
        (2, 1, 9, 130, 64),
    ] {
        let x = rng.vec(bx * n * d, -1.0, 1.0);
        let mut y = rng.vec(by * m * d, -1.0, 1.0);
        y[..d].iter_mut().for_each(|v| *v = 0.0); // a zero row: the 1e-12 floor keeps it finite
        let xi: Vec<i64> = (0..(bx * by) as i64).map(|o| o % bx as i64).collect();
        let yi: Vec<i64> = (0..(bx * by) as i64).map(|o| o / bx as i64).collect();
        for normalize in [true, false] {
            let scale = 1.7;
            let mut out = vec![f64::NAN; xi.len() * n * m];
            let input = SimilarityInput {
                x: &x,
                y: &y,
                x_index: &xi,
                y_index: &yi,
            };
            let dims = SimilarityDims {
                x_problems: bx,
                x_rows: n,
                y_problems: by,
                y_rows: m,
                features: d,
            };
            let params = SimilarityParams {
                normalize,
                scale,
                check_finite: false,
            };
            similarity(input, &mut out, dims, &params).unwrap();
            let norm = |v: &[f64]| {
                if normalize {
                    v.iter().map(|a| a * a).sum::<f64>().sqrt().max(1e-12)
                } else {
                    1.0
                }
            };
            for o in 0..xi.len() {
                for i in 0..n {
                    let xr = &x[(xi[o] as usize * n + i) * d..][..d];
                    for j in 0..m {
                        let yr = &y[(yi[o] as usize * m + j) * d..][..d];
                        let want = scale * xr.iter().zip(yr).map(|(a, b)| a * b).sum::<f64>()
                            / norm(xr)
                            / norm(yr);
                        let got = out[(o * n + i) * m + j];
                        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
                    }
                }
            }
        }
    }
}

#[test]
fn similarity_backward_matches_naive() {
    // More x rows than one normalised block (256) and more y rows than one gy tile (32), with
    // every input problem shared by two output problems.
    let mut rng = Rng(23);
    let (bx, by, n, m, d) = (2, 2, 300, 45, 7);
    let x = rng.vec(bx * n * d, -1.0, 1.0);
    let y = rng.vec(by * m * d, -1.0, 1.0);
    let xi: Vec<i64> = vec![0, 1, 0, 1];
    let yi: Vec<i64> = vec![0, 0, 1, 1];
    let g = rng.vec(xi.len() * n * m, -1.0, 1.0);
    let scale = 1.3;
    for normalize in [true, false] {
        let norm = |v: &[f64]| {
            if normalize {
                v.iter().map(|a| a * a).sum::<f64>().sqrt()
            } else {
                1.0
            }
        };
        // d(a·b / (|a||b|)) / da = (b̂ − â ⟨â, b̂⟩) / |a| (just b without normalisation).
        let partial = |a: &[f64], b: &[f64]| -> Vec<f64> {
            let (na, nb) = (norm(a), norm(b));
            let c: f64 = a.iter().zip(b).map(|(p, q)| p * q).sum::<f64>() / (na * nb);
            (0..d)
                .map(|p| {
                    let (ah, bh) = (a[p] / na, b[p] / nb);
                    if normalize {
                        (bh - ah * c) / na
                    } else {
                        b[p]
                    }
                })
                .collect()
        };
        let (mut want_x, mut want_y) = (vec![0.0; bx * n * d], vec![0.0; by * m * d]);
        for o in 0..xi.len() {
            let (xb, yb) = (xi[o] as usize, yi[o] as usize);
            for i in 0..n {
                let xr = &x[(xb * n + i) * d..][..d];
                for j in 0..m {
                    let yr = &y[(yb * m + j) * d..][..d];
                    let go = scale * g[(o * n + i) * m + j];
                    for (p, v) in partial(xr, yr).into_iter().enumerate() {
                        want_x[(xb * n + i) * d + p] += go * v;
                    }
                    for (p, v) in partial(yr, xr).into_iter().enumerate() {
                        want_y[(yb * m + j) * d + p] += go * v;
                    }
                }
            }
        }
        let (mut gx, mut gy) = (vec![f64::NAN; bx * n * d], vec![f64::NAN; by * m * d]);
        let input = SimilarityInput {
            x: &x,
            y: &y,
            x_index: &xi,
            y_index: &yi,
        };
        let dims = SimilarityDims {
            x_problems: bx,
            x_rows: n,
            y_problems: by,
            y_rows: m,
            features: d,
        };
        let params = SimilarityParams {
            normalize,
            scale,
            check_finite: false,
        };
        similarity_backward(&g, input, &mut gx, &mut gy, dims, &params).unwrap();
        assert!(
            max_abs_diff(&gx, &want_x) < 1e-10,
            "gx, normalize={normalize}"
        );
        assert!(
            max_abs_diff(&gy, &want_y) < 1e-10,
            "gy, normalize={normalize}"
        );
    }
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let s = vec![0.0f64; 12];
    let mut out = vec![0.0f64; 12];
    let r = vec![1.0; 4];
    let c = vec![4.0 / 3.0; 3];
    let dims = Dims::new(1, 4, 3);
    let params = |eps, n_iters| SinkhornParams::new(eps, n_iters, LogDomain::Auto);
    assert!(sinkhorn(&s, &r, &c, &mut out, dims, &params(0.1, 3)).is_ok());
    let wrong_k = Dims::new(1, 4, 4);
    assert!(sinkhorn(&s, &r, &c, &mut out, wrong_k, &params(0.1, 3)).is_err());
    assert!(sinkhorn(&s, &r[..3], &c, &mut out, dims, &params(0.1, 3)).is_err());
    assert!(sinkhorn(&s, &r, &c, &mut out, dims, &params(0.0, 3)).is_err());
    assert!(sinkhorn(&s, &r, &c, &mut out, dims, &params(0.1, 0)).is_err());
    let am = vec![4.0 / 3.0; 3];
    let p = |k: usize, w: Vec<f64>| MultiSinkhornParams {
        eps: 0.1,
        n_iters: 3,
        slot_weights: w,
        k,
        normalize: Normalize::MinMax,
        log_domain: LogDomain::Auto,
        check_values: false,
    };
    assert!(multi_sinkhorn(&s, &am, &mut out, Dims::new(1, 4, 3), &p(2, vec![1.0; 3])).is_ok());
    assert!(multi_sinkhorn(&s, &am, &mut out, Dims::new(1, 4, 3), &p(0, vec![1.0; 3])).is_err());
    assert!(multi_sinkhorn(&s, &am, &mut out, Dims::new(1, 4, 3), &p(4, vec![1.0; 3])).is_err());
    assert!(multi_sinkhorn(&s, &am, &mut out, Dims::new(1, 4, 3), &p(1, vec![1.0; 2])).is_err());
    assert!(multi_sinkhorn(
        &s,
        &am,
        &mut out,
        Dims::new(1, 4, 3),
        &p(1, vec![1.0, -1.0, 1.0])
    )
    .is_err());
    assert!("sometimes".parse::<LogDomain>().is_err());
    assert!("zscore".parse::<Normalize>().is_err());
    let xi = [0i64];
    let bad = [1i64];
    let dims = SimilarityDims {
        x_problems: 1,
        x_rows: 3,
        y_problems: 1,
        y_rows: 3,
        features: 4,
    };
    let params = SimilarityParams {
        normalize: true,
        scale: 1.0,
        check_finite: false,
    };
    let pairs = |y_index| SimilarityInput {
        x: &s,
        y: &s,
        x_index: &xi,
        y_index,
    };
    assert!(similarity(pairs(&xi), &mut out[..9], dims, &params).is_ok());
    assert!(similarity(pairs(&bad), &mut out[..9], dims, &params).is_err());
    assert!(similarity(pairs(&[-1]), &mut out[..9], dims, &params).is_err());
    // empty problems are a no-op
    let mut empty: Vec<f64> = vec![];
    assert!(sinkhorn(
        &empty.clone(),
        &[],
        &c,
        &mut empty,
        Dims::new(1, 0, 3),
        &SinkhornParams::new(0.1, 3, LogDomain::Auto)
    )
    .is_ok());
    assert!(multi_sinkhorn(
        &empty.clone(),
        &am,
        &mut empty,
        Dims::new(1, 0, 3),
        &p(2, vec![1.0; 3])
    )
    .is_ok());
}

#[test]
fn multi_sinkhorn_log_rescue_matches_dense() {
    // eps small enough that, before the first row normalisation, whole slot rows underflow
    // (exp(-2/0.004) ~ 1e-217 relative, times further factors) and take the exact-LSE path,
    // yet the dense f64 reference still fits in the float range.
    let mut rng = Rng(23);
    let (n, kk, k) = (30, 6, 3);
    let mut s = rng.vec(n * kk, -1.0, 1.0);
    // a row far below all others in every column
    s[..kk].iter_mut().for_each(|x| *x = -1.0);
    s[kk..2 * kk].iter_mut().for_each(|x| *x = 1.0);
    let r = vec![n as f64 / kk as f64; kk];
    let w: Vec<f64> = (0..kk)
        .map(|m| if m < kk - k { 0.25 } else { 1.0 })
        .collect();
    for iters in [1, 3] {
        let params = MultiSinkhornParams {
            eps: 0.004,
            n_iters: iters,
            slot_weights: w.clone(),
            k,
            normalize: Normalize::None,
            log_domain: LogDomain::Auto,
            check_values: false,
        };
        let want = dense_multi(&s, &r, n, &params);
        let mut out = vec![0.0; n * kk];
        assert!(multi_sinkhorn(&s, &r, &mut out, Dims::new(1, n, kk), &params).unwrap());
        let err = max_abs_diff(&out, &want);
        assert!(err < 1e-9, "iters {iters}: err {err}");
    }
}

/// Central finite differences of `<g, f(s)>`, for checking the backward kernels.
fn fd_grad(s: &[f64], g: &[f64], f: impl Fn(&[f64]) -> Vec<f64>) -> Vec<f64> {
    let h = 1e-6;
    let mut x = s.to_vec();
    (0..s.len())
        .map(|i| {
            x[i] = s[i] + h;
            let up: f64 = f(&x).iter().zip(g).map(|(a, b)| a * b).sum();
            x[i] = s[i] - h;
            let dn: f64 = f(&x).iter().zip(g).map(|(a, b)| a * b).sum();
            x[i] = s[i];
            (up - dn) / (2.0 * h)
        })
        .collect()
}

fn assert_grad_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    let scale = want.iter().fold(1e-3f64, |m, x| m.max(x.abs()));
    let err = max_abs_diff(got, want) / scale;
    assert!(
        err < tol,
        "{what}: gradient rel err {err}\n got {got:?}\nwant {want:?}"
    );
}

#[test]
fn sinkhorn_backward_matches_finite_differences() {
    let mut rng = Rng(21);
    for &(b, n, k) in &[
        (1, 1, 1),
        (1, 1, 4),
        (2, 5, 1),
        (2, 5, 3),
        (1, 7, 6),
        (1, 40, 9),
    ] {
        let s = rng.vec(b * n * k, -1.0, 1.0);
        let g = rng.vec(b * n * k, -1.0, 1.0);
        let r = rng.vec(b * n, 0.5, 1.5);
        let mut c = rng.vec(b * k, 0.5, 1.5);
        for p in 0..b {
            let tr: f64 = r[p * n..(p + 1) * n].iter().sum();
            let tc: f64 = c[p * k..(p + 1) * k].iter().sum();
            c[p * k..(p + 1) * k].iter_mut().for_each(|x| *x *= tr / tc);
        }
        for iters in [1, 2, 5] {
            for mode in [LogDomain::Off, LogDomain::On] {
                let eps = 0.3;
                let fwd = |x: &[f64]| {
                    let mut o = vec![0.0; b * n * k];
                    sinkhorn(
                        x,
                        &r,
                        &c,
                        &mut o,
                        Dims::new(b, n, k),
                        &SinkhornParams::new(eps, iters, mode),
                    )
                    .unwrap();
                    o
                };
                let want = fd_grad(&s, &g, fwd);
                let mut got = vec![f64::NAN; b * n * k];
                sinkhorn_backward(
                    &g,
                    &s,
                    &r,
                    &c,
                    &mut got,
                    Dims::new(b, n, k),
                    &SinkhornParams::new(eps, iters, mode),
                )
                .unwrap();
                assert_grad_close(
                    &got,
                    &want,
                    1e-7,
                    &format!("{:?} {iters} {mode:?}", (b, n, k)),
                );
            }
        }
    }
}

#[test]
fn multi_sinkhorn_backward_matches_finite_differences() {
    let mut rng = Rng(23);
    for &(b, n, kk) in &[
        (1, 1, 1),
        (1, 1, 3),
        (2, 4, 2),
        (1, 5, 4),
        (2, 6, 5),
        (1, 30, 7),
    ] {
        let s = rng.vec(b * n * kk, -1.0, 1.0);
        let g = rng.vec(b * n * kk, -1.0, 1.0);
        let mut r = rng.vec(b * kk, 0.5, 1.5);
        for p in 0..b {
            let t: f64 = r[p * kk..(p + 1) * kk].iter().sum();
            r[p * kk..(p + 1) * kk]
                .iter_mut()
                .for_each(|x| *x *= n as f64 / t);
        }
        for w in weight_sets(kk, &mut rng) {
            for k in [1, kk.div_ceil(2), kk] {
                for (iters, minmax) in [(1, false), (3, true), (6, false), (6, true)] {
                    // With one sample or k = K, T is constant and its min-max is rounding noise.
                    if minmax && (n == 1 || k == kk) {
                        continue;
                    }
                    for mode in [LogDomain::Off, LogDomain::On] {
                        let params = MultiSinkhornParams {
                            eps: 0.3,
                            n_iters: iters,
                            slot_weights: w.clone(),
                            k,
                            normalize: if minmax {
                                Normalize::MinMax
                            } else {
                                Normalize::None
                            },
                            log_domain: mode,
                            check_values: false,
                        };
                        let fwd = |x: &[f64], p: &MultiSinkhornParams| {
                            let mut o = vec![0.0; b * n * kk];
                            multi_sinkhorn(x, &r, &mut o, Dims::new(b, n, kk), p).unwrap();
                            o
                        };
                        if minmax {
                            // Rows of T that are nearly constant (e.g. equal group sizes split
                            // evenly by k) make min-max ill-conditioned: skip those draws.
                            let raw = fwd(
                                &s,
                                &MultiSinkhornParams {
                                    normalize: Normalize::None,
                                    ..params.clone()
                                },
                            );
                            let flat = raw.chunks(kk).any(|row| {
                                let lo = row_min(row);
                                let hi = -row_min(&row.iter().map(|x| -x).collect::<Vec<_>>());
                                hi - lo < 0.05
                            });
                            if flat {
                                continue;
                            }
                        }
                        let want = fd_grad(&s, &g, |x| fwd(x, &params));
                        let mut got = vec![f64::NAN; b * n * kk];
                        multi_sinkhorn_backward(&g, &s, &r, &mut got, Dims::new(b, n, kk), &params)
                            .unwrap();
                        // Min-max divides by the row range, which amplifies the finite
                        // differences' rounding; autograd agreement to 1e-12 is tested in Python.
                        assert_grad_close(
                            &got,
                            &want,
                            if minmax { 1e-3 } else { 2e-5 },
                            &format!("{:?} w {w:?} k {k} {iters} {minmax} {mode:?}", (b, n, kk)),
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn backwards_report_non_finite_input_when_asked() {
    let not_finite = |name: &str| format!("argument '{name}' must be finite; found NaN or Inf");
    let (n, k) = (40, 30);
    let mut s = vec![0.1f64; n * k];
    s[7] = f64::NAN;
    let (r, c) = (vec![1.0; n], vec![n as f64 / k as f64; k]);
    let (g, mut out) = (vec![1.0; n * k], vec![0.0; n * k]);
    let dims = Dims::new(1, n, k);
    let unchecked = SinkhornParams::new(0.1, 2, LogDomain::Auto);
    assert!(sinkhorn_backward(&g, &s, &r, &c, &mut out, dims, &unchecked).is_ok());
    let checked = SinkhornParams {
        check_finite: true,
        ..unchecked
    };
    let err = sinkhorn_backward(&g, &s, &r, &c, &mut out, dims, &checked).unwrap_err();
    assert_eq!(err.to_string(), not_finite("scores"));

    let (x, y) = (vec![1.0f64; 2 * 3], vec![f64::INFINITY; 2 * 3]);
    let input = SimilarityInput {
        x: &x,
        y: &y,
        x_index: &[0],
        y_index: &[0],
    };
    let dims = SimilarityDims {
        x_problems: 1,
        x_rows: 2,
        y_problems: 1,
        y_rows: 2,
        features: 3,
    };
    let (grad, mut gx, mut gy) = (vec![1.0; 4], vec![0.0; 6], vec![0.0; 6]);
    let params = SimilarityParams {
        normalize: false,
        scale: 1.0,
        check_finite: false,
    };
    assert!(similarity_backward(&grad, input, &mut gx, &mut gy, dims, &params).is_ok());
    let checked = SimilarityParams {
        check_finite: true,
        ..params
    };
    let err = similarity_backward(&grad, input, &mut gx, &mut gy, dims, &checked).unwrap_err();
    assert_eq!(err.to_string(), not_finite("y"));
}
