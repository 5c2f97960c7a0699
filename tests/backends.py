"""The backends every op is tested on.

``rust`` and ``torch`` run CPU tensors natively. ``triton`` runs them through Triton's
interpreter (TRITON_INTERPRET=1, set in conftest.py), which costs ~50 ms per Sinkhorn call and
up to ~1 s per Multi-SK backward even on tiny shapes: tests whose shapes or call counts are too
large for it take ``native_backend`` (rust, torch), and each op's Triton section covers the same
ground on tiny shapes. Hypothesis tests loop over NATIVE inside each example, so that the naive
form or the reference is computed once per example.
"""

import importlib.util

import pytest

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: its kernels run here only through its interpreter")

ALL = ["rust", "torch", pytest.param("triton", marks=needs_triton)]
NATIVE = ["rust", "torch"]
