//! `interrupt::watch`: setting the flag from another thread stops a call of a billion
//! iterations with `MmotError::Interrupted`, on every iterative path, and the next call (same
//! thread pool, same kept workspaces) gives the result of an undisturbed one; `similarity` and
//! `info_nce` (forward and backward) stop the same way. (`anchor_consistency_loss` is one
//! elementwise pass and is not polled.)

use mmot_core::interrupt::watch;
use mmot_core::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// Runs `call(n_iters)` with a huge `n_iters` and the flag set after 100 ms: it must stop with
/// `Interrupted` within a second. Then `call(5)` must equal the same call made before.
fn stops<F: Fn(usize) -> Result<Vec<f32>> + Sync>(what: &str, call: F) {
    let before = call(5).unwrap();
    let flag = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let got = thread::scope(|s| {
        s.spawn(|| {
            thread::sleep(Duration::from_millis(100));
            flag.store(true, Ordering::Relaxed);
        });
        watch(&flag, || call(1_000_000_000))
    });
    let took = start.elapsed();
    assert_eq!(got.unwrap_err(), MmotError::Interrupted, "{what}");
    assert!(
        took < Duration::from_secs(1),
        "{what}: stopped after {took:?}"
    );
    assert_eq!(
        call(5).unwrap(),
        before,
        "{what}: the call after the interrupt differs"
    );
}

/// Stops its call before the first iteration (a backward records every iteration, so it
/// cannot be given a billion).
fn stops_at_once<F: Fn() -> Result<Vec<f32>>>(what: &str, call: F) {
    let before = call().unwrap();
    let flag = Arc::new(AtomicBool::new(true));
    assert_eq!(
        watch(&flag, &call).unwrap_err(),
        MmotError::Interrupted,
        "{what}"
    );
    assert_eq!(
        call().unwrap(),
        before,
        "{what}: the call after the interrupt differs"
    );
}

fn scores(len: usize) -> Vec<f32> {
    // Deterministic and varied: no two rows or columns alike.
    (0..len)
        .map(|i| ((i * 7919) % 997) as f32 / 997.0)
        .collect()
}

fn sinkhorn_run(dims: Dims, n_iters: usize, log_domain: LogDomain) -> Result<Vec<f32>> {
    let s = scores(dims.len());
    let (r, c) = (
        vec![1.0; dims.problems * dims.rows],
        vec![dims.rows as f32 / dims.cols as f32; dims.problems * dims.cols],
    );
    let mut out = vec![0.0; dims.len()];
    let params = SinkhornParams::new(0.05, n_iters, log_domain);
    sinkhorn(&s, &r, &c, &mut out, dims, &params)?;
    Ok(out)
}

fn multi_params(kk: usize, n_iters: usize) -> MultiSinkhornParams {
    let mut slot_weights = vec![0.25; kk];
    slot_weights[kk / 2..].fill(1.0);
    MultiSinkhornParams {
        eps: 0.05,
        n_iters,
        slot_weights,
        k: kk / 2,
        normalize: Normalize::MinMax,
        log_domain: LogDomain::Auto,
        check_values: false,
    }
}

fn multi_run(dims: Dims, n_iters: usize) -> Result<Vec<f32>> {
    let s = scores(dims.len());
    let mass = vec![dims.rows as f32 / dims.cols as f32; dims.problems * dims.cols];
    let mut out = vec![0.0; dims.len()];
    multi_sinkhorn(&s, &mass, &mut out, dims, &multi_params(dims.cols, n_iters))?;
    Ok(out)
}

#[test]
fn the_flag_stops_sinkhorn_and_multi_sinkhorn() {
    let (streaming, small) = (Dims::new(2, 64, 32), Dims::new(40, 8, 8));
    for mode in [LogDomain::Off, LogDomain::On] {
        stops(&format!("sinkhorn {mode:?}"), |it| {
            sinkhorn_run(streaming, it, mode)
        });
        stops(&format!("sinkhorn small {mode:?}"), |it| {
            sinkhorn_run(small, it, mode)
        });
    }
    stops("multi_sinkhorn", |it| multi_run(streaming, it));
    stops("multi_sinkhorn small", |it| multi_run(small, it));
}

#[test]
fn the_flag_stops_the_backwards() {
    let dims = Dims::new(2, 64, 32);
    let (s, g) = (scores(dims.len()), scores(dims.len()));
    let (r, c) = (vec![1.0; 2 * 64], vec![2.0; 2 * 32]);
    for mode in [LogDomain::Off, LogDomain::On] {
        stops_at_once(&format!("sinkhorn_backward {mode:?}"), || {
            let mut out = vec![0.0; dims.len()];
            let params = SinkhornParams::new(0.05, 20, mode);
            sinkhorn_backward(&g, &s, &r, &c, &mut out, dims, &params)?;
            Ok(out)
        });
    }
    stops_at_once("multi_sinkhorn_backward", || {
        let mut out = vec![0.0; dims.len()];
        let mass = vec![2.0; 2 * 32];
        multi_sinkhorn_backward(&g, &s, &mass, &mut out, dims, &multi_params(32, 20))?;
        Ok(out)
    });
}

fn features(rows: usize, d: usize, salt: usize) -> Vec<f32> {
    (0..rows * d)
        .map(|i| (((i + salt) * 7919) % 997) as f32 / 997.0 - 0.5)
        .collect()
}

fn info_nce_params() -> InfoNceParams {
    InfoNceParams {
        temperature: 0.07,
        symmetric: true,
        normalize: true,
        check_finite: false,
    }
}

/// Forward (the loss) or backward (the gradient for `a`) of a symmetric InfoNCE.
fn info_nce_run(n: usize, d: usize, backward: bool) -> Result<Vec<f32>> {
    let (a, b, valid) = (features(n, d, 0), features(n, d, 13), vec![1.0; n]);
    let input = InfoNceInput {
        a: &a,
        b: &b,
        valid: &valid,
        rows: n,
        features: d,
    };
    let (mut loss, mut la, mut lb) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    info_nce_forward(input, &mut loss, &mut la, &mut lb, &info_nce_params())?;
    if !backward {
        return Ok(loss);
    }
    let (mut ga, mut gb) = (vec![0.0; n * d], vec![0.0; n * d]);
    let grad = vec![1.0; n];
    info_nce_backward(&grad, input, &la, &lb, &mut ga, &mut gb, &info_nce_params())?;
    Ok(ga)
}

fn similarity_run(n: usize, m: usize, d: usize, backward: bool) -> Result<Vec<f32>> {
    let (x, y) = (features(n, d, 0), features(m, d, 7));
    let input = SimilarityInput {
        x: &x,
        y: &y,
        x_index: &[0],
        y_index: &[0],
    };
    let dims = SimilarityDims {
        x_problems: 1,
        x_rows: n,
        y_problems: 1,
        y_rows: m,
        features: d,
    };
    let params = SimilarityParams {
        normalize: true,
        scale: 2.0,
        check_finite: false,
    };
    let mut out = vec![0.0; n * m];
    similarity(input, &mut out, dims, &params)?;
    if !backward {
        return Ok(out);
    }
    let (mut gx, mut gy) = (vec![0.0; n * d], vec![0.0; m * d]);
    similarity_backward(&out, input, &mut gx, &mut gy, dims, &params)?;
    gx.extend(gy);
    Ok(gx)
}

#[test]
fn the_flag_stops_similarity_and_info_nce() {
    for backward in [false, true] {
        stops_at_once(&format!("similarity backward={backward}"), || {
            similarity_run(300, 200, 33, backward)
        });
        stops_at_once(&format!("info_nce backward={backward}"), || {
            info_nce_run(300, 33, backward)
        });
    }
}

/// An InfoNCE forward of 200 000 pairs (minutes of work) stops within a second of the flag.
#[test]
fn the_flag_stops_a_long_info_nce_promptly() {
    let flag = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let got = thread::scope(|s| {
        s.spawn(|| {
            thread::sleep(Duration::from_millis(100));
            flag.store(true, Ordering::Relaxed);
        });
        watch(&flag, || info_nce_run(200_000, 64, false))
    });
    let took = start.elapsed();
    assert_eq!(got.unwrap_err(), MmotError::Interrupted);
    assert!(took < Duration::from_secs(1), "stopped after {took:?}");
}
