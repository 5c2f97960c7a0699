"""mmot.pairwise_similarity_regression (PCMR) on every backend.

Against mmot.reference and the literal per-pair N×N similarities (naive.py), with presence masks
(a whole modality missing, a row in one modality only), margins, targets, pair weights and
reductions; gradcheck, opcheck and torch.compile; dtypes and float32 accuracy when the loss is
tiny; the Rust kernel's parts, tiles and thread counts; the Triton kernels on tiny shapes; bad input.
"""

from __future__ import annotations

import os
import subprocess
import sys

import mmot
import pytest
import torch
from backends import NATIVE, needs_triton
from bad_input import bad_input_test
from hypothesis import given, settings
from hypothesis import strategies as st
from mmot import reference
from mmot.ops.similarity_regression import pairwise_similarity_regression_op
from naive import materialized_similarity_regression

OP = "mmot.pairwise_similarity_regression"


def embeddings(m, n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)


def random_mask(m, n, seed, kind):
    """None (all present), a random mask, a whole modality missing, or a row present in one modality only."""
    if kind == "all":
        return None
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(m, n, generator=g) > 0.3
    if kind == "modality":
        mask[int(torch.randint(m, (1,), generator=g))] = False
    elif kind == "lonely":
        row = int(torch.randint(n, (1,), generator=g))
        mask[:, row] = False
        mask[0, row] = True
    return mask


def weighted(losses, weights, mask, n, reduction):
    """The reductions written out from an (M, M) matrix of per-pair losses."""
    m = losses.shape[0]
    total, denominator = losses.new_zeros(()), losses.new_zeros(())
    for p in range(m):
        for q in range(p + 1, m):
            w = 1.0 if weights is None else weights[p, q].double()
            total = total + w * losses[p, q]
            shared = n if mask is None else int((mask[p] & mask[q]).sum())
            if shared > 0:
                denominator = denominator + w
    if reduction == "sum":
        return total
    return total / denominator if denominator > 0 else total * 0.0


# ---------------------------------------------------------------- values and gradients


@settings(deadline=None, max_examples=60)
@given(
    m=st.integers(2, 4),
    n=st.integers(1, 20),
    d=st.integers(0, 5).map(lambda k: 2 * k + 1),
    kind=st.sampled_from(["all", "random", "modality", "lonely"]),
    margin=st.sampled_from([None, 0.0, 0.15]),
    targets=st.sampled_from([(1.0, 0.0), (0.8, 0.1), (0.5, -0.2)]),
    normalize=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_values_and_gradients_float64(m, n, d, kind, margin, targets, normalize, seed):
    x = embeddings(m, n, d, seed)
    mask = random_mask(m, n, seed, kind)
    t, u = targets
    want = materialized_similarity_regression(x, mask, t, u, margin, normalize)
    spec = reference.pairwise_similarity_regression(x, mask, t, u, margin, None, normalize, reduction="none")
    torch.testing.assert_close(spec, want, rtol=1e-9, atol=1e-12)
    upstream = torch.randn(m, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).triu(1)
    (want_grad,) = torch.autograd.grad(want, x, upstream)
    kwargs = dict(present=mask, match_target=t, nonmatch_target=u, margin=margin, normalize=normalize, reduction="none")
    for backend in NATIVE:
        got = mmot.pairwise_similarity_regression(x, backend=backend, **kwargs)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        (grad,) = torch.autograd.grad(got, x, upstream)
        torch.testing.assert_close(grad, want_grad, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["all", "modality", "lonely"])
def test_reductions_and_pair_weights(native_backend, reduction, kind):
    m, n = 4, 9
    x = embeddings(m, n, 5, 3)
    mask = random_mask(m, n, 4, kind)
    weights = torch.rand(m, m, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    weights[0, 1] = 0.0
    weights[2, 1] = -5.0  # below the diagonal: never read
    losses = materialized_similarity_regression(x, mask)
    for w in (None, weights):
        got = mmot.pairwise_similarity_regression(x, present=mask, pair_weights=w, reduction=reduction, backend=native_backend)
        want = losses if reduction == "none" else weighted(losses, w, mask, n, reduction)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_all_pairs_empty_give_zero_and_zero_gradients(native_backend):
    x = embeddings(3, 4, 3, 6)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, :2] = True
    mask[1, 2:] = True  # no row shared by any pair
    for reduction in ("mean", "sum"):
        loss = mmot.pairwise_similarity_regression(x, present=mask, reduction=reduction, backend=native_backend)
        assert loss.item() == 0.0 and not torch.isnan(loss)
        (grad,) = torch.autograd.grad(loss, x)
        assert torch.equal(grad, torch.zeros_like(grad))


def test_a_sequence_of_modalities_passes_gradients_to_each(native_backend):
    x = embeddings(3, 7, 5, 7)
    parts = [x[k].detach().clone().requires_grad_(True) for k in range(3)]
    got = mmot.pairwise_similarity_regression(parts, match_target=0.9, backend=native_backend)
    want = mmot.pairwise_similarity_regression(x, match_target=0.9, backend=native_backend)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    grads = torch.autograd.grad(got, parts)
    (whole,) = torch.autograd.grad(want, x)
    for k in range(3):
        assert grads[k].abs().sum() > 0
        torch.testing.assert_close(grads[k], whole[k])


def test_perfect_coordination_is_zero(native_backend):
    """Orthonormal rows shared by every modality: s_ii = 1, s_ij = 0, so the loss is 0."""
    q, _ = torch.linalg.qr(torch.randn(9, 6, generator=torch.Generator().manual_seed(8), dtype=torch.float64))
    x = torch.stack([q.T, 3.0 * q.T, q.T])
    loss = mmot.pairwise_similarity_regression(x, reduction="none", backend=native_backend)
    assert float(loss.abs().max()) < 1e-12
    shifted = mmot.pairwise_similarity_regression(x, match_target=0.5, reduction="none", backend=native_backend)
    torch.testing.assert_close(shifted.triu(1).sum(), torch.tensor(3 * 0.25, dtype=torch.float64))


def test_margin_only_penalises_pairs_above_it(native_backend):
    x = embeddings(2, 12, 5, 9)
    s = torch.nn.functional.normalize(x[0], dim=-1) @ torch.nn.functional.normalize(x[1], dim=-1).T
    off = s[~torch.eye(12, dtype=torch.bool)]
    big = float(off.max()) + 0.01
    hinged = mmot.pairwise_similarity_regression(x, margin=big, reduction="none", backend=native_backend)
    match = materialized_similarity_regression(x, None, 1.0, 0.0, 1e9)  # no non-match term at all
    torch.testing.assert_close(hinged, match, rtol=1e-12, atol=1e-14)
    plain = mmot.pairwise_similarity_regression(x, margin=0.0, reduction="none", backend=native_backend)
    torch.testing.assert_close(plain[0, 1], match[0, 1] + off.clamp_min(0).square().mean(), rtol=1e-10, atol=1e-13)


# ---------------------------------------------------------------- precision


@pytest.mark.parametrize("n, d", [(16, 33), (64, 65), (200, 256)])
def test_float32_is_accurate_when_the_loss_is_tiny(native_backend, n, d):
    """Orthonormal rows and modalities 1e-3 apart: the loss is about 1e-6. The Gram form's
    rounding is about u·n·√D on a non-match sum divided by K = n(n − 1), here below 1% of the loss."""
    g = torch.Generator().manual_seed(n)
    q, _ = torch.linalg.qr(torch.randn(d, n, generator=g, dtype=torch.float64))
    x = torch.stack([q.T + 1e-3 * torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(3)])
    want = materialized_similarity_regression(x).sum() / 3
    assert 1e-7 < float(want) < 1e-5
    got = mmot.pairwise_similarity_regression(x.float(), backend=native_backend)
    assert got.dtype == torch.float32
    assert abs(float(got) - float(want)) < 1e-2 * float(want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("margin", [None, 0.1])
def test_low_precision_dtypes(native_backend, dtype, margin):
    x = embeddings(3, 10, 7, 10, dtype)
    mask = random_mask(3, 10, 11, "random")
    got = mmot.pairwise_similarity_regression(x, present=mask, margin=margin, backend=native_backend)
    assert got.dtype == dtype
    want = reference.pairwise_similarity_regression(x.detach().double().to(dtype).double(), mask, margin=margin)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    (grad,) = torch.autograd.grad(got, x)
    assert grad.dtype == dtype and bool(torch.isfinite(grad).all())


# ---------------------------------------------------------------- autograd and torch integration


@pytest.mark.parametrize("margin", [None, 0.05])
@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck(native_backend, margin, normalize):
    x = embeddings(3, 6, 3, 12)
    mask = random_mask(3, 6, 13, "lonely")
    for present in (None, mask):
        assert torch.autograd.gradcheck(
            lambda z, present=present: mmot.pairwise_similarity_regression(
                z,
                present=present,
                margin=margin,
                match_target=0.7,
                nonmatch_target=0.1,
                normalize=normalize,
                reduction="none",
                backend=native_backend,
            ),
            (x,),
        )


def test_empty_inputs(native_backend):
    """N = 0: every pair is empty, the loss is 0. D = 0: the rows are zero, s = 0, so each pair's
    match mean is t² = 1 and the non-match mean 0."""
    for shape, want in (((3, 0, 4), 0.0), ((2, 5, 0), 1.0)):
        x = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
        loss = mmot.pairwise_similarity_regression(x, backend=native_backend)
        assert loss.item() == want
        assert materialized_similarity_regression(x.detach()).triu(1).sum() == want * (shape[0] - 1)
        (grad,) = torch.autograd.grad(loss, x)
        assert grad.shape == x.shape


@pytest.mark.parametrize("margin", [None, 0.1])
def test_opcheck(native_backend, margin):
    x = embeddings(3, 6, 5, 14)
    mask = random_mask(3, 6, 15, "random")
    for present in (None, mask):
        torch.library.opcheck(pairwise_similarity_regression_op, (x, present, 0.9, 0.1, margin, True, native_backend))


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_with_changing_sizes(native_backend, dynamic):
    torch._dynamo.reset()

    def step(x, mask, w):
        return mmot.pairwise_similarity_regression(
            x, present=mask, pair_weights=w, backend=native_backend
        ) + mmot.pairwise_similarity_regression(x, margin=0.1, reduction="sum", backend=native_backend)

    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for n, d in ((8, 5), (11, 5), (6, 7)):
        x = embeddings(3, n, d, n)
        mask = random_mask(3, n, n, "random")
        w = torch.rand(3, 3, dtype=torch.float64)
        loss = compiled(x, mask, w)
        want = step(x, mask, w)
        torch.testing.assert_close(loss, want)
        torch.testing.assert_close(torch.autograd.grad(loss, x)[0], torch.autograd.grad(want, x)[0])


def test_non_finite_in_non_finite_out_with_checks_off(native_backend):
    x = embeddings(2, 5, 3, 16).detach()
    x[0, 1, 1] = float("nan")
    previous = mmot.set_checks(False) if hasattr(mmot, "set_checks") else None
    try:
        if previous is None:
            pytest.skip("no public switch for value checks")
        loss = mmot.pairwise_similarity_regression(x, backend=native_backend)
        assert torch.isnan(loss)
    finally:
        if previous is not None:
            mmot.set_checks(previous)


# ---------------------------------------------------------------- Rust kernel: parts, tiles, threads


@pytest.mark.parametrize("kind", ["all", "random"])
def test_rust_several_parts_and_chunks_float64(kind):
    """N = 4500 rows: three Gram parts of 2048 (the last ragged) of 256-row chunks."""
    x = embeddings(3, 4500, 9, 17)
    mask = random_mask(3, 4500, 18, kind)
    want = reference.pairwise_similarity_regression(x, mask, 0.9, 0.05, reduction="sum")
    got = mmot.pairwise_similarity_regression(x, present=mask, match_target=0.9, nonmatch_target=0.05, reduction="sum", backend="rust")
    torch.testing.assert_close(got, want, rtol=1e-11, atol=0)
    (g,) = torch.autograd.grad(got, x)
    (w,) = torch.autograd.grad(
        mmot.pairwise_similarity_regression(x, present=mask, match_target=0.9, nonmatch_target=0.05, reduction="sum", backend="torch"), x
    )
    torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9 * float(w.abs().max()))


def test_rust_margin_several_tiles_float64():
    """N = 1300: six row chunks of 256 and two column tiles of 1024, the last ragged."""
    x = embeddings(2, 1300, 6, 19)
    mask = random_mask(2, 1300, 20, "random")
    kwargs = dict(present=mask, margin=0.2, nonmatch_target=0.1, reduction="sum")
    got = mmot.pairwise_similarity_regression(x, backend="rust", **kwargs)
    want = reference.pairwise_similarity_regression(x, mask, 1.0, 0.1, 0.2, reduction="sum")
    torch.testing.assert_close(got, want, rtol=1e-11, atol=0)
    (g,) = torch.autograd.grad(got, x)
    (w,) = torch.autograd.grad(mmot.pairwise_similarity_regression(x, backend="torch", **kwargs), x)
    torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9 * float(w.abs().max()))


def test_rust_is_deterministic_across_thread_counts(tmp_path):
    script = (
        "import torch, mmot, sys; g = torch.Generator().manual_seed(1);"
        "x = torch.randn(3, 5000, 40, generator=g, requires_grad=True); m = torch.rand(3, 5000, generator=g) > 0.2;"
        "l = mmot.pairwise_similarity_regression(x, backend='rust') + mmot.pairwise_similarity_regression(x, present=m, backend='rust')"
        " + mmot.pairwise_similarity_regression(x[:, :1500], present=m[:, :1500], margin=0.1, backend='rust');"
        "l.backward(); torch.save((l.detach(), x.grad), sys.argv[1])"
    )
    results = []
    for threads in ("1", "3"):
        path = tmp_path / f"threads-{threads}.pt"
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, env=dict(os.environ, MMOT_NUM_THREADS=threads))
        results.append(torch.load(path))
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- Triton interpreter, tiny shapes


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("margin", [None, 0.05])
@pytest.mark.parametrize("kind", ["all", "lonely"])
def test_triton_forward_and_backward(dtype, margin, kind, monkeypatch):
    """21 rows and 37 features: two row tiles, three Gram tiles per side (16 each under the
    interpreter), two similarity column tiles; the Grams' rows in three splits of 8."""
    from mmot.kernels import similarity_regression as kernels

    monkeypatch.setattr(kernels, "SPLIT_ROWS", 8)
    x = embeddings(3, 21, 37, 21, dtype)
    mask = random_mask(3, 21, 22, kind)
    kwargs = dict(present=mask, margin=margin, match_target=0.8, nonmatch_target=0.1, reduction="none")
    got = mmot.pairwise_similarity_regression(x, backend="triton", **kwargs)
    want = mmot.pairwise_similarity_regression(x, backend="torch", **kwargs)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(got, want, **tol)
    upstream = torch.randn(3, 3, generator=torch.Generator().manual_seed(23), dtype=dtype)
    (g,) = torch.autograd.grad(got, x, upstream)
    (w,) = torch.autograd.grad(want, x, upstream)
    torch.testing.assert_close(g, w, **tol)
    if dtype == torch.float64:
        naive = materialized_similarity_regression(x.detach(), mask, 0.8, 0.1, margin)
        torch.testing.assert_close(got, naive, **tol)


@needs_triton
@pytest.mark.parametrize("margin", [None, 0.05])
def test_triton_gradcheck(margin):
    x = embeddings(2, 5, 3, 24)
    mask = random_mask(2, 5, 25, "lonely")
    for present in (None, mask):
        assert torch.autograd.gradcheck(
            lambda z, present=present: mmot.pairwise_similarity_regression(
                z, present=present, margin=margin, match_target=0.7, nonmatch_target=0.1, reduction="none", backend="triton"
            ),
            (x,),
        )


# ---------------------------------------------------------------- bad input

X = torch.randn(3, 6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
NAN = X.clone()
NAN[1, 2, 0] = float("nan")
MASK = torch.ones(3, 6, dtype=torch.bool)


def psr(*args, **kwargs):
    return mmot.pairwise_similarity_regression(*args, **kwargs)


test_bad_input_is_named = bad_input_test(
    OP,
    [
        (lambda: psr(X.numpy()), TypeError, "'embeddings'", "torch.Tensor"),
        (lambda: psr(X.long()), TypeError, "'embeddings'", "floating"),
        (lambda: psr(X[0]), ValueError, "'embeddings'", "(M, N, D)"),
        (lambda: psr(X[None]), ValueError, "'embeddings'", "(M, N, D)"),
        (lambda: psr(X[:1]), ValueError, "'embeddings'", "M >= 2"),
        (lambda: psr([X[0]]), ValueError, "'embeddings'", "at least 2"),
        (lambda: psr([X[0], X[1, :5]]), ValueError, "'embeddings[1]'", "shape"),
        (lambda: psr([X[0], X[1].float()]), TypeError, "'embeddings[1]'", "dtype"),
        (lambda: psr([X[0], X[1].to("meta")]), ValueError, "'embeddings[1]'", "device"),
        (lambda: psr([X[0], X[1, 0]]), ValueError, "'embeddings[1]'", "(N, D)"),
        (lambda: psr(X, present=MASK.float()), TypeError, "'present'", "bool"),
        (lambda: psr(X, present=MASK[:, :5]), ValueError, "'present'", "(M, N)"),
        (lambda: psr(X, present=[[True]]), TypeError, "'present'", "torch.Tensor"),
        (lambda: psr(X, match_target="1"), TypeError, "'match_target'", "real"),
        (lambda: psr(X, nonmatch_target=float("nan")), ValueError, "'nonmatch_target'", "finite"),
        (lambda: psr(X, margin=-0.1), ValueError, "'margin'", ">= 0"),
        (lambda: psr(X, pair_weights=torch.ones(2, 2, dtype=torch.float64)), ValueError, "'pair_weights'", "(M, M)"),
        (lambda: psr(X, pair_weights=-torch.ones(3, 3, dtype=torch.float64)), ValueError, "'pair_weights'", ">= 0"),
        (lambda: psr(X, pair_weights=torch.ones(3, 3, dtype=torch.long)), TypeError, "'pair_weights'", "floating"),
        (lambda: psr(X, normalize=1), TypeError, "'normalize'", "bool"),
        (lambda: psr(X, reduction="avg"), ValueError, "'reduction'", "mean"),
        (lambda: psr(NAN, backend="torch"), ValueError, "'embeddings'", "finite"),
        (lambda: psr(NAN, backend="rust"), ValueError, "'embeddings'", "finite"),
        (lambda: psr(X, backend="gpu"), ValueError, "'backend'"),
        (lambda: psr(X.to("meta"), backend="rust"), ValueError, "backend 'rust'", "CPU"),
    ],
)
