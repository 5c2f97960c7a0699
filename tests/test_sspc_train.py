"""mmot.sspc: the input space, queue and evaluated weights; a tiny end-to-end training run, exact
kill-and-resume, eval CLI. The retrieval metrics are tested in test_sspc_evaluate.py."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mmot
import pytest
import torch
from mmot.sspc.config import load_config
from mmot.sspc.evaluate import METRICS

MMOT_ROOT = Path(mmot.__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ faithful defaults


def _first_batch(split, n=8):
    return {m: split.features[m][:n] for m in split.modalities}, {m: split.masks[m][:n] for m in split.modalities}


@pytest.mark.parametrize("space", ["projected", "raw"])
def test_input_space(tmp_path, space):
    from mmot.sspc.data import make_splits
    from mmot.sspc.train import build

    cfg = _tiny(tmp_path).replace(loss={"input_space": space})
    splits = make_splits(cfg.data)
    torch.manual_seed(0)
    model, objective = build(cfg, torch.device("cpu"), splits)
    tokens, masks = _first_batch(splits["train"])
    inputs, _ = model(tokens, masks)
    d_model, dims = cfg.model.d_model, splits["train"].dims()
    for m, x in inputs.items():
        mask = masks[m].double().unsqueeze(-1)
        if space == "raw":  # the masked mean of the raw tokens: data only, no gradient
            want = (tokens[m].double() * mask).sum(1) / mask.sum(1)
            assert not x.requires_grad and objective.sspc.input_anchors[m].weight.shape == (8, dims[m])
        else:  # the normalised masked mean of the gated projection + LayerNorm, with gradient
            enc = model.encoders[m]
            h = enc.norm(enc.token_proj(tokens[m])).double()
            want = torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)
            assert x.requires_grad and objective.sspc.input_anchors[m].weight.shape == (8, d_model)
        torch.testing.assert_close(x.double(), want, rtol=1e-5, atol=1e-6)
    if space == "projected":  # the input-space terms reach the token projection
        inputs["video"].sum().backward()
        assert model.encoders["video"].token_proj.fc.weight.grad.abs().sum() > 0
        assert model.encoders["video"].joint_proj.fc.weight.grad is None


def test_faithful_defaults_and_queue_in_batches(tmp_path):
    from mmot.sspc.config import Config
    from mmot.sspc.data import make_splits
    from mmot.sspc.train import build

    d = Config()
    assert (d.loss.input_space, d.model.dropout, d.train.grad_clip) == ("projected", 0.0, None)
    assert d.train.ema_decay is None and d.train.eval_ema is False
    assert d.loss.queue_batches == 2.5 and d.loss.queue_size is None and d.loss.queue_rows(2160) == 5400
    cfg = _tiny(tmp_path, batch_size=10).replace(loss={"queue_batches": 2.5})
    _, objective = build(cfg, torch.device("cpu"), make_splits(cfg.data))
    assert objective.sspc.input_queues["text"].size == objective.sspc.joint_queues["audio"].size == 25
    cfg = cfg.replace(loss={"queue_size": 7})
    _, objective = build(cfg, torch.device("cpu"), make_splits(cfg.data))
    assert objective.sspc.input_queues["text"].size == 7  # rows, when given


# ------------------------------------------------------------------------------------ training


def _tiny(tmp_path, **train):
    return load_config("synthetic_tiny").replace(train={"out_dir": str(tmp_path / "run"), **train})


def test_tiny_end_to_end(tmp_path):
    from mmot.sspc.train import train

    cfg = _tiny(tmp_path, ema_decay=0.9)
    results = train(cfg)
    assert set(results) == {"test", "ood"}
    for res in results.values():
        assert len(res["pairs"]) == 12  # six single-modality pairs, six fused queries
        assert all(0 <= res["mean"][m] <= 100 for m in ("R@1", "R@5", "R@10", "R@50"))
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, 17))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert steps[0]["anchor"] == 0.0 and steps[-1]["queue_full"] and steps[-1]["anchor"] > 0  # warm-up, then SSPC
    assert steps[-1]["lr"] == pytest.approx(1e-3 * 0.9**3)  # ExponentialLR, stepped after each epoch
    assert {r["split"] for r in records if r["type"] == "eval"} == {"test", "ood"}
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["finished"] and state["step"] == 16 and state["ema"] is not None
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temp files left

    from mmot.sspc.cli import main

    assert main(["eval", "--checkpoint", str(run), "--split", "test", "--json", str(tmp_path / "e.json")]) == 0
    ev = json.loads((tmp_path / "e.json").read_text())
    assert set(ev) == {"test"} and ev["test"]["mean"] == pytest.approx(results["test"]["mean"])

    # The EMA is kept but the trained weights are evaluated, unless train.eval_ema.
    from mmot.sspc.train import load_for_eval

    def weights(path):
        return load_for_eval(path)[0].state_dict()

    assert all(torch.equal(v, state["model"][k]) for k, v in weights(run).items())
    state["config"]["train"]["eval_ema"] = True
    torch.save(state, tmp_path / "ema.pt")
    got = weights(tmp_path / "ema.pt")
    assert all(torch.equal(v, state["ema"][k]) for k, v in got.items())
    assert not all(torch.equal(v, state["model"][k]) for k, v in got.items())


def test_step_time_and_table(tmp_path):
    from mmot.sspc.data import make_splits
    from mmot.sspc.reproduce import _summarise, markdown_table, measure_step_time, plot

    cfg = _tiny(tmp_path)
    times = measure_step_time(cfg, make_splits(cfg.data), n_steps=2, warmup=1)
    assert set(times) == {"mmot", "official_dense"} and all(t > 0 for t in times.values())
    fake = {"test": {"mean": dict(zip(METRICS, [10.0, 20.0, 30.0, 40.0, 4.0, 5.0]))}}
    other = {"test": {"mean": dict(zip(METRICS, [20.0, 40.0, 50.0, 60.0, 2.0, 3.0]))}}
    rows = _summarise({"contrastive": {0: fake, 1: other}, "multi_sk": {0: other, 1: other}})
    r1 = next(r for r in rows if r["variant"] == "contrastive" and r["metric"] == "R@1")
    assert r1["mean"] == 15.0 and r1["std"] == pytest.approx(7.0710678) and r1["seeds"] == [0, 1]
    table = markdown_table(rows)
    assert "| contrastive only | 15.0 ± 7.1 |" in table and "+ SSPC (Multi-SK)" in table and "test MeanR" in table
    plot(rows, tmp_path / "p.png", "t")
    assert (tmp_path / "p.png").stat().st_size > 1000


def _train_cmd(out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mmot.sspc.cli",
        "train",
        "--config",
        "synthetic_tiny",
        "--out",
        str(out),
        "--no-progress",
        "--set",
        "train.ema_decay=0.9",
    ]


def _env(**extra):
    env = dict(os.environ, MMOT_NUM_THREADS="1", OMP_NUM_THREADS="1", **extra)
    # The child imports the same mmot as this process (installed, or the source tree in development).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(MMOT_ROOT), env.get("PYTHONPATH")]))
    return env


def test_kill_and_resume_matches_uninterrupted(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    ref = subprocess.Popen(_train_cmd(whole), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # The second run is slowed down (a test hook) so that it can be killed part-way.
    proc = subprocess.Popen(_train_cmd(killed), env=_env(MMOT_SSPC_STEP_DELAY="0.25"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (killed / "last.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    time.sleep(0.4)  # a step or two past the checkpoint: that work is lost and must be redone
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = torch.load(killed / "last.pt", weights_only=True)
    assert 0 < before["step"] < 16 and not before["finished"]

    resumed = subprocess.run(_train_cmd(killed) + ["--resume"], env=_env(), capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert ref.wait(timeout=180) == 0, ref.stderr.read().decode()

    a = torch.load(whole / "last.pt", weights_only=True)
    b = torch.load(killed / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 16
    for key in ("model", "objective", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i in a["optimizer"]["state"]:
        assert torch.equal(a["optimizer"]["state"][i]["exp_avg_sq"], b["optimizer"]["state"][i]["exp_avg_sq"])
    assert (whole / "metrics.jsonl").read_text() == (killed / "metrics.jsonl").read_text()


def test_resume_refuses_a_changed_config(tmp_path):
    from mmot.sspc.config import ConfigError
    from mmot.sspc.train import train

    cfg = _tiny(tmp_path, epochs=1)
    train(cfg)
    with pytest.raises(ConfigError, match="loss.variant"):
        train(cfg.replace(loss={"variant": "contrastive"}), resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(cfg, resume=True, out_dir=tmp_path / "elsewhere")
