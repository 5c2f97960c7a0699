"""Arguments that used to slip past the checks, and ops under torch.compile with changing shapes.

Regression tests for: float arguments under ``torch.compile(dynamic=True)`` (a SymFloat, which
``math.isfinite`` cannot take), sparse and nested tensors, counts beyond 32 bits, the
``MMOT_NUM_THREADS`` setting, masses blamed on the argument the user gave, ``process_group``
of the wrong type, and torch.func / forward-mode AD (refused: mmot's gradients are reverse-mode).
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


# ---------------------------------------------------------------- temperatures whose reciprocal overflows

TEMPERATURE_CALLS = {
    "sinkhorn": ("eps", lambda x, t, b: mmot.sinkhorn(x, t, 3, backend=b)),
    "multi_sinkhorn": ("eps", lambda x, t, b: mmot.multi_sinkhorn(x, 2, t, 3, backend=b)),
    "info_nce": ("temperature", lambda x, t, b: mmot.info_nce(x, x.flip(0), t, backend=b)),
    "anchor_consistency_loss": ("temperature", lambda x, t, b: mmot.anchor_consistency_loss(x.tanh(), x.sigmoid(), t, backend=b)),
}


@pytest.mark.parametrize("op", sorted(TEMPERATURE_CALLS))
@pytest.mark.parametrize(
    "dtype, value", [(torch.float32, 1e-45), (torch.float32, 2.9e-39), (torch.bfloat16, 1e-40), (torch.float64, 1e-320)]
)
def test_temperatures_whose_reciprocal_overflows_are_named(backend, op, dtype, value):
    """eps = 1e-45 in float32 used to give uniform plans (a wrong number), temperature 1e-40 NaN."""
    name, call = TEMPERATURE_CALLS[op]
    with pytest.raises(ValueError, match=rf"mmot\.{op}: argument '{name}' must be at least .* \(its reciprocal overflows"):
        call(random_scores(6, 4, seed=5).to(dtype), value, backend)


# ---------------------------------------------------------------- masses and groups, named


@pytest.mark.parametrize(
    "masses, named",
    [
        (dict(col_mass=torch.tensor([float("nan"), 1.5, 1.5, 1.5])), "'col_mass' must hold positive finite masses"),
        (dict(col_mass=torch.tensor([1.5, -1.5, 1.5, 1.5])), "'col_mass' must hold positive finite masses"),
        (dict(row_mass=torch.tensor([1.0, 1.0, float("inf"), 1.0, 1.0, 1.0])), "'row_mass' must hold positive finite masses"),
        # Each finite, but the total (from which the default col_mass is derived) overflows float32.
        (dict(row_mass=torch.full((6,), 1e38)), r"'row_mass' must sum to at most 3\.403e\+38"),
        (dict(col_mass=torch.full((4,), 1e300, dtype=torch.float64)), r"'col_mass' must sum to at most 3\.403e\+38"),
    ],
)
def test_bad_masses_are_blamed_on_the_given_argument(backend, masses, named):
    with pytest.raises(ValueError, match=r"mmot\.sinkhorn: argument " + named):
        mmot.sinkhorn(random_scores(6, 4, dtype=torch.float32), 0.3, 3, backend=backend, **masses)


@pytest.mark.parametrize("group", ["foo", 0, object()])
def test_process_group_of_the_wrong_type_is_named(backend, group):
    scores = random_scores(6, 4)
    for call in (mmot.sinkhorn, mmot.multi_sinkhorn):
        with pytest.raises(TypeError, match=r"argument 'process_group' must be a torch\.distributed ProcessGroup"):
            call(scores, process_group=group, backend=backend)


# ---------------------------------------------------------------- torch.func and forward-mode AD


FUNC_CALLS = {
    "sinkhorn": lambda s: mmot.sinkhorn(s, 0.3, 3),
    "multi_sinkhorn": lambda s: mmot.multi_sinkhorn(s, 2, 0.3, 3),
    "similarity": lambda s: mmot.similarity(s, s.detach() + 1),
    "info_nce": lambda s: mmot.info_nce(s.detach() + 1, s, 0.1),  # differentiated through the second argument
    "anchor_consistency_loss": lambda s: mmot.anchor_consistency_loss(s.tanh(), s.detach().sigmoid(), 0.1),
}


@pytest.mark.parametrize("op", sorted(FUNC_CALLS))
def test_torch_func_gradients_are_refused_by_name(op):
    """torch.func's grad/jvp used to fail inside torch (grad) or give zero tangents silently (jvp)."""
    scores, tangent = random_scores(6, 4, seed=1), random_scores(6, 4, seed=2)
    named = rf"mmot\.{op}: argument '\w+' is being differentiated by a torch\.func transform"
    with pytest.raises(NotImplementedError, match=named):
        torch.func.grad(lambda s: FUNC_CALLS[op](s).sum())(scores)
    with pytest.raises(NotImplementedError, match=named):
        torch.func.jvp(FUNC_CALLS[op], (scores,), (tangent,))
    with torch.autograd.forward_ad.dual_level(), pytest.raises(NotImplementedError, match=named):
        FUNC_CALLS[op](torch.autograd.forward_ad.make_dual(scores, tangent))
    # Reverse mode is the supported way. A weighted sum: the plain sum of a Sinkhorn plan is its
    # fixed total mass, whose exact gradient is zero.
    leaf = scores.clone().requires_grad_()
    out = FUNC_CALLS[op](leaf)
    weights = torch.rand(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    (got,) = torch.autograd.grad((out * weights).sum(), leaf)
    assert bool(torch.isfinite(got).all()) and bool((got != 0).any())


@pytest.mark.parametrize("op", ["sinkhorn", "multi_sinkhorn", "similarity"])
def test_vmap_equals_a_loop(op):
    batch = random_scores(3, 6, 4, seed=3)
    got = torch.vmap(FUNC_CALLS[op])(batch)
    torch.testing.assert_close(got, torch.stack([FUNC_CALLS[op](b) for b in batch]), rtol=1e-12, atol=1e-12)


def test_backends_are_the_parametrised_ones():
    """The compile test above runs every backend (Triton through its interpreter)."""
    assert [getattr(b, "values", (b,))[0] for b in ALL] == ["rust", "torch", "triton"]
