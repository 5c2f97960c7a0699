"""pytest-benchmark suites: `pytest bench` (never part of the normal test run, which collects tests/ only)."""
