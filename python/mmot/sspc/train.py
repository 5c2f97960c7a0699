"""The training loop: Adam, ExponentialLR per epoch, AMP on GPU, JSONL metrics, atomic checkpoints
and exact resume. As in the SSPC code, there is no gradient clipping and the trained weights are
evaluated; ``train.grad_clip`` adds clipping, ``train.ema_decay`` keeps an EMA of the weights and
``train.eval_ema`` evaluates that EMA instead.

Output directory (``train.out_dir``):

- ``metrics.jsonl``: one JSON record a line: ``{"type": "train", "step", "epoch", "loss",
  "contrastive", "anchor", "structure", "lr", "queue_full"}`` every ``train.log_every`` steps and
  ``{"type": "eval", "step", "epoch", "split", "mean": {...}, "pairs": {"a->b": {...}},
  "weights": {"a->b": w}}`` after evaluations (:func:`mmot.sspc.evaluate.summarise`);
- ``last.pt``: the latest checkpoint, written to a temporary file and moved into place with
  ``os.replace``, so a crash never leaves a torn checkpoint. It holds the model, optimizer,
  scheduler, AMP scaler, EMA weights, queues, every RNG state, the step/epoch counters and the
  number of metric lines written; ``--resume`` restores all of it (and truncates the metrics
  to that line count), so a resumed run ends bit-identical to an uninterrupted one on CPU.
  It is read with ``torch.load(weights_only=True)``: tensors and plain containers only, the
  config as a dict (:mod:`mmot.sspc.checkpoint`), so loading a checkpoint never runs code;
- ``config.yaml``: the resolved configuration.

Under ``torchrun`` (or ``mmot-sspc train --nproc N``) the run is data-parallel over the
processes (:mod:`mmot.sspc.distributed`): ``train.batch_size`` is the global batch, every rank
takes its contiguous 1/W share of the same batches, the model and objective are wrapped together
in DDP, the alignment loss is over the all-gathered global batch, each rank's SSPC queues hold
its own past rows and the anchor targets come from the sharded Multi-SK / Sinkhorn over every
rank's [queue; batch]. Rank 0 alone writes the metrics, the config and the checkpoints (which
hold every rank's queues and random state) and evaluates, the others waiting at a barrier;
``--resume`` needs the same number of processes. Augmentations and dropout draw from a
per-rank stream (:func:`mmot.sspc.distributed.rank_seed`), so a run is reproducible for a
given number of processes.

A directory that already holds a run is not trained into again unless ``resume`` (continue it)
or ``overwrite`` (start over, deleting its checkpoint first) is given.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmot.sspc import checkpoint as ckpt
from mmot.sspc.checkpoint import CheckpointError
from mmot.sspc.config import Config, ConfigError, LossConfig, config_from_dict, fusion_encoder, yaml
from mmot.sspc.data import MultiModalData, make_splits
from mmot.sspc.distributed import World, init_world, rank_seed
from mmot.sspc.evaluate import gallery_modality, modality_gap, summarise, unimodal_recall
from mmot.sspc.fusion import FusionModel
from mmot.sspc.model import SSPCModel, SSPCObjective, embed_split
from mmot.sspc.structure import augmented_batch, collapsed, modality_means

DTYPES = {"float32": torch.float32, "float64": torch.float64}
CHECKPOINT = "last.pt"
METRICS = "metrics.jsonl"
# Files whose presence marks a directory as holding a run.
RUN_FILES = (CHECKPOINT, METRICS, "config.yaml")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: '{name}' requested but CUDA is not available")
    return torch.device(name)


class EMA:
    """Exponential moving average of the model's floating-point state."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.state[k].mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)
            else:
                self.state[k].copy_(v)


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class BatchPlan:
    """The samples of each training step, a function of (seed, epoch, step in epoch) only, so that
    a resumed run draws the same batches. Random batches of ``train.batch_size`` (at most the
    split); or, with ``data.clips_per_video`` = k and a split with videos, HowTo100M's sampling:
    batch_size // k videos per batch, k clips of each (all of a shorter video's clips, then
    repeats), every video once per epoch."""

    def __init__(self, cfg: Config, split: MultiModalData) -> None:
        self.seed = cfg.train.seed
        batch = min(cfg.train.batch_size, len(split))
        k = cfg.data.clips_per_video
        self.videos = None
        if k and split.groups is not None:
            members: dict[int, list[int]] = {}
            for i, v in enumerate(split.groups.tolist()):
                members.setdefault(v, []).append(i)
            self.videos = [torch.tensor(rows) for rows in members.values()]
            self.k = k
            self.per_batch = min(len(self.videos), max(1, batch // k))
            self.size = self.per_batch * k
            self.steps_per_epoch = max(1, len(self.videos) // self.per_batch)
        else:
            self.n = len(split)
            self.size = batch
            self.steps_per_epoch = max(1, self.n // batch)

    def indices(self, epoch: int, in_epoch: int) -> torch.Tensor:
        if self.videos is None:
            return _epoch_order(self.n, self.seed, epoch)[in_epoch * self.size : (in_epoch + 1) * self.size]
        order = _epoch_order(len(self.videos), self.seed, epoch)
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 65_537 + in_epoch)
        rows = []
        for v in order[in_epoch * self.per_batch : (in_epoch + 1) * self.per_batch].tolist():
            clips = self.videos[v]
            pick = torch.randperm(len(clips), generator=g)[: self.k]
            if len(pick) < self.k:
                pick = torch.cat([pick, torch.randint(len(clips), (self.k - len(pick),), generator=g)])
            rows.append(clips[pick])
        return torch.cat(rows)


def evaluate_model(model, splits: dict[str, MultiModalData], batch_size: int, device, loss: LossConfig) -> dict:
    """:func:`summarise` of every split but train, with the structure metrics (the modality gap;
    ucR@1 against the training split's text gallery where the split's classes occur in training).
    The ``c3`` variant is evaluated on embeddings collapsed with the training split's modality means."""
    train_split = splits["train"]
    reference = embed_split(model, train_split, batch_size, device)
    means = modality_means(reference) if loss.variant == "c3" else None
    if means is not None:
        reference = collapsed(reference, means)
    gallery = gallery_modality(list(reference))
    out = {}
    for name, split in splits.items():
        if name == "train":
            continue
        embedded = embed_split(model, split, batch_size, device)
        if means is not None:
            embedded = collapsed(embedded, means)
        result = summarise(embedded, loss, split.labels)
        result["mean"]["gap"] = modality_gap(embedded, result["weights"])
        labels, known = split.labels, train_split.labels
        if labels is not None and known is not None and bool(torch.isin(labels, known).all()) and len(embedded) > 1:
            result["mean"]["ucR@1"] = unimodal_recall(embedded, labels, reference[gallery], known, gallery, loss)
        out[name] = result
    return out


class _Metrics:
    def __init__(self, path: Path, keep_lines: int | None) -> None:
        self.path = path
        if keep_lines is None:
            path.write_text("")
            self.lines = 0
        else:
            lines = path.read_text().splitlines(keepends=True) if path.exists() else []
            path.write_text("".join(lines[:keep_lines]))
            self.lines = min(keep_lines, len(lines))

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        self.lines += 1


def _same_run(saved: dict, current: dict) -> list[str]:
    """Config keys that differ between a checkpoint and the current config (train.epochs,
    out_dir, progress, max_steps, num_threads, eval_ema and log/eval cadence may change on resume)."""
    free = {"epochs", "out_dir", "progress", "max_steps", "log_every", "eval_every", "checkpoint_every", "num_threads", "eval_ema"}
    diffs = []
    for section in ("data", "model", "loss", "train"):
        for key in set(saved[section]) | set(current[section]):
            if section == "train" and key in free:
                continue
            if saved[section].get(key) != current[section].get(key):
                diffs.append(f"{section}.{key}: checkpoint {saved[section].get(key)!r}, config {current[section].get(key)!r}")
    return diffs


def _restore(module, saved: dict, key: str, path: Path) -> None:
    """``module.load_state_dict(saved)``, a mismatch reported as the checkpoint's fault."""
    try:
        module.load_state_dict(saved)
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"checkpoint '{path}': '{key}' does not fit the model built from its config: {reason}") from None


def _checkpoint_config(state: dict, path: Path) -> Config:
    try:
        return config_from_dict(state["config"])
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint '{path}': its config is invalid: {exc}") from None


def _refuse_existing_run(out: Path, overwrite: bool) -> None:
    present = [name for name in RUN_FILES if (out / name).exists()]
    if not present:
        return
    if not overwrite:
        raise FileExistsError(
            f"output directory '{out}' already holds a run ({', '.join(present)}); "
            "pass --resume to continue it or --overwrite to start over"
        )
    # A stale checkpoint must not outlive the run it belonged to (a later --resume would pick it up).
    (out / CHECKPOINT).unlink(missing_ok=True)


def make_model(cfg: Config, dims: dict[str, int]) -> torch.nn.Module:
    """The run's encoder: one per modality, or the fusion encoder (``model.encoder``)."""
    cls = FusionModel if fusion_encoder(cfg.model, cfg.loss.variant) else SSPCModel
    return cls(dims, cfg.model, cfg.loss.input_space)


def build(cfg: Config, device: torch.device, splits: dict[str, MultiModalData], world: World | None = None):
    """The model and objective in ``train.dtype`` on ``device``. In a multi-process ``world``
    the objective's collectives use its group and each rank's queues hold 1/W of the queue's
    rows (the global queue is the union of the ranks')."""
    world = world or World()
    train_split = splits["train"]
    dtype = DTYPES[cfg.train.dtype]
    model = make_model(cfg, train_split.dims()).to(device, dtype)
    queue = cfg.loss.queue_rows(BatchPlan(cfg, train_split).size)
    if world.distributed:
        queue = max(1, round(queue / world.size))
    objective = SSPCObjective(
        model.input_dims, cfg.model.embed_dim, cfg.model.n_anchors, cfg.loss, queue, cfg.model.d_model, process_group=world.group
    ).to(device, dtype)
    return model, objective


class TrainStep(nn.Module):
    """A training step's forward, model and objective together: the module DDP wraps, so that
    every parameter the loss reaches is synchronised whichever of the model's passes the
    variant runs (the comm variant's views, the bridge variant's augmented view)."""

    def __init__(self, model: nn.Module, objective: SSPCObjective, cfg: Config, autocast) -> None:
        super().__init__()
        self.model, self.objective, self.cfg, self.autocast = model, objective, cfg, autocast

    def forward(self, tokens: dict, masks: dict, present: dict | None) -> dict:
        model, objective, loss = self.model, self.objective, self.cfg.loss
        with self.autocast():
            inputs, joint, hidden, augmented, views = {}, {}, {}, None, None
            if objective.kind == "comm":
                aug = (loss.comm_augment, loss.comm_strength)
                views = tuple(model.views(*augmented_batch(tokens, masks, *aug), present) for _ in range(2))
            else:
                inputs, joint, hidden = model(tokens, masks, hidden=True)
            if objective.needs_augmented:
                _, augmented = model(*augmented_batch(tokens, masks, loss.bridge_augment, loss.bridge_strength))
        return objective(inputs, joint, hidden, augmented, present, views)


def _cpu(state: dict) -> dict:
    return {k: v.detach().cpu() for k, v in state.items()}


def train(
    cfg: Config,
    *,
    resume: bool = False,
    overwrite: bool = False,
    out_dir: str | os.PathLike | None = None,
    splits: dict[str, MultiModalData] | None = None,
    step_hook=None,
) -> dict:
    """Train (or resume) a run; returns the final evaluation ``{split: {"mean", "pairs"}}``.

    Everything that can be checked is checked before the first step: the config, the data
    (loaded and split here unless ``splits`` is given), the device, the checkpoint. Without
    ``resume``, a directory that already holds a run is refused unless ``overwrite``.

    Under torchrun (``WORLD_SIZE`` > 1, or a process group the caller started) the run is
    data-parallel (see the module docstring); every rank calls ``train`` and gets rank 0's
    evaluation. The process group stays up afterwards: the CLI leaves through
    :func:`mmot.sspc.distributed.finish`.
    """
    t = cfg.train
    out = Path(out_dir or t.out_dir)
    world, device = init_world(resolve_device(t.device))
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    ckpt_path = out / CHECKPOINT

    def prepare():
        """Every check before the first step, on every rank (World.agree raises a failure on all)."""
        data = splits if splits is not None else make_splits(cfg.data)
        plan = BatchPlan(cfg, data["train"])
        if plan.size % world.size:
            raise ConfigError(
                f"train.batch_size: the global batch of {plan.size} rows does not split evenly over {world.size} processes; "
                f"give a multiple of {world.size}"
            )
        if world.distributed and cfg.loss.assignment_impl == "official_dense" and cfg.loss.base_variant == "multi_sk":
            raise ConfigError("loss.assignment_impl: 'official_dense' (the timing baseline) runs in one process only; use 'mmot'")
        state = None
        if resume:
            if not ckpt_path.is_file():
                raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
            state = ckpt.load(ckpt_path)
            if state["version"] != ckpt.VERSION:
                raise CheckpointError(
                    f"checkpoint '{ckpt_path}' has format version {state['version']}, from before the SSPC code's defaults "
                    f"(projected input space, queue in batches, min-max single-assignment targets): it can be evaluated "
                    f"but not resumed; start over with --overwrite"
                )
            diffs = _same_run(_checkpoint_config(state, ckpt_path).to_dict(), cfg.to_dict())
            if diffs:
                raise ConfigError("--resume: the config differs from the checkpoint's: " + "; ".join(diffs))
            saved = state["world_size"]
            if saved != world.size:
                raise CheckpointError(
                    f"--resume: checkpoint '{ckpt_path}' was written by a run on {saved} process{'es' if saved > 1 else ''}, "
                    f"and this run has {world.size}; resume it on {saved} (torchrun --nproc_per_node {saved}, or "
                    f"mmot-sspc train --nproc {saved}): every process's queues and random state are in it"
                )
        elif world.main:
            _refuse_existing_run(out, overwrite)
        if world.main:
            out.mkdir(parents=True, exist_ok=True)
        return data, plan, state

    splits, plan, state = world.agree(prepare)
    batch, steps_per_epoch = plan.size, plan.steps_per_epoch
    total_steps = steps_per_epoch * t.epochs
    if t.max_steps is not None:
        total_steps = min(total_steps, t.max_steps)
    dtype = DTYPES[t.dtype]

    _seed_all(t.seed)
    model, objective = build(cfg, device, splits, world)
    if world.distributed:  # the same initial weights everywhere, then per-rank augmentations
        _seed_all(rank_seed(t.seed, world.rank))
    params = [*model.parameters(), *objective.parameters()]
    optimizer = torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=t.lr_gamma)
    use_amp = (device.type == "cuda") if t.amp is None else bool(t.amp and device.type == "cuda")
    use_amp = use_amp and dtype != torch.float64
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    ema = EMA(model, t.ema_decay) if t.ema_decay else None
    autocast = (lambda: torch.autocast("cuda", dtype=torch.float16)) if use_amp else contextlib.nullcontext
    runner = TrainStep(model, objective, cfg, autocast)
    if world.distributed:
        # Buffers are not synchronised before each forward: each rank's queues hold its own rows
        # (the start-up copy of rank 0's is undone by the restore below). Unused parameters: the
        # anchors until the queues are full.
        ddp = torch.nn.parallel.DistributedDataParallel
        no_sync = (
            {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters else {"broadcast_buffers": False}
        )
        runner = ddp(runner, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True, **no_sync)
    step = 0
    if state is not None:  # after the DDP wrap, whose start broadcasts rank 0's buffers
        own = state["ranks"][world.rank] if world.distributed else state
        parts = {
            "model": (model, state["model"]),
            "objective": (objective, own["objective"]),
            "optimizer": (optimizer, state["optimizer"]),
            "scheduler": (scheduler, state["scheduler"]),
            "scaler": (scaler, state["scaler"]),
        }
        for key, (part, saved) in parts.items():
            _restore(part, saved, key, ckpt_path)
        if ema is not None:
            if not isinstance(state.get("ema"), dict):
                raise CheckpointError(f"checkpoint '{ckpt_path}': no EMA weights, but train.ema_decay is set")
            ema.state = {k: v.to(device) for k, v in state["ema"].items()}
        step = state["step"]
        ckpt.set_rng_state(own["rng"], ckpt_path)
    elif world.main:
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    metrics = _Metrics(out / METRICS, state["metrics_lines"] if state else None) if world.main else None

    def checkpoint() -> None:
        ranks = None
        if world.distributed:
            ranks = world.gather_objects({"objective": _cpu(objective.state_dict()), "rng": ckpt.rng_state()})
        if not world.main:
            return
        ckpt.save(
            {
                "config": cfg.to_dict(),
                "model": model.state_dict(),
                "objective": objective.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "ema": None if ema is None else ema.state,
                "rng": ckpt.rng_state(),
                "step": step,
                "metrics_lines": metrics.lines,
                "finished": step >= total_steps,
                "world_size": world.size,
                **({"ranks": ranks} if ranks is not None else {}),
            },
            ckpt_path,
        )

    def eval_model():
        if ema is None or not t.eval_ema:
            return model
        shadow = make_model(cfg, splits["train"].dims()).to(device, dtype)
        shadow.load_state_dict(ema.state)
        return shadow

    def run_eval(epoch: int) -> dict:
        """Rank 0 evaluates; the others wait for it."""
        results = {}
        if world.main:
            results = evaluate_model(eval_model(), splits, max(batch, 256), device, cfg.loss)
            for name, res in results.items():
                metrics.write({"type": "eval", "step": step, "epoch": epoch, "split": name, **res})
        world.barrier()
        return results

    train_split = splits["train"]
    model.train()
    progress = None
    if t.progress and world.main:
        from tqdm.auto import tqdm

        progress = tqdm(total=total_steps, initial=step, desc=f"{cfg.name} [{cfg.loss.variant}]", unit="step", dynamic_ncols=True)
    results: dict = {}
    evaluated = False
    delay = float(os.environ.get("MMOT_SSPC_STEP_DELAY", "0") or 0)  # test hook: slow steps down
    ckpt_every = t.checkpoint_every or steps_per_epoch
    try:
        while step < total_steps:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            idx = world.shard(plan.indices(epoch, in_epoch))
            tokens = {m: train_split.features[m][idx].to(device, dtype, non_blocking=True) for m in model.modalities}
            masks = {m: train_split.masks[m][idx].to(device, non_blocking=True) for m in model.modalities}
            present = train_split.present_in(idx)
            if present is not None:
                present = {m: p.to(device, non_blocking=True) for m, p in present.items()}
            losses = runner(tokens, masks, present)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses["loss"]).backward()
            if t.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update(model)
            step += 1
            if step_hook is not None:
                step_hook(step)
            if delay:
                time.sleep(delay)
            if step % t.log_every == 0 or step == total_steps:
                # The global batch's loss: the anchor term is each rank's mean over its rows.
                parts = ("loss", "contrastive", "anchor", "structure")
                values = world.mean(torch.stack([losses[k].detach().to(torch.float64) for k in parts])).tolist()
                if world.main:
                    record = {"type": "train", "step": step, "epoch": epoch, **dict(zip(parts, values))}
                    record.update(lr=optimizer.param_groups[0]["lr"], queue_full=objective.queue_full)
                    metrics.write(record)
                    if progress is not None:
                        progress.set_postfix(loss=f"{record['loss']:.3f}", anc=f"{record['anchor']:.3f}")
            if progress is not None:
                progress.update(1)
            epoch_done = step % steps_per_epoch == 0
            if epoch_done:
                scheduler.step()
                if t.eval_every and (epoch + 1) % t.eval_every == 0 and step < total_steps:
                    run_eval(epoch)
            if step == total_steps:
                results, evaluated = run_eval(epoch), True
                checkpoint()
            elif step % ckpt_every == 0 or epoch_done and not t.checkpoint_every:
                checkpoint()
    finally:
        if progress is not None:
            progress.close()
    if not evaluated:  # resumed a finished run
        results = run_eval(max(0, (step - 1) // steps_per_epoch))
        checkpoint()
    return world.broadcast(results)


def load_for_eval(path, device: str = "cpu"):
    """(model, splits, config) from a checkpoint file or run directory; the model holds the
    trained weights, or the EMA weights where the run's config says ``train.eval_ema``."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' not found")
    state = ckpt.load(path)
    cfg = _checkpoint_config(state, path)
    splits = make_splits(cfg.data)
    model = make_model(cfg, splits["train"].dims())
    key = "ema" if cfg.train.eval_ema else "model"
    if not isinstance(state.get(key), dict):
        raise CheckpointError(f"checkpoint '{path}': no '{key}' weights to evaluate")
    _restore(model, state[key], key, path)
    return model.to(device), splits, cfg
