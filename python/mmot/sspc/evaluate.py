"""Cross-modal retrieval metrics: R@1, R@5, R@10 (percent) and MedR for every ordered modality pair.

For a query modality a and a gallery modality b over the same N samples, query i's true match is
gallery item i. Its rank is 1 + the number of gallery items scored strictly higher than the true
match (cosine similarity of the joint embeddings), so ties count in the query's favour.
R@k is the percentage of queries with rank <= k; MedR is the median rank (for an even number of
queries, the mean of the two middle ranks).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

RECALL_KS = (1, 5, 10)
METRICS = ("R@1", "R@5", "R@10", "MedR")


def ranks(query: Tensor, gallery: Tensor, block: int = 1024) -> Tensor:
    """1-based rank of gallery item i for query i under cosine similarity; (N,) long."""
    q = torch.nn.functional.normalize(query.float(), dim=-1)
    g = torch.nn.functional.normalize(gallery.float(), dim=-1)
    out = []
    for start in range(0, q.shape[0], block):
        sims = q[start : start + block] @ g.T
        idx = torch.arange(start, start + sims.shape[0])
        true = sims[torch.arange(sims.shape[0]), idx]
        out.append(1 + (sims > true[:, None]).sum(dim=1))
    return torch.cat(out)


def retrieval_metrics(query: Tensor, gallery: Tensor) -> dict[str, float]:
    r = ranks(query, gallery).double()
    out = {f"R@{k}": float((r <= k).double().mean() * 100.0) for k in RECALL_KS}
    out["MedR"] = float(r.median()) if r.numel() % 2 else float(r.sort().values[r.numel() // 2 - 1 : r.numel() // 2 + 1].mean())
    return out


def all_pairs(embeddings: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """Metrics for every ordered pair, keyed "a->b" (query a, gallery b)."""
    return {f"{a}->{b}": retrieval_metrics(embeddings[a], embeddings[b]) for a, b in itertools.permutations(embeddings, 2)}


def mean_over_pairs(pairs: dict[str, dict[str, float]]) -> dict[str, float]:
    return {m: sum(p[m] for p in pairs.values()) / len(pairs) for m in METRICS}


def evaluate_checkpoint(path, splits: list[str] | None = None, device: str = "cpu") -> dict:
    """Load a checkpoint written by :func:`mmot.sspc.train.train` and evaluate it on its data."""
    from mmot.sspc.train import load_for_eval

    model, data, cfg = load_for_eval(path, device=device)
    from mmot.sspc.model import embed_split

    results = {}
    for name, split in data.items():
        if name == "train" or (splits and name not in splits):
            continue
        pairs = all_pairs(embed_split(model, split, cfg.train.batch_size, device))
        results[name] = {"pairs": pairs, "mean": mean_over_pairs(pairs)}
    return results
