"""What a benchmark workload is: its providers, its target, and how its forward and backward are timed.

:mod:`mmot.bench.workloads` and :mod:`mmot.bench.structure_workloads` build the registry from these.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mmot.bench.floors import Work

SIZES = ("tiny", "quick", "full")
BENCH_EXTRA = 'pip install "mmot[bench]"'
# official-dense holds a (K, N, K) tensor and several temporaries of that size; beyond this many
# elements it would not fit the machine's memory, so it is reported, not run.
DENSE_MAX_ELEMENTS = {"cpu": 256 * 7660 * 128, "cuda": 1 << 31}
F32 = 4


@dataclass
class Provider:
    """One way to compute a workload.

    Attributes:
        run: the forward call on the workload's inputs.
        differentiable: also timed as forward + backward under ``--backward``.
        comparable: returns the op's result in mmot's layout, so ``--check`` can compare it.
    """

    run: Callable[[dict], torch.Tensor]
    differentiable: bool = False
    comparable: bool = True


@dataclass(frozen=True)
class Target:
    """mmot's goal on a workload: ``speedup``× ``against`` or better and, where ``floor_factor`` is given,
    within ``floor_factor``× its memory floor (``floor_text`` says which passes it counts), in the
    ``mode`` pass ("forward", or "forward+backward", which needs ``--backward``)."""

    against: str
    speedup: float
    floor_factor: float | None = None
    floor_text: str = ""
    mode: str = "forward"


@dataclass
class Workload:
    op: str
    shape: str
    # make_inputs(device, small): the inputs, or with small=True the same op a few rows large
    # (a warm-up that loads code and starts thread pools without large allocations).
    make_inputs: Callable[[torch.device, bool], dict]
    work: Work
    backward_work: Work  # what a backward adds to the forward's work
    expected: Callable[[dict], torch.Tensor]  # mmot.reference on float64 copies of the inputs
    grad_inputs: tuple[str, ...]
    providers: dict[str, Provider | str] = field(default_factory=dict)
    tolerance: float = 1e-3  # of the largest |reference| entry, for results and gradients
    target: Target | None = None
    # Device memory the float64 reference of ``--check`` needs (forward and backward), where it is
    # large enough to matter: on CUDA the check is skipped, with the figure, when it is not free.
    reference_bytes: int = 0

    @property
    def label(self) -> str:
        return f"{self.op} · {self.shape}"


def forward(fn: Callable[[dict], torch.Tensor]) -> Callable[[dict], torch.Tensor]:
    """``fn`` without autograd recording: how the forward rows are timed."""

    def run(inputs: dict) -> torch.Tensor:
        with torch.no_grad():
            return fn(inputs)

    return run


def backward_of(fn: Callable[[dict], torch.Tensor], names: tuple[str, ...]) -> Callable[[dict], tuple[torch.Tensor, ...]]:
    """``fn``'s forward and backward: the gradients of the ``names`` inputs under a fixed upstream gradient."""
    upstream: dict[tuple, torch.Tensor] = {}

    def run(inputs: dict) -> tuple[torch.Tensor, ...]:
        with torch.enable_grad():
            leaves = dict(inputs)
            for name in names:
                leaves[name] = inputs[name].detach().requires_grad_(True)
            out = fn(leaves)
            key = (tuple(out.shape), out.dtype, out.device)
            if key not in upstream:
                upstream[key] = upstream_like(out)
            return torch.autograd.grad(out, [leaves[name] for name in names], upstream[key])

    return run


def upstream_like(out: torch.Tensor) -> torch.Tensor:
    """Seeded random upstream gradient, the same values for every provider and dtype."""
    generator = torch.Generator().manual_seed(1)
    return torch.randn(out.shape, generator=generator).to(out.device, out.dtype)


def mmot_provider(device: torch.device) -> str:
    """The provider name of mmot's kernel on ``device``."""
    return "mmot-rust" if device.type == "cpu" else "mmot-triton"


def compiled(fn: Callable[[dict], torch.Tensor]) -> Callable[[dict], torch.Tensor]:
    """torch.compile of a reference formulation, compiled on its first call (the warm-up)."""
    holder: list[Callable] = []

    def run(inputs: dict) -> torch.Tensor:
        if not holder:
            holder.append(torch.compile(fn, dynamic=False))
        return holder[0](inputs)

    return run


def gradient_io(*shapes: tuple[int, ...]) -> Work:
    """A backward's least extra memory work: read the upstream gradient, write the input gradients."""
    size = sum(torch.Size(shape).numel() for shape in shapes) * F32
    return Work(footprint=size, traffic=size)
