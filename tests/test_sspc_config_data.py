"""mmot.sspc: configuration errors and the four data sources."""

import pickle

import numpy as np
import pytest
import torch
from mmot.sspc import data as sdata
from mmot.sspc.config import ConfigError, DataConfig, PickleConfig, config_from_dict, load_config, shipped_configs

# ------------------------------------------------------------------------------------ config


def test_shipped_configs_load():
    names = shipped_configs()
    assert {"sspc_howto100m", "uci_quick", "uci_full", "synthetic_tiny", "concepts_quick", "concepts_full"} <= set(names)
    for name in names:
        load_config(name)


@pytest.mark.parametrize(
    "values, match",
    [
        ({"train": {"epochz": 3}}, r"train\.epochz: unknown key"),
        ({"model": {"d_model": "big"}}, r"model\.d_model: expected an integer"),
        ({"loss": {"variant": "swav"}}, r"loss\.variant: expected one of"),
        ({"train": {"lr": -1.0}}, r"train\.lr: expected a number > 0"),
        ({"model": {"d_model": 30, "n_heads": 4}}, r"model\.n_heads: expected a divisor"),
        ({"data": {"format": "npz"}}, r"data\.path: expected a file path"),
        ({"loss": {"mk_k": 99}}, r"loss\.mk_k: expected an integer in 1\.\.model\.n_anchors"),
        ({"bogus": {}}, r"bogus: unknown key"),
        ({"train": {"amp": "yes"}}, r"train\.amp: expected true or false"),
        ({"loss": {"input_space": "pooled"}}, r"loss\.input_space: expected one of \('projected', 'raw'\)"),
        ({"loss": {"queue_batches": 0}}, r"loss\.queue_batches: expected a number > 0"),
        ({"loss": {"queue_size": 0}}, r"loss\.queue_size: expected an integer >= 1 or null"),
        ({"train": {"eval_ema": True}}, r"train\.eval_ema: expected false when train\.ema_decay is null"),
        ({"data": {"pair_noise": 1.0}}, r"data\.pair_noise: expected a probability in \[0, 1\)"),
        ({"data": {"concepts": {"train_super": 20}}}, r"data\.concepts\.train_super: expected an integer in 1\.\.19"),
        ({"data": {"concepts": {"token_dim": {"video": 4}}}}, r"data\.concepts\.token_dim: expected sizes for video, text and audio"),
    ],
)
def test_bad_config_values(values, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(values)


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_cli_rejects_bad_config_before_training(tmp_path, capsys):
    from mmot.sspc.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {format: npz, path: nowhere.npz}\ntrain: {out_dir: %s}\n" % (tmp_path / "run"))
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "npz data: file" in err and "not found" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    cfg.write_text("model: {n_anchors: 0}\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "model.n_anchors" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ data


def test_embedded_uci():
    d = sdata.load_uci()
    assert len(d) == 2000 and d.dims() == {"video": 240, "text": 216, "audio": 76}
    assert d.features["video"].shape == (2000, 1, 240)  # each view whole: one token, no artificial split
    assert torch.equal(d.labels, torch.arange(10).repeat_interleave(200))  # class order
    assert d.features["video"].min() >= 0 and d.features["video"].max() <= 6  # pixel averages 0..6
    raw = np.load(sdata.UCI_FILE)
    assert np.array_equal(d.features["text"][:, 0].numpy(), raw["fac"].astype(np.float32))


@pytest.mark.parametrize("seed", [0, 3])
def test_ood_folds_cover_every_class_once(seed):
    classes = list(range(10))
    folds = sdata.ood_folds(classes, 2, seed)
    assert len(folds) == 5 and all(len(f) == 2 for f in folds)
    assert sorted(c for f in folds for c in f) == classes  # every class held out in exactly one fold
    assert sdata.ood_folds(classes, 2, seed) == folds  # a function of the seed
    odd = sdata.ood_folds(list(range(7)), 3, seed)
    assert [len(f) for f in odd] == [3, 3, 1] and sorted(c for f in odd for c in f) == list(range(7))


def test_each_fold_holds_its_classes_out_of_training():
    folds = sdata.ood_folds(list(range(10)), 2, 0)
    seen_out = set()
    for i, fold in enumerate(folds):
        splits = sdata.make_splits(DataConfig(format="uci", ood_fold=i, standardize=False))
        assert set(splits["ood"].labels.tolist()) == set(fold)
        assert not set(fold) & (set(splits["train"].labels.tolist()) | set(splits["test"].labels.tolist()))
        assert len(splits["ood"]) == 400 and len(splits["train"]) == 1280
        seen_out |= set(fold)
    assert seen_out == set(range(10))
    with pytest.raises(sdata.DataError, match=r"data\.ood_fold: 5 is past the last fold \(5 folds of 2 classes\)"):
        sdata.make_splits(DataConfig(format="uci", ood_fold=5))


@pytest.mark.parametrize("q", [0.2, 0.4])
def test_uci_pair_noise_rate(q):
    clean = sdata.make_splits(DataConfig(format="uci", standardize=False))["train"]
    noisy = sdata.make_splits(DataConfig(format="uci", standardize=False, pair_noise=q))["train"]
    moved = ~(noisy.features["text"] == clean.features["text"]).all(dim=(1, 2))
    n = len(clean)
    assert abs(moved.double().mean().item() - q) < 4 * (q * (1 - q) / n) ** 0.5  # binomial, 4 sigma
    for m in ("video", "audio"):  # only the text is misaligned
        assert torch.equal(noisy.features[m], clean.features[m])
    # a misaligned text is another sample's text, unchanged
    rows = {tuple(r.flatten().tolist()) for r in clean.features["text"]}
    assert all(tuple(noisy.features["text"][i].flatten().tolist()) in rows for i in torch.nonzero(moved).flatten()[:50])


def test_splits_hold_out_classes():
    splits = sdata.make_splits(DataConfig(format="uci", ood_classes=[8, 9], test_fraction=0.2))
    assert {k: len(v) for k, v in splits.items()} == {"train": 1280, "test": 320, "ood": 400}
    assert set(splits["ood"].labels.tolist()) == {8, 9}
    assert not ({8, 9} & set(splits["train"].labels.tolist()) | set(splits["test"].labels.tolist()) & {8, 9})
    for m in splits["train"].modalities:  # standardised with training statistics
        x = splits["train"].features[m].reshape(-1, splits["train"].dims()[m])
        assert torch.allclose(x.mean(0), torch.zeros(x.shape[1]), atol=1e-4)
    with pytest.raises(sdata.DataError, match=r"ood_classes: classes \[42\]"):
        sdata.make_splits(DataConfig(format="uci", ood_classes=[42]))


def test_synthetic_has_planted_structure():
    from mmot.sspc.config import SyntheticConfig

    d = sdata.synthetic_data(SyntheticConfig(n_classes=4, per_class=30, noise=0.1))
    assert len(d) == 120 and set(d.modalities) == {"video", "text", "audio"}
    # pooled features of the same class are closer than of different classes, in every modality
    for m in d.modalities:
        f = torch.nn.functional.normalize(d.features[m].mean(1), dim=-1)
        sim = f @ f.T
        same = d.labels[:, None] == d.labels[None, :]
        assert sim[same].mean() > sim[~same].mean() + 0.2


def test_npz_format(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    mask = np.ones((30, 5), bool)
    mask[:, 3:] = False
    mask[0] = False  # a sample without any valid token keeps its first one
    np.savez(
        path,
        video=rng.normal(size=(30, 5, 7)).astype(np.float32),
        video_mask=mask,
        text=rng.normal(size=(30, 11)),
        labels=np.repeat(np.arange(3), 10),
    )
    d = sdata.load_npz(path)
    assert d.dims() == {"video": 7, "text": 11}
    assert d.features["text"].shape == (30, 1, 11) and d.masks["video"][0].tolist() == [True, False, False, False, False]
    assert d.labels.tolist()[:11] == [0] * 10 + [1]
    splits = sdata.make_splits(DataConfig(format="npz", path=str(path), ood_classes=[2]))
    assert len(splits["ood"]) == 10
    bad = tmp_path / "bad.npz"
    np.savez(bad, video=np.zeros((4, 3)), text=np.zeros((5, 3)))
    with pytest.raises(sdata.DataError, match="different numbers of samples"):
        sdata.load_npz(bad)
    np.savez(bad, video=np.zeros((4, 3)))
    with pytest.raises(sdata.DataError, match="at least two modality arrays"):
        sdata.load_npz(bad)
    np.savez(bad, video=np.full((4, 3), np.nan), text=np.zeros((4, 3)))
    with pytest.raises(sdata.DataError, match="NaN"):
        sdata.load_npz(bad)


def _clip(i, rng, with_text=True):
    clip = {"id": f"video{i}", "2d": rng.normal(size=(7, 6)), "3d": rng.normal(size=(10, 5)), "audio": rng.normal(size=(4, 200))}
    if with_text:
        clip["text"] = rng.normal(size=(3 + i % 4, 8))
    else:
        clip["caption"] = ["A man cooks pasta", "ignored second caption"]
    return clip


def test_feature_pickle_format(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "msrvtt_like.pkl"
    with open(path, "wb") as fh:
        pickle.dump([_clip(i, rng) for i in range(12)], fh)
    opts = PickleConfig(n_video_tokens=4, audio_frames_per_token=64, n_audio_tokens=3, max_words=5)
    d = sdata.load_feature_pickle(path, opts)
    assert d.dims() == {"video": 11, "text": 8, "audio": 4}  # 2d ⊕ 3d concatenated; 40-mel → n_mel
    assert d.features["video"].shape == (12, 4, 11) and d.masks["video"].all()  # 10 → pooled to 4
    assert d.masks["audio"].sum(1).tolist() == [3] * 12  # 200 frames / 64 → 4 tokens → pooled to 3
    assert d.masks["text"][0].tolist() == [True] * 3 + [False] * 2
    # captions embedded with a word-vector text file
    words = tmp_path / "w2v.txt"
    words.write_text("3 8\n" + "\n".join(f"{w} " + " ".join(["0.5"] * 8) for w in ("man", "cooks", "pasta")) + "\n")
    with open(path, "wb") as fh:
        pickle.dump({f"v{i}": _clip(i, rng, with_text=False) for i in range(4)}, fh)
    d = sdata.load_feature_pickle(path, PickleConfig(word_vectors=str(words)))
    assert d.masks["text"].sum(1).tolist() == [3] * 4 and torch.all(d.features["text"][:, :3] == 0.5)
    with pytest.raises(sdata.DataError, match="set data.pickle.word_vectors"):
        sdata.load_feature_pickle(path, PickleConfig())
    # missing keys are named, with the clip
    broken = [_clip(0, rng)]
    del broken[0]["2d"], broken[0]["3d"]
    with open(path, "wb") as fh:
        pickle.dump(broken, fh)
    with pytest.raises(sdata.DataError, match=r"clip 0 \(id 'video0'\): no video features: expected '2d' and/or '3d'"):
        sdata.load_feature_pickle(path)
    with open(path, "wb") as fh:
        pickle.dump("not clips", fh)
    with pytest.raises(sdata.DataError, match="list \\(or dict\\) of clip dicts"):
        sdata.load_feature_pickle(path)


def test_derive_uci_matches_embedded(tmp_path):
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    d = np.load(sdata.UCI_FILE)
    labels = d["labels"].astype(int)
    for view in ("pix", "fac", "fou"):
        x = d[view].astype(np.float64)
        table = np.concatenate([x, labels[:, None]], axis=1)
        np.savetxt(
            csv_dir / f"mfeat-{view}.csv", table, delimiter=",", header=",".join(map(str, range(table.shape[1]))), comments="", fmt="%.8g"
        )
    out = sdata.derive_uci_npz(csv_dir, tmp_path / "out.npz")
    again = np.load(out)
    for key in ("pix", "fac", "fou", "labels"):
        assert np.array_equal(again[key], d[key])
