"""Cross-modal retrieval metrics as everything_at_once reports them: R@1, R@5, R@10, R@50 (percent),
MedR and MeanR, for every ordered modality pair and the fused queries.

For a query modality a and a gallery modality b over the same N samples, query i's true match is
gallery item i, scored by the cosine similarity of the joint embeddings. **Ties are averaged**:
with h gallery items scored strictly above the true match and c items (the true match included)
scored exactly equal to it, the rank is h + (c + 1)/2, the mean position of the tied block, so a
tie never counts in the query's favour (everything_at_once's default, ``break_ties='averaging'``).
R@k is the percentage of queries with rank ≤ k; MedR and MeanR are the median (for an even N, the
mean of the two middle ranks) and the mean rank.

Class-level metrics, where the split has labels (the UCI digit, the concepts test bed's concept):
every gallery item of the query's class counts as a hit. cR@k is the percentage of queries whose
first same-class item has rank ≤ k, ties again averaged: with h items strictly above the best
same-class score and a tied block of c items of which s are of the class, that rank is
h + (c + 1)/(s + 1), the expected position of the block's first same-class item in a random order
of the block. mAP is the mean over queries of the average precision of the full ranked gallery
(exact ties, which float embeddings almost never produce, are broken by gallery order).

Fused queries (three or more modalities): the fused embedding of b and c is the mean of their
L2-normalised embeddings, as everything_at_once's ``b+c`` embeddings; "a->b+c" queries it with a
and "b+c->a" is the reverse. The headline one is "text->video+audio".

Structure metrics, in the summary: ``gap``, the modality gap ‖mean(â) − mean(b̂)‖ (C3's
measure, :func:`mmot.modality_gap`), weighted over the pairs as the retrieval metrics; and
``ucR@1``, retrieval with one modality's embeddings standing in for another's (C3's uni-modal
setting): queries of every other modality against a gallery of the *training* split's text
embeddings with their labels, a hit when the nearest gallery item shares the query's class
(where the split's classes all occur in training).

The summary over pairs is a weighted mean of the single-modality pairs, each ordered pair a->b
weighted as the contrastive loss weights {a, b} in training (``loss.pair_weights``), so text-video
counts 10× the audio pairs under SSPC's weights. Fused queries are reported, not averaged in: mmot
trains no fused terms, and neither does the SSPC model (its fused-term weights never apply).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

import mmot
from mmot.sspc.config import LossConfig

RECALL_KS = (1, 5, 10, 50)
METRICS = ("R@1", "R@5", "R@10", "R@50", "MedR", "MeanR")
CLASS_METRICS = ("cR@1", "cR@5", "cR@10", "mAP")
STRUCTURE_METRICS = ("gap", "ucR@1")
FUSED_QUERY = "text->video+audio"


def ranks_from_similarity(sims: Tensor, offset: int = 0) -> Tensor:
    """Ties-averaged 1-based ranks of each row's true match, column ``offset + row``, in a
    (rows, N) similarity block; (rows,) float64."""
    rows = torch.arange(sims.shape[0])
    true = sims[rows, rows + offset][:, None]
    above = (sims > true).sum(dim=1).double()
    tied = (sims == true).sum(dim=1).double()  # the true match included
    return above + (tied + 1.0) / 2.0


def ranks(query: Tensor, gallery: Tensor, block: int = 1024) -> Tensor:
    """1-based rank of gallery item i for query i under cosine similarity, ties averaged; (N,) float64."""
    q = torch.nn.functional.normalize(query.float(), dim=-1)
    g = torch.nn.functional.normalize(gallery.float(), dim=-1)
    return torch.cat([ranks_from_similarity(q[start : start + block] @ g.T, start) for start in range(0, q.shape[0], block)])


def first_hit_and_ap(sims: Tensor, query_labels: Tensor, gallery_labels: Tensor) -> tuple[Tensor, Tensor]:
    """For a (rows, N) similarity block, per row (float64): the ties-averaged rank of the first
    gallery item of the row's class, and the average precision of the ranked gallery."""
    relevant = query_labels[:, None] == gallery_labels[None, :]
    best = sims.masked_fill(~relevant, float("-inf")).max(dim=1, keepdim=True).values
    above = (sims > best).sum(dim=1).double()
    tied = sims == best
    first = above + (tied.sum(dim=1).double() + 1.0) / ((tied & relevant).sum(dim=1).double() + 1.0)
    order = sims.argsort(dim=1, descending=True, stable=True)
    hit = relevant.gather(1, order).double()
    position = torch.arange(1, sims.shape[1] + 1, dtype=torch.float64)
    ap = (hit * hit.cumsum(dim=1) / position).sum(dim=1) / hit.sum(dim=1)
    return first, ap


def class_ranks_and_ap(query: Tensor, gallery: Tensor, labels: Tensor, block: int = 1024) -> tuple[Tensor, Tensor]:
    """:func:`first_hit_and_ap` of query i's cosine similarities, gallery i sharing label i; (N,) each."""
    q = torch.nn.functional.normalize(query.float(), dim=-1)
    g = torch.nn.functional.normalize(gallery.float(), dim=-1)
    parts = [
        first_hit_and_ap(q[start : start + block] @ g.T, labels[start : start + block], labels) for start in range(0, q.shape[0], block)
    ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def retrieval_metrics(query: Tensor, gallery: Tensor, labels: Tensor | None = None) -> dict[str, float]:
    """Instance metrics; with ``labels`` (N,) also the class-level ones."""
    out = metrics_from_ranks(ranks(query, gallery))
    if labels is not None:
        first, ap = class_ranks_and_ap(query, gallery, labels)
        out.update({f"cR@{k}": float((first <= k).double().mean() * 100.0) for k in (1, 5, 10)})
        out["mAP"] = float(ap.mean() * 100.0)
    return out


def metrics_from_ranks(r: Tensor) -> dict[str, float]:
    """R@k (% of ranks ≤ k), MedR and MeanR of the (N,) ranks ``r``."""
    out = {f"R@{k}": float((r <= k).double().mean() * 100.0) for k in RECALL_KS}
    mid = r.sort().values[(r.numel() - 1) // 2 : r.numel() // 2 + 1]
    out["MedR"] = float(mid.mean())
    out["MeanR"] = float(r.mean())
    return out


def fused(a: Tensor, b: Tensor) -> Tensor:
    """everything_at_once's fused embedding: the mean of the two L2-normalised embeddings."""
    normalize = torch.nn.functional.normalize
    return (normalize(a.float(), dim=-1) + normalize(b.float(), dim=-1)) / 2


def all_pairs(embeddings: dict[str, Tensor], labels: Tensor | None = None) -> dict[str, dict[str, float]]:
    """Metrics for every ordered pair, keyed "a->b" (query a, gallery b), then with three or more
    modalities every fused query "a->b+c" and "b+c->a" (b, c in the order of ``embeddings``);
    class-level metrics too where ``labels`` are given."""
    out = {f"{a}->{b}": retrieval_metrics(embeddings[a], embeddings[b], labels) for a, b in itertools.permutations(embeddings, 2)}
    if len(embeddings) >= 3:
        for a in embeddings:
            for b, c in itertools.combinations([m for m in embeddings if m != a], 2):
                bc = fused(embeddings[b], embeddings[c])
                out[f"{a}->{b}+{c}"] = retrieval_metrics(embeddings[a], bc, labels)
                out[f"{b}+{c}->{a}"] = retrieval_metrics(bc, embeddings[a], labels)
    return out


def pair_weights(modalities: list[str], loss: LossConfig) -> dict[str, float]:
    """The weight of each ordered single-modality pair "a->b": the training weight of {a, b}."""
    return {f"{a}->{b}": loss.pair_weight(a, b) for a, b in itertools.permutations(modalities, 2)}


def mean_over_pairs(pairs: dict[str, dict[str, float]], weights: dict[str, float]) -> dict[str, float]:
    """The ``weights``-weighted mean of each metric over the pairs ``weights`` names (fused queries have none)."""
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"loss.pair_weights: the modality pairs {list(weights)} have weights summing to 0")
    metrics = pairs[next(iter(weights))]
    return {m: sum(w * pairs[key][m] for key, w in weights.items()) / total for m in metrics}


def summarise(embeddings: dict[str, Tensor], loss: LossConfig, labels: Tensor | None = None) -> dict:
    """``{"pairs": all_pairs(...), "mean": the training-weighted mean, "weights": the pair weights}``."""
    pairs = all_pairs(embeddings, labels)
    weights = pair_weights(list(embeddings), loss)
    return {"pairs": pairs, "mean": mean_over_pairs(pairs, weights), "weights": weights}


def modality_gap(embeddings: dict[str, Tensor], weights: dict[str, float]) -> float:
    """The modality gap of every single-modality pair, averaged with the pairs' ``weights``."""
    total = sum(weights.values())
    gaps = {key: float(mmot.modality_gap(*(embeddings[m].float() for m in key.split("->")))) for key in weights}
    return sum(w * gaps[key] for key, w in weights.items()) / total


def gallery_modality(modalities: list[str]) -> str:
    """The modality whose training embeddings form the uni-modal gallery: text where there is text."""
    return "text" if "text" in modalities else modalities[0]


def unimodal_recall(
    embeddings: dict[str, Tensor], labels: Tensor, gallery: Tensor, gallery_labels: Tensor, gallery_name: str, loss: LossConfig
) -> float:
    """ucR@1 (%): for every modality but ``gallery_name``, the share of queries whose nearest
    ``gallery`` item (cosine) has the query's label, averaged with the pair weights."""
    g = torch.nn.functional.normalize(gallery.float(), dim=-1)
    total, value = 0.0, 0.0
    for m, x in embeddings.items():
        if m == gallery_name:
            continue
        q = torch.nn.functional.normalize(x.float(), dim=-1)
        nearest = torch.cat([(q[s : s + 1024] @ g.T).argmax(dim=1) for s in range(0, q.shape[0], 1024)])
        w = loss.pair_weight(m, gallery_name)
        value += w * float((gallery_labels[nearest] == labels).double().mean() * 100.0)
        total += w
    return value / total


def evaluate_checkpoint(path, splits: list[str] | None = None, device: str = "cpu") -> dict:
    """Load a checkpoint written by :func:`mmot.sspc.train.train` and evaluate it on its data, as
    training's final evaluation does (the structure metrics and, for ``c3``, the collapse included)."""
    from mmot.sspc.train import evaluate_model, load_for_eval

    model, data, cfg = load_for_eval(path, device=device)
    chosen = {name: split for name, split in data.items() if name == "train" or not splits or name in splits}
    return evaluate_model(model, chosen, cfg.train.batch_size, device, cfg.loss)
