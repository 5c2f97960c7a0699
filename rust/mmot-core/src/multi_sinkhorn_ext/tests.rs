//! Unit checks of the kernel on its own (the Python tests compare it with naive forms).

use super::*;

fn params(n_iters: usize, tol: f64) -> MultiSinkhornExtParams {
    MultiSinkhornExtParams {
        weights: vec![0.25, 1.0],
        eps: 0.1,
        decay: 0.5,
        n_iters,
        tol,
        normalize: Normalize::MinMax,
        log_domain: LogDomain::Auto,
    }
}

#[test]
fn marginals_hold_and_padding_is_zero() {
    let (b, nn, kk, gg) = (2, 5, 4, 2);
    let scores: Vec<f64> = (0..b * nn * kk)
        .map(|i| ((i * 37 % 11) as f64) / 11.0)
        .collect();
    let input = MultiSinkhornExtInput {
        scores: &scores,
        row_counts: &[5, 3],
        col_counts: &[4, 2],
        counts: &[2.0, 2.0, 1.0, 1.0],
        tops: &[0.0, 2.0, 0.0, 1.0],
        eps_start: &[1.0, 0.1],
    };
    let mut target = vec![f64::NAN; b * nn * kk];
    let mut gam = vec![f64::NAN; b * nn * kk];
    let mut f = vec![f64::NAN; b * gg * kk];
    let mut h = vec![f64::NAN; b * gg * nn];
    let mut iters = vec![0i64; b];
    let mut err = vec![f64::NAN; b];
    let out = MultiSinkhornExtOutput {
        target: &mut target,
        f: &mut f,
        gam: &mut gam,
        h: &mut h,
        iters: &mut iters,
        err: &mut err,
    };
    let dims = ExtDims {
        problems: b,
        rows: nn,
        cols: kk,
        groups: gg,
    };
    multi_sinkhorn_ext_forward(input, out, dims, &params(300, 1e-9)).unwrap();
    assert!(iters.iter().all(|&t| t > 1 && t < 300), "{iters:?}");
    assert!(err.iter().all(|&e| e <= 1e-9), "{err:?}");
    // Problem 1: rows 3.., columns 2.. are padding.
    for i in 0..nn {
        for a in 0..kk {
            let at = nn * kk + i * kk + a;
            if i >= 3 || a >= 2 {
                assert_eq!(target[at], 0.0);
                assert_eq!(gam[at], 0.0);
            } else {
                assert!(target[at].is_finite());
            }
        }
    }
}
