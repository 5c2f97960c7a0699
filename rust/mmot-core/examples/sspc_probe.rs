//! Single-process probe of Multi-SK at the SSPC size (no Python):
//! `THREADS=1,2 ITERS=20 cargo run --release --example sspc_probe -p mmot-core`.
//! Each thread count gets its own pool; the pools run interleaved, round after round, and the
//! min and median per pool are printed (this VM is noisy, so only interleaved figures compare).
//! `FWD_ONLY=1` skips the backward; `MMOT_SIMD=generic|avx2|avx512` caps the vector width.
use mmot_core::*;
use std::time::Instant;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let threads: Vec<usize> = std::env::var("THREADS")
        .unwrap_or_else(|_| "1".into())
        .split(',')
        .map(|t| t.parse().expect("THREADS: comma-separated counts"))
        .collect();
    let pools: Vec<_> = threads
        .iter()
        .map(|&t| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .unwrap()
        })
        .collect();
    let (n, kk) = (env("N", 7660usize), env("K", 64usize));
    let k = kk / 2;
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
        n_iters: env("ITERS", 20usize),
        slot_weights: (0..kk)
            .map(|m| if m < kk - k { 0.25 } else { 1.0 })
            .collect(),
        k,
        normalize: Normalize::MinMax,
        log_domain: LogDomain::Auto,
        check_values: false,
    };
    let g: Vec<f32> = (0..n * kk).map(|_| rnd() as f32 - 0.5).collect();
    let rounds = env("REPS", 30usize);
    let report = |what: &str, f: &(dyn Fn() + Sync)| {
        let mut times = vec![Vec::new(); pools.len()];
        for round in 0..=rounds {
            for (pool, ts) in pools.iter().zip(times.iter_mut()) {
                let t = Instant::now();
                pool.install(f);
                if round > 0 {
                    ts.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        for (t, ts) in threads.iter().zip(times.iter_mut()) {
            ts.sort_by(f64::total_cmp);
            println!(
                "{what} N={n} K={kk}, {t} thread(s): min {:.2} ms, median {:.2} ms",
                ts[0],
                ts[ts.len() / 2]
            );
        }
    };
    println!("simd level {:?}", simd::level());
    let out = std::sync::Mutex::new(vec![0f32; n * kk]);
    let dims = Dims::new(1, n, kk);
    report("multi_sinkhorn fwd", &|| {
        multi_sinkhorn(&s, &r, &mut out.lock().unwrap(), dims, &params).unwrap();
    });
    if std::env::var_os("FWD_ONLY").is_none() {
        report("multi_sinkhorn bwd", &|| {
            let gout = &mut out.lock().unwrap();
            multi_sinkhorn_backward(&g, &s, &r, gout, dims, &params).unwrap();
        });
    }
}
