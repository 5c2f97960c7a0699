"""Workloads of the many-modality contrastive losses: PCMC (``mmot.multi_info_nce``), PCMR
(``mmot.pairwise_similarity_regression``), SimCLR's NT-Xent (``mmot.nt_xent``) and CoMM
(``mmot.nn.CoMMLoss``).

Each is timed against the materialised torch form that the papers' reference implementations use
(every N×N logit or similarity matrix built, once per modality pair and per term), forward and
forward + backward; with
``torch.compile`` enabled also against that form compiled.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

import mmot
from mmot import reference
from mmot.bench.floors import Work
from mmot.bench.workload import F32, Provider, Target, Workload, compiled, mmot_provider

PCMC_TAU, NT_XENT_TAU = 0.05, 0.1
MISSING = 0.1  # the share of samples without a given modality, so that the masks do work
# Above this many N×N float32 elements per matrix the materialised forms (several such matrices
# alive at once with autograd) would not fit a 24 GiB machine: reported, not run.
MATERIALIZED_MAX = 16384 * 16384


def _modalities(m: int, n: int, d: int, missing: bool):
    """M correlated modalities of the same N items, and which items have which modality."""

    def inputs(dev: torch.device, small: bool) -> dict:
        generator = torch.Generator().manual_seed(0)
        rows = 64 if small else n
        items = torch.randn(rows, d, generator=generator)
        x = torch.stack([0.6 * items + 0.8 * torch.randn(rows, d, generator=generator) for _ in range(m)])
        out = {"x": x.to(dev)}
        if missing:
            out["present"] = (torch.rand(m, rows, generator=generator) >= MISSING).to(dev)
        return out

    return inputs


def _too_big(n: int) -> str | None:
    if n * n > MATERIALIZED_MAX:
        return f"not run: its N×N float32 matrices at N = {n} need {4 * n * n * F32 / 2**30:.0f} GiB"
    return None


def _with_compiled(providers: dict, name: str, fn, compile_: bool, n: int) -> None:
    """The materialised form, and on request the same under torch.compile."""
    providers[name] = _too_big(n) or Provider(fn, differentiable=True)
    if compile_:
        providers[f"{name}-compiled"] = _too_big(n) or Provider(compiled(fn), differentiable=True)


# ---------------------------------------------------------------------------------------------
# PCMC: multi_info_nce


def multi_info_nce_workloads(device: torch.device, size: str, compile_: bool) -> list[Workload]:
    shapes = {"tiny": [(3, 128, 32)], "quick": [(3, 4096, 256)], "full": [(3, 4096, 256), (4, 32768, 128)]}[size]
    return [_multi_info_nce(device, *shape, compile_) for shape in shapes]


def _materialized_pcmc(x: dict) -> torch.Tensor:
    """Per pair, the rows present in both, their N×N logits and a cross-entropy each way."""
    emb, present = x["x"], x["present"]
    total = emb.new_zeros(())
    pairs = list(itertools.combinations(range(emb.shape[0]), 2))
    for i, j in pairs:
        keep = present[i] & present[j]
        a, b = F.normalize(emb[i][keep], dim=-1), F.normalize(emb[j][keep], dim=-1)
        logits = a @ b.T / PCMC_TAU
        target = torch.arange(a.shape[0], device=a.device)
        total = total + F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)
    return total / len(pairs)


def _multi_info_nce(device: torch.device, m: int, n: int, d: int, compile_: bool) -> Workload:
    providers: dict[str, Provider | str] = {
        mmot_provider(device): Provider(lambda x: mmot.multi_info_nce(x["x"], PCMC_TAU, present=x["present"]), differentiable=True),
    }
    _with_compiled(providers, "materialized", _materialized_pcmc, compile_, n)
    pairs = m * (m - 1) // 2
    io = m * n * d * F32
    both = round(n * (1 - MISSING) ** 2)  # the samples a pair has in both modalities, on average
    gemm = 2 * both * both * d
    return Workload(
        "multi_info_nce",
        f"M={m} N={n} D={d}",
        _modalities(m, n, d, missing=True),
        # Per pair, both directions' log-sum-exps: two N×N×D products and 2N² exponentials.
        Work(footprint=io, traffic=io, flops=pairs * 2 * gemm, exps=pairs * 2 * both * both),
        # The backward recomputes the tiles (two products) and forms the two gradients (two more).
        Work(footprint=io, traffic=2 * io, flops=pairs * 4 * gemm, exps=pairs * 2 * both * both),
        lambda x: reference.multi_info_nce(x["x"].double(), x["present"], x["x"].new_ones((m, m), dtype=torch.float64), PCMC_TAU)[1],
        ("x",),
        providers,
        target=Target("materialized", 2.0, mode="forward+backward") if (m, n, d) == (3, 4096, 256) else None,
    )


# ---------------------------------------------------------------------------------------------
# NT-Xent


def nt_xent_workloads(device: torch.device, size: str, compile_: bool) -> list[Workload]:
    shapes = {"tiny": [(128, 32)], "quick": [(4096, 256)], "full": [(4096, 256), (16384, 256)]}[size]
    return [_nt_xent(device, n, d, compile_) for n, d in shapes]


def _materialized_nce(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SimCLR's 2N-way loss as CoMM's code writes it: the 2N×2N cosine logits of [x; y], the
    self-similarities masked out, a cross-entropy to each row's partner."""
    z = F.normalize(torch.cat([x, y]), dim=-1)
    n = x.shape[0]
    logits = (z @ z.T / NT_XENT_TAU).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, target)


def _nt_xent(device: torch.device, n: int, d: int, compile_: bool) -> Workload:
    def make(dev: torch.device, small: bool) -> dict:
        x = _modalities(2, n, d, missing=False)(dev, small)["x"]
        return {"x": x[0], "y": x[1]}

    providers: dict[str, Provider | str] = {
        mmot_provider(device): Provider(lambda x: mmot.nt_xent(x["x"], x["y"], NT_XENT_TAU), differentiable=True),
    }
    _with_compiled(providers, "materialized", lambda x: _materialized_nce(x["x"], x["y"]), compile_, 2 * n)
    io = 2 * n * d * F32
    gemm = 2 * (2 * n) ** 2 * d
    return Workload(
        "nt_xent",
        f"N={n} D={d}",
        make,
        # The 2N×2N logits by blocks, the symmetric self blocks' tiles once; the backward recomputes
        # them and forms the gradients from the same tiles.
        Work(footprint=io, traffic=io, flops=gemm / 2, exps=(2 * n) ** 2),
        Work(footprint=io, traffic=2 * io, flops=gemm, exps=(2 * n) ** 2),
        lambda x: reference.nt_xent(x["x"].double(), x["y"].double(), NT_XENT_TAU).mean(),
        ("x", "y"),
        providers,
        target=Target("materialized", 2.0, mode="forward+backward") if (n, d) == (4096, 256) else None,
    )


# ---------------------------------------------------------------------------------------------
# PCMR: pairwise_similarity_regression


def similarity_regression_workloads(device: torch.device, size: str, compile_: bool) -> list[Workload]:
    # --quick stays below the bar's size: the materialised form takes seconds per call there.
    shapes = {"tiny": [(3, 256, 32)], "quick": [(3, 4096, 256)], "full": [(3, 16384, 256)]}[size]
    return [_similarity_regression(device, *shape, compile_) for shape in shapes]


def _materialized_pcmr(x: dict) -> torch.Tensor:
    """Per pair, the N×N similarities of the rows present in both: the matched ones' mean squared
    distance to 1, the others' to 0."""
    emb, present = x["x"], x["present"]
    total = emb.new_zeros(())
    pairs = list(itertools.combinations(range(emb.shape[0]), 2))
    for i, j in pairs:
        keep = present[i] & present[j]
        a, b = F.normalize(emb[i][keep], dim=-1), F.normalize(emb[j][keep], dim=-1)
        s = a @ b.T
        rows = s.shape[0]
        diagonal = torch.eye(rows, dtype=torch.bool, device=s.device)
        match = (s.diagonal() - 1.0).pow(2).mean()
        nonmatch = s.masked_fill(diagonal, 0.0).pow(2).sum() / max(rows * (rows - 1), 1)
        total = total + match + nonmatch
    return total / len(pairs)


def _similarity_regression(device: torch.device, m: int, n: int, d: int, compile_: bool) -> Workload:
    providers: dict[str, Provider | str] = {
        mmot_provider(device): Provider(lambda x: mmot.pairwise_similarity_regression(x["x"], present=x["present"]), differentiable=True),
    }
    _with_compiled(providers, "materialized", _materialized_pcmr, compile_, n)
    pairs = m * (m - 1) // 2
    io = m * n * d * F32
    grams = 2 * n * d * d
    return Workload(
        "pairwise_similarity_regression",
        f"M={m} N={n} D={d}",
        _modalities(m, n, d, missing=True),
        # Per pair, the two D×D Grams of the rows present in both (the masks differ per pair).
        Work(footprint=io, traffic=io, flops=pairs * 2 * grams),
        # Per pair, each side's gradient is its rows times the other side's Gram.
        Work(footprint=io, traffic=2 * io, flops=pairs * 2 * grams),
        lambda x: reference.pairwise_similarity_regression(x["x"].double(), present=x["present"]),
        ("x",),
        providers,
        target=Target("materialized", 20.0, mode="forward+backward") if (n, d) == (16384, 256) else None,
    )


# ---------------------------------------------------------------------------------------------
# CoMM


def comm_workloads(device: torch.device, size: str, compile_: bool) -> list[Workload]:
    shapes = {"tiny": [(2, 128, 32)], "quick": [(2, 2048, 256)], "full": [(2, 4096, 256)]}[size]
    return [_comm(device, *shape, compile_) for shape in shapes]


def _materialized_comm(x: dict) -> torch.Tensor:
    """CoMM's loss as its code computes it: every term's NCE on its own 2N×2N logits."""
    z1, z2 = x["z1"], x["z2"]
    last = z1.shape[0] - 1
    terms = [0.5 * (_materialized_nce(z1[i], z2[last]) + _materialized_nce(z2[i], z1[last])) for i in range(last + 1)]
    return torch.stack(terms).mean()


def _comm(device: torch.device, m: int, n: int, d: int, compile_: bool) -> Workload:
    def make(dev: torch.device, small: bool) -> dict:
        views = _modalities(2 * (m + 1), n, d, missing=False)(dev, small)["x"]
        return {"z1": views[: m + 1], "z2": views[m + 1 :]}

    loss = mmot.nn.CoMMLoss(NT_XENT_TAU)
    providers: dict[str, Provider | str] = {mmot_provider(device): Provider(lambda x: loss(x["z1"], x["z2"]), differentiable=True)}
    _with_compiled(providers, "materialized", _materialized_comm, compile_, 2 * n)
    io = 2 * (m + 1) * n * d * F32
    nces = 2 * m + 1  # term M's two NCEs are the same
    block = 2 * n * n * d
    return Workload(
        "comm_loss",
        f"M={m} N={n} D={d}",
        make,
        # Per NCE a cross block and the masked view's self block (half, by symmetry); the two shared
        # self blocks once per call.
        Work(footprint=io, traffic=io, flops=nces * 1.5 * block + block, exps=(nces * 2 + 2) * n * n),
        Work(footprint=io, traffic=2 * io, flops=2 * (nces * 1.5 * block + block), exps=(nces * 2 + 2) * n * n),
        lambda x: reference.comm_loss(x["z1"].double(), x["z2"].double(), NT_XENT_TAU)[0],
        ("z1", "z2"),
        providers,
        target=Target("materialized", 2.0, mode="forward+backward") if (m, n, d) == (2, 4096, 256) else None,
    )
