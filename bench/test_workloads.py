"""pytest-benchmark suites over the ``mmot-bench`` workload registry: one benchmark per workload, provider and pass.

    pytest bench --benchmark-group-by=group [-k "multi_sinkhorn and not bwd"] [--benchmark-json out.json]

Benchmarks are grouped by workload and pass ("fwd", or "fwd+bwd" for the differentiable
providers), with the provider as the parameter. MMOT_BENCH_DEVICE=cuda runs on a GPU;
MMOT_BENCH_SIZE=quick or tiny picks smaller sizes (default full). Interleaved ratios, floors,
peak memory and the check against the reference are ``mmot-bench``'s.
"""

import os

import pytest
import torch
from mmot.bench.workload import Provider, backward_of, forward
from mmot.bench.workloads import select

DEVICE = torch.device(os.environ.get("MMOT_BENCH_DEVICE", "cpu"))
SIZE = os.environ.get("MMOT_BENCH_SIZE", "full")


def _cases():
    for workload in select(DEVICE, SIZE):
        for name, provider in workload.providers.items():
            passes = ["fwd", "fwd+bwd"] if isinstance(provider, Provider) and provider.differentiable else ["fwd"]
            for mode in passes:
                marks = [] if isinstance(provider, Provider) else [pytest.mark.skip(reason=str(provider))]
                yield pytest.param(workload, name, mode, id=f"{workload.label.replace(' · ', '[')}]-{name}-{mode}", marks=marks)


_inputs: dict[str, dict] = {}


@pytest.mark.parametrize("workload, provider, mode", list(_cases()))
def test_workload(benchmark, workload, provider, mode):
    benchmark.group = f"{workload.label} {mode}"
    if workload.label not in _inputs:
        _inputs.clear()  # one workload's inputs alive at a time
        _inputs[workload.label] = workload.make_inputs(DEVICE, False)
    inputs = _inputs[workload.label]
    run = workload.providers[provider].run
    call = forward(run) if mode == "fwd" else backward_of(run, workload.grad_inputs)
    call(inputs)  # warm-up: compilation, thread pools
    if DEVICE.type == "cuda":
        benchmark(lambda: (call(inputs), torch.cuda.synchronize(DEVICE)))
    else:
        benchmark(call, inputs)
