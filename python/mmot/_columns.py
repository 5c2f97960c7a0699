"""Reductions over samples (the column sums) for one process or for rows sharded across ranks.

The Sinkhorn ops only ever reduce over samples through these two methods, so sharding the
rows across a process group needs nothing more than an all-reduce here, exactly as SwAV's
``distributed_sinkhorn`` does.
"""

from __future__ import annotations

import torch


class LocalColumns:
    """All samples live in this process."""

    def sum(self, partial: torch.Tensor) -> torch.Tensor:
        return partial

    def max(self, partial: torch.Tensor) -> torch.Tensor:
        return partial


class ShardedColumns:
    """Samples are sharded across ``group``: column sums are all-reduced at every iteration."""

    def __init__(self, group) -> None:
        self.group = group

    def sum(self, partial: torch.Tensor) -> torch.Tensor:
        # The autograd-aware all-reduce, so gradients flow back to every rank's rows.
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(partial, group=self.group)

    def max(self, partial: torch.Tensor) -> torch.Tensor:
        # Maxima are only used as detached shifts, so a plain all-reduce suffices.
        import torch.distributed as dist

        reduced = partial.detach().clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX, group=self.group)
        return reduced

    def total_rows(self, local_rows: int, device: torch.device) -> int:
        import torch.distributed as dist

        count = torch.tensor([local_rows], dtype=torch.int64, device=device)
        dist.all_reduce(count, group=self.group)
        return int(count.item())


LOCAL = LocalColumns()
