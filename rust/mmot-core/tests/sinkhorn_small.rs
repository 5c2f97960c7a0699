//! The small-problem path of `sinkhorn` (batches of problems of at most 1024 elements, solved
//! 16 (f32) or 8 (f64) problems at a time): against a naive dense f64 Sinkhorn on ragged batch
//! sizes and odd shapes, and its batch-level guarantees (lanes never mix, thread counts do
//! not matter, the speculative plain-domain start falls back to the log domain exactly).

mod common;

use common::{dense_sinkhorn, Rng};
use mmot_core::*;

/// A batch of `[n, k]` problems: scores, positive row masses and column masses with the same
/// total per problem.
struct Batch {
    b: usize,
    n: usize,
    k: usize,
    s: Vec<f64>,
    r: Vec<f64>,
    c: Vec<f64>,
}

impl Batch {
    fn random(rng: &mut Rng, b: usize, n: usize, k: usize, spread: f64) -> Self {
        let s = rng.vec(b * n * k, -spread, spread);
        let r = rng.vec(b * n, 0.5, 1.5);
        let mut c = rng.vec(b * k, 0.5, 1.5);
        for p in 0..b {
            let tr: f64 = r[p * n..(p + 1) * n].iter().sum();
            let tc: f64 = c[p * k..(p + 1) * k].iter().sum();
            c[p * k..(p + 1) * k].iter_mut().for_each(|x| *x *= tr / tc);
        }
        Batch { b, n, k, s, r, c }
    }

    fn run<T: Real>(&self, eps: f64, iters: usize, mode: LogDomain) -> (Vec<T>, bool) {
        let cast = |v: &[f64]| v.iter().map(|&x| T::from_f64(x)).collect::<Vec<T>>();
        let (s, r, c) = (cast(&self.s), cast(&self.r), cast(&self.c));
        let (b, n, k) = (self.b, self.n, self.k);
        let mut out = vec![T::from_f64(f64::NAN); b * n * k];
        let log = sinkhorn(
            &s,
            &r,
            &c,
            &mut out,
            Dims::new(b, n, k),
            &SinkhornParams::new(eps, iters, mode),
        )
        .unwrap();
        (out, log)
    }

    /// The naive dense Sinkhorn of every problem, in f64.
    fn dense(&self, eps: f64, iters: usize) -> Vec<f64> {
        let (n, k) = (self.n, self.k);
        let mut out = Vec::with_capacity(self.s.len());
        for p in 0..self.b {
            let s = &self.s[p * n * k..(p + 1) * n * k];
            let (r, c) = (&self.r[p * n..(p + 1) * n], &self.c[p * k..(p + 1) * k]);
            out.extend(dense_sinkhorn(s, r, c, n, k, eps, iters));
        }
        out
    }
}

/// Largest difference relative to the largest entry of `want` (the plans' entries span many
/// orders of magnitude; their errors scale with the row masses).
fn max_err<T: Real>(got: &[T], want: &[f64]) -> f64 {
    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    got.iter()
        .zip(want)
        .map(|(g, w)| (g.to_f64() - w).abs() / scale)
        .fold(0.0, f64::max)
}

fn bits<T: Real>(x: &[T]) -> Vec<u64> {
    x.iter().map(|v| v.to_f64().to_bits()).collect()
}

const SHAPES: &[(usize, usize)] = &[
    (1, 1),
    (1, 7),
    (7, 1),
    (3, 5),
    (4, 4),
    (5, 3),
    (16, 16),
    (9, 31),
    (32, 32),
    (2, 512),
];

#[test]
fn small_path_matches_dense_on_ragged_batches() {
    let mut rng = Rng(23);
    for &(n, k) in SHAPES {
        for b in [1, 15, 17, 33] {
            let batch = Batch::random(&mut rng, b, n, k, 1.0);
            let eps = 0.1;
            for iters in [1, 4] {
                let want = batch.dense(eps, iters);
                for mode in [LogDomain::Off, LogDomain::On, LogDomain::Auto] {
                    let (o64, log) = batch.run::<f64>(eps, iters, mode);
                    assert_eq!(log, mode == LogDomain::On, "{mode:?}");
                    let e64 = max_err(&o64, &want);
                    let (o32, _) = batch.run::<f32>(eps, iters, mode);
                    let e32 = max_err(&o32, &want);
                    let what = format!("b={b} [{n}, {k}] iters={iters} {mode:?}");
                    assert!(e64 < 1e-12, "f64 {what}: {e64}");
                    assert!(e32 < 5e-6, "f32 {what}: {e32}");
                }
            }
        }
    }
}

#[test]
fn small_path_rows_exact_in_log_domain_at_tiny_eps() {
    // Column ranges of ~2 at eps = 1e-3: far beyond the plain domain in either precision.
    let mut rng = Rng(29);
    let batch = Batch::random(&mut rng, 21, 6, 10, 1.0);
    let (out, log) = batch.run::<f32>(1e-3, 30, LogDomain::Auto);
    assert!(log);
    for (p, prob) in out.chunks(6 * 10).enumerate() {
        for (i, row) in prob.chunks(10).enumerate() {
            assert!(row.iter().all(|x| x.is_finite() && *x >= 0.0));
            let rs: f32 = row.iter().sum();
            let want = batch.r[p * 6 + i] as f32;
            assert!((rs - want).abs() < 1e-5 * want, "row sum {rs} vs {want}");
        }
    }
}

#[test]
fn small_path_problems_do_not_mix() {
    // Each problem's plan is the same alone as anywhere in a batch (lanes never mix, padded
    // lanes are dropped).
    let mut rng = Rng(31);
    for (n, k) in [(3, 5), (16, 16)] {
        let batch = Batch::random(&mut rng, 35, n, k, 1.0);
        for mode in [LogDomain::Off, LogDomain::On] {
            let (all32, _) = batch.run::<f32>(0.1, 5, mode);
            let (all64, _) = batch.run::<f64>(0.1, 5, mode);
            for p in [0, 16, 34] {
                let one = Batch {
                    b: 1,
                    n,
                    k,
                    s: batch.s[p * n * k..(p + 1) * n * k].to_vec(),
                    r: batch.r[p * n..(p + 1) * n].to_vec(),
                    c: batch.c[p * k..(p + 1) * k].to_vec(),
                };
                let span = p * n * k..(p + 1) * n * k;
                assert_eq!(
                    bits(&one.run::<f32>(0.1, 5, mode).0),
                    bits(&all32[span.clone()])
                );
                assert_eq!(bits(&one.run::<f64>(0.1, 5, mode).0), bits(&all64[span]));
            }
        }
    }
}

#[test]
fn small_path_deterministic_across_thread_counts() {
    let mut rng = Rng(37);
    let batch = Batch::random(&mut rng, 1001, 4, 4, 1.0);
    let run = |threads: usize, mode: LogDomain| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| bits(&batch.run::<f32>(0.05, 7, mode).0))
    };
    for mode in [LogDomain::Off, LogDomain::On] {
        let one = run(1, mode);
        for t in [2, 3, 5] {
            assert_eq!(one, run(t, mode), "{mode:?} at {t} threads");
        }
    }
}

#[test]
fn auto_starts_plain_and_falls_back_to_log_exactly() {
    // Enough problems for many tasks; the column range of one problem (the first, the
    // middle or the last) puts the whole batch in the log domain.
    let mut rng = Rng(41);
    let (eps, iters) = (0.05, 6);
    for wide in [None, Some(0), Some(700), Some(1399)] {
        let mut batch = Batch::random(&mut rng, 1400, 16, 16, 1.0);
        if let Some(p) = wide {
            batch.s[p * 256] = 4.0;
        }
        let (auto, log) = batch.run::<f32>(eps, iters, LogDomain::Auto);
        assert_eq!(log, wide.is_some(), "{wide:?}");
        let forced = if log { LogDomain::On } else { LogDomain::Off };
        assert_eq!(bits(&auto), bits(&batch.run::<f32>(eps, iters, forced).0));
    }
}

#[test]
fn small_path_non_finite_scores() {
    for (p, bad) in [(0, f32::NAN), (40, f32::INFINITY), (99, f32::NEG_INFINITY)] {
        let (b, n, k) = (100, 3, 4);
        let mut s = vec![0.25f32; b * n * k];
        s[p * n * k + 5] = bad;
        let (r, c) = (vec![1.0f32; b * n], vec![0.75f32; b * k]);
        let mut out = vec![0.0f32; b * n * k];
        for mode in [LogDomain::Auto, LogDomain::On, LogDomain::Off] {
            let err = sinkhorn(
                &s,
                &r,
                &c,
                &mut out,
                Dims::new(b, n, k),
                &SinkhornParams {
                    check_finite: true,
                    ..SinkhornParams::new(0.1, 3, mode)
                },
            );
            let msg = err.unwrap_err().to_string();
            assert!(msg.contains("'scores' must be finite"), "{msg}");
        }
        // Unchecked, a non-finite input goes to the log domain under Auto (no panic).
        let log = sinkhorn(
            &s,
            &r,
            &c,
            &mut out,
            Dims::new(b, n, k),
            &SinkhornParams {
                check_finite: false,
                ..SinkhornParams::new(0.1, 3, LogDomain::Auto)
            },
        );
        assert!(log.unwrap());
        assert!(out[..p * n * k].iter().all(|x| x.is_finite()));
    }
}
