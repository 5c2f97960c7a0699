import os

# Set before mmot is imported: unwritten kernel outputs become NaN and fail the comparisons.
os.environ.setdefault("MMOT_POISON_OUTPUTS", "1")
# Triton kernels run on CPU tensors through the interpreter; read when @triton.jit runs.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from backends import ALL, NATIVE
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(params=ALL)
def backend(request):
    """Every backend: rust, torch, and triton through the interpreter."""
    return request.param


@pytest.fixture(params=NATIVE)
def native_backend(request):
    """rust and torch, for shapes or call counts too large for the Triton interpreter."""
    return request.param


@pytest.fixture(params=["persistent", "split"])
def launch(request, monkeypatch):
    """Both launch structures of the Triton Sinkhorn kernels: one program per problem, or one
    problem's rows split over several programs (forced on tiny shapes by small row tiles)."""
    if request.param == "split":
        from mmot.kernels import _common

        monkeypatch.setattr(_common, "FORCE_PROGRAMS_PER_PROBLEM", 3)
        monkeypatch.setattr(_common, "FORCE_TILE_ROWS", 2)
    return request.param
