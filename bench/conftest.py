"""pytest-benchmark suites: `pytest bench` (never part of the normal test run, which collects tests/ only)."""

import importlib.util

import pytest


def pytest_configure(config):
    if importlib.util.find_spec("pytest_benchmark") is None:
        pytest.exit('pytest bench needs pytest-benchmark: pip install "mmot[bench]"', returncode=4)
