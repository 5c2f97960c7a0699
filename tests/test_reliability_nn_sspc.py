"""Reliability of mmot.nn and mmot-sspc: arguments checked up front, safe and clear checkpoint loading."""

import math

import mmot.nn as mnn
import pytest
import torch

# ------------------------------------------------------------------------------------ mmot.nn: constructors


@pytest.mark.parametrize(
    "build, error, match",
    [
        # k beyond the anchors used to fail only at the first step after the queue warm-up
        (
            lambda: mnn.SSPCLoss({"a": 3, "b": 3}, 4, n_anchors=4, queue_size=2, k=5),
            ValueError,
            r"SSPCLoss: argument 'k' must be in 1\.\.4",
        ),
        (lambda: mnn.SSPCLoss({"a": 3}, 4, k=0), ValueError, "SSPCLoss: argument 'k'"),
        (lambda: mnn.SSPCLoss({"a": 3}, 4, eps=0.0), ValueError, "SSPCLoss: argument 'eps'"),
        (lambda: mnn.SSPCLoss({"a": 3}, 4, eps=math.nan), ValueError, "SSPCLoss: argument 'eps'"),
        (lambda: mnn.SSPCLoss({"a": 3}, 4, temperature=-0.1), ValueError, "SSPCLoss: argument 'temperature'"),
        (lambda: mnn.SSPCLoss({"a": 3}, 4, temperature=math.inf), ValueError, "SSPCLoss: argument 'temperature'"),
        (lambda: mnn.SSPCLoss({"a": 3}, 4, n_iters=0), ValueError, "SSPCLoss: argument 'n_iters'"),
        (lambda: mnn.SSPCLoss({"a": 3}, 4, queue_size=0), ValueError, "SSPCLoss: argument 'queue_size'"),
        (lambda: mnn.SSPCLoss({"a": 3}, 4.0), TypeError, "SSPCLoss: argument 'joint_dim'"),
        (lambda: mnn.SSPCLoss({"a": 0}, 4), ValueError, r"SSPCLoss: argument 'input_dims\['a'\]'"),
        (lambda: mnn.SSPCLoss([("a", 3)], 4), TypeError, "SSPCLoss: argument 'input_dims'"),
        (lambda: mnn.SSPCLoss({"a": 3}, 4, backend="cuda"), ValueError, "SSPCLoss: argument 'backend'"),
        (lambda: mnn.SSPCLoss({"a": 3, "b": 3}, 4, pair_weights={("a", "c"): 1.0}), ValueError, "SSPCLoss: argument 'pair_weights'"),
        (lambda: mnn.SSPCLoss({"a": 3, "b": 3}, 4, pair_weights={("a", "b"): math.inf}), ValueError, "SSPCLoss: argument 'pair_weights'"),
        (lambda: mnn.SSPCLoss({"a": 3, "b": 3}, 4, pair_weights={("a", "b"): -1.0}), ValueError, "SSPCLoss: argument 'pair_weights'"),
        # an inf weight used to be accepted and turned the loss into inf/NaN
        (
            lambda: mnn.CombinatorialContrastiveLoss({("a", "b"): math.inf}),
            ValueError,
            "CombinatorialContrastiveLoss: argument 'pair_weights'",
        ),
        (
            lambda: mnn.CombinatorialContrastiveLoss({("a", "b"): math.nan}),
            ValueError,
            "CombinatorialContrastiveLoss: argument 'pair_weights'",
        ),
        (lambda: mnn.CombinatorialContrastiveLoss({("a", "b"): 1.0, ("b", "a"): 1.0}), ValueError, "both orders"),
        (lambda: mnn.CombinatorialContrastiveLoss({("a", "b"): "1"}), TypeError, "CombinatorialContrastiveLoss: argument 'pair_weights'"),
        (lambda: mnn.CombinatorialContrastiveLoss([(("a", "b"), 1.0)]), TypeError, "CombinatorialContrastiveLoss: argument 'pair_weights'"),
        (lambda: mnn.CombinatorialContrastiveLoss(temperature=0), ValueError, "NormSoftmaxLoss: argument 'temperature'"),
        (lambda: mnn.NormSoftmaxLoss(temperature=math.nan), ValueError, "NormSoftmaxLoss: argument 'temperature'"),
        (lambda: mnn.NormSoftmaxLoss(symmetric=1), TypeError, "NormSoftmaxLoss: argument 'symmetric'"),
        (lambda: mnn.NormSoftmaxLoss(backend="gpu"), ValueError, "NormSoftmaxLoss: argument 'backend'"),
        (lambda: mnn.Sinkhorn(eps=-1.0), ValueError, "Sinkhorn: argument 'eps'"),
        (lambda: mnn.Sinkhorn(n_iters=0), ValueError, "Sinkhorn: argument 'n_iters'"),
        (lambda: mnn.Sinkhorn(log_domain="yes"), ValueError, "Sinkhorn: argument 'log_domain'"),
        (lambda: mnn.Sinkhorn(row_masses=None), TypeError, r"Sinkhorn: unknown keyword argument\(s\) \['row_masses'\]"),
        (lambda: mnn.Sinkhorn(row_mass=[1.0, 2.0]), TypeError, "Sinkhorn: argument 'row_mass'"),
        (lambda: mnn.MultiSinkhorn(k=0), ValueError, "MultiSinkhorn: argument 'k'"),
        (lambda: mnn.MultiSinkhorn(eps=math.inf), ValueError, "MultiSinkhorn: argument 'eps'"),
        (lambda: mnn.MultiSinkhorn(low_weight=0.0), ValueError, "MultiSinkhorn: argument 'low_weight'"),
        (lambda: mnn.MultiSinkhorn(slot_weights=[1.0, -1.0]), ValueError, "MultiSinkhorn: argument 'slot_weights'"),
        (lambda: mnn.MultiSinkhorn(normalize="softmax"), ValueError, "MultiSinkhorn: argument 'normalize'"),
        (lambda: mnn.MultiSinkhorn(backend="cuda"), ValueError, "MultiSinkhorn: argument 'backend'"),
        (lambda: mnn.Anchors(8, 4, scale=math.inf), ValueError, "Anchors: argument 'scale'"),
        (lambda: mnn.Anchors(8, 4, backend="tpu"), ValueError, "Anchors: argument 'backend'"),
        (lambda: mnn.Anchors(8.0, 4), TypeError, "Anchors: argument 'dim'"),
        (lambda: mnn.FeatureQueue(4, 2, dtype=torch.int64), TypeError, "FeatureQueue: argument 'dtype'"),
        (lambda: mnn.FeatureQueue(0, 2), ValueError, "FeatureQueue: argument 'size'"),
    ],
)
def test_constructors_check_their_arguments(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_sspc_pair_weight_checks_low():
    from mmot.nn.sspc import sspc_pair_weight

    assert sspc_pair_weight("text", "audio", 0.3) == 0.3
    with pytest.raises(ValueError, match="sspc_pair_weight: argument 'low'"):
        sspc_pair_weight("text", "audio", math.inf)


def test_sspc_k_equal_to_anchors_is_accepted_and_runs():
    torch.manual_seed(0)
    loss = mnn.SSPCLoss({"a": 3, "b": 5}, 4, n_anchors=3, queue_size=4, k=3)
    inputs = {"a": torch.randn(4, 3), "b": torch.randn(4, 5)}
    joints = {"a": torch.randn(4, 4), "b": torch.randn(4, 4)}
    assert float(loss(inputs, joints)) == 0.0  # warm-up
    assert torch.isfinite(loss(inputs, joints))


# ------------------------------------------------------------------------------------ mmot.nn: methods


def test_feature_queue_methods_check_their_arguments():
    queue = mnn.FeatureQueue(4, 2)
    with pytest.raises(TypeError, match=r"FeatureQueue\.push: argument 'x' must be a torch\.Tensor"):
        queue.push([[1.0, 2.0]])  # used to raise AttributeError
    with pytest.raises(TypeError, match=r"FeatureQueue\.push: argument 'x' must be a floating tensor"):
        queue.push(torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"FeatureQueue\.push: argument 'x' must have shape \(B, 2\)"):
        queue.push(torch.ones(2, 2, 1))
    with pytest.raises(ValueError, match=r"FeatureQueue\.push: argument 'x' must be finite"):
        queue.push(torch.tensor([[1.0, math.nan]]))
    half = mnn.FeatureQueue(4, 2, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"finite in the queue's dtype \(torch\.float16\)"):
        half.push(torch.tensor([[1e5, 1.0]]))  # finite in float32, inf once stored
    assert len(queue) == 0 and len(half) == 0  # nothing half-written
    with pytest.raises(TypeError, match=r"FeatureQueue\.extend: argument 'x'"):
        queue.extend((1.0, 2.0))
    with pytest.raises(ValueError, match=r"FeatureQueue\.extend: argument 'x' must have shape \(B, 2\)"):
        queue.extend(torch.ones(3, 5))
    queue.push(torch.tensor([[0.5, -1.5]]))
    torch.testing.assert_close(
        queue.extend(torch.tensor([[2.0, 3.0]], dtype=torch.float64)), torch.tensor([[0.5, -1.5], [2.0, 3.0]], dtype=torch.float64)
    )


def test_anchors_forward_checks_x():
    anchors = mnn.Anchors(4, 3)
    with pytest.raises(TypeError, match=r"Anchors\.forward: argument 'x'"):
        anchors([[1.0, 2.0, 3.0, 4.0]])
    with pytest.raises(ValueError, match=r"Anchors\.forward: argument 'x' must have shape \(\.\.\., B, 4\)"):
        anchors(torch.randn(2, 5))
    with pytest.raises(TypeError, match=r"Anchors\.forward: argument 'x' must be a floating tensor"):
        anchors(torch.ones(2, 4, dtype=torch.int32))


def test_combinatorial_forward_checks_its_mappings():
    criterion = mnn.CombinatorialContrastiveLoss({("a", "b"): 1.0})
    with pytest.raises(TypeError, match=r"CombinatorialContrastiveLoss\.forward: argument 'embeddings'"):
        criterion([torch.randn(3, 4), torch.randn(3, 4)])
    with pytest.raises(TypeError, match=r"CombinatorialContrastiveLoss\.forward: argument 'embeddings'.*'b'"):
        criterion({"a": torch.randn(3, 4), "b": [[0.0] * 4] * 3})
    with pytest.raises(TypeError, match=r"CombinatorialContrastiveLoss\.forward: argument 'masks'"):
        criterion({"a": torch.randn(3, 4), "b": torch.randn(3, 4)}, masks=[True, True, False])


def _batch(b=4, dims=None, joint=4):
    dims = dims or {"a": 3, "b": 5}
    return {m: torch.randn(b, d) for m, d in dims.items()}, {m: torch.randn(b, joint) for m in dims}


def test_sspc_forward_checks_the_batch_before_touching_the_queues():
    torch.manual_seed(0)
    loss = mnn.SSPCLoss({"a": 3, "b": 5}, 4, n_anchors=4, queue_size=4)
    inputs, joints = _batch()
    bad_width = dict(inputs, b=torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"SSPCLoss\.forward: argument 'inputs\['b'\]' must have shape \(B, 5\)"):
        loss(bad_width, joints)
    with pytest.raises(ValueError, match=r"SSPCLoss\.forward: every modality's rows must share one batch size"):
        loss(inputs, dict(joints, b=torch.randn(3, 4)))
    with pytest.raises(ValueError, match=r"SSPCLoss\.forward: every modality's rows must share one batch size B >= 1"):
        loss(*_batch(0))
    with pytest.raises(TypeError, match=r"SSPCLoss\.forward: argument 'joints'"):
        loss(inputs, [joints["a"], joints["b"]])
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        loss(inputs, {"a": joints["a"]})
    # No queue was pushed by the rejected calls: the warm-up still needs exactly one full batch.
    assert all(len(q) == 0 for q in [*loss.input_queues.values(), *loss.joint_queues.values()])
    assert float(loss(inputs, joints)) == 0.0 and loss.warmed_up


# ------------------------------------------------------------------------------------ mmot-sspc: config numbers


@pytest.mark.parametrize(
    "values, match",
    [
        ({"train": {"lr": math.inf}}, r"train\.lr: expected a finite number"),
        ({"loss": {"mk_eps": math.nan}}, r"loss\.mk_eps: expected a finite number"),
        ({"loss": {"anchor_temperature": "inf"}}, r"loss\.anchor_temperature: expected a finite number"),
        ({"train": {"grad_clip": math.inf}}, r"train\.grad_clip: expected a finite number"),  # float | None
        ({"loss": {"pair_weights": {"text-video": math.inf}}}, r"loss\.pair_weights\.text-video: expected a finite number"),
        ({"data": {"synthetic": {"noise": math.inf}}}, r"data\.synthetic\.noise: expected a finite number"),
    ],
)
def test_config_numbers_must_be_finite(values, match):
    from mmot.sspc.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match=match):
        config_from_dict(values)


def test_cli_rejects_an_infinite_yaml_value(tmp_path, capsys):
    from mmot.sspc.cli import main

    assert main(["train", "--config", "synthetic_tiny", "--out", str(tmp_path / "run"), "--set", "loss.anchor_temperature=.inf"]) == 2
    assert "mmot-sspc: error: " in capsys.readouterr().err and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------ mmot-sspc: checkpoints


def _tiny_cfg(out):
    from mmot.sspc.config import load_config

    return load_config("synthetic_tiny").replace(train={"out_dir": str(out), "epochs": 1, "eval_every": 0})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from mmot.sspc.train import train

    out = tmp_path_factory.mktemp("sspc") / "run"
    train(_tiny_cfg(out))
    return out


def test_checkpoint_holds_only_tensors_and_plain_containers(run_dir):
    state = torch.load(run_dir / "last.pt", weights_only=True)  # raised UnpicklingError on numpy's RNG state before
    assert state["format"] == "mmot-sspc-checkpoint" and state["version"] == 2
    assert isinstance(state["config"], dict) and state["config"]["model"]["n_anchors"] == 8
    assert state["rng"]["numpy"]["keys"].dtype == torch.int64 and state["rng"]["python"]["state"].shape == (625,)


class _Marker:
    """Pickles as a call that creates a file: the stand-in for code in a hostile checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _write_bad_checkpoints(folder, valid):
    import numpy as np

    folder.mkdir(exist_ok=True)
    data = valid.read_bytes()
    bad = {}
    bad["truncated"] = folder / "truncated.pt"
    bad["truncated"].write_bytes(data[: len(data) // 2])
    bad["garbage"] = folder / "garbage.pt"
    bad["garbage"].write_bytes(b"not a checkpoint at all\n" * 10)
    bad["empty"] = folder / "empty.pt"
    bad["empty"].write_bytes(b"")
    bad["hostile"] = folder / "hostile.pt"
    torch.save({"config": {}, "model": _Marker(folder / "pwned")}, bad["hostile"])
    bad["numpy"] = folder / "numpy.pt"  # the old layout: numpy's RNG state as an ndarray
    torch.save({"rng": {"numpy": np.random.get_state()}}, bad["numpy"])
    bad["foreign"] = folder / "foreign.pt"
    torch.save({"weights": torch.ones(2)}, bad["foreign"])
    return bad


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "hostile", "numpy", "foreign"])
def test_eval_refuses_a_bad_checkpoint_naming_it(run_dir, tmp_path, capsys, kind):
    from mmot.sspc.cli import main

    path = _write_bad_checkpoints(tmp_path / "bad", run_dir / "last.pt")[kind]
    assert main(["eval", "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmot-sspc: error: checkpoint ") and str(path) in err and "Traceback" not in err
    assert not (tmp_path / "bad" / "pwned").exists()  # nothing in the file was run


def test_eval_refuses_a_checkpoint_that_does_not_fit_its_config(run_dir, tmp_path, capsys):
    from mmot.sspc.cli import main

    state = torch.load(run_dir / "last.pt", weights_only=True)
    state["model"] = {name: value[..., :1] for name, value in state["model"].items()}
    torch.save(state, tmp_path / "shrunk.pt")
    assert main(["eval", "--checkpoint", str(tmp_path / "shrunk.pt")]) == 2
    err = capsys.readouterr().err
    assert "mmot-sspc: error: checkpoint" in err and "does not fit the model" in err


def test_resume_refuses_a_truncated_checkpoint(run_dir, tmp_path, capsys):
    import shutil

    from mmot.sspc.cli import main

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) - 100])
    args = ["train", "--config", "synthetic_tiny", "--out", str(run), "--set", "train.epochs=1", "--set", "train.eval_every=0", "--resume"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmot-sspc: error: checkpoint ") and str(run / "last.pt") in err


def _as_version_1(state):
    """The checkpoint as version 1 wrote it: no input_space / queue_batches / eval_ema keys."""
    state = dict(state, version=1)
    config = {k: dict(v) if isinstance(v, dict) else v for k, v in state["config"].items()}
    for section, key in (("loss", "input_space"), ("loss", "queue_batches"), ("train", "eval_ema")):
        del config[section][key]
    config["loss"]["queue_size"] = 48
    config["train"]["ema_decay"] = 0.9
    state["config"] = config
    state["ema"] = state["model"]
    return state


def test_version_1_checkpoints_are_evaluated_not_resumed(run_dir, tmp_path, capsys):
    import shutil

    from mmot.sspc import checkpoint as ckpt
    from mmot.sspc.cli import main

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    torch.save(_as_version_1(torch.load(run / "last.pt", weights_only=True)), run / "last.pt")
    upgraded = ckpt.load(run / "last.pt")["config"]
    # What version 1 did: raw input features, the EMA evaluated whenever kept.
    assert upgraded["loss"]["input_space"] == "raw" and upgraded["train"]["eval_ema"] is True
    assert main(["eval", "--checkpoint", str(run), "--split", "test"]) == 0
    args = ["train", "--config", "synthetic_tiny", "--out", str(run), "--set", "train.epochs=1", "--set", "train.eval_every=0", "--resume"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "format version 1" in err and "can be evaluated but not resumed" in err and "--overwrite" in err
    state = torch.load(run / "last.pt", weights_only=True)
    torch.save(dict(state, version=3), run / "last.pt")
    assert main(["eval", "--checkpoint", str(run)]) == 2
    assert "format version 3; this mmot reads versions (1, 2)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ mmot-sspc: run directories


def test_training_into_an_existing_run_needs_overwrite(run_dir, tmp_path, capsys):
    import shutil

    from mmot.sspc.cli import main
    from mmot.sspc.train import train

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    before = (run / "last.pt").read_bytes()
    with pytest.raises(FileExistsError, match=r"already holds a run \(last\.pt, metrics\.jsonl, config\.yaml\).*--overwrite"):
        train(_tiny_cfg(run))
    args = ["train", "--config", "synthetic_tiny", "--out", str(run), "--set", "train.epochs=1", "--set", "train.eval_every=0"]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (run / "last.pt").read_bytes() == before  # untouched
    with pytest.raises(SystemExit):
        main([*args, "--resume", "--overwrite"])  # one or the other

    # --overwrite deletes the old checkpoint before anything else: a run stopped early leaves none behind.
    def stop(step):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_tiny_cfg(run), overwrite=True, step_hook=stop)
    assert not (run / "last.pt").exists()
    assert main([*args, "--overwrite"]) == 0
    assert torch.load(run / "last.pt", weights_only=True)["finished"]


def test_an_empty_output_directory_is_not_a_run(tmp_path):
    from mmot.sspc.train import _refuse_existing_run

    (tmp_path / "notes.txt").write_text("mine")
    _refuse_existing_run(tmp_path, overwrite=False)  # no run files: nothing to protect


# ------------------------------------------------------------------------------------ mmot-sspc: feature pickles


def test_convert_features_round_trips_to_npz(tmp_path, capsys):
    import pickle

    import numpy as np
    from mmot.sspc import data as sdata
    from mmot.sspc.cli import main
    from mmot.sspc.config import PickleConfig

    rng = np.random.default_rng(3)
    clips = [
        {
            "id": f"v{i}",
            "2d": rng.normal(size=(5, 4)),
            "3d": rng.normal(size=(7, 3)),
            "audio": rng.normal(size=(4, 130)),
            "text": rng.normal(size=(2 + i, 6)),
        }
        for i in range(5)
    ]
    src = tmp_path / "clips.pkl"
    src.write_bytes(pickle.dumps(clips))
    dst = tmp_path / "clips.npz"
    args = ["convert-features", str(src), str(dst), "--set", "data.pickle.n_video_tokens=3", "--set", "data.pickle.max_words=4"]
    assert main(args) == 0
    assert "data.format: npz" in capsys.readouterr().out
    want = sdata.load_feature_pickle(src, PickleConfig(n_video_tokens=3, max_words=4))
    got = sdata.load_npz(dst)
    assert got.modalities == want.modalities
    for m in want.modalities:
        assert torch.equal(got.features[m], want.features[m]) and torch.equal(got.masks[m], want.masks[m])
    with np.load(dst, allow_pickle=False) as z:  # nothing in it needs unpickling
        assert sorted(z.keys()) == sorted([*want.modalities, *(f"{m}_mask" for m in want.modalities)])
    assert main(["convert-features", str(src), str(tmp_path / "clips.pkl2")]) == 2
    assert "must end in .npz" in capsys.readouterr().err


def test_pickle_trust_is_stated_where_pickles_are_read(capsys):
    from mmot.sspc import data as sdata
    from mmot.sspc.cli import main

    assert "Only read pickles you trust" in sdata.load_feature_pickle.__doc__
    assert "Only read pickles you trust" in sdata.__doc__
    with pytest.raises(SystemExit):
        main(["convert-features", "--help"])
    assert "only pickles you trust" in " ".join(capsys.readouterr().out.split())
