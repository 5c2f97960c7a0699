"""Workloads of the structure losses: geometric consistency, feature separation and the Brownian bridge.

Each is timed against what a user would otherwise write: the materialised N×N torch form (and,
for geometric consistency, the same D×D Gram algebra in torch), forward and forward + backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import mmot
from mmot import reference
from mmot.bench.floors import Work
from mmot.bench.workload import F32, Provider, Target, Workload, mmot_provider

# Above this many rows the N×N torch forms would need more memory than a 24 GiB CPU machine
# has (several float32 N×N matrices live at once with autograd): they are reported, not run.
MATERIALIZED_MAX_ROWS = 16384


def _pair(n: int, d: int, d2: int | None = None):
    """Correlated rows, as two modalities' embeddings of the same items are."""

    def inputs(dev: torch.device, small: bool) -> dict:
        generator = torch.Generator().manual_seed(0)
        rows = 64 if small else n
        a = torch.randn(rows, d, generator=generator)
        b = 0.6 * a[:, : d2 or d] + 0.8 * torch.randn(rows, d2 or d, generator=generator)
        return {"a": a.to(dev), "b": b.to(dev)}

    return inputs


def _too_many(n: int) -> str | None:
    if n > MATERIALIZED_MAX_ROWS:
        return f"not run: its N×N float32 matrices at N = {n} need {6 * n * n * F32 / 2**30:.0f} GiB"
    return None


# ---------------------------------------------------------------------------------------------
# Geometric consistency


def geometric_consistency_workloads(device: torch.device, size: str, compile_: bool) -> list[Workload]:
    shapes = {"tiny": [(256, 32)], "quick": [(8192, 256)], "full": [(8192, 256), (65536, 256)]}[size]
    return [_geometric_consistency(device, n, d) for n, d in shapes]


def _materialized_gc(x: dict) -> torch.Tensor:
    a, b = F.normalize(x["a"], dim=-1), F.normalize(x["b"], dim=-1)
    s = a @ b.T
    return (s - s.T).pow(2).mean() + (a @ a.T - b @ b.T).pow(2).mean()


def _grams_gc(x: dict) -> torch.Tensor:
    """The same D×D Gram algebra as mmot's kernels, in torch ops with autograd."""
    a, b = F.normalize(x["a"], dim=-1), F.normalize(x["b"], dim=-1)
    ga, gb, c = a.T @ a, b.T @ b, a.T @ b
    n2 = a.shape[0] ** 2
    return (2 * (ga * gb).sum() - 2 * (c * c.T).sum() + ga.pow(2).sum() - 2 * c.pow(2).sum() + gb.pow(2).sum()) / n2


def _geometric_consistency(device: torch.device, n: int, d: int) -> Workload:
    providers: dict[str, Provider | str] = {
        mmot_provider(device): Provider(lambda x: mmot.geometric_consistency(x["a"], x["b"]), differentiable=True),
        "torch-grams": Provider(_grams_gc, differentiable=True),
        "materialized": _too_many(n) or Provider(_materialized_gc, differentiable=True),
    }
    io = 2 * n * d * F32
    grams = 3 * 2 * n * d * d
    return Workload(
        "geometric_consistency",
        f"N={n} D={d}",
        _pair(n, d),
        Work(footprint=io, traffic=io, flops=grams),
        Work(footprint=io, traffic=io, flops=4 * 2 * n * d * d),  # ∂â and ∂b̂: two N×D×D products each
        lambda x: reference.geometric_consistency(x["a"].double(), x["b"].double()),
        ("a", "b"),
        providers,
        target=Target("materialized", 20.0) if n == 8192 else None,
    )


# ---------------------------------------------------------------------------------------------
# Feature separation


def feature_separation_workloads(device: torch.device, size: str, compile_: bool) -> list[Workload]:
    shapes = {"tiny": [(256, 32, 16)], "quick": [(16384, 256, 256)], "full": [(16384, 256, 256), (16384, 256, 64)]}[size]
    return [_feature_separation(device, *shape) for shape in shapes]


def _torch_separation(x: dict) -> torch.Tensor:
    s, h = F.normalize(x["a"], dim=-1), F.normalize(x["b"], dim=-1)
    return (s.T @ h).pow(2).sum() / s.shape[0] ** 2


def _feature_separation(device: torch.device, n: int, d_s: int, d_h: int) -> Workload:
    providers: dict[str, Provider | str] = {
        mmot_provider(device): Provider(lambda x: mmot.feature_separation_loss(x["a"], x["b"]), differentiable=True),
        "torch-matmul": Provider(_torch_separation, differentiable=True),
    }
    io = n * (d_s + d_h) * F32
    gram = 2 * n * d_s * d_h
    return Workload(
        "feature_separation",
        f"N={n} Ds={d_s} Dh={d_h}",
        _pair(n, d_s, d_h),
        Work(footprint=io, traffic=io, flops=gram),
        Work(footprint=io, traffic=io, flops=2 * gram),
        lambda x: reference.feature_separation_loss(x["a"].double(), x["b"].double()),
        ("a", "b"),
        providers,
        target=Target("torch-matmul", 1.0) if (n, d_s, d_h) == (16384, 256, 256) else None,
    )


# ---------------------------------------------------------------------------------------------
# Brownian bridge

BRIDGE_T, BRIDGE_SIGMA = 0.3, 0.5


def brownian_bridge_workloads(device: torch.device, size: str, compile_: bool) -> list[Workload]:
    shapes = {"tiny": [(128, 32)], "quick": [(4096, 256)], "full": [(4096, 256), (16384, 256)]}[size]
    return [_brownian_bridge(device, n, d) for n, d in shapes]


def _bridge_inputs(n: int, d: int):
    pair = _pair(n, d)

    def inputs(dev: torch.device, small: bool) -> dict:
        x = pair(dev, small)
        generator = torch.Generator().manual_seed(2)
        noise = torch.randn(x["a"].shape, generator=generator).to(dev)
        return {**x, "mid": (1 - BRIDGE_T) * x["a"] + BRIDGE_T * x["b"] + noise}

    return inputs


def _materialized_bridge(x: dict) -> torch.Tensor:
    """The bridge points of every pair (one time t for all rows), the N×N squared distances to
    them and a cross-entropy to the diagonal: what one writes without a fused kernel."""
    a, b, m = (F.normalize(x[k], dim=-1) for k in ("a", "b", "mid"))
    points = (1 - BRIDGE_T) * a + BRIDGE_T * b
    logits = -torch.cdist(m, points).pow(2) / (2 * BRIDGE_SIGMA**2 * BRIDGE_T * (1 - BRIDGE_T))
    return F.cross_entropy(logits, torch.arange(a.shape[0], device=a.device))


def _brownian_bridge(device: torch.device, n: int, d: int) -> Workload:
    def run(x: dict) -> torch.Tensor:
        return mmot.brownian_bridge_loss(x["a"], x["b"], x["mid"], BRIDGE_T, sigma=BRIDGE_SIGMA)

    def ref(x: dict) -> torch.Tensor:
        a, b, m = (x[k].double() for k in ("a", "b", "mid"))
        t = torch.full((a.shape[0],), BRIDGE_T, dtype=torch.float64, device=a.device)
        return reference.brownian_bridge_loss(a, b, m, t, BRIDGE_SIGMA).mean()

    providers: dict[str, Provider | str] = {
        mmot_provider(device): Provider(run, differentiable=True),
        "materialized": _too_many(n) or Provider(_materialized_bridge, differentiable=True),
    }
    io = 3 * n * d * F32
    gemm = 2 * n * n * d
    return Workload(
        "brownian_bridge",
        f"N={n} D={d}",
        _bridge_inputs(n, d),
        # One t for every row: the bridge points P are one N×D matrix, so the logits are the one
        # product m̂·Pᵀ, and the backward's G P and Gᵀ m̂ are two more.
        Work(footprint=io, traffic=io, flops=gemm, exps=n * n),
        Work(footprint=io, traffic=io, flops=2 * gemm),
        ref,
        ("a", "b", "mid"),
        providers,
        target=Target("materialized", 2.0) if n == 4096 else None,
    )
