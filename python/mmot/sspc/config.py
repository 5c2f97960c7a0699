"""Configuration of an SSPC run: dataclasses, YAML loading and validation.

A config is a YAML mapping with four sections, ``data``, ``model``, ``loss`` and ``train``
(plus an optional ``name``); every key is optional and falls back to the defaults below. Unknown
keys, wrong types and out-of-range values raise :class:`ConfigError` naming the key, before any
data is read or any training starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmot._extras import require

yaml = require("yaml", "sspc", "mmot.sspc")

BASE_VARIANTS = ("contrastive", "sinkhorn", "multi_sk")
STRUCTURE_TERMS = ("gc", "bridge", "separation")
OBJECTIVES = ("pcmc", "pcmr", "comm")
VARIANTS = (*BASE_VARIANTS, *STRUCTURE_TERMS, "c3", *(f"multi_sk+{term}" for term in STRUCTURE_TERMS), *OBJECTIVES)
"""Loss variants: NormSoftmax only; + SSPC anchor terms with single-assignment Sinkhorn targets
(:func:`mmot.sinkhorn`, rows min-max rescaled as Multi-SK's are); + SSPC anchor terms with
Multi-SK targets (:func:`mmot.multi_sinkhorn`). The structure methods add one term to the
contrastive loss (``gc``, ``bridge``, ``separation``) or to SSPC (``multi_sk+gc`` ...):
:func:`mmot.geometric_consistency`, :func:`mmot.brownian_bridge_loss` against an augmented view,
:func:`mmot.feature_separation_loss` against modality-specific heads (:mod:`mmot.sspc.structure`).
``c3`` trains as ``contrastive`` and is evaluated on collapsed embeddings (C3's collapse with the
training split's modality means). The many-modality objectives replace the pairwise
NormSoftmax loss: ``pcmc`` with :func:`mmot.multi_info_nce`, ``pcmr`` with
:func:`mmot.pairwise_similarity_regression` (both over every modality pair, missing modalities
masked), ``comm`` with :class:`mmot.nn.CoMMLoss` on the fusion encoder's embeddings of two
augmented views (``model.encoder``)."""
AUGMENTATIONS = ("jitter", "dropout")
"""The Brownian-bridge term's augmented view: Gaussian jitter of every token (relative to the
token's RMS) or token dropout (each valid token dropped with the strength as probability, one
always kept)."""


def split_variant(variant: str) -> tuple[str, str | None]:
    """(the base variant, its structure term or None): "gc" → ("contrastive", "gc"),
    "multi_sk+gc" → ("multi_sk", "gc"), "c3" → ("contrastive", None)."""
    base, _, term = variant.rpartition("+")
    if not base:
        base, term = (variant, "") if variant not in STRUCTURE_TERMS else ("contrastive", variant)
    if base == "c3":
        base = "contrastive"
    if base in OBJECTIVES:
        return base, None
    return base, term or None


def fusion_encoder(model: ModelConfig, variant: str) -> bool:
    """Whether the run's model is the fusion encoder (``model.encoder``; ``auto``: comm only)."""
    return model.encoder == "fusion" or (model.encoder == "auto" and variant == "comm")


DATA_FORMATS = ("uci", "npz", "pickle", "synthetic", "concepts")
ASSIGNMENT_IMPLS = ("mmot", "official_dense")
INPUT_SPACES = ("projected", "raw")
ENCODERS = ("auto", "separate", "fusion")
DTYPES = ("float32", "float64")
"""``separate``: one transformer per modality (SSPC's model). ``fusion``: one transformer over the
tokens of every modality, with modality masks (CoMM's model): a modality's embedding is the
fusion of its tokens alone, the multimodal embedding that of every present modality's.
``auto``: fusion for the ``comm`` variant, separate otherwise."""
"""What the input-space anchors score: the L2-normalised masked mean of the projected tokens
(after the gated token projection and LayerNorm, with gradient; the SSPC code's default), or the
masked mean of the raw input tokens (no gradient; the SSPC code's ``anchor_raw_feat_sim``)."""


class ConfigError(ValueError):
    """A bad configuration: the message names the key and what was expected."""


@dataclass
class SyntheticConfig:
    """Planted structure: every class has a shared latent (seen by all modalities) and every
    modality a private per-class latent; tokens are noisy random projections of the two."""

    n_classes: int = 10
    per_class: int = 40
    shared_dim: int = 8
    private_dim: int = 4
    n_tokens: dict[str, int] = field(default_factory=lambda: {"video": 6, "text": 4, "audio": 5})
    token_dim: dict[str, int] = field(default_factory=lambda: {"video": 12, "text": 10, "audio": 8})
    noise: float = 0.5
    seed: int = 0


@dataclass
class ConceptsConfig:
    """The ``concepts`` test bed (:mod:`mmot.sspc.concepts`): concepts grouped in super-concepts,
    frozen random MLP encoders per modality, videos of several clips, unseen super-concepts out
    of domain."""

    n_super: int = 20
    concepts_per_super: int = 10
    train_super: int = 12  # super-concepts 0..train_super-1 are seen in training, the rest are OOD
    latent_dim: int = 16
    concept_spread: float = 0.6  # concepts around their super-concept's centre (centres ~ N(0, I))
    video_jitter: float = 0.4
    clip_jitter: float = 0.5
    min_clips: int = 8
    max_clips: int = 12
    train_videos: int = 2  # per seen concept
    test_videos: int = 2  # new videos per seen concept, one clip each
    ood_videos: int = 3  # per unseen concept, one clip each
    min_tokens: int = 4
    max_tokens: int = 8
    token_dim: dict[str, int] = field(default_factory=lambda: {"video": 32, "text": 24, "audio": 16})
    hidden: int = 64
    nuisance_dim: int = 8
    token_noise: float = 0.3
    audio_signal: float = 0.3  # audio's share of the clip latent (video and text: 1)
    ood_shift: float = 1.0  # 0: no ood_shift split
    seed: int = 0


@dataclass
class PickleConfig:
    """Options of the everything_at_once / SSPC feature-pickle reader (see :mod:`mmot.sspc.data`)."""

    key_2d: str = "2d"
    key_3d: str = "3d"
    audio_key: str = "audio"
    text_key: str = "text"
    caption_key: str = "caption"
    word_vectors: str | None = None
    max_words: int = 20
    n_video_tokens: int = 12
    audio_frames_per_token: int = 64
    n_audio_tokens: int = 12
    audio_is_spectrogram: bool = True


@dataclass
class EvalSetConfig:
    """An extra evaluation set (e.g. MSR-VTT or YouCook2 after HowTo100M training); reported under
    its ``name`` and treated as out-of-domain."""

    name: str = ""
    format: str = "pickle"
    path: str = ""
    # Per-set overrides of data.pickle (e.g. YouCook2's '2d_full'/'3d_full' keys, longer clips).
    key_2d: str | None = None
    key_3d: str | None = None
    n_video_tokens: int | None = None
    n_audio_tokens: int | None = None


@dataclass
class DataConfig:
    format: str = "uci"
    path: str | None = None
    modalities: list[str] | None = None
    ood_classes: list[int] = field(default_factory=lambda: [8, 9])
    test_fraction: float = 0.2
    split_seed: int = 0
    standardize: bool = True
    # Probability that a training pair is misaligned: pair_noise_modality (text, the narration in
    # HowTo100M) comes from a neighbouring clip of the same video or, half the time or without
    # videos, from a random other clip (mmot.sspc.data.misalign_pairs).
    pair_noise: float = 0.0
    pair_noise_modality: str = "text"
    # Probability that a training sample misses a modality (drawn once per sample and modality,
    # every sample keeping at least one): the losses see it through their masks
    # (mmot.sspc.data.drop_modalities). Evaluation splits keep every modality.
    modality_dropout: float = 0.0
    # Training batches take this many clips from each of their videos (HowTo100M: 10); null, or
    # data without videos: batches of random samples.
    clips_per_video: int | None = None
    # Labelled data: hold out fold ood_fold of the classes (classes_per_fold each, every class in
    # one fold) instead of ood_classes.
    ood_fold: int | None = None
    classes_per_fold: int = 2
    eval_sets: list[EvalSetConfig] = field(default_factory=list)
    pickle: PickleConfig = field(default_factory=PickleConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    concepts: ConceptsConfig = field(default_factory=ConceptsConfig)


@dataclass
class ModelConfig:
    d_model: int = 64
    embed_dim: int = 64
    n_heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.0  # the SSPC code's transformer has no dropout
    n_anchors: int = 32
    encoder: str = "auto"  # see ENCODERS


@dataclass
class LossConfig:
    variant: str = "multi_sk"
    input_space: str = "projected"
    temperature: float = 0.05
    pair_weights: dict[str, float] = field(default_factory=lambda: {"text-video": 1.0, "text-audio": 0.1, "video-audio": 0.1})
    default_pair_weight: float = 1.0
    anchor_weights: dict[str, float] = field(default_factory=lambda: {"text": 1.0, "video": 1.0, "audio": 0.1})
    default_anchor_weight: float = 1.0
    anchor_temperature: float = 0.1
    anchor_loss_weight: float = 1.0
    # Queue length in training batches (the SSPC code: 5500 rows at batch 2160, about 2.5);
    # queue_size, when set, gives it in rows instead.
    queue_batches: float = 2.5
    queue_size: int | None = None
    mk_k: int | None = None
    mk_eps: float = 0.07
    mk_iters: int = 20
    # Single assignment: the SSPC code has none, so its Multi-SK eps and iterations are used
    # (resnet_tva.yaml sk_params) and the ablation differs only in the assignment (SwAV: 0.05, 3).
    sk_eps: float = 0.07
    sk_iters: int = 20
    assignment_impl: str = "mmot"
    # Structure terms (the gc, bridge and separation variants): their weights and settings.
    gc_weight: float = 1.0
    bridge_weight: float = 0.1
    bridge_t: float = 0.5
    bridge_sigma: float = 0.5
    bridge_augment: str = "jitter"
    bridge_strength: float = 0.3
    separation_weight: float = 1.0
    separation_dim: int = 16
    # The many-modality objectives; pcmc uses `temperature` and the pair weights, as does pcmr.
    pcmr_match_target: float = 1.0
    pcmr_nonmatch_target: float = 0.0
    pcmr_margin: float | None = None
    comm_temperature: float = 0.1  # CoMM's
    comm_augment: str = "dropout"  # how the two views of each sample differ: one of AUGMENTATIONS
    comm_strength: float = 0.3

    @property
    def base_variant(self) -> str:
        return split_variant(self.variant)[0]

    @property
    def structure(self) -> str | None:
        return split_variant(self.variant)[1]

    @property
    def uses_anchors(self) -> bool:
        """Whether the variant trains SSPC's anchor terms."""
        return self.base_variant in ("sinkhorn", "multi_sk")

    def pair_weight(self, a: str, b: str) -> float:
        """The contrastive weight of the modality pair {a, b} (either key order), else the default."""
        for key in (f"{a}-{b}", f"{b}-{a}"):
            if key in self.pair_weights:
                return float(self.pair_weights[key])
        return float(self.default_pair_weight)

    def queue_rows(self, batch: int) -> int:
        """The queue length in rows for a training batch of ``batch`` rows."""
        if self.queue_size is not None:
            return self.queue_size
        return max(1, round(self.queue_batches * batch))


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 5e-5
    lr_gamma: float = 0.9
    weight_decay: float = 0.0
    grad_clip: float | None = None  # the SSPC code does not clip
    amp: bool | None = None
    # The parameters', queues' and losses' dtype: float32, or float64 (no AMP) for exact
    # comparisons, e.g. of a multi-process run with a single-process one.
    dtype: str = "float32"
    ema_decay: float | None = None
    # Evaluate the EMA weights instead of the trained ones (the SSPC code keeps an EMA but evaluates the raw model).
    eval_ema: bool = False
    seed: int = 0
    device: str = "auto"
    num_threads: int | None = None
    checkpoint_every: int = 0
    log_every: int = 10
    eval_every: int = 1
    max_steps: int | None = None
    out_dir: str = "runs/sspc"
    progress: bool = True


@dataclass
class Config:
    name: str = "sspc"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **sections: dict[str, Any]) -> Config:
        """A copy with some keys overridden: ``cfg.replace(train={"seed": 3})``."""
        merged = self.to_dict()
        for section, values in sections.items():
            if section not in merged:
                raise ConfigError(f"unknown config section '{section}'")
            if isinstance(merged[section], dict):
                merged[section] = _deep_merge(merged[section], values)
            else:
                merged[section] = values
        return config_from_dict(merged)


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if (
            isinstance(value, dict)
            and isinstance(out.get(key), dict)
            and not key.endswith("weights")
            and key not in ("n_tokens", "token_dim")
        ):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with typed errors


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: must not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(item, args[0], f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return {_coerce(k, args[0], f"{where} key"): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if value is None:
        raise ConfigError(f"{where}: must not be null (expected {_type_name(tp)})")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML reads 5e-5 (no dot) as a string; accept numeric strings.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        value = float(value)
        # YAML's .inf / .nan would pass range checks written as comparisons and fail mid-run.
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")  # pragma: no cover


def _build(cls, values: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"{where}.{key}: unknown key (known keys of '{where}': {', '.join(names)})".lstrip("."))
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}".lstrip("."))
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a plain mapping (e.g. parsed YAML)."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(values).__name__}")
    cfg = _build(Config, values, "")
    validate(cfg)
    return cfg


def load_config(path: str | os.PathLike) -> Config:
    """Read a YAML config. ``path`` may also name a shipped config, e.g. ``"uci_quick"``."""
    resolved = resolve_config_path(path)
    try:
        with open(resolved, encoding="utf-8") as fh:
            values = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{resolved}: not valid YAML: {exc}") from None
    try:
        cfg = config_from_dict(values)
    except ConfigError as exc:
        raise ConfigError(f"{resolved}: {exc}") from None
    # Relative data paths: the working directory first, then the config file's directory.
    base = Path(resolved).parent

    def rebase(p: str | None) -> str | None:
        if p and not os.path.isabs(p) and not os.path.exists(p) and (base / p).exists():
            return str(base / p)
        return p

    cfg.data.path = rebase(cfg.data.path)
    cfg.data.pickle.word_vectors = rebase(cfg.data.pickle.word_vectors)
    for es in cfg.data.eval_sets:
        es.path = rebase(es.path)
    return cfg


SHIPPED_DIR = Path(__file__).parent / "configs"


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml"))


def resolve_config_path(path: str | os.PathLike) -> Path:
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    shipped = SHIPPED_DIR / f"{Path(path).stem}.yaml"
    if not candidate.suffix and shipped.is_file():
        return shipped
    raise ConfigError(f"config file '{path}' not found (shipped configs: {', '.join(shipped_configs())})")


# ---------------------------------------------------------------------------------------------
# Semantic validation


def _check(cond: bool, key: str, expected: str, value) -> None:
    if not cond:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def validate(cfg: Config) -> None:
    d, m, loss, t = cfg.data, cfg.model, cfg.loss, cfg.train
    _check(d.format in DATA_FORMATS, "data.format", f"one of {DATA_FORMATS}", d.format)
    if d.format in ("npz", "pickle"):
        _check(bool(d.path), "data.path", f"a file path for format '{d.format}'", d.path)
    _check(0.0 < d.test_fraction < 1.0, "data.test_fraction", "a number in (0, 1)", d.test_fraction)
    _check(all(c >= 0 for c in d.ood_classes), "data.ood_classes", "non-negative class ids", d.ood_classes)
    if d.modalities is not None:
        _check(len(d.modalities) >= 2, "data.modalities", "at least two modality names", d.modalities)
        _check(len(set(d.modalities)) == len(d.modalities), "data.modalities", "distinct names", d.modalities)
    for i, es in enumerate(d.eval_sets):
        _check(bool(es.name), f"data.eval_sets[{i}].name", "a non-empty name", es.name)
        _check(es.format in ("pickle", "npz"), f"data.eval_sets[{i}].format", "'pickle' or 'npz'", es.format)
        _check(bool(es.path), f"data.eval_sets[{i}].path", "a file path", es.path)
    s = d.synthetic
    _check(s.n_classes >= 2, "data.synthetic.n_classes", "an integer >= 2", s.n_classes)
    _check(s.per_class >= 2, "data.synthetic.per_class", "an integer >= 2", s.per_class)
    _check(
        set(s.n_tokens) == set(s.token_dim) and len(s.n_tokens) >= 2,
        "data.synthetic.n_tokens",
        "the same >= 2 modality names as data.synthetic.token_dim",
        s.n_tokens,
    )
    _check(s.noise >= 0, "data.synthetic.noise", "a number >= 0", s.noise)
    _check(0.0 <= d.pair_noise < 1.0, "data.pair_noise", "a probability in [0, 1)", d.pair_noise)
    _check(0.0 <= d.modality_dropout < 1.0, "data.modality_dropout", "a probability in [0, 1)", d.modality_dropout)
    if d.clips_per_video is not None:
        _check(d.clips_per_video >= 1, "data.clips_per_video", "an integer >= 1 or null", d.clips_per_video)
    if d.ood_fold is not None:
        _check(d.ood_fold >= 0, "data.ood_fold", "a fold index >= 0 or null", d.ood_fold)
    _check(d.classes_per_fold >= 1, "data.classes_per_fold", "an integer >= 1", d.classes_per_fold)
    c = d.concepts
    for key in ("n_super", "concepts_per_super", "latent_dim", "hidden", "nuisance_dim", "min_clips", "min_tokens"):
        _check(getattr(c, key) >= 1, f"data.concepts.{key}", "an integer >= 1", getattr(c, key))
    for key in ("train_videos", "test_videos", "ood_videos"):
        _check(getattr(c, key) >= 1, f"data.concepts.{key}", "an integer >= 1", getattr(c, key))
    _check(1 <= c.train_super < c.n_super, "data.concepts.train_super", f"an integer in 1..{c.n_super - 1}", c.train_super)
    _check(c.max_clips >= c.min_clips, "data.concepts.max_clips", f"an integer >= min_clips ({c.min_clips})", c.max_clips)
    _check(c.max_tokens >= c.min_tokens, "data.concepts.max_tokens", f"an integer >= min_tokens ({c.min_tokens})", c.max_tokens)
    _check(set(c.token_dim) == {"video", "text", "audio"}, "data.concepts.token_dim", "sizes for video, text and audio", c.token_dim)
    _check(all(v >= 1 for v in c.token_dim.values()), "data.concepts.token_dim", "sizes >= 1", c.token_dim)
    for key in ("concept_spread", "video_jitter", "clip_jitter", "token_noise", "audio_signal", "ood_shift"):
        _check(getattr(c, key) >= 0, f"data.concepts.{key}", "a number >= 0", getattr(c, key))
    p = d.pickle
    for key in ("max_words", "n_video_tokens", "audio_frames_per_token", "n_audio_tokens"):
        _check(getattr(p, key) >= 1, f"data.pickle.{key}", "an integer >= 1", getattr(p, key))

    for key in ("d_model", "embed_dim", "n_heads", "n_anchors"):
        _check(getattr(m, key) >= 1, f"model.{key}", "an integer >= 1", getattr(m, key))
    _check(m.d_model % m.n_heads == 0, "model.n_heads", f"a divisor of model.d_model ({m.d_model})", m.n_heads)
    _check(m.mlp_ratio > 0, "model.mlp_ratio", "a number > 0", m.mlp_ratio)
    _check(0.0 <= m.dropout < 1.0, "model.dropout", "a number in [0, 1)", m.dropout)
    _check(m.encoder in ENCODERS, "model.encoder", f"one of {ENCODERS}", m.encoder)
    if cfg.loss.variant == "comm":
        _check(m.encoder != "separate", "model.encoder", "'auto' or 'fusion' for the comm variant (CoMM fuses the modalities)", m.encoder)

    _check(loss.variant in VARIANTS, "loss.variant", f"one of {VARIANTS}", loss.variant)
    _check(loss.input_space in INPUT_SPACES, "loss.input_space", f"one of {INPUT_SPACES}", loss.input_space)
    _check(loss.assignment_impl in ASSIGNMENT_IMPLS, "loss.assignment_impl", f"one of {ASSIGNMENT_IMPLS}", loss.assignment_impl)
    for key in ("temperature", "anchor_temperature", "mk_eps", "sk_eps"):
        _check(getattr(loss, key) > 0, f"loss.{key}", "a number > 0", getattr(loss, key))
    for key in ("mk_iters", "sk_iters"):
        _check(getattr(loss, key) >= 1, f"loss.{key}", "an integer >= 1", getattr(loss, key))
    _check(loss.queue_batches > 0, "loss.queue_batches", "a number > 0", loss.queue_batches)
    if loss.queue_size is not None:
        _check(loss.queue_size >= 1, "loss.queue_size", "an integer >= 1 or null (null: loss.queue_batches)", loss.queue_size)
    _check(loss.anchor_loss_weight >= 0, "loss.anchor_loss_weight", "a number >= 0", loss.anchor_loss_weight)
    for key in ("gc_weight", "bridge_weight", "separation_weight"):
        _check(getattr(loss, key) >= 0, f"loss.{key}", "a number >= 0", getattr(loss, key))
    _check(0.0 < loss.bridge_t < 1.0, "loss.bridge_t", "a number in (0, 1) (the bridge has variance 0 at its ends)", loss.bridge_t)
    _check(loss.bridge_sigma > 0, "loss.bridge_sigma", "a number > 0", loss.bridge_sigma)
    _check(loss.bridge_augment in AUGMENTATIONS, "loss.bridge_augment", f"one of {AUGMENTATIONS}", loss.bridge_augment)
    _check(0.0 < loss.bridge_strength < 1.0, "loss.bridge_strength", "a number in (0, 1)", loss.bridge_strength)
    _check(loss.separation_dim >= 1, "loss.separation_dim", "an integer >= 1", loss.separation_dim)
    if loss.pcmr_margin is not None:
        _check(loss.pcmr_margin >= 0, "loss.pcmr_margin", "a number >= 0 or null", loss.pcmr_margin)
    _check(loss.comm_temperature > 0, "loss.comm_temperature", "a number > 0", loss.comm_temperature)
    _check(loss.comm_augment in AUGMENTATIONS, "loss.comm_augment", f"one of {AUGMENTATIONS}", loss.comm_augment)
    _check(0.0 < loss.comm_strength < 1.0, "loss.comm_strength", "a number in (0, 1)", loss.comm_strength)

    if loss.mk_k is not None:
        _check(1 <= loss.mk_k <= m.n_anchors, "loss.mk_k", f"an integer in 1..model.n_anchors ({m.n_anchors}) or null", loss.mk_k)
    for key, weight in loss.pair_weights.items():
        _check(len(key.split("-")) == 2, f"loss.pair_weights.{key}", "a key of the form 'a-b' naming two modalities", key)
        _check(weight >= 0, f"loss.pair_weights.{key}", "a weight >= 0", weight)
    for key, weight in loss.anchor_weights.items():
        _check(weight >= 0, f"loss.anchor_weights.{key}", "a weight >= 0", weight)

    _check(t.epochs >= 1, "train.epochs", "an integer >= 1", t.epochs)
    _check(t.batch_size >= 2, "train.batch_size", "an integer >= 2", t.batch_size)
    _check(t.lr > 0, "train.lr", "a number > 0", t.lr)
    _check(0 < t.lr_gamma <= 1, "train.lr_gamma", "a number in (0, 1]", t.lr_gamma)
    _check(t.weight_decay >= 0, "train.weight_decay", "a number >= 0", t.weight_decay)
    if t.grad_clip is not None:
        _check(t.grad_clip > 0, "train.grad_clip", "a number > 0 or null", t.grad_clip)
    if t.ema_decay is not None:
        _check(0 < t.ema_decay < 1, "train.ema_decay", "a number in (0, 1) or null", t.ema_decay)
    _check(t.dtype in DTYPES, "train.dtype", f"one of {DTYPES}", t.dtype)
    _check(not (t.amp and t.dtype == "float64"), "train.amp", "false or null with train.dtype float64 (AMP computes in float16)", t.amp)
    no_ema = "false when train.ema_decay is null (no EMA to evaluate)"
    _check(not t.eval_ema or t.ema_decay is not None, "train.eval_ema", no_ema, t.eval_ema)
    _check(t.device in ("auto", "cpu") or t.device.startswith("cuda"), "train.device", "'auto', 'cpu' or 'cuda[:i]'", t.device)
    if t.num_threads is not None:
        _check(t.num_threads >= 1, "train.num_threads", "an integer >= 1 or null", t.num_threads)
    _check(t.checkpoint_every >= 0, "train.checkpoint_every", "an integer >= 0 (0: every epoch)", t.checkpoint_every)
    _check(t.log_every >= 1, "train.log_every", "an integer >= 1", t.log_every)
    _check(t.eval_every >= 0, "train.eval_every", "an integer >= 0 (epochs; 0: only at the end)", t.eval_every)
    if t.max_steps is not None:
        _check(t.max_steps >= 1, "train.max_steps", "an integer >= 1 or null", t.max_steps)
