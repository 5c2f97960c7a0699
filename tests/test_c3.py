"""C3's collapse, corrupt and modality gap, and the ModalityMean and C3 modules, against naive float64 forms."""

import mmot
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st


def naive_unit(x):
    x = x.double()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def rows(n, d, seed, dtype=torch.float32, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) + offset).to(dtype)


@given(
    n=st.integers(1, 40),
    d=st.integers(1, 17),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)
def test_collapse_and_gap_match_naive(n, d, seed, dtype):
    x, y = rows(n, d, seed, dtype, 2.0), rows(n + 3, d, seed + 1, dtype, -1.0)
    mean = naive_unit(rows(50, d, seed + 2, torch.float64, 2.0)).mean(0)
    got = mmot.collapse(x, mean.to(dtype))
    assert got.dtype == dtype and got.shape == x.shape
    tol = 1e-12 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 2e-2)
    want = naive_unit(naive_unit(x) - mean.to(dtype).double())
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    gap = mmot.modality_gap(x, y)
    want_gap = (naive_unit(x).mean(0) - naive_unit(y).mean(0)).norm()
    torch.testing.assert_close(gap.double(), want_gap, rtol=tol, atol=tol)


def test_rows_past_float32_norm_range():
    """Rows whose squared norm overflows float32 still normalise (the scale-safe unit rows)."""
    x = rows(6, 5, 0) * 1e20
    torch.testing.assert_close(mmot.collapse(x, torch.zeros(5)).double(), naive_unit(x.double()), rtol=1e-6, atol=1e-6)


def test_corrupt_is_seeded_noise_then_normalise():
    x = rows(64, 32, 1)
    a = mmot.corrupt(x, 0.5, generator=torch.Generator().manual_seed(7))
    b = mmot.corrupt(x, 0.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a.double(), naive_unit(x.double() + 0.5 * noise.double()), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mmot.corrupt(x, 0.0), torch.nn.functional.normalize(x, dim=-1))
    assert mmot.corrupt(x).dtype == x.dtype and abs(mmot.c3.DEFAULT_SIGMA - 0.016**0.5) < 1e-15


def test_gradients():
    x = rows(5, 4, 2, torch.float64).requires_grad_(True)
    mean = naive_unit(rows(9, 4, 3, torch.float64)).mean(0)
    assert torch.autograd.gradcheck(lambda v: mmot.collapse(v, mean), (x,))
    assert torch.autograd.gradcheck(lambda v: mmot.corrupt(v, 0.3, generator=torch.Generator().manual_seed(1)), (x,))
    y = rows(7, 4, 4, torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(mmot.modality_gap, (x, y))


def test_streaming_mean_equals_batch_mean_and_round_trips():
    x = rows(1001, 12, 5, offset=1.0)
    mean = mmot.nn.ModalityMean(12)
    for chunk in torch.split(x, [1, 400, 3, 597]):
        mean.update(chunk)
    torch.testing.assert_close(mean.mean.double(), naive_unit(x).mean(0), rtol=1e-6, atol=1e-7)
    other = mmot.nn.ModalityMean(12)
    other.load_state_dict(mean.state_dict())
    assert torch.equal(other.mean, mean.mean) and int(other.count) == 1001
    mean.reset()
    with pytest.raises(ValueError, match="no rows seen"):
        _ = mean.mean


def test_collapse_closes_a_constant_offset():
    """Two modalities that share structure but sit around different means: collapse with each
    one's own training mean removes the gap and makes one modality's embedding a stand-in for the
    other's (nearest neighbour across modalities finds the pair)."""
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(200, 16, generator=g)
    offset = 4.0 * torch.nn.functional.normalize(torch.randn(16, generator=g), dim=0)
    a, b = shared + offset, shared - offset + 0.1 * torch.randn(200, 16, generator=g)
    means = {}
    for name, x in (("a", a), ("b", b)):
        means[name] = mmot.nn.ModalityMean(16)
        means[name].update(x)
    ca, cb = mmot.collapse(a, means["a"].mean), mmot.collapse(b, means["b"].mean)
    before, after = mmot.modality_gap(a, b), mmot.modality_gap(ca, cb)
    assert before > 0.8 and after < 0.1 * before  # the re-normalisation leaves a little
    hits = lambda p, q: float(((p @ q.T).argmax(1) == torch.arange(200)).float().mean())  # noqa: E731
    assert hits(ca, cb) > 0.9 > hits(*(torch.nn.functional.normalize(v, dim=-1) for v in (a, b)))


def test_c3_module_train_and_eval():
    x = rows(30, 8, 6, offset=1.0)
    mean = mmot.nn.ModalityMean(8)
    mean.update(x)
    module = mmot.nn.C3(mean, sigma=0.2)
    module.eval()
    torch.testing.assert_close(module(x), mmot.collapse(x, mean.mean))
    module.train()
    got = module(x, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    want = naive_unit(naive_unit(x) - mean.mean.double() + 0.2 * noise.double())  # the authors' order: one re-normalisation
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    fixed = mmot.nn.C3(mean.mean.clone())
    assert "fixed_mean" in fixed.state_dict()


def test_compiles_fullgraph():
    x, y = rows(10, 6, 7), rows(12, 6, 8)
    mean = torch.full((6,), 0.1)
    torch.testing.assert_close(torch.compile(mmot.collapse, fullgraph=True)(x, mean), mmot.collapse(x, mean))
    torch.testing.assert_close(torch.compile(mmot.modality_gap, fullgraph=True)(x, y), mmot.modality_gap(x, y))


@pytest.mark.parametrize(
    ("call", "kind", "match"),
    [
        (lambda: mmot.collapse([1.0], torch.zeros(1)), TypeError, "mmot.collapse: argument 'x'"),
        (lambda: mmot.collapse(torch.ones(3, 4), torch.zeros(5)), ValueError, "mmot.collapse: argument 'mean'"),
        (lambda: mmot.collapse(torch.ones(3, 4, dtype=torch.int64), torch.zeros(4)), TypeError, "argument 'x'"),
        (lambda: mmot.collapse(torch.tensor([[1.0, float("nan")]]), torch.zeros(2)), ValueError, "mmot.collapse: argument 'x'"),
        (lambda: mmot.corrupt(torch.ones(3, 4), -0.1), ValueError, "mmot.corrupt: argument 'sigma'"),
        (lambda: mmot.corrupt(torch.ones(3, 4), generator=3), TypeError, "mmot.corrupt: argument 'generator'"),
        (lambda: mmot.modality_gap(torch.ones(3, 4), torch.ones(3, 5)), ValueError, "mmot.modality_gap: argument 'b'"),
        (lambda: mmot.modality_gap(torch.ones(0, 4), torch.ones(3, 4)), ValueError, "mmot.modality_gap: argument 'a'"),
        (lambda: mmot.nn.ModalityMean(0), ValueError, "mmot.nn.ModalityMean: argument 'dim'"),
        (lambda: mmot.nn.ModalityMean(4).update(torch.ones(3, 5)), ValueError, "ModalityMean.update: argument 'x'"),
        (lambda: mmot.nn.C3("mean"), TypeError, "mmot.nn.C3: argument 'mean'"),
        (lambda: mmot.nn.C3(torch.zeros(4), sigma=-1.0), ValueError, "mmot.nn.C3: argument 'sigma'"),
    ],
)
def test_bad_input_names_the_function_and_argument(call, kind, match):
    with pytest.raises(kind, match=match):
        call()
