//! Probe of the SwAV-size and tiny-batch Sinkhorn kernels (no Python):
//! `THREADS=2 cargo run --release --example sk_probe -p mmot-core`. The tiny batches run
//! with uniform scores in [-1, 1] (plain domain at eps = 0.05) and with standard normal
//! scores (column ranges beyond 50 eps: the log domain).
use mmot_core::*;
use std::time::Instant;

fn main() {
    let threads: usize = std::env::var("THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let mut x = 0x1234_5678_9abc_def0u64;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 11) as f64 / (1u64 << 53) as f64
    };
    let time = |f: &mut dyn FnMut(), reps: usize| {
        f();
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e3
            })
            .fold(f64::INFINITY, f64::min)
    };
    let iters: usize = std::env::var("ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let (b, kp) = (4096usize, 3000usize);
    let s2: Vec<f32> = (0..b * kp)
        .map(|_| (rnd() * 2.0 - 1.0) as f32 * 0.5)
        .collect();
    let rr = vec![1f32; b];
    let cc = vec![b as f32 / kp as f32; kp];
    let mut o2 = vec![0f32; b * kp];
    let mut o3 = vec![0f32; b * kp];
    let mut small = Vec::new();
    for &d in &[16usize, 4] {
        let nb = 65536usize;
        let s: Vec<f32> = (0..nb * d * d)
            .map(|_| (rnd() * 2.0 - 1.0) as f32)
            .collect();
        // Box-Muller from pairs of uniforms.
        let normal: Vec<f32> = (0..nb * d * d)
            .map(|_| {
                let (a, b) = (rnd().max(1e-300), rnd());
                ((-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()) as f32
            })
            .collect();
        small.push((d, nb, s, normal));
    }
    pool.install(|| {
        println!("simd level {:?}, {threads} thread(s)", simd::level());
        let t = time(
            &mut || {
                o3.copy_from_slice(&s2);
            },
            10,
        );
        println!("copy 49 MB: {t:.2} ms");
        let t = time(
            &mut || {
                sinkhorn(&s2, &rr, &cc, &mut o2, 1, b, kp, 0.05, 3, LogDomain::Auto).unwrap();
            },
            10,
        );
        println!("sinkhorn B={b} K={kp} fwd: {t:.2} ms");
        for (d, nb, s, normal) in &small {
            let (d, nb) = (*d, *nb);
            let r = vec![1f32; nb * d];
            let c = vec![1f32; nb * d];
            let mut o = vec![0f32; nb * d * d];
            for (scores, what) in [(s, "uniform"), (normal, "normal")] {
                let mut log = false;
                let t = time(
                    &mut || {
                        log = sinkhorn(
                            scores,
                            &r,
                            &c,
                            &mut o,
                            nb,
                            d,
                            d,
                            0.05,
                            iters,
                            LogDomain::Auto,
                        )
                        .unwrap();
                    },
                    5,
                );
                let domain = if log { "log" } else { "plain" };
                println!("sinkhorn {nb}x({d}x{d}) {iters} it, {what} ({domain}): {t:.2} ms");
            }
            let params = MultiSinkhornParams {
                eps: 0.1,
                n_iters: iters,
                slot_weights: (0..d).map(|m| if m < d / 2 { 0.25 } else { 1.0 }).collect(),
                k: d / 2,
                normalize: Normalize::MinMax,
                log_domain: LogDomain::Auto,
                check_values: false,
            };
            let t = time(
                &mut || {
                    multi_sinkhorn(s, &r, &mut o, Dims::new(nb, d, d), &params).unwrap();
                },
                3,
            );
            println!("multi_sinkhorn {nb}x({d}x{d}) {iters} it: {t:.2} ms");
        }
    });
}
