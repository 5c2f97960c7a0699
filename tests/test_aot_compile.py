"""Every Triton kernel, compiled for real GPUs (sm_80 and sm_90) on this CPU-only machine.

The interpreter that runs the Triton kernels in the other tests hides what only the compiler
sees: module globals read inside ``@triton.jit`` code, Python floats typed fp32, shared memory
and register limits. ``python -m mmot.aot`` compiles the configurations the launchers choose
(its default sample; see ``mmot.aot.calls``) with Triton's compiler and ptxas, and fails on a
compile error, shared memory over the architecture's per-block limit, any register spill, or a
float scalar that is not fp64. It runs in subprocesses: the interpreter is off there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from backends import needs_triton

pytestmark = needs_triton

KERNEL_MODULES = (
    "sinkhorn",
    "multi_sinkhorn",
    "similarity",
    "info_nce",
    "brownian_bridge",
    "anchor_consistency",
    "geometric_consistency",
    "feature_separation",
    "similarity_regression",
    "nt_xent",
    "sinkhorn_ext",
    "multi_sinkhorn_ext",
    "implicit",
)
# Float scalars each kernel takes, which must reach it as fp64 (docs/architecture.md, scalars).
SCALARS = {"inv_eps", "scale", "inv_tau", "tiny", "shift", "eps", "decay", "tol", "reach", "inv_eps_in", "tau_in", "tol_in"}


def compiler_env() -> dict:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    return env


def run_python(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=compiler_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("aot") / "builds.json"
    result = run_python(["-m", "mmot.aot", "--json", str(out)], timeout=1500)
    assert out.exists(), result.stderr[-4000:]
    report = json.loads(out.read_text())
    failed = [b for b in report["builds"] if b["problems"]]
    assert result.returncode == (1 if failed else 0), result.stderr[-4000:]
    return report["builds"]


def launched_kernels() -> set[str]:
    """Every ``@triton.jit`` kernel the kernel modules define (helpers excluded: they are inlined)."""
    script = textwrap.dedent(
        f"""
        import importlib, json
        from triton.runtime.jit import JITFunction
        names = []
        for module in {KERNEL_MODULES!r}:
            m = importlib.import_module("mmot.kernels." + module)
            names += [module + "." + n for n, v in vars(m).items() if isinstance(v, JITFunction) and n.endswith("_kernel")]
        print(json.dumps(names))
        """
    )
    result = run_python(["-c", script], timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def test_every_kernel_compiles_for_sm80_and_sm90_within_limits(builds):
    failures = [
        f"sm_{b['arch']} {b['kernel']} {b['config']}: {'; '.join(b['problems'])} {b['error'] or ''}" for b in builds if b["problems"]
    ]
    assert not failures, "\n".join(failures)
    for arch in (80, 90):
        assert {b["kernel"] for b in builds if b["arch"] == arch} == launched_kernels()
    # Every dtype path, both launch structures and the feature-tiled InfoNCE were compiled.
    configs = " | ".join(b["config"] for b in builds)
    for text in ("in=fp32", "in=fp64", "in=bf16", "in=fp16", "SINGLE=True", "SINGLE=False", "ACC=fp64", "BLOCK_E="):
        assert text in configs, text


def test_float64_paths_keep_float64_scalars(builds):
    wide = [b for b in builds if "ACC=fp64" in b["config"] and b["float_scalars"]]
    assert {name for b in wide for name in b["float_scalars"]} == SCALARS
    for b in builds:
        assert set(b["float_scalars"].values()) <= {"fp64"}, (b["kernel"], b["config"], b["float_scalars"])


PROBE = textwrap.dedent(
    """
    import json, sys
    import torch, triton, triton.language as tl
    from mmot.aot import build as builder
    from mmot.aot.capture import specializations

    WRONG_GLOBAL = float("-inf")  # what NEG_INF was: a plain module global

    @triton.jit
    def reads_a_global(OUT, BLOCK: tl.constexpr):
        tl.store(OUT + tl.arange(0, BLOCK), tl.full([BLOCK], WRONG_GLOBAL, tl.float32))

    @triton.jit
    def takes_a_plain_float(OUT, scale, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(OUT + offs, offs.to(tl.float64) * scale)

    @triton.jit
    def takes_an_fp64_scalar(OUT, scale: tl.float64, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(OUT + offs, offs.to(tl.float64) * scale)

    @triton.jit
    def holds_too_much(X, Y, OUT, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x, y = tl.load(X + offs), tl.load(Y + offs)  # both live across the sum: 2 x 128 doubles a thread
        tl.store(OUT + offs, x * tl.sum(x * y, 0) + y)

    @triton.jit
    def reduces(X, OUT, BLOCK: tl.constexpr):
        x = tl.load(X + tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :])
        tl.store(OUT + tl.arange(0, BLOCK), tl.sum(x, 0))

    out = torch.empty(1 << 14, dtype=torch.float64, device="meta")
    with specializations(90) as asked:
        reads_a_global[(1,)](out, BLOCK=64)
        takes_a_plain_float[(1,)](out, 1 / 3, BLOCK=64)
        takes_an_fp64_scalar[(1,)](out, 1 / 3, BLOCK=64)
        holds_too_much[(1,)](out, out, out, BLOCK=1 << 12, num_warps=1)
        reduces[(1,)](out, out, BLOCK=64, num_warps=4)
    builder.SHARED_LIMIT[90] = 16  # a limit so low that a reduction through shared memory breaks it
    results = {}
    for spec in asked:
        b = builder.build(spec)
        results[spec.kernel.fn.__name__] = {"problems": b.problems, "scalars": b.float_scalars}
    print(json.dumps(results))
    """
)


def test_the_checks_catch_what_the_interpreter_hides(tmp_path):
    """Each defect class the build checks for, on a kernel made to have it (a test that can fail)."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    result = run_python([str(script)], timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["reads_a_global"]["problems"] == ["compile error"]
    assert found["takes_a_plain_float"]["scalars"] == {"scale": "fp32"}
    assert any("not fp64" in p for p in found["takes_a_plain_float"]["problems"])
    assert found["takes_an_fp64_scalar"] == {"problems": [], "scalars": {"scale": "fp64"}}
    assert any("register spills" in p for p in found["holds_too_much"]["problems"])
    assert any("shared memory" in p for p in found["reduces"]["problems"])


def test_a_float64_kernel_receives_its_scalar_as_fp64_in_the_ir(tmp_path):
    """Past the signature: the TTIR argument and the PTX parameter of Sinkhorn's 1/eps are f64."""
    script = textwrap.dedent(
        """
        import json, torch, triton
        from triton.backends.compiler import GPUTarget
        from mmot.aot.capture import specializations
        from mmot.kernels import sinkhorn
        m = torch.device("meta")
        with specializations(90) as asked:
            s = torch.empty(3, 17, 5, dtype=torch.float64, device=m)
            rows, cols = torch.empty(3, 17, dtype=torch.float64, device=m), torch.empty(3, 5, dtype=torch.float64, device=m)
            sinkhorn.forward(s, 0.3, 2, rows, cols, "auto")
        spec = asked[0]
        source = triton.compiler.ASTSource(spec.kernel, spec.signature, spec.constexprs, spec.attrs)
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=spec.options)
        print(json.dumps({"ttir": kernel.asm["ttir"], "ptx": kernel.asm["ptx"]}))
        """
    )
    result = run_python(["-c", script], timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    asm = json.loads(result.stdout.strip().splitlines()[-1])
    assert "%inv_eps: f64" in asm["ttir"]
    assert ".param .f64 _sinkhorn_fwd_kernel_param_" in asm["ptx"]


def test_aot_refuses_to_run_under_the_interpreter():
    env = dict(compiler_env(), TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "mmot.aot", "--only", "anchor"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "without TRITON_INTERPRET=1" in result.stderr
