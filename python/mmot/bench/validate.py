"""``mmot-bench --validate``: every op's kernels against ``mmot.reference`` on odd shapes, forward and backward.

A :class:`Case` runs one op on seeded random non-zero inputs of one dtype and shape with one
backend, and compares its result and, for float32 and float64, its input gradients under a
seeded upstream gradient, with autograd through ``mmot.reference`` in float64 on the same
(rounded) inputs. The tolerances are the CPU tests': ``tests/gradients.py`` for float64 and
float32 values and gradients (gradients relative to their largest entry), each op's Triton
low-precision test for bfloat16 and float16 values. A value passes where
|got − want| ≤ atol + rtol·|want| (``torch.testing.assert_close``'s rule); a record's ``error``
is the largest |got − want| / (atol + rtol·|want|), so 1 is the limit.

Shapes depend on the device. On CUDA they cover both launch structures of the Triton
Sinkhorn kernels (docs/architecture.md): batched problems run persistent (one program per
problem), a single problem of at least ``SPLIT_MIN_ELEMENTS`` elements is split over
programs. On a CPU (Rust, torch, and Triton through its interpreter, which costs about 1 ms
per program instance) they are a few rows, and the split structure is forced through the
kernels' test hooks. Either way the structure a Triton call really launched is recorded, and
a Sinkhorn case that launched the other one fails.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

import mmot
from mmot import reference

F64 = (1e-9, 1e-10)  # (rtol, atol): tests/gradients.py
F32 = (2e-3, 2e-4)
# Forward only: the ops' Triton low-precision tests (test_<op>.py, test_dtypes_and_layout.py).
LOW_PRECISION = {
    ("sinkhorn", torch.bfloat16): 2e-2,
    ("multi_sinkhorn", torch.bfloat16): 3e-2,
    ("similarity", torch.bfloat16): 2e-2,
    ("similarity", torch.float16): 2e-2,
    ("info_nce", torch.bfloat16): 2e-2,
    ("info_nce", torch.float16): 2e-2,
    ("anchor_consistency_loss", torch.bfloat16): 2e-2,
    ("anchor_consistency_loss", torch.float16): 2e-3,
}
DTYPE_NAMES = {torch.float64: "float64", torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
SINKHORN_OPS = ("sinkhorn", "multi_sinkhorn")

EPS, ITERS = 0.3, 4  # Sinkhorn: the tests' parameters
MULTI_ITERS = 6
TEMPERATURE = 0.1


@dataclass(frozen=True)
class Case:
    """One op, dtype, shape and backend; ``launch`` is the Sinkhorn launch structure the case is for."""

    op: str
    dims: tuple[int, ...]
    dtype: torch.dtype
    backend: str
    launch: str | None = None

    @property
    def backward(self) -> bool:
        return self.dtype in (torch.float64, torch.float32)

    @property
    def tolerance(self) -> tuple[float, float]:
        if self.dtype == torch.float64:
            return F64
        if self.dtype == torch.float32:
            return F32
        tol = LOW_PRECISION[(self.op, self.dtype)]
        return tol, tol

    @property
    def shape(self) -> str:
        return OPS[self.op].describe(self.dims)

    @property
    def label(self) -> str:
        where = f" · {self.launch}" if self.launch else ""
        return f"{self.op} · {self.shape} · {DTYPE_NAMES[self.dtype]} · {self.backend}{where}"


@dataclass(frozen=True)
class OpSpec:
    """How a case of one op makes its inputs, calls mmot and calls the reference.

    inputs(dims, dtype, device): the inputs (floating tensors in ``dtype``, and any parameter
    that depends on the dtype); ``grad_names`` are differentiated. call(inputs, backend) and
    reference(inputs, floating tensors in float64) return the result.
    """

    inputs: Callable[[tuple[int, ...], torch.dtype, torch.device], dict]
    call: Callable[[dict, str], torch.Tensor]
    reference: Callable[[dict], torch.Tensor]
    grad_names: tuple[str, ...]
    describe: Callable[[tuple[int, ...]], str]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_generator(seed), dtype=torch.float64)


def _sinkhorn_inputs(dims, dtype, device) -> dict:
    *batch, n, k = dims
    scores = _randn(*dims, seed=n + k).to(dtype)
    out = {"scores": scores}
    if dtype in (torch.float64, torch.float32):  # non-uniform masses; bf16 cases keep the defaults, as the tests do
        out["rows"] = (torch.rand(*batch, n, generator=_generator(3), dtype=torch.float64) + 0.5).to(dtype)
    return {name: t.to(device) for name, t in out.items()}


def _sinkhorn_call(x: dict, backend: str) -> torch.Tensor:
    return mmot.sinkhorn(x["scores"], EPS, ITERS, row_mass=x.get("rows"), backend=backend)


def _sinkhorn_reference(x: dict) -> torch.Tensor:
    s = x["scores"]
    rows = x.get("rows", torch.ones(s.shape[:-1], dtype=s.dtype, device=s.device))
    cols = (rows.sum(-1, keepdim=True) / s.shape[-1]).expand(*s.shape[:-2], s.shape[-1])
    return reference.sinkhorn(s, EPS, ITERS, rows, cols, "auto")


def _multi_k(dims) -> int:
    return max(1, dims[-1] // 2)


def _multi_normalize(dtype: torch.dtype) -> str:
    # The low-precision Triton test compares T itself: min-max would amplify bf16 rounding.
    return "minmax" if dtype in (torch.float64, torch.float32) else "none"


def _multi_inputs(dims, dtype, device) -> dict:
    scores = _randn(*dims, seed=dims[-2] * 10 + dims[-1]).to(dtype).to(device)
    return {"scores": scores, "normalize": _multi_normalize(dtype)}


def _multi_call(x: dict, backend: str) -> torch.Tensor:
    s = x["scores"]
    return mmot.multi_sinkhorn(s, _multi_k(s.shape), EPS, MULTI_ITERS, normalize=x["normalize"], backend=backend)


def _multi_reference(x: dict) -> torch.Tensor:
    s = x["scores"]
    n, n_anchors = s.shape[-2:]
    k = _multi_k(s.shape)
    weights = [0.25] * (n_anchors - k) + [1.0] * k
    mass = torch.full((*s.shape[:-2], n_anchors), n / n_anchors, dtype=s.dtype, device=s.device)
    return reference.multi_sinkhorn(s, EPS, MULTI_ITERS, weights, k, mass, x["normalize"], "auto")


def _similarity_inputs(dims, dtype, device) -> dict:
    n, m, d = dims
    x = _randn(2, 1, n, d, seed=1)
    x[0, 0, min(1, n - 1)] = 0.0  # a zero row: the norm clamp's branch
    return {"x": x.to(dtype).to(device), "y": _randn(1, 3, m, d, seed=2).to(dtype).to(device)}


def _info_nce_inputs(dims, dtype, device) -> dict:
    n, d = dims
    a = _randn(n, d, seed=14)
    b = a + 0.7 * _randn(n, d, seed=15)  # positive pairs: b[i] a noisy copy of a[i]
    valid = torch.arange(n) % 7 != 3
    return {"a": a.to(dtype).to(device), "b": b.to(dtype).to(device), "valid": valid.to(device)}


def _info_nce_reference(x: dict) -> torch.Tensor:
    valid = x["valid"]
    return reference.info_nce(x["a"], x["b"], valid, TEMPERATURE).sum() / valid.sum()


def _anchor_inputs(dims, dtype, device) -> dict:
    sim = torch.rand(*dims, generator=_generator(11), dtype=torch.float64) * 2 - 1
    target = (torch.rand(*dims, generator=_generator(12), dtype=torch.float64) * 2 - 1).abs()
    return {"sim": sim.to(dtype).to(device), "target": target.to(dtype).to(device)}


def _nk(dims) -> str:
    *batch, n, k = dims
    return f"{'x'.join(map(str, batch)) + 'x' if batch else ''}({n}x{k})"


OPS: dict[str, OpSpec] = {
    "sinkhorn": OpSpec(_sinkhorn_inputs, _sinkhorn_call, _sinkhorn_reference, ("scores",), _nk),
    "multi_sinkhorn": OpSpec(_multi_inputs, _multi_call, _multi_reference, ("scores",), lambda d: f"{_nk(d)} k={_multi_k(d)}"),
    "similarity": OpSpec(
        _similarity_inputs,
        lambda x, backend: mmot.similarity(x["x"], x["y"], scale=2.5, backend=backend),
        lambda x: reference.similarity(x["x"], x["y"], True, 2.5),
        ("x", "y"),
        lambda d: f"(2,1,{d[0]},{d[2]})x(1,3,{d[1]},{d[2]})",
    ),
    "info_nce": OpSpec(
        _info_nce_inputs,
        lambda x, backend: mmot.info_nce(x["a"], x["b"], TEMPERATURE, valid=x["valid"], backend=backend),
        _info_nce_reference,
        ("a", "b"),
        lambda d: f"N={d[0]} D={d[1]}",
    ),
    "anchor_consistency_loss": OpSpec(
        _anchor_inputs,
        lambda x, backend: mmot.anchor_consistency_loss(x["sim"], x["target"], TEMPERATURE, backend=backend),
        lambda x: reference.anchor_consistency_loss(x["sim"], x["target"], TEMPERATURE),
        ("sim",),
        lambda d: "x".join(map(str, d)),
    ),
}

# Per op: {launch (None where the op has one structure): dims on CUDA, dims on a CPU}. On CUDA
# the persistent Sinkhorn shapes are batches of problems below SPLIT_MIN_ELEMENTS each, the
# split ones a single problem above it; odd sizes everywhere, so every tile is ragged.
SHAPES: dict[str, dict[str | None, tuple[tuple[int, ...], tuple[int, ...]]]] = {
    "sinkhorn": {"persistent": ((37, 129, 67), (2, 7, 5)), "split": ((4099, 67), (13, 6))},
    "multi_sinkhorn": {"persistent": ((5, 129, 67), (2, 7, 5)), "split": ((2053, 67), (11, 5))},
    "similarity": {None: ((301, 129, 67), (5, 7, 9))},
    "info_nce": {None: ((1031, 300), (21, 9))},  # D = 300: several feature tiles
    "anchor_consistency_loss": {None: ((3, 3, 217, 67), (3, 4, 9))},
}


def triton_runs_here(device: torch.device) -> str | None:
    """None where backend="triton" runs on ``device``, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "triton on CPU tensors needs TRITON_INTERPRET=1 set before mmot is imported"
    return None


def cases(device: torch.device) -> list[Case]:
    """Every case for ``device``: CUDA runs Triton on every shape and dtype, and "auto" once per op
    in float32; a CPU runs the same with Rust and torch (one shape each) besides Triton."""
    on_cuda = device.type == "cuda"
    backends = ["triton"] if on_cuda else ["rust", "torch", "triton"]
    out = []
    for op, shapes in SHAPES.items():
        dtypes = [torch.float64, torch.float32, torch.bfloat16]
        if op not in SINKHORN_OPS:  # fp16 feeds tensor cores in the GEMM ops; the Sinkhorn kernels load it as bf16
            dtypes.append(torch.float16)
        for backend in backends:
            for launch, (cuda_dims, cpu_dims) in shapes.items():
                if backend != "triton" and launch == "split":
                    continue  # one structure off Triton
                for dtype in dtypes:
                    out.append(Case(op, cuda_dims if on_cuda else cpu_dims, dtype, backend, launch if backend == "triton" else None))
        first_dims = next(iter(shapes.values()))
        out.append(Case(op, first_dims[0] if on_cuda else first_dims[1], torch.float32, "auto"))
    return out


@contextlib.contextmanager
def _launch_structure(case: Case, device: torch.device) -> Iterator[list[int]]:
    """The programs per problem of every Triton Sinkhorn launch in the block; on a CPU a split
    case forces the split structure with the kernels' test hooks (docs/architecture.md)."""
    seen: list[int] = []
    if case.backend != "triton" or case.op not in SINKHORN_OPS:
        yield seen
        return
    from mmot.kernels import _common

    real = _common.programs_per_problem
    forced = (_common.FORCE_PROGRAMS_PER_PROBLEM, _common.FORCE_TILE_ROWS)

    def spy(*args, **kwargs):
        programs = real(*args, **kwargs)
        seen.append(programs)
        return programs

    _common.programs_per_problem = spy
    if case.launch == "split" and device.type != "cuda":
        _common.FORCE_PROGRAMS_PER_PROBLEM, _common.FORCE_TILE_ROWS = 3, 2
    try:
        yield seen
    finally:
        _common.programs_per_problem = real
        _common.FORCE_PROGRAMS_PER_PROBLEM, _common.FORCE_TILE_ROWS = forced


def excess(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> float:
    """max |got − want| / (atol + rtol·|want|): at most 1 where torch.testing.assert_close passes (inf on a shape mismatch or NaN)."""
    if got.shape != want.shape:
        return math.inf
    if want.numel() == 0:
        return 0.0
    got, want = got.double(), want.double()
    deviation = (got - want).abs()
    ratio = torch.where(deviation == 0, 0.0, deviation / (atol + rtol * want.abs()))  # exact entries pass at atol = 0
    return math.inf if bool(torch.isnan(ratio).any()) else float(ratio.max())


def _gradient_scale(want: torch.Tensor, dtype: torch.dtype) -> float:
    """tests/gradients.py: gradients scale with 1/eps, so they compare relative to their largest entry."""
    return max(float(want.abs().max()) if want.numel() else 0.0, 1e-3 if dtype == torch.float64 else 1.0)


def _upstream(out: torch.Tensor, seed: int = 5) -> torch.Tensor:
    return torch.randn(out.shape, generator=_generator(seed), dtype=torch.float64).to(out.device)


def _values_and_grads(fn: Callable[[dict], torch.Tensor], inputs: dict, names: tuple[str, ...], backward: bool):
    if not backward:
        with torch.no_grad():
            return fn(inputs), []
    leaves = {name: (t.detach().requires_grad_(True) if name in names else t) for name, t in inputs.items()}
    with torch.enable_grad():
        out = fn(leaves)
        grads = torch.autograd.grad(out, [leaves[name] for name in names], _upstream(out).to(out.dtype))
    return out.detach(), [g.detach() for g in grads]


def run_case(case: Case, device: torch.device) -> list[dict]:
    """The case's records: forward, and backward for float32/float64; a raised exception is a failed record."""
    spec = OPS[case.op]
    rtol, atol = case.tolerance
    where: dict[str, Any] = {
        "kind": "validate",
        "label": case.label,
        "op": case.op,
        "shape": case.shape,
        "dtype": DTYPE_NAMES[case.dtype],
        "backend": case.backend,
        "provider": f"mmot-{case.backend}",
        "launch": case.launch,
        "rtol": rtol,
        "atol": atol,
        "tolerance": 1.0,
    }
    passes = ["forward", "backward"] if case.backward else ["forward"]
    try:
        inputs = spec.inputs(case.dims, case.dtype, device)
        with _launch_structure(case, device) as seen:
            got, got_grads = _values_and_grads(lambda x: spec.call(x, case.backend), inputs, spec.grad_names, case.backward)
        wide = {name: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for name, t in inputs.items()}
        want, want_grads = _values_and_grads(spec.reference, wide, spec.grad_names, case.backward)
    except Exception as error:  # recorded, never fatal: the run goes on
        note = f"{type(error).__name__}: {error}"[:300]
        return [{**where, "mode": mode, "error": None, "ok": False, "note": note} for mode in passes]
    launched = None if not seen else "split" if max(seen) > 1 else "persistent"
    records: list[dict[str, Any]] = [
        {**where, "mode": "forward", "programs_per_problem": sorted(set(seen)), "error": excess(got, want, rtol, atol)}
    ]
    for name, g, w in zip(spec.grad_names, got_grads, want_grads):
        scale = _gradient_scale(w, case.dtype)
        records.append({**where, "mode": "backward", "input": name, "error": excess(g / scale, w / scale, rtol, atol)})
    for record in records:
        record["ok"] = record["error"] <= 1.0
    if case.launch and launched != case.launch:
        for record in records:
            record["ok"] = False
            record["note"] = (
                f"launched {launched or 'no Triton Sinkhorn kernel'} (programs per problem {sorted(set(seen))}), not {case.launch}"
            )
    return records


def run(device: torch.device, on_case: Callable[[Case, list[dict]], None] = lambda case, records: None) -> tuple[list[dict], list[dict]]:
    """(records, skipped): every case of :func:`cases` on ``device``, and those whose backend cannot run here, with why."""
    triton_missing = triton_runs_here(device)
    records: list[dict] = []
    skipped: list[dict] = []
    for case in cases(device):
        if case.backend == "triton" and triton_missing:
            skipped.append(
                {"kind": "validate", "label": case.label, "mode": "validate", "provider": "mmot-triton", "reason": triton_missing}
            )
            continue
        out = run_case(case, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        records += out
        on_case(case, out)
    return records, skipped
