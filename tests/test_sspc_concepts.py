"""mmot.sspc.concepts: the synthetic test bed is a function of its seed, misaligns the stated share
of training pairs, keeps the unseen super-concepts out of training, and batches by video."""

import pytest
import torch
from mmot.sspc.concepts import concept_splits, super_concept_of
from mmot.sspc.config import ConceptsConfig, DataConfig, config_from_dict
from mmot.sspc.data import make_splits, misalign_pairs

SMALL = {"n_super": 6, "concepts_per_super": 4, "train_super": 4, "latent_dim": 8, "hidden": 16}


def _cfg(**kw) -> ConceptsConfig:
    return ConceptsConfig(**{**SMALL, **kw})


def _pooled(split, m):
    w = split.masks[m].double()[..., None]
    return (split.features[m].double() * w).sum(1) / w.sum(1)


def test_same_seed_same_world_other_seed_another():
    a, b, c = concept_splits(_cfg(seed=5)), concept_splits(_cfg(seed=5)), concept_splits(_cfg(seed=6))
    assert list(a) == ["train", "test", "ood", "ood_shift"]
    for name in a:
        assert torch.equal(a[name].labels, b[name].labels) and torch.equal(a[name].groups, b[name].groups)
        for m in a[name].modalities:
            assert torch.equal(a[name].features[m], b[name].features[m])
            assert torch.equal(a[name].masks[m], b[name].masks[m])
    assert not torch.equal(a["train"].features["video"][:5], c["train"].features["video"][:5])
    # through the config and make_splits too (standardised, so compare the two calls)
    cfg = DataConfig(format="concepts", concepts=_cfg(seed=5), pair_noise=0.3)
    x, y = make_splits(cfg), make_splits(cfg)
    assert all(torch.equal(x[k].features["text"], y[k].features["text"]) for k in x)


def test_unseen_super_concepts_never_in_training():
    cfg = _cfg(seed=1)
    s = concept_splits(cfg)
    sup = {k: set(super_concept_of(cfg, v.labels).tolist()) for k, v in s.items()}
    assert sup["train"] == set(range(4)) and sup["test"] <= sup["train"]
    assert sup["ood"] == sup["ood_shift"] == {4, 5}
    assert set(s["test"].labels.tolist()) == set(s["train"].labels.tolist())  # in domain: the same concepts ...
    train_rows = {tuple(r.flatten().tolist()) for r in s["train"].features["video"]}
    assert not any(tuple(r.flatten().tolist()) in train_rows for r in s["test"].features["video"])  # ... new videos
    # videos of min_clips..max_clips clips in training; one clip per video elsewhere
    per_video = torch.bincount(s["train"].groups)
    assert per_video.min() >= cfg.min_clips and per_video.max() <= cfg.max_clips
    assert len(s["train"]) == int(per_video.sum()) and len(set(s["train"].groups.tolist())) == 16 * cfg.train_videos
    assert len(s["test"]) == 16 * cfg.test_videos and len(s["ood"]) == 8 * cfg.ood_videos
    assert "ood_shift" not in concept_splits(_cfg(seed=1, ood_shift=0.0))


def test_tokens_masks_and_weak_audio():
    cfg = _cfg(seed=2)
    s = concept_splits(cfg)["train"]
    for m in s.modalities:
        lengths = s.masks[m].sum(1)
        assert lengths.min() >= cfg.min_tokens and lengths.max() <= cfg.max_tokens and len(set(lengths.tolist())) > 1
        assert s.features[m].shape[1:] == (cfg.max_tokens, cfg.token_dim[m])
        assert torch.all(s.features[m][~s.masks[m]] == 0)  # padding is zero and masked out

    def concept_share(m):  # the share of the pooled features' variance explained by the concept
        x, lab = _pooled(s, m), s.labels
        means = torch.stack([x[lab == c].mean(0) for c in lab.unique()])
        return float(means[torch.searchsorted(lab.unique(), lab)].var(0).sum() / x.var(0).sum())

    assert concept_share("audio") < 0.5 * min(concept_share("video"), concept_share("text"))


@pytest.mark.parametrize("q", [0.2, 0.4])
def test_pair_noise_rate_and_sources(q):
    cfg = _cfg(seed=3, train_videos=6)
    train = concept_splits(cfg)["train"]
    noisy, source = misalign_pairs(train, q, "text", seed=11)
    moved = source != torch.arange(len(train))
    n = len(train)
    assert abs(moved.double().mean().item() - q) < 4 * (q * (1 - q) / n) ** 0.5  # binomial, 4 sigma
    assert torch.equal(noisy.features["text"], train.features["text"][source])
    assert torch.equal(noisy.features["video"], train.features["video"])  # video and audio stay
    same_video = train.groups[source] == train.groups
    i = torch.nonzero(moved).flatten()
    # a neighbouring clip of the same video about half the time, else a clip of another video
    assert (source[i][same_video[i]] - i[same_video[i]]).abs().eq(1).all()
    share = same_video[i].double().mean().item()
    assert abs(share - 0.5) < 4 * (0.25 / len(i)) ** 0.5
    # measured through make_splits: the share of training rows whose text is not their own
    clean = make_splits(DataConfig(format="concepts", concepts=cfg, standardize=False))["train"]
    dirty = make_splits(DataConfig(format="concepts", concepts=cfg, standardize=False, pair_noise=q))["train"]
    changed = ~(dirty.features["text"] == clean.features["text"]).all(dim=(1, 2))
    assert abs(changed.double().mean().item() - q) < 4 * (q * (1 - q) / n) ** 0.5


def test_batches_take_clips_per_video():
    from mmot.sspc.train import BatchPlan

    base = {"data": {"format": "concepts", "concepts": SMALL, "clips_per_video": 4}, "train": {"batch_size": 32, "seed": 1}}
    cfg = config_from_dict(base)
    train = make_splits(cfg.data)["train"]
    plan = BatchPlan(cfg, train)
    n_videos = len(set(train.groups.tolist()))
    assert plan.size == 32 and plan.steps_per_epoch == n_videos // 8
    seen = []
    for step in range(plan.steps_per_epoch):
        idx = plan.indices(0, step)
        videos = train.groups[idx]
        assert len(idx) == 32 and len(set(idx.tolist())) == 32  # 8 videos x 4 distinct clips
        assert sorted(torch.bincount(videos).tolist(), reverse=True)[:8] == [4] * 8
        seen += videos.unique().tolist()
    assert len(seen) == len(set(seen))  # each video at most once per epoch
    assert torch.equal(plan.indices(2, 1), BatchPlan(cfg, train).indices(2, 1))  # resumable
    assert not torch.equal(plan.indices(0, 0), plan.indices(1, 0))
    flat = BatchPlan(config_from_dict({**base, "data": {**base["data"], "clips_per_video": None}}), train)
    assert flat.steps_per_epoch == len(train) // 32
