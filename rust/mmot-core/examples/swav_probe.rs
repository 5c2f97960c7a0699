//! Probe of the SwAV-size Sinkhorn kernel (no Python), at 1 and 2 threads interleaved:
//! `THREADS=1,2 cargo run --release --example swav_probe -p mmot-core`. Also times a plain
//! copy of the matrix, the bandwidth yardstick of its memory floor.
use mmot_core::*;
use std::time::Instant;

fn main() {
    let threads: Vec<usize> = std::env::var("THREADS")
        .unwrap_or_else(|_| "1,2".into())
        .split(',')
        .map(|t| t.parse().expect("THREADS: comma-separated counts"))
        .collect();
    let rounds: usize = std::env::var("REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let (b, k) = (4096usize, 3000usize);
    let mut x = 0x1234_5678_9abc_def0u64;
    let s: Vec<f32> = (0..b * k)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 11) as f64 / (1u64 << 53) as f64 - 0.5) as f32
        })
        .collect();
    let (r, c) = (vec![1f32; b], vec![b as f32 / k as f32; k]);
    let mut out = vec![0f32; b * k];
    for &t in &threads {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build()
            .unwrap();
        let mut times = (Vec::new(), Vec::new());
        for round in 0..=rounds {
            let t0 = Instant::now();
            pool.install(|| {
                sinkhorn(&s, &r, &c, &mut out, 1, b, k, 0.05, 3, LogDomain::Auto).unwrap()
            });
            let t1 = Instant::now();
            pool.install(|| {
                use rayon::prelude::*;
                out.par_chunks_mut(1 << 16)
                    .zip(s.par_chunks(1 << 16))
                    .for_each(|(o, i)| o.copy_from_slice(i))
            });
            if round > 0 {
                times.0.push((t1 - t0).as_secs_f64() * 1e3);
                times.1.push(t1.elapsed().as_secs_f64() * 1e3);
            }
        }
        times.0.sort_by(f64::total_cmp);
        times.1.sort_by(f64::total_cmp);
        println!(
            "{t} thread(s): sinkhorn B={b} K={k} 3 it min {:.2} ms median {:.2} ms; copy min {:.2} ms",
            times.0[0],
            times.0[rounds / 2],
            times.1[0]
        );
    }
}
