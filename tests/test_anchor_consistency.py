"""mmot.anchor_consistency_loss against F.binary_cross_entropy_with_logits written out here."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import mmot
from mmot.ops.anchor_consistency import anchor_consistency_op

BACKENDS = ["rust", "torch"]


def naive(sim, target, temperature):
    z = torch.exp(sim / temperature)
    # softplus(z) - t z, averaged over every entry
    return (torch.log1p(torch.exp(-z)) + z - target * z).mean()


def cosine(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)


@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    temperature=st.floats(0.05, 2.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_values_and_gradients_float64(shape, temperature, seed):
    sim = cosine(*shape, seed=seed).requires_grad_(True)
    target = cosine(*shape, seed=seed + 1).abs()
    want = naive(sim, target, temperature)
    (want_grad,) = torch.autograd.grad(want, sim)
    torch.testing.assert_close(want, F.binary_cross_entropy_with_logits(torch.exp(sim / temperature), target))
    for backend in BACKENDS:
        got = mmot.anchor_consistency_loss(sim, target, temperature, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        (grad,) = torch.autograd.grad(got, sim)
        torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-13)


def test_target_gets_no_gradient_and_gradcheck(backend):
    sim = cosine(7, 5, seed=1).requires_grad_(True)
    target = cosine(7, 5, seed=2).abs().requires_grad_(True)
    loss = mmot.anchor_consistency_loss(sim, target, backend=backend)
    loss.backward()
    assert target.grad is None
    torch.autograd.gradcheck(lambda s: mmot.anchor_consistency_loss(s, target.detach(), 0.3, backend=backend), (sim.detach().requires_grad_(True),))


def test_sspc_shape_float32(backend):
    sim = cosine(2160, 64, seed=3, dtype=torch.float32).requires_grad_(True)
    with torch.no_grad():
        target = mmot.multi_sinkhorn(sim, 32)
    got = mmot.anchor_consistency_loss(sim, target, 0.1, backend=backend)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), naive(sim.detach().double(), target.double(), 0.1), rtol=1e-5, atol=1e-6)
    got.backward()
    assert bool(torch.isfinite(sim.grad).all())


def test_empty_is_zero(backend):
    sim = torch.zeros(0, 4, dtype=torch.float64, requires_grad=True)
    loss = mmot.anchor_consistency_loss(sim, torch.zeros(0, 4, dtype=torch.float64), backend=backend)
    assert loss.item() == 0.0


def test_opcheck_and_compile(backend):
    sim = cosine(6, 4, seed=4).requires_grad_(True)
    target = cosine(6, 4, seed=5).abs()
    torch.library.opcheck(anchor_consistency_op, (sim, target, 0.1, backend))
    torch._dynamo.reset()
    compiled = torch.compile(lambda s, t: mmot.anchor_consistency_loss(s * 1.0, t, backend=backend), fullgraph=True, backend="aot_eager")
    loss = compiled(sim, target)
    (grad,) = torch.autograd.grad(loss, sim)
    (want,) = torch.autograd.grad(naive(sim, target, 0.1), sim)
    torch.testing.assert_close(grad, want)


S = cosine(5, 3)
BAD = [
    (lambda: mmot.anchor_consistency_loss(S.numpy(), S), TypeError, ["mmot.anchor_consistency_loss", "'sim'", "torch.Tensor"]),
    (lambda: mmot.anchor_consistency_loss(S.long(), S), TypeError, ["'sim'", "floating"]),
    (lambda: mmot.anchor_consistency_loss(torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.5)), ValueError, ["'sim'"]),
    (lambda: mmot.anchor_consistency_loss(S, S.numpy()), TypeError, ["'target'", "torch.Tensor"]),
    (lambda: mmot.anchor_consistency_loss(S, S.long()), TypeError, ["'target'", "floating"]),
    (lambda: mmot.anchor_consistency_loss(S, S[:4]), ValueError, ["'target'", "shape"]),
    (lambda: mmot.anchor_consistency_loss(S, S.to("meta")), ValueError, ["'target'", "device"]),
    (lambda: mmot.anchor_consistency_loss(S, S, 0.0), ValueError, ["'temperature'", "positive"]),
    (lambda: mmot.anchor_consistency_loss(S, S, None), TypeError, ["'temperature'"]),
    (lambda: mmot.anchor_consistency_loss(S * float("nan"), S), ValueError, ["'sim'", "finite"]),
    (lambda: mmot.anchor_consistency_loss(S, S * float("inf")), ValueError, ["'target'", "finite"]),
    (lambda: mmot.anchor_consistency_loss(S, S, backend="cuda"), ValueError, ["'backend'"]),
]


@pytest.mark.parametrize("index", range(len(BAD)))
def test_bad_input_is_named(index):
    call, error, words = BAD[index]
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{word!r} missing from: {info.value}"
