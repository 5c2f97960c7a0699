"""Across ops: backend choice, the checks switch (MMOT_CHECKS, mmot.set_checks), and the Rust thread pool (MMOT_NUM_THREADS)."""

import os
import subprocess
import sys

import mmot
import pytest
import torch
from backends import needs_triton
from bad_input import bad_input_test
from gradients import grad_of
from inputs import random_scores


def run_python(code, **env):
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


# ---------------------------------------------------------------- backend choice


def test_auto_is_rust_on_cpu_and_matches_torch():
    scores = random_scores(3, 17, 9, seed=1)
    torch.testing.assert_close(mmot.multi_sinkhorn(scores), mmot.multi_sinkhorn(scores, backend="rust"), rtol=0, atol=0)
    torch.testing.assert_close(mmot.multi_sinkhorn(scores), mmot.multi_sinkhorn(scores, backend="torch"), rtol=1e-10, atol=1e-10)


@needs_triton
def test_triton_on_cpu_needs_the_interpreter():
    code = (
        "import torch, mmot\n"
        "try:\n    mmot.multi_sinkhorn(torch.randn(5, 4), backend='triton')\n"
        "except ValueError as error:\n    print(error)\n"
    )
    assert "TRITON_INTERPRET=1" in run_python(code, TRITON_INTERPRET="0")


# ---------------------------------------------------------------- value checks


def test_mmot_checks_env_turns_value_checks_off():
    code = "import torch, mmot; s = torch.randn(4, 3); s[0, 0] = float('nan'); mmot.multi_sinkhorn(s); print('ran')"
    assert "ran" in run_python(code, MMOT_CHECKS="0")
    failing = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "MMOT_CHECKS": "1"})
    assert failing.returncode != 0 and "must be finite" in failing.stderr


def test_value_checks_can_be_switched_off():
    scores = random_scores(6, 4, seed=0)
    previous = mmot.set_checks(False)
    try:
        out = mmot.multi_sinkhorn(scores, anchor_mass=torch.full((4,), 2.0, dtype=torch.float64))  # not N/K, unchecked
        assert out.shape == scores.shape
        with pytest.raises(ValueError, match="'k'"):  # parameter checks always run
            mmot.multi_sinkhorn(scores, k=9)
    finally:
        mmot.set_checks(previous)
    with pytest.raises(ValueError, match="'anchor_mass' must be uniform"):
        mmot.multi_sinkhorn(scores, anchor_mass=torch.full((4,), 2.0, dtype=torch.float64))


test_bad_input_is_named = bad_input_test("mmot.set_checks", [(lambda: mmot.set_checks("no"), TypeError, "'enabled'", "bool")])


# ---------------------------------------------------------------- the Rust thread pool


def test_results_do_not_depend_on_thread_count():
    code = (
        "import torch, mmot; g = torch.Generator().manual_seed(0); s = torch.randn(3, 700, 33, generator=g);"
        "print(mmot.multi_sinkhorn(s, 9).double().sum(-1).tolist()[0][:5], mmot.sinkhorn(s).double().square().sum().item())"
    )
    outputs = {run_python(code, MMOT_NUM_THREADS=str(n)) for n in (1, 2, 3)}
    assert len(outputs) == 1, outputs


def test_backward_is_deterministic_across_thread_counts(monkeypatch):
    scores = random_scores(3000, 64, seed=1, dtype=torch.float32)
    upstream = random_scores(3000, 64, seed=2, dtype=torch.float32)
    results = []
    for threads in ("1", "2"):
        monkeypatch.setenv("MMOT_NUM_THREADS", threads)
        results.append(
            [
                grad_of(lambda s: mmot.multi_sinkhorn(s, 32, backend="rust"), scores, upstream),
                grad_of(lambda s: mmot.sinkhorn(s, 0.05, 3, backend="rust"), scores, upstream),
            ]
        )
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_rust_results_are_deterministic():
    scores = random_scores(2, 500, 40, seed=2, dtype=torch.float32)
    first = mmot.multi_sinkhorn(scores, 20)
    for _ in range(3):
        assert torch.equal(mmot.multi_sinkhorn(scores, 20), first)
