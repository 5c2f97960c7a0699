"""C3's collapse, corrupt and modality gap, and the ModalityMean and C3 modules, against naive float64 forms."""

import os
import socket

import mmot
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def naive_unit(x):
    x = x.double()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def rows(shape, seed, dtype=torch.float32, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) + offset).to(dtype)


def noise_like(x, seed):
    """The ε that corrupt and C3 draw: in float64 for float64 inputs, float32 otherwise."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).double()


@given(
    batch=st.lists(st.integers(0, 5), min_size=0, max_size=2),
    d=st.integers(1, 17),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from(DTYPES),
    sigma=st.floats(0.0, 2.0),
)
def test_collapse_and_corrupt_match_naive(batch, d, seed, dtype, sigma):
    x = rows((*batch, d), seed, dtype, 2.0)
    mean = naive_unit(rows((50, d), seed + 1, torch.float64, 2.0)).mean(0).to(dtype)
    tol = TOL[dtype]
    got = mmot.collapse(x, mean)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got.double(), naive_unit(naive_unit(x) - mean.double()), rtol=tol, atol=tol)
    got = mmot.corrupt(x, sigma, generator=torch.Generator().manual_seed(seed))
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got.double(), naive_unit(x.double() + sigma * noise_like(x, seed)), rtol=tol, atol=tol)


@given(
    n=st.integers(1, 40),
    m=st.integers(1, 40),
    d=st.integers(1, 17),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from(DTYPES),
)
def test_modality_gap_matches_naive(n, m, d, seed, dtype):
    a, b = rows((n, d), seed, dtype, 2.0), rows((m, d), seed + 1, dtype, -1.0)
    gap = mmot.modality_gap(a, b)
    assert gap.shape == () and gap.dtype == dtype
    want = (naive_unit(a).mean(0) - naive_unit(b).mean(0)).norm()
    torch.testing.assert_close(gap.double(), want, rtol=TOL[dtype], atol=TOL[dtype])


def test_modality_gap_of_mixed_dtypes_is_promoted():
    a, b = rows((4, 3), 0, torch.bfloat16), rows((5, 3), 1, torch.float64)
    assert mmot.modality_gap(a, b).dtype == torch.float64


def test_rows_past_float32_norm_range():
    """Rows whose squared norm overflows float32 still normalise (the scale-safe unit rows)."""
    x = rows((6, 5), 0) * 1e20
    torch.testing.assert_close(mmot.collapse(x, torch.zeros(5)).double(), naive_unit(x.double()), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mmot.modality_gap(x, -x).double(), 2 * naive_unit(x).mean(0).norm(), rtol=1e-6, atol=1e-6)


def test_corrupt_is_reproducible_and_the_same_noise_at_every_precision():
    x = rows((64, 32), 1)
    a = mmot.corrupt(x, 0.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, mmot.corrupt(x, 0.5, generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(a, mmot.corrupt(x, 0.5, generator=torch.Generator().manual_seed(8)))
    half = mmot.corrupt(x.bfloat16(), 0.5, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(half.float(), a, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(mmot.corrupt(x, 0.0), torch.nn.functional.normalize(x, dim=-1))
    assert mmot.corrupt(x).dtype == x.dtype and mmot.c3.DEFAULT_SIGMA == 0.016**0.5


def test_corrupt_noise_has_the_stated_standard_deviation():
    """σ is a standard deviation: with a huge row the noise barely moves, a unit row moves by σ√D."""
    x = torch.zeros(20000, 4)
    x[:, 0] = 1.0
    out = mmot.corrupt(x * 1e6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x, rtol=0, atol=1e-5)
    sigma, big = 0.016**0.5, 1e6
    raw = x * big + sigma * big * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    spread = (raw / big - x).std(0)  # the same draw as corrupt(x, σ): ε·σ before normalising
    torch.testing.assert_close(spread, torch.full((4,), sigma), rtol=0.03, atol=0)


def test_gradients():
    x = rows((5, 4), 2, torch.float64).requires_grad_(True)
    mean = naive_unit(rows((9, 4), 3, torch.float64)).mean(0).requires_grad_(True)
    assert torch.autograd.gradcheck(mmot.collapse, (x, mean))
    assert torch.autograd.gradcheck(lambda v: mmot.corrupt(v, 0.3, generator=torch.Generator().manual_seed(1)), (x,))
    y = rows((7, 4), 4, torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(mmot.modality_gap, (x, y))
    module = mmot.nn.C3(mean.detach(), sigma=0.3)
    assert torch.autograd.gradcheck(lambda v: module(v, generator=torch.Generator().manual_seed(1)), (x,))
    module.eval()
    assert torch.autograd.gradcheck(module, (x,))


def test_streaming_mean_equals_batch_mean_and_round_trips():
    x = rows((1001, 12), 5, offset=1.0)
    mean = mmot.nn.ModalityMean(12)
    for chunk in torch.split(x, [1, 400, 0, 3, 597]):
        mean.update(chunk)
    want = naive_unit(x).mean(0)
    torch.testing.assert_close(mean.total / mean.count, want, rtol=1e-13, atol=1e-14)
    assert mean.mean.dtype == torch.float32
    other = mmot.nn.ModalityMean(12)
    other.load_state_dict(mean.state_dict())
    assert torch.equal(other.mean, mean.mean) and int(other.count) == 1001
    assert set(mean.state_dict()) == {"total", "count"}
    mean.reset()
    with pytest.raises(ValueError, match="no rows seen"):
        _ = mean.mean


def test_streaming_mean_is_exact_over_a_million_rows():
    """The float64 sum keeps the mean exact to ~1e-13 over 1M rows in uneven chunks.
    (A float32 running sum of the chunks is off by ~3e-7 here.)"""
    base = rows((7, 5), 11)
    n = 1_000_003
    index = torch.arange(n) % 7
    scale = 2.0 ** (torch.arange(n) % 13 - 6).float()  # exact in float32; normalisation removes it
    x = base[index] * scale[:, None]
    want = (torch.bincount(index, minlength=7).double()[:, None] * naive_unit(base)).sum(0) / n
    mean = mmot.nn.ModalityMean(5)
    # ~390 uneven chunks (small enough that torch does not spread one over threads on a busy CI box)
    sizes = torch.randint(1, 5000, (390,), generator=torch.Generator().manual_seed(0)).tolist()
    sizes.append(n - sum(sizes))
    for chunk in torch.split(x, sizes):
        mean.update(chunk)
    assert int(mean.count) == n
    torch.testing.assert_close(mean.total / mean.count, want, rtol=1e-12, atol=1e-13)


def test_streaming_mean_keeps_float64_when_the_model_is_cast():
    mean = mmot.nn.ModalityMean(3)
    mean.update(rows((5, 3), 0))
    before = mean.total.clone()
    model = torch.nn.Sequential(mmot.nn.C3(mean)).half()
    assert mean.total.dtype == torch.float64 and torch.equal(mean.total, before)
    model.to(torch.bfloat16)
    assert mean.total.dtype == torch.float64 and mean.count.dtype == torch.int64
    assert model(rows((2, 3), 1, torch.bfloat16)).dtype == torch.bfloat16


def test_collapse_closes_a_constant_offset():
    """Two modalities share structure but sit around different means. Collapsing each with its
    own training mean removes the gap, and one modality's embedding becomes a stand-in for the
    other's: nearest neighbour across modalities finds the pair."""
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
    x = rows((30, 8), 6, offset=1.0)
    mean = mmot.nn.ModalityMean(8)
    mean.update(x)
    module = mmot.nn.C3(mean, sigma=0.2)
    assert module.training and "source.total" in module.state_dict()
    module.eval()
    torch.testing.assert_close(module(x), mmot.collapse(x, mean.mean))
    assert torch.equal(module(x), module(x))  # no noise in evaluation
    module.train()
    got = module(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, module(x, generator=torch.Generator().manual_seed(3)))
    # The authors' order: noise on the mean-subtracted embedding, one re-normalisation.
    want = naive_unit(naive_unit(x) - mean.mean.double() + 0.2 * noise_like(x, 3))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    shifted = naive_unit(x).float() - mean.mean
    torch.testing.assert_close(got, mmot.corrupt(shifted, 0.2, generator=torch.Generator().manual_seed(3)))
    fixed = mmot.nn.C3(mean.mean.clone(), sigma=0.0)
    assert "fixed_mean" in fixed.state_dict()
    torch.testing.assert_close(fixed(x), mmot.collapse(x, mean.mean))  # σ = 0: training is collapse


def test_c3_module_uses_the_float64_running_mean_for_float64_inputs():
    x = rows((40, 6), 9, torch.float64, 0.5)
    mean = mmot.nn.ModalityMean(6)
    mean.update(x)
    got = mmot.nn.C3(mean).eval()(x)
    want = naive_unit(naive_unit(x) - naive_unit(x).mean(0))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_compiles_fullgraph():
    x, y = rows((10, 6), 7), rows((12, 6), 8)
    mean = torch.full((6,), 0.1)
    torch.testing.assert_close(torch.compile(mmot.collapse, fullgraph=True)(x, mean), mmot.collapse(x, mean))
    torch.testing.assert_close(torch.compile(mmot.modality_gap, fullgraph=True)(x, y), mmot.modality_gap(x, y))
    running = mmot.nn.ModalityMean(6)
    running.update(y)
    module = mmot.nn.C3(running).eval()
    torch.testing.assert_close(torch.compile(module, fullgraph=True)(x), module(x))


def _meta(*shape):
    return torch.empty(shape, device="meta")


@pytest.mark.parametrize(
    ("call", "kind", "match"),
    [
        (lambda: mmot.collapse([1.0], torch.zeros(1)), TypeError, "mmot.collapse: argument 'x'"),
        (lambda: mmot.collapse(torch.ones(3, 4, dtype=torch.int64), torch.zeros(4)), TypeError, "mmot.collapse: argument 'x'"),
        (lambda: mmot.collapse(torch.ones(3, 0), torch.zeros(0)), ValueError, "mmot.collapse: argument 'x'"),
        (lambda: mmot.collapse(torch.tensor([[1.0, float("nan")]]), torch.zeros(2)), ValueError, "mmot.collapse: argument 'x'"),
        (lambda: mmot.collapse(torch.ones(3, 4), torch.zeros(5)), ValueError, "mmot.collapse: argument 'mean'"),
        (lambda: mmot.collapse(torch.ones(3, 4), torch.zeros(1, 4)), ValueError, "mmot.collapse: argument 'mean'"),
        (lambda: mmot.collapse(torch.ones(3, 4), torch.zeros(4, dtype=torch.int32)), TypeError, "mmot.collapse: argument 'mean'"),
        (lambda: mmot.collapse(torch.ones(3, 4), torch.full((4,), float("inf"))), ValueError, "mmot.collapse: argument 'mean'"),
        (lambda: mmot.collapse(torch.ones(3, 4), _meta(4)), ValueError, "mmot.collapse: argument 'mean'"),
        (lambda: mmot.corrupt(torch.ones(3, 4), -0.1), ValueError, "mmot.corrupt: argument 'sigma'"),
        (lambda: mmot.corrupt(torch.ones(3, 4), float("nan")), ValueError, "mmot.corrupt: argument 'sigma'"),
        (lambda: mmot.corrupt(torch.ones(3, 4), float("inf")), ValueError, "mmot.corrupt: argument 'sigma'"),
        (lambda: mmot.corrupt(torch.ones(3, 4), "0.1"), TypeError, "mmot.corrupt: argument 'sigma'"),
        (lambda: mmot.corrupt(torch.ones(3, 4), True), TypeError, "mmot.corrupt: argument 'sigma'"),
        (lambda: mmot.corrupt(torch.ones(3, 4), generator=3), TypeError, "mmot.corrupt: argument 'generator'"),
        (lambda: mmot.corrupt(torch.tensor([float("inf")])), ValueError, "mmot.corrupt: argument 'x'"),
        (lambda: mmot.modality_gap(torch.ones(3, 4), torch.ones(3, 5)), ValueError, "mmot.modality_gap: argument 'b'"),
        (lambda: mmot.modality_gap(torch.ones(0, 4), torch.ones(3, 4)), ValueError, "mmot.modality_gap: argument 'a'"),
        (lambda: mmot.modality_gap(torch.ones(2, 3, 4), torch.ones(3, 4)), ValueError, "mmot.modality_gap: argument 'a'"),
        (lambda: mmot.modality_gap(torch.ones(3, 4), "b"), TypeError, "mmot.modality_gap: argument 'b'"),
        (lambda: mmot.nn.ModalityMean(0), ValueError, "mmot.nn.ModalityMean: argument 'dim'"),
        (lambda: mmot.nn.ModalityMean(2.0), TypeError, "mmot.nn.ModalityMean: argument 'dim'"),
        (lambda: mmot.nn.ModalityMean(4).update(torch.ones(3, 5)), ValueError, "ModalityMean.update: argument 'x'"),
        (lambda: mmot.nn.ModalityMean(4).update(torch.ones(4)), ValueError, "ModalityMean.update: argument 'x'"),
        (lambda: mmot.nn.ModalityMean(1).update(torch.tensor([[float("nan")]])), ValueError, "ModalityMean.update: argument 'x'"),
        (lambda: mmot.nn.ModalityMean(1).update(torch.tensor([[1]])), TypeError, "ModalityMean.update: argument 'x'"),
        (lambda: mmot.nn.ModalityMean(4).all_reduce(), ValueError, "ModalityMean.all_reduce: needs torch.distributed"),
        (lambda: mmot.nn.ModalityMean(4).all_reduce(3), TypeError, "ModalityMean.all_reduce: argument 'process_group'"),
        (lambda: mmot.nn.C3("mean"), TypeError, "mmot.nn.C3: argument 'mean'"),
        (lambda: mmot.nn.C3(torch.zeros(4, dtype=torch.int64)), TypeError, "mmot.nn.C3: argument 'mean'"),
        (lambda: mmot.nn.C3(torch.zeros(2, 4)), ValueError, "mmot.nn.C3: argument 'mean'"),
        (lambda: mmot.nn.C3(torch.tensor([float("nan")])), ValueError, "mmot.nn.C3: argument 'mean'"),
        (lambda: mmot.nn.C3(torch.zeros(4), sigma=-1.0), ValueError, "mmot.nn.C3: argument 'sigma'"),
        (lambda: mmot.nn.C3(torch.zeros(4))(torch.ones(3, 5)), ValueError, "mmot.nn.C3: argument 'mean'"),
        (lambda: mmot.nn.C3(torch.zeros(4))(torch.ones(3, 4), generator="g"), TypeError, "mmot.nn.C3: argument 'generator'"),
        (lambda: mmot.nn.C3(mmot.nn.ModalityMean(4))(torch.ones(3, 4)), ValueError, "no rows seen"),
    ],
)
def test_bad_input_names_the_function_and_argument(call, kind, match):
    with pytest.raises(kind, match=match):
        call()


def test_generator_on_another_device_is_named():
    old = mmot.set_checks(False)  # meta tensors hold no values to check
    try:
        with pytest.raises(ValueError, match="mmot.corrupt: argument 'generator' must be on x's device"):
            mmot.corrupt(_meta(3, 4), generator=torch.Generator())
    finally:
        mmot.set_checks(old)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _all_reduce_worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mean = mmot.nn.ModalityMean(6)
    mean.update(rows((37, 6), 20, offset=1.0).split([15, 22])[rank])  # uneven shards
    mean.all_reduce()
    torch.save((mean.total, mean.count), os.path.join(out_dir, f"{rank}.pt"))
    dist.barrier()
    os._exit(0)  # as in test_distributed.py: gloo's teardown can abort a finished worker


@pytest.mark.slow
def test_all_reduce_gives_every_rank_the_whole_mean(tmp_path):
    mp.spawn(_all_reduce_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    want = naive_unit(rows((37, 6), 20, offset=1.0)).sum(0)
    for rank in range(2):
        total, count = torch.load(tmp_path / f"{rank}.pt")
        assert int(count) == 37
        torch.testing.assert_close(total, want, rtol=1e-13, atol=1e-13)
