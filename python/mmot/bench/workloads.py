"""The workloads ``mmot-bench`` times: each op at its reference sizes (DESIGN.md §3), with every provider.

A provider is a callable on the workload's inputs; ``None`` means it is unavailable here (a
package missing, the wrong device, or a size it cannot hold), and the table says why.
Floors count the bytes a streaming implementation must move: one read of the scores per
iteration plus one write of the result (Sinkhorn ops), or one read of the inputs plus one write
of the output (similarity).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import mmot
from mmot import reference

# Official-dense holds a (K, N, K) tensor and several temporaries of that size; beyond this many
# elements it would not fit in this class of machine's memory, so it is reported, not run.
DENSE_MAX_ELEMENTS = 256 * 7660 * 128


@dataclass
class Workload:
    op: str
    shape: str
    make_inputs: Callable[[torch.device], dict]
    floor_bytes: int
    providers: dict[str, Callable[[dict], object] | str] = field(default_factory=dict)
    baseline: str = "reference-eager"


def _unit_rows(n: int, dim: int, generator: torch.Generator, device) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=-1).to(device)


def cosine_scores(n: int, k: int, device="cpu", seed: int = 0, batch: tuple[int, ...] = (), dim: int = 64) -> torch.Tensor:
    """Cosine similarities of seeded random unit vectors: the scores the Sinkhorn ops get in training."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(*batch, n, dim, generator=generator), dim=-1)
    a = torch.nn.functional.normalize(torch.randn(*batch, k, dim, generator=generator), dim=-1)
    return (x @ a.transpose(-1, -2)).to(device)


def _baselines():
    try:
        from mmot.bench import baselines
    except ImportError:
        return None
    return baselines


def _compiled(fn: Callable) -> Callable:
    compiled = torch.compile(fn, dynamic=False)
    return compiled


def _mmot_provider(device: torch.device) -> str:
    return "mmot-rust" if device.type == "cpu" else "mmot-triton"


def multi_sinkhorn_workloads(device: torch.device, quick: bool) -> list[Workload]:
    workloads = []
    baselines = _baselines()
    for n_anchors in (64,) if quick else (64, 128, 256, 1024):
        n, k, eps, iters = 7660, n_anchors // 2, 0.07, 20

        def inputs(dev, n=n, n_anchors=n_anchors):
            return {"scores": cosine_scores(n, n_anchors, dev)}

        weights = [0.25] * (n_anchors - k) + [1.0] * k
        mass = torch.full((n_anchors,), n / n_anchors, device=device)
        providers: dict[str, Callable | str] = {
            _mmot_provider(device): lambda x, k=k: mmot.multi_sinkhorn(x["scores"], k, eps, iters),
            "reference-eager": lambda x, k=k: mmot.multi_sinkhorn(x["scores"], k, eps, iters, backend="torch"),
            "reference-compiled": _lazy_compiled(
                lambda s, w=weights, k=k, m=mass: reference.multi_sinkhorn(s, eps, iters, w, k, m, "minmax", "off")
            ),
        }
        if baselines is None:
            providers["official-dense"] = "mmot.bench.baselines missing"
        elif n_anchors * n * n_anchors > DENSE_MAX_ELEMENTS:
            gib = n_anchors * n * n_anchors * 4 / 2**30
            providers["official-dense"] = f"needs {gib:.0f} GiB per (K,N,K) tensor"
        else:
            providers["official-dense"] = lambda x, k=k: baselines.official_dense_multi_sinkhorn(x["scores"], k, eps, iters)
        workloads.append(
            Workload(
                "multi_sinkhorn",
                f"N={n} K={n_anchors} k={k} iters={iters}",
                inputs,
                floor_bytes=(iters + 1) * n * n_anchors * 4,
                providers=providers,
                baseline="official-dense" if isinstance(providers.get("official-dense"), Callable) else "reference-eager",
            )
        )
    return workloads


def _lazy_compiled(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], torch.Tensor]:
    """torch.compile of a reference formulation, compiled on first call (its warm-up)."""
    holder: dict[str, Callable] = {}

    def run(x: dict) -> torch.Tensor:
        if "fn" not in holder:
            holder["fn"] = _compiled(fn)
        return holder["fn"](x["scores"])

    return run


def sinkhorn_workloads(device: torch.device, quick: bool) -> list[Workload]:
    b, k, eps, iters = 4096, 3000, 0.05, 3
    baselines = _baselines()
    rows = torch.ones(b, device=device)
    cols = torch.full((k,), b / k, device=device)
    providers: dict[str, Callable | str] = {
        _mmot_provider(device): lambda x: mmot.sinkhorn(x["scores"], eps, iters),
        "reference-eager": lambda x: mmot.sinkhorn(x["scores"], eps, iters, backend="torch"),
        "reference-compiled": _lazy_compiled(lambda s: reference.sinkhorn(s, eps, iters, rows, cols, "off")),
    }
    if baselines is None:
        providers["swav-eager"] = providers["pot-numpy"] = providers["pot-torch"] = "mmot.bench.baselines missing"
    else:
        providers["swav-eager"] = lambda x: baselines.swav_eager_sinkhorn(x["scores"], eps, iters)
        if importlib.util.find_spec("ot") is None:
            providers["pot-numpy"] = providers["pot-torch"] = "POT not installed (pip install pot)"
        else:
            if device.type == "cpu":
                providers["pot-numpy"] = lambda x: baselines.pot_sinkhorn(x["scores"], eps, iters, backend="numpy")
            providers["pot-torch"] = lambda x: baselines.pot_sinkhorn(x["scores"], eps, iters, backend="torch")
    if device.type == "cuda":
        providers["flash-sinkhorn"] = _flash_sinkhorn(eps)

    def inputs(dev):
        generator = torch.Generator().manual_seed(0)
        x, y = _unit_rows(b, 64, generator, dev), _unit_rows(k, 64, generator, dev)
        # |x - y|^2 = 2 - 2 x.y for unit rows: the squared-Euclidean cost flash-sinkhorn takes.
        return {"scores": x @ y.T, "x": x, "y": y}

    return [
        Workload(
            "sinkhorn",
            f"B={b} K={k} iters={iters}",
            inputs,
            floor_bytes=(iters + 1) * b * k * 4,
            providers=providers,
            baseline="swav-eager" if baselines is not None else "reference-eager",
        )
    ]


def _flash_sinkhorn(eps: float) -> Callable[[dict], object] | str:
    """flash-sinkhorn's streaming solver on the features (its own stopping rule, not 3 iterations)."""
    if importlib.util.find_spec("flash_sinkhorn") is None:
        return "flash-sinkhorn not installed (pip install flash-sinkhorn)"
    from flash_sinkhorn import SamplesLoss

    # Its cost is the full |x - y|^2 = 2 - 2 x.y for unit rows, so exp(-cost/blur^2) matches
    # exp(scores/eps) when blur^2 = 2 eps.
    loss = SamplesLoss(loss="sinkhorn", p=2, blur=(2 * eps) ** 0.5, debias=False)
    return lambda x: loss(x["x"], x["y"])


def tiny_batch_workloads(device: torch.device, quick: bool) -> list[Workload]:
    workloads = []
    problems, iters = (16384 if quick else 65536), 20
    for size in (4, 16):

        def inputs(dev, size=size):
            return {"scores": cosine_scores(size, size, dev, batch=(problems,))}

        rows = torch.ones(problems, size, device=device)
        cols = torch.ones(problems, size, device=device)
        k = size // 2
        weights = [0.25] * (size - k) + [1.0] * k
        mass = torch.ones(problems, size, device=device)
        workloads.append(
            Workload(
                "sinkhorn_batched",
                f"{problems}x({size}x{size}) iters={iters}",
                inputs,
                floor_bytes=(iters + 1) * problems * size * size * 4,
                providers={
                    _mmot_provider(device): lambda x: mmot.sinkhorn(x["scores"], 0.1, iters),
                    "reference-eager": lambda x: mmot.sinkhorn(x["scores"], 0.1, iters, backend="torch"),
                    "reference-compiled": _lazy_compiled(lambda s, r=rows, c=cols: reference.sinkhorn(s, 0.1, iters, r, c, "off")),
                },
            )
        )
        workloads.append(
            Workload(
                "multi_sinkhorn_batched",
                f"{problems}x({size}x{size}) k={k} iters={iters}",
                inputs,
                floor_bytes=(iters + 1) * problems * size * size * 4,
                providers={
                    _mmot_provider(device): lambda x, k=k: mmot.multi_sinkhorn(x["scores"], k, 0.1, iters),
                    "reference-eager": lambda x, k=k: mmot.multi_sinkhorn(x["scores"], k, 0.1, iters, backend="torch"),
                    "reference-compiled": _lazy_compiled(
                        lambda s, w=weights, k=k, m=mass: reference.multi_sinkhorn(s, 0.1, iters, w, k, m, "minmax", "off")
                    ),
                },
            )
        )
    return workloads


def similarity_workloads(device: torch.device, quick: bool) -> list[Workload]:
    mods, sets, b, k, d = 3, 3, 7660, 64, 256

    def inputs(dev):
        generator = torch.Generator().manual_seed(0)
        return {
            "x": torch.randn(mods, 1, b, d, generator=generator).to(dev),
            "y": torch.randn(1, sets, k, d, generator=generator).to(dev),
        }

    def materialised(x):
        xn = torch.nn.functional.normalize(x["x"], dim=-1)
        yn = torch.nn.functional.normalize(x["y"], dim=-1)
        return xn @ yn.transpose(-1, -2)

    return [
        Workload(
            "similarity",
            f"({mods},1,{b},{d})x(1,{sets},{k},{d})",
            inputs,
            floor_bytes=(mods * b * d + sets * k * d + mods * sets * b * k) * 4,
            providers={
                _mmot_provider(device): lambda x: mmot.similarity(x["x"], x["y"]),
                "reference-eager": materialised,
            },
        )
    ]


def info_nce_workloads(device: torch.device, quick: bool) -> list[Workload]:
    if not hasattr(mmot, "info_nce"):
        return []
    workloads = []
    d = 256
    for n in (4096,) if quick else (4096, 8192, 16384):

        def inputs(dev, n=n):
            generator = torch.Generator().manual_seed(0)
            return {"a": torch.randn(n, d, generator=generator).to(dev), "b": torch.randn(n, d, generator=generator).to(dev)}

        def materialised(x):
            a = torch.nn.functional.normalize(x["a"], dim=-1)
            b = torch.nn.functional.normalize(x["b"], dim=-1)
            logits = a @ b.T / 0.05
            labels = torch.arange(a.shape[0], device=a.device)
            return torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)

        workloads.append(
            Workload(
                "info_nce",
                f"N=M={n} D={d}",
                inputs,
                floor_bytes=2 * n * d * 4,
                providers={
                    _mmot_provider(device): lambda x: mmot.info_nce(x["a"], x["b"]),
                    "materialized": materialised,
                    **({"inf-cl": _inf_cl()} if device.type == "cuda" else {}),
                },
                baseline="materialized",
            )
        )
    return workloads


def _inf_cl() -> Callable[[dict], object] | str:
    """Inf-CL's tiled contrastive loss (one direction per call, so both directions are summed)."""
    if importlib.util.find_spec("inf_cl") is None:
        return "inf-cl not installed (pip install inf-cl)"
    from inf_cl import cal_inf_loss

    def run(x):
        a = torch.nn.functional.normalize(x["a"], dim=-1)
        b = torch.nn.functional.normalize(x["b"], dim=-1)
        return cal_inf_loss(a, b, scale=1 / 0.05) + cal_inf_loss(b, a, scale=1 / 0.05)

    return run


OPS = {
    "multi_sinkhorn": multi_sinkhorn_workloads,
    "sinkhorn": sinkhorn_workloads,
    "batched": tiny_batch_workloads,
    "similarity": similarity_workloads,
    "info_nce": info_nce_workloads,
}
