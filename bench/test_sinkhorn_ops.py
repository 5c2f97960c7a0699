"""Kernel throughput at the reference sizes of DESIGN.md §3, grouped by op and size, one provider per row.

Run: pytest bench --benchmark-group-by=group --benchmark-columns=median,min,max,rounds
CPU figures are only comparable as ratios within one run.
"""

import pytest
import torch

import mmot
from mmot.demo import sspc_scores

PROVIDERS = ["mmot-rust", "reference-eager"]
BACKEND = {"mmot-rust": "rust", "reference-eager": "torch"}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("n_anchors", [64, 128])
def test_multi_sinkhorn_sspc(benchmark, provider, n_anchors):
    benchmark.group = f"multi_sinkhorn N=7660 K={n_anchors} k={n_anchors // 2} 20 iters"
    scores = sspc_scores(7660, n_anchors)
    benchmark(mmot.multi_sinkhorn, scores, n_anchors // 2, 0.07, 20, backend=BACKEND[provider])


@pytest.mark.parametrize("provider", PROVIDERS)
def test_sinkhorn_swav(benchmark, provider):
    benchmark.group = "sinkhorn B=4096 K=3000 3 iters"
    scores = torch.nn.functional.normalize(torch.randn(4096, 128), dim=-1) @ torch.nn.functional.normalize(
        torch.randn(3000, 128), dim=-1
    ).T
    benchmark(mmot.sinkhorn, scores, 0.05, 3, backend=BACKEND[provider])
