//! Helpers shared by the integration tests: a dependency-free random source and the naive
//! dense Sinkhorn of the spec.

/// xorshift64*, so the tests need no dependencies and are reproducible.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn vec(&mut self, len: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..len).map(|_| lo + (hi - lo) * self.next()).collect()
    }
}

/// Dense SwAV Sinkhorn of one [n, k] problem.
pub fn dense_sinkhorn(
    s: &[f64],
    r: &[f64],
    c: &[f64],
    n: usize,
    k: usize,
    eps: f64,
    iters: usize,
) -> Vec<f64> {
    let mut p: Vec<f64> = s.iter().map(|x| (x / eps).exp()).collect();
    for _ in 0..iters {
        for j in 0..k {
            let cs: f64 = (0..n).map(|i| p[i * k + j]).sum();
            for i in 0..n {
                p[i * k + j] *= c[j] / cs;
            }
        }
        for i in 0..n {
            let rs: f64 = p[i * k..(i + 1) * k].iter().sum();
            for j in 0..k {
                p[i * k + j] *= r[i] / rs;
            }
        }
    }
    p
}
