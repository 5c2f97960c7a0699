"""The ``concepts`` test bed: synthetic multi-modal clips built so that SSPC's claim can show.

Everything is drawn from ``data.concepts.seed``; nothing is downloaded.

World. ``n_super`` super-concepts with centres s_g ~ N(0, I_d); each holds ``concepts_per_super``
concepts c = s_g + concept_spread·N(0, I_d). A video of concept c has a latent
v = c + video_jitter·N(0, I_d) and ``min_clips``..``max_clips`` clips; clip t's latent is
z_t = v + clip_jitter·e_t with e_t an AR(1) walk along the video (ρ = 0.7, unit variance), so
neighbouring clips are alike.

Modalities. Each of video, text and audio is a frozen random two-layer MLP, the stand-in for a
pretrained encoder. A clip gives each modality a sequence of ``min_tokens``..``max_tokens``
tokens (the rest padding, masked out); token j is

    MLP_m([signal_m · (z_t + token_noise·ε_j) ; nuisance_m + token_noise·ε'_j])

with nuisance_m ~ N(0, I) drawn per clip and modality: structure that modality alone sees and
that carries nothing about the concept. ``signal`` is 1 for video and text and
``audio_signal`` (0.3 by default) for audio: audio is weakly informative.

Splits. The first ``train_super`` super-concepts (12 of 20) are seen in training:

- ``train``: ``train_videos`` videos per seen concept, every clip, with ``groups`` (the video of
  each clip, clips in order) so that a batch can take ``data.clips_per_video`` clips from each of
  its videos as HowTo100M training does; pair noise (``data.pair_noise``) is applied to it later
  by :func:`mmot.sspc.data.misalign_pairs`;
- ``test`` (in domain): ``test_videos`` new videos per seen concept, one random clip each;
- ``ood``: ``ood_videos`` videos per concept of the unseen super-concepts, one clip each;
- ``ood_shift`` (when ``ood_shift`` > 0): as ``ood`` but with shifted jitter: the clip jitter
  is scaled by (1 + ood_shift) and moved by ood_shift·clip_jitter·δ for one fixed δ ~ N(0, I_d).

Labels are concept ids, so the class-level metrics count same-concept hits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmot.sspc.config import ConceptsConfig

MODALITIES = ("video", "text", "audio")
AR_RHO = 0.7  # correlation of neighbouring clips' jitter


class _World:
    """The seeded latent structure and the frozen per-modality encoders."""

    def __init__(self, cfg: ConceptsConfig) -> None:
        self.cfg = cfg
        self.g = torch.Generator().manual_seed(cfg.seed)
        d = cfg.latent_dim
        supers = torch.randn(cfg.n_super, d, generator=self.g)
        self.super_of = torch.arange(cfg.n_super).repeat_interleave(cfg.concepts_per_super)
        self.concepts = supers[self.super_of] + cfg.concept_spread * torch.randn(len(self.super_of), d, generator=self.g)
        self.shift = torch.randn(d, generator=self.g)
        self.encoders = {}
        for m in MODALITIES:
            d_in = d + cfg.nuisance_dim
            w1 = torch.randn(d_in, cfg.hidden, generator=self.g) / d_in**0.5
            b1 = 0.1 * torch.randn(cfg.hidden, generator=self.g)
            w2 = torch.randn(cfg.hidden, cfg.token_dim[m], generator=self.g) / cfg.hidden**0.5
            self.encoders[m] = (w1, b1, w2)

    def signal(self, m: str) -> float:
        return self.cfg.audio_signal if m == "audio" else 1.0

    def clip_latents(self, concept_ids: Tensor, n_clips: Tensor, shift: float = 0.0) -> tuple[Tensor, Tensor]:
        """Latents of every clip of one video per entry of ``concept_ids``; (clips, d) and each clip's video."""
        cfg, d = self.cfg, self.cfg.latent_dim
        videos = self.concepts[concept_ids] + cfg.video_jitter * torch.randn(len(concept_ids), d, generator=self.g)
        e = torch.randn(len(concept_ids), cfg.max_clips, d, generator=self.g)
        for t in range(1, cfg.max_clips):
            e[:, t] = AR_RHO * e[:, t - 1] + (1 - AR_RHO**2) ** 0.5 * e[:, t]
        latents = videos[:, None, :] + cfg.clip_jitter * ((1 + shift) * e + shift * self.shift)
        keep = torch.arange(cfg.max_clips)[None, :] < n_clips[:, None]
        groups = torch.arange(len(concept_ids)).repeat_interleave(n_clips)
        return latents[keep], groups

    def tokens(self, m: str, latents: Tensor) -> tuple[Tensor, Tensor]:
        """Modality ``m``'s (N, max_tokens, D) tokens and (N, max_tokens) mask for clip latents (N, d)."""
        cfg = self.cfg
        n, t_max = latents.shape[0], cfg.max_tokens
        lengths = torch.randint(cfg.min_tokens, t_max + 1, (n,), generator=self.g)
        mask = torch.arange(t_max)[None, :] < lengths[:, None]
        nuisance = torch.randn(n, 1, cfg.nuisance_dim, generator=self.g)
        z = latents[:, None, :] + cfg.token_noise * torch.randn(n, t_max, cfg.latent_dim, generator=self.g)
        u = nuisance + cfg.token_noise * torch.randn(n, t_max, cfg.nuisance_dim, generator=self.g)
        w1, b1, w2 = self.encoders[m]
        x = torch.tanh(torch.cat([self.signal(m) * z, u], dim=-1) @ w1 + b1) @ w2
        return x * mask[..., None], mask


def _one_clip_each(world: _World, n_clips: Tensor) -> Tensor:
    """Index of one random clip of every video."""
    starts = torch.cumsum(n_clips, 0) - n_clips
    picks = (torch.rand(len(n_clips), generator=world.g) * n_clips).long()
    return starts + picks


def concept_splits(cfg: ConceptsConfig):
    """``{"train", "test", "ood"[, "ood_shift"]}`` as :class:`mmot.sspc.data.MultiModalData`."""
    from mmot.sspc.data import MultiModalData

    world = _World(cfg)
    seen = torch.nonzero(world.super_of < cfg.train_super).flatten()
    unseen = torch.nonzero(world.super_of >= cfg.train_super).flatten()
    plan = [("train", seen, cfg.train_videos, 0.0, False), ("test", seen, cfg.test_videos, 0.0, True)]
    plan.append(("ood", unseen, cfg.ood_videos, 0.0, True))
    if cfg.ood_shift > 0:
        plan.append(("ood_shift", unseen, cfg.ood_videos, cfg.ood_shift, True))
    splits = {}
    for name, concepts, per_concept, shift, one_clip in plan:
        concept_ids = concepts.repeat_interleave(per_concept)
        n_clips = torch.randint(cfg.min_clips, cfg.max_clips + 1, (len(concept_ids),), generator=world.g)
        latents, groups = world.clip_latents(concept_ids, n_clips, shift)
        labels = concept_ids[groups]
        if one_clip:
            keep = _one_clip_each(world, n_clips)
            latents, groups, labels = latents[keep], groups[keep], labels[keep]
        features, masks = {}, {}
        for m in MODALITIES:
            features[m], masks[m] = world.tokens(m, latents)
        splits[name] = MultiModalData(features, masks, labels, name, groups=groups)
    return splits


def super_concept_of(cfg: ConceptsConfig, concept_ids: Tensor) -> Tensor:
    """The super-concept of each concept id."""
    return torch.div(concept_ids, cfg.concepts_per_super, rounding_mode="floor")
