"""mmot.anchor_consistency_loss on every backend.

Against F.binary_cross_entropy_with_logits and its softplus form written out (naive.py), the
Triton kernel over several programs, and its bad input.
"""

import mmot
import pytest
import torch
import torch.nn.functional as F
from backends import NATIVE, needs_triton
from bad_input import bad_input_test
from hypothesis import given
from hypothesis import strategies as st
from inputs import uniform_cosines
from mmot.ops.anchor_consistency import anchor_consistency_op
from naive import softplus_anchor_consistency

# ---------------------------------------------------------------- values and gradients


@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    temperature=st.floats(0.05, 2.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_values_and_gradients_float64(shape, temperature, seed):
    sim = uniform_cosines(*shape, seed=seed).requires_grad_(True)
    target = uniform_cosines(*shape, seed=seed + 1).abs()
    want = softplus_anchor_consistency(sim, target, temperature)
    (want_grad,) = torch.autograd.grad(want, sim)
    torch.testing.assert_close(want, F.binary_cross_entropy_with_logits(torch.exp(sim / temperature), target))
    for backend in NATIVE:
        got = mmot.anchor_consistency_loss(sim, target, temperature, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        (grad,) = torch.autograd.grad(got, sim)
        torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-13)


def test_target_gets_no_gradient_and_gradcheck(backend):
    sim = uniform_cosines(7, 5, seed=1).requires_grad_(True)
    target = uniform_cosines(7, 5, seed=2).abs().requires_grad_(True)
    loss = mmot.anchor_consistency_loss(sim, target, backend=backend)
    loss.backward()
    assert target.grad is None
    assert torch.autograd.gradcheck(
        lambda s: mmot.anchor_consistency_loss(s, target.detach(), 0.3, backend=backend), (sim.detach().requires_grad_(True),)
    )


def test_sspc_shape_float32(native_backend):
    sim = uniform_cosines(2160, 64, seed=3, dtype=torch.float32).requires_grad_(True)
    with torch.no_grad():
        target = mmot.multi_sinkhorn(sim, 32)
    got = mmot.anchor_consistency_loss(sim, target, 0.1, backend=native_backend)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), softplus_anchor_consistency(sim.detach().double(), target.double(), 0.1), rtol=1e-5, atol=1e-6)
    got.backward()
    assert bool(torch.isfinite(sim.grad).all())


def test_empty_is_zero(backend):
    sim = torch.zeros(0, 4, dtype=torch.float64, requires_grad=True)
    loss = mmot.anchor_consistency_loss(sim, torch.zeros(0, 4, dtype=torch.float64), backend=backend)
    assert loss.item() == 0.0


# ---------------------------------------------------------------- Triton interpreter, tiny shapes


@pytest.fixture
def small_blocks(monkeypatch):
    # 16 entries per program: the tiny inputs below span several programs and a ragged last one.
    from mmot.kernels import anchor_consistency as triton_kernel

    monkeypatch.setattr(triton_kernel, "FORCE_BLOCK", 16)


@needs_triton
@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 9), (1,), (33,)])
def test_triton_values_and_gradients_float64(small_blocks, shape):
    sim = uniform_cosines(*shape, seed=11).requires_grad_(True)
    target = uniform_cosines(*shape, seed=12).abs()
    for temperature in (0.07, 0.3, 1.5):
        got = mmot.anchor_consistency_loss(sim, target, temperature, backend="triton")
        want = softplus_anchor_consistency(sim, target, temperature)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        (grad,) = torch.autograd.grad(got, sim)
        (want_grad,) = torch.autograd.grad(want, sim)
        torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-13)


@needs_triton
def test_triton_gradcheck_upstream_grad_and_no_target_grad(small_blocks):
    sim = uniform_cosines(6, 5, seed=13).requires_grad_(True)
    target = uniform_cosines(6, 5, seed=14).abs().requires_grad_(True)
    loss = mmot.anchor_consistency_loss(sim, target, 0.2, backend="triton")
    (3.0 * loss).backward()
    assert target.grad is None
    want = torch.autograd.grad(3.0 * softplus_anchor_consistency(sim, target.detach(), 0.2), sim)[0]
    torch.testing.assert_close(sim.grad, want)
    assert torch.autograd.gradcheck(
        lambda s: mmot.anchor_consistency_loss(s, target.detach(), 0.3, backend="triton"), (sim.detach().requires_grad_(True),)
    )


@needs_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_triton_low_precision_matches_rust(small_blocks, dtype, tol):
    sim = uniform_cosines(9, 7, seed=15, dtype=dtype).requires_grad_(True)
    target = uniform_cosines(9, 7, seed=16, dtype=dtype).abs()
    got = mmot.anchor_consistency_loss(sim, target, 0.1, backend="triton")
    assert got.dtype == dtype
    want = mmot.anchor_consistency_loss(sim, target, 0.1, backend="rust")
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    (grad,) = torch.autograd.grad(got, sim)
    (want_grad,) = torch.autograd.grad(want, sim)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.float(), want_grad.float(), rtol=tol, atol=tol)


@needs_triton
def test_triton_large_logits_stay_finite(small_blocks):
    # exp(sim/τ) up to e^{50} ≈ 5e21 in float32: the naive log(1 + e^z) would overflow.
    sim = torch.tensor([[5.0, 2.0, -5.0, 0.0], [4.9, 1.0, 3.0, -1.0]], dtype=torch.float32, requires_grad=True)
    target = torch.tensor([[1.0, 0.5, 0.0, 0.2], [1.0, 0.0, 0.7, 1.0]])
    got = mmot.anchor_consistency_loss(sim, target, 0.1, backend="triton")
    want = softplus_anchor_consistency(sim.detach().double(), target.double(), 0.1)
    assert torch.isfinite(got)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    (grad,) = torch.autograd.grad(got, sim)
    assert bool(torch.isfinite(grad).all())
    want_grad = torch.autograd.grad(softplus_anchor_consistency(sim.double(), target.double(), 0.1), sim)[0]
    torch.testing.assert_close(grad.double(), want_grad.double(), rtol=1e-5, atol=1e-6)


@needs_triton
def test_triton_empty_noncontiguous_opcheck(small_blocks):
    empty = torch.zeros(0, 4, dtype=torch.float64, requires_grad=True)
    loss = mmot.anchor_consistency_loss(empty, torch.zeros(0, 4, dtype=torch.float64), backend="triton")
    assert loss.item() == 0.0
    sim = uniform_cosines(5, 8, seed=17).t().requires_grad_(True)  # non-contiguous (8, 5)
    target = uniform_cosines(8, 5, seed=18).abs()
    got = mmot.anchor_consistency_loss(sim, target, 0.1, backend="triton")
    torch.testing.assert_close(got, softplus_anchor_consistency(sim, target, 0.1), rtol=1e-12, atol=1e-12)
    torch.library.opcheck(
        anchor_consistency_op, (uniform_cosines(6, 4, seed=19).requires_grad_(True), uniform_cosines(6, 4, seed=20).abs(), 0.1, "triton")
    )


# ---------------------------------------------------------------- full size on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_gpu_triton_sspc_size(dtype, tol):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    dev = torch.device("cuda")
    # SSPC: 3 modalities × 3 anchor sets of (2160, 64) similarities, plus a large flat case.
    for shape in [(3, 3, 2160, 64), (4096, 4096)]:
        sim = uniform_cosines(*shape, seed=21).to(dev)
        target = uniform_cosines(*shape, seed=22).abs().to(dev)
        x = sim.to(dtype).requires_grad_(True)
        got = mmot.anchor_consistency_loss(x, target.to(dtype), 0.1)  # "auto" on CUDA: Triton
        want = softplus_anchor_consistency(x.detach().double(), target.to(dtype).double(), 0.1)
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
        (grad,) = torch.autograd.grad(got, x)
        xd = x.detach().double().requires_grad_(True)
        (want_grad,) = torch.autograd.grad(softplus_anchor_consistency(xd, target.to(dtype).double(), 0.1), xd)
        scale = want_grad.abs().max()
        torch.testing.assert_close(grad.double() / scale, want_grad / scale, rtol=tol, atol=tol)


# ---------------------------------------------------------------- bad input

S = uniform_cosines(5, 3)

test_bad_input_is_named = bad_input_test(
    "mmot.anchor_consistency_loss",
    [
        (lambda: mmot.anchor_consistency_loss(S.numpy(), S), TypeError, "'sim'", "torch.Tensor"),
        (lambda: mmot.anchor_consistency_loss(S.long(), S), TypeError, "'sim'", "floating"),
        (lambda: mmot.anchor_consistency_loss(torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.5)), ValueError, "'sim'", "shape"),
        (lambda: mmot.anchor_consistency_loss(S, S.numpy()), TypeError, "'target'", "torch.Tensor"),
        (lambda: mmot.anchor_consistency_loss(S, S.long()), TypeError, "'target'", "floating"),
        (lambda: mmot.anchor_consistency_loss(S, S[:4]), ValueError, "'target'", "shape"),
        (lambda: mmot.anchor_consistency_loss(S, S.to("meta")), ValueError, "'target'", "device"),
        (lambda: mmot.anchor_consistency_loss(S, S, 0.0), ValueError, "'temperature'", "positive"),
        (lambda: mmot.anchor_consistency_loss(S, S, None), TypeError, "'temperature'"),
        (lambda: mmot.anchor_consistency_loss(S * float("nan"), S), ValueError, "'sim'", "finite"),
        (lambda: mmot.anchor_consistency_loss(S, S * float("inf")), ValueError, "'target'", "finite"),
        (lambda: mmot.anchor_consistency_loss(S, S, backend="cuda"), ValueError, "'backend'"),
    ],
)
