"""Reliability fuzz suite: every op on every backend with valid but extreme inputs.

The property (README, "Guarantees"): for valid input an op either returns finite values that
agree with a float64 evaluation of the same problem (``mmot.reference`` on the inputs upcast
to float64) to a tolerance derived from the dtype and the problem's conditioning, or raises a
ValueError/TypeError whose message starts with "mmot.<op>: argument '<name>'" where the
documented limits say it must. A result may be ±inf only where the float64 value passes the
dtype's range. Gradients are held to the same property for a subset.

Each tolerance is C · (error growth) · u + C · u_out · |value| + the output dtype's smallest
normal, with u the unit roundoff of the accumulation dtype, u_out that of the output dtype and
the error growth stated per op (feature size, problem size, exponent range, iterations).

Classes that fail today live in their own test functions, named ``test_known_*``, so that the
main tests keep the rest of the input space covered; their docstrings say what fails.
Hypothesis runs derandomized (reproducible in CI) with few examples; Triton runs through its
interpreter (tests/conftest.py), so its shapes stay tiny.
"""

from __future__ import annotations

import math
import re

import mmot
import pytest
import torch
from backends import HAS_TRITON
from fuzz_inputs import DTYPES, accumulation, exponent_bounds, magnitude, masses, pattern_tensor
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st
from mmot import reference

BACKENDS = ["rust", "torch"] + (["triton"] if HAS_TRITON else [])
NATIVE = ["rust", "torch"]
C = 8.0  # slack on every first-order error bound


def interpreted_exactly(dtype: torch.dtype, *tensors: torch.Tensor) -> bool:
    """Whether Triton's interpreter reads these inputs exactly: it converts bfloat16 subnormals
    to float32 wrongly (2.8e-40 reads as 5.9e-39), which a GPU does not."""
    if dtype != torch.bfloat16:
        return True
    tiny_bf16 = torch.finfo(torch.bfloat16).tiny
    return not any(bool(((t.abs() < tiny_bf16) & (t != 0)).any()) for t in tensors)


def fuzz(examples: int):
    """Few derandomized examples; the 'thorough' profile (HYPOTHESIS_PROFILE) raises the count."""
    scale = max(1, settings.default.max_examples // 30)
    return settings(
        max_examples=examples * scale,
        deadline=None,
        derandomize=True,
        database=None,
        # No shrinking: a failing class would take minutes to shrink; the first failing example
        # is already reproducible (derandomized) and small.
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


def unit(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def tiny(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).tiny


# ------------------------------------------------------------------------------ the property


def outcome(op: str, call):
    """(result, None), or (None, argument) for a refusal that names the op and an argument."""
    try:
        return call(), None
    except (ValueError, TypeError) as error:
        match = re.match(rf"{re.escape(op)}: argument '(\w+)'", str(error))
        assert match, f"refusal that does not start with \"{op}: argument '<name>'\": {type(error).__name__}: {error}"
        return None, match.group(1)


def expect_refusal(op: str, call, must: str | None, may: str | None = None):
    """Run ``call``: it must be refused naming ``must`` (if set); it may only be refused naming
    ``may`` (near a documented threshold). Returns the result, or None when refused."""
    result, refused = outcome(op, call)
    if must is not None:
        assert refused == must, f"{op}: expected a refusal naming '{must}'; got {'a result' if refused is None else repr(refused)}"
    elif refused is not None:
        assert refused == may, f"{op}: valid input refused, naming '{refused}'"
    return result


def assert_agrees(got: torch.Tensor, want: torch.Tensor, tol: torch.Tensor, what: str) -> None:
    """got (in its dtype) against the float64 value: finite and within tol, ±inf only where the
    float64 value (within tol) passes the dtype's range."""
    got = got.detach()
    dtype = got.dtype
    g = got.double()
    want, tol = torch.broadcast_tensors(want.double(), torch.as_tensor(tol, dtype=torch.float64))
    top = torch.finfo(dtype).max
    may_overflow = want.abs() + tol >= top
    ok_inf = torch.isinf(g) & may_overflow & ((torch.sign(g) == torch.sign(want)) | (want.abs() <= tol))
    bad = ~torch.isfinite(g) & ~ok_inf
    if bad.any():
        i = tuple(int(v) for v in bad.nonzero()[0])
        raise AssertionError(f"{what}: non-finite {g[i].item()} at {i} where float64 gives {want[i].item():.6g} ({dtype})")
    # Where float64 itself overflowed, the dtype's value must be that infinity.
    inf_want = torch.isinf(want)
    assert torch.equal(g[inf_want], want[inf_want]), f"{what}: float64 gives ±inf, got {g[inf_want]}"
    both = torch.isfinite(g) & torch.isfinite(want)
    err = torch.where(both, (g - want).abs(), 0.0)
    excess = err > tol
    if excess.any():
        ratio = torch.where(excess, err / tol, 0.0)
        i = tuple(int(v) for v in (ratio == ratio.max()).nonzero()[0])
        raise AssertionError(
            f"{what}: {g[i].item():.9g} against float64 {want[i].item():.9g} at {i}: error {err[i].item():.3g} > "
            f"tolerance {tol[i].item():.3g} ({dtype}; {int(excess.sum())} of {excess.numel()} entries)"
        )


def row_bound(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    """|rows| as the op uses them (unit rows when normalizing), in float64."""
    return reference.unit_rows(x).abs() if normalize else x.abs()


def row_top(x: torch.Tensor) -> torch.Tensor:
    return x.abs().amax(-1)


def norm_range(dtype: torch.dtype) -> tuple[float, float]:
    """Row magnitudes whose squared norm the accumulation dtype holds as a normal number (with room)."""
    info = torch.finfo(accumulation(dtype))
    return math.sqrt(info.tiny) * 64, math.sqrt(info.max) / 64


def clip_rows(x: torch.Tensor, low: float, high: float, dtype: torch.dtype) -> torch.Tensor:
    """Rescale each row so that its largest magnitude lies in [low, high]; exact in ``dtype``."""
    top = row_top(x).unsqueeze(-1)
    factor = torch.where(top > high, high / top, torch.where((top < low) & (top > 0), low / top.clamp_min(1e-300), 1.0))
    return (x * factor).to(dtype).double()


def out_of_norm_range(draw, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x rescaled so that its largest row passes the squared norm's range, above or below."""
    low, high = exponent_bounds(dtype)
    safe_low, safe_high = norm_range(dtype)
    # Decades past each end that the input dtype can hold (none for float16 under float32 sums).
    sides = [(lo, hi) for lo, hi in ((math.log10(safe_high) + 2, high), (low, math.log10(safe_low) - 3)) if lo <= hi]
    assume(sides)
    top = 10.0 ** draw(st.floats(*draw(st.sampled_from(sides))))
    return (x / row_top(x).amax() * top).to(dtype).double()


# ------------------------------------------------------------------------------ similarity


@st.composite
def similarity_cases(draw, huge_rows: bool | None = False, tiny_shapes: bool = True):
    dtype = draw(st.sampled_from(DTYPES))
    batch = draw(st.sampled_from([(), (2,)]))
    n, m, d = draw(st.integers(1, 5)), draw(st.integers(1, 5)), draw(st.integers(1, 7))
    normalize = True if huge_rows else draw(st.booleans())
    x = pattern_tensor(draw, (*batch, n, d), dtype)
    y = pattern_tensor(draw, (m, d), dtype)
    low, high = norm_range(dtype)
    if huge_rows:
        x = out_of_norm_range(draw, x, dtype)
    elif normalize:
        x, y = clip_rows(x, low, high, dtype), clip_rows(y, low, high, dtype)
    else:
        # Unnormalized: |x|·|y| stays inside the accumulation dtype (the gradients' products too);
        # test_similarity_unnormalized_rows_past_the_products_range covers larger rows.
        x, y = clip_rows(x, 0.0, high, dtype), clip_rows(y, 0.0, high, dtype)
    sign = draw(st.sampled_from([1.0, -1.0]))
    scale = draw(st.sampled_from([1.0, sign * magnitude(draw, dtype, 0.5)]))
    return dtype, x, y, normalize, scale


def similarity_tolerance(x, y, normalize, scale, dtype, want):
    d = x.shape[-1]
    bound = abs(scale) * (row_bound(x, normalize) @ row_bound(y, normalize).transpose(-1, -2))
    return C * (d + 4) * unit(accumulation(dtype)) * bound + C * unit(dtype) * want.abs() + tiny(dtype)


def check_similarity(case, backends):
    dtype, x, y, normalize, scale = case
    want = reference.similarity(x, y, normalize, scale)
    tol = similarity_tolerance(x, y, normalize, scale, dtype, want)
    for backend in backends:
        got = expect_refusal(
            "mmot.similarity",
            lambda be=backend: mmot.similarity(x.to(dtype), y.to(dtype), normalize=normalize, scale=scale, backend=be),
            None,
        )
        assert got.dtype == dtype
        assert_agrees(got, want, tol, f"similarity[{backend}, normalize={normalize}, scale={scale:.3g}]")


@fuzz(25)
@given(similarity_cases())
def test_similarity(case):
    check_similarity(case, BACKENDS)


@fuzz(8)
@given(similarity_cases())
def test_similarity_small_products(case):
    """normalize=True, rows whose |x|·|y|·|scale| is near or below the accumulation dtype's
    smallest normal: Triton once formed the dot product times scale before the inverse norms,
    as a subnormal ([[1e-10, 2e-10]]·[[3e-10, 1e-10]] at scale 1e-25 gave 7.93e-26 for 7.07e-26).
    The rows are rescaled by powers of two, so that they stay exact in the dtype."""
    dtype, x, y, normalize, scale = case
    low = math.sqrt(tiny(accumulation(dtype))) * 2.0**6
    x = x * 2.0 ** math.floor(math.log2(low / float(row_top(x).amax())))
    y = y * 2.0 ** math.floor(math.log2(low / float(row_top(y).amax())))
    assume(interpreted_exactly(dtype, x, y) and bool(torch.equal(x.to(dtype).double(), x)) and bool(torch.equal(y.to(dtype).double(), y)))
    check_similarity((dtype, x, y, True, scale), BACKENDS)


@fuzz(10)
@given(similarity_cases(huge_rows=True))
def test_similarity_normalized_rows_out_of_norm_range(case):
    """normalize=True with a row whose squared norm over- or underflows the accumulation dtype
    (float32 rows above ~1.8e19 or below ~1e-19): the scale-safe norms give the right cosine
    (Rust and Triton once gave NaN above, a relative error ~2e-5 below)."""
    check_similarity(case, BACKENDS)


def test_similarity_unnormalized_products_overflow():
    """normalize=False where single products pass float32 but the exact dot product is 0:
    [1e20, 1e20]·[1e20, −1e20]. Rust once gave inf, torch NaN; the exact value is 0. The answer
    must be finite and within a float32 dot product's error bound D·eps·Σ|x_i·y_i| (a fused
    multiply-add, as numpy's matmul under the Triton interpreter and GPU tensor cores use,
    leaves the rounding error of one product instead of 0)."""
    x = torch.tensor([[1e20, 1e20]])
    y = torch.tensor([[1e20, -1e20]])
    bound = x.shape[-1] * torch.finfo(torch.float32).eps * (x.double().abs() @ y.double().abs().T)
    assert bound.item() < 1e-4 * torch.finfo(torch.float32).max  # the exact answer is far inside the range
    for backend in BACKENDS:
        got = mmot.similarity(x, y, normalize=False, backend=backend)
        assert torch.isfinite(got).all(), f"similarity[{backend}]: {got}"
        assert_agrees(got, torch.zeros(1, 1, dtype=torch.float64), bound, f"similarity[{backend}]")


@fuzz(10)
@given(similarity_cases(), st.floats(0.5, 1.0))
def test_similarity_unnormalized_rows_past_the_products_range(case, fraction):
    """normalize=False with rows up to the dtype's largest values, whose products and partial
    sums may overflow the accumulation dtype although the dot product does not: ±inf only where
    the exact value (within its error bound) passes the dtype (the kernels recompute such
    entries from rows scaled down by powers of two)."""
    dtype, x, y, _, scale = case
    top = torch.finfo(dtype).max * fraction / 4
    x = (x / row_top(x).amax() * top).to(dtype).double()
    y = (y / row_top(y).amax() * top).to(dtype).double()
    assume(interpreted_exactly(dtype, x, y))
    check_similarity((dtype, x, y, False, scale), BACKENDS)


@fuzz(8)
@given(similarity_cases())
def test_similarity_gradients(case):
    dtype, x, y, normalize, scale = case
    x64, y64 = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    want = reference.similarity(x64, y64, normalize, scale)
    cot = pattern_tensor_like(want, dtype)
    gx64, gy64 = torch.autograd.grad((want * cot).sum(), (x64, y64))
    for backend in BACKENDS:
        xs, ys = x.to(dtype).requires_grad_(True), y.to(dtype).requires_grad_(True)
        out = mmot.similarity(xs, ys, normalize=normalize, scale=scale, backend=backend)
        gx, gy = torch.autograd.grad((out * cot.to(dtype)).sum(), (xs, ys))
        terms_x = abs(scale) * (cot.abs() @ row_bound(y, normalize))
        terms_y = abs(scale) * (cot.abs().transpose(-1, -2) @ row_bound(x, normalize))
        terms_y = terms_y.reshape(-1, *y.shape).sum(0)
        for got, ref, inp, terms in ((gx, gx64, x, terms_x), (gy, gy64, y, terms_y)):
            assert_agrees(got, ref, grad_tolerance(ref, inp, terms, normalize, dtype), f"similarity grad[{backend}, normalize={normalize}]")


def test_similarity_triton_backward_small_scale():
    """Triton backward, float64, rows of about 2e152 at scale 4.2e-44: the exact gradient is about
    3e-197; Triton once gave numbers of the same size but wrong, or 6.6e-196 for rows of one
    feature where the exact gradient is 0 (its projection's coefficient, 1e-349 with scale
    applied first, underflowed)."""
    if not HAS_TRITON:
        return
    x = torch.tensor([[2.095e152, 1.0e152], [-1.5e152, 3.0e152]], dtype=torch.float64)
    y = torch.tensor([[-2.095e152, 5.0e151], [1.0e152, 1.25e152]], dtype=torch.float64)
    x64, y64 = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    cot = torch.tensor([[0.5, -1.5], [1.25, 0.75]], dtype=torch.float64)
    gx64, gy64 = torch.autograd.grad((reference.similarity(x64, y64, True, 4.24e-44) * cot).sum(), (x64, y64))
    xs, ys = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    gx, gy = torch.autograd.grad((mmot.similarity(xs, ys, scale=4.24e-44, backend="triton") * cot).sum(), (xs, ys))
    for got, want in ((gx, gx64), (gy, gy64)):
        assert_agrees(got, want, 1e-12 * want.abs().amax() + tiny(torch.float64), "similarity grad[triton]")
    one = torch.autograd.grad((mmot.similarity(xs[:, :1], ys[:, :1], scale=4.24e-44, backend="triton") * cot).sum(), xs)[0]
    assert float(one.abs().amax()) < 1e-200, f"rows of one feature: the exact gradient is 0; got {one}"


def pattern_tensor_like(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A fixed nonzero cotangent of moderate size, exact in ``dtype``."""
    generator = torch.Generator().manual_seed(t.numel())
    return torch.randn(t.shape, generator=generator, dtype=torch.float64).to(dtype).double()


def safe_norms(x: torch.Tensor) -> torch.Tensor:
    """max(‖row‖, 1e-12) in float64 without overflow."""
    top = row_top(x).unsqueeze(-1).clamp_min(1e-300)
    return (torch.linalg.vector_norm(x / top, dim=-1, keepdim=True) * top).clamp_min(1e-12)


def grad_tolerance(ref, inp, terms, normalize, dtype):
    """Per row: the largest term a row's gradient sums (over ‖row‖ when normalizing: the
    projection onto the unit sphere divides by it), times the sum's length."""
    if normalize:
        terms = 3 * terms / safe_norms(inp)
    length = inp.shape[-1] + terms.shape[-2] + 8
    row = terms.amax(-1, keepdim=True) + ref.abs().amax(-1, keepdim=True)
    return C * length * unit(accumulation(dtype)) * row + C * unit(dtype) * ref.abs() + tiny(dtype)


# ------------------------------------------------------------------------------ info_nce


@st.composite
def info_nce_cases(draw, max_n=5, dtypes=DTYPES, huge_rows=False):
    dtype = draw(st.sampled_from(dtypes))
    n = draw(st.integers(1, max_n))
    d = draw(st.integers(1, 6))
    normalize = True if huge_rows else draw(st.booleans())
    a = pattern_tensor(draw, (n, d), dtype)
    b = pattern_tensor(draw, (n, d), dtype)
    acc = accumulation(dtype)
    low, high = norm_range(dtype)
    if huge_rows:
        a = out_of_norm_range(draw, a, dtype)
    else:
        a, b = clip_rows(a, low if normalize else 0.0, high, dtype), clip_rows(b, low if normalize else 0.0, high, dtype)
    smallest = 1.0 / torch.finfo(acc).max
    temperature = draw(
        st.one_of(
            st.floats(0.01, 2.0),
            st.floats(math.log10(smallest), 0.0).map(lambda e: 10.0**e),
            st.sampled_from([smallest * 1.0001, smallest * 0.5]),
        )
    )
    if not normalize and temperature >= smallest:
        # Logits |a|·|b|/τ must fit the accumulation dtype (test_info_nce_normalized_rows_out_of_norm_range covers the rest).
        largest = float((a.abs() @ b.abs().T).amax())
        temperature = max(temperature, largest * 64 * (d + 1) / torch.finfo(acc).max)
    valid = draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=n, max_size=n).map(torch.tensor)))
    symmetric = draw(st.booleans())
    reduction = draw(st.sampled_from(["none", "mean", "sum"]))
    return dtype, a, b, temperature, normalize, symmetric, reduction, valid


def info_nce_expected(a, b, temperature, normalize, symmetric, reduction, valid, dtype):
    keep = torch.ones(a.shape[0], dtype=torch.bool) if valid is None else valid
    per_pair = reference.info_nce(a, b, keep, temperature, symmetric, normalize)
    acc = accumulation(dtype)
    d, n = a.shape[-1], a.shape[0]
    bound = (row_bound(a, normalize) @ row_bound(b, normalize).T) / temperature
    live = keep[:, None] & keep[None, :]
    largest = float(torch.where(live, bound, 0.0).amax()) if n else 0.0
    per_tol = C * (d + n + 4) * (2 if symmetric else 1) * unit(acc) * (largest + 1.0)
    if reduction == "none":
        return per_pair, per_tol + C * unit(dtype) * per_pair.abs() + tiny(dtype)
    total = per_pair.sum()
    tol = per_tol * max(1, int(keep.sum())) if reduction == "sum" else per_tol
    value = total if reduction == "sum" else total / max(1, int(keep.sum()))
    return value, tol + C * unit(dtype) * value.abs() + tiny(dtype)


def check_info_nce(case, backends):
    dtype, a, b, temperature, normalize, symmetric, reduction, valid = case
    acc = accumulation(dtype)
    too_small = temperature < 1.0 / torch.finfo(acc).max
    want, tol = (None, None) if too_small else info_nce_expected(a, b, temperature, normalize, symmetric, reduction, valid, dtype)
    for backend in backends:
        got = expect_refusal(
            "mmot.info_nce",
            lambda be=backend: mmot.info_nce(
                a.to(dtype),
                b.to(dtype),
                temperature,
                symmetric=symmetric,
                normalize=normalize,
                reduction=reduction,
                valid=valid,
                backend=be,
            ),
            "temperature" if too_small else None,
        )
        if got is not None:
            assert got.dtype == dtype
            assert_agrees(got, want, tol, f"info_nce[{backend}, τ={temperature:.3g}, normalize={normalize}, {reduction}]")


def rust_clamped_rows_overflow(case) -> bool:
    """A row under the 1e-12 norm clamp whose 1e12/τ passes float32 (test_info_nce_rust_clamped_row_tiny_temperature)."""
    dtype, a, b, temperature, normalize, *_ = case
    if not normalize or dtype == torch.float64:
        return False
    smallest = min(float(safe_norms(a).amin()), float(safe_norms(b).amin()))
    return 1.0 / (smallest * temperature) > torch.finfo(torch.float32).max / 2.0**10


@fuzz(25)
@given(info_nce_cases())
def test_info_nce(case):
    check_info_nce(case, [b for b in BACKENDS if b != "rust" or not rust_clamped_rows_overflow(case)])


def test_info_nce_rust_clamped_row_tiny_temperature():
    """Rust, normalize=True: a row below the 1e-12 norm clamp at τ = 8.8e-28 once gave NaN
    (float64: 8.0e26; torch and Triton agree with it)."""
    a = torch.tensor([[1.9724e08, 1.3976e08, -8.6937e07], [6.9389e-18, 4.6739e-18, 4.0044e-18]])
    b = torch.tensor([[1.5, 1.5, 0.5], [-0.5, 0.5, -1.5]])
    case = (torch.float32, a.double(), b.double(), 8.785301923798995e-28, True, True, "none", None)
    check_info_nce(case, ["rust"])


@fuzz(10)
@given(info_nce_cases(huge_rows=True))
def test_info_nce_normalized_rows_out_of_norm_range(case):
    """normalize=True with rows past the squared norm's range (float32 above ~1.8e19 or below
    ~1e-19): Rust and Triton once gave NaN above."""
    check_info_nce(case, BACKENDS)


@fuzz(4)
@given(info_nce_cases(max_n=1, dtypes=[torch.float16, torch.bfloat16]), st.integers(512, 2048))
def test_info_nce_half_precision_large_n(case, n):
    """float16/bfloat16 at N up to 2048 (rust and torch): reductions over many pairs."""
    dtype, _, _, temperature, normalize, symmetric, reduction, valid = case
    generator = torch.Generator().manual_seed(n)
    a = (torch.randn(n, 16, generator=generator, dtype=torch.float64) * 3).to(dtype).double()
    b = (a + torch.randn(n, 16, generator=generator, dtype=torch.float64)).to(dtype).double()
    temperature = max(temperature, 0.01)
    valid = None if valid is None else torch.rand(n, generator=generator) > 0.2
    check_info_nce((dtype, a, b, temperature, True, symmetric, reduction, valid), NATIVE)


@fuzz(8)
@given(info_nce_cases())
def test_info_nce_gradients(case):
    dtype, a, b, temperature, normalize, symmetric, _, valid = case
    if temperature < 1.0 / torch.finfo(accumulation(dtype)).max:
        return
    a64, b64 = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    keep = torch.ones(a.shape[0], dtype=torch.bool) if valid is None else valid
    want = reference.info_nce(a64, b64, keep, temperature, symmetric, normalize).sum()
    ga64, gb64 = torch.autograd.grad(want, (a64, b64))
    acc = accumulation(dtype)
    bound = float((row_bound(a, normalize) @ row_bound(b, normalize).T).amax()) / temperature
    n, d = a.shape
    for backend in BACKENDS:
        xs, ys = a.to(dtype).requires_grad_(True), b.to(dtype).requires_grad_(True)
        loss = mmot.info_nce(xs, ys, temperature, symmetric=symmetric, normalize=normalize, reduction="sum", valid=valid, backend=backend)
        ga, gb = torch.autograd.grad(loss, (xs, ys))
        for got, ref, inp, other in ((ga, ga64, a, b), (gb, gb64, b, a)):
            # Each term of the gradient is at most 4·|other row|/τ (over ‖row‖ when normalizing).
            terms = 4 * n * row_bound(other, normalize).abs().amax() / temperature
            if normalize:
                terms = 3 * terms / safe_norms(inp)
            tol = (
                C * (d + n + 4) * unit(acc) * (bound + 1) * (ref.abs().amax(-1, keepdim=True) + terms)
                + C * unit(dtype) * ref.abs()
                + tiny(dtype)
            )
            assert_agrees(got, ref, tol, f"info_nce grad[{backend}, τ={temperature:.3g}, normalize={normalize}]")


# ------------------------------------------------------------------------------ anchor_consistency_loss


@st.composite
def anchor_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    acc = accumulation(dtype)
    smallest = 1.0 / torch.finfo(acc).max
    temperature = draw(
        st.one_of(
            st.floats(0.01, 2.0),
            st.floats(math.log10(smallest), 0.0).map(lambda e: 10.0**e),
            st.sampled_from([smallest * 1.0001, smallest * 0.5]),
        )
    )
    # sim/τ over the interesting range: deep negative, around 0, and far past e^x's overflow.
    fraction = draw(st.sampled_from([0.02, 0.1, 0.8]))
    sim = pattern_tensor(draw, shape, dtype, fraction)
    if draw(st.booleans()):
        sim = (sim / row_top(sim).amax().clamp_min(1e-300) * temperature * draw(st.floats(0.1, 200.0))).to(dtype).double()
    kind = draw(st.sampled_from(["uniform", "binary", "near_one"]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    target = torch.rand(shape, generator=generator, dtype=torch.float64)
    if kind == "binary":
        target = target.round()
    elif kind == "near_one":
        target = torch.where(target > 0.5, 1.0, 1.0 - torch.finfo(dtype).eps)
    return dtype, sim, target.to(dtype).double(), temperature


def anchor_expected(sim, target, temperature, dtype):
    """The loss from its overflow-free split form in float64 (mmot.reference gives NaN where
    sim/τ passes float64), and its tolerance: relative error u·|x| in e^x per entry."""
    x = sim / temperature
    one_minus = (1.0 - target).abs()
    linear = torch.where(one_minus == 0, 0.0, torch.exp(x + torch.log(one_minus)))
    terms = linear + torch.nn.functional.softplus(-torch.exp(x.clamp(max=700)))
    want = terms.mean()
    bound = (terms * (1 + x.abs())).mean()
    return want, C * 4 * unit(accumulation(dtype)) * bound + C * unit(dtype) * want.abs() + tiny(dtype)


@fuzz(25)
@given(anchor_cases())
def test_anchor_consistency_loss(case):
    dtype, sim, target, temperature = case
    too_small = temperature < 1.0 / torch.finfo(accumulation(dtype)).max
    want, tol = (None, None) if too_small else anchor_expected(sim, target, temperature, dtype)
    for backend in BACKENDS:
        if backend == "triton" and not interpreted_exactly(dtype, sim):
            continue
        got = expect_refusal(
            "mmot.anchor_consistency_loss",
            lambda be=backend: mmot.anchor_consistency_loss(sim.to(dtype), target.to(dtype), temperature, backend=be),
            "temperature" if too_small else None,
        )
        if got is not None:
            assert_agrees(got, want, tol, f"anchor_consistency_loss[{backend}, τ={temperature:.3g}]")


@fuzz(8)
@given(anchor_cases())
def test_anchor_consistency_gradients(case):
    dtype, sim, target, temperature = case
    if temperature < 1.0 / torch.finfo(accumulation(dtype)).max:
        return
    x = sim / temperature
    # The exact gradient, e^x·((1 − t) − σ(−e^x))/τ per entry, ±inf where it overflows float64
    # (autograd through the reference gives NaN there).
    one_minus = 1.0 - target
    linear = torch.where(one_minus == 0, 0.0, torch.sign(one_minus) * torch.exp(x + torch.log(one_minus.abs())))
    z = torch.exp(x)
    damp = torch.where(torch.isinf(z), 0.0, z * torch.sigmoid(-z))
    want = (linear - damp) / temperature / sim.numel()
    # Relative error u·|x| in e^x, so u·(1 + |x|) relative in each of the two parts, the second
    # (e^{−z}) moved by z times that; the parts may cancel, so the bound is on their sizes.
    parts = linear.abs() + torch.where(damp == 0, 0.0, (1 + z) * damp.abs())
    tol = C * 4 * unit(accumulation(dtype)) * (1 + x.abs()) * parts / temperature / sim.numel() + C * unit(dtype) * want.abs() + tiny(dtype)
    for backend in BACKENDS:
        if backend == "triton" and not interpreted_exactly(dtype, sim):
            continue
        s = sim.to(dtype).requires_grad_(True)
        (got,) = torch.autograd.grad(mmot.anchor_consistency_loss(s, target.to(dtype), temperature, backend=backend), s)
        assert_agrees(got, want, tol, f"anchor_consistency_loss grad[{backend}, τ={temperature:.3g}]")


def test_anchor_consistency_gradient_exp_underflow():
    """Every backend, float32, τ = 8.48e-29: at sim/τ = −120 e^{sim/τ} underflows float32 but the
    exact gradient e^{sim/τ}·((1 − t) − σ(−e^{sim/τ}))/τ/n = 6.0e-26 does not (every backend
    once gave 0), nor at sim/τ = 5 with t = 1, where e^{−e^{sim/τ}} underflows (−2.0e-35)."""
    tau = 8.48e-29
    sim = torch.tensor([[-120 * tau, 0.5 * tau, 5 * tau]])
    target = torch.tensor([[0.3, 0.6, 1.0]])
    x = sim.double() / tau
    want = torch.exp(x) * ((1 - target.double()) - torch.sigmoid(-torch.exp(x))) / tau / 3
    for backend in BACKENDS:
        s = sim.clone().requires_grad_(True)
        (got,) = torch.autograd.grad(mmot.anchor_consistency_loss(s, target, tau, backend=backend), s)
        assert_agrees(got, want, 1e-4 * want.abs(), f"anchor_consistency_loss grad[{backend}]")


def test_anchor_consistency_torch_logit_overflow():
    """torch backend, float64, τ = 5.56e-309 and sim = 2.5: sim/τ passes float64, the exact loss
    is +inf; torch once gave NaN."""
    sim = torch.tensor([[2.5, -0.5]], dtype=torch.float64)
    target = torch.tensor([[0.56, 0.26]], dtype=torch.float64)
    got = mmot.anchor_consistency_loss(sim, target, 5.56324091473263e-309, backend="torch")
    assert_agrees(
        got, torch.tensor(math.inf, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64), "anchor_consistency_loss[torch]"
    )


def test_anchor_consistency_gradient_torch_logit_overflow():
    """torch backend, float16 sim = 1.0723 at τ = 2.94e-39: sim/τ passes float32, the exact
    gradient is 0 for t = 1 and +inf for t = 0; torch once gave NaN for both."""
    sim = torch.tensor([[1.0723, 1.0723]], dtype=torch.float16)
    target = torch.tensor([[1.0, 0.0]], dtype=torch.float16)
    s = sim.clone().requires_grad_(True)
    (got,) = torch.autograd.grad(mmot.anchor_consistency_loss(s, target, 2.939029925823259e-39, backend="torch"), s)
    want = torch.tensor([[0.0, math.inf]], dtype=torch.float64)
    assert_agrees(got, want, torch.tensor(0.0, dtype=torch.float64), "anchor_consistency_loss grad[torch]")


# ------------------------------------------------------------------------------ sinkhorn / multi_sinkhorn


def exponent_limits(op: str) -> tuple[float, float]:
    """(float32, float64) limits of the exponent range R (reference.MAX_EXPONENT_RANGE): past the
    first, narrower scores are computed in float64; past the second the op refuses eps."""
    table = reference.MAX_EXPONENT_RANGE[op]
    return table[torch.float32], table[torch.float64]


def draw_eps(draw, s: torch.Tensor, dtype: torch.dtype, max_weight: float, op: str) -> float:
    """eps by the exponent range it gives (up to past the op's limits, and right at them), or at
    the smallest accepted value (and just below it), or ordinary."""
    top = torch.finfo(accumulation(dtype)).max
    spread = float((s.amax(-2) - s.amin(-2)).amax()) * max_weight
    smallest = 1.0 / top
    mode = draw(st.sampled_from(["range", "range", "limit", "smallest", "ordinary"]))
    if mode == "smallest" or spread == 0 or not math.isfinite(spread):
        return draw(st.sampled_from([smallest * 1.0001, smallest * 0.5, smallest * 10]))
    if mode == "ordinary":
        return draw(st.floats(0.05, 2.0))
    limits = [math.log10(v) for v in exponent_limits(op)]
    if mode == "limit":
        exponent = draw(st.sampled_from(limits)) + draw(st.sampled_from([-0.01, 0.01]))
    else:
        exponent = draw(st.floats(-2.0, limits[1] + 1))
    return max(spread / 10.0**exponent, smallest * 1.0001)


def sinkhorn_refusal(s: torch.Tensor, eps: float, dtype: torch.dtype, max_weight: float, op: str) -> tuple[str | None, str | None]:
    """(must, may): the documented refusals of eps (docs/numerics.md, "Extreme scores")."""
    if eps < 1.0 / torch.finfo(accumulation(dtype)).max:
        return "eps", None
    spread = reference.exponent_range(s, eps, max_weight)
    limit = exponent_limits(op)[1]
    if spread > limit * 1.001:
        return "eps", None
    return None, ("eps" if spread > limit * 0.999 else None)


def working_unit(s: torch.Tensor, eps: float, dtype: torch.dtype, max_weight: float, op: str) -> float:
    """Unit roundoff the op computes in: float64 past the float32 limit (reference.working_dtype)."""
    if dtype == torch.float64 or reference.exponent_range(s, eps, max_weight) > exponent_limits(op)[0]:
        return unit(torch.float64)
    return unit(torch.float32)


def plan_tolerance(want, rows, spread, n_iters, dtype, u):
    """Entries within (2·iters + 1)·(R + N + K)·u of the row mass: exp turns an absolute error
    u·R of a logit into a relative one, and each scaling adds one."""
    n, k = want.shape[-2:]
    growth = (2 * n_iters + 1) * (spread + n + k)
    return C * growth * u * rows.unsqueeze(-1) + C * unit(dtype) * want.abs() + tiny(dtype)


@st.composite
def sinkhorn_cases(draw, max_n=6, max_k=5):
    dtype = draw(st.sampled_from(DTYPES))
    batch = draw(st.sampled_from([(), (2,)]))
    n, k = draw(st.integers(1, max_n)), draw(st.integers(1, max_k))
    s = pattern_tensor(draw, (*batch, n, k), dtype)
    eps = draw_eps(draw, s, dtype, 1.0, "mmot.sinkhorn")
    n_iters = draw(st.integers(1, 5))
    which = draw(st.sampled_from(["default", "rows", "cols", "both"]))
    acc = accumulation(dtype)
    low, high = exponent_bounds(dtype, 0.4)
    total = 10.0 ** draw(st.floats(low, high))
    rows = draw(masses(n, acc, total)) if which in ("rows", "both") else None
    cols = draw(masses(k, acc, total)) if which in ("cols", "both") else None
    # Masses travel in the accumulation dtype (the op converts them to it).
    rows = None if rows is None else rows.to(acc)
    cols = None if cols is None else cols.to(acc)
    return dtype, s, eps, n_iters, rows, cols


def resolved_masses(s, rows, cols):
    n, k = s.shape[-2:]
    if rows is None and cols is None:
        return torch.ones(s.shape[:-1], dtype=torch.float64), torch.full(s.shape[:-2] + (k,), n / k, dtype=torch.float64)
    if cols is None:
        return rows.double().expand(s.shape[:-1]), (rows.double().sum() / k).expand(s.shape[:-2] + (k,))
    if rows is None:
        return (cols.double().sum() / n).expand(s.shape[:-1]), cols.double().expand(s.shape[:-2] + (k,))
    return rows.double().expand(s.shape[:-1]), cols.double().expand(s.shape[:-2] + (k,))


def check_sinkhorn(case, backends):
    dtype, s, eps, n_iters, rows, cols = case
    must, may = sinkhorn_refusal(s, eps, dtype, 1.0, "mmot.sinkhorn")
    r64, c64 = resolved_masses(s, rows, cols)
    want = None if must else reference.sinkhorn(s, eps, n_iters, r64, c64, "auto")
    spread = reference.exponent_range(s, eps, 1.0) if not must else 0.0
    for backend in backends:
        got = expect_refusal(
            "mmot.sinkhorn",
            lambda be=backend: mmot.sinkhorn(s.to(dtype), eps, n_iters, row_mass=rows, col_mass=cols, backend=be),
            must,
            may,
        )
        if got is None:
            continue
        what = f"sinkhorn[{backend}, eps={eps:.4g}, R={spread:.3g}, iters={n_iters}]"
        assert_agrees(got, want, plan_tolerance(want, r64, spread, n_iters, dtype, working_unit(s, eps, dtype, 1.0, "mmot.sinkhorn")), what)
        k = s.shape[-1]
        sums = got.double().sum(-1)
        finite = torch.isfinite(sums)
        tol = C * (k + 1) * (unit(accumulation(dtype)) + unit(dtype)) * r64 + k * tiny(dtype)
        assert ((sums - r64).abs() <= tol)[finite].all(), f"{what}: rows sum to {sums} instead of {r64}"


@fuzz(20)
@given(sinkhorn_cases())
def test_sinkhorn(case):
    check_sinkhorn(case, BACKENDS)


@fuzz(6)
@given(sinkhorn_cases(max_n=4, max_k=4))
def test_sinkhorn_gradients(case):
    dtype, s, eps, n_iters, rows, cols = case
    must, may = sinkhorn_refusal(s, eps, dtype, 1.0, "mmot.sinkhorn")
    if must or may:
        return
    r64, c64 = resolved_masses(s, rows, cols)
    s64 = s.clone().requires_grad_(True)
    want = reference.sinkhorn(s64, eps, n_iters, r64, c64, "auto")
    cot = pattern_tensor_like(want, dtype)
    (g64,) = torch.autograd.grad((want * cot).sum(), s64)
    spread = reference.exponent_range(s, eps, 1.0)
    n, k = s.shape[-2:]
    # Each entry of the gradient sums terms up to |cot|·P/eps: bound them by the row mass.
    terms = float(cot.abs().amax()) * float(r64.amax()) / eps * (n + k)
    growth = (2 * n_iters + 1) * (spread + n + k)
    tol = (
        C * growth * working_unit(s, eps, dtype, 1.0, "mmot.sinkhorn") * (float(g64.abs().amax()) + terms)
        + C * unit(dtype) * g64.abs()
        + tiny(dtype)
    )
    for backend in BACKENDS:
        x = s.to(dtype).requires_grad_(True)
        out = mmot.sinkhorn(x, eps, n_iters, row_mass=rows, col_mass=cols, backend=backend)
        (got,) = torch.autograd.grad((out * cot.to(dtype)).sum(), x)
        assert_agrees(got, g64, tol, f"sinkhorn grad[{backend}, eps={eps:.4g}, R={spread:.3g}, iters={n_iters}]")


@fuzz(10)
@given(sinkhorn_cases(), st.floats(1.01, 100.0))
def test_sinkhorn_unequal_mass_totals_are_refused(case, factor):
    dtype, s, eps, n_iters, _, _ = case
    n, k = s.shape[-2:]
    rows = torch.full((n,), 1.0, dtype=accumulation(dtype))
    cols = torch.full((k,), n * factor / k, dtype=accumulation(dtype))
    for backend in BACKENDS:
        expect_refusal(
            "mmot.sinkhorn", lambda be=backend: mmot.sinkhorn(s.to(dtype), 0.5, 2, row_mass=rows, col_mass=cols, backend=be), "col_mass"
        )


# ------------------------------------------------------------------------------ multi_sinkhorn


@st.composite
def multi_cases(draw, max_n=6, max_k=5):
    dtype = draw(st.sampled_from(DTYPES))
    batch = draw(st.sampled_from([(), (2,)]))
    n, n_anchors = draw(st.integers(1, max_n)), draw(st.integers(1, max_k))
    k = draw(st.integers(1, n_anchors))
    s = pattern_tensor(draw, (*batch, n, n_anchors), dtype)
    kind = draw(st.sampled_from(["low_weight", "slot_weights"]))
    if kind == "low_weight":
        low = draw(st.sampled_from([0.25, 1.0, 10.0 ** draw(st.floats(-3.0, 1.0))]))
        weights = [low] * (n_anchors - k) + [1.0] * k
        options = dict(low_weight=low)
    else:
        # Ties among the slot weights, from a few values.
        values = draw(st.lists(st.floats(0.01, 4.0), min_size=1, max_size=3))
        weights = [draw(st.sampled_from(values)) for _ in range(n_anchors)]
        options = dict(slot_weights=weights)
    eps = draw_eps(draw, s, dtype, max(weights), "mmot.multi_sinkhorn")
    n_iters = draw(st.integers(1, 6))
    normalize = draw(st.sampled_from(["minmax", "none"]))
    if draw(st.booleans()):
        options["anchor_mass"] = torch.full((n_anchors,), n / n_anchors, dtype=accumulation(dtype))
    return dtype, s, k, eps, n_iters, weights, normalize, options


def check_multi(case, backends):
    dtype, s, k, eps, n_iters, weights, normalize, options = case
    n, n_anchors = s.shape[-2:]
    must, may = sinkhorn_refusal(s, eps, dtype, max(weights), "mmot.multi_sinkhorn")
    acc = accumulation(dtype)
    if not must:
        mass = torch.full(s.shape[:-2] + (n_anchors,), n / n_anchors, dtype=torch.float64)
        raw = reference.multi_sinkhorn(s, eps, n_iters, weights, k, mass, "none", "auto")
        spread = reference.exponent_range(s, eps, max(weights))
        # T sums the last k slots of P, each entry a plan of unit rows (see plan_tolerance).
        u = working_unit(s, eps, dtype, max(weights), "mmot.multi_sinkhorn")
        err = C * (3 * n_iters + 1) * (spread + n + n_anchors) * u * k
        if normalize == "none":
            want, tol = raw, err + C * unit(dtype) * raw.abs() + tiny(dtype)
        else:
            want = reference.minmax_rows(raw)
            low, high = raw.amin(-1, keepdim=True), raw.amax(-1, keepdim=True)
            # Within twice the constant-row threshold of the accumulation dtype either answer is right.
            near_constant = high - low <= 2 * reference.CONSTANT_ROW_ULPS * 2 * unit(acc) * high.abs()
            tol = torch.where(near_constant, 1.0, (2 * err / (high - low)).clamp(max=1.0)) + C * unit(dtype) + tiny(dtype)
    for backend in backends:
        call = lambda be=backend: mmot.multi_sinkhorn(s.to(dtype), k, eps, n_iters, normalize=normalize, backend=be, **options)  # noqa: E731
        got = expect_refusal("mmot.multi_sinkhorn", call, must, may)
        if got is None:
            continue
        what = f"multi_sinkhorn[{backend}, k={k}, eps={eps:.4g}, R={spread:.3g}, iters={n_iters}, {normalize}]"
        assert_agrees(got, want, tol, what)
        g = got.double()
        if normalize == "minmax":
            assert ((g >= 0) & (g <= 1)).all(), f"{what}: min-max entries outside [0, 1]: {g}"
        else:
            sums = g.sum(-1)
            assert ((sums - k).abs() <= C * (n_anchors + 1) * (unit(acc) + unit(dtype)) * k).all(), f"{what}: rows sum to {sums}, not {k}"


@fuzz(15)
@given(multi_cases())
def test_multi_sinkhorn(case):
    check_multi(case, BACKENDS)


@fuzz(10)
@given(multi_cases(), st.integers(0, 2**31 - 1), st.floats(1e-3, 0.5))
def test_multi_sinkhorn_non_uniform_anchor_mass_is_refused(case, seed, spread):
    dtype, s, k, _, n_iters, _, normalize, _ = case
    n, n_anchors = s.shape[-2:]
    if n_anchors < 2:
        return
    generator = torch.Generator().manual_seed(seed)
    mass = n / n_anchors * (1 + spread * (torch.rand(n_anchors, generator=generator, dtype=torch.float64) - 0.5))
    mass[0], mass[1] = n / n_anchors * (1 + spread), n / n_anchors * (1 - spread)
    mass = mass * n / mass.sum()  # the right total, but not uniform
    for backend in BACKENDS:
        call = lambda be=backend: mmot.multi_sinkhorn(s.to(dtype), k, 0.5, n_iters, anchor_mass=mass.to(accumulation(dtype)), backend=be)  # noqa: E731
        expect_refusal("mmot.multi_sinkhorn", call, "anchor_mass")


@fuzz(5)
@given(multi_cases(max_n=4, max_k=4))
def test_multi_sinkhorn_gradients(case):
    """rust and torch only: a Multi-SK backward takes ~1 s in the Triton interpreter."""
    dtype, s, k, eps, n_iters, weights, normalize, options = case
    must, may = sinkhorn_refusal(s, eps, dtype, max(weights), "mmot.multi_sinkhorn")
    if must or may:
        return
    n, n_anchors = s.shape[-2:]
    mass = torch.full(s.shape[:-2] + (n_anchors,), n / n_anchors, dtype=torch.float64)
    s64 = s.clone().requires_grad_(True)
    raw = reference.multi_sinkhorn(s64, eps, n_iters, weights, k, mass, "none", "auto")
    cot = pattern_tensor_like(raw, dtype)
    (g64,) = torch.autograd.grad((raw * cot).sum(), s64)
    spread = reference.exponent_range(s, eps, max(weights))
    terms = float(cot.abs().amax()) * k * max(weights) / eps * (n + n_anchors)
    growth = (3 * n_iters + 1) * (spread + n + n_anchors)
    tol = (
        C * growth * working_unit(s, eps, dtype, max(weights), "mmot.multi_sinkhorn") * (float(g64.abs().amax()) + terms)
        + C * unit(dtype) * g64.abs()
        + tiny(dtype)
    )
    for backend in NATIVE:
        x = s.to(dtype).requires_grad_(True)
        out = mmot.multi_sinkhorn(x, k, eps, n_iters, normalize="none", backend=backend, **options)
        (got,) = torch.autograd.grad((out * cot.to(dtype)).sum(), x)
        assert_agrees(got, g64, tol, f"multi_sinkhorn grad[{backend}, k={k}, eps={eps:.4g}, R={spread:.3g}, iters={n_iters}]")


# ------------------------------------------------------------------------------ torch.compile


def compiled(fn):
    return torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")


def extreme_rows(n: int, d: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Mixed signs, rows from 1e-15 to 1e15 times the dtype's safe range, exact in ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    exponents = torch.linspace(-15, 15, n, dtype=torch.float64).unsqueeze(-1)
    return (x * 10.0**exponents).to(dtype).double()


@pytest.mark.parametrize("op", ["sinkhorn", "multi_sinkhorn", "similarity", "info_nce"])
def test_compile_dynamic_two_sizes(op):
    """fullgraph=True, dynamic=True, two sizes through one compiled function, extreme inputs."""
    dtype = torch.float32
    for n in (5, 9):
        if op == "sinkhorn":
            s = extreme_rows(n, 4, n, dtype) * 1e-14  # scores up to 10, exponent range up to ~1e3
            fn = compiled(lambda x: mmot.sinkhorn(x, 0.01, 3, backend="rust"))
            want = reference.sinkhorn(s, 0.01, 3, torch.ones(n, dtype=torch.float64), torch.full((4,), n / 4, dtype=torch.float64))
            tol = plan_tolerance(want, torch.ones(n, dtype=torch.float64), reference.exponent_range(s, 0.01, 1.0), 3, dtype, unit(dtype))
            assert_agrees(fn(s.to(dtype)), want, tol, f"compiled sinkhorn n={n}")
        elif op == "multi_sinkhorn":
            s = extreme_rows(n, 4, n, dtype) * 1e-15
            fn = compiled(lambda x: mmot.multi_sinkhorn(x, 2, 0.05, 5, normalize="none", backend="rust"))
            mass = torch.full((4,), n / 4, dtype=torch.float64)
            want = reference.multi_sinkhorn(s, 0.05, 5, [0.25, 0.25, 1.0, 1.0], 2, mass, "none")
            err = C * 16 * (reference.exponent_range(s, 0.05, 1.0) + n + 4) * unit(torch.float32) * 2
            assert_agrees(fn(s.to(dtype)), want, err + tiny(dtype), f"compiled multi_sinkhorn n={n}")
        elif op == "similarity":
            x, y = extreme_rows(n, 6, n, dtype), extreme_rows(3, 6, 99, dtype)
            fn = compiled(lambda a, b: mmot.similarity(a, b, backend="rust"))
            want = reference.similarity(x, y)
            assert_agrees(
                fn(x.to(dtype), y.to(dtype)), want, similarity_tolerance(x, y, True, 1.0, dtype, want), f"compiled similarity n={n}"
            )
        else:
            a, b = extreme_rows(n, 6, n, dtype), extreme_rows(n, 6, n + 1, dtype)
            fn = compiled(lambda x, y: mmot.info_nce(x, y, 1e-3, reduction="none", backend="rust"))
            want, tol = info_nce_expected(a, b, 1e-3, True, True, "none", None, dtype)
            assert_agrees(fn(a.to(dtype), b.to(dtype)), want, tol, f"compiled info_nce n={n}")
