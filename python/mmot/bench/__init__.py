"""Benchmarks: the ``mmot-bench`` runner (cli) over the workload registry (workloads), with the
baselines it compares against (baselines), side-by-side timing (timing), physical floors (floors),
peak memory (memory), the check against the reference (check) and its tables (report).
docs/benchmarks.md describes them."""
