"""Arguments that used to slip past the checks, and ops under torch.compile with changing shapes.

Regression tests for: float arguments under ``torch.compile(dynamic=True)`` (a SymFloat, which
``math.isfinite`` cannot take), sparse and nested tensors, counts beyond 32 bits, and the
``MMOT_NUM_THREADS`` setting.
"""

from __future__ import annotations

import mmot
import pytest
import torch
from backends import ALL
from inputs import positive_pairs, random_scores, uniform_cosines

# ---------------------------------------------------------------- torch.compile, changing sizes

CALLS = {
    "sinkhorn": (lambda s, b: mmot.sinkhorn(s, 0.3, 3, backend=b), lambda n: (random_scores(n, 5, seed=n),)),
    "multi_sinkhorn": (lambda s, b: mmot.multi_sinkhorn(s, 2, 0.3, 3, backend=b), lambda n: (random_scores(n, 5, seed=n),)),
    "similarity": (
        lambda x, y, b: mmot.similarity(x, y, scale=2.5, backend=b),
        lambda n: (random_scores(n, 8, seed=n), random_scores(3, 8)),
    ),
    "info_nce": (lambda x, y, b: mmot.info_nce(x, y, 0.07, backend=b), lambda n: tuple(t.detach() for t in positive_pairs(n, 8, n))),
    "anchor_consistency_loss": (
        lambda s, t, b: mmot.anchor_consistency_loss(s, t, 0.1, backend=b),
        lambda n: (uniform_cosines(n, 5, seed=n), uniform_cosines(n, 5, seed=n + 1).abs()),
    ),
}


@pytest.mark.parametrize("op", sorted(CALLS))
@pytest.mark.parametrize("dynamic", [True, None])
def test_fullgraph_compile_across_batch_sizes(op, dynamic, backend):
    """A short last batch must not break the graph: every op traces with symbolic sizes and floats."""
    fn, make = CALLS[op]
    torch._dynamo.reset()
    compiled = torch.compile(lambda *args: fn(*args, backend), fullgraph=True, dynamic=dynamic)
    for n in (6, 7, 9, 4):
        inputs = make(n)
        torch.testing.assert_close(compiled(*inputs), fn(*inputs, backend))


# ---------------------------------------------------------------- tensors the ops cannot take


def test_sparse_and_nested_tensors_are_named():
    dense = random_scores(6, 4)
    with pytest.raises(TypeError, match=r"mmot\.sinkhorn: argument 'scores' must be a dense \(strided\) tensor; got a sparse_coo"):
        mmot.sinkhorn(dense.to_sparse())
    nested = torch.nested.nested_tensor([random_scores(3, 4), random_scores(5, 4)])
    with pytest.raises(TypeError, match=r"mmot\.similarity: argument 'x' must be a dense \(strided\) tensor; got a nested"):
        mmot.similarity(nested, dense)
    with pytest.raises(TypeError, match=r"mmot\.info_nce: argument 'b' .* got a sparse_csr"):
        mmot.info_nce(dense, dense.to_sparse_csr())


@pytest.mark.parametrize("n_iters", [2**31, 2**63, -(2**63)])
def test_counts_beyond_32_bits_are_rejected(n_iters):
    scores = random_scores(6, 4)
    for call in (lambda: mmot.sinkhorn(scores, n_iters=n_iters), lambda: mmot.multi_sinkhorn(scores, n_iters=n_iters)):
        with pytest.raises(ValueError, match=r"argument 'n_iters' must be in 1\.\.2147483647"):
            call()


@pytest.mark.parametrize("setting", ["0", "-3", "1.5", "two", "12345678901234567890", "4097"])
def test_bad_thread_counts_are_named(monkeypatch, setting):
    monkeypatch.setenv("MMOT_NUM_THREADS", setting)
    with pytest.raises(ValueError, match=r"MMOT_NUM_THREADS must be an integer in 1\.\.4096"):
        mmot.sinkhorn(random_scores(6, 4), backend="rust")


@pytest.mark.parametrize("setting", ["1", " 3 ", "4096"])
def test_good_thread_counts_run(monkeypatch, setting):
    monkeypatch.setenv("MMOT_NUM_THREADS", setting)
    scores = random_scores(6, 4)
    torch.testing.assert_close(mmot.sinkhorn(scores, backend="rust"), mmot.sinkhorn(scores, backend="torch"))


def test_backends_are_the_parametrised_ones():
    """The compile test above runs every backend (Triton through its interpreter)."""
    assert [getattr(b, "values", (b,))[0] for b in ALL] == ["rust", "torch", "triton"]
