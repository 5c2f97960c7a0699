"""process_group on the kernels: rows sharded over 2 and 3 gloo processes, each running the Rust or
the Triton kernel (the interpreter, tiny shapes), equal the single-process kernel call on the
concatenated rows, forward and backward; the kernels really run; bad input is refused.

Each test spawns its processes once and runs every case in them. Workers save their results
before a barrier and leave by ``os._exit`` (gloo's teardown aborted a worker now and then).
"""

import json
import os
import socket

import mmot
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from inputs import cosine_scores, random_scores

SPLITS = {2: [5, 8], 3: [4, 1, 8]}  # uneven shards of 13 rows (one of a single row)
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _mixed_range(dtype):
    # One shard alone has a small exponent range (plain domain); with the other shard's large
    # scores the range over all rows needs the log domain: "auto" must decide on the whole.
    scores = random_scores(13, 6, seed=7)
    scores[5:] *= 40.0
    return scores.to(dtype)


def cases(world):
    """name -> (backend, scores, upstream gradient, call)."""
    f64, f32 = torch.float64, torch.float32
    scores = random_scores(2, 13, 6, seed=1)
    upstream = random_scores(2, 13, 6, seed=2)
    cosine = cosine_scores(13, 6, seed=3)
    mass = torch.full((6,), 13 / 6, dtype=f64)
    col_mass = torch.rand(2, 6, generator=torch.Generator().manual_seed(4), dtype=f64) + 0.5
    found = {
        "rust-sinkhorn": ("rust", scores, upstream, lambda s, **kw: mmot.sinkhorn(s, 0.4, 4, **kw)),
        "rust-sinkhorn-log": ("rust", scores, upstream, lambda s, **kw: mmot.sinkhorn(s, 0.4, 4, log_domain=True, **kw)),
        "rust-sinkhorn-f32-masses": (
            "rust",
            scores.to(f32),
            upstream.to(f32),
            lambda s, **kw: mmot.sinkhorn(s, 0.3, 5, col_mass=col_mass.to(s.dtype), **kw),
        ),
        "rust-sinkhorn-mixed-range": ("auto", _mixed_range(f64), upstream[0], lambda s, **kw: mmot.sinkhorn(s, 0.05, 3, **kw)),
        "rust-multi": ("rust", scores, upstream, lambda s, **kw: mmot.multi_sinkhorn(s, 2, 0.3, 6, anchor_mass=mass, **kw)),
        "rust-multi-log-none": (
            "rust",
            scores,
            upstream,
            lambda s, **kw: mmot.multi_sinkhorn(s, 3, 0.3, 6, log_domain=True, normalize="none", **kw),
        ),
        "rust-multi-f32": ("auto", cosine.to(f32), upstream[0].to(f32), lambda s, **kw: mmot.multi_sinkhorn(s, 3, 0.07, 8, **kw)),
        "rust-multi-tiny-eps": ("rust", cosine, upstream[0], lambda s, **kw: mmot.multi_sinkhorn(s, 3, 1e-3, 5, **kw)),
        "rust-multi-three-groups": (
            "rust",
            scores,
            upstream,
            lambda s, **kw: mmot.multi_sinkhorn(s, 2, 0.5, 4, slot_weights=[0.2, 0.5, 0.5, 1.0, 1.0, 0.2], **kw),
        ),
        "rust-multi-mixed-range": ("rust", _mixed_range(f64), upstream[0], lambda s, **kw: mmot.multi_sinkhorn(s, 3, 0.05, 4, **kw)),
        "triton-sinkhorn": ("triton", scores[0], upstream[0], lambda s, **kw: mmot.sinkhorn(s, 0.4, 3, **kw)),
        "triton-multi": ("triton", cosine, upstream[0], lambda s, **kw: mmot.multi_sinkhorn(s, 3, 0.1, 3, **kw)),
        "triton-multi-f32": ("triton", cosine.to(f32), upstream[0].to(f32), lambda s, **kw: mmot.multi_sinkhorn(s, 2, 0.1, 3, **kw)),
    }
    if world == 3:  # the 3-process run keeps one Triton case of each op: the interpreter is slow
        found = {name: case for name, case in found.items() if name not in ("triton-multi-f32", "rust-multi-three-groups")}
    return found


class Counter:
    """Counts the calls of a function it wraps."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def _no_reference(*args, **kwargs):
    raise AssertionError("the sharded kernel path fell back to mmot.reference")


def _spies():
    """Count the sharded Rust entries and the Triton launchers; forbid the reference."""
    from mmot import _core, reference
    from mmot.kernels import multi_sinkhorn as triton_multi
    from mmot.kernels import sinkhorn as triton_sinkhorn

    spies = {}
    for name in ("sharded_sinkhorn", "sharded_sinkhorn_backward", "sharded_multi_sinkhorn", "sharded_multi_sinkhorn_backward"):
        spies[name] = Counter(getattr(_core, name))
        setattr(_core, name, spies[name])
    for label, module in (("triton_sinkhorn", triton_sinkhorn), ("triton_multi", triton_multi)):
        for fn in ("forward", "backward"):
            spies[f"{label}.{fn}"] = Counter(getattr(module, fn))
            setattr(module, fn, spies[f"{label}.{fn}"])
    reference.sinkhorn = reference.multi_sinkhorn = _no_reference
    return spies


def worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = dist.group.WORLD
    spies = _spies()
    for name, (backend, scores, upstream, fn) in cases(world).items():
        before = {key: spy.calls for key, spy in spies.items()}
        shard = scores.split(SPLITS[world], dim=-2)[rank].clone().requires_grad_(True)
        out = fn(shard, process_group=group, backend=backend)
        (out * upstream.split(SPLITS[world], dim=-2)[rank]).sum().backward()
        calls = {key: spy.calls - before[key] for key, spy in spies.items()}
        torch.save((out.detach(), shard.grad, calls), os.path.join(out_dir, f"{name}-{rank}.pt"))
    errors = []
    shard = random_scores(SPLITS[world][rank], 6, seed=5)
    for call in (
        lambda: mmot.sinkhorn(shard, process_group=group, backend="cuda"),
        lambda: mmot.multi_sinkhorn(shard, 2, process_group=group, backend="fast"),
        lambda: mmot.multi_sinkhorn(shard, 2, 1e-4, process_group=group, backend="rust", log_domain=False),
    ):
        try:
            call()
            errors.append(None)
        except (ValueError, TypeError) as error:
            errors.append(f"{type(error).__name__}: {error}")
    torch.save(errors, os.path.join(out_dir, f"errors-{rank}.pt"))
    dist.barrier()
    os._exit(0)  # gloo's teardown aborted a worker now and then; the results are on disk


def _run(world, tmp_path):
    mp.spawn(worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    for name, (backend, scores, upstream, fn) in cases(world).items():
        full = scores.clone().requires_grad_(True)
        want = fn(full, backend=backend)  # the single-process kernel call
        (want * upstream).sum().backward()
        shards = [torch.load(tmp_path / f"{name}-{rank}.pt") for rank in range(world)]
        tol = TOL[scores.dtype]
        got = torch.cat([out for out, _, _ in shards], dim=-2)
        torch.testing.assert_close(got, want.detach(), **tol, msg=lambda m, name=name: f"{name}: {m}")
        grad = torch.cat([g for _, g, _ in shards], dim=-2)
        torch.testing.assert_close(grad, full.grad, rtol=10 * tol["rtol"], atol=10 * tol["atol"], msg=lambda m, name=name: f"{name}: {m}")
        calls = shards[0][2]
        op = "multi" if "multi" in name else "sinkhorn"
        if backend == "triton":
            assert calls[f"triton_{op}.forward"] >= 1 and calls[f"triton_{op}.backward"] == 1, (name, calls)
        else:
            stem = "sharded_multi_sinkhorn" if op == "multi" else "sharded_sinkhorn"
            assert calls[stem] == 1 and calls[f"{stem}_backward"] == 1, (name, calls)
    for rank in range(world):
        errors = torch.load(tmp_path / f"errors-{rank}.pt")
        assert errors[0].startswith("ValueError: mmot.sinkhorn: argument 'backend' must be one of"), errors[0]
        assert errors[1].startswith("ValueError: mmot.multi_sinkhorn: argument 'backend' must be one of"), errors[1]
        assert errors[2].startswith("ValueError: mmot.multi_sinkhorn: log_domain=False forces the plain domain"), errors[2]


@pytest.mark.slow
def test_two_processes_equal_the_single_process_kernels(tmp_path):
    _run(2, tmp_path)


@pytest.mark.slow
def test_three_processes_equal_the_single_process_kernels(tmp_path):
    _run(3, tmp_path)


@pytest.mark.slow
def test_bench_distributed_reports_the_three_providers(tmp_path, capsys):
    from mmot.bench import cli

    out = tmp_path / "dist.json"
    cli.main(["distributed", "--tiny", "--no-backward", "--json", str(out)])
    records = json.loads(out.read_text())["records"]
    assert {(r["provider"], r["world"]) for r in records} == {("sharded-kernel", 2), ("sharded-reference", 2), ("single-kernel", 1)}
    assert all(r["median_s"] > 0 and r["mode"] == "forward" for r in records)
    assert "sharded-kernel is" in capsys.readouterr().out
