//! Timings of the kernels at the sizes the project is judged on, without Python:
//!
//! ```text
//! cargo bench -p mmot-core --bench kernels -- [FILTER...] [--threads 1,2] [--reps N]
//!     [--iters N] [--fwd-only]
//! ```
//!
//! A workload runs when its name contains one of the FILTERs (all run without one). Each thread
//! count gets its own pool, and the pools take turns round after round, so that the figures of
//! different thread counts see the same machine (only interleaved figures compare on a noisy
//! one). Per workload and thread count it prints the min and median of `--reps` timed rounds
//! (after one untimed round), and a hash of the output bits, which must not change when a
//! change is meant to keep the results bitwise. `--iters` sets the Sinkhorn iterations of every
//! Sinkhorn workload (default 3 for SwAV, 20 for the others); `--fwd-only` skips the backward
//! passes. `MMOT_SIMD=generic|avx2|avx512` caps the instruction set.

use mmot_core::info_nce::InfoNceInput;
use mmot_core::*;
use rayon::prelude::*;
use std::time::Instant;

struct Options {
    filters: Vec<String>,
    threads: Vec<usize>,
    reps: usize,
    iters: Option<usize>,
    fwd_only: bool,
}

fn options() -> Options {
    let mut o = Options {
        filters: Vec::new(),
        threads: vec![1],
        reps: 10,
        iters: None,
        fwd_only: false,
    };
    let rest: Vec<String> = std::env::args().skip(1).collect();
    let mut it = rest.into_iter();
    while let Some(arg) = it.next() {
        let mut next = |flag: &str| it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match arg.as_str() {
            // cargo passes --bench to every bench target.
            "--bench" => {}
            "--threads" => {
                o.threads = next("--threads")
                    .split(',')
                    .map(|t| t.parse().expect("--threads: comma-separated counts"))
                    .collect()
            }
            "--reps" => o.reps = next("--reps").parse().expect("--reps: a count >= 1"),
            "--iters" => o.iters = Some(next("--iters").parse().expect("--iters: a count")),
            "--fwd-only" => o.fwd_only = true,
            flag if flag.starts_with("--") => panic!("unknown flag {flag}"),
            _ => o.filters.push(arg),
        }
    }
    assert!(o.reps >= 1, "--reps must be at least 1");
    o
}

fn main() {
    let o = options();
    let pools: Vec<_> = o
        .threads
        .iter()
        .map(|&t| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .expect("a thread pool")
        })
        .collect();
    println!("simd level {:?}", simd::level());
    for workload in workloads(&o) {
        if !o.filters.is_empty() && !o.filters.iter().any(|f| workload.name.contains(f.as_str())) {
            continue;
        }
        let mut run = (workload.prepare)();
        let mut times = vec![Vec::new(); pools.len()];
        for round in 0..=o.reps {
            for (pool, ts) in pools.iter().zip(times.iter_mut()) {
                let start = Instant::now();
                pool.install(|| run(false));
                if round > 0 {
                    ts.push(start.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        let bits = pools[0].install(|| run(true));
        for (t, ts) in o.threads.iter().zip(times.iter_mut()) {
            ts.sort_by(f64::total_cmp);
            println!(
                "{}, {t} thread(s): min {:.2} ms, median {:.2} ms, out {bits:016x}",
                workload.name,
                ts[0],
                ts[ts.len() / 2]
            );
        }
    }
}

/// One timed call: `run(false)` runs it, `run(true)` runs it and hashes its outputs.
type Run = Box<dyn FnMut(bool) -> u64 + Send>;

struct Workload {
    name: String,
    /// Builds the inputs (only for the workloads that run) and returns the call.
    prepare: Box<dyn Fn() -> Run>,
}

fn workload(name: String, prepare: impl Fn() -> Run + 'static) -> Workload {
    Workload {
        name,
        prepare: Box::new(prepare),
    }
}

fn workloads(o: &Options) -> Vec<Workload> {
    let mut all = Vec::new();
    let iters = |default: usize| o.iters.unwrap_or(default);
    all.extend(sspc_multi_sinkhorn(iters(20), o.fwd_only));
    all.extend(swav_sinkhorn(iters(3), o.fwd_only));
    all.extend(small_problems(iters(20)));
    all.extend(sspc_similarity(o.fwd_only));
    all.extend(info_nce(o.fwd_only));
    all
}

/// Multi-SK at the SSPC size: one `[7660, 64]` problem, half the slots weighted 0.25.
fn sspc_multi_sinkhorn(iters: usize, fwd_only: bool) -> Vec<Workload> {
    let dims = Dims::new(1, 7660, 64);
    let params = move || MultiSinkhornParams {
        eps: 0.07,
        n_iters: iters,
        slot_weights: (0..dims.cols)
            .map(|m| if m < dims.cols / 2 { 0.25 } else { 1.0 })
            .collect(),
        k: dims.cols / 2,
        normalize: Normalize::MinMax,
        log_domain: LogDomain::Auto,
        check_values: false,
    };
    let inputs = move || {
        let mut rng = Rng(SEED);
        let scores = rng.uniform(dims.len(), -0.5, 0.5);
        let grad = rng.uniform(dims.len(), -0.5, 0.5);
        let anchor_mass = vec![dims.rows as f32 / dims.cols as f32; dims.cols];
        (scores, grad, anchor_mass)
    };
    let what = |pass| format!("multi_sinkhorn/sspc {pass} N=7660 K=64 {iters} it");
    let mut list = vec![workload(what("fwd"), move || {
        let (scores, _, anchor_mass) = inputs();
        let (mut out, p) = (vec![0f32; dims.len()], params());
        Box::new(move |hash| {
            multi_sinkhorn(&scores, &anchor_mass, &mut out, dims, &p).unwrap();
            digest(hash, &[&out])
        })
    })];
    if !fwd_only {
        list.push(workload(what("bwd"), move || {
            let (scores, grad, anchor_mass) = inputs();
            let (mut out, p) = (vec![0f32; dims.len()], params());
            Box::new(move |hash| {
                multi_sinkhorn_backward(&grad, &scores, &anchor_mass, &mut out, dims, &p).unwrap();
                digest(hash, &[&out])
            })
        }));
    }
    list
}

/// Sinkhorn at the SwAV size (4096 samples, 3000 prototypes), and a parallel copy of its
/// scores: the memory-bandwidth yardstick of its floor.
fn swav_sinkhorn(iters: usize, fwd_only: bool) -> Vec<Workload> {
    let dims = Dims::new(1, 4096, 3000);
    let params = SinkhornParams::new(0.05, iters, LogDomain::Auto);
    let inputs = move || {
        let mut rng = Rng(SEED);
        let scores = rng.uniform(dims.len(), -0.5, 0.5);
        let grad = rng.uniform(dims.len(), -0.5, 0.5);
        let row_mass = vec![1f32; dims.rows];
        let col_mass = vec![dims.rows as f32 / dims.cols as f32; dims.cols];
        (scores, grad, row_mass, col_mass)
    };
    let what = |pass| format!("sinkhorn/swav {pass} 4096x3000 {iters} it");
    let mut list = vec![workload(what("fwd"), move || {
        let (scores, _, row_mass, col_mass) = inputs();
        let mut out = vec![0f32; dims.len()];
        Box::new(move |hash| {
            sinkhorn(&scores, &row_mass, &col_mass, &mut out, dims, &params).unwrap();
            digest(hash, &[&out])
        })
    })];
    if !fwd_only {
        list.push(workload(what("bwd"), move || {
            let (scores, grad, row_mass, col_mass) = inputs();
            let mut out = vec![0f32; dims.len()];
            Box::new(move |hash| {
                sinkhorn_backward(
                    &grad, &scores, &row_mass, &col_mass, &mut out, dims, &params,
                )
                .unwrap();
                digest(hash, &[&out])
            })
        }));
    }
    list.push(workload("copy/swav 4096x3000".into(), move || {
        let (scores, ..) = inputs();
        let mut out = vec![0f32; dims.len()];
        Box::new(move |hash| {
            out.par_chunks_mut(1 << 16)
                .zip(scores.par_chunks(1 << 16))
                .for_each(|(o, s)| o.copy_from_slice(s));
            digest(hash, &[&out])
        })
    }));
    list
}

/// Batches of 65536 tiny problems (16×16 and 4×4): Sinkhorn on uniform scores in [-1, 1] (the
/// plain domain at eps = 0.05) and on standard normal ones (column ranges beyond 50 eps: the
/// log domain), and Multi-SK on the uniform ones.
fn small_problems(iters: usize) -> Vec<Workload> {
    let mut list = Vec::new();
    for side in [16usize, 4] {
        let dims = Dims::new(65536, side, side);
        let scores = move |normal: bool| {
            let mut rng = Rng(SEED + side as u64);
            if normal {
                rng.normal(dims.len())
            } else {
                rng.uniform(dims.len(), -1.0, 1.0)
            }
        };
        let shape = format!("65536x({side}x{side})");
        for normal in [false, true] {
            let what = if normal { "normal" } else { "uniform" };
            let params = SinkhornParams::new(0.05, iters, LogDomain::Auto);
            let name = format!("sinkhorn/small {shape} {what} {iters} it");
            list.push(workload(name, move || {
                let s = scores(normal);
                let mass = vec![1f32; dims.problems * side];
                let mut out = vec![0f32; dims.len()];
                Box::new(move |hash| {
                    sinkhorn(&s, &mass, &mass, &mut out, dims, &params).unwrap();
                    digest(hash, &[&out])
                })
            }));
        }
        let name = format!("multi_sinkhorn/small {shape} {iters} it");
        list.push(workload(name, move || {
            let s = scores(false);
            let anchor_mass = vec![1f32; dims.problems * side];
            let mut out = vec![0f32; dims.len()];
            let params = MultiSinkhornParams {
                eps: 0.1,
                n_iters: iters,
                slot_weights: (0..side)
                    .map(|m| if m < side / 2 { 0.25 } else { 1.0 })
                    .collect(),
                k: side / 2,
                normalize: Normalize::MinMax,
                log_domain: LogDomain::Auto,
                check_values: false,
            };
            Box::new(move |hash| {
                multi_sinkhorn(&s, &anchor_mass, &mut out, dims, &params).unwrap();
                digest(hash, &[&out])
            })
        }));
    }
    list
}

/// Cosine similarity at the SSPC size: x `[3, 7660, 256]` against y `[3, 64, 256]`, all nine
/// pairs (the broadcast of `[3, 1]` against `[1, 3]` batches).
fn sspc_similarity(fwd_only: bool) -> Vec<Workload> {
    let dims = SimilarityDims {
        x_problems: 3,
        x_rows: 7660,
        y_problems: 3,
        y_rows: 64,
        features: 256,
    };
    let params = SimilarityParams {
        normalize: true,
        scale: 10.0,
        check_finite: false,
    };
    let x_index: Vec<i64> = (0..9).map(|o| o / 3).collect();
    let y_index: Vec<i64> = (0..9).map(|o| o % 3).collect();
    let out_len = x_index.len() * dims.x_rows * dims.y_rows;
    let inputs = move || {
        let mut rng = Rng(7);
        let x = rng.uniform(dims.x_problems * dims.x_rows * dims.features, -1.0, 1.0);
        let y = rng.uniform(dims.y_problems * dims.y_rows * dims.features, -1.0, 1.0);
        let grad = rng.uniform(out_len, -1.0, 1.0);
        (x, y, grad)
    };
    let what = |pass| format!("similarity/sspc {pass} 3x7660x256 . 3x64x256");
    let (xi, yi) = (x_index.clone(), y_index.clone());
    let mut list = vec![workload(what("fwd"), move || {
        let (x, y, _) = inputs();
        let (xi, yi) = (xi.clone(), yi.clone());
        let mut out = vec![0f32; out_len];
        Box::new(move |hash| {
            let input = SimilarityInput {
                x: &x,
                y: &y,
                x_index: &xi,
                y_index: &yi,
            };
            similarity(input, &mut out, dims, &params).unwrap();
            digest(hash, &[&out])
        })
    })];
    if !fwd_only {
        list.push(workload(what("bwd"), move || {
            let (x, y, grad) = inputs();
            let (xi, yi) = (x_index.clone(), y_index.clone());
            let mut gx = vec![0f32; x.len()];
            let mut gy = vec![0f32; y.len()];
            Box::new(move |hash| {
                let input = SimilarityInput {
                    x: &x,
                    y: &y,
                    x_index: &xi,
                    y_index: &yi,
                };
                similarity_backward(&grad, input, &mut gx, &mut gy, dims, &params).unwrap();
                digest(hash, &[&gx, &gy])
            })
        }));
    }
    list
}

/// The fused InfoNCE loss, symmetric and cosine, on 4096 pairs of 256 features.
fn info_nce(fwd_only: bool) -> Vec<Workload> {
    let (rows, features) = (4096usize, 256usize);
    let params = InfoNceParams {
        temperature: 0.05,
        symmetric: true,
        normalize: true,
        check_finite: false,
    };
    let inputs = move || {
        let mut rng = Rng(1);
        let a = rng.uniform(rows * features, -0.5, 0.5);
        let b = rng.uniform(rows * features, -0.5, 0.5);
        (a, b, vec![1f32; rows])
    };
    let what = |pass| format!("info_nce {pass} N={rows} D={features}");
    let mut list = vec![workload(what("fwd"), move || {
        let (a, b, valid) = inputs();
        let mut out = [vec![0f32; rows], vec![0f32; rows], vec![0f32; rows]];
        Box::new(move |hash| {
            let input = InfoNceInput {
                a: &a,
                b: &b,
                valid: &valid,
                rows,
                features,
            };
            let [loss, lse_a, lse_b] = &mut out;
            info_nce_forward(input, loss, lse_a, lse_b, &params).unwrap();
            digest(hash, &[loss, lse_a, lse_b])
        })
    })];
    if !fwd_only {
        list.push(workload(what("bwd"), move || {
            let (a, b, valid) = inputs();
            let grad = vec![1.0 / rows as f32; rows];
            let input = InfoNceInput {
                a: &a,
                b: &b,
                valid: &valid,
                rows,
                features,
            };
            let (mut loss, mut lse_a, mut lse_b) =
                (vec![0f32; rows], vec![0f32; rows], vec![0f32; rows]);
            info_nce_forward(input, &mut loss, &mut lse_a, &mut lse_b, &params).unwrap();
            let mut grads = [vec![0f32; rows * features], vec![0f32; rows * features]];
            Box::new(move |hash| {
                let input = InfoNceInput {
                    a: &a,
                    b: &b,
                    valid: &valid,
                    rows,
                    features,
                };
                let [grad_a, grad_b] = &mut grads;
                info_nce_backward(&grad, input, &lse_a, &lse_b, grad_a, grad_b, &params).unwrap();
                digest(hash, &[grad_a, grad_b])
            })
        }));
    }
    list
}

const SEED: u64 = 0x1234_5678_9abc_def0;

/// xorshift64: reproducible inputs without dependencies.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }

    fn uniform(&mut self, len: usize, lo: f64, hi: f64) -> Vec<f32> {
        (0..len)
            .map(|_| (lo + (hi - lo) * self.next()) as f32)
            .collect()
    }

    /// Standard normal values (Box-Muller).
    fn normal(&mut self, len: usize) -> Vec<f32> {
        (0..len)
            .map(|_| {
                let (a, b) = (self.next().max(1e-300), self.next());
                ((-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()) as f32
            })
            .collect()
    }
}

/// With `hash`, an FNV-1a hash of the outputs' bits (0 otherwise, so timed rounds skip it).
fn digest(hash: bool, outputs: &[&[f32]]) -> u64 {
    if !hash {
        return 0;
    }
    outputs
        .iter()
        .flat_map(|o| o.iter())
        .fold(0xcbf2_9ce4_8422_2325, |h, v| {
            (h ^ v.to_bits() as u64).wrapping_mul(0x100_0000_01b3)
        })
}
