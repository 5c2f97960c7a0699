"""Fuzz: every op under torch.compile(fullgraph=True, dynamic=True) across changing sizes, with
extreme values, on every backend: the compiled call gives the eager result (to the rounding of
the reductions around the op, e.g. info_nce's mean, which inductor may order differently).

Compiling is slow (seconds per op and backend), so a few examples draw an (op, backend) pair and
three sizes each; the sizes after the first must reuse the compiled graph (no recompilation).
Inputs stay within the ops' documented limits: the value checks (which refuse the rest) read
data and are the eager fuzz tests' subject.
"""

from __future__ import annotations

import mmot
import torch
from backends import HAS_TRITON
from fuzz_support import extreme_tensor, fuzz, uniform
from hypothesis import given
from hypothesis import strategies as st

OPS = {
    "sinkhorn": lambda s, eps, backend: mmot.sinkhorn(s, eps, 3, backend=backend),
    "multi_sinkhorn": lambda s, eps, backend: mmot.multi_sinkhorn(s, 2, eps, 3, backend=backend),
    "similarity": lambda s, eps, backend: mmot.similarity(s, s[..., :3, :], scale=1 / eps, backend=backend),
    "info_nce": lambda s, eps, backend: mmot.info_nce(s, s.flip(0), eps, backend=backend),
    "anchor_consistency_loss": lambda s, eps, backend: mmot.anchor_consistency_loss(s, torch.sigmoid(s.sign()), eps, backend=backend),
}
PAIRS = [(op, backend) for op in OPS for backend in ["rust", "torch"] + (["triton"] if HAS_TRITON else [])]


@fuzz(3)
@given(
    pair=st.sampled_from(PAIRS),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    sizes=st.lists(st.integers(5, 9), min_size=3, max_size=3),  # never D = 4: duck sizing would tie them
    exponent=st.sampled_from([-30.0, 0.0, 30.0]),
    exponent_range=uniform(-1.0, 2.0),
    data=st.data(),
)
def test_compiled_dynamic_sizes_match_eager(pair, dtype, sizes, exponent, exponent_range, data):
    op, backend = pair
    torch._dynamo.reset()
    fn = torch.compile(lambda s, eps: OPS[op](s, eps, backend), fullgraph=True, dynamic=True)
    # One eps (temperature, 1/scale) per example, so that nothing recompiles for a new float:
    # the exponent range 2·10**exponent / eps is 10**exponent_range, within every limit.
    eps = 2 * 10.0**exponent / 10.0**exponent_range
    for index, n in enumerate(sizes):
        s = data.draw(extreme_tensor((n, 4), dtype, {}, (exponent, exponent)))
        # After the first call a new size must reuse the dynamic graph, not recompile.
        with torch._dynamo.config.patch(error_on_recompile=index > 0):
            got = fn(s, eps)
        want = OPS[op](s, eps, backend)
        info = torch.finfo(dtype)
        torch.testing.assert_close(got, want, rtol=4 * n * info.eps, atol=info.tiny, msg=lambda m, n=n: f"{op} {backend} n={n}: {m}")
