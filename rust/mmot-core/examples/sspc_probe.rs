//! Single-process probe of the kernels at the reference sizes (no Python):
//! `MMOT_SIMD=generic|avx2|avx512 cargo run --release --example sspc_probe -p mmot-core`.
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
    let (n, kk, k) = (7660usize, 64usize, 32usize);
    let mut x = 0x1234_5678_9abc_def0u64;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 11) as f64 / (1u64 << 53) as f64
    };
    let s: Vec<f32> = (0..n * kk)
        .map(|_| (rnd() * 2.0 - 1.0) as f32 * 0.5)
        .collect();
    let r = vec![n as f32 / kk as f32; kk];
    let params = MultiSinkhornParams {
        eps: 0.07,
        n_iters: 20,
        slot_weights: (0..kk)
            .map(|m| if m < kk - k { 0.25 } else { 1.0 })
            .collect(),
        k,
        normalize: Normalize::MinMax,
        log_domain: LogDomain::Auto,
    };
    let mut out = vec![0f32; n * kk];
    let g: Vec<f32> = (0..n * kk).map(|_| rnd() as f32 - 0.5).collect();
    let mut gout = vec![0f32; n * kk];
    let time = |f: &mut dyn FnMut()| {
        f();
        (0..15)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e3
            })
            .fold(f64::INFINITY, f64::min)
    };
    pool.install(|| {
        println!("simd level {:?}, {threads} thread(s)", simd::level());
        let t = time(&mut || {
            multi_sinkhorn(&s, &r, &mut out, 1, n, kk, &params).unwrap();
        });
        println!("multi_sinkhorn N={n} K={kk} fwd: {t:.2} ms");
        let t = time(&mut || {
            multi_sinkhorn_backward(&g, &s, &r, &mut gout, 1, n, kk, &params).unwrap();
        });
        println!("multi_sinkhorn bwd: {t:.2} ms");
        let (b, kp) = (4096usize, 3000usize);
        let s2: Vec<f32> = (0..b * kp)
            .map(|_| (rnd() * 2.0 - 1.0) as f32 * 0.5)
            .collect();
        let rr = vec![1f32; b];
        let cc = vec![b as f32 / kp as f32; kp];
        let mut o2 = vec![0f32; b * kp];
        let t = time(&mut || {
            sinkhorn(&s2, &rr, &cc, &mut o2, 1, b, kp, 0.05, 3, LogDomain::Auto).unwrap();
        });
        println!("sinkhorn B={b} K={kp} fwd: {t:.2} ms");
    });
}
