"""The SSPC model and objective, built on mmot's ops.

Model, per modality (as everything_at_once / SSPC):

    tokens (B, T, D_m) ─ gated projection ─ LayerNorm ─ transformer block ─ masked mean ─ gated
    projection ─▶ joint embedding x̂_m (B, E)

A gated projection is a linear layer followed by context gating, y ← y ⊙ σ(W y + b). The
*input-space* feature x_m, whose structure SSPC preserves, is chosen by ``loss.input_space``:

- ``projected`` (default, the SSPC code's): the L2-normalised masked mean of the projected
  tokens, after the gated token projection and LayerNorm and before the transformer, (B, d_model),
  with gradient, so the anchor terms also train the token projection;
- ``raw`` (the SSPC code's non-default ``anchor_raw_feat_sim``): the masked mean of the raw input
  tokens, (B, D_m), a function of the data alone, so those terms only move the input anchors.

Every modality has K learnable anchors Z_m in its input space and K anchors Ẑ_m in the joint space.

Objective (as in the SSPC paper and code): the NormSoftmax combinatorial contrastive loss (τ = 0.05)
over modality pairs with weights normalised to sum 1, plus, for the SSPC variants, the anchor loss

    L_anc = Σ_{m,n} c[m,n]·ACL(P_m, T̂_{n,m}) + Σ_{n,m} c[n,m]·ACL(P̂_{n,m}, T_m)

with P_m = sim(x_m, Z_m), P̂_{n,m} = sim(x̂_n, Ẑ_m), targets T from an assignment of the
[queue; batch] scores (rows of the batch kept) under no_grad, c[m,n] = min(w_m, w_n) (1 for text
and video, 0.1 wherever audio is involved), ACL = :func:`mmot.anchor_consistency_loss` (τ 0.1).
The queues hold past x_m and x̂_m (``loss.queue_batches`` training batches, 2.5 by default);
they are re-scored against the current anchors at every step and L_anc is 0 until they are full.
All of this is :class:`mmot.nn.SSPCLoss` (which owns the anchors and queues) and
:class:`mmot.nn.CombinatorialContrastiveLoss`; this module only wires them to the encoders and
the config, and swaps in the official-dense Multi-SK for timing.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

import mmot
from mmot.dense_multi_sinkhorn import dense_multi_sinkhorn
from mmot.sspc.config import INPUT_SPACES, OBJECTIVES, LossConfig, ModelConfig
from mmot.sspc.data import MultiModalData
from mmot.sspc.distributed import gather_flags, gather_rows
from mmot.sspc.structure import StructureTerm, wide


class GatedProjection(nn.Module):
    """Linear layer followed by context gating: y = W x + b; y ⊙ σ(G y + c)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.gate = nn.Linear(d_out, d_out)

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc(x)
        return y * torch.sigmoid(self.gate(y))


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    w = mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(dim=-2) / w.sum(dim=-2).clamp_min(1.0)


class ModalityEncoder(nn.Module):
    def __init__(self, d_in: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.token_proj = GatedProjection(d_in, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.block = nn.TransformerEncoderLayer(
            cfg.d_model,
            cfg.n_heads,
            dim_feedforward=max(1, int(round(cfg.mlp_ratio * cfg.d_model))),
            dropout=cfg.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.joint_proj = GatedProjection(cfg.d_model, cfg.embed_dim)

    def forward(self, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(L2-normalised masked mean of the projected tokens, joint embedding, the pooled
        transformer output the joint projection reads)."""
        h = self.norm(self.token_proj(tokens))
        pooled = nn.functional.normalize(masked_mean(h, mask), dim=-1)
        hidden = masked_mean(self.block(h, src_key_padding_mask=~mask), mask)
        return pooled, self.joint_proj(hidden), hidden


class SSPCModel(nn.Module):
    """Per-modality encoders; the anchors live in the objective (:class:`mmot.nn.SSPCLoss`).
    ``input_space`` picks the input-space features it returns (see the module docstring)."""

    def __init__(self, dims: dict[str, int], cfg: ModelConfig, input_space: str = "projected") -> None:
        super().__init__()
        if input_space not in INPUT_SPACES:
            raise ValueError(f"loss.input_space: expected one of {INPUT_SPACES}, got {input_space!r}")
        self.modalities = list(dims)
        self.input_space = input_space
        self.input_dims = dict(dims) if input_space == "raw" else {m: cfg.d_model for m in dims}
        self.encoders = nn.ModuleDict({m: ModalityEncoder(d, cfg) for m, d in dims.items()})

    def forward(self, tokens: dict[str, Tensor], masks: dict[str, Tensor], hidden: bool = False):
        """Returns (input-space features x_m, joint embeddings x̂_m), each keyed by modality; with
        ``hidden`` also the pooled transformer outputs (what the separation heads read)."""
        inputs, joint, pooled = {}, {}, {}
        for m in self.modalities:
            inputs[m], joint[m], pooled[m] = self.encoders[m](tokens[m], masks[m])
            if self.input_space == "raw":
                inputs[m] = masked_mean(tokens[m], masks[m])
        return (inputs, joint, pooled) if hidden else (inputs, joint)


@torch.no_grad()
def embed_split(model: SSPCModel, split: MultiModalData, batch_size: int = 512, device="cpu") -> dict[str, Tensor]:
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype  # train.dtype
    out: dict[str, list[Tensor]] = {m: [] for m in model.modalities}
    for start in range(0, len(split), batch_size):
        sl = slice(start, start + batch_size)
        tokens = {m: split.features[m][sl].to(device, dtype) for m in model.modalities}
        masks = {m: split.masks[m][sl].to(device) for m in model.modalities}
        _, joint = model(tokens, masks)
        for m in model.modalities:
            out[m].append(joint[m].float().cpu())
    model.train(was_training)
    return {m: torch.cat(v) for m, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Objective


class DenseSSPCLoss(mmot.nn.SSPCLoss):
    """:class:`mmot.nn.SSPCLoss` with the official-dense (K, N, K) Multi-SK of the SSPC code in
    place of mmot's kernels: the baseline of the step-time comparison, nothing else."""

    def _assign(self, scores: Tensor) -> Tensor:
        flat = scores.reshape(-1, *scores.shape[-2:])
        out = [dense_multi_sinkhorn(s, k=self.k, eps=self.eps, n_iters=self.n_iters) for s in flat]
        return torch.stack(out).reshape(scores.shape)


class SSPCObjective(nn.Module):
    """NormSoftmax combinatorial loss (:class:`mmot.nn.CombinatorialContrastiveLoss`) plus, for
    the SSPC variants, the anchor loss (:class:`mmot.nn.SSPCLoss`, which owns the input- and
    joint-space anchors and the queues; its parameters are trained with the model's).
    ``dims`` are the input-space sizes (:attr:`SSPCModel.input_dims`), ``queue_size`` the queue
    length in rows (:meth:`LossConfig.queue_rows`), ``hidden_dim`` the width of the pooled
    transformer outputs (``model.d_model``). A structure variant adds its term
    (:class:`mmot.sspc.structure.StructureTerm`) at its weight.

    The many-modality variants replace the NormSoftmax loss, with the same pair weights:
    ``pcmc`` by :func:`mmot.multi_info_nce` (τ ``loss.temperature``), ``pcmr`` by
    :func:`mmot.pairwise_similarity_regression` (``loss.pcmr_*``), ``comm`` by
    :class:`mmot.nn.CoMMLoss` (τ ``loss.comm_temperature``) on two augmented views. With
    ``data.modality_dropout``, missing modalities leave the alignment loss through its masks
    (CoMM's through the fusion encoder's modality masks); the anchor and structure terms see
    every row.

    ``process_group`` (data-parallel training, :mod:`mmot.sspc.distributed`): every rank passes
    its shard of the global batch. The alignment loss and the structure term are computed over
    the global batch, every rank's rows all-gathered with gradient (the same value on every
    rank); the anchor loss is :class:`mmot.nn.SSPCLoss` with the same group (each rank's queue
    holds its own past rows, the targets come from the sharded assignment over every rank's
    [queue; batch]), averaged over this rank's rows. With DDP averaging the gradients over the
    ranks, a step is the single-process step on the global batch (the augmentations of the
    bridge and comm variants are drawn per rank)."""

    def __init__(
        self,
        dims: dict[str, int],
        embed_dim: int,
        n_anchors: int,
        cfg: LossConfig,
        queue_size: int,
        hidden_dim: int,
        process_group=None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.process_group = process_group
        mods = list(dims)
        pairs = {(a, b): cfg.pair_weight(a, b) for a, b in itertools.combinations(mods, 2)}
        if sum(pairs.values()) <= 0:
            raise ValueError(f"loss.pair_weights: the weights of the modality pairs {list(pairs)} sum to 0")
        self.modalities = mods
        self.kind = cfg.base_variant if cfg.base_variant in OBJECTIVES else "contrastive"
        self.contrastive = mmot.nn.CombinatorialContrastiveLoss({p: w for p, w in pairs.items() if w > 0}, cfg.temperature)
        weights = torch.zeros(len(mods), len(mods))
        for (a, b), w in pairs.items():
            weights[mods.index(a), mods.index(b)] = w
        self.register_buffer("pair_weights", weights, persistent=False)
        self.comm = mmot.nn.CoMMLoss(cfg.comm_temperature) if self.kind == "comm" else None
        self.structure = StructureTerm(cfg, pairs, hidden_dim) if cfg.structure else None
        self.sspc = None
        if cfg.uses_anchors:
            w = {m: float(cfg.anchor_weights.get(m, cfg.default_anchor_weight)) for m in mods}
            c = {(m, n): min(w[m], w[n]) for m in mods for n in mods}
            single = cfg.base_variant == "sinkhorn"
            cls = DenseSSPCLoss if (cfg.assignment_impl == "official_dense" and not single) else mmot.nn.SSPCLoss
            if cls is DenseSSPCLoss and process_group is not None:
                raise ValueError("loss.assignment_impl: 'official_dense' (the timing baseline) runs in one process only; use 'mmot'")
            self.sspc = cls(
                dims,
                embed_dim,
                n_anchors,
                queue_size,
                k=cfg.mk_k,
                eps=cfg.sk_eps if single else cfg.mk_eps,
                n_iters=cfg.sk_iters if single else cfg.mk_iters,
                temperature=cfg.anchor_temperature,
                assignment="single" if single else "multi",
                pair_weights=c,
                process_group=process_group,
            )

    @property
    def queue_full(self) -> bool:
        return self.sspc is not None and self.sspc.warmed_up

    @property
    def needs_augmented(self) -> bool:
        return self.structure is not None and self.structure.kind == "bridge"

    def _main(self, joint: dict[str, Tensor], present: dict[str, Tensor] | None, views: tuple[Tensor, Tensor] | None) -> Tensor:
        """The alignment loss of the variant: the pairwise NormSoftmax loss, PCMC, PCMR or CoMM."""
        if self.kind == "comm":
            if views is None:
                raise ValueError("SSPCObjective: the comm variant needs 'views', the fusion encoder's (M+1, B, E) embeddings of two views")
            return self.comm(wide(views[0]), wide(views[1]))
        if self.kind == "contrastive":
            return self.contrastive(joint, present)
        stacked = torch.stack([joint[m] for m in self.modalities])
        flags = None if present is None else torch.stack([present[m] for m in self.modalities])
        if self.kind == "pcmc":
            return mmot.multi_info_nce(stacked, self.cfg.temperature, present=flags, pair_weights=self.pair_weights)
        cfg = self.cfg
        return mmot.pairwise_similarity_regression(
            stacked,
            present=flags,
            match_target=cfg.pcmr_match_target,
            nonmatch_target=cfg.pcmr_nonmatch_target,
            margin=cfg.pcmr_margin,
            pair_weights=self.pair_weights,
        )

    def forward(
        self,
        inputs: dict[str, Tensor],
        joint: dict[str, Tensor],
        hidden: dict[str, Tensor] | None = None,
        augmented: dict[str, Tensor] | None = None,
        present: dict[str, Tensor] | None = None,
        views: tuple[Tensor, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """The loss and its parts; ``hidden`` (the model's pooled outputs) and ``augmented`` (joint
        embeddings of augmented views) feed the structure term, where the variant has one.
        ``present`` flags the samples that have each modality (missing ones leave the alignment
        loss); ``views`` are the fusion encoder's (M+1, B, E) embeddings of two augmented views,
        which the comm variant aligns (``inputs`` and ``joint`` are then unused)."""
        joint = {m: wide(v) for m, v in joint.items()}
        # The global batch for the alignment and structure terms (local rows in one process).
        every, every_present, every_views, every_hidden, every_augmented = joint, present, views, hidden, augmented
        group = self.process_group
        if group is not None:
            every = {m: gather_rows(v, group) for m, v in joint.items()}
            every_present = None if present is None else {m: gather_flags(p, group) for m, p in present.items()}
            every_views = None if views is None else tuple(gather_rows(v, group, dim=1) for v in views)
            if self.structure is not None and self.structure.kind == "separation" and hidden:
                every_hidden = {m: gather_rows(v, group) for m, v in hidden.items()}
            if self.structure is not None:
                every_augmented = None if augmented is None else {m: gather_rows(v, group) for m, v in augmented.items()}
        contrastive = self._main(every, every_present, every_views)
        anchor = contrastive.new_zeros(())
        if self.sspc is not None:
            anchor = self.sspc({m: wide(v) for m, v in inputs.items()}, joint)
        structure = contrastive.new_zeros(())
        loss = contrastive + self.cfg.anchor_loss_weight * anchor
        if self.structure is not None:
            structure = self.structure(every, every_hidden or {}, every_augmented)
            loss = loss + self.structure.weight * structure
        return {"loss": loss, "contrastive": contrastive.detach(), "anchor": anchor.detach(), "structure": structure.detach()}
