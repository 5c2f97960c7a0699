"""CPU kernels of issue 3 against their baselines, forward and backward, grouped by op and size.

    PYTHONPATH=python pytest bench/test_cpu_ops.py --benchmark-group-by=group \
        --benchmark-columns=min,median,max,rounds [-k multi_sinkhorn]

The provider is the parameter. CPU figures are comparable only as ratios within one run; the
interleaved side-by-side ratios in bench/RESULTS.md come from bench/cpu_ratios.py.
"""

import pytest
import torch

import mmot
from mmot.bench import baselines
from mmot.bench.workloads import cosine_scores as cosine


def backward_of(fn, scores):
    upstream = torch.randn_like(scores)

    def run():
        leaf = scores.detach().requires_grad_(True)
        out = fn(leaf)
        (grad,) = torch.autograd.grad(out, leaf, upstream)
        return grad

    return run


N_SSPC = 7660


@pytest.mark.parametrize("provider", ["mmot-rust", "grouped-torch-eager", "official-dense"])
@pytest.mark.parametrize("n_anchors", [64, 128, 256, 1024])
def test_multi_sinkhorn(benchmark, provider, n_anchors):
    k = n_anchors // 2
    benchmark.group = f"multi_sinkhorn N={N_SSPC} K={n_anchors} k={k} 20 iters fwd"
    if provider == "official-dense" and n_anchors > 128:
        pytest.skip(f"(K,N,K) float32 tensor alone is {n_anchors * N_SSPC * n_anchors * 4 / 2**30:.0f} GiB")
    scores = cosine(N_SSPC, n_anchors)
    fn = {
        "mmot-rust": lambda: mmot.multi_sinkhorn(scores, k, 0.07, 20, backend="rust"),
        "grouped-torch-eager": lambda: baselines.grouped_torch_eager_multi_sinkhorn(scores, k, 0.07, 20),
        "official-dense": lambda: baselines.official_dense_multi_sinkhorn(scores, k, 0.07, 20),
    }[provider]
    with torch.no_grad():
        benchmark.pedantic(fn, rounds=3 if provider == "official-dense" else 10, warmup_rounds=1)


@pytest.mark.parametrize("provider", ["mmot-rust", "reference-autograd"])
def test_multi_sinkhorn_backward(benchmark, provider):
    benchmark.group = f"multi_sinkhorn N={N_SSPC} K=64 k=32 20 iters fwd+bwd"
    backend = "rust" if provider == "mmot-rust" else "torch"
    benchmark(backward_of(lambda s: mmot.multi_sinkhorn(s, 32, 0.07, 20, backend=backend), cosine(N_SSPC, 64)))


@pytest.mark.parametrize("provider", ["mmot-rust", "swav-eager", "pot-numpy", "pot-torch"])
def test_sinkhorn_swav(benchmark, provider):
    benchmark.group = "sinkhorn B=4096 K=3000 3 iters fwd"
    scores = cosine(4096, 3000)
    fn = {
        "mmot-rust": lambda: mmot.sinkhorn(scores, 0.05, 3, backend="rust"),
        "swav-eager": lambda: baselines.swav_eager_sinkhorn(scores, 0.05, 3),
        "pot-numpy": lambda: baselines.pot_sinkhorn(scores, 0.05, 3, backend="numpy"),
        "pot-torch": lambda: baselines.pot_sinkhorn(scores, 0.05, 3, backend="torch"),
    }[provider]
    with torch.no_grad():
        benchmark(fn)


@pytest.mark.parametrize("provider", ["mmot-rust", "reference-autograd"])
def test_sinkhorn_swav_backward(benchmark, provider):
    benchmark.group = "sinkhorn B=4096 K=3000 3 iters fwd+bwd"
    backend = "rust" if provider == "mmot-rust" else "torch"
    benchmark(backward_of(lambda s: mmot.sinkhorn(s, 0.05, 3, backend=backend), cosine(4096, 3000)))


@pytest.mark.parametrize("provider", ["mmot-rust", "batched-torch-eager"])
@pytest.mark.parametrize("size", [4, 16])
def test_sinkhorn_tiny_batch(benchmark, provider, size):
    benchmark.group = f"sinkhorn 65536x({size}x{size}) 20 iters fwd"
    scores = cosine(size, size, batch=(65536,))
    fn = {
        "mmot-rust": lambda: mmot.sinkhorn(scores, 0.1, 20, backend="rust"),
        "batched-torch-eager": lambda: baselines.batched_torch_eager_sinkhorn(scores, 0.1, 20),
    }[provider]
    with torch.no_grad():
        benchmark(fn)


@pytest.mark.parametrize("provider", ["mmot-rust", "reference-eager"])
def test_similarity(benchmark, provider):
    benchmark.group = "similarity (3,1,7660,256)x(1,3,64,256) fwd+bwd"
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 7660, 256, generator=generator)
    y = torch.randn(1, 3, 64, 256, generator=generator)
    backend = "rust" if provider == "mmot-rust" else "torch"
    upstream = torch.randn(3, 3, 7660, 64, generator=generator)

    def run():
        a, b = x.detach().requires_grad_(True), y.detach().requires_grad_(True)
        return torch.autograd.grad(mmot.similarity(a, b, backend=backend), (a, b), upstream)

    benchmark(run)
