"""pytest-benchmark suite over the same workloads and providers as ``mmot-bench``.

    pytest bench/test_providers.py --benchmark-group-by=group [-k multi_sinkhorn] [--benchmark-json out.json]

Each benchmark is grouped by op and size, with the provider as its parameter. Set
MMOT_BENCH_DEVICE=cuda to run on a GPU and MMOT_BENCH_QUICK=1 for the smaller sizes.
"""

import os

import pytest
import torch

from mmot.bench import workloads

DEVICE = torch.device(os.environ.get("MMOT_BENCH_DEVICE", "cpu"))
QUICK = os.environ.get("MMOT_BENCH_QUICK", "0") == "1"


def _cases():
    for make in workloads.OPS.values():
        for workload in make(DEVICE, QUICK):
            for provider, fn in workload.providers.items():
                marks = [] if callable(fn) else [pytest.mark.skip(reason=str(fn))]
                yield pytest.param(workload, provider, id=f"{workload.op}[{workload.shape}]-{provider}", marks=marks)


_inputs_cache: dict[tuple[str, str], dict] = {}


@pytest.mark.parametrize("workload, provider", list(_cases()))
def test_provider(benchmark, workload, provider):
    benchmark.group = f"{workload.op} {workload.shape}"
    key = (workload.op, workload.shape)
    if key not in _inputs_cache:
        _inputs_cache.clear()  # keep one workload's inputs alive at a time
        _inputs_cache[key] = workload.make_inputs(DEVICE)
    inputs = _inputs_cache[key]
    fn = workload.providers[provider]
    with torch.no_grad():
        fn(inputs)  # warm-up (compilation, thread pools)
        if DEVICE.type == "cuda":
            benchmark(lambda: (fn(inputs), torch.cuda.synchronize()))
        else:
            benchmark(fn, inputs)
