"""``Sinkhorn`` and ``MultiSinkhorn``: the assignment ops as modules."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from mmot import _checks
from mmot.nn import _args
from mmot.ops.multi_sinkhorn import NORMALIZE_CHOICES, multi_sinkhorn
from mmot.ops.sinkhorn import sinkhorn

# The keyword options each module forwards to its op.
SINKHORN_OPTIONS = ("row_mass", "col_mass", "log_domain", "process_group", "backend")
MULTI_SINKHORN_OPTIONS = ("low_weight", "slot_weights", "anchor_mass", "normalize", "log_domain", "process_group", "backend")


def _check_options(where: str, options: dict, known: tuple[str, ...]) -> dict:
    """Check what can be checked without scores: names, flags, choices and weights.

    Mass tensors and process groups are checked by the op at call time, against the scores.
    """
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"{where}: unknown keyword argument(s) {unknown}; expected some of {known}")
    if "log_domain" in options:
        _checks.log_domain_flag(where, options["log_domain"])
    if "backend" in options:
        _args.backend(where, options["backend"])
    if "normalize" in options:
        _checks.choice(where, "normalize", options["normalize"], NORMALIZE_CHOICES)
    if "low_weight" in options:
        _checks.positive_float(where, "low_weight", options["low_weight"])
    for name in ("row_mass", "col_mass", "anchor_mass"):
        if options.get(name) is not None:
            _checks.float_tensor(where, name, options[name], min_dim=1, shape_hint="(L,) or (..., L)")
    slots = options.get("slot_weights")
    if slots is not None and not isinstance(slots, Tensor):
        if isinstance(slots, (str, bytes)) or not isinstance(slots, Sequence):
            raise TypeError(f"{where}: argument 'slot_weights' must be a sequence of positive floats; got {type(slots).__name__}")
        for value in slots:
            _checks.positive_float(where, "slot_weights", value)
    return options


class Sinkhorn(nn.Module):
    """SwAV-style Sinkhorn-Knopp as a module: ``forward(scores)`` = ``mmot.sinkhorn(scores, eps, n_iters, **options)``.

    Example: replace the hand-written loop in a SwAV / DINO head::

        class SwAVHead(nn.Module):
            def __init__(self, dim=128, n_prototypes=3000):
                super().__init__()
                self.prototypes = nn.Linear(dim, n_prototypes, bias=False)
                self.sinkhorn = mmot.nn.Sinkhorn(eps=0.05, n_iters=3)

            def forward(self, z):                          # z: (B, dim), L2-normalised
                scores = self.prototypes(z)
                with torch.no_grad():
                    q = self.sinkhorn(scores)              # (B, n_prototypes), rows sum to 1
                return scores, q
    """

    def __init__(self, eps: float = 0.05, n_iters: int = 3, **options) -> None:
        super().__init__()
        where = "mmot.nn.Sinkhorn"
        self.eps = _checks.positive_float(where, "eps", eps)
        self.n_iters = _checks.int_in_range(where, "n_iters", n_iters, 1)
        self.options = _check_options(where, options, SINKHORN_OPTIONS)

    def forward(self, scores: Tensor) -> Tensor:
        return sinkhorn(scores, self.eps, self.n_iters, **self.options)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, n_iters={self.n_iters}"


class MultiSinkhorn(nn.Module):
    """Multi-Assignment Sinkhorn-Knopp as a module: ``forward(scores)`` = ``mmot.multi_sinkhorn(scores, k, eps, n_iters, **options)``.

    Defaults are SSPC's (eps 0.07, 20 iterations, k = K/2, min-max targets).

    Example: soft k-hot targets for a model's anchor scores::

        msk = mmot.nn.MultiSinkhorn(k=32)
        scores = model.anchors(features)                  # (B, 64)
        with torch.no_grad():
            targets = msk(scores)                         # (B, 64) in [0, 1]
        loss = loss + mmot.anchor_consistency_loss(scores, targets)
    """

    def __init__(self, k: int | None = None, eps: float = 0.07, n_iters: int = 20, **options) -> None:
        super().__init__()
        where = "mmot.nn.MultiSinkhorn"
        # k <= K is checked by the op once the scores give K.
        self.k = None if k is None else _checks.int_in_range(where, "k", k, 1)
        self.eps = _checks.positive_float(where, "eps", eps)
        self.n_iters = _checks.int_in_range(where, "n_iters", n_iters, 1)
        self.options = _check_options(where, options, MULTI_SINKHORN_OPTIONS)

    def forward(self, scores: Tensor) -> Tensor:
        return multi_sinkhorn(scores, self.k, self.eps, self.n_iters, **self.options)

    def extra_repr(self) -> str:
        return f"k={self.k}, eps={self.eps}, n_iters={self.n_iters}"
