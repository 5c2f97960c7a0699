"""The launcher calls that ``mmot.aot`` drives: every op, dtype and launch structure, at the tile
shapes the launchers can choose and at the sizes of ``mmot-bench``'s workloads.

Each call runs an op's Triton forward and backward launchers (``mmot.kernels.<op>``) on meta
tensors, which carry shapes and dtypes but no memory, so even the largest sizes cost nothing.
What gets compiled is whatever those launchers then ask Triton for.

**Full sweep** (``--all``). For every input dtype (float32, float64, bfloat16, float16):

* ``sinkhorn``: every row tile width ``BLOCK_K`` (each power of two up to the widest a tile
  holds on a GPU, ``_common.widest_row``; wider calls run elsewhere), each with a full tile of
  rows in both launch structures (one large problem split over programs; a batch of problems,
  one program each) and with a one-row tile;
* ``multi_sinkhorn``: the same, for 1, 2 and 3 slot groups, with and without min-max;
* ``similarity``: every combination of row, column and feature tile sizes, normalised or not;
* ``info_nce``: feature sizes up to 4096, symmetric or not;
* ``nt_xent`` (and CoMM's loss): the four block primitives, float32 and float64, feature sizes up to 1024;
* ``brownian_bridge_loss``: feature sizes up to 1024;
* ``geometric_consistency``: odd feature sizes up to 1024, one row split of the Grams or several;
* ``feature_separation_loss``: odd and unequal feature sizes up to 1024, one row split or several;
* ``anchor_consistency_loss``: both block sizes;
* ``pairwise_similarity_regression``: odd feature sizes up to 1024, one row split or several,
  with and without a presence mask and a margin;
* every op at the sizes of the benchmark workloads.

**Sample** (the default, what CI compiles on every run): all of ``similarity``, ``info_nce``,
``brownian_bridge_loss``, ``geometric_consistency``, ``feature_separation_loss``, ``anchor_consistency_loss``,
``multi_info_nce``, ``nt_xent`` and ``pairwise_similarity_regression``, and a sample of the two
Sinkhorn ops (about 710 builds per architecture in all on 2026-12-04, a few minutes cold; the
full sweep of the Sinkhorn ops alone is about 2800): for float32 and float64 the full tiles at the narrowest and widest
``BLOCK_K`` in both launch structures with every flag, and every dtype at the benchmark sizes.
The Sinkhorn kernels' warp count follows the tile's elements (``_common.num_warps``), so a
tile smaller than the launcher's target holds no more per thread than a full one; the full
sweep checks the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from mmot import reference
from mmot.kernels import (
    _common,
    anchor_consistency,
    brownian_bridge,
    feature_separation,
    geometric_consistency,
    implicit,
    info_nce,
    multi_sinkhorn,
    multi_sinkhorn_ext,
    nt_xent,
    similarity,
    similarity_regression,
    sinkhorn,
    sinkhorn_ext,
)

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
WIDE = (torch.float32, torch.float64)
META = torch.device("meta")
# A batch larger than any GPU's SM count: one program per problem.
BATCH = 1024
# Rows enough for a full tile at every width, and for a split launch.
ROWS = 8192


@dataclass(frozen=True)
class Call:
    op: str
    label: str
    run: Callable[[], None]
    sampled: bool


def _empty(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=META)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _sinkhorn(dtype: torch.dtype, b: int, n: int, k: int) -> Callable[[], None]:
    """Forward and backward, where the op would run them on the GPU (the kernel module's ``fits``)."""

    def run() -> None:
        if not sinkhorn.fits(k, dtype):
            return
        scores = _empty(b, n, k, dtype=dtype)
        rows, cols = _empty(b, n, dtype=_common.acc_dtype(dtype)), _empty(b, k, dtype=_common.acc_dtype(dtype))
        sinkhorn.forward(scores, 0.05, 3, rows, cols, "auto")
        sinkhorn.backward(_empty(b, n, k, dtype=dtype), scores, 0.05, 3, rows, cols, "auto")

    return run


def _sinkhorn_ext(dtype: torch.dtype, b: int, n: int, k: int) -> Callable[[], None]:
    """Forward and backward of the general Sinkhorn (issue 20), where the op would run them on the GPU."""

    def run() -> None:
        if not sinkhorn_ext.fits(k, dtype):
            return
        scores = _empty(b, n, k, dtype=dtype)
        rows, cols, f0 = _empty(b, n, dtype=dtype), _empty(b, k, dtype=dtype), _empty(b, n, dtype=dtype)
        counts = torch.empty(b, dtype=torch.int64, device=META)
        start = _empty(b, dtype=torch.float64)
        sinkhorn_ext.forward(scores, rows, cols, counts, counts, f0, start, 0.05, 0.5, 3, 1e-3, 2.0, "auto")
        grad = _empty(b, n, k, dtype=dtype)
        sinkhorn_ext.backward(grad, scores, rows, cols, counts, counts, f0, start, 0.05, 0.5, counts, 2.0, "auto", max_iters=3)

    return run


def _sinkhorn_ext_calls() -> Iterator[Call]:
    # The kernels take float32 or float64 (the op converts other dtypes); one problem of many rows
    # runs the split structure, a batch the persistent one.
    for dtype in WIDE:
        widths = _widths(_common.widest_row(dtype))
        for k in widths:
            sampled = k in (widths[0], widths[-1])
            for b, n, what in ((1, ROWS, "one problem"), (BATCH, ROWS, "batch"), (BATCH, 1, "one row")):
                yield Call("sinkhorn_ext", f"{_name(dtype)} {what} B={b} N={n} K={k}", _sinkhorn_ext(dtype, b, n, k), sampled and n > 1)
        # mmot-bench: the SwAV size, tiny problems, and a ragged batch padded to 64 x 64.
        for b, n, k in ((1, 4096, 3000), (65536, 4, 4), (65536, 16, 16), (4096, 64, 64)):
            yield Call("sinkhorn_ext", f"{_name(dtype)} bench B={b} N={n} K={k}", _sinkhorn_ext(dtype, b, n, k), True)


def _groups(n_groups: int, k: int) -> list[tuple[float, int, int]]:
    """Slot groups of a Multi-SK call with ``k`` anchors: SSPC's two weights, or one, or three."""
    top = k // 2
    weights = {1: [1.0] * k, 2: [0.25] * (k - top) + [1.0] * top, 3: [0.25] * (k - top) + [0.5] * (top // 2) + [1.0] * (top - top // 2)}
    return reference.slot_groups(weights[n_groups], max(1, k // 2))


def _multi_sinkhorn(dtype: torch.dtype, b: int, n: int, k: int, n_groups: int, normalize: str) -> Callable[[], None]:
    """Forward and backward, each where the op would run it on the GPU (the kernel module's ``fits``)."""

    def run() -> None:
        scores = _empty(b, n, k, dtype=dtype)
        groups = _groups(n_groups, k)
        if not multi_sinkhorn.fits(k, len(groups), dtype, backward=False):
            return
        mass = _empty(b, k, dtype=_common.acc_dtype(dtype))
        multi_sinkhorn.forward(scores, 0.07, 3, groups, mass, normalize)
        if multi_sinkhorn.fits(k, len(groups), dtype, backward=True):
            multi_sinkhorn.backward(_empty(b, n, k, dtype=dtype), scores, 0.07, 3, groups, mass, normalize)

    return run


def _multi_sinkhorn_ext(dtype: torch.dtype, b: int, n: int, k: int, n_groups: int, normalize: str) -> Callable[[], None]:
    """The ragged grouped Multi-SK (issue 20): forward and backward where ``fits`` says the op runs them."""

    def run() -> None:
        if not multi_sinkhorn_ext.fits(k, n_groups, dtype):
            return
        scores = _empty(b, n, k, dtype=dtype)
        sizes = torch.empty((b,), dtype=torch.int64, device=META)
        table = _empty(b, n_groups, dtype=torch.float64)
        eps_start = _empty(b, dtype=torch.float64)
        weights = [0.25, 1.0, 0.5][:n_groups]
        args = (sizes, sizes, weights, table, table, eps_start, 0.07)
        multi_sinkhorn_ext.forward(scores, *args, 0.5, 3, 1e-4, normalize, "auto")
        multi_sinkhorn_ext.backward(_empty(b, n, k, dtype=dtype), scores, *args, 0.5, sizes, normalize, "auto", n_iters=3)

    return run


def _similarity(dtype: torch.dtype, x_shape: tuple, y_shape: tuple, normalize: bool) -> Callable[[], None]:
    def run() -> None:
        x, y = _empty(*x_shape, dtype=dtype), _empty(*y_shape, dtype=dtype)
        out = similarity.forward(x, y, normalize, 20.0)
        similarity.backward(torch.empty_like(out), x, y, normalize, 20.0)

    return run


def _info_nce(dtype: torch.dtype, n: int, d: int, symmetric: bool, normalize: bool = True) -> Callable[[], None]:
    def run() -> None:
        a, b = _empty(n, d, dtype=dtype), _empty(n, d, dtype=dtype)
        weights = _empty(n, dtype=_common.acc_dtype(dtype))
        loss, lse_a, lse_b = info_nce.forward(a, b, weights, 0.05, symmetric, normalize)
        info_nce.backward(torch.empty_like(loss), a, b, weights, lse_a, lse_b, 0.05, symmetric, normalize)

    return run


def _brownian_bridge(dtype: torch.dtype, n: int, d: int, uniform: bool) -> Callable[[], None]:
    def run() -> None:
        a = _empty(n, d, dtype=dtype)
        t = _empty(n, dtype=_common.acc_dtype(dtype))
        loss, lse = brownian_bridge.forward(a, a, a, t, t, True, uniform)
        brownian_bridge.backward(torch.empty_like(loss), a, a, a, t, t, lse, True, uniform)

    return run


def _geometric_consistency(dtype: torch.dtype, n: int, d: int) -> Callable[[], None]:
    def run() -> None:
        a = _empty(n, d, dtype=dtype)
        terms, grams = geometric_consistency.forward(a, a, True)
        geometric_consistency.backward(torch.empty_like(terms), a, a, grams, True)

    return run


def _similarity_regression(dtype: torch.dtype, n: int, d: int, masked: bool, margin: float | None) -> Callable[[], None]:
    def run() -> None:
        x = _empty(3, n, d, dtype=dtype)
        present = torch.empty(3, n, dtype=torch.bool, device=META) if masked else None
        terms = similarity_regression.forward(x, present, 1.0, 0.0, margin, True)
        similarity_regression.backward(torch.empty_like(terms), x, present, 1.0, 0.0, margin, True)

    return run


def _feature_separation(dtype: torch.dtype, n: int, ds: int, dh: int) -> Callable[[], None]:
    def run() -> None:
        shared, specific = _empty(n, ds, dtype=dtype), _empty(n, dh, dtype=dtype)
        loss, gram = feature_separation.forward(shared, specific, True)
        feature_separation.backward(torch.empty_like(loss), shared, specific, gram, True)

    return run


def _anchor_consistency(dtype: torch.dtype, n: int, k: int) -> Callable[[], None]:
    def run() -> None:
        sim = _empty(n, k, dtype=dtype)
        anchor_consistency.forward(sim, sim, 0.1)
        anchor_consistency.backward(_empty(dtype=dtype), sim, sim, 0.1)

    return run


def _widths(limit: int) -> list[int]:
    """A width for every power of two up to ``limit``: odd, just above the previous power, where one exists."""
    return [1] + [(1 << j) // 2 + 1 for j in range(1, limit.bit_length())]


def _sinkhorn_calls() -> Iterator[Call]:
    for dtype in DTYPES:
        widths = _widths(_common.widest_row(_common.acc_dtype(dtype)))
        for k in widths:
            sampled = dtype in WIDE and k in (widths[0], widths[-1])
            for b, n, what in ((1, ROWS, "one problem"), (BATCH, ROWS, "batch"), (BATCH, 1, "one row")):
                yield Call("sinkhorn", f"{_name(dtype)} {what} B={b} N={n} K={k}", _sinkhorn(dtype, b, n, k), sampled and n > 1)
        # mmot-bench: the SwAV size, and batches of tiny problems.
        for b, n, k in ((1, 4096, 3000), (65536, 4, 4), (65536, 16, 16)):
            yield Call("sinkhorn", f"{_name(dtype)} bench B={b} N={n} K={k}", _sinkhorn(dtype, b, n, k), True)


def _multi_sinkhorn_calls() -> Iterator[Call]:
    for dtype in DTYPES:
        for n_groups in (1, 2, 3):
            block_g = 1 << (n_groups - 1).bit_length()
            widths = [k for k in _widths(_common.widest_row(_common.acc_dtype(dtype)) // block_g) if k >= n_groups]
            for k in widths:
                for normalize in ("minmax", "none"):
                    sampled = dtype in WIDE and k in (widths[0], widths[-1]) and (n_groups == 2 or normalize == "minmax")
                    for b, n, what in ((1, ROWS, "one problem"), (BATCH, ROWS, "batch"), (BATCH, 1, "one row")):
                        label = f"{_name(dtype)} {what} B={b} N={n} K={k} groups={n_groups} {normalize}"
                        yield Call("multi_sinkhorn", label, _multi_sinkhorn(dtype, b, n, k, n_groups, normalize), sampled and n > 1)
        # mmot-bench: the SSPC batch against 64-1024 anchors, and batches of tiny problems.
        for b, n, k in ((1, 7660, 64), (1, 7660, 128), (1, 7660, 256), (1, 7660, 1024), (65536, 4, 4), (65536, 16, 16)):
            label = f"{_name(dtype)} bench B={b} N={n} K={k}"
            yield Call("multi_sinkhorn", label, _multi_sinkhorn(dtype, b, n, k, 2, "minmax"), True)


def _multi_sinkhorn_ext_calls() -> Iterator[Call]:
    # The caller converts to float32 or float64 (the working dtype); one program per problem.
    for dtype in WIDE:
        for n_groups in (1, 2, 3):
            block_g = 1 << (n_groups - 1).bit_length()
            widths = [k for k in _widths(_common.widest_row(_common.acc_dtype(dtype)) // (2 * block_g)) if k >= n_groups]
            for k in widths:
                for normalize in ("minmax", "none"):
                    sampled = k in (widths[0], widths[-1]) and (n_groups == 2 or normalize == "minmax")
                    for b, n, what in ((BATCH, ROWS, "batch"), (BATCH, 1, "one row")):
                        label = f"{_name(dtype)} {what} B={b} N={n} K={k} groups={n_groups} {normalize}"
                        yield Call("multi_sinkhorn_ext", label, _multi_sinkhorn_ext(dtype, b, n, k, n_groups, normalize), sampled and n > 1)
        # mmot-bench: a ragged batch padded to 64 x 64, the SSPC size, and batches of tiny problems.
        for b, n, k in ((4096, 64, 64), (1, 7660, 64), (65536, 4, 4), (65536, 16, 16)):
            label = f"{_name(dtype)} bench B={b} N={n} K={k}"
            yield Call("multi_sinkhorn_ext", label, _multi_sinkhorn_ext(dtype, b, n, k, 2, "minmax"), True)


def _similarity_calls() -> Iterator[Call]:
    sides = (9, 30, 100)  # tiles of 16, 32 and 64
    for dtype in DTYPES:
        for n in sides:
            for m in sides:
                for d in (9, 30, 100):
                    for normalize in (True, False):
                        label = f"{_name(dtype)} N={n} M={m} D={d} normalize={normalize}"
                        yield Call("similarity", label, _similarity(dtype, (2, n, d), (2, m, d), normalize), True)
        # mmot-bench: three modalities against three anchor sets.
        label = f"{_name(dtype)} bench (3,1,7660,256)x(1,3,64,256)"
        yield Call("similarity", label, _similarity(dtype, (3, 1, 7660, 256), (1, 3, 64, 256), True), True)


def _info_nce_calls() -> Iterator[Call]:
    for dtype in DTYPES:
        for d in (3, 16, 64, 128, 256, 512, 1024, 4096):
            for symmetric in (True, False):
                yield Call("info_nce", f"{_name(dtype)} N=1000 D={d} symmetric={symmetric}", _info_nce(dtype, 1000, d, symmetric), True)
        # mmot-bench, and the GPU size N = 65536, D = 512.
        for n, d in ((4096, 256), (16384, 256), (65536, 512)):
            yield Call("info_nce", f"{_name(dtype)} bench N={n} D={d}", _info_nce(dtype, n, d, True), True)


def _multi_info_nce_calls() -> Iterator[Call]:
    # multi_info_nce runs info_nce's kernels on rows it normalised itself, in the accumulation dtype.
    for dtype in WIDE:
        for n, d in ((1000, 3), (4096, 256), (32768, 128)):
            label = f"{_name(dtype)} N={n} D={d} pre-normalised"
            yield Call("multi_info_nce", label, _info_nce(dtype, n, d, True, normalize=False), True)


def _nt_xent(dtype: torch.dtype, n: int, d: int) -> Callable[[], None]:
    """The four block primitives (their inputs are normalised rows in the accumulation dtype)."""

    def run() -> None:
        x, y, v = _empty(n, d, dtype=dtype), _empty(n, d, dtype=dtype), _empty(n, dtype=dtype)
        nt_xent.self_lse(x, 0.1)
        nt_xent.cross_lse(x, y, 0.1)
        nt_xent.self_grad(x, v, v, 0.1)
        nt_xent.cross_grad(x, y, v, v, v, v, 0.1)

    return run


def _nt_xent_calls() -> Iterator[Call]:
    for dtype in WIDE:
        for d in (3, 16, 64, 128, 256, 512, 1024):
            yield Call("nt_xent", f"{_name(dtype)} N=1000 D={d}", _nt_xent(dtype, 1000, d), True)
        yield Call("nt_xent", f"{_name(dtype)} bench N=4096 D=256", _nt_xent(dtype, 4096, 256), True)


def _brownian_bridge_calls() -> Iterator[Call]:
    for dtype in DTYPES:
        # Feature sizes whose 2D concatenated features fill one backward feature tile or several.
        for d in (3, 64, 128, 256, 1024):
            for uniform in (True, False):
                label = f"{_name(dtype)} N=1000 D={d} uniform={uniform}"
                yield Call("brownian_bridge", label, _brownian_bridge(dtype, 1000, d, uniform), True)
        yield Call("brownian_bridge", f"{_name(dtype)} bench N=4096 D=256", _brownian_bridge(dtype, 4096, 256, True), True)


def _geometric_consistency_calls() -> Iterator[Call]:
    for dtype in DTYPES:
        # Odd feature sizes (ragged Gram and backward tiles), and one row split or several.
        for n, d in ((1000, 3), (1000, 65), (1000, 255), (20000, 513), (1000, 1024)):
            yield Call("geometric_consistency", f"{_name(dtype)} N={n} D={d}", _geometric_consistency(dtype, n, d), True)
        yield Call("geometric_consistency", f"{_name(dtype)} bench N=8192 D=256", _geometric_consistency(dtype, 8192, 256), True)


def _feature_separation_calls() -> Iterator[Call]:
    for dtype in DTYPES:
        # Odd and unequal feature sizes (ragged Gram and backward tiles), one row split or several.
        for n, ds, dh in ((1000, 3, 5), (1000, 65, 17), (1000, 255, 64), (20000, 128, 513), (1000, 1024, 256)):
            label = f"{_name(dtype)} N={n} D_s={ds} D_h={dh}"
            yield Call("feature_separation", label, _feature_separation(dtype, n, ds, dh), True)
        yield Call("feature_separation", f"{_name(dtype)} bench N=16384 D_s=D_h=256", _feature_separation(dtype, 16384, 256, 256), True)


def _similarity_regression_calls() -> Iterator[Call]:
    for dtype in DTYPES:
        # Odd feature sizes (ragged Gram, product and hinge tiles), one row split or several,
        # with and without a mask and a margin.
        for n, d in ((1000, 3), (1000, 65), (20000, 255), (1000, 1024)):
            for masked, margin in ((False, None), (True, None), (True, 0.1)):
                label = f"{_name(dtype)} N={n} D={d}{' masked' if masked else ''}{' margin' if margin is not None else ''}"
                yield Call("pairwise_similarity_regression", label, _similarity_regression(dtype, n, d, masked, margin), True)
        yield Call(
            "pairwise_similarity_regression",
            f"{_name(dtype)} bench N=16384 D=256",
            _similarity_regression(dtype, 16384, 256, False, None),
            True,
        )


def _anchor_consistency_calls() -> Iterator[Call]:
    for dtype in DTYPES:
        for n, k in ((100, 64), (7660, 1024)):  # block sizes 1024 and 2048
            yield Call("anchor_consistency", f"{_name(dtype)} N={n} K={k}", _anchor_consistency(dtype, n, k), True)


def _implicit_sinkhorn(dtype: torch.dtype, b: int, n: int, k: int, reach: float) -> Callable[[], None]:
    def run() -> None:
        if implicit.fits(k, dtype):
            counts = torch.empty((b,), dtype=torch.int64, device=META)
            implicit.sinkhorn_implicit_backward(_empty(b, n, k, dtype=dtype), _empty(b, n, k, dtype=dtype), counts, counts, 0.05, reach)

    return run


def _implicit_multi(dtype: torch.dtype, b: int, n: int, k: int, n_groups: int) -> Callable[[], None]:
    def run() -> None:
        if implicit.fits(k, dtype, n_groups):
            counts = torch.empty((b,), dtype=torch.int64, device=META)
            s = _empty(b, n, k, dtype=dtype)
            per_group = _empty(b, n_groups, dtype=dtype)
            weights = [0.25 * (i + 1) for i in range(n_groups)]
            implicit.multi_sinkhorn_implicit_backward(
                s,
                s,
                _empty(b, n_groups, k, dtype=dtype),
                s,
                _empty(b, n_groups, n, dtype=dtype),
                counts,
                counts,
                weights,
                per_group,
                per_group,
                0.07,
            )

    return run


def _implicit_calls() -> Iterator[Call]:
    """Issue 20's implicit backwards (``implicit``), in the working dtypes: the narrowest and
    widest row tiles, balanced and unbalanced, 1-3 slot groups, and the benchmark sizes."""
    for dtype in WIDE:
        widths = _widths(_common.widest_row(_common.acc_dtype(dtype)))
        for k in (widths[0], widths[-1]):
            for reach in (float("inf"), 1.0):
                for b, n in ((1, ROWS), (BATCH, 64)):
                    label = f"sinkhorn_implicit {_name(dtype)} B={b} N={n} K={k} reach={reach}"
                    yield Call("implicit", label, _implicit_sinkhorn(dtype, b, n, k, reach), True)
        for n_groups in (1, 2, 3):
            block_g = 1 << (n_groups - 1).bit_length()
            top = _common.widest_row(_common.acc_dtype(dtype)) // (2 * block_g)
            for k in sorted({max(n_groups, 2), top // 2 + 1}):
                for b, n in ((1, ROWS), (BATCH, 64)):
                    label = f"multi_sinkhorn_implicit {_name(dtype)} B={b} N={n} K={k} groups={n_groups}"
                    yield Call("implicit", label, _implicit_multi(dtype, b, n, k, n_groups), True)
        yield Call(
            "implicit",
            f"sinkhorn_implicit {_name(dtype)} bench B=1 N=4096 K=3000",
            _implicit_sinkhorn(dtype, 1, 4096, 3000, float("inf")),
            True,
        )
        yield Call(
            "implicit", f"multi_sinkhorn_implicit {_name(dtype)} bench B=1 N=7660 K=64", _implicit_multi(dtype, 1, 7660, 64, 2), True
        )


def every_call() -> list[Call]:
    return [
        *_sinkhorn_calls(),
        *_sinkhorn_ext_calls(),
        *_multi_sinkhorn_calls(),
        *_multi_sinkhorn_ext_calls(),
        *_similarity_calls(),
        *_info_nce_calls(),
        *_multi_info_nce_calls(),
        *_nt_xent_calls(),
        *_brownian_bridge_calls(),
        *_geometric_consistency_calls(),
        *_feature_separation_calls(),
        *_similarity_regression_calls(),
        *_anchor_consistency_calls(),
        *_implicit_calls(),
    ]
