"""Smoke test of the mmot-bench CLI and its handling of bad flags."""

import json
import subprocess
import sys

import pytest
import torch

from mmot.bench import cli


def test_quick_run_writes_json_markdown_and_plot(tmp_path, capsys):
    out = tmp_path / "bench.json"
    cli.main(["--quick", "--ops", "similarity", "--repeats", "1", "--json", str(out), "--plot", str(tmp_path / "b.png"),
              "--markdown", str(tmp_path / "b.md")])
    report = json.loads(out.read_text())
    assert set(report) >= {"machine", "records", "command"}
    providers = {r["provider"] for r in report["records"]}
    assert {"mmot-rust", "reference-eager"} <= providers
    for record in report["records"]:
        assert set(record) >= {"op", "shape", "provider", "median_ms", "min_ms", "max_ms", "gbps"}
        assert 0 < record["min_ms"] <= record["median_ms"] <= record["max_ms"]
    assert (tmp_path / "b.png").stat().st_size > 1000
    assert "mmot speed-up" in (tmp_path / "b.md").read_text()
    assert "similarity" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--ops", "nonsense"], "invalid choice"),
        (["--device", "tpu"], "invalid choice"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--json", "/nonexistent/dir/out.json"], "does not exist"),
    ],
)
def test_bad_flags_get_a_clear_message(flags, message):
    result = subprocess.run([sys.executable, "-m", "mmot.bench.cli", *flags], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_unavailable_device_is_explained():
    result = subprocess.run([sys.executable, "-m", "mmot.bench.cli", "--device", "cuda"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no CUDA device is available" in result.stderr
