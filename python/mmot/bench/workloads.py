"""The workload registry: every op at its reference sizes, with every provider, its floor counts and its reference result.

``mmot-bench`` and the pytest-benchmark suites in ``bench/`` both run these. A provider is a
:class:`Provider` (a callable on the workload's inputs) or a string saying why it is unavailable
here (a package missing, the wrong device, or a size it cannot hold). Sizes come in three sets:
"full" (the reference sizes), "quick" (the SSPC and SwAV sizes and smaller batches) and "tiny"
(seconds in all, for smoke tests; the figures mean nothing).

A workload's :class:`~mmot.bench.floors.Work` counts what any implementation must do, as
docs/benchmarks.md explains: Sinkhorn ops read their matrix once per iteration plus once for
the column statistics and write the result once, and do two matrix-vector contractions per slot
group and iteration; similarity and info_nce read their inputs once and do their GEMMs.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F

import mmot
from mmot import reference
from mmot.bench import baselines, contrastive_workloads, structure_workloads
from mmot.bench.floors import Work
from mmot.bench.workload import (
    BENCH_EXTRA,
    DENSE_MAX_ELEMENTS,
    F32,
    Provider,
    Target,
    Workload,
    compiled,
    gradient_io,
    mmot_provider,
)
from mmot.dense_multi_sinkhorn import dense_multi_sinkhorn


def cosine_scores(n: int, k: int, device="cpu", seed: int = 0, batch: tuple[int, ...] = (), dim: int = 64) -> torch.Tensor:
    """Cosine similarities of seeded random unit vectors: the scores the Sinkhorn ops get in training."""
    generator = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(*batch, n, dim, generator=generator), dim=-1)
    a = F.normalize(torch.randn(*batch, k, dim, generator=generator), dim=-1)
    return (x @ a.transpose(-1, -2)).to(device)


def _sinkhorn_work(problems: int, n: int, k: int, iters: int, groups: int) -> Work:
    matrix = n * k * F32
    return Work(
        footprint=2 * problems * matrix,
        traffic=(iters + 2) * problems * matrix,  # (iters + 1) reads and one write
        resident=matrix,
        flops=4 * groups * problems * n * k * iters,  # per slot group: a column and a row contraction
        exps=problems * n * k,
    )


def multi_sinkhorn_workloads(device: torch.device, size: str, compile_: bool) -> list[Workload]:
    shapes = {"tiny": [(300, 16)], "quick": [(7660, 64)], "full": [(7660, kk) for kk in (64, 128, 256, 1024)]}[size]
    return [_multi_sinkhorn(device, n, n_anchors, compile_) for n, n_anchors in shapes]


def _multi_sinkhorn(device: torch.device, n: int, n_anchors: int, compile_: bool) -> Workload:
    k, eps, iters = n_anchors // 2, 0.07, 20
    weights = [0.25] * (n_anchors - k) + [1.0] * k

    def ref(x: dict, log_domain: str = "auto") -> torch.Tensor:
        s = x["scores"]
        mass = torch.full(s.shape[-1:], s.shape[-2] / s.shape[-1], dtype=s.dtype, device=s.device)
        return reference.multi_sinkhorn(s, eps, iters, weights, k, mass, "minmax", log_domain)

    providers: dict[str, Provider | str] = {
        mmot_provider(device): Provider(lambda x: mmot.multi_sinkhorn(x["scores"], k, eps, iters), differentiable=True),
        "reference-eager": Provider(ref, differentiable=True),
        "grouped-torch-eager": Provider(lambda x: baselines.grouped_torch_eager_multi_sinkhorn(x["scores"], k, eps, iters)),
    }
    if compile_:
        providers["reference-compiled"] = Provider(compiled(lambda x: ref(x, log_domain="off")))
    if n_anchors * n * n_anchors > DENSE_MAX_ELEMENTS[device.type]:
        providers["official-dense"] = f"needs {n_anchors * n * n_anchors * F32 / 2**30:.0f} GiB per (K,N,K) tensor"
    else:
        providers["official-dense"] = Provider(lambda x: dense_multi_sinkhorn(x["scores"], k, eps, iters))
    return Workload(
        "multi_sinkhorn",
        f"N={n} K={n_anchors} k={k} iters={iters}",
        lambda dev, small: {"scores": cosine_scores(64 if small else n, n_anchors, dev)},
        _sinkhorn_work(1, n, n_anchors, iters, groups=2),
        gradient_io((n, n_anchors), (n, n_anchors)),
        lambda x: ref({"scores": x["scores"].double()}),
        ("scores",),
        providers,
    )


def sinkhorn_workloads(device: torch.device, size: str, compile_: bool) -> list[Workload]:
    b, k, iters, eps = (256, 96, 3, 0.05) if size == "tiny" else (4096, 3000, 3, 0.05)

    def ref(x: dict, log_domain: str = "auto") -> torch.Tensor:
        s = x["scores"]
        rows = torch.ones(s.shape[0], dtype=s.dtype, device=s.device)
        cols = torch.full((s.shape[1],), s.shape[0] / s.shape[1], dtype=s.dtype, device=s.device)
        return reference.sinkhorn(s, eps, iters, rows, cols, log_domain)

    providers: dict[str, Provider | str] = {
        mmot_provider(device): Provider(lambda x: mmot.sinkhorn(x["scores"], eps, iters), differentiable=True),
        "reference-eager": Provider(ref, differentiable=True),
        "swav-eager": Provider(lambda x: baselines.swav_eager_sinkhorn(x["scores"], eps, iters)),
    }
    if compile_:
        providers["reference-compiled"] = Provider(compiled(lambda x: ref(x, log_domain="off")))
    pot_missing = f"POT is not installed: {BENCH_EXTRA}" if importlib.util.find_spec("ot") is None else None
    if device.type == "cpu":
        providers["pot-numpy"] = pot_missing or Provider(lambda x: baselines.pot_sinkhorn(x["scores"], eps, iters, backend="numpy"))
    providers["pot-torch"] = pot_missing or Provider(lambda x: baselines.pot_sinkhorn(x["scores"], eps, iters, backend="torch"))
    if device.type == "cuda":
        providers["flash-sinkhorn"] = _flash_sinkhorn(eps)

    def inputs(dev: torch.device, small: bool) -> dict:
        generator = torch.Generator().manual_seed(0)
        x = F.normalize(torch.randn(64 if small else b, 64, generator=generator), dim=-1).to(dev)
        y = F.normalize(torch.randn(k, 64, generator=generator), dim=-1).to(dev)
        # |x - y|^2 = 2 - 2 x.y for unit rows: the squared-Euclidean cost flash-sinkhorn takes.
        return {"scores": x @ y.T, "x": x, "y": y}

    swav_size = size != "tiny"
    return [
        Workload(
            "sinkhorn",
            f"B={b} K={k} iters={iters}",
            inputs,
            _sinkhorn_work(1, b, k, iters, groups=1),
            gradient_io((b, k), (b, k)),
            lambda x: ref({"scores": x["scores"].double()}),
            ("scores",),
            providers,
            target=Target("swav-eager", 2.5, 2.0, f"{iters + 1} reads + 1 write") if swav_size else None,
        )
    ]


def _flash_sinkhorn(eps: float) -> Provider | str:
    """flash-sinkhorn's streaming solver on the features (its own stopping rule; returns a cost, not a plan)."""
    if importlib.util.find_spec("flash_sinkhorn") is None:
        return "flash-sinkhorn not installed (pip install flash-sinkhorn)"
    from flash_sinkhorn import SamplesLoss

    # Its cost is the full |x - y|^2 = 2 - 2 x.y for unit rows, so exp(-cost/blur^2) matches
    # exp(scores/eps) when blur^2 = 2 eps.
    loss = SamplesLoss(loss="sinkhorn", p=2, blur=(2 * eps) ** 0.5, debias=False)
    return Provider(lambda x: loss(x["x"], x["y"]), comparable=False)


def batched_workloads(device: torch.device, size: str, compile_: bool) -> list[Workload]:
    problems = {"tiny": 64, "quick": 65536 if device.type == "cuda" else 16384, "full": 65536}[size]
    return [make(device, problems, side, compile_) for side in (4, 16) for make in (_sinkhorn_batched, _multi_sinkhorn_batched)]


def _batched_inputs(problems: int, side: int) -> Callable[[torch.device, bool], dict]:
    return lambda dev, small: {"scores": cosine_scores(side, side, dev, batch=(16 if small else problems,))}


def _sinkhorn_batched(device: torch.device, problems: int, side: int, compile_: bool) -> Workload:
    iters, eps = 20, 0.1

    def ref(x: dict, log_domain: str = "auto") -> torch.Tensor:
        s = x["scores"]
        ones = torch.ones(s.shape[:-1], dtype=s.dtype, device=s.device)
        return reference.sinkhorn(s, eps, iters, ones, ones, log_domain)

    providers: dict[str, Provider | str] = {
        mmot_provider(device): Provider(lambda x: mmot.sinkhorn(x["scores"], eps, iters), differentiable=True),
        "reference-eager": Provider(ref, differentiable=True),
        "batched-torch-eager": Provider(lambda x: baselines.batched_torch_eager_sinkhorn(x["scores"], eps, iters)),
    }
    if compile_:
        # torch.compile differentiates the compiled graph (AOTAutograd): the --backward baseline.
        providers["reference-compiled"] = Provider(compiled(lambda x: ref(x, log_domain="off")), differentiable=True)
    shape = (problems, side, side)
    return Workload(
        "sinkhorn_batched",
        f"{problems}x({side}x{side}) iters={iters}",
        _batched_inputs(problems, side),
        _sinkhorn_work(problems, side, side, iters, groups=1),
        gradient_io(shape, shape),
        lambda x: ref({"scores": x["scores"].double()}),
        ("scores",),
        providers,
    )


def _multi_sinkhorn_batched(device: torch.device, problems: int, side: int, compile_: bool) -> Workload:
    k, iters, eps = side // 2, 20, 0.1
    weights = [0.25] * (side - k) + [1.0] * k

    def ref(x: dict, log_domain: str = "auto") -> torch.Tensor:
        s = x["scores"]
        mass = torch.ones(s.shape[:-2] + s.shape[-1:], dtype=s.dtype, device=s.device)
        return reference.multi_sinkhorn(s, eps, iters, weights, k, mass, "minmax", log_domain)

    providers: dict[str, Provider | str] = {
        mmot_provider(device): Provider(lambda x: mmot.multi_sinkhorn(x["scores"], k, eps, iters), differentiable=True),
        "reference-eager": Provider(ref, differentiable=True),
    }
    if compile_:
        providers["reference-compiled"] = Provider(compiled(lambda x: ref(x, log_domain="off")), differentiable=True)
    shape = (problems, side, side)
    return Workload(
        "multi_sinkhorn_batched",
        f"{problems}x({side}x{side}) k={k} iters={iters}",
        _batched_inputs(problems, side),
        _sinkhorn_work(problems, side, side, iters, groups=2),
        gradient_io(shape, shape),
        lambda x: ref({"scores": x["scores"].double()}),
        ("scores",),
        providers,
    )


def similarity_workloads(device: torch.device, size: str, compile_: bool) -> list[Workload]:
    mods, sets, n, k, d = (3, 3, 64, 16, 32) if size == "tiny" else (3, 3, 7660, 64, 256)

    def inputs(dev: torch.device, small: bool) -> dict:
        generator = torch.Generator().manual_seed(0)
        return {
            "x": torch.randn(mods, 1, 64 if small else n, d, generator=generator).to(dev),
            "y": torch.randn(1, sets, k, d, generator=generator).to(dev),
        }

    def ref(x: dict) -> torch.Tensor:
        return reference.similarity(x["x"], x["y"])

    providers: dict[str, Provider | str] = {
        mmot_provider(device): Provider(lambda x: mmot.similarity(x["x"], x["y"]), differentiable=True),
        "reference-eager": Provider(ref, differentiable=True),
    }
    if compile_:
        providers["reference-compiled"] = Provider(compiled(ref))
    x_shape, y_shape, out_shape = (mods, n, d), (sets, k, d), (mods, sets, n, k)
    flops = 2 * mods * sets * n * k * d
    io = sum(torch.Size(s).numel() for s in (x_shape, y_shape, out_shape)) * F32
    return [
        Workload(
            "similarity",
            f"({mods},1,{n},{d})x(1,{sets},{k},{d})",
            inputs,
            Work(footprint=io, traffic=io, flops=flops),
            gradient_io(out_shape, x_shape, y_shape) + Work(0, 0, flops=2 * flops),  # gx = G ŷ and gy = Gᵀ x̂
            lambda x: ref({"x": x["x"].double(), "y": x["y"].double()}),
            ("x", "y"),
            providers,
        )
    ]


# The GPU target: N = 65536 pairs of D = 512 (full size on CUDA), no slower than 1.2x the
# materialised logits (16 GiB of them) at O(N) memory.
GPU_INFO_NCE = (65536, 512)


def info_nce_workloads(device: torch.device, size: str, compile_: bool) -> list[Workload]:
    d = 32 if size == "tiny" else 256
    shapes = [(n, d) for n in {"tiny": [128], "quick": [4096], "full": [4096, 8192, 16384]}[size]]
    if device.type == "cuda" and size == "full":
        shapes.append(GPU_INFO_NCE)
    return [_info_nce(device, n, d) for n, d in shapes]


def _materialized_info_nce(x: dict, temperature: float) -> torch.Tensor:
    """The full N×N logits and F.cross_entropy in both directions (everything_at_once's NormSoftmax)."""
    a, b = F.normalize(x["a"], dim=-1), F.normalize(x["b"], dim=-1)
    logits = a @ b.T / temperature
    labels = torch.arange(a.shape[0], device=a.device)
    return F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)


# Bytes per N² the materialised form holds at its peak, in units of one float32 N×N matrix: the
# logits, their scaled copy and a log-softmax forward; with autograd, the saved log-softmaxes
# of both directions and their gradients as well.
MATERIALIZED_PEAK = {"forward": 3, "forward+backward": 6}


def _materialized_guarded(temperature: float) -> Callable[[dict], torch.Tensor]:
    """The materialised form, refused with the memory it needs where a CUDA device has not that much free (rather than an OOM)."""

    def run(x: dict) -> torch.Tensor:
        a = x["a"]
        if a.device.type == "cuda":
            mode = "forward+backward" if torch.is_grad_enabled() else "forward"
            need = MATERIALIZED_PEAK[mode] * a.shape[0] ** 2 * F32 + 2**30
            free, _ = torch.cuda.mem_get_info(a.device)
            if need > free:
                raise MemoryError(f"skipped: needs {need / 2**30:.0f} GiB for the {mode} N×N logits, {free / 2**30:.0f} GiB free")
        return _materialized_info_nce(x, temperature)

    return run


def _info_nce(device: torch.device, n: int, d: int) -> Workload:
    temperature = 0.05

    def inputs(dev: torch.device, small: bool) -> dict:
        generator = torch.Generator().manual_seed(0)
        rows = 64 if small else n
        return {"a": torch.randn(rows, d, generator=generator).to(dev), "b": torch.randn(rows, d, generator=generator).to(dev)}

    def ref(x: dict) -> torch.Tensor:
        a, b = x["a"].double(), x["b"].double()
        return reference.info_nce(a, b, torch.ones(a.shape[0], dtype=torch.bool, device=a.device), temperature).mean()

    providers: dict[str, Provider | str] = {
        mmot_provider(device): Provider(lambda x: mmot.info_nce(x["a"], x["b"], temperature), differentiable=True),
        "materialized": Provider(_materialized_guarded(temperature), differentiable=True),
    }
    if device.type == "cuda":
        providers["inf-cl"] = _inf_cl(temperature)
    gemm = 2 * n * n * d
    io = 2 * n * d * F32
    return Workload(
        "info_nce",
        f"N=M={n} D={d}",
        inputs,
        Work(footprint=io, traffic=io, flops=gemm, exps=n * n),
        Work(footprint=io, traffic=io, flops=2 * gemm),  # grad_a = G b̂ and grad_b = Gᵀ â
        ref,
        ("a", "b"),
        providers,
        target=Target("materialized", 1 / 1.2) if (n, d) == GPU_INFO_NCE else None,
        # float64 logits, their masked copies, two log-sum-exps and autograd's saved tensors
        reference_bytes=8 * n * n * 8,
    )


def _inf_cl(temperature: float) -> Provider | str:
    """Inf-CL's tiled contrastive loss (one direction per call, so both directions are summed)."""
    if importlib.util.find_spec("inf_cl") is None:
        return "inf-cl not installed (pip install inf-cl)"
    from inf_cl import cal_inf_loss

    def run(x):
        a, b = F.normalize(x["a"], dim=-1), F.normalize(x["b"], dim=-1)
        return cal_inf_loss(a, b, scale=1 / temperature) + cal_inf_loss(b, a, scale=1 / temperature)

    return Provider(run, differentiable=True)


def anchor_consistency_workloads(device: torch.device, size: str, compile_: bool) -> list[Workload]:
    shapes = [(3, 3, 64, 16)] if size == "tiny" else [(3, 3, 2160, 64), (4096, 4096)]  # SSPC's 3x3 (2160, 64) and a flat one
    return [_anchor_consistency(device, shape, compile_) for shape in shapes]


def _anchor_consistency(device: torch.device, shape: tuple[int, ...], compile_: bool) -> Workload:
    temperature = 0.1

    def inputs(dev: torch.device, small: bool) -> dict:
        generator = torch.Generator().manual_seed(0)
        rows = (*shape[:-2], 16, shape[-1]) if small else shape
        sim = torch.rand(rows, generator=generator) * 2 - 1  # cosine similarities
        return {"sim": sim.to(dev), "target": torch.rand(rows, generator=generator).to(dev)}

    def ref(x: dict) -> torch.Tensor:
        return reference.anchor_consistency_loss(x["sim"], x["target"], temperature)

    providers: dict[str, Provider | str] = {
        mmot_provider(device): Provider(lambda x: mmot.anchor_consistency_loss(x["sim"], x["target"], temperature), differentiable=True),
        "reference-eager": Provider(ref, differentiable=True),
    }
    if compile_:
        providers["reference-compiled"] = Provider(compiled(ref))
    size = torch.Size(shape).numel() * F32
    return Workload(
        "anchor_consistency",
        "x".join(map(str, shape)),
        inputs,
        Work(footprint=2 * size, traffic=2 * size, exps=torch.Size(shape).numel()),  # read sim and target
        gradient_io(shape),  # write the gradient of sim (a fused pass needs no second read)
        lambda x: ref({"sim": x["sim"].double(), "target": x["target"].double()}),
        ("sim",),
        providers,
    )


OPS: dict[str, Callable[[torch.device, str, bool], list[Workload]]] = {
    "anchor_consistency": anchor_consistency_workloads,
    "multi_sinkhorn": multi_sinkhorn_workloads,
    "sinkhorn": sinkhorn_workloads,
    "batched": batched_workloads,
    "similarity": similarity_workloads,
    "info_nce": info_nce_workloads,
    "geometric_consistency": structure_workloads.geometric_consistency_workloads,
    "feature_separation": structure_workloads.feature_separation_workloads,
    "brownian_bridge": structure_workloads.brownian_bridge_workloads,
    "multi_info_nce": contrastive_workloads.multi_info_nce_workloads,
    "nt_xent": contrastive_workloads.nt_xent_workloads,
    "pairwise_similarity_regression": contrastive_workloads.similarity_regression_workloads,
    "comm_loss": contrastive_workloads.comm_workloads,
}


def select(device: torch.device, size: str, ops=None, only=None, compile_: bool | None = None) -> list[Workload]:
    """The workloads of ``ops`` (default all) at ``size``, those whose label contains one of ``only``.

    ``compile_`` (default: only at the full sizes) adds the torch.compile'd references, whose
    compilation takes tens of seconds each.
    """
    if compile_ is None:
        compile_ = size == "full"
    chosen = [w for op in (ops or OPS) for w in OPS[op](device, size, compile_)]
    return [w for w in chosen if not only or any(part in w.label for part in only)]
