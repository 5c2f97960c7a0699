"""mmot-bench: the runner's flags on tiny workloads, its floor model and its messages for bad flags and missing extras."""

import importlib.util
import json
import math
import subprocess
import sys
import time

import mmot
import pytest
import torch
from mmot import reference
from mmot.bench import cli, floors, workloads


def test_tiny_run_with_backward_and_check_writes_json_markdown_and_plot(tmp_path, capsys):
    out = tmp_path / "bench.json"
    cli.main(
        [
            "--tiny",
            "--ops",
            "similarity",
            "sinkhorn",
            "--backward",
            "--check",
            "--json",
            str(out),
            "--plot",
            str(tmp_path / "b.png"),
            "--markdown",
            str(tmp_path / "b.md"),
        ]
    )
    report = json.loads(out.read_text())
    assert set(report) >= {"machine", "records", "command", "floors", "checks", "skipped"}
    assert report["machine"]["rates"]["dram_gbps"] > 0
    rows = {(r["op"], r["provider"], r["mode"]) for r in report["records"]}
    for op in ("similarity", "sinkhorn"):
        assert {(op, "mmot-rust", "forward"), (op, "reference-eager", "forward"), (op, "mmot-rust", "forward+backward")} <= rows
    assert ("sinkhorn", "swav-eager", "forward") in rows and ("sinkhorn", "swav-eager", "forward+backward") not in rows
    for record in report["records"]:
        assert set(record) >= {"op", "shape", "provider", "median_ms", "min_ms", "max_ms", "gbps", "floor_kind", "speedup_min"}
        assert 0 < record["min_ms"] <= record["median_ms"] <= record["max_ms"]
        assert record["floor_kind"] in floors.KINDS
        assert 0 < record["floor_fraction"] <= 1
    assert report["checks"] and all(c["ok"] for c in report["checks"])
    assert {c["mode"] for c in report["checks"]} == {"forward", "forward+backward"}
    assert (tmp_path / "b.png").stat().st_size > 1000
    markdown = (tmp_path / "b.md").read_text()
    assert "mmot speed-up (min)" in markdown and "fraction of floor" in markdown and "max error" in markdown
    printed = capsys.readouterr().out
    assert "similarity" in printed and "Check against mmot.reference: " in printed


def test_check_fails_on_a_wrong_provider(monkeypatch, capsys):
    make = workloads.OPS["similarity"]

    def with_wrong_provider(device, size, compile_):
        out = make(device, size, compile_)
        for workload in out:
            workload.providers["off-by-a-bit"] = workloads.Provider(lambda x: reference.similarity(x["x"], x["y"]) * 1.01)
        return out

    monkeypatch.setitem(workloads.OPS, "similarity", with_wrong_provider)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--tiny", "--ops", "similarity", "--check"])
    assert exit_info.value.code == 1
    printed = capsys.readouterr().out
    assert "MISMATCH" in printed and "off-by-a-bit" in printed
    assert "2 of 3 passed" in printed


def test_memory_gives_each_provider_a_peak(tmp_path):
    out = tmp_path / "bench.json"
    cli.main(["--tiny", "--ops", "info_nce", "--memory", "--json", str(out)])
    records = json.loads(out.read_text())["records"]
    assert {r["provider"] for r in records} == {"mmot-rust", "materialized"}
    for record in records:
        assert isinstance(record["peak_mib"], float) and record["peak_mib"] >= 0


def test_floor_is_the_binding_one():
    rates = floors.Rates(dram_gbps=10, cache_gbps=100, gemm_gflops=100, exp_per_s=1e9, llc_bytes=2**20, l1_bytes=2**10)
    swav = workloads.select(torch.device("cpu"), "quick", ["sinkhorn"])[0].work  # one 49 MB matrix, larger than the cache
    assert floors.floor(swav, rates).kind == "dram"
    assert math.isclose(floors.floor(swav, rates).ms, 5 * 4096 * 3000 * 4 / 10e9 * 1e3)
    in_cache = floors.Work(footprint=2**19, traffic=21 * 2**18, resident=2**18)
    assert floors.floor(in_cache, rates).kind == "cache"
    assert floors.floor(floors.Work(footprint=2**19, traffic=2**19, flops=1e9), rates).kind == "compute"
    # A problem that fits L1 is re-read from L1 or registers: only its footprint counts against the cache.
    tiny_problems = floors.Work(footprint=2**19, traffic=21 * 2**18, resident=2**9)
    assert math.isclose(floors.floor(tiny_problems, rates).parts_ms["cache"], 2**19 / 100e9 * 1e3)
    assert floors.floor(tiny_problems, rates).kind == "cache"


def test_swav_size_prints_its_target():
    (swav,) = workloads.select(torch.device("cpu"), "quick", ["sinkhorn"])
    rates = floors.Rates(dram_gbps=40, cache_gbps=200, gemm_gflops=100, exp_per_s=1e9, llc_bytes=2**25, l1_bytes=2**15)
    rows = [
        {"label": swav.label, "mode": "forward", "provider": "mmot-rust", "min_ms": 12.0, "median_ms": 14.0},
        {"label": swav.label, "mode": "forward", "provider": "swav-eager", "min_ms": 33.0, "median_ms": 33.0},
    ]
    (target,) = cli._targets({"records": rows}, [swav], rates)
    assert target["met"] == [True, False]  # 2.75x and 1.96x the floor by min; 2.36x by median
    assert "met by min, not by median" in target["text"] and "4 reads + 1 write" in target["text"]


def test_missing_pot_skips_its_rows_with_the_extra_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ot" else real(name, *a))
    (workload,) = workloads.select(torch.device("cpu"), "tiny", ["sinkhorn"])
    assert workload.providers["pot-numpy"] == workload.providers["pot-torch"] == 'POT is not installed: pip install "mmot[bench]"'


def test_missing_matplotlib_is_one_line_naming_the_extra(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--tiny", "--plot", str(tmp_path / "b.png")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == 'mmot-bench --plot needs matplotlib: pip install "mmot[bench]"'


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--ops", "nonsense"], "invalid choice"),
        (["--device", "tpu"], "invalid choice"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--json", "/nonexistent/dir/out.json"], "does not exist"),
        (["--quick", "--tiny"], "not allowed with"),
    ],
)
def test_bad_flags_get_a_clear_message(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_unavailable_device_is_explained():
    result = subprocess.run([sys.executable, "-m", "mmot.bench.cli", "--device", "cuda"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "no CUDA device is available" in result.stderr


def test_backward_ratio_times_both_halves(capsys):
    from mmot.bench import backward_ratio
    from mmot.bench.workloads import cosine_scores

    forward, backward = backward_ratio.measure(lambda: cosine_scores(9, 5), lambda x: mmot.sinkhorn(x, 0.1, 3), repeats=1)
    assert 0 < forward < 1e4 and 0 < backward < 1e4
    cli.main(["backward-ratio", "--cases", "sinkhorn_4x4", "--repeats", "1"])
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("sinkhorn 65536x(4x4)") and line.endswith("x")
    forward, backward = backward_ratio.measure(
        lambda: cosine_scores(9, 5), lambda x: mmot.sinkhorn(x, 0.1, 3), repeats=1, clock=time.process_time
    )
    assert 0 < forward < 1e4 and 0 < backward < 1e4
    cli.main(["backward-ratio", "--cases", "sinkhorn_4x4", "--repeats", "1", "--clock", "cpu"])
    assert capsys.readouterr().out.splitlines()[-1].startswith("sinkhorn 65536x(4x4)")
    with pytest.raises(SystemExit):
        cli.main(["backward-ratio", "--cases", "nonsense"])


def test_sinkhorn_options_bench_reports_every_case(capsys):
    from mmot.bench import sinkhorn_options

    rows, cols = torch.tensor([4, 64]), torch.tensor([64, 4])
    row_mass, col_mass = sinkhorn_options.padded_masses(rows, cols, 64)
    torch.testing.assert_close(row_mass.sum(-1), col_mass.sum(-1))
    cli.main(["sinkhorn-options", "--tiny", "--repeats", "1", "--cases", "eps-scaling", "warm-start", "implicit", "overhead"])
    out = capsys.readouterr().out
    assert "geometric  iterations total" in out and "warm iterations" in out and out.count("x faster") == 4
    assert out.count("options") == 5 + 1
    with pytest.raises(SystemExit):
        cli.main(["sinkhorn-options", "--cases", "nonsense"])


def test_backward_ratio_log_rows_force_the_log_domain():
    from mmot.bench import backward_ratio

    table = backward_ratio.cases()
    scores = torch.randn(6, 5, generator=torch.Generator().manual_seed(3))
    for key, want in [
        ("sinkhorn_log", lambda x, log=True: mmot.sinkhorn(x, 0.05, 3, log_domain=log)),
        ("multi_sinkhorn_log", lambda x, log=True: mmot.multi_sinkhorn(x, 32, 0.07, 20, log_domain=log)),
    ]:
        label, _, op = table[key]
        assert label.endswith(", log")
        x = scores if key == "sinkhorn_log" else torch.randn(40, 64, generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(op(x), want(x), rtol=0, atol=0)
        # A plain-domain call on a range past the plain limit is refused; the log row's is not.
        wide = x * 100
        op(wide)
        with pytest.raises(ValueError):
            want(wide, log=False)
