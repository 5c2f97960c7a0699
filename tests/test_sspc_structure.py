"""mmot.sspc's structure variants: geometric consistency, Brownian bridge and feature separation
on top of the contrastive loss or SSPC, C3's collapse at evaluation, and the structure metrics."""

import json

import mmot
import pytest
import torch
from mmot.sspc.config import VARIANTS, ConfigError, load_config, split_variant
from mmot.sspc.structure import augment_tokens


def _tiny(tmp_path, variant, **train):
    return load_config("synthetic_tiny").replace(loss={"variant": variant}, train={"out_dir": str(tmp_path / variant), **train})


def test_variant_names():
    assert split_variant("contrastive") == ("contrastive", None)
    assert split_variant("multi_sk") == ("multi_sk", None)
    assert split_variant("gc") == ("contrastive", "gc")
    assert split_variant("multi_sk+bridge") == ("multi_sk", "bridge")
    assert split_variant("c3") == ("contrastive", None)
    assert {split_variant(v)[1] for v in VARIANTS} == {None, "gc", "bridge", "separation"}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("variant", "gc+multi_sk"),
        ("bridge_t", 1.0),
        ("bridge_t", 0.0),
        ("bridge_sigma", 0.0),
        ("bridge_augment", "mixup"),
        ("bridge_strength", 1.0),
        ("gc_weight", -1.0),
        ("separation_dim", 0),
    ],
)
def test_bad_structure_settings_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"loss.{key}"):
        load_config("synthetic_tiny").replace(loss={key: value})


def test_jitter_and_dropout_views():
    torch.manual_seed(0)
    tokens = torch.randn(50, 6, 4) * 3.0
    mask = torch.arange(6)[None, :] < torch.randint(1, 7, (50, 1))
    jittered, same = augment_tokens(tokens, mask, "jitter", 0.3)
    assert torch.equal(same, mask)
    noise = (jittered - tokens).pow(2).mean(-1).sqrt() / tokens.pow(2).mean(-1).sqrt()
    assert 0.15 < float(noise.mean()) < 0.45  # about strength × the token's RMS
    kept_tokens, kept = augment_tokens(tokens, mask, "dropout", 0.5)
    assert torch.equal(kept_tokens, tokens)
    assert not bool((kept & ~mask).any())  # only valid tokens are kept
    assert bool(kept.any(-1).all())  # every sequence keeps one
    dropped = (mask & ~kept).sum() / mask.sum()
    assert 0.3 < float(dropped) < 0.6
    one = mask.clone()
    one[:, 1:] = False
    assert torch.equal(augment_tokens(tokens, one, "dropout", 0.9)[1], one)  # a single token stays


@pytest.mark.parametrize("variant", ["gc", "bridge", "separation", "multi_sk+gc"])
def test_structure_variant_trains(tmp_path, variant):
    from mmot.sspc.train import train

    cfg = _tiny(tmp_path, variant, epochs=2)
    results = train(cfg)
    steps = [json.loads(line) for line in (tmp_path / variant / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["type"] == "train"]
    assert all(r["structure"] > 0 and torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    weight = {"gc": cfg.loss.gc_weight, "bridge": cfg.loss.bridge_weight, "separation": cfg.loss.separation_weight}[cfg.loss.structure]
    for r in steps:  # the logged parts add up to the loss
        want = r["contrastive"] + cfg.loss.anchor_loss_weight * r["anchor"] + weight * r["structure"]
        assert r["loss"] == pytest.approx(want, rel=1e-5)
    assert (steps[-1]["anchor"] > 0) == variant.startswith("multi_sk")
    assert 0 <= results["test"]["mean"]["R@1"] <= 100 and results["test"]["mean"]["gap"] >= 0


def test_structure_terms_are_the_ops(tmp_path):
    """Each term is its op over the weighted pairs (weights normalised to sum 1)."""
    from mmot.sspc.structure import StructureTerm

    pairs = {("text", "video"): 1.0, ("text", "audio"): 0.1, ("video", "audio"): 0.1}
    gen = torch.Generator().manual_seed(3)
    joint = {m: torch.randn(12, 16, generator=gen) for m in ("text", "video", "audio")}
    views = {m: v + 0.2 * torch.randn(12, 16, generator=gen) for m, v in joint.items()}
    hidden = {m: torch.randn(12, 16, generator=gen) for m in joint}
    for kind in ("gc", "bridge", "separation"):
        cfg = load_config("synthetic_tiny").replace(loss={"variant": kind}).loss
        term = StructureTerm(cfg, pairs, 16)
        got = term(joint, hidden, views)
        if kind == "gc":
            want = sum(w * mmot.geometric_consistency(joint[a], joint[b]) for (a, b), w in pairs.items()) / 1.2
        elif kind == "bridge":
            t, s = cfg.bridge_t, cfg.bridge_sigma
            want = (
                sum(
                    w
                    * 0.5
                    * (
                        mmot.brownian_bridge_loss(joint[a], joint[b], views[a], t, sigma=s)
                        + mmot.brownian_bridge_loss(joint[b], joint[a], views[b], t, sigma=s)
                    )
                    for (a, b), w in pairs.items()
                )
                / 1.2
            )
        else:
            want = sum(mmot.feature_separation_loss(joint[m], term.heads[m](hidden[m])) for m in term.heads) / 3
        torch.testing.assert_close(got, want)


def test_bridge_variant_resumes_exactly(tmp_path):
    """The bridge term draws its augmentations from the global generator, saved in checkpoints:
    a run stopped and resumed ends with the weights of an uninterrupted one."""
    from mmot.sspc.train import train

    whole = _tiny(tmp_path, "bridge", epochs=4, max_steps=12)
    train(whole)
    part = whole.replace(train={"out_dir": str(tmp_path / "part"), "max_steps": 6})
    train(part)
    train(part.replace(train={"max_steps": 12}), resume=True)
    a = torch.load(tmp_path / "bridge" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 12
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())


def test_c3_collapses_at_evaluation(tmp_path):
    """c3 trains exactly as contrastive (the same weights) and is evaluated on embeddings collapsed
    with the training split's modality means: the modality gap falls."""
    from mmot.sspc.train import train

    plain = train(_tiny(tmp_path, "contrastive", epochs=2))
    c3 = train(_tiny(tmp_path, "c3", epochs=2))
    a = torch.load(tmp_path / "contrastive" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "c3" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    # In domain the training means fit: the gap falls to a fraction; out of domain less so.
    assert c3["test"]["mean"]["gap"] < 0.5 * plain["test"]["mean"]["gap"]
    assert c3["ood"]["mean"]["gap"] < plain["ood"]["mean"]["gap"]
    assert "ucR@1" in c3["test"]["mean"] and "ucR@1" not in c3["ood"]["mean"]  # ood classes are not in training


def test_unimodal_recall_by_hand():
    from mmot.sspc.config import LossConfig
    from mmot.sspc.evaluate import unimodal_recall

    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    gallery_labels = torch.tensor([0, 1])
    queries = {"text": gallery, "video": torch.tensor([[0.9, 0.1], [0.8, 0.3], [0.1, 0.9]])}
    labels = torch.tensor([0, 1, 1])  # the second video query is nearer class 0's text: a miss
    got = unimodal_recall(queries, labels, gallery, gallery_labels, "text", LossConfig())
    assert got == pytest.approx(200 / 3)
