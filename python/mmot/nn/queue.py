"""``FeatureQueue``: a FIFO of past embeddings without gradient."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmot import _checks
from mmot.nn import _args

_WHERE = "mmot.nn.FeatureQueue"


class FeatureQueue(nn.Module):
    """A first-in first-out queue of the last ``size`` embeddings of width ``dim``.

    ``push(x)`` appends the rows of x (B, dim), detached, dropping the oldest once full;
    ``features()`` returns the stored rows oldest first (fewer than ``size`` until full);
    ``extend(x)`` returns ``[queue; x]``, the stacking SSPC scores before each Multi-SK call.
    The storage is a buffer, so it follows ``.to(device)`` and is saved in ``state_dict``:
    a resumed run keeps its queue.

    Example: a MoCo / SwAV-style queue in an existing training step::

        queue = mmot.nn.FeatureQueue(5500, 256)
        ...
        z = model(x)                                      # (B, 256)
        with torch.no_grad():
            targets = msk(anchors(queue.extend(z)))[-z.shape[0]:]
        queue.push(z)
    """

    storage: Tensor
    head: Tensor
    count: Tensor

    def __init__(self, size: int, dim: int, *, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.size = _args.int_in_range(_WHERE, "size", size, 1)
        self.dim = _args.int_in_range(_WHERE, "dim", dim, 1)
        dtype = _args.float_dtype(_WHERE, "dtype", dtype)
        self.register_buffer("storage", torch.zeros(size, dim, dtype=dtype))
        self.register_buffer("head", torch.zeros((), dtype=torch.long))  # next slot to write
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def __len__(self) -> int:
        return int(self.count)

    @property
    def is_full(self) -> bool:
        return int(self.count) >= self.size

    @torch.no_grad()
    def push(self, x: Tensor) -> None:
        """Append the rows of x (B, dim), which must be finite: a NaN kept here would poison every later target."""
        x = _args.rows(f"{_WHERE}.push", "x", x, self.dim, self.storage.device)
        x = x.detach().to(self.storage.dtype)[-self.size :]
        if _checks.value_checks_enabled() and x.numel() and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{_WHERE}.push: argument 'x' must be finite in the queue's dtype ({self.storage.dtype}); found NaN or Inf")
        n, head = x.shape[0], int(self.head)
        first = min(n, self.size - head)
        self.storage[head : head + first] = x[:first]
        self.storage[: n - first] = x[first:]
        self.head.fill_((head + n) % self.size)
        self.count.fill_(min(self.size, int(self.count) + n))

    def features(self) -> Tensor:
        """The stored rows, oldest first: (len(self), dim), detached."""
        count, head = int(self.count), int(self.head)
        if count < self.size:
            return self.storage[:count]
        return torch.cat([self.storage[head:], self.storage[:head]])

    def extend(self, x: Tensor) -> Tensor:
        """``[queue; x]``: the stored rows (detached, in x's dtype) followed by x."""
        x = _args.rows(f"{_WHERE}.extend", "x", x, self.dim, self.storage.device)
        return torch.cat([self.features().to(x.dtype), x])

    @torch.no_grad()
    def clear(self) -> None:
        self.head.zero_()
        self.count.zero_()

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"
