"""Reliability of the loss and similarity ops at the edges of their dtypes, on every backend.

Each test compares with a float64 (or exact) evaluation of the naive form:
- anchor_consistency_loss where e^{sim/τ} overflows the dtype (cosines near 1 at small τ);
- non-finite inputs with the checks off give non-finite results;
- info_nce's mean/sum reductions in float16 at large N.
"""

import math

import mmot
import pytest
import torch

# ---------------------------------------------------------------- anchor_consistency: overflow


def exact_anchor(sim, target, temperature):
    """Per-entry loss and gradient in float64 from the split form (finite where they are)."""
    x = sim.double() / temperature
    t = target.double()
    one_minus = 1.0 - t
    lin = torch.where(one_minus == 0, 0.0, torch.sign(one_minus) * torch.exp(x + torch.log(one_minus.abs())))
    z = torch.exp(x)
    soft = torch.log1p(torch.exp(-z))
    damp = torch.where(torch.isinf(z), 0.0, z * torch.sigmoid(-z))
    return lin + soft, (lin - damp) / temperature


def overflow_case(dtype):
    """Cosines near 1 at τ = 0.01 (x up to 100 > log(max float32) = 88.7) with min-max-style
    targets: 1 exactly, just below 1, 0 and in between, and ordinary entries."""
    sim = torch.tensor([1.0, 0.999, 0.97, 0.9, 0.5, 0.2, -0.3, 0.85, 0.95, 0.1], dtype=dtype)
    below_one = 1.0 - torch.finfo(dtype).eps
    target = torch.tensor([1.0, 1.0, below_one, 1.0, 0.0, 0.5, 0.2, 0.0, 1.0, 0.7], dtype=dtype)
    return sim, target, 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_anchor_consistency_finite_where_exp_overflows(backend, dtype):
    sim, target, tau = overflow_case(dtype)
    terms, grads = exact_anchor(sim, target, tau)
    s = sim.clone().requires_grad_(True)
    loss = mmot.anchor_consistency_loss(s, target, tau, backend=backend)
    (grad,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(loss) and torch.isfinite(grad).all(), (loss, grad)
    rtol = 1e-5 if dtype == torch.float32 else 1e-11
    torch.testing.assert_close(loss.double(), terms.mean(), rtol=rtol, atol=0)
    torch.testing.assert_close(grad.double(), grads / sim.numel(), rtol=rtol, atol=1e-30)


def test_anchor_consistency_overflowing_loss_is_inf_with_finite_or_inf_gradient(backend):
    """Where the exact loss passes float32's range the loss is +inf (not NaN); entries with t = 1
    keep their (0) gradient and the overflowing entry's gradient is +inf."""
    sim = torch.tensor([1.5, 1.5, 0.2])
    target = torch.tensor([0.0, 1.0, 0.5])
    s = sim.clone().requires_grad_(True)
    loss = mmot.anchor_consistency_loss(s, target, 0.01, backend=backend)
    (grad,) = torch.autograd.grad(loss, s)
    assert loss.item() == math.inf
    assert grad[0].item() == math.inf and grad[1].item() == 0.0
    torch.testing.assert_close(grad[2:].double(), exact_anchor(sim[2:], target[2:], 0.01)[1] / 3, rtol=1e-5, atol=0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["sim", "target"])
def test_anchor_consistency_unchecked_non_finite_gives_nan(backend, bad, where):
    sim = torch.linspace(-0.9, 0.9, 12, dtype=torch.float32)
    target = torch.linspace(0.0, 1.0, 12, dtype=torch.float32)
    (sim if where == "sim" else target)[5] = bad
    s = sim.clone().requires_grad_(True)
    previous = mmot.set_checks(False)
    try:
        loss = mmot.anchor_consistency_loss(s, target, 0.1, backend=backend)
        (grad,) = torch.autograd.grad(loss, s)
    finally:
        mmot.set_checks(previous)
    assert torch.isnan(loss)
    assert torch.isnan(grad[5]) and torch.isfinite(grad[:5]).all()


# ---------------------------------------------------------------- info_nce: fp16 reductions


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_info_nce_float16_reductions_accumulate_in_float32(native_backend, reduction):
    """N = 2304 pairs of log N ≈ 7.7 each sum to ~35000 per direction: past float16's 65504 when
    symmetric, although the mean (~15) is not."""
    n, d = 2304, 8
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(n, d, generator=gen).half()
    b = torch.randn(n, d, generator=gen).half()
    per_pair = mmot.info_nce(a, b, temperature=1.0, reduction="none", backend=native_backend).double()
    got = mmot.info_nce(a, b, temperature=1.0, reduction=reduction, backend=native_backend)
    assert got.dtype == torch.float16
    want = per_pair.sum() if reduction == "sum" else per_pair.mean()
    if reduction == "sum" and want > torch.finfo(torch.float16).max:
        assert got.item() == math.inf
    else:
        assert torch.isfinite(got)
        torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=0)


# ---------------------------------------------------------------- similarity: huge rows


@pytest.mark.parametrize("magnitude", [1e20, 1e30])
def test_similarity_normalize_huge_rows_torch(magnitude):
    """Rows whose squared norm overflows float32 still give their cosines (the torch backend)."""
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 6, generator=gen), torch.randn(5, 6, generator=gen)
    want = torch.nn.functional.normalize(x.double(), dim=-1) @ torch.nn.functional.normalize(y.double(), dim=-1).T
    xs = (x * magnitude).requires_grad_(True)
    got = mmot.similarity(xs, y * magnitude, backend="torch")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(got.sum(), xs)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0
