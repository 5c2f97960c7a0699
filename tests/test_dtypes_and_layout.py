"""Half-precision inputs, non-contiguous inputs, and inputs left untouched."""

import mmot
import pytest
import torch
from inputs import cosine_scores, random_scores

OPS = {
    "sinkhorn": lambda s, backend: mmot.sinkhorn(s, backend=backend),
    "multi_sinkhorn": lambda s, backend: mmot.multi_sinkhorn(s, 5, backend=backend),
    "similarity": lambda s, backend: mmot.similarity(s, s[:7], backend=backend),
}


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.08), (torch.float16, 0.02)])
def test_low_precision_inputs(backend, name, dtype, tol):
    scores = cosine_scores(19, 11, seed=1)
    want = OPS[name](scores, "torch")
    got = OPS[name](scores.to(dtype), backend)
    assert got.dtype == dtype
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", OPS)
def test_non_contiguous_inputs_and_no_mutation(backend, name):
    base = random_scores(11, 19, seed=2)
    scores = base.t()  # (19, 11), not contiguous
    assert not scores.is_contiguous()
    before = scores.clone()
    got = OPS[name](scores, backend)
    torch.testing.assert_close(got, OPS[name](scores.contiguous(), "torch"), rtol=1e-12, atol=1e-12)
    assert torch.equal(scores, before)
