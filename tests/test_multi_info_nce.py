"""mmot.multi_info_nce (PCMC) on every backend.

Against the literal per-pair F.cross_entropy form on boolean-indexed rows (naive.py) and
mmot.reference, with masks that drop whole modalities, rows present in one modality only and
pairs without a common row; list input, pair weights, reductions, dtypes, gradcheck, opcheck,
torch.compile and bad input.
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
from hypothesis import given
from hypothesis import strategies as st
from mmot import reference
from mmot.ops.multi_info_nce import multi_info_nce_op
from naive import materialized_multi_info_nce


def modalities(m, n, d, seed, dtype=torch.float64):
    """M correlated modalities of N items (leaves), a random mask and pair weights."""
    g = torch.Generator().manual_seed(seed)
    items = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = torch.stack([items + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(m)])
    present = torch.rand(m, n, generator=g) > 0.3
    weights = 0.2 + torch.rand(m, m, generator=g, dtype=torch.float64)
    return x.to(dtype).requires_grad_(True), present, weights


@given(
    m=st.integers(2, 4),
    n=st.integers(1, 20),
    d=st.integers(1, 9),
    symmetric=st.booleans(),
    normalize=st.booleans(),
    masked=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_values_and_gradients_float64(m, n, d, symmetric, normalize, masked, seed):
    x, present, weights = modalities(m, n, d, seed)
    if not masked:
        present = torch.ones_like(present)
    temperature = 0.07 if normalize else 3.0
    want_pairs, want = materialized_multi_info_nce(x, present, weights, temperature, symmetric, normalize)
    spec_pairs, spec = reference.multi_info_nce(x, present, weights, temperature, symmetric, normalize)
    torch.testing.assert_close(spec_pairs, want_pairs.detach(), rtol=1e-10, atol=1e-10)
    want_grad = torch.autograd.grad(want, x, allow_unused=True)[0] if want.requires_grad else torch.zeros_like(x)
    for backend in NATIVE:
        kw = dict(present=present, symmetric=symmetric, normalize=normalize, backend=backend)
        got = mmot.multi_info_nce(x, temperature, pair_weights=weights, **kw)
        torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-10)
        grad = torch.autograd.grad(got, x, allow_unused=True)[0] if got.requires_grad else None
        torch.testing.assert_close(torch.zeros_like(x) if grad is None else grad, want_grad, rtol=1e-9, atol=1e-10)
        pairs = mmot.multi_info_nce(x, temperature, reduction="none", **kw)
        torch.testing.assert_close(pairs, want_pairs, rtol=1e-10, atol=1e-10)
        total = mmot.multi_info_nce(x, temperature, pair_weights=weights, reduction="sum", **kw)
        torch.testing.assert_close(total, (torch.triu(weights, 1) * want_pairs).sum(), rtol=1e-10, atol=1e-10)


def test_missing_rows_and_modalities(backend):
    x, _, weights = modalities(3, 7, 4, 5)
    present = torch.ones(3, 7, dtype=torch.bool)
    present[2] = False  # modality 2 entirely missing: its pairs are empty and leave the mean
    present[0, 3] = False  # row 3 only in modality 1
    got = mmot.multi_info_nce(x, 0.1, present=present, pair_weights=weights, backend=backend)
    pairs, want = materialized_multi_info_nce(x, present, weights, 0.1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got, pairs[0, 1], rtol=1e-10, atol=1e-10)
    (grad,) = torch.autograd.grad(got, x)
    assert torch.equal(grad[2], torch.zeros_like(grad[2])) and torch.equal(grad[:, 3], torch.zeros_like(grad[:, 3]))
    # A missing row's values do not matter at all.
    moved = x.detach().clone()
    moved[0, 3] = 1e3
    torch.testing.assert_close(mmot.multi_info_nce(moved, 0.1, present=present, pair_weights=weights, backend=backend), got.detach())
    nobody = torch.zeros_like(present)
    empty = mmot.multi_info_nce(x, 0.1, present=nobody, backend=backend)
    assert float(empty.detach()) == 0.0
    assert torch.equal(torch.autograd.grad(empty, x)[0], torch.zeros_like(x))


def test_list_input_matches_stacked_and_feeds_each_tensor(backend):
    x, present, _ = modalities(3, 6, 5, 2)
    parts = [t.detach().clone().requires_grad_(True) for t in x.detach()]
    got = mmot.multi_info_nce(parts, 0.05, present=present, backend=backend)
    want = mmot.multi_info_nce(x, 0.05, present=present, backend=backend)
    torch.testing.assert_close(got, want)
    grads = torch.autograd.grad(got, parts)
    for g, w in zip(grads, torch.autograd.grad(want, x)[0]):
        torch.testing.assert_close(g, w)


def test_without_masks_equals_info_nce_per_pair(backend):
    x, _, _ = modalities(3, 8, 6, 11)
    pairs = mmot.multi_info_nce(x, 0.05, reduction="none", backend=backend)
    for i, j in ((0, 1), (0, 2), (1, 2)):
        torch.testing.assert_close(pairs[i, j], mmot.info_nce(x[i], x[j], 0.05, backend=backend))
    assert torch.equal(torch.tril(pairs), torch.zeros_like(pairs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_accumulates_in_float32(native_backend, dtype):
    x, present, weights = modalities(3, 40, 16, 3, torch.float64)
    want = materialized_multi_info_nce(x.detach(), present, weights, 0.05)[1]
    got = mmot.multi_info_nce(x.detach().to(dtype), 0.05, present=present, pair_weights=weights.to(dtype), backend=native_backend)
    assert got.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_rust_several_tiles():
    """N = 300 spans two row tiles of the pair kernel."""
    x, present, weights = modalities(3, 300, 12, 8, torch.float32)
    want = materialized_multi_info_nce(x.detach().double(), present, weights, 0.05)[1]
    got = mmot.multi_info_nce(x, 0.05, present=present, pair_weights=weights.float(), backend="rust")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_rust_is_deterministic_across_thread_counts(tmp_path):
    script = (
        "import torch, mmot, sys; g = torch.Generator().manual_seed(1);"
        "x = torch.randn(3, 700, 40, generator=g, requires_grad=True); p = torch.rand(3, 700, generator=g) > 0.2;"
        "l = mmot.multi_info_nce(x, 0.05, present=p, backend='rust'); l.backward();"
        "torch.save((l.detach(), x.grad), sys.argv[1])"
    )
    results = []
    for threads in ("1", "3"):
        path = tmp_path / f"threads-{threads}.pt"
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, env=dict(os.environ, MMOT_NUM_THREADS=threads))
        results.append(torch.load(path))
    for x, y in zip(*results):
        assert torch.equal(x, y)


def test_gradcheck(backend):
    x, present, weights = modalities(3, 5, 3, 4)
    for symmetric in (True, False):
        torch.autograd.gradcheck(
            lambda x, symmetric=symmetric: mmot.multi_info_nce(
                x, 0.2, present=present, pair_weights=weights, symmetric=symmetric, backend=backend
            ),
            (x,),
        )


@pytest.mark.parametrize("normalize", [True, False])
def test_opcheck(native_backend, normalize):
    x, present, _ = modalities(3, 6, 5, 9)
    torch.library.opcheck(multi_info_nce_op, (x, present.double(), 0.1, True, normalize, native_backend))


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_with_changing_sizes(native_backend, dynamic):
    torch._dynamo.reset()

    def step(x, present):
        return (
            mmot.multi_info_nce(x, 0.05, present=present, backend=native_backend)
            + mmot.multi_info_nce(x, 0.1, reduction="none", backend=native_backend).sum()
        )

    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for n, d in ((8, 5), (11, 5), (6, 7)):
        x, present, _ = modalities(3, n, d, n)
        loss, want = compiled(x, present), step(x, present)
        torch.testing.assert_close(loss, want)
        torch.testing.assert_close(torch.autograd.grad(loss, x)[0], torch.autograd.grad(want, x)[0])


def test_non_finite_input_is_named(backend):
    x, present, _ = modalities(2, 4, 3, 1)
    bad = x.detach().clone()
    bad[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"mmot.multi_info_nce: argument 'embeddings' must be finite"):
        mmot.multi_info_nce(bad, 0.05, backend=backend)


@needs_triton
def test_triton_matches_rust_tiny():
    x, present, weights = modalities(3, 9, 5, 21)
    got = mmot.multi_info_nce(x, 0.05, present=present, pair_weights=weights, backend="triton")
    want = mmot.multi_info_nce(x, 0.05, present=present, pair_weights=weights, backend="rust")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0], rtol=1e-9, atol=1e-10)


_x = torch.randn(3, 4, 5)
test_bad_input = bad_input_test(
    "mmot.multi_info_nce",
    [
        (lambda: mmot.multi_info_nce("x"), TypeError, "'embeddings'", "(M, N, D) tensor"),
        (lambda: mmot.multi_info_nce(torch.randn(4, 5)), ValueError, "'embeddings'", "(M, N, D)"),
        (lambda: mmot.multi_info_nce(torch.randn(1, 4, 5)), ValueError, "'embeddings'", "M ≥ 2"),
        (lambda: mmot.multi_info_nce([torch.randn(4, 5)]), ValueError, "'embeddings'", "at least 2"),
        (lambda: mmot.multi_info_nce([torch.randn(4, 5), torch.randn(3, 5)]), ValueError, "'embeddings[1]'", "shape"),
        (lambda: mmot.multi_info_nce([torch.randn(4, 5), torch.randn(4, 5).double()]), TypeError, "'embeddings[1]'", "dtype"),
        (lambda: mmot.multi_info_nce(_x, 0.0), ValueError, "'temperature'", "positive"),
        (lambda: mmot.multi_info_nce(_x, present=torch.ones(3, 4)), TypeError, "'present'", "bool"),
        (lambda: mmot.multi_info_nce(_x, present=torch.ones(2, 4, dtype=torch.bool)), ValueError, "'present'", "(3, 4)"),
        (lambda: mmot.multi_info_nce(_x, pair_weights=torch.ones(2, 2)), ValueError, "'pair_weights'", "(3, 3)"),
        (lambda: mmot.multi_info_nce(_x, pair_weights=-torch.ones(3, 3)), ValueError, "'pair_weights'", ">= 0"),
        (lambda: mmot.multi_info_nce(_x, pair_weights=torch.ones(3, 3, dtype=torch.long)), TypeError, "'pair_weights'", "float"),
        (lambda: mmot.multi_info_nce(_x, reduction="max"), ValueError, "'reduction'"),
        (lambda: mmot.multi_info_nce(_x, symmetric=1), TypeError, "'symmetric'", "bool"),
        (lambda: mmot.multi_info_nce(_x, backend="cuda"), ValueError, "'backend'"),
    ],
)
