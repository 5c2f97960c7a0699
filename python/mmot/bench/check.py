"""``mmot-bench --check``: every provider's result (and, with ``--backward``, gradients) against ``mmot.reference``.

The reference runs on float64 copies of the workload's inputs; a provider's error is its largest
absolute deviation over the largest absolute reference entry. Providers that return something
other than the op's result (flash-sinkhorn returns a transport cost) are not compared.
"""

from __future__ import annotations

from collections.abc import Callable

from mmot.bench.workload import Provider, Workload, backward_of, forward


def relative_error(got, want) -> float:
    """max |got − want| / max |want| over a tensor or a tuple of tensors (inf on a shape mismatch)."""
    got = got if isinstance(got, tuple | list) else (got,)
    want = want if isinstance(want, tuple | list) else (want,)
    if len(got) != len(want):
        return float("inf")
    worst = 0.0
    for g, w in zip(got, want):
        if g.shape != w.shape:
            return float("inf")
        scale = float(w.abs().max()) if w.numel() else 0.0
        deviation = float((g.double() - w.double()).abs().max()) if w.numel() else 0.0
        worst = max(worst, deviation / scale if scale > 0 else deviation)
    return worst


def check(workload: Workload, inputs: dict, backward: bool) -> list[dict]:
    """One record per comparable provider and pass: error, tolerance, ok."""
    passes: list[tuple[str, Callable]] = [("forward", forward)]
    if backward:
        passes.append(("forward+backward", lambda fn: backward_of(fn, workload.grad_inputs)))
    records = []
    for mode, wrap in passes:
        expected = wrap(workload.expected)(inputs)
        for name, provider in workload.providers.items():
            if not isinstance(provider, Provider) or not provider.comparable:
                continue
            if mode != "forward" and not provider.differentiable:
                continue
            record: dict = {"label": workload.label, "provider": name, "mode": mode, "tolerance": workload.tolerance}
            try:
                record["error"] = relative_error(wrap(provider.run)(inputs), expected)
                record["ok"] = record["error"] <= workload.tolerance
            except Exception as error:
                record.update(error=None, ok=False, note=f"{type(error).__name__}: {error}"[:200])
            records.append(record)
    return records
