"""``mmot-sspc reproduce``: the SSPC ablation on two test beds, over seeds, with paired differences.

Variants: ``contrastive`` (the NormSoftmax combinatorial loss only), ``sinkhorn`` (+ the SSPC
anchor loss with single-assignment Sinkhorn targets, rows min-max rescaled as Multi-SK's are: see
:class:`mmot.nn.SSPCLoss`) and ``multi_sk`` (+ the SSPC anchor loss with Multi-SK targets).

Test beds (``--testbed``), each at several pair-noise levels q (``data.pair_noise``: the share of
training pairs whose text is misaligned):

- ``concepts`` (:mod:`mmot.sspc.concepts`), q in (0, 0.2, 0.4): seed s generates world s (its
  concepts, encoders, videos and noisy pairs) and initialises the model with s; splits ``test``
  (new videos of the seen super-concepts), ``ood`` (unseen super-concepts) and ``ood_shift``
  (unseen, with shifted jitter);
- ``uci`` (the embedded UCI Multiple Features, each view whole), q in (0, 0.4): seed s holds out
  fold s mod 5 of the digits (two classes each, :func:`mmot.sspc.data.ood_folds`), so five seeds
  rotate through every class.

Every variant of a (test bed, q, seed) sees the same data and initial weights, so SSPC minus
contrastive is a paired difference per seed; it is reported with its mean and a 95% Student-t
interval over seeds (:mod:`mmot.sspc.stats`). Metrics are everything_at_once's
(:mod:`mmot.sspc.evaluate`: ties averaged, the mean over modality pairs weighted as in training)
plus class-level cR@k and mAP (same-class hits: the concept, or the digit).

Outputs in ``out_dir``: ``results.json`` (``{"rows": [{"testbed", "q", "variant", "split",
"query", "metric", "mean", "std", "seeds", "values"}], "paired": [{"testbed", "q", "variant",
"baseline", "split", "query", "metric", "mean", "lo", "hi", "n", "seeds", "values"}],
"step_time_ms": {"mmot", "official_dense"}, "per_pair": {testbed: {q: {variant: {seed: {split:
{pair: metrics}}}}}}, "config": {testbed: config}, "settings": {...}, "wall_time_s"}``; ``query``
is "mean" or "text->video+audio", ``values`` the per-seed values or differences),
``results.md`` (the tables), ``results.png`` (R@1 against q) and ``runs/`` (each run's
checkpoint and metrics).

``step_time_ms`` is the mean time of a full training step (forward, loss, backward, Adam) of
``multi_sk`` on the first test bed, with mmot's Multi-SK and with the official-dense (K, N, K)
Multi-SK of the SSPC code: same model, batch and queue, queue full.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import multiprocessing
import os
import statistics
import textwrap
import time
from pathlib import Path

import torch

from mmot._extras import MissingExtra, require
from mmot.sspc.config import BASE_VARIANTS, Config, ConfigError, DataConfig, config_from_dict, load_config
from mmot.sspc.config import VARIANTS as ALL_VARIANTS
from mmot.sspc.data import load_data, make_splits, ood_folds
from mmot.sspc.evaluate import CLASS_METRICS, FUSED_QUERY, METRICS, STRUCTURE_METRICS
from mmot.sspc.stats import mean_std, paired_difference
from mmot.sspc.train import CHECKPOINT, BatchPlan, build, train

VARIANTS = BASE_VARIANTS
"""The default selection; ``variants`` may name any of :data:`mmot.sspc.config.VARIANTS`."""
LABELS = {
    "contrastive": "contrastive only",
    "sinkhorn": "+ SSPC (Sinkhorn)",
    "multi_sk": "+ SSPC (Multi-SK)",
    "gc": "+ geometric consistency",
    "bridge": "+ Brownian bridge",
    "separation": "+ feature separation",
    "c3": "contrastive, C3 collapse at evaluation",
    "multi_sk+gc": "+ SSPC (Multi-SK) + geometric consistency",
    "multi_sk+bridge": "+ SSPC (Multi-SK) + Brownian bridge",
    "multi_sk+separation": "+ SSPC (Multi-SK) + feature separation",
    "pcmc": "PCMC (all-pairs InfoNCE, masked)",
    "pcmr": "PCMR (similarity regression)",
    "comm": "CoMM (fusion encoder)",
}
TESTBEDS = ("concepts", "uci")
CONFIGS = {"concepts": ("concepts_quick", "concepts_full"), "uci": ("uci_quick", "uci_full")}
Q_LEVELS = {"concepts": (0.0, 0.2, 0.4), "uci": (0.0, 0.4)}
# The columns of the summary tables: (split, metric), those the runs have.
HEADLINE = (("test", "R@1"), ("ood", "R@1"), ("ood_shift", "R@1"), ("ood", "cR@1"), ("ood", "mAP"), ("test", "gap"), ("test", "ucR@1"))


def measure_step_time(cfg: Config, splits, n_steps: int = 10, warmup: int = 3) -> dict[str, float]:
    """Mean training-step time (ms) of the multi_sk variant with mmot's ops vs official-dense Multi-SK.
    The two are interleaved step by step so that machine noise hits both alike."""
    train_split = splits["train"]
    batch = BatchPlan(cfg, train_split).size
    setups = {}
    for impl in ("mmot", "official_dense"):
        c = cfg.replace(loss={"variant": "multi_sk", "assignment_impl": impl})
        torch.manual_seed(0)
        model, objective = build(c, torch.device("cpu"), splits)
        optimizer = torch.optim.Adam([*model.parameters(), *objective.parameters()], lr=c.train.lr)
        setups[impl] = (model, objective, optimizer)
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


# ---------------------------------------------------------------------------------------------
# Runs


def run_config(
    base: Config, testbed: str, q: float, variant: str, seed: int, n_folds: int = 1, modality_dropout: float | None = None
) -> Config:
    """The config of one run: ``base`` with the variant, the seed (model init and batch order; the
    world on ``concepts``, the held-out fold on ``uci``), the pair noise ``q`` and, when given,
    the rate at which training samples miss a modality."""
    data: dict = {"pair_noise": q}
    if modality_dropout is not None:
        data["modality_dropout"] = modality_dropout
    if testbed == "concepts":
        data["concepts"] = {"seed": seed}
    else:
        data["ood_fold"] = seed % n_folds
    return base.replace(loss={"variant": variant}, data=data, train={"seed": seed, "progress": False, "eval_every": 0})


def n_ood_folds(data: DataConfig) -> int:
    labels = load_data(data).labels
    if labels is None:
        raise ConfigError(f"reproduce: the '{data.format}' data has no class labels to hold out")
    return len(ood_folds(sorted(set(labels.tolist())), data.classes_per_fold, data.split_seed))


@functools.lru_cache(maxsize=4)
def _splits(data_json: str):
    return make_splits(config_from_dict({"data": json.loads(data_json)}).data)


def splits_for(cfg: Config):
    """The run's splits, built once per data config in this process (variants share them)."""
    return _splits(json.dumps(cfg.to_dict()["data"], sort_keys=True))


def _train_one(task: tuple[dict, str, bool, bool]) -> dict:
    """Train one run, or with ``resume`` continue the run its directory holds (a finished one is
    only evaluated again; train's resume checks that its config is this one)."""
    cfg_dict, out_dir, overwrite, resume = task
    cfg = config_from_dict(cfg_dict)
    torch.set_num_threads(cfg.train.num_threads or 1)
    if resume and (Path(out_dir) / CHECKPOINT).is_file():
        return train(cfg, resume=True, out_dir=out_dir, splits=splits_for(cfg))
    return train(cfg, overwrite=overwrite, out_dir=out_dir, splits=splits_for(cfg))


def _q_key(q: float) -> str:
    return f"{q:g}"


# ---------------------------------------------------------------------------------------------
# Summaries


def _pick(result: dict, query: str) -> dict:
    return result["mean"] if query == "mean" else result["pairs"][query]


def _summarise(per_run: dict, query: str = "mean") -> list[dict]:
    """Rows over seeds of ``query``: "mean" (the weighted mean over pairs) or a pair key of the runs' "pairs"."""
    rows = []
    for variant, by_seed in per_run.items():
        seeds = sorted(by_seed)
        for split, first in by_seed[seeds[0]].items():
            for metric in [m for m in METRICS + CLASS_METRICS + STRUCTURE_METRICS if m in _pick(first, query)]:
                values = [_pick(by_seed[s][split], query)[metric] for s in seeds]
                mean, std = mean_std(values)
                rows.append(
                    {
                        "variant": variant,
                        "split": split,
                        "query": query,
                        "metric": metric,
                        "mean": mean,
                        "std": std,
                        "seeds": seeds,
                        "values": values,
                    }
                )
    return rows


def paired_rows(per_run: dict, baseline: str = "contrastive", query: str = "mean") -> list[dict]:
    """Per variant other than ``baseline``, split and metric: variant minus baseline over the seeds both ran."""
    if baseline not in per_run:
        return []
    rows = []
    for variant, by_seed in per_run.items():
        if variant == baseline:
            continue
        seeds = sorted(set(by_seed) & set(per_run[baseline]))
        if not seeds:
            continue
        for split, first in by_seed[seeds[0]].items():
            for metric in [m for m in METRICS + CLASS_METRICS + STRUCTURE_METRICS if m in _pick(first, query)]:
                base = [_pick(per_run[baseline][s][split], query)[metric] for s in seeds]
                other = [_pick(by_seed[s][split], query)[metric] for s in seeds]
                diff = paired_difference(base, other)
                values = [b - a for a, b in zip(base, other)]
                common = {"variant": variant, "baseline": baseline, "split": split, "query": query, "metric": metric}
                rows.append({**common, **diff, "seeds": seeds, "values": values})
    return rows


def markdown_table(rows: list[dict]) -> str:
    """Every metric of every split, mean ± std, a row per variant."""
    splits = list(dict.fromkeys(r["split"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    cell = {(r["variant"], r["split"], r["metric"]): r for r in rows}
    columns = [(s, m) for s in splits for m in METRICS + CLASS_METRICS + STRUCTURE_METRICS if any((v, s, m) in cell for v in variants)]
    head = "| variant | " + " | ".join(f"{s} {m}" for s, m in columns) + " |"
    lines = [head, "|---|" + "---:|" * len(columns)]
    for v in variants:
        vals = [_mean_std(cell[(v, s, m)], m) if (v, s, m) in cell else "" for s, m in columns]
        lines.append(f"| {LABELS.get(v, v)} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


# Decimals per metric: percentages and ranks to 0.1; the modality gap (a distance in [0, 2]) to 0.001.
DECIMALS = {"gap": 3}


def _mean_std(row: dict, metric: str) -> str:
    k = DECIMALS.get(metric, 1)
    return f"{row['mean']:.{k}f} ± {row['std']:.{k}f}"


def _signed(x: float, metric: str = "") -> str:
    return f"{x:+.{DECIMALS.get(metric, 1)}f}".replace("-", "−")


def summary_tables(rows: list[dict], paired: list[dict], testbed: str) -> str:
    """The headline metrics of one test bed: mean ± std per (q, variant), then SSPC − contrastive
    with its 95% interval over seeds."""
    mine = [r for r in rows if r["testbed"] == testbed and r["query"] == "mean"]
    cell = {(r["q"], r["variant"], r["split"], r["metric"]): r for r in mine}
    columns = [c for c in HEADLINE if any(k[2:] == c for k in cell)]
    qs = list(dict.fromkeys(r["q"] for r in mine))
    variants = list(dict.fromkeys(r["variant"] for r in mine))
    head = "| q | variant | " + " | ".join(f"{s} {m}" for s, m in columns) + " |"
    lines = [head, "|---|---|" + "---:|" * len(columns)]
    for q in qs:
        for v in variants:
            vals = [_mean_std(cell[(q, v, s, m)], m) if (q, v, s, m) in cell else "" for s, m in columns]
            lines.append(f"| {q:g} | {LABELS.get(v, v)} | " + " | ".join(vals) + " |")
    diffs = {(r["q"], r["variant"], r["split"], r["metric"]): r for r in paired if r["testbed"] == testbed and r["query"] == "mean"}
    if not diffs:
        return "\n".join(lines)
    lines += ["", "SSPC − contrastive, paired by seed: mean [95% t interval]", ""]
    lines += ["| q | variant | " + " | ".join(f"Δ {s} {m}" for s, m in columns) + " |", "|---|---|" + "---:|" * len(columns)]
    for q in qs:
        for v in variants:
            vals = []
            for s, m in columns:
                d = diffs.get((q, v, s, m))
                if d is None:
                    vals.append("")
                elif d["lo"] is None:
                    vals.append(_signed(d["mean"], m))
                else:
                    vals.append(f"{_signed(d['mean'], m)} [{_signed(d['lo'], m)}, {_signed(d['hi'], m)}]")
            if any(vals):
                lines.append(f"| {q:g} | {LABELS.get(v, v)} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """R@1 (weighted mean over pairs) against q: a panel per (test bed, split), a line per variant."""
    try:
        matplotlib = require("matplotlib", "sspc", "the reproduce plot")
    except MissingExtra as exc:
        print(f"mmot-sspc: {path.name} not written: {exc}")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [r for r in rows if r["query"] == "mean" and r["metric"] == "R@1"]
    panels = list(dict.fromkeys((r.get("testbed", ""), r["split"]) for r in mine))
    variants = list(dict.fromkeys(r["variant"] for r in mine))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.8), squeeze=False)
    for ax, (testbed, split) in zip(axes[0], panels):
        for v in variants:
            pts = sorted(
                (r.get("q", 0.0), r["mean"], r["std"])
                for r in mine
                if r.get("testbed", "") == testbed and r["split"] == split and r["variant"] == v
            )
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3, label=LABELS.get(v, v))
        ax.set_xlabel("pair noise q")
        ax.set_title(f"{testbed} {split}".strip(), fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("R@1 (%), weighted mean over pairs")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(textwrap.fill(title, 40 * len(panels)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The command


def default_jobs() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def reproduce(
    quick: bool = False,
    out_dir: str | None = None,
    n_seeds: int = 5,
    config: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
    resume: bool = False,
    testbeds: tuple[str, ...] = TESTBEDS,
    variants: tuple[str, ...] = VARIANTS,
    q_levels: tuple[float, ...] | None = None,
    jobs: int | None = None,
    time_steps: bool = True,
    modality_dropout: float | None = None,
) -> dict:
    """Train every (test bed, q, variant, seed) and summarise. ``config`` replaces the test bed's
    shipped config (one test bed only); ``q_levels`` replaces :data:`Q_LEVELS`; ``time_steps``
    False skips the step-time comparison; ``modality_dropout`` replaces the config's
    ``data.modality_dropout`` in every run. Runs already in ``out_dir`` are refused unless
    ``overwrite`` (start them over) or ``resume`` (continue them; finished ones are evaluated
    again, so an interrupted reproduce ends with the results of an uninterrupted one)."""
    if overwrite and resume:
        raise ConfigError("reproduce: --overwrite and --resume exclude each other")
    for name, chosen, known in (("testbed", testbeds, TESTBEDS), ("variants", variants, ALL_VARIANTS)):
        bad = [c for c in chosen if c not in known]
        if bad or not chosen:
            raise ConfigError(f"reproduce: {name} {list(chosen)}: expected a non-empty selection of {known}")
    if config and len(testbeds) != 1:
        raise ConfigError("reproduce: --config replaces one test bed's config; choose it with --testbed")
    if n_seeds < 1:
        raise ConfigError(f"reproduce: --seeds expected an integer >= 1, got {n_seeds}")
    jobs = jobs or default_jobs()
    out = Path(out_dir or ("sspc_reproduce_quick" if quick else "sspc_reproduce"))
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(n_seeds))
    started = time.perf_counter()

    bases, folds, tasks, keys = {}, {}, [], []
    for testbed in testbeds:
        base = load_config(config or CONFIGS[testbed][0 if quick else 1])
        if base.data.format != ("concepts" if testbed == "concepts" else "uci"):
            raise ConfigError(f"reproduce: the {testbed} test bed needs data.format '{testbed}', got '{base.data.format}'")
        bases[testbed] = base
        folds[testbed] = n_folds = n_ood_folds(base.data) if testbed == "uci" else 1
        for q in q_levels if q_levels is not None else Q_LEVELS[testbed]:
            for seed in seeds:
                for variant in variants:
                    cfg = run_config(base, testbed, q, variant, seed, n_folds, modality_dropout)
                    run_dir = out / "runs" / testbed / f"q{_q_key(q)}" / f"{variant}_seed{seed}"
                    tasks.append((cfg.to_dict(), str(run_dir), overwrite, resume))
                    keys.append((testbed, q, variant, seed))

    from tqdm.auto import tqdm

    per_run: dict = {}
    bar = tqdm(total=len(tasks), desc="reproduce", unit="run", disable=not progress)

    def record(key, results):
        testbed, q, variant, seed = key
        per_run.setdefault(testbed, {}).setdefault(q, {}).setdefault(variant, {})[seed] = results
        bar.update(1)

    if jobs == 1:
        for key, task in zip(keys, tasks):
            bar.set_postfix(run=f"{key[0]} q={key[1]:g} {key[2]} s{key[3]}")
            record(key, _train_one(task))
    else:
        # Separate processes (one thread each): runs are small, so they parallelise better than ops do.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            futures = {pool.submit(_train_one, task): key for key, task in zip(keys, tasks)}
            for future in concurrent.futures.as_completed(futures):
                record(futures[future], future.result())
    bar.close()

    rows, paired, per_pair = [], [], {}
    for testbed, by_q in per_run.items():
        for q, by_variant in sorted(by_q.items()):
            ordered = {v: by_variant[v] for v in variants}
            first = next(iter(next(iter(ordered.values())).values()))
            queries = ["mean"] + ([FUSED_QUERY] if all(FUSED_QUERY in res["pairs"] for res in first.values()) else [])
            for query in queries:
                rows += [{"testbed": testbed, "q": q, **r} for r in _summarise(ordered, query)]
                paired += [{"testbed": testbed, "q": q, **r} for r in paired_rows(ordered, query=query)]
            per_pair.setdefault(testbed, {})[_q_key(q)] = {
                v: {s: {split: res["pairs"] for split, res in by_seed[s].items()} for s in by_seed} for v, by_seed in ordered.items()
            }

    first_testbed = testbeds[0]
    first_cfg = run_config(bases[first_testbed], first_testbed, 0.0, "multi_sk", 0, folds[first_testbed])
    first_splits = splits_for(first_cfg)
    if first_cfg.train.num_threads:
        torch.set_num_threads(first_cfg.train.num_threads)  # as the runs had
    step_time = measure_step_time(first_cfg, first_splits) if time_steps else None
    elapsed = time.perf_counter() - started

    sections = []
    for testbed in testbeds:
        base = bases[testbed]
        sizes = ", ".join(f"{len(v)} {k}" for k, v in splits_for(run_config(base, testbed, 0.0, variants[0], 0, folds[testbed])).items())
        header = (
            f"## {testbed} ({base.name}): {len(seeds)} seeds, q = {', '.join(f'{q:g}' for q in sorted(per_run[testbed]))}; "
            f"seed 0's splits: {sizes}"
        )
        full = []
        for q in sorted(per_run[testbed]):
            for query in ("mean", FUSED_QUERY):
                sel = [r for r in rows if r["testbed"] == testbed and r["q"] == q and r["query"] == query]
                if sel:
                    full.append(f"q = {q:g}, {'weighted mean over pairs' if query == 'mean' else query}:\n\n{markdown_table(sel)}")
        sections.append(f"{header}\n\n{summary_tables(rows, paired, testbed)}\n\nAll metrics:\n\n" + "\n\n".join(full))
    batch = BatchPlan(first_cfg, first_splits["train"]).size
    step_line = f"Total wall time {elapsed:.0f} s with {jobs} job(s)."
    if step_time:
        step_line += (
            f" Training-step time ({first_testbed}, multi_sk, batch {batch}, queue {first_cfg.loss.queue_rows(batch)}, "
            f"K {first_cfg.model.n_anchors}): mmot {step_time['mmot']:.1f} ms, official-dense {step_time['official_dense']:.1f} ms "
            f"({step_time['official_dense'] / step_time['mmot']:.2f}x)."
        )
    intro = (
        "SSPC ablation (mmot-sspc reproduce). Metrics: weighted mean over the ordered modality pairs (as the training "
        "weights), ties averaged; R@k, cR@k (same-class hits) and mAP in %, MedR and MeanR in ranks; mean ± std over seeds."
    )
    text = intro + "\n\n" + "\n\n".join(sections) + f"\n\n{step_line}\n"
    settings = {
        "quick": quick,
        "seeds": seeds,
        "variants": list(variants),
        "testbeds": list(testbeds),
        "q_levels": {tb: sorted(per_run[tb]) for tb in testbeds},
        "jobs": jobs,
    }
    summary = {
        "rows": rows,
        "paired": paired,
        "step_time_ms": step_time,
        "per_pair": per_pair,
        "config": {tb: b.to_dict() for tb, b in bases.items()},
        "settings": settings,
        "wall_time_s": elapsed,
    }
    with open(out / "results.json", "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
    (out / "results.md").write_text(text)
    plot(rows, out / "results.png", intro)
    print(text)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}")
    return summary
