use super::*;
use crate::dims::Dims;

/// A small deterministic pseudo-random sequence in [-1, 1).
fn noise(len: usize, seed: u64) -> Vec<f64> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect()
}

/// A converged balanced plan of an `n × k` problem (uniform masses), by plain Sinkhorn.
fn converged_plan(s: &[f64], n: usize, k: usize, eps: f64) -> Vec<f64> {
    let e: Vec<f64> = s.iter().map(|x| (x / eps).exp()).collect();
    let (mut u, mut v) = (vec![1.0; n], vec![1.0; k]);
    let (r, c) = (1.0 / n as f64, 1.0 / k as f64);
    for _ in 0..2000 {
        for j in 0..k {
            v[j] = c / (0..n).map(|i| e[i * k + j] * u[i]).sum::<f64>();
        }
        for i in 0..n {
            u[i] = r / (0..k).map(|j| e[i * k + j] * v[j]).sum::<f64>();
        }
    }
    (0..n * k).map(|x| u[x / k] * e[x] * v[x % k]).collect()
}

#[test]
fn balanced_gradient_is_blind_to_row_and_column_shifts_and_padding() {
    let (n, k, eps) = (9, 6, 0.4);
    let s = noise(n * k, 3);
    let plan = converged_plan(&s, n, k, eps);
    let g = noise(n * k, 7);
    // Problem 0 unpadded in a [2, 11, 8] batch whose padding is NaN; problem 1 is a copy of
    // problem 0 with NaN padding too.
    let (np, kp) = (11, 8);
    let mut pp = vec![f64::NAN; 2 * np * kp];
    let mut gp = vec![f64::NAN; 2 * np * kp];
    for b in 0..2 {
        for i in 0..n {
            for j in 0..k {
                pp[(b * np + i) * kp + j] = plan[i * k + j];
                gp[(b * np + i) * kp + j] = g[i * k + j];
            }
        }
    }
    let mut out = vec![f64::NAN; 2 * np * kp];
    let mut iters = vec![0i64; 2];
    sinkhorn_implicit_backward(
        &gp,
        &pp,
        &[n as i64; 2],
        &[k as i64; 2],
        &mut out,
        &mut iters,
        Dims::new(2, np, kp),
        eps,
        f64::INFINITY,
    )
    .unwrap();
    assert!(iters[0] > 0 && iters[0] < 100, "{iters:?}");
    assert_eq!(out[..np * kp], out[np * kp..]);
    let scale = out.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    assert!(scale > 1e-3);
    for i in 0..np {
        let row: f64 = out[i * kp..(i + 1) * kp].iter().sum();
        assert!(row.abs() < 1e-7 * scale, "row {i}: {row}");
        if i >= n {
            assert!(out[i * kp..(i + 1) * kp].iter().all(|&x| x == 0.0));
        }
    }
    for j in 0..kp {
        let col: f64 = (0..np).map(|i| out[i * kp + j]).sum();
        assert!(col.abs() < 1e-7 * scale, "col {j}: {col}");
        if j >= k {
            assert!((0..np).all(|i| out[i * kp + j] == 0.0));
        }
    }
}

#[test]
fn counts_are_checked() {
    let mut out = vec![0.0f64; 4];
    let mut iters = vec![0i64; 1];
    let err = sinkhorn_implicit_backward(
        &[0.0; 4],
        &[0.25; 4],
        &[3],
        &[2],
        &mut out,
        &mut iters,
        Dims::new(1, 2, 2),
        0.1,
        f64::INFINITY,
    );
    assert!(err.is_err());
}
