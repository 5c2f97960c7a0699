"""mmot.sspc's many-modality variants (PCMC, PCMR, CoMM), the fusion encoder and modality dropout."""

import json
from pathlib import Path

import mmot
import pytest
import torch
from mmot.sspc.config import ConfigError, fusion_encoder, load_config
from mmot.sspc.data import drop_modalities, make_splits
from mmot.sspc.fusion import FusionModel
from mmot.sspc.model import SSPCModel, SSPCObjective
from mmot.sspc.train import make_model, train


def _tiny(tmp_path, variant, **sections):
    sections.setdefault("train", {})
    sections["train"] = {"out_dir": str(tmp_path / variant), "progress": False, **sections["train"]}
    return load_config("synthetic_tiny").replace(loss={"variant": variant, **sections.pop("loss", {})}, **sections)


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("data", "modality_dropout", 1.0),
        ("data", "modality_dropout", -0.1),
        ("model", "encoder", "shared"),
        ("loss", "pcmr_margin", -0.1),
        ("loss", "comm_temperature", 0.0),
        ("loss", "comm_augment", "crop"),
        ("loss", "comm_strength", 1.0),
    ],
)
def test_bad_settings_name_the_key(section, key, value):
    with pytest.raises(ConfigError, match=f"{section}.{key}"):
        load_config("synthetic_tiny").replace(**{section: {key: value}})


def test_comm_refuses_separate_encoders():
    with pytest.raises(ConfigError, match="model.encoder"):
        load_config("synthetic_tiny").replace(loss={"variant": "comm"}, model={"encoder": "separate"})


def test_the_encoder_is_chosen_by_config():
    cfg = load_config("synthetic_tiny")
    assert not fusion_encoder(cfg.model, "pcmc")
    assert isinstance(make_model(cfg, {"a": 3, "b": 4}), SSPCModel)
    fused = cfg.replace(model={"encoder": "fusion"})
    assert fusion_encoder(fused.model, "pcmc") and isinstance(make_model(fused, {"a": 3, "b": 4}), FusionModel)
    comm = cfg.replace(loss={"variant": "comm"})
    assert fusion_encoder(comm.model, "comm") and isinstance(make_model(comm, {"a": 3, "b": 4}), FusionModel)


def test_drop_modalities_keeps_one_per_sample_and_is_seeded():
    splits = make_splits(load_config("synthetic_tiny").data)
    train_split = splits["train"]
    dropped = drop_modalities(train_split, 0.6, seed=3)
    flags = torch.stack([dropped.present[m] for m in dropped.modalities])
    assert bool(flags.any(0).all())  # every sample keeps a modality
    missing = 1 - flags.float().mean()
    assert 0.4 < float(missing) < 0.65  # about the rate (less: the kept ones)
    again = drop_modalities(train_split, 0.6, seed=3)
    assert all(torch.equal(again.present[m], dropped.present[m]) for m in dropped.modalities)
    assert all(torch.equal(dropped.features[m], train_split.features[m]) for m in dropped.modalities)  # only flags change
    idx = torch.tensor([4, 0, 7])
    assert all(torch.equal(dropped.present_in(idx)[m], dropped.present[m][idx]) for m in dropped.modalities)
    assert train_split.present_in(idx) is None


def test_make_splits_drops_in_training_only():
    cfg = load_config("synthetic_tiny").replace(data={"modality_dropout": 0.3})
    splits = make_splits(cfg.data)
    assert splits["train"].present is not None
    assert all(split.present is None for name, split in splits.items() if name != "train")


def _batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    dims, lengths = {"video": 5, "text": 3, "audio": 4}, {"video": 4, "text": 3, "audio": 2}
    tokens = {m: torch.randn(n, lengths[m], d, generator=g) for m, d in dims.items()}
    masks = {m: torch.ones(n, lengths[m], dtype=torch.bool) for m in dims}
    masks["video"][0, 2:] = False
    return dims, tokens, masks


def test_fusion_encoder_keeps_modalities_apart_where_asked():
    torch.manual_seed(0)
    dims, tokens, masks = _batch()
    model = FusionModel(dims, load_config("synthetic_tiny").model).eval()
    present = {m: torch.ones(6, dtype=torch.bool) for m in dims}
    present["audio"][[1, 4]] = False
    views = model.views(tokens, masks, present)
    assert views.shape == (4, 6, model.joint_proj.fc.out_features) and bool(views.isfinite().all())
    _, own = model(tokens, masks)
    assert torch.allclose(views[0], own["video"], atol=1e-6)
    # A modality's own embedding ignores the others' tokens; the fused one ignores a missing modality's.
    changed = dict(tokens, audio=tokens["audio"] + 5.0)
    again = model.views(changed, masks, present)
    assert torch.allclose(again[0], views[0], atol=1e-6) and torch.allclose(again[1], views[1], atol=1e-6)
    assert torch.allclose(again[3, [1, 4]], views[3, [1, 4]], atol=1e-6)  # audio missing there
    assert torch.allclose(again[2, [1, 4]], views[2, [1, 4]], atol=1e-6)  # its own embedding: [CLS] only
    assert not torch.allclose(again[3, 0], views[3, 0], atol=1e-3)  # present elsewhere: it counts


@pytest.mark.parametrize("variant", ["pcmc", "pcmr", "contrastive"])
def test_missing_rows_leave_the_loss(variant):
    """A missing modality's embedding of a sample has no effect on the alignment loss."""
    torch.manual_seed(0)
    cfg = load_config("synthetic_tiny").replace(loss={"variant": variant})
    mods = ["video", "text", "audio"]
    objective = SSPCObjective({m: 4 for m in mods}, 8, 4, cfg.loss, 16, 8)
    joint = {m: torch.randn(10, 8) for m in mods}
    present = {m: torch.ones(10, dtype=torch.bool) for m in mods}
    present["text"][3] = False
    loss = objective({}, joint, present=present)["loss"]
    moved = dict(joint, text=joint["text"].clone())
    moved["text"][3] = torch.randn(8) * 4
    assert torch.allclose(objective({}, moved, present=present)["loss"], loss, atol=1e-6)
    assert not torch.allclose(objective({}, moved)["loss"], objective({}, joint)["loss"], atol=1e-4)


FUSION = {"encoder": "fusion"}


def test_pcmr_and_comm_are_the_ops():
    """The objective's alignment term is the op on the stacked embeddings / the two views."""
    torch.manual_seed(1)
    mods = ["video", "text", "audio"]
    joint = {m: torch.randn(10, 8) for m in mods}
    cfg = load_config("synthetic_tiny").replace(loss={"variant": "pcmr", "pcmr_margin": 0.1, "pcmr_nonmatch_target": 0.2})
    objective = SSPCObjective({m: 4 for m in mods}, 8, 4, cfg.loss, 16, 8)
    got = objective({}, joint)["contrastive"]
    stacked = torch.stack([joint[m] for m in mods])
    weights = objective.pair_weights
    assert bool((weights.triu(1) > 0).any()) and not bool((weights.triu(1) == 1).all())  # the config's pair weights
    want = mmot.pairwise_similarity_regression(stacked, match_target=1.0, nonmatch_target=0.2, margin=0.1, pair_weights=weights)
    assert torch.allclose(got, want, atol=1e-6)
    cfg = load_config("synthetic_tiny").replace(loss={"variant": "comm", "comm_temperature": 0.2})
    objective = SSPCObjective({m: 4 for m in mods}, 8, 4, cfg.loss, 16, 8)
    views = (torch.randn(4, 10, 8), torch.randn(4, 10, 8))
    assert torch.allclose(objective({}, {}, views=views)["contrastive"], mmot.nn.CoMMLoss(0.2)(*views), atol=1e-6)
    with pytest.raises(ValueError, match="views"):
        objective({}, {})


@pytest.mark.parametrize(
    ("variant", "model"),
    [("pcmc", {}), ("contrastive", {}), ("pcmc", FUSION), ("multi_sk", FUSION), ("pcmr", {}), ("comm", {})],
)
def test_objectives_train_with_missing_modalities(tmp_path, variant, model):
    cfg = _tiny(tmp_path, variant, data={"modality_dropout": 0.3}, model=model)
    results = train(cfg)
    assert {"test", "ood"} <= set(results)
    for split in results.values():
        assert all(torch.isfinite(torch.tensor(v)) for v in split["mean"].values())
    lines = [json.loads(line) for line in (Path(cfg.train.out_dir) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if r["type"] == "train"]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
