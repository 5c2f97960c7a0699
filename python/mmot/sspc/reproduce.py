"""``mmot-sspc reproduce``: the SSPC ablation on the embedded UCI Multiple Features data.

Three variants, each trained with ``n_seeds`` seeds (model init and batch order; the data split
is fixed) and evaluated in-domain (``test``) and on the held-out classes (``ood``):

- ``contrastive``: the NormSoftmax combinatorial loss only;
- ``sinkhorn``: + the SSPC anchor loss with single-assignment Sinkhorn targets (:func:`mmot.sinkhorn`,
  rows min-max rescaled as Multi-SK's are: see :class:`mmot.nn.SSPCLoss`);
- ``multi_sk``: + the SSPC anchor loss with Multi-SK targets (:func:`mmot.multi_sinkhorn`).

Metrics are everything_at_once's (:mod:`mmot.sspc.evaluate`: ties averaged). Each ``mean`` row is
one run's mean over the six ordered modality pairs weighted by the training pair weights; the
``text->video+audio`` rows are the fused query. The tables show mean ± standard deviation over
seeds. Outputs in ``out_dir``: ``results.json`` (``{"rows": [{"variant", "split", "query",
"metric", "mean", "std", "seeds", "values"}], "step_time_ms": {"mmot", "official_dense"},
"per_pair": {variant: {seed: {split: {pair: metrics}}}}, "config": ...}``; ``query`` is "mean" or
a pair key, ``seeds`` lists the seeds, ``values`` the per-seed values), ``results.md`` (the
tables), ``results.png`` (the plot of the means) and ``runs/`` (every run's checkpoint and metrics).

``step_time_ms`` is the mean time of a full training step (forward, loss, backward, Adam) of the
``multi_sk`` variant, once with mmot's Multi-SK kernels and once with the official-dense
(K, N, K) Multi-SK of the SSPC code: same model, batch size and queue length, queue full.
"""

from __future__ import annotations

import json
import statistics
import textwrap
import time
from pathlib import Path

import torch

from mmot._extras import MissingExtra, require
from mmot.sspc.config import Config, load_config
from mmot.sspc.data import make_splits
from mmot.sspc.evaluate import FUSED_QUERY, METRICS
from mmot.sspc.train import build, train, train_batch

VARIANTS = ("contrastive", "sinkhorn", "multi_sk")
LABELS = {"contrastive": "contrastive only", "sinkhorn": "+ SSPC (Sinkhorn)", "multi_sk": "+ SSPC (Multi-SK)"}


def measure_step_time(cfg: Config, splits, n_steps: int = 10, warmup: int = 3) -> dict[str, float]:
    """Mean training-step time (ms) of the multi_sk variant with mmot's ops vs official-dense Multi-SK.
    The two are interleaved step by step so that machine noise hits both alike."""
    train_split = splits["train"]
    batch = train_batch(cfg, len(train_split))
    setups = {}
    for impl in ("mmot", "official_dense"):
        c = cfg.replace(loss={"variant": "multi_sk", "assignment_impl": impl})
        torch.manual_seed(0)
        model, objective = build(c, torch.device("cpu"), splits)
        optimizer = torch.optim.Adam([*model.parameters(), *objective.parameters()], lr=c.train.lr)
        setups["official_dense" if impl == "official_dense" else "mmot"] = (model, objective, optimizer)
    times: dict[str, list[float]] = {k: [] for k in setups}
    n_fill = -(-cfg.loss.queue_rows(batch) // batch)  # steps until the queues are full
    for i in range(n_fill + warmup + n_steps):
        start = (i * batch) % max(1, len(train_split) - batch + 1)
        idx = torch.arange(start, start + batch)
        tokens = {m: train_split.features[m][idx] for m in train_split.modalities}
        masks = {m: train_split.masks[m][idx] for m in train_split.modalities}
        for name, (model, objective, optimizer) in setups.items():
            t0 = time.perf_counter()
            inputs, joint = model(tokens, masks)
            loss = objective(inputs, joint)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if i >= n_fill + warmup:
                times[name].append((time.perf_counter() - t0) * 1000.0)
    return {name: statistics.fmean(v) for name, v in times.items()}


def _summarise(per_run: dict, query: str = "mean") -> list[dict]:
    """Rows over seeds of ``query``: "mean" (the weighted mean over pairs) or a pair key of the runs' "pairs"."""

    def pick(result: dict) -> dict:
        return result["mean"] if query == "mean" else result["pairs"][query]

    rows = []
    for variant, by_seed in per_run.items():
        seeds = sorted(by_seed)
        for split in by_seed[seeds[0]]:
            for metric in METRICS:
                values = [pick(by_seed[s][split])[metric] for s in seeds]
                rows.append(
                    {
                        "variant": variant,
                        "split": split,
                        "query": query,
                        "metric": metric,
                        "mean": statistics.fmean(values),
                        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                        "seeds": seeds,
                        "values": values,
                    }
                )
    return rows


def markdown_table(rows: list[dict]) -> str:
    splits = list(dict.fromkeys(r["split"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    cell = {(r["variant"], r["split"], r["metric"]): r for r in rows}
    head = "| variant | " + " | ".join(f"{s} {m}" for s in splits for m in METRICS) + " |"
    lines = [head, "|---|" + "---:|" * (len(splits) * len(METRICS))]
    for v in variants:
        vals = []
        for s in splits:
            for m in METRICS:
                r = cell[(v, s, m)]
                vals.append(f"{r['mean']:.1f} ± {r['std']:.1f}")
        lines.append(f"| {LABELS.get(v, v)} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    try:
        matplotlib = require("matplotlib", "sspc", "the reproduce plot")
    except MissingExtra as exc:
        print(f"mmot-sspc: {path.name} not written: {exc}")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(dict.fromkeys(r["split"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    cell = {(r["variant"], r["split"], r["metric"]): r for r in rows}
    recalls = [m for m in METRICS if m.startswith("R@")]
    fig, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits), 4.4), squeeze=False)
    width = 0.8 / len(variants)
    for ax, split in zip(axes[0], splits):
        for i, v in enumerate(variants):
            means = [cell[(v, split, m)]["mean"] for m in recalls]
            stds = [cell[(v, split, m)]["std"] for m in recalls]
            xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(recalls))]
            ax.bar(xs, means, width, yerr=stds, capsize=3, label=LABELS.get(v, v))
        ax.set_xticks(range(len(recalls)), recalls)
        ax.set_ylabel("recall (%), weighted mean over modality pairs")
        ax.set_title({"test": "in-domain test", "ood": "held-out classes (OOD)"}.get(split, split))
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, 60 * len(splits)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def reproduce(
    quick: bool = False,
    out_dir: str | None = None,
    n_seeds: int = 3,
    config: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Train every variant for every seed and summarise; runs already in ``out_dir`` are refused unless ``overwrite``."""
    base = load_config(config or ("uci_quick" if quick else "uci_full"))
    out = Path(out_dir or ("sspc_reproduce_quick" if quick else "sspc_reproduce"))
    out.mkdir(parents=True, exist_ok=True)
    if base.train.num_threads:
        torch.set_num_threads(base.train.num_threads)
    splits = make_splits(base.data)  # loaded once; every run uses the same split
    seeds = list(range(n_seeds))
    started = time.perf_counter()
    per_run: dict = {v: {} for v in VARIANTS}
    per_pair: dict = {v: {} for v in VARIANTS}
    from tqdm.auto import tqdm

    bar = tqdm(total=len(VARIANTS) * len(seeds), desc="reproduce", unit="run", disable=not progress)
    for variant in VARIANTS:
        for seed in seeds:
            cfg = base.replace(loss={"variant": variant}, train={"seed": seed, "progress": False, "eval_every": 0})
            bar.set_postfix(variant=variant, seed=seed)
            results = train(cfg, overwrite=overwrite, out_dir=out / "runs" / f"{variant}_seed{seed}", splits=splits)
            per_run[variant][seed] = results
            per_pair[variant][seed] = {split: res["pairs"] for split, res in results.items()}
            bar.update(1)
    bar.close()
    rows = _summarise(per_run)
    first = next(iter(per_run[VARIANTS[0]].values()))
    fused_rows = _summarise(per_run, FUSED_QUERY) if all(FUSED_QUERY in res["pairs"] for res in first.values()) else []
    step_time = measure_step_time(base, splits)
    elapsed = time.perf_counter() - started
    table = markdown_table(rows)
    if fused_rows:
        table += f"\n\nFused query {FUSED_QUERY}:\n\n" + markdown_table(fused_rows)
    n_train, n_test = len(splits["train"]), len(splits["test"])
    n_ood = len(splits["ood"]) if "ood" in splits else 0
    header = (
        f"SSPC ablation on UCI Multiple Features ({base.name}; {n_train} train / {n_test} test / {n_ood} OOD "
        f"samples; {len(seeds)} seeds; metrics averaged over the 6 ordered modality pairs weighted as in training; "
        f"ties averaged; R@k in %, MedR and MeanR in ranks)"
    )
    queue = base.loss.queue_rows(train_batch(base, n_train))
    step_line = (
        f"Training-step time (multi_sk, batch {train_batch(base, n_train)}, queue {queue}, "
        f"K {base.model.n_anchors}): mmot {step_time['mmot']:.1f} ms, official-dense {step_time['official_dense']:.1f} ms "
        f"({step_time['official_dense'] / step_time['mmot']:.2f}x); total wall time {elapsed:.0f} s"
    )
    summary = {"rows": rows + fused_rows, "step_time_ms": step_time, "per_pair": per_pair, "config": base.to_dict(), "wall_time_s": elapsed}
    with open(out / "results.json", "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
    (out / "results.md").write_text(f"{header}\n\n{table}\n\n{step_line}\n")
    plot(rows, out / "results.png", header)
    print(header)
    print()
    print(table)
    print()
    print(step_line)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}")
    return summary
