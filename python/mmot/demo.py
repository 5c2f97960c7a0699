"""``mmot-demo``: one Multi-SK call at the SSPC size, its result and its time against the reference.

The input is the embedded default: cosine scores of N = 7660 samples (SSPC's queue of 5500 plus
a batch of 2160) against K = 64 anchors, drawn from a fixed seed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import mmot


def sspc_scores(n_samples: int = 7660, n_anchors: int = 64, dim: int = 256, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(n_samples, dim, generator=generator), dim=-1)
    anchors = torch.nn.functional.normalize(torch.randn(n_anchors, dim, generator=generator), dim=-1)
    return feats @ anchors.T


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mmot-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=7660)
    parser.add_argument("--anchors", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    scores = sspc_scores(args.samples, args.anchors)
    k = max(1, args.anchors // 2)
    call = dict(k=k, eps=0.07, n_iters=20)
    raw = mmot.multi_sinkhorn(scores, normalize="none", **call)
    targets = mmot.multi_sinkhorn(scores, **call)
    reference = mmot.multi_sinkhorn(scores, backend="torch", **call)

    print(f"mmot {mmot.__version__}: multi_sinkhorn on scores {tuple(scores.shape)}, k={k}, eps=0.07, 20 iterations")
    print(f"  row sums of T (expect {k}):        min {raw.sum(-1).min():.6f}  max {raw.sum(-1).max():.6f}")
    print(f"  column sums of T (expect {k * args.samples / args.anchors:.2f}): min {raw.sum(0).min():.2f}  max {raw.sum(0).max():.2f}")
    print(f"  min-max targets, sample 0, first 6 anchors: {[round(v, 3) for v in targets[0, :6].tolist()]}")
    print(f"  max |rust - reference|: {(targets - reference).abs().max():.2e}")
    rust_ms = median_ms(lambda: mmot.multi_sinkhorn(scores, **call), args.repeats)
    torch_ms = median_ms(lambda: mmot.multi_sinkhorn(scores, backend="torch", **call), args.repeats)
    print(f"  time per call ({torch.get_num_threads()} threads, median of {args.repeats}):")
    print(f"    backend='rust'  {rust_ms:9.2f} ms")
    print(f"    backend='torch' {torch_ms:9.2f} ms  ({torch_ms / rust_ms:.1f}x the Rust time)")


if __name__ == "__main__":
    main()
