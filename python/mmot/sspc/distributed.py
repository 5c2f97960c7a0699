"""Multi-process training of :mod:`mmot.sspc` on ``torch.distributed``: gloo on CPU, NCCL on CUDA,
launched by ``torchrun`` (or ``mmot-sspc train --nproc N``, which runs torchrun itself).

What the training loop (:func:`mmot.sspc.train.train`) does with it:

- :func:`init_world` starts the process group from torchrun's environment (``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), or uses the one the caller
  started; each CUDA process takes the GPU ``LOCAL_RANK``. A second group over the same ranks
  carries the losses' collectives (the all-gathers and the sharded Sinkhorn's all-reduces), so
  that they never interleave with DDP's gradient all-reduces on one communicator.
- :meth:`World.shard`: every rank draws the same global batch (a function of the seed) and keeps
  its contiguous 1/W share.
- :func:`gather_rows`: the all-gather with gradient behind the global-batch losses. The forward
  concatenates the ranks' rows in rank order (the global batch); the backward all-reduces the
  gradient of the gathered tensor and keeps this rank's rows. Every rank computes the same
  global loss, so its rows receive W times their share of the gradient, and DDP's average over
  the W ranks gives exactly the single-process gradient.
- :meth:`World.agree`: the checks before training run on every rank, and an error on any rank is
  raised on all of them, so that no rank waits forever for a peer that gave up.
- :func:`finish`: the CLI leaves a distributed run with ``os._exit`` after a final barrier
  (gloo's teardown aborted a process now and then after a clean run).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

# How long the other ranks wait at a barrier for rank 0's evaluation and checkpoint.
WAIT_TIMEOUT = timedelta(hours=6)
# Whether init_world started the default process group (then finish() may end the process).
_OWNED = False
_WAIT_GROUP = None


@dataclass
class World:
    """This process's place in the run: rank, number of processes, local rank (its GPU) and the
    process group of the losses' collectives (None in a single-process run)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    group: Any = None
    wait_group: Any = None
    device: torch.device | None = None

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0: writes checkpoints and metrics, evaluates, prints."""
        return self.rank == 0

    def shard(self, rows: Tensor) -> Tensor:
        """This rank's contiguous 1/W share of the global batch's row indices."""
        if not self.distributed:
            return rows
        n = rows.shape[0] // self.size
        return rows[self.rank * n : (self.rank + 1) * n]

    def barrier(self) -> None:
        """Wait for every rank, however long rank 0 evaluates (a gloo group with a long timeout:
        NCCL's default timeout is minutes)."""
        if self.distributed:
            dist.barrier(group=self.wait_group)

    def mean(self, values: Tensor) -> Tensor:
        """The average over ranks of ``values`` (a copy)."""
        if not self.distributed:
            return values
        out = values.detach().clone()
        dist.all_reduce(out, group=self.group)
        return out / self.size

    def gather_objects(self, obj: Any) -> list | None:
        """Every rank's ``obj`` (picklable, CPU tensors only) as a list on rank 0; None elsewhere."""
        if not self.distributed:
            return [obj]
        out = [None] * self.size if self.main else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def all_objects(self, obj: Any) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def agree(self, fn):
        """``fn()`` on every rank; if it raised anywhere, the error of the lowest failing rank is
        raised on every rank, marked ``mmot_agreed`` (the CLI prints it from rank 0 only)."""
        error = None
        try:
            result = fn()
        except Exception as exc:  # every failure must reach the peers, whatever its type
            error, result = exc, None
        if not self.distributed:
            if error is not None:
                raise error
            return result
        reports = self.all_objects(None if error is None else _portable(error))
        first = next((r for r, e in enumerate(reports) if e is not None), None)
        if first is None:
            return result
        exc = error if first == self.rank else reports[first]
        exc.mmot_agreed = True
        raise exc


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it pickles and unpickles to the same type, else a RuntimeError with its message."""
    import pickle

    try:
        back = pickle.loads(pickle.dumps(exc))
        if type(back) is type(exc):
            return exc
    except Exception:  # an exception whose arguments do not pickle
        pass
    return RuntimeError(f"{type(exc).__name__}: {exc}")


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def env_world_size() -> int:
    """The number of processes torchrun started (``WORLD_SIZE``), 1 outside torchrun."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_world(device: torch.device) -> tuple[World, torch.device]:
    """This process's :class:`World` and training device.

    Under torchrun (``WORLD_SIZE`` > 1) the default process group is started here unless the
    caller started one (gloo for a CPU device, NCCL for CUDA, whose device becomes
    ``cuda:LOCAL_RANK``); outside it, and in a group of one, the run is single-process."""
    global _OWNED
    if not dist.is_available():
        return World(), device
    if not dist.is_initialized():
        if env_world_size() <= 1:
            return World(), device
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend_for(device))
        _OWNED = True
    size = dist.get_world_size()
    if size <= 1:
        return World(), device
    rank = dist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    group = dist.new_group(backend=dist.get_backend())
    global _WAIT_GROUP
    wait_group = _WAIT_GROUP = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    return World(rank=rank, size=size, local_rank=local_rank, group=group, wait_group=wait_group, device=device), device


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s random draws (augmentations, dropout) in a run seeded ``seed``:
    distinct per rank, the same in every run."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint32)[0])


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, group) -> Tensor:
        x = x.contiguous()
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x, group=group)
        ctx.dim, ctx.group, ctx.rank, ctx.rows = dim, group, rank, x.shape[dim]
        return torch.cat(parts, dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # Every rank computed the same loss of the gathered rows: the gradient of this rank's
        # rows is the sum over ranks of their gradients of its slice.
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.group)
        return total.narrow(ctx.dim, ctx.rank * ctx.rows, ctx.rows), None, None


def gather_rows(x: Tensor, group, dim: int = 0) -> Tensor:
    """The ranks' ``x`` concatenated along ``dim`` in rank order, with gradient (see the module
    docstring); every rank must pass the same shape."""
    return _GatherRows.apply(x, dim, group)


def gather_flags(x: Tensor, group) -> Tensor:
    """The ranks' bool tensors concatenated along dim 0 (no gradient)."""
    size = dist.get_world_size(group)
    small = x.to(torch.uint8).contiguous()
    parts = [torch.empty_like(small) for _ in range(size)]
    dist.all_gather(parts, small, group=group)
    return torch.cat(parts).bool()


def finish(code: int, wait: bool = True) -> int:
    """End a process whose default group :func:`init_world` started: flush, wait for every rank
    at a barrier (``wait``: false when this rank failed alone), then ``os._exit(code)``, which
    skips gloo's teardown. Returns ``code`` when there is no such group."""
    if not (_OWNED and dist.is_initialized()):
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    if wait:
        try:
            dist.barrier(group=_WAIT_GROUP)
        except Exception:  # a peer is gone; leave anyway
            pass
    os._exit(code)
