import os

# Set before mmot is imported: unwritten kernel outputs become NaN and fail the comparisons.
os.environ.setdefault("MMOT_POISON_OUTPUTS", "1")
# Triton kernels run on CPU tensors through the interpreter; read when @triton.jit runs.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

CPU_BACKENDS = ["rust", "torch"]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param

