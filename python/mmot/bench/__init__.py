"""Benchmarks: the ``mmot-bench`` CLI (cli, workloads, timing) and the baselines users would otherwise run."""
