"""``SSPCLoss``: SSPC's anchor loss (intra- and cross-modal), with queues and warm-up."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from mmot import _checks
from mmot.nn import _args
from mmot.nn.anchors import Anchors
from mmot.nn.queue import FeatureQueue
from mmot.ops.anchor_consistency import anchor_consistency_loss
from mmot.ops.multi_sinkhorn import multi_sinkhorn
from mmot.ops.similarity import similarity
from mmot.ops.sinkhorn import sinkhorn
from mmot.reference import minmax_rows

ASSIGNMENTS = ("multi", "single")
_WHERE = "mmot.nn.SSPCLoss"


def sspc_pair_weight(m: str, n: str, low: float = 0.1, low_modalities: Sequence[str] = ("audio",)) -> float:
    """SSPC's c[m, n]: 1 within text and video, ``low`` (0.1) wherever audio is involved."""
    low = _args.weight("mmot.nn.sspc_pair_weight", "low", low, "low")
    return low if (m in low_modalities or n in low_modalities) else 1.0


class SSPCLoss(nn.Module):
    r"""SSPC's anchor loss (Swetha et al., ICCV 2023), owning its anchors and queues.

    For modality m, x_m is its input-space feature (B, D_m) and x̂_m its joint-space
    embedding (B, D). The module holds K anchors per modality in each space, Z_m and Ẑ_m, and
    a :class:`FeatureQueue` of ``queue_size`` past rows per modality and space.

    **Which input to pass as x_m.** The SSPC code's default is the L2-normalised masked mean
    of the modality's *projected* tokens: after the token projection (and its LayerNorm),
    before the transformer, computed *with* gradient, so the anchor terms also train the
    token projection. Pass that. Its non-default ``anchor_raw_feat_sim`` passes the pooled
    raw input features instead (no gradient reaches the encoder through them; the input-space
    terms then only move the input anchors). Scores are cosine similarities, so whether x_m
    is normalised does not change the loss.

    - P_m = sim(x_m, Z_m) and P̂_{n,m} = sim(x̂_n, Ẑ_m) for every pair (n, m) (one batched
      :func:`mmot.similarity` call).
    - Targets, under ``no_grad``: T_m = Multi-SK(sim([queue; x_m], Z_m))[-B:] and
      T̂_{n,m} = Multi-SK(sim([queue; x̂_n], Ẑ_m))[-B:]; the queues are re-scored against the
      current anchors at every call, and all T̂ come from one batched call.
    - L_anc = Σ_{m,n} c[m,n]·ACL(P_m, T̂_{n,m}) + Σ_{n,m} c[n,m]·ACL(P̂_{n,m}, T_m), with ACL
      = :func:`mmot.anchor_consistency_loss` at ``temperature`` (0.1); the n = m terms are the
      modality-specific loss, n ≠ m the cross-modal one. c is 1 within text and video and 0.1
      wherever audio is involved (``pair_weights`` overrides).
    - **Warm-up.** Until every queue is full, the loss is 0 (no graph) and the call only
      pushes the batch. Afterwards the batch is pushed after the targets are computed.
    - ``queue_size``: SSPC's is 5500 rows at a batch of 2160 (216 videos × 10 clips), about
      2.5 batches; scale it with your batch.
    - ``assignment="single"``: the "+SSPC with single-assignment Sinkhorn" ablation. Multi-SK
      is replaced by SwAV's Sinkhorn (:func:`mmot.sinkhorn` with this module's ``eps`` and
      ``n_iters``), and its rows, which sum to 1, are min-max rescaled to [0, 1] as Multi-SK's
      targets are (:func:`mmot.reference.minmax_rows`), so that the two variants differ only in
      the assignment. Unscaled SwAV rows (most entries near 0) would push almost every score
      down under ACL, whose predicted probability σ(exp(s/τ)) is above 0.5. Multi-SK with
      k = 1 was not used: its other K − 1 down-weighted slots still share each sample's mass,
      so it is not SwAV's assignment.

    - ``process_group``: data-parallel training. Each rank passes its shard of the batch and
      keeps its own queues (``queue_size`` rows of its own past batches); the targets are the
      assignment of the union of every rank's [queue; batch] rows, from the sharded
      :func:`mmot.multi_sinkhorn` / :func:`mmot.sinkhorn` (column sums all-reduced every
      iteration), so they equal a single process's targets on the concatenated rows. The loss
      is the mean over this rank's rows: the average over ranks (what DDP's gradient averaging
      computes) is the loss of the global batch when the shards are of equal size. Every rank
      must call the module at every step (the op's collectives).

    After a call, ``last_terms`` holds the detached "specific" and "cross" parts.

    Example: add SSPC to an existing multi-modal model::

        sspc = mmot.nn.SSPCLoss({"video": 4096, "audio": 4096, "text": 4096}, joint_dim=6144, queue_size=5500)
        contrastive = mmot.nn.CombinatorialContrastiveLoss()
        optimizer = torch.optim.Adam([*model.parameters(), *sspc.parameters()], lr=5e-5)
        for batch in loader:
            # per modality: (B, 4096) pooled projected tokens (with gradient), (B, 6144) embeddings
            pooled, joint = model(batch)
            loss = contrastive(joint) + sspc(pooled, joint)
            optimizer.zero_grad(); loss.backward(); optimizer.step()
    """

    def __init__(
        self,
        input_dims: Mapping[str, int],
        joint_dim: int,
        n_anchors: int = 64,
        queue_size: int = 5500,
        *,
        k: int | None = None,
        eps: float = 0.07,
        n_iters: int = 20,
        temperature: float = 0.1,
        assignment: str = "multi",
        pair_weights: Mapping[tuple[str, str], float] | None = None,
        process_group=None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        _args.mapping(_WHERE, "input_dims", input_dims, "modality names to input feature sizes")
        if not input_dims:
            raise ValueError(f"{_WHERE}: argument 'input_dims' must name at least one modality")
        for m, d in input_dims.items():
            if not isinstance(m, str):
                raise TypeError(f"{_WHERE}: argument 'input_dims' must be keyed by modality names (str); got {m!r}")
            _args.int_in_range(_WHERE, f"input_dims[{m!r}]", d, 1)
        joint_dim = _args.int_in_range(_WHERE, "joint_dim", joint_dim, 1)
        n_anchors = _args.int_in_range(_WHERE, "n_anchors", n_anchors, 1)
        queue_size = _args.int_in_range(_WHERE, "queue_size", queue_size, 1)
        # Multi-SK keeps k of the n_anchors slots; a k beyond them would only fail after the warm-up.
        self.k = max(1, n_anchors // 2) if k is None else _args.int_in_range(_WHERE, "k", k, 1, n_anchors)
        self.eps = _args.positive_float(_WHERE, "eps", eps)
        self.n_iters = _args.int_in_range(_WHERE, "n_iters", n_iters, 1)
        self.temperature = _args.positive_float(_WHERE, "temperature", temperature)
        self.assignment = _args.choice(_WHERE, "assignment", assignment, ASSIGNMENTS)
        self.backend = _args.backend(_WHERE, backend)
        if process_group is not None:
            _checks.process_group(_WHERE, process_group)
        self.process_group = process_group
        self.modalities = list(input_dims)
        self.input_dims, self.joint_dim = dict(input_dims), joint_dim
        self.input_anchors = nn.ModuleDict({m: Anchors(d, n_anchors, backend=backend) for m, d in input_dims.items()})
        self.joint_anchors = nn.ModuleDict({m: Anchors(joint_dim, n_anchors, backend=backend) for m in self.modalities})
        self.input_queues = nn.ModuleDict({m: FeatureQueue(queue_size, d) for m, d in input_dims.items()})
        self.joint_queues = nn.ModuleDict({m: FeatureQueue(queue_size, joint_dim) for m in self.modalities})
        self.pair_weights = self._pair_weights(pair_weights)
        self.last_terms: dict[str, Tensor] = {}

    def _pair_weights(self, given: Mapping[tuple[str, str], float] | None) -> dict[tuple[str, str], float]:
        """c[m, n] for every ordered pair of modalities: ``given`` (in either order) over SSPC's defaults."""
        if given is not None:
            _args.mapping(_WHERE, "pair_weights", given, "modality pairs to weights")
            for pair in given:
                if not (isinstance(pair, tuple) and len(pair) == 2 and all(m in self.modalities for m in pair)):
                    raise ValueError(
                        f"{_WHERE}: argument 'pair_weights' must be keyed by pairs of the modalities {self.modalities}; got key {pair!r}"
                    )
        weights = {}
        for m in self.modalities:
            for n in self.modalities:
                value = None if given is None else given.get((m, n), given.get((n, m)))
                weights[(m, n)] = sspc_pair_weight(m, n) if value is None else _args.weight(_WHERE, "pair_weights", value, (m, n))
        return weights

    def _check_batch(self, inputs: Mapping[str, Tensor], joints: Mapping[str, Tensor]) -> int:
        """Every modality's (B, D_m) input and (B, joint_dim) joint rows, with one B >= 1; returns B."""
        where = f"{_WHERE}.forward"
        _args.mapping(where, "inputs", inputs, "modality names to (B, D_m) tensors")
        _args.mapping(where, "joints", joints, "modality names to (B, joint_dim) tensors")
        missing = [m for m in self.modalities if m not in inputs or m not in joints]
        if missing:
            raise ValueError(f"{where}: arguments 'inputs' and 'joints' must hold every modality {self.modalities}; missing {missing}")
        device = next(self.buffers()).device  # the queues' device
        sizes = {}
        for m in self.modalities:
            sizes[f"inputs[{m!r}]"] = _args.rows(where, f"inputs[{m!r}]", inputs[m], self.input_dims[m], device).shape[0]
            sizes[f"joints[{m!r}]"] = _args.rows(where, f"joints[{m!r}]", joints[m], self.joint_dim, device).shape[0]
        batches = set(sizes.values())
        if len(batches) != 1 or 0 in batches:
            raise ValueError(f"{where}: every modality's rows must share one batch size B >= 1; got {sizes}")
        return batches.pop()

    @property
    def warmed_up(self) -> bool:
        """Whether every queue is full, so that the loss is active."""
        return all(q.is_full for q in [*self.input_queues.values(), *self.joint_queues.values()])

    def _assign(self, scores: Tensor) -> Tensor:
        if self.assignment == "single":
            return minmax_rows(sinkhorn(scores, self.eps, self.n_iters, process_group=self.process_group, backend=self.backend))
        return multi_sinkhorn(scores, self.k, self.eps, self.n_iters, process_group=self.process_group, backend=self.backend)

    def forward(self, inputs: Mapping[str, Tensor], joints: Mapping[str, Tensor]) -> Tensor:
        batch = self._check_batch(inputs, joints)
        mods = self.modalities
        if not self.warmed_up:
            self._push(inputs, joints)
            self.last_terms = {}
            return joints[mods[0]].new_zeros(())

        # Predictions, with gradient.
        p_in = {m: self.input_anchors[m](inputs[m]) for m in mods}  # (B, K) each
        x_hat = torch.stack([joints[n] for n in mods])[:, None]  # (Mod_n, 1, B, D)
        z_hat = torch.stack([self.joint_anchors[m].weight.to(x_hat.dtype) for m in mods])[None]  # (1, Mod_m, K, D)
        p_joint = similarity(x_hat, z_hat, backend=self.backend)  # (Mod_n, Mod_m, B, K)

        # Targets on [queue; batch], keeping the batch rows.
        with torch.no_grad():
            t_in = {m: self._assign(self.input_anchors[m](self.input_queues[m].extend(inputs[m].detach())))[-batch:] for m in mods}
            queued = torch.stack([self.joint_queues[n].extend(joints[n].detach()) for n in mods])[:, None]
            t_joint = self._assign(similarity(queued, z_hat.detach(), backend=self.backend))[..., -batch:, :]

        specific, cross = None, None
        for i, n in enumerate(mods):
            for j, m in enumerate(mods):
                # c[m,n]·ACL(P_m, T̂_{n,m}) + c[n,m]·ACL(P̂_{n,m}, T_m)
                term = self.pair_weights[(m, n)] * anchor_consistency_loss(
                    p_in[m], t_joint[i, j], self.temperature, backend=self.backend
                ) + self.pair_weights[(n, m)] * anchor_consistency_loss(p_joint[i, j], t_in[m], self.temperature, backend=self.backend)
                if n == m:
                    specific = term if specific is None else specific + term
                else:
                    cross = term if cross is None else cross + term
        self._push(inputs, joints)
        total = specific if cross is None else specific + cross
        self.last_terms = {"specific": specific.detach(), "cross": (cross if cross is not None else specific * 0).detach()}
        return total

    @torch.no_grad()
    def _push(self, inputs: Mapping[str, Tensor], joints: Mapping[str, Tensor]) -> None:
        for m in self.modalities:
            self.input_queues[m].push(inputs[m])
            self.joint_queues[m].push(joints[m])
