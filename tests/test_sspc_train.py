"""mmot.sspc: retrieval metrics, a tiny end-to-end training run, exact kill-and-resume, eval CLI."""

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
from mmot.sspc.evaluate import all_pairs, ranks, retrieval_metrics

MMOT_ROOT = Path(mmot.__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ metrics


def test_retrieval_metrics_hand_computed():
    # 4 queries against 4 gallery items in 2-D; the true match of query i is gallery item i.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [-1.0, 0.0]])
    g = torch.tensor([[1.0, 0.0], [1.0, 0.05], [0.0, 1.0], [0.0, -1.0]])
    # cosines: q0 → g0 1.0 (rank 1); q1 → g1 ≈ 0.05 below g2 = 1 (rank 2);
    # q2 → g2 ≈ 0.0995 below g1 ≈ 0.999 and g0 ≈ 0.995 (rank 3); q3 → g3 = 0, g1 < 0, g0 < 0, g2 = 0 tie (rank 1)
    assert ranks(q, g).tolist() == [1, 2, 3, 1]
    m = retrieval_metrics(q, g)
    assert m["R@1"] == pytest.approx(50.0) and m["R@5"] == pytest.approx(100.0) and m["R@10"] == pytest.approx(100.0)
    assert m["MedR"] == pytest.approx(1.5)  # median of 1, 1, 2, 3
    assert retrieval_metrics(q[:3], g[:3])["MedR"] == pytest.approx(2.0)
    pairs = all_pairs({"a": q, "b": g, "c": q})
    assert set(pairs) == {"a->b", "b->a", "a->c", "c->a", "b->c", "c->b"}
    assert pairs["a->c"]["R@1"] == 100.0  # identical embeddings


def test_recall_at_k_counts_rank_k():
    q = torch.eye(12)
    g = torch.eye(12)[[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0]]
    # gallery item i-1 equals query i (score 1) and beats the true match (score 0); the other ten tie with it
    assert ranks(q, g).tolist() == [2] * 12
    m = retrieval_metrics(q, g)
    assert (m["R@1"], m["R@5"], m["MedR"]) == (0.0, 100.0, 2.0)


# ------------------------------------------------------------------------------------ training


def _tiny(tmp_path, **train):
    return load_config("synthetic_tiny").replace(train={"out_dir": str(tmp_path / "run"), **train})


def test_tiny_end_to_end(tmp_path):
    from mmot.sspc.train import train

    cfg = _tiny(tmp_path, ema_decay=0.9)
    results = train(cfg)
    assert set(results) == {"test", "ood"}
    for res in results.values():
        assert len(res["pairs"]) == 6
        assert all(0 <= res["mean"][m] <= 100 for m in ("R@1", "R@5", "R@10"))
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


def test_step_time_and_table(tmp_path):
    from mmot.sspc.data import make_splits
    from mmot.sspc.reproduce import _summarise, markdown_table, measure_step_time, plot

    cfg = _tiny(tmp_path)
    times = measure_step_time(cfg, make_splits(cfg.data), n_steps=2, warmup=1)
    assert set(times) == {"mmot", "official_dense"} and all(t > 0 for t in times.values())
    fake = {"test": {"mean": {"R@1": 10.0, "R@5": 20.0, "R@10": 30.0, "MedR": 4.0}}}
    other = {"test": {"mean": {"R@1": 20.0, "R@5": 40.0, "R@10": 50.0, "MedR": 2.0}}}
    rows = _summarise({"contrastive": {0: fake, 1: other}, "multi_sk": {0: other, 1: other}})
    r1 = next(r for r in rows if r["variant"] == "contrastive" and r["metric"] == "R@1")
    assert r1["mean"] == 15.0 and r1["std"] == pytest.approx(7.0710678) and r1["seeds"] == [0, 1]
    table = markdown_table(rows)
    assert "| contrastive only | 15.0 ± 7.1 |" in table and "+ SSPC (Multi-SK)" in table
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
