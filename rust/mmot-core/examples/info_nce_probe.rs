//! Timing probe for the fused info_nce kernel: `cargo run --release --example info_nce_probe -p mmot-core [N] [D]`.
use mmot_core::info_nce::{info_nce_backward, info_nce_forward, InfoNceParams};
use std::time::Instant;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().unwrap())
        .collect();
    let n = *args.first().unwrap_or(&4096);
    let d = *args.get(1).unwrap_or(&256);
    let mut seed = 1u64;
    let mut rnd = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    let a: Vec<f32> = (0..n * d).map(|_| rnd()).collect();
    let b: Vec<f32> = (0..n * d).map(|_| rnd()).collect();
    let w = vec![1.0f32; n];
    let g = vec![1.0f32 / n as f32; n];
    let p = InfoNceParams {
        temperature: 0.05,
        symmetric: true,
        normalize: true,
    };
    let (mut loss, mut la, mut lb) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    let (mut ga, mut gb) = (vec![0.0; n * d], vec![0.0; n * d]);
    if std::env::var("GEMM_ONLY").is_ok() {
        gemm_only(n, d, &a, &b);
        gemm_only(n, d, &a, &b);
        return;
    }
    for _ in 0..2 {
        let t = Instant::now();
        info_nce_forward(&a, &b, &w, n, d, &p, &mut loss, &mut la, &mut lb).unwrap();
        let f = t.elapsed().as_secs_f64();
        let t = Instant::now();
        info_nce_backward(&g, &a, &b, &w, &la, &lb, n, d, &p, &mut ga, &mut gb).unwrap();
        let bw = t.elapsed().as_secs_f64();
        let gf = 2.0 * (n * n * d) as f64 / 1e9;
        println!("N={n} D={d}: forward {f:.3} s ({:.1} GFLOP/s), backward {bw:.3} s ({:.1} GFLOP/s), loss {}", gf / f, 4.0 * gf / bw, loss.iter().sum::<f32>() / n as f32);
    }
}

#[allow(dead_code)]
fn gemm_only(n: usize, d: usize, a: &[f32], b: &[f32]) {
    use rayon::prelude::*;
    let t = Instant::now();
    (0..n / 256).into_par_iter().for_each(|bi| {
        let mut tile = vec![0f32; 256 * 256];
        for bj in 0..n / 256 {
            unsafe {
                matrixmultiply::sgemm(
                    256,
                    d,
                    256,
                    1.0,
                    a[bi * 256 * d..].as_ptr(),
                    d as isize,
                    1,
                    b[bj * 256 * d..].as_ptr(),
                    1,
                    d as isize,
                    0.0,
                    tile.as_mut_ptr(),
                    256,
                    1,
                );
            }
        }
    });
    let e = t.elapsed().as_secs_f64();
    println!(
        "tiled sgemm only: {e:.3} s, {:.1} GFLOP/s",
        2.0 * (n * n * d) as f64 / 1e9 / e
    );
}
