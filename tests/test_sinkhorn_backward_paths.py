"""The Rust reverse passes of mmot.sinkhorn and mmot.multi_sinkhorn on each of their paths.

The plain-domain backward of mmot.sinkhorn keeps every step's plan factored (the cached E times
recorded row and column factors); batches of small problems of both ops run their backward in
SIMD lanes, several problems at once. These tests hold each path to autograd through
mmot.reference in float64, a problem's gradient to the same bits alone and in any batch, and
the gradients to the same bits for any thread count.
"""

import math
import os
import subprocess
import sys

import mmot
import pytest
import torch
from gradients import F32, F64, assert_grads_close, value_and_grads
from hypothesis import given, settings
from hypothesis import strategies as st
from inputs import random_scores
from mmot import reference

# Batches of problems up to 1024 elements take the lane paths; a batch that is not a multiple of
# the lane count (8 in float64, 16 in float32) has a short last group.
SMALL = [(37, 4, 4), (9, 16, 16), (19, 3, 5), (5, 1, 6), (6, 7, 1), (3, 32, 32), (2, 5, 200)]
# One problem over several row chunks (the streaming path), and a wide one.
STREAMING = [(2, 2100, 5), (1, 600, 70), (1, 40, 1500)]


def sinkhorn_reference(eps, n_iters, log_domain):
    def fn(s):
        n, k = s.shape[-2:]
        rows = torch.ones(s.shape[:-1], dtype=torch.float64)
        cols = torch.full(s.shape[:-2] + (k,), n / k, dtype=torch.float64)
        return reference.sinkhorn(s.double(), eps, n_iters, rows, cols, log_domain).to(s.dtype)

    return fn


def multi_reference(k, eps, n_iters, normalize):
    def fn(s):
        n, kk = s.shape[-2:]
        weights = [0.25] * (kk - k) + [1.0] * k
        mass = torch.full(s.shape[:-2] + (kk,), n / kk, dtype=torch.float64)
        return reference.multi_sinkhorn(s.double(), eps, n_iters, weights, k, mass, normalize, "auto").to(s.dtype)

    return fn


def check(fn, ref, scores, dtype):
    scores = scores.to(dtype)
    upstream = random_scores(*scores.shape, seed=99).to(dtype)
    out, got = value_and_grads(fn, [scores], upstream)
    want_out, want = value_and_grads(ref, [scores.double()], upstream.double())
    torch.testing.assert_close(out.double(), want_out, **(F64 if dtype == torch.float64 else F32))
    assert_grads_close(got, want, dtype)
    assert bool(torch.isfinite(got[0]).all())


@pytest.mark.parametrize("shape", SMALL + STREAMING)
@pytest.mark.parametrize("n_iters", [1, 2, 7])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sinkhorn_backward_matches_reference(shape, n_iters, dtype):
    scores = random_scores(*shape, seed=sum(shape) + n_iters)
    fn = lambda s: mmot.sinkhorn(s, 0.3, n_iters, backend="rust")  # noqa: E731
    check(fn, sinkhorn_reference(0.3, n_iters, "off"), scores, dtype)


@pytest.mark.parametrize("shape", [(21, 6, 7), (1, 600, 70)])
@pytest.mark.parametrize("eps", [0.02, 0.005])  # near and past the plain domain's limit
def test_sinkhorn_backward_at_small_eps(shape, eps):
    scores = random_scores(*shape, seed=3)
    fn = lambda s: mmot.sinkhorn(s, eps, 4, backend="rust")  # noqa: E731
    check(fn, sinkhorn_reference(eps, 4, "auto"), scores, torch.float64)


def potential_growth(scores, eps, n_iters):
    """Naive float64 log-domain iteration: the largest row plus column growth of an earlier plan over the last."""
    n, k = scores.shape
    lg = scores.double() / eps
    log_r, log_c = torch.zeros(n, dtype=torch.float64), torch.full((k,), math.log(n / k), dtype=torch.float64)
    rows, cols = [torch.zeros(n, dtype=torch.float64)], []
    for _ in range(n_iters):
        cols.append(log_c - torch.logsumexp(lg + rows[-1][:, None], 0))
        rows.append(log_r - torch.logsumexp(lg + cols[-1][None, :], 1))
    row_growth = max(float((a - rows[-1]).max()) for a in rows[:-1])
    col_growth = max(float((b - cols[-1]).max()) for b in cols)
    return row_growth + col_growth


# The log backward runs the plain reverse pass over the last plan while the earlier plans are
# that plan times factors below e^16, and recomputes every plan otherwise: one case of each.
LOG_CASES = [(shape, 0.3, 5, True) for shape in STREAMING] + [((1, 40, 1500), 0.002, 6, True), ((1, 600, 70), 0.002, 6, False)]


@pytest.mark.parametrize(("shape", "eps", "n_iters", "scaled"), LOG_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sinkhorn_log_backward_on_both_reverse_passes(shape, eps, n_iters, scaled, dtype):
    scores = random_scores(*shape, seed=sum(shape))
    assert all((potential_growth(s, eps, n_iters) <= 16) == scaled for s in scores)
    fn = lambda s: mmot.sinkhorn(s, eps, n_iters, log_domain=True, backend="rust")  # noqa: E731
    check(fn, sinkhorn_reference(eps, n_iters, "on"), scores, dtype)


@pytest.mark.parametrize("shape", SMALL + STREAMING[:2])
@pytest.mark.parametrize("n_iters", [1, 2, 6])
@pytest.mark.parametrize("normalize", ["minmax", "none"])
def test_multi_sinkhorn_backward_matches_reference(shape, n_iters, normalize):
    k = max(1, shape[-1] // 2)
    scores = random_scores(*shape, seed=sum(shape) + n_iters)
    fn = lambda s: mmot.multi_sinkhorn(s, k, 0.3, n_iters, normalize=normalize, backend="rust")  # noqa: E731
    check(fn, multi_reference(k, 0.3, n_iters, normalize), scores, torch.float64)


@pytest.mark.parametrize("shape", [(37, 4, 4), (19, 16, 16)])
def test_multi_sinkhorn_backward_float32(shape):
    scores = random_scores(*shape, seed=5)
    k = shape[-1] // 2
    fn = lambda s: mmot.multi_sinkhorn(s, k, 0.3, 5, backend="rust")  # noqa: E731
    check(fn, multi_reference(k, 0.3, 5, "minmax"), scores, torch.float32)


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 20),
    n=st.integers(1, 12),
    kk=st.integers(2, 12),
    n_iters=st.integers(1, 9),
    eps=st.floats(0.1, 2.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_hypothesis_small_batches(b, n, kk, n_iters, eps, seed):
    scores = random_scores(b, n, kk, seed=seed)
    fn = lambda s: mmot.sinkhorn(s, eps, n_iters, backend="rust")  # noqa: E731
    check(fn, sinkhorn_reference(eps, n_iters, "auto"), scores, torch.float64)
    k = kk // 2
    fn = lambda s: mmot.multi_sinkhorn(s, k, eps, n_iters, backend="rust")  # noqa: E731
    check(fn, multi_reference(k, eps, n_iters, "minmax"), scores, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_problems_gradient_does_not_depend_on_its_batch(dtype):
    scores = random_scores(23, 5, 6, seed=7, dtype=dtype)
    upstream = random_scores(23, 5, 6, seed=8, dtype=dtype)
    ops = [lambda s: mmot.sinkhorn(s, 0.3, 6, backend="rust"), lambda s: mmot.multi_sinkhorn(s, 3, 0.3, 6, backend="rust")]
    for op in ops:
        whole = value_and_grads(op, [scores], upstream)[1][0]
        for i in (0, 9, 22):
            alone = value_and_grads(op, [scores[i]], upstream[i])[1][0]
            assert torch.equal(alone, whole[i])
        # In another group and lane of a shifted batch.
        shifted = value_and_grads(op, [scores[3:]], upstream[3:])[1][0]
        assert torch.equal(shifted, whole[3:])


def test_gradients_do_not_depend_on_thread_count():
    code = (
        "import torch, mmot, hashlib\n"
        "g = torch.Generator().manual_seed(0)\n"
        "out = []\n"
        "for shape in [(37, 4, 4), (21, 16, 16), (2, 2100, 5), (1, 600, 70)]:\n"
        "    for dtype in (torch.float32, torch.float64):\n"
        "        s = torch.randn(*shape, generator=g).to(dtype).requires_grad_(True)\n"
        "        u = torch.randn(*shape, generator=g).to(dtype)\n"
        "        for y in (mmot.sinkhorn(s, 0.3, 5), mmot.multi_sinkhorn(s, shape[-1] // 2, 0.3, 5)):\n"
        "            (grad,) = torch.autograd.grad(y, s, u)\n"
        "            out.append(hashlib.sha1(grad.detach().numpy().tobytes()).hexdigest())\n"
        "print(out)\n"
    )
    outputs = set()
    for threads in (1, 2, 3):
        env = {**os.environ, "MMOT_NUM_THREADS": str(threads)}
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        outputs.add(result.stdout)
    assert len(outputs) == 1, outputs
