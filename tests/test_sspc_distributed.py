"""mmot.sspc data-parallel training under torchrun (gloo, CPU, subprocesses).

A 2-process run of synthetic_tiny in float64 has the per-step loss curve, final weights, queues
and evaluation of a single-process run with the same global batch; a run stopped and resumed on 2
processes ends as the uninterrupted one; a checkpoint is refused at another number of processes.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mmot
import pytest
import torch

MMOT_ROOT = Path(mmot.__file__).resolve().parents[1]
# float64, so that the comparison is not lost in float32 rounding amplified by Adam (its update
# is about lr·sign(g) for tiny g); every other setting is synthetic_tiny's (16 steps, global batch
# 16, a queue of 3 batches, so SSPC's anchor terms are on from step 4).
F64 = ["--set", "train.dtype=float64"]
PARTS = ("loss", "contrastive", "anchor", "structure")


def _env():
    env = dict(os.environ, MMOT_NUM_THREADS="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(MMOT_ROOT), env.get("PYTHONPATH")]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _run(command, timeout=150):
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=timeout)
    return done


def _sspc(*args):
    """``python -m mmot.sspc ARGS``."""
    return _run([sys.executable, "-m", "mmot.sspc", *args])


def _torchrun(nproc, *args):
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", "mmot.sspc", *args])


def _train_args(out, *extra):
    return ["train", "--config", "synthetic_tiny", "--out", str(out), "--no-progress", *F64, *extra]


def _records(run, kind="train"):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def _queue(state: dict, name: str) -> torch.Tensor:
    """A FeatureQueue's rows oldest first, from an objective state dict."""
    storage, head, count = (state[f"{name}.{key}"] for key in ("storage", "head", "count"))
    assert int(count) == storage.shape[0]  # full
    return torch.cat([storage[int(head) :], storage[: int(head)]])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One single-process run (in this process) and one 2-process run (``train --nproc 2``)."""
    from mmot.sspc.cli import main

    root = tmp_path_factory.mktemp("ddp")
    assert main(_train_args(root / "single")) == 0
    ddp = _sspc(*_train_args(root / "ddp", "--nproc", "2"))
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    return {"root": root, "single": root / "single", "ddp": root / "ddp", "stdout": ddp.stdout}


@pytest.mark.slow
def test_two_processes_match_one(runs):
    single, ddp = runs["single"], runs["ddp"]
    a, b = _records(single), _records(ddp)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 17))
    assert [r["queue_full"] for r in a] == [r["queue_full"] for r in b]
    assert a[0]["anchor"] == 0.0 and a[-1]["anchor"] > 0  # the warm-up, then SSPC's terms
    for part in PARTS:
        torch.testing.assert_close(
            torch.tensor([r[part] for r in b], dtype=torch.float64),
            torch.tensor([r[part] for r in a], dtype=torch.float64),
            rtol=1e-9,
            atol=1e-12,
            msg=lambda m, part=part: f"per-step {part}: {m}",
        )
    sa = torch.load(single / "last.pt", weights_only=True)
    sb = torch.load(ddp / "last.pt", weights_only=True)
    assert (sa["world_size"], sb["world_size"], len(sb["ranks"])) == (1, 2, 2)
    # atol: the attention's key bias has a zero gradient up to rounding (softmax ignores it), and
    # Adam turns rounding noise g into steps of lr·g/eps, about 1e-11 here.
    for key in sa["model"]:
        torch.testing.assert_close(sb["model"][key], sa["model"][key], rtol=1e-9, atol=1e-9, msg=lambda m, key=key: f"{key}: {m}")
    # Each rank's queue holds its own shards of the last 3 global batches; together, the
    # single process's queue (8 rows of each batch per rank, rank 0's first).
    ranks = [r["objective"] for r in sb["ranks"]]
    for name in ("sspc.input_queues.text", "sspc.joint_queues.video"):
        mine = [_queue(r, name) for r in ranks]
        assert mine[0].shape[0] == mine[1].shape[0] == 24 and not torch.equal(mine[0], mine[1])
        union = torch.cat([torch.cat([q[8 * j : 8 * j + 8] for q in mine]) for j in range(3)])
        torch.testing.assert_close(union, _queue(sa["objective"], name), rtol=1e-9, atol=1e-11)
    for anchors in ("sspc.input_anchors.audio.weight", "sspc.joint_anchors.text.weight"):  # trained alike on every rank
        assert torch.equal(ranks[0][anchors], ranks[1][anchors])
        torch.testing.assert_close(ranks[0][anchors], sa["objective"][anchors], rtol=1e-9, atol=1e-11)
    # Rank 0 evaluated, as the single process did; the table is printed once.
    ea, eb = _records(single, "eval"), _records(ddp, "eval")
    assert [(r["step"], r["split"]) for r in ea] == [(r["step"], r["split"]) for r in eb]
    for ra, rb in zip(ea, eb):
        assert rb["mean"] == pytest.approx(ra["mean"], rel=1e-6, abs=1e-6)
    assert runs["stdout"].count("| split | pair |") == 1


@pytest.mark.slow
def test_resume_on_two_processes_matches_uninterrupted(runs):
    """Stopped after 3 steps and resumed, a 2-process run ends as the uninterrupted one, with
    per-rank random draws in play (the bridge term's augmented views and dropout)."""
    root = runs["root"]
    extra = ["--set", "loss.variant=multi_sk+bridge", "--set", "model.dropout=0.1", "--set", "train.epochs=2"]
    whole = _torchrun(2, *_train_args(root / "whole", *extra))
    assert whole.returncode == 0, whole.stderr[-4000:]
    out = root / "resumed"
    first = _sspc(*_train_args(out, *extra, "--set", "train.max_steps=3", "--nproc", "2"))
    assert first.returncode == 0, first.stderr[-4000:]
    state = torch.load(out / "last.pt", weights_only=True)
    assert (state["step"], state["world_size"], state["finished"]) == (3, 2, True)
    assert not torch.equal(state["ranks"][0]["rng"]["torch"], state["ranks"][1]["rng"]["torch"])  # a stream per rank
    second = _sspc(*_train_args(out, *extra, "--resume", "--set", "train.max_steps=null", "--nproc", "2"))
    assert second.returncode == 0, second.stderr[-4000:]
    a, b = _records(root / "whole"), _records(out)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
    assert a[-1]["anchor"] > 0 and a[-1]["structure"] > 0
    for ra, rb in zip(a, b):
        assert {k: rb[k] for k in PARTS} == pytest.approx({k: ra[k] for k in PARTS}, rel=1e-12, abs=1e-15)
    sa = torch.load(root / "whole" / "last.pt", weights_only=True)
    sb = torch.load(out / "last.pt", weights_only=True)
    for key in sa["model"]:
        torch.testing.assert_close(sb["model"][key], sa["model"][key], rtol=1e-12, atol=1e-14)
    for rank in range(2):
        for key, value in sa["ranks"][rank]["objective"].items():
            torch.testing.assert_close(sb["ranks"][rank]["objective"][key], value, rtol=1e-12, atol=1e-14)


@pytest.mark.slow
def test_resume_refuses_another_number_of_processes(runs, capsys):
    from mmot.sspc.checkpoint import CheckpointError
    from mmot.sspc.cli import main
    from mmot.sspc.config import load_config
    from mmot.sspc.train import train

    copy = runs["root"] / "ddp-copy"
    shutil.copytree(runs["ddp"], copy)
    before = (copy / "metrics.jsonl").read_text()
    assert main(_train_args(copy, "--resume")) == 2
    err = capsys.readouterr().err
    assert "written by a run on 2 processes, and this run has 1" in err and "--nproc 2" in err
    cfg = load_config("synthetic_tiny").replace(train={"dtype": "float64", "progress": False})
    with pytest.raises(CheckpointError, match="on 2 processes"):
        train(cfg, resume=True, out_dir=copy)
    assert (copy / "metrics.jsonl").read_text() == before  # nothing touched
    # A single-process checkpoint on 2 processes: refused by both ranks, reported once.
    single = runs["root"] / "single-copy"
    shutil.copytree(runs["single"], single)
    refused = _torchrun(2, *_train_args(single, "--resume"))
    assert refused.returncode != 0
    assert refused.stderr.count("written by a run on 1 process, and this run has 2") == 1, refused.stderr[-4000:]


# ------------------------------------------------------------------------------------ fast checks


def test_python_m_is_the_cli():
    done = _sspc("configs")
    assert done.returncode == 0 and "synthetic_tiny" in done.stdout.split()


def test_nproc_inside_torchrun_is_refused(monkeypatch, capsys):
    from mmot.sspc.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--config", "synthetic_tiny", "--nproc", "2"]) == 2
    assert "already one of 2 torchrun processes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--config", "synthetic_tiny", "--nproc", "0"])


def test_dtype_key():
    from mmot.sspc.config import ConfigError, load_config

    cfg = load_config("synthetic_tiny")
    assert cfg.train.dtype == "float32"
    with pytest.raises(ConfigError, match="train.dtype"):
        cfg.replace(train={"dtype": "float16"})
    with pytest.raises(ConfigError, match="train.amp"):
        cfg.replace(train={"dtype": "float64", "amp": True})


def test_checkpoint_world_size_checked(tmp_path):
    from mmot.sspc import checkpoint as ckpt

    base = {key: kind() for key, kind in ckpt.REQUIRED.items() if key not in ("step", "metrics_lines", "finished")}
    base.update(step=1, metrics_lines=0, finished=False)
    path = tmp_path / "c.pt"
    ckpt.save(base, path)
    assert ckpt.load(path)["world_size"] == 1  # older files: one process
    ckpt.save({**base, "world_size": 2}, path)
    with pytest.raises(ckpt.CheckpointError, match="one .* entry for each of its 2 processes"):
        ckpt.load(path)
    ckpt.save({**base, "world_size": 0}, path)
    with pytest.raises(ckpt.CheckpointError, match="world_size"):
        ckpt.load(path)


def test_shard_and_rank_seed():
    from mmot.sspc.distributed import World, rank_seed

    rows = torch.arange(12)
    parts = [World(rank=r, size=3).shard(rows) for r in range(3)]
    assert torch.equal(torch.cat(parts), rows) and all(len(p) == 4 for p in parts)
    assert torch.equal(World().shard(rows), rows)
    assert rank_seed(0, 0) != rank_seed(0, 1) and rank_seed(0, 1) == rank_seed(0, 1) != rank_seed(1, 1)


# ------------------------------------------------------------------------------------ every variant's objective

WORLD, B, E = 2, 6, 8  # global batch 6: 3 rows per rank
OBJECTIVE_VARIANTS = ["contrastive", "multi_sk", "sinkhorn", "pcmc", "pcmr", "comm", "gc", "bridge", "separation", "multi_sk+gc"]
MODS = ("video", "text", "audio")


def _objective(variant, group=None, world=1):
    from mmot.sspc.config import load_config
    from mmot.sspc.model import SSPCObjective

    cfg = load_config("synthetic_tiny").replace(loss={"variant": variant, "mk_iters": 4, "sk_iters": 4}).loss
    torch.manual_seed(0)
    # A queue of 2 global batches: the anchor terms are on at the third call.
    return SSPCObjective({m: E for m in MODS}, E, 4, cfg, 2 * B // world, E, process_group=group).double()


def _objective_batches():
    """Three global batches of every input the objective reads, float64; a modality missing in some rows."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(3):

        def rows(*shape):
            return torch.randn(*shape, generator=g, dtype=torch.float64)

        present = {m: torch.ones(B, dtype=torch.bool) for m in MODS}
        present["audio"][[1, 4]] = False
        out.append(
            {
                "inputs": {m: rows(B, E) for m in MODS},
                "joint": {m: rows(B, E) for m in MODS},
                "hidden": {m: rows(B, E) for m in MODS},
                "augmented": {m: rows(B, E) for m in MODS},
                "present": present,
                "views": (rows(len(MODS) + 1, B, E), rows(len(MODS) + 1, B, E)),
            }
        )
    return out


def _slice(batch, rank, world):
    """This rank's rows of a global batch (all of it in one process), leaves with gradient."""
    n = B // world
    part = slice(rank * n, (rank + 1) * n)
    grad = {
        key: {m: v[part].clone().requires_grad_(True) for m, v in batch[key].items()} for key in ("inputs", "joint", "hidden", "augmented")
    }
    views = tuple(v[:, part].clone().requires_grad_(True) for v in batch["views"])
    return {**grad, "present": {m: v[part] for m, v in batch["present"].items()}, "views": views}


def _objective_step(objective, batches, rank, world):
    """Two warm-up calls, then the loss and the gradients of the last call's rows and of the parameters."""
    for batch in batches[:2]:
        x = _slice(batch, rank, world)
        objective(x["inputs"], x["joint"], x["hidden"], x["augmented"], x["present"], x["views"])
    x = _slice(batches[2], rank, world)
    out = objective(x["inputs"], x["joint"], x["hidden"], x["augmented"], x["present"], x["views"])
    out["loss"].backward()
    rows = {f"{key}.{m}": v.grad for key in ("inputs", "joint", "hidden", "augmented") for m, v in x[key].items()}
    rows.update({f"views.{i}": v.grad for i, v in enumerate(x["views"])})
    params = {name: p.grad for name, p in objective.named_parameters()}
    return out["loss"].detach(), rows, params


def _objective_worker(rank, port, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    batches = _objective_batches()
    for variant in OBJECTIVE_VARIANTS:
        objective = _objective(variant, dist.group.WORLD, WORLD)
        torch.save(_objective_step(objective, batches, rank, WORLD), os.path.join(out_dir, f"{variant}-{rank}.pt"))
    dist.barrier()
    os._exit(0)  # gloo's teardown aborts now and then (test_distributed.py); the results are on disk


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_every_variant_sharded_equals_single_process(tmp_path):
    """The objective on 2 ranks' shards, with DDP's averaging of the parameter gradients and the
    rows' gradients divided by W (what DDP's averaging does to them), equals one process on the
    global batch: the loss (averaged over the ranks), every row's gradient and every parameter's
    (the anchors, the separation heads)."""
    import torch.multiprocessing as mp

    mp.spawn(_objective_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    batches = _objective_batches()
    for variant in OBJECTIVE_VARIANTS:
        loss, rows, params = _objective_step(_objective(variant), batches, 0, 1)
        ranks = [torch.load(tmp_path / f"{variant}-{rank}.pt") for rank in range(WORLD)]

        def close(got, want, what, variant=variant):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=lambda m: f"{variant}: {what}: {m}")

        close(sum(r[0] for r in ranks) / WORLD, loss, "loss")
        for key, want in rows.items():
            if want is None:
                assert all(r[1][key] is None for r in ranks), f"{variant}: {key}"
                continue
            close(torch.cat([r[1][key] for r in ranks], dim=1 if key.startswith("views") else 0) / WORLD, want, key)
        for name, want in params.items():
            if want is None:
                assert all(r[2][name] is None for r in ranks), f"{variant}: {name}"
                continue
            close(sum(r[2][name] for r in ranks) / WORLD, want, name)
        if "multi_sk" in variant or variant == "sinkhorn":
            assert loss > 0 and params["sspc.input_anchors.text.weight"] is not None  # the anchor terms were on


def test_sspc_loss_process_group_checked():
    with pytest.raises(TypeError, match="process_group"):
        mmot.nn.SSPCLoss({"video": 4, "text": 4}, 4, 2, 4, process_group=object())
    assert mmot.nn.SSPCLoss({"video": 4, "text": 4}, 4, 2, 4).process_group is None


def test_reproduce_inside_torchrun_is_refused(monkeypatch, capsys):
    from mmot.sspc.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["reproduce", "--quick"]) == 2
    assert "without torchrun" in capsys.readouterr().err
