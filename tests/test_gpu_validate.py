"""mmot-bench's validation cases (bench/validate.py) through the code path a GPU runs: every op on
Rust, torch and Triton (interpreter), wrong results reported as failures, and the --gpu-validate
command's robustness (failures recorded, the JSON written after every workload)."""

import json
import math

import mmot
import pytest
import torch
from backends import needs_triton
from mmot.bench import cli, validate, workloads

CPU = torch.device("cpu")
OPS = {"sinkhorn", "multi_sinkhorn", "similarity", "info_nce", "anchor_consistency_loss"}


@needs_triton
def test_every_case_passes_on_cpu_backends_and_triton_launches_both_structures():
    records, skipped = validate.run(CPU)
    assert not skipped
    failed = [(r["label"], r["mode"], r.get("error"), r.get("note")) for r in records if not r["ok"]]
    assert not failed
    assert {r["op"] for r in records} == OPS
    assert {r["backend"] for r in records} == {"rust", "torch", "triton", "auto"}
    assert {r["dtype"] for r in records} == {"float64", "float32", "bfloat16", "float16"}
    for op in OPS:
        for dtype in ("float64", "float32"):
            modes = {r["mode"] for r in records if (r["op"], r["dtype"], r["backend"]) == (op, dtype, "triton")}
            assert modes == {"forward", "backward"}, (op, dtype)
    launches = {(r["op"], r["launch"], tuple(r["programs_per_problem"])) for r in records if r["launch"] and r["mode"] == "forward"}
    assert launches == {(op, launch, (programs,)) for op in validate.SINKHORN_OPS for launch, programs in (("persistent", 1), ("split", 3))}


def test_cuda_shapes_reach_both_launch_structures():
    from mmot.kernels import _common

    cases = validate.cases(torch.device("cuda"))
    assert {c.backend for c in cases} == {"triton", "auto"}
    for case in (c for c in cases if c.launch):
        *batch, n, k = case.dims
        groups = 2 if case.op == "multi_sinkhorn" else 1
        if case.launch == "split":  # one problem above the split threshold
            assert not batch and n * k * groups >= _common.SPLIT_MIN_ELEMENTS
        else:  # a batch of problems, each below it
            assert batch and n * k * groups < _common.SPLIT_MIN_ELEMENTS
    assert any(c.dims[-1] > 256 for c in cases if c.op == "info_nce")  # several feature tiles


def test_a_wrong_result_fails_its_case(monkeypatch):
    real = mmot.sinkhorn
    monkeypatch.setattr(mmot, "sinkhorn", lambda *args, **kwargs: real(*args, **kwargs) * (1 + 1e-6))
    records = validate.run_case(validate.Case("sinkhorn", (2, 7, 5), torch.float64, "rust"), CPU)
    assert [r["mode"] for r in records] == ["forward", "backward"]
    assert not any(r["ok"] for r in records) and all(r["error"] > 1 for r in records)
    # The same error passes at float32's tolerance: the limit is the dtype's.
    assert all(r["ok"] for r in validate.run_case(validate.Case("sinkhorn", (2, 7, 5), torch.float32, "rust"), CPU))


def test_a_wrong_gradient_alone_fails_the_backward(monkeypatch):
    real = mmot.similarity

    def wrong_gradient(*args, **kwargs):
        out = real(*args, **kwargs)
        return out.detach() + (out - out.detach()) * 1.01  # the same values, gradients 1% off

    monkeypatch.setattr(mmot, "similarity", wrong_gradient)
    records = validate.run_case(validate.Case("similarity", (5, 7, 9), torch.float32, "rust"), CPU)
    assert {(r["mode"], r.get("input"), r["ok"]) for r in records} == {
        ("forward", None, True),
        ("backward", "x", False),
        ("backward", "y", False),
    }


@needs_triton
def test_the_other_launch_structure_fails_a_sinkhorn_case(monkeypatch):
    from mmot.kernels import _common

    monkeypatch.setattr(_common, "FORCE_PROGRAMS_PER_PROBLEM", 3)
    monkeypatch.setattr(_common, "FORCE_TILE_ROWS", 2)
    records = validate.run_case(validate.Case("sinkhorn", (13, 6), torch.float32, "triton", "persistent"), CPU)
    assert all(r["error"] <= 1 for r in records)  # right values, wrong structure
    assert not any(r["ok"] for r in records)
    assert "launched split" in records[0]["note"]


def test_an_exception_is_a_failed_record_and_the_run_goes_on(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(mmot, "info_nce", broken)
    monkeypatch.setattr(validate, "cases", lambda device: [validate.Case(op, dims, torch.float64, "rust") for op, dims in CASES])
    records, _ = validate.run(CPU)
    broken_records = [r for r in records if r["op"] == "info_nce"]
    assert broken_records and all(not r["ok"] and "kernel exploded" in r["note"] for r in broken_records)
    assert all(r["ok"] for r in records if r["op"] != "info_nce")


CASES = [("info_nce", (21, 9)), ("anchor_consistency_loss", (3, 4, 9))]


def test_excess_is_assert_close_rule():
    want = torch.tensor([1.0, -2.0, 0.0])
    assert validate.excess(want + torch.tensor([0.0, 0.0, 1e-4]), want, 1e-3, 1e-4) == pytest.approx(1.0)
    assert validate.excess(want.double() * (1 + 2e-3), want, 1e-3, 0.0) == pytest.approx(2.0)
    assert math.isinf(validate.excess(want[:2], want, 1e-3, 1e-4))
    assert math.isinf(validate.excess(torch.tensor([float("nan"), 0.0, 0.0]), want, 1e-3, 1e-4))


def test_cli_validate_failure_exits_1_and_is_in_json_and_table(monkeypatch, tmp_path, capsys):
    real = mmot.anchor_consistency_loss
    monkeypatch.setattr(mmot, "anchor_consistency_loss", lambda *args, **kwargs: real(*args, **kwargs) + 1e-3)
    monkeypatch.setattr(validate, "cases", lambda device: [validate.Case(op, dims, torch.float64, "rust") for op, dims in CASES])
    out = tmp_path / "gpu.json"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--tiny", "--ops", "similarity", "--validate", "--json", str(out)])
    assert exit_info.value.code == 1
    report = json.loads(out.read_text())
    cases = [c for c in report["checks"] if c.get("kind") == "validate"]
    assert {(c["op"], c["mode"], c["ok"]) for c in cases} >= {("anchor_consistency_loss", "forward", False), ("info_nce", "forward", True)}
    assert report["complete"] and report["records"]
    assert all("dram_fraction" in r and "floor_fraction" in r for r in report["records"])
    printed = capsys.readouterr().out
    assert "### Validation against mmot.reference on cpu" in printed and "**FAILED**" in printed


def test_a_failing_workload_is_recorded_and_the_rest_run(monkeypatch, tmp_path):
    make = workloads.OPS["sinkhorn"]

    def broken_inputs(device, size, compile_):
        out = make(device, size, compile_)
        for workload in out:
            workload.make_inputs = lambda dev, small: (_ for _ in ()).throw(RuntimeError("CUDA out of memory (simulated)"))
        return out

    monkeypatch.setitem(workloads.OPS, "sinkhorn", broken_inputs)
    out = tmp_path / "gpu.json"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--tiny", "--ops", "sinkhorn", "similarity", "--json", str(out)])
    assert exit_info.value.code == 1
    report = json.loads(out.read_text())
    assert [e["where"] for e in report["errors"]] == ["sinkhorn · B=256 K=96 iters=3"]
    assert "simulated" in report["errors"][0]["error"]
    assert {r["op"] for r in report["records"]} == {"similarity"} and report["complete"]


def test_an_interrupted_run_leaves_the_workloads_it_finished(monkeypatch, tmp_path):
    real = cli._time_workload
    calls = []

    def interrupted_second(workload, *args):
        calls.append(workload.label)
        if len(calls) == 2:
            raise KeyboardInterrupt("signal 15")
        return real(workload, *args)

    monkeypatch.setattr(cli, "_time_workload", interrupted_second)
    out = tmp_path / "gpu.json"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--tiny", "--ops", "similarity", "sinkhorn", "--json", str(out)])
    assert exit_info.value.code == 1
    report = json.loads(out.read_text())
    assert not report["complete"]
    assert {r["op"] for r in report["records"]} == {"similarity"}
    assert report["floors"] and all("floor_fraction" in r for r in report["records"])
    assert report["errors"][-1]["where"] == "interrupted"


def test_budget_skips_the_workloads_it_has_no_time_for(tmp_path):
    out = tmp_path / "gpu.json"
    cli.main(["--tiny", "--ops", "similarity", "--budget", "1e-9", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["complete"] and not report["records"]
    assert [s["reason"] for s in report["skipped"]] == ["time budget: 0 s spent before it started"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_validate_without_cuda_is_explained(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--gpu-validate"])
    assert exit_info.value.code == 2
    assert "no CUDA device is available" in capsys.readouterr().err


def test_gpu_preset_compiles_three_references_and_adds_the_gpu_info_nce_size():
    assert sorted(cli.GPU_ORDER) == sorted(workloads.OPS)  # every op, targets first
    selected = workloads.select(torch.device("cuda"), "full", compile_=True)
    cli._limit_compiled(selected)
    compiled = [w.label for w in selected if isinstance(w.providers.get("reference-compiled"), workloads.Provider)]
    assert len(compiled) == 3 and any(label.startswith("multi_sinkhorn · N=7660 K=64 ") for label in compiled)
    (gpu_size,) = [w for w in selected if w.label == "info_nce · N=M=65536 D=512"]
    assert gpu_size.target == workloads.Target("materialized", 1 / 1.2)
    assert gpu_size.reference_bytes > 140 * 2**30  # never checked on one GPU: the float64 logits alone are 32 GiB
