"""The fusion encoder: one transformer over every modality's tokens, with modality masks (CoMM's model).

    tokens of modality m (B, T_m, D_m) ─ gated projection ─ LayerNorm ─ + modality embedding ─┐
    a learned [CLS] token ─────────────────────────────────────────────────────────────────────┴─▶
    transformer block over [CLS; tokens of the visible modalities] ─ [CLS] output ─ gated
    projection ─▶ embedding (B, E)

Which modalities are visible is a per-sample mask, so one module gives both of CoMM's kinds of
embedding: a modality's own (only its tokens visible) and the multimodal one (every present
modality visible). The [CLS] token is always visible, so a sample with nothing else to attend to
(a missing modality's own embedding) still gets a finite embedding. The modality embedding tells
the block which modality a token came from, as the per-modality encoders of
:class:`mmot.sspc.model.SSPCModel` know by construction.

:meth:`FusionModel.forward` has :class:`~mmot.sspc.model.SSPCModel`'s interface (input-space
features and one joint embedding per modality), so every variant trains and evaluates on it;
:meth:`FusionModel.views` gives the (M+1, B, E) stack that :class:`mmot.nn.CoMMLoss` reads.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmot.sspc.config import INPUT_SPACES, ModelConfig
from mmot.sspc.model import GatedProjection, masked_mean


class FusionModel(nn.Module):
    def __init__(self, dims: dict[str, int], cfg: ModelConfig, input_space: str = "projected") -> None:
        super().__init__()
        if input_space not in INPUT_SPACES:
            raise ValueError(f"loss.input_space: expected one of {INPUT_SPACES}, got {input_space!r}")
        self.modalities = list(dims)
        self.input_space = input_space
        self.input_dims = dict(dims) if input_space == "raw" else {m: cfg.d_model for m in dims}
        self.token_proj = nn.ModuleDict({m: GatedProjection(d, cfg.d_model) for m, d in dims.items()})
        self.norm = nn.ModuleDict({m: nn.LayerNorm(cfg.d_model) for m in dims})
        self.modality_embedding = nn.Parameter(0.02 * torch.randn(len(dims), cfg.d_model))
        self.cls = nn.Parameter(0.02 * torch.randn(cfg.d_model))
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

    def _tokens(self, tokens: dict[str, Tensor], masks: dict[str, Tensor]):
        """The projected tokens of every modality side by side (B, T, d), their validity (B, T),
        the modality of each position (T,), and the input-space features per modality."""
        parts, valid, owner, inputs = [], [], [], {}
        for i, m in enumerate(self.modalities):
            h = self.norm[m](self.token_proj[m](tokens[m]))
            pooled = masked_mean(tokens[m], masks[m]) if self.input_space == "raw" else masked_mean(h, masks[m])
            inputs[m] = pooled if self.input_space == "raw" else nn.functional.normalize(pooled, dim=-1)
            parts.append(h + self.modality_embedding[i])
            valid.append(masks[m])
            owner.append(torch.full((h.shape[1],), i, dtype=torch.long, device=h.device))
        return torch.cat(parts, 1), torch.cat(valid, 1), torch.cat(owner), inputs

    def _fuse(self, h: Tensor, valid: Tensor, owner: Tensor, visible: Tensor) -> tuple[Tensor, Tensor]:
        """(the [CLS] outputs, the embeddings) of each row of ``h`` with only the modalities
        ``visible`` (rows × M bool) attended to."""
        rows = h.shape[0]
        x = torch.cat([self.cls.expand(rows, 1, -1).to(h.dtype), h], 1)
        keep = torch.cat([valid.new_ones(rows, 1), valid & visible[:, owner]], 1)
        hidden = self.block(x, src_key_padding_mask=~keep)[:, 0]
        return hidden, self.joint_proj(hidden)

    def _passes(self, tokens, masks, present: dict[str, Tensor] | None, fused: bool):
        """Each modality alone and, with ``fused``, all present ones, in one batched block call."""
        h, valid, owner, inputs = self._tokens(tokens, masks)
        batch, n_mods = h.shape[0], len(self.modalities)
        together = torch.ones(batch, n_mods, dtype=torch.bool, device=h.device)
        if present is not None:
            together = torch.stack([present[m].to(h.device) for m in self.modalities], 1)
        # A missing modality's own embedding sees only [CLS]: its tokens must not leak in.
        alone = torch.eye(n_mods, dtype=torch.bool, device=h.device).repeat_interleave(batch, 0) & together.repeat(n_mods, 1)
        visible = [alone, together] if fused else [alone]
        copies = len(visible) - 1 + n_mods
        hidden, joint = self._fuse(h.repeat(copies, 1, 1), valid.repeat(copies, 1), owner, torch.cat(visible))
        return inputs, hidden.reshape(copies, batch, -1), joint.reshape(copies, batch, -1)

    def forward(self, tokens: dict[str, Tensor], masks: dict[str, Tensor], hidden: bool = False):
        """(input-space features, each modality's own embedding), keyed by modality; with ``hidden``
        also the [CLS] outputs the joint projection reads (what the separation heads read)."""
        inputs, pooled, joint = self._passes(tokens, masks, None, fused=False)
        joint_by = {m: joint[i] for i, m in enumerate(self.modalities)}
        if not hidden:
            return inputs, joint_by
        return inputs, joint_by, {m: pooled[i] for i, m in enumerate(self.modalities)}

    def views(self, tokens: dict[str, Tensor], masks: dict[str, Tensor], present: dict[str, Tensor] | None = None) -> Tensor:
        """(M+1, B, E): each modality's own embedding, then the fusion of the present modalities."""
        return self._passes(tokens, masks, present, fused=True)[2]
