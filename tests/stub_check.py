"""Checks python/mmot/_core.pyi against the compiled mmot._core: ``python tests/stub_check.py``.

Names, parameters and defaults: mypy's stubtest, which reads the signatures PyO3 gives the
compiled functions (``__text_signature__``). Return types, which a compiled function does not
state: one call of each function on tiny arrays, its result against the stub's annotation.
Exits 1 with what disagrees; a function added to one side only fails as well.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import mmot._core as core
import numpy as np


def _f64(*shape: int) -> np.ndarray:
    return np.full(shape, 0.5)


def _no_reduce(array: np.ndarray) -> None:
    """The collective of a group of one process: the sums are the local ones."""


def _index() -> np.ndarray:
    return np.zeros(1, dtype=np.int64)


def _counts() -> np.ndarray:
    """Per-problem sizes (and iteration counts) of one problem: 2."""
    return np.full(1, 2, dtype=np.int64)


# One valid call per function: [1, 2, 2] problems, [2, 3] pair embeddings, 3 similarities.
SAMPLE_ARGS: dict[str, Callable[[], tuple]] = {
    "sinkhorn": lambda: (_f64(1, 2, 2), _f64(1, 2), _f64(1, 2), _f64(1, 2, 2), 0.1, 1, "auto", 1),
    "sinkhorn_backward": lambda: (_f64(1, 2, 2), _f64(1, 2, 2), _f64(1, 2), _f64(1, 2), _f64(1, 2, 2), 0.1, 1, "auto", 1),
    "sinkhorn_ext_forward": lambda: (
        *(_f64(1, 2, 2), _f64(1, 2), _f64(1, 2), _counts(), _counts(), _f64(1, 2), _f64(1)),
        *(_counts(), _f64(1, 2, 2), _f64(1, 2), _f64(1, 2), _f64(1), 0.1, 0.5, 1, -1.0, float("inf"), "auto", 1),
    ),
    "sinkhorn_ext_backward": lambda: (
        *(_f64(1, 2, 2), _f64(1, 2, 2), _f64(1, 2), _f64(1, 2), _counts(), _counts(), _f64(1, 2), _f64(1)),
        *(_counts(), _f64(1, 2, 2), 0.1, 0.5, float("inf"), "auto", 1),
    ),
    "multi_sinkhorn": lambda: (_f64(1, 2, 2), _f64(1, 2), _f64(1, 2, 2), 0.1, 1, [1.0, 1.0], 1, "minmax", "auto", 1),
    "multi_sinkhorn_backward": lambda: (
        *(_f64(1, 2, 2), _f64(1, 2, 2), _f64(1, 2), _f64(1, 2, 2)),
        *(0.1, 1, [1.0, 1.0], 1, "minmax", "auto", 1),
    ),
    "multi_sinkhorn_ext_forward": lambda: (
        *(_f64(1, 2, 2), np.full(1, 2, dtype=np.int64), np.full(1, 2, dtype=np.int64), _f64(1, 1), _f64(1, 1)),
        *(_f64(1, 2, 2), _f64(1, 1, 2), _f64(1, 2, 2), _f64(1, 1, 2), _f64(1), _f64(1)),
        *([1.0], [0.1], 0.1, 0.5, 1, -1.0, "minmax", "auto", 1),
    ),
    "multi_sinkhorn_ext_backward": lambda: (
        *(_f64(1, 2, 2), _f64(1, 2, 2), np.full(1, 2, dtype=np.int64), np.full(1, 2, dtype=np.int64), _f64(1, 1), _f64(1, 1)),
        *(np.ones(1, dtype=np.int64), _f64(1, 2, 2), [1.0], [0.1], 0.1, 0.5, "minmax", "auto", 1),
    ),
    "sharded_sinkhorn": lambda: (_f64(1, 2, 2), _f64(1, 2), _f64(1, 2), _f64(1, 2), _f64(1, 2, 2), 0.1, 1, False, _no_reduce, 1),
    "sharded_sinkhorn_backward": lambda: (
        *(_f64(1, 2, 2), _f64(1, 2, 2), _f64(1, 2), _f64(1, 2), _f64(1, 2), _f64(1, 2, 2)),
        *(0.1, 1, _no_reduce, 1),
    ),
    "sharded_multi_sinkhorn": lambda: (
        *(_f64(1, 2, 2), _f64(1, 2), _f64(1, 2), _f64(1, 2, 2)),
        *(0.1, 1, [1.0], [2], [1], True, False, _no_reduce, 1),
    ),
    "sharded_multi_sinkhorn_backward": lambda: (
        *(_f64(1, 2, 2), _f64(1, 2, 2), _f64(1, 2), _f64(1, 2), _f64(1, 2, 2)),
        *(0.1, 1, [1.0], [2], [1], True, False, _no_reduce, 1),
    ),
    "similarity": lambda: (_f64(1, 2, 3), _f64(1, 2, 3), _index(), _index(), _f64(1, 2, 2), True, 1.0, 1),
    "similarity_backward": lambda: (
        *(_f64(1, 2, 2), _f64(1, 2, 3), _f64(1, 2, 3), _index(), _index(), _f64(1, 2, 3), _f64(1, 2, 3)),
        *(True, 1.0, 1),
    ),
    "info_nce_forward": lambda: (_f64(2, 3), _f64(2, 3), _f64(2), _f64(2), _f64(2), _f64(2), 0.1, True, True, 1),
    "info_nce_backward": lambda: (
        *(_f64(2), _f64(2, 3), _f64(2, 3), _f64(2), _f64(2), _f64(2), _f64(2, 3), _f64(2, 3)),
        *(0.1, True, True, 1),
    ),
    "anchor_consistency_forward": lambda: (_f64(3), _f64(3), 0.1, 1),
    "anchor_consistency_backward": lambda: (1.0, _f64(3), _f64(3), _f64(3), 0.1, 1),
    "brownian_bridge_forward": lambda: (_f64(2, 3), _f64(2, 3), _f64(2, 3), _f64(2), _f64(2), _f64(2), _f64(2), True, 1),
    "brownian_bridge_backward": lambda: (
        *(_f64(2), _f64(2, 3), _f64(2, 3), _f64(2, 3), _f64(2), _f64(2), _f64(2), _f64(2, 3), _f64(2, 3), _f64(2, 3)),
        *(True, 1),
    ),
    "geometric_consistency_forward": lambda: (_f64(2, 3), _f64(2, 3), _f64(2), _f64(3, 3, 3), True, 1),
    "geometric_consistency_backward": lambda: (_f64(2), _f64(2, 3), _f64(2, 3), _f64(3, 3, 3), _f64(2, 3), _f64(2, 3), True, 1),
    "feature_separation_forward": lambda: (_f64(2, 3), _f64(2, 4), _f64(1), _f64(3, 4), True, 1),
    "similarity_regression_forward": lambda: (_f64(2, 3, 4), np.ones((2, 3), dtype=np.uint8), _f64(2, 2, 2), 1.0, 0.0, -1.0, True, 1),
    "similarity_regression_backward": lambda: (
        _f64(2, 2, 2),
        _f64(2, 3, 4),
        np.ones((2, 3), dtype=np.uint8),
        _f64(2, 3, 4),
        1.0,
        0.0,
        -1.0,
        True,
        1,
    ),
    "feature_separation_backward": lambda: (_f64(1), _f64(2, 3), _f64(2, 4), _f64(3, 4), _f64(2, 3), _f64(2, 4), True, 1),
    "nt_xent_self_lse": lambda: (_f64(2, 3), _f64(2), 0.1, 1),
    "nt_xent_cross_lse": lambda: (_f64(2, 3), _f64(2, 3), _f64(2), _f64(2), 0.1, 1),
    "nt_xent_self_grad": lambda: (_f64(2, 3), _f64(2), _f64(2), _f64(2, 3), 0.1, 1),
    "nt_xent_cross_grad": lambda: (_f64(2, 3), _f64(2, 3), _f64(2), _f64(2), _f64(2), _f64(2), _f64(2, 3), _f64(2, 3), 0.1, 1),
    "sinkhorn_implicit_backward": lambda: (
        *(_f64(1, 2, 2), _f64(1, 2, 2), np.full(1, 2, dtype=np.int64), np.full(1, 2, dtype=np.int64), _f64(1, 2, 2), _index()),
        *(0.1, float("inf"), 1),
    ),
    "multi_sinkhorn_implicit_backward": lambda: (
        *(_f64(1, 2, 2), _f64(1, 2, 2), _f64(1, 2, 2), _f64(1, 2, 2), _f64(1, 2, 2)),
        *(np.full(1, 2, dtype=np.int64), np.full(1, 2, dtype=np.int64), _f64(1, 2), _f64(1, 2), _f64(1, 2, 2), _index()),
        *([1.0, 0.5], 0.1, "minmax", 1),
    ),
}

RETURN_TYPES = {"bool": bool, "float": float, "int": int, "str": str, "None": type(None)}


def stub_path() -> Path:
    return Path(core.__file__).with_name("_core.pyi")


def check_signatures() -> list[str]:
    """stubtest's findings (names, parameters, defaults), or nothing."""
    run = subprocess.run([sys.executable, "-m", "mypy.stubtest", "mmot._core"], capture_output=True, text=True)
    if run.returncode == 0:
        return []
    return [f"stubtest (exit {run.returncode}):\n{run.stdout}{run.stderr}".rstrip()]


def check_return_types() -> list[str]:
    """Each stubbed function's result on its sample call against its return annotation."""
    problems = []
    tree = ast.parse(stub_path().read_text())
    stubbed = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    for name in sorted(set(stubbed) - set(SAMPLE_ARGS)):
        problems.append(f"{name}: no sample call in tests/stub_check.py SAMPLE_ARGS; add one")
    for name, node in sorted(stubbed.items()):
        if name not in SAMPLE_ARGS:
            continue
        annotation = ast.unparse(node.returns) if node.returns else "<none>"
        expected = RETURN_TYPES.get(annotation)
        if expected is None:
            problems.append(f"{name}: the stub's return type {annotation} is not one this script can check")
            continue
        result = getattr(core, name)(*SAMPLE_ARGS[name]())
        # bool is an int subclass: compare exact types.
        if type(result) is not expected:
            problems.append(f"{name}: the stub says it returns {annotation}, the module returned {type(result).__name__}")
    return problems


def main() -> int:
    problems = check_signatures() + check_return_types()
    if not problems:
        print(f"stub_check: {stub_path()} agrees with {core.__file__}")
        return 0
    print(f"stub_check: {stub_path()} disagrees with the compiled {core.__file__}:", file=sys.stderr)
    for problem in problems:
        print(f"- {problem}", file=sys.stderr)
    print("Update python/mmot/_core.pyi (or the bindings in rust/mmot-python) and rebuild.", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
