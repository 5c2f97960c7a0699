//! One problem's forward: pass 0 (column sums of `E_G`, and in the plain domain the cache),
//! then one streaming pass per iteration, each followed by the column update `f_G *= r / colsum`,
//! except the last, which writes the result instead.

use super::layout::{aligned_rows, Chunking, StateLayout};
use super::rows::{pass_zero_chunk, GeneralPass};
use super::two_groups::{ResultRows, TwoGroupChunk};
use super::{Inputs, Normalize, Problem};
use crate::exec::chunks::{reduce_partials, run_pass, Scratch, Strided};
use crate::exec::spare::{vec_bytes, Footprint};
use crate::simd::Real;
use std::ops::Range;

/// The buffers one problem's solve needs, kept between calls (see `crate::spare`).
#[derive(Default)]
pub(super) struct Workspace<T> {
    /// The per-row state blocks (see [`StateLayout`]).
    pub state: Vec<T>,
    /// Each chunk's column sums, `[chunks, G, K]`.
    pub chunk_sums: Vec<T>,
    /// The column sums of a pass, `[G, K]`.
    pub col_sums: Vec<T>,
    /// `f_G` (plain) or `log f_G` (log), `[G, K]`.
    pub col_scalings: Vec<T>,
    /// `f_1 / f_0` when the state layout caches the ratio `D` (`[K]`).
    pub f_ratio: Vec<T>,
    /// Scratch of a pass that runs as a single chunk on the calling thread.
    pub scratch: Vec<T>,
}

impl<T: Real> Footprint for Workspace<T> {
    fn bytes(&self) -> usize {
        let Workspace {
            state,
            chunk_sums,
            col_sums,
            col_scalings,
            f_ratio,
            scratch,
        } = self;
        [state, chunk_sums, col_sums, col_scalings, f_ratio, scratch]
            .into_iter()
            .map(vec_bytes)
            .sum()
    }
}

/// Potentials of every iteration of one problem, recorded by the backward's forward replay.
#[derive(Default)]
pub(super) struct History<T> {
    /// `[iterations + 1, N, G]`: `h_G` (or `log h_G`) after each iteration; the first is the
    /// start, all ones (zeros).
    h: Vec<T>,
    /// `[iterations, G, K]`: `f_G` (or `log f_G`) of each iteration.
    f: Vec<T>,
}

impl<T: Real> History<T> {
    /// Row `row`'s `h_G` after iteration `t` (`t = 0`: the start).
    #[inline(always)]
    pub fn h(&self, t: usize, row: usize, n_rows: usize, n_groups: usize) -> &[T] {
        let at = (t * n_rows + row) * n_groups;
        &self.h[at..at + n_groups]
    }

    /// The `f_G` of iteration `t >= 1`, `[G, K]`.
    #[inline(always)]
    pub fn f(&self, t: usize, group_cols: usize) -> &[T] {
        &self.f[(t - 1) * group_cols..t * group_cols]
    }

    pub fn bytes(&self) -> usize {
        vec_bytes(&self.h) + vec_bytes(&self.f)
    }

    fn start(&mut self, problem: &Problem<T>, log: bool) {
        let (n, n_groups) = (problem.rows, problem.groups.len());
        self.h.clear();
        self.h.resize((problem.n_iters + 1) * n * n_groups, T::ZERO);
        self.h[..n * n_groups].fill(if log { T::ZERO } else { T::ONE });
        self.f.clear();
        self.f
            .resize(problem.n_iters * n_groups * problem.anchors, T::ZERO);
    }

    fn record_f(&mut self, it: usize, f: &[T]) {
        self.f[it * f.len()..(it + 1) * f.len()].copy_from_slice(f);
    }

    /// The `h_G` of every row after iteration `it + 1`, from the state blocks.
    fn record_h(&mut self, it: usize, state: &[T], layout: StateLayout, n_groups: usize) {
        let n = state.len() / layout.stride;
        let dst = &mut self.h[(it + 1) * n * n_groups..(it + 2) * n * n_groups];
        let scalars = layout.scalars_at..layout.scalars_at + n_groups;
        for (d, st) in dst
            .chunks_exact_mut(n_groups)
            .zip(state.chunks_exact(layout.stride))
        {
            d.copy_from_slice(&st[scalars.clone()]);
        }
    }
}

/// What every pass of one problem's solve reads.
#[derive(Clone, Copy)]
pub(super) struct Sweep<'a, T> {
    pub problem: &'a Problem<T>,
    pub input: Inputs<'a, T>,
    pub log: bool,
    pub layout: StateLayout,
    /// `m` in 1..=3 with `w_1 - w_0 = m w_0`, when the ratio layout can form `D = E_0^m` by
    /// products rather than an `exp` (SSPC's 0.25 and 1 give 3).
    pub ratio_power: Option<usize>,
    pub chunking: Chunking,
}

impl<'a, T: Real> Sweep<'a, T> {
    /// Two plain groups cache only `D` (the forward and the backward's replay alike).
    pub fn new(problem: &'a Problem<T>, input: Inputs<'a, T>, log: bool) -> Self {
        let (n_groups, w) = (problem.groups.len(), &problem.groups.weights);
        let ratio = !log && n_groups == 2;
        let layout = StateLayout::new::<T>(log, n_groups, n_groups * problem.anchors, ratio);
        let ratio_power = if ratio {
            (1..=3).find(|&m| T::from_f64(m as f64) * w[0] == w[1] - w[0])
        } else {
            None
        };
        Sweep {
            problem,
            input,
            log,
            layout,
            ratio_power,
            chunking: layout.chunking(problem.rows, problem.anchors),
        }
    }

    /// G·K: the length of per-group column arrays.
    pub fn group_cols(&self) -> usize {
        self.problem.groups.len() * self.problem.anchors
    }

    /// Runs `chunk(rows, state_rows, out_rows, chunk_sums, scratch)` over the row chunks, in
    /// parallel when there are several (see `chunks::run_pass`); each chunk writes its own
    /// `[G, K]` of `chunk_sums`.
    #[inline(always)]
    pub fn run<F>(
        &self,
        state: &mut [T],
        out: &mut [T],
        chunk_sums: &mut [T],
        scratch: &mut Vec<T>,
        scratch_len: usize,
        chunk: F,
    ) where
        F: Fn(Range<usize>, &mut [T], &mut [T], &mut [T], &mut [T]) + Sync,
    {
        let k = self.problem.anchors;
        run_pass(
            self.problem.rows,
            self.chunking.rows_per_chunk,
            Strided::new(state, self.layout.stride),
            Strided::new(out, k),
            Strided::new(chunk_sums, self.group_cols()),
            Scratch::new(scratch, scratch_len),
            chunk,
        );
    }
}

/// `buf` as `len` zeros.
fn zeroed<T: Real>(buf: &mut Vec<T>, len: usize) -> &mut [T] {
    buf.clear();
    buf.resize(len, T::ZERO);
    buf
}

/// A solve's workspace, sized for its problem.
struct PassBuffers<'w, T> {
    state: &'w mut [T],
    chunk_sums: &'w mut [T],
    col_sums: &'w mut [T],
    col_scalings: &'w mut [T],
    f_ratio: &'w mut Vec<T>,
    scratch: &'w mut Vec<T>,
}

impl<'w, T: Real> PassBuffers<'w, T> {
    fn new(ws: &'w mut Workspace<T>, sweep: &Sweep<T>) -> Self {
        let group_cols = sweep.group_cols();
        let Workspace {
            state,
            chunk_sums,
            col_sums,
            col_scalings,
            f_ratio,
            scratch,
        } = ws;
        let state = aligned_rows(state, sweep.problem.rows * sweep.layout.stride);
        PassBuffers {
            state,
            chunk_sums: zeroed(chunk_sums, sweep.chunking.n_chunks * group_cols),
            col_sums: zeroed(col_sums, group_cols),
            col_scalings: zeroed(col_scalings, group_cols),
            f_ratio,
            scratch,
        }
    }
}

impl<T: Real> Problem<T> {
    /// Solves one problem into `out` (`[N, K]`) in the given domain. With `history`, also
    /// records the potentials of every iteration (for the backward).
    pub(super) fn solve(
        &self,
        input: Inputs<T>,
        out: &mut [T],
        ws: &mut Workspace<T>,
        log: bool,
        mut history: Option<&mut History<T>>,
    ) {
        let sweep = Sweep::new(self, input, log);
        let mut bufs = PassBuffers::new(ws, &sweep);
        sweep.pass_zero(&mut bufs, out);
        if let Some(history) = history.as_deref_mut() {
            history.start(self, log);
        }
        let last = self.n_iters - 1;
        for it in 0..=last {
            if self.interrupt.requested() {
                break;
            }
            if let Some(history) = history.as_deref_mut() {
                history.record_f(it, bufs.col_scalings);
            }
            sweep.iteration_pass(&mut bufs, out, it == last);
            if let Some(history) = history.as_deref_mut() {
                history.record_h(it, bufs.state, sweep.layout, self.groups.len());
            }
            if it != last {
                sweep.update_column_scalings(&mut bufs);
            }
        }
    }
}

impl<T: Real> Sweep<'_, T> {
    /// Pass 0 (`g = h = 1`): the column sums of `E_G` give the first `f_G = r / colsum`.
    fn pass_zero(&self, bufs: &mut PassBuffers<T>, out: &mut [T]) {
        let k = self.problem.anchors;
        self.run(
            bufs.state,
            out,
            bufs.chunk_sums,
            bufs.scratch,
            k,
            #[inline(always)]
            |rows, state, _out, col_sums, logits| {
                pass_zero_chunk(self, rows, state, col_sums, logits)
            },
        );
        reduce_partials(bufs.chunk_sums, self.chunking.n_chunks, bufs.col_sums);
        let mass = self.input.mass;
        for (f, sums) in bufs
            .col_scalings
            .chunks_exact_mut(k)
            .zip(bufs.col_sums.chunks_exact(k))
        {
            for j in 0..k {
                f[j] = if self.log {
                    mass[j].ln() - sums[j].ln()
                } else {
                    mass[j] / sums[j]
                };
            }
        }
    }

    /// One iteration's pass: each row's `g` and `h` steps, then its slot values added to the
    /// column sums, or, in the `last` pass, its row of the result.
    fn iteration_pass(&self, bufs: &mut PassBuffers<T>, out: &mut [T], last: bool) {
        let problem = self.problem;
        let (n, k) = (problem.rows, problem.anchors);
        let group_cols = self.group_cols();
        let two_plain_groups = !self.log && problem.groups.len() == 2;
        if self.layout.ratio {
            let f = &bufs.col_scalings;
            bufs.f_ratio.clear();
            bufs.f_ratio.extend((0..k).map(|j| f[k + j] / f[j]));
        }
        let (f, f_ratio): (&[T], &[T]) = (bufs.col_scalings, bufs.f_ratio);
        let minmax = problem.normalize == Normalize::MinMax;
        let general = GeneralPass {
            sweep: *self,
            f,
            last,
        };
        // Two plain groups: the chunk's slot values `[rows, 2, K]`; otherwise one row's
        // slot values `[G, K]`, then a denominator and the row's logits, `[K]` each.
        let scratch_len =
            (self.chunking.rows_per_chunk.min(n) * group_cols).max(group_cols + 2 * k);
        self.run(
            bufs.state,
            out,
            bufs.chunk_sums,
            bufs.scratch,
            scratch_len,
            #[inline(always)]
            |rows, state, out, col_sums, scratch| {
                col_sums.fill(T::ZERO);
                if !two_plain_groups {
                    return general.chunk(rows, state, out, col_sums, scratch);
                }
                let (c, top) = (&problem.groups.counts, &problem.groups.top_counts);
                let result = last.then(|| ResultRows {
                    rows: out,
                    top_counts: [top[0], top[1]],
                    minmax,
                });
                T::with_vector(TwoGroupChunk {
                    state,
                    layout: self.layout,
                    k,
                    f,
                    f_ratio,
                    counts: [c[0], c[1]],
                    slots: &mut scratch[..rows.len() * group_cols],
                    col_sums,
                    result,
                })
            },
        );
    }

    /// The `f` step: `f_G *= r / colsum` from the pass's column sums (log: `+= log(r / colsum)`).
    fn update_column_scalings(&self, bufs: &mut PassBuffers<T>) {
        let k = self.problem.anchors;
        reduce_partials(bufs.chunk_sums, self.chunking.n_chunks, bufs.col_sums);
        let mass = self.input.mass;
        for (f, sums) in bufs
            .col_scalings
            .chunks_exact_mut(k)
            .zip(bufs.col_sums.chunks_exact(k))
        {
            for j in 0..k {
                let ratio = mass[j] / sums[j];
                if self.log {
                    f[j] += ratio.ln();
                } else {
                    f[j] *= ratio;
                }
            }
        }
    }
}
