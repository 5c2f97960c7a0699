"""Checkpoints of SSPC runs: written atomically, read without unpickling code.

A checkpoint (``last.pt``) is a ``torch.save`` file that ``torch.load(..., weights_only=True)``
reads: only tensors and plain containers (dict, list, tuple, str, int, float, bool, None).
The config is stored as a plain dict and every RNG state as tensors (numpy's Mersenne-Twister
key and Python's ``random`` state as int64 tensors), so nothing in a checkpoint needs pickled
classes. A file that is truncated, not a checkpoint, or holds anything else (for example a
pickled object from another program) is refused with a :class:`CheckpointError` naming the file.

Format versions: 2 is written. 1 (before the SSPC code's defaults: raw input space, queue in
rows, EMA evaluated when kept) is read for evaluation, its config completed with the values that
reproduce what it was trained with (:func:`upgrade_config`); ``train --resume`` refuses it.

A multi-process run (:mod:`mmot.sspc.distributed`) is written by rank 0 with ``world_size``
(its number of processes; 1, or absent in older files, for a single process) and ``ranks``, one
``{"objective", "rng"}`` entry per rank: every rank's queues and random state, which differ
between ranks. The top-level ``objective`` and ``rng`` are rank 0's; the model, optimizer,
scheduler, scaler and EMA are the same on every rank.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import cast

import numpy as np
import torch

FORMAT = "mmot-sspc-checkpoint"
VERSION = 2
READABLE = (1, 2)
# Keys every checkpoint holds, with the type each must have once loaded.
REQUIRED = {
    "config": dict,
    "model": dict,
    "objective": dict,
    "optimizer": dict,
    "scheduler": dict,
    "scaler": dict,
    "rng": dict,
    "step": int,
    "metrics_lines": int,
    "finished": bool,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely or is not an mmot-sspc checkpoint; names the file."""


def save(state: dict, path: Path) -> None:
    """Write ``state`` to ``path`` through a temporary file and ``os.replace``: never a torn file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save({"format": FORMAT, "version": VERSION, **state}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load(path: Path) -> dict:
    """Read a checkpoint with ``weights_only=True`` and check its layout, or raise :class:`CheckpointError`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, garbage, or an object weights_only refuses to unpickle
        reason = " ".join(str(exc).split())[:300]
        raise CheckpointError(
            f"checkpoint '{path}' cannot be read: it is truncated, not a checkpoint, or holds objects other than "
            f"tensors and plain containers (only those are loaded, since unpickling anything else can run code): {reason}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint '{path}' is not an mmot-sspc checkpoint (no format tag '{FORMAT}')")
    if state.get("version") not in READABLE:
        raise CheckpointError(f"checkpoint '{path}' has format version {state.get('version')!r}; this mmot reads versions {READABLE}")
    for key, kind in REQUIRED.items():
        if not isinstance(state.get(key), kind):
            raise CheckpointError(f"checkpoint '{path}': '{key}' must be a {kind.__name__}; got {type(state.get(key)).__name__}")
    world = state.setdefault("world_size", 1)
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise CheckpointError(f"checkpoint '{path}': 'world_size' must be an int >= 1; got {world!r}")
    ranks = state.get("ranks")
    if world > 1 and not (
        isinstance(ranks, list)
        and len(ranks) == world
        and all(isinstance(r, dict) and isinstance(r.get("objective"), dict) and isinstance(r.get("rng"), dict) for r in ranks)
    ):
        raise CheckpointError(f"checkpoint '{path}': 'ranks' must hold one {{'objective', 'rng'}} entry for each of its {world} processes")
    if state.get("ema") is not None and not isinstance(state["ema"], dict):
        raise CheckpointError(f"checkpoint '{path}': 'ema' must be a dict or None; got {type(state['ema']).__name__}")
    if state["version"] == 1:
        state["config"] = upgrade_config(state["config"])
    return state


def upgrade_config(config: dict) -> dict:
    """A version-1 config completed with the behaviour of the code that wrote it: the raw input
    space, and the EMA evaluated whenever one was kept (its queue_size, dropout and clipping are
    stored in it already)."""
    config = {section: dict(values) if isinstance(values, dict) else values for section, values in config.items()}
    if isinstance(config.get("loss"), dict):
        config["loss"].setdefault("input_space", "raw")
    if isinstance(config.get("train"), dict):
        config["train"].setdefault("eval_ema", config["train"].get("ema_decay") is not None)
    return config


def rng_state() -> dict:
    """Every RNG's state as tensors and plain numbers."""
    _, keys, pos, has_gauss, gauss = cast(tuple, np.random.get_state(legacy=True))
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, path: Path) -> None:
    """Restore what :func:`rng_state` saved (``path`` names the checkpoint in errors)."""
    try:
        torch.set_rng_state(state["torch"])
        n = state["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        p = state["python"]
        random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint '{path}': bad RNG state: {exc}") from None
