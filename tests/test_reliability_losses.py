"""Reliability of the loss and similarity ops at the edges of their dtypes, on every backend.

Each test compares with a float64 (or exact) evaluation of the naive form:
- anchor_consistency_loss where e^{sim/τ} overflows the dtype (cosines near 1 at small τ);
- non-finite inputs with the checks off give non-finite results;
- info_nce's mean/sum reductions in float16 at large N.
"""

import math

import mmot
import pytest
import torch

# ---------------------------------------------------------------- anchor_consistency: overflow


def exact_anchor(sim, target, temperature):
    """Per-entry loss and gradient in float64 from the split form (finite where they are)."""
    x = sim.double() / temperature
    t = target.double()
    one_minus = 1.0 - t
    lin = torch.where(one_minus == 0, 0.0, torch.sign(one_minus) * torch.exp(x + torch.log(one_minus.abs())))
    z = torch.exp(x)
    soft = torch.log1p(torch.exp(-z))
    damp = torch.where(torch.isinf(z), 0.0, z * torch.sigmoid(-z))
    return lin + soft, (lin - damp) / temperature


def overflow_case(dtype):
    """Cosines near 1 at τ = 0.01 (x up to 100 > log(max float32) = 88.7) with min-max-style
    targets: 1 exactly, just below 1, 0 and in between, and ordinary entries."""
    sim = torch.tensor([1.0, 0.999, 0.97, 0.9, 0.5, 0.2, -0.3, 0.85, 0.95, 0.1], dtype=dtype)
    below_one = 1.0 - torch.finfo(dtype).eps
    target = torch.tensor([1.0, 1.0, below_one, 1.0, 0.0, 0.5, 0.2, 0.0, 1.0, 0.7], dtype=dtype)
    return sim, target, 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_anchor_consistency_finite_where_exp_overflows(backend, dtype):
    sim, target, tau = overflow_case(dtype)
    terms, grads = exact_anchor(sim, target, tau)
    s = sim.clone().requires_grad_(True)
    loss = mmot.anchor_consistency_loss(s, target, tau, backend=backend)
    (grad,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(loss) and torch.isfinite(grad).all(), (loss, grad)
    rtol = 1e-5 if dtype == torch.float32 else 1e-11
    torch.testing.assert_close(loss.double(), terms.mean(), rtol=rtol, atol=0)
    torch.testing.assert_close(grad.double(), grads / sim.numel(), rtol=rtol, atol=1e-30)


def test_anchor_consistency_overflowing_loss_is_inf_with_finite_or_inf_gradient(backend):
    """Where the exact loss passes float32's range the loss is +inf (not NaN); entries with t = 1
    keep their (0) gradient and the overflowing entry's gradient is +inf."""
    sim = torch.tensor([1.5, 1.5, 0.2])
    target = torch.tensor([0.0, 1.0, 0.5])
    s = sim.clone().requires_grad_(True)
    loss = mmot.anchor_consistency_loss(s, target, 0.01, backend=backend)
    (grad,) = torch.autograd.grad(loss, s)
    assert loss.item() == math.inf
    assert grad[0].item() == math.inf and grad[1].item() == 0.0
    torch.testing.assert_close(grad[2:].double(), exact_anchor(sim[2:], target[2:], 0.01)[1] / 3, rtol=1e-5, atol=0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["sim", "target"])
def test_anchor_consistency_unchecked_non_finite_gives_nan(backend, bad, where):
    sim = torch.linspace(-0.9, 0.9, 12, dtype=torch.float32)
    target = torch.linspace(0.0, 1.0, 12, dtype=torch.float32)
    (sim if where == "sim" else target)[5] = bad
    s = sim.clone().requires_grad_(True)
    previous = mmot.set_checks(False)
    try:
        loss = mmot.anchor_consistency_loss(s, target, 0.1, backend=backend)
        (grad,) = torch.autograd.grad(loss, s)
    finally:
        mmot.set_checks(previous)
    assert torch.isnan(loss)
    assert torch.isnan(grad[5]) and torch.isfinite(grad[:5]).all()


# ---------------------------------------------------------------- info_nce: fp16 reductions


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_info_nce_float16_reductions_accumulate_in_float32(native_backend, reduction):
    """N = 2304 pairs of log N ≈ 7.7 each sum to ~35000 per direction: past float16's 65504 when
    symmetric, although the mean (~15) is not."""
    n, d = 2304, 8
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(n, d, generator=gen).half()
    b = torch.randn(n, d, generator=gen).half()
    per_pair = mmot.info_nce(a, b, temperature=1.0, reduction="none", backend=native_backend).double()
    got = mmot.info_nce(a, b, temperature=1.0, reduction=reduction, backend=native_backend)
    assert got.dtype == torch.float16
    want = per_pair.sum() if reduction == "sum" else per_pair.mean()
    if reduction == "sum" and want > torch.finfo(torch.float16).max:
        assert got.item() == math.inf
    else:
        assert torch.isfinite(got)
        torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=0)


# ---------------------------------------------------------------- similarity: huge rows


@pytest.mark.parametrize("magnitude", [1e20, 1e30])
def test_similarity_normalize_huge_rows_torch(magnitude):
    """Rows whose squared norm overflows float32 still give their cosines (the torch backend)."""
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 6, generator=gen), torch.randn(5, 6, generator=gen)
    want = torch.nn.functional.normalize(x.double(), dim=-1) @ torch.nn.functional.normalize(y.double(), dim=-1).T
    xs = (x * magnitude).requires_grad_(True)
    got = mmot.similarity(xs, y * magnitude, backend="torch")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(got.sum(), xs)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0


# ---------------------------------------------------------------- scale-safe cosines, every backend


def magnitude_rows(kind: str, n: int, d: int, seed: int) -> torch.Tensor:
    """float32 rows at the edges of the squared norm's range:
    huge      1e20: the sum of squares (1e40) overflows float32;
    peak      largest entry 3e38 (past 2^127, where a step of 2^128 would be inf), norm < max;
    tiny      1e-25: below the 1e-12 floor, the squares and the raw products underflow;
    mixed     rows of 1e20, 1, 1e-25 and 0 in one tensor."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    if kind == "peak":
        x = x * 1e37
        x[:, 0] = torch.where(x[:, 0] < 0, -3e38, 3e38)
        return x
    scales = {"huge": [1e20], "tiny": [1e-25], "mixed": [1e20, 1.0, 1e-25, 0.0]}[kind]
    return x * torch.tensor([scales[i % len(scales)] for i in range(n)])[:, None]


def unit64(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.double(), dim=-1, eps=1e-12)


def close_on_scale(got: torch.Tensor, want: torch.Tensor, rtol: float):
    """Elementwise within rtol, and absolutely within rtol of the largest magnitude (entries far
    below it carry no digits of their own in float32 sums)."""
    assert torch.isfinite(got).all(), got
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * float(want.abs().max()))


KINDS = ["huge", "peak", "tiny", "mixed"]


@pytest.mark.parametrize("kind", KINDS)
def test_similarity_normalize_rows_at_the_range_edges(backend, kind):
    """Cosines and their gradients against float64: the Rust and Triton kernels gave NaN for
    rows past ~1.8e19 and 0 for products of rows below 1e-19 (raw products underflowed); the
    torch backend NaN for rows with an entry past 2^127."""
    x, y = magnitude_rows(kind, 5, 6, seed=1), magnitude_rows(kind, 4, 6, seed=2)
    g = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))
    xs, ys = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    got = mmot.similarity(xs, ys, backend=backend)
    gx, gy = torch.autograd.grad(got, (xs, ys), g)
    x64, y64 = x.double().requires_grad_(True), y.double().requires_grad_(True)
    want = unit64(x64) @ unit64(y64).T
    wx, wy = torch.autograd.grad(want, (x64, y64), g.double())
    close_on_scale(got, want.detach(), 2e-6)
    close_on_scale(gx, wx, 1e-5)
    close_on_scale(gy, wy, 1e-5)


def float64_info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float, normalize: bool = True) -> torch.Tensor:
    """Per-pair symmetric InfoNCE losses of the dense float64 logits."""
    x, y = (unit64(a), unit64(b)) if normalize else (a.double(), b.double())
    s = x @ y.T / temperature
    return (torch.logsumexp(s, 1) - s.diagonal()) + (torch.logsumexp(s, 0) - s.diagonal())


@pytest.mark.parametrize("kind", KINDS)
def test_info_nce_normalize_rows_at_the_range_edges(backend, kind):
    """Per-pair losses and gradients against float64 (the Rust kernel gave NaN for
    ``info_nce(x, x + 1e19, 0.1)`` with x ~ 1e20; the torch backward wrong gradients there)."""
    a = magnitude_rows(kind, 6, 5, seed=4)
    b = 0.5 * a + 0.5 * magnitude_rows(kind, 6, 5, seed=5)
    g = torch.rand(6, generator=torch.Generator().manual_seed(6)) + 0.5
    a_, b_ = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    got = mmot.info_nce(a_, b_, 0.1, reduction="none", backend=backend)
    ga, gb = torch.autograd.grad(got, (a_, b_), g)
    a64, b64 = a.double().requires_grad_(True), b.double().requires_grad_(True)
    want = float64_info_nce(a64, b64, 0.1)
    wa, wb = torch.autograd.grad(want, (a64, b64), g.double())
    close_on_scale(got, want.detach(), 2e-5)
    close_on_scale(ga, wa, 2e-5)
    close_on_scale(gb, wb, 2e-5)


# ---------------------------------------------------------------- scales and temperatures at the dtype's limit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_similarity_scale_beyond_the_compute_dtype_is_named(backend, dtype):
    """scale = 1e39 is inf in float32: it used to give inf/NaN similarities silently."""
    x = torch.randn(3, 4).to(dtype)
    with pytest.raises(ValueError, match=r"mmot\.similarity: argument 'scale' must be within"):
        mmot.similarity(x, x, scale=1e39, backend=backend)
    with pytest.raises(ValueError, match=r"mmot\.similarity: argument 'scale'"):
        mmot.similarity(x, x, scale=-1e39, backend=backend)
    got = mmot.similarity(x.double(), x.double(), scale=1e39, backend=backend)  # float64 holds it
    torch.testing.assert_close(got, 1e39 * unit64(x) @ unit64(x).T, rtol=1e-12, atol=0)


def test_similarity_largest_scale_meets_the_cosine_first(backend):
    """scale near float32's max with rows of norm 1e-10: scale · 1/‖x‖ alone overflows, the
    result (cosine · scale) does not."""
    x = magnitude_rows("huge", 4, 5, seed=7) * 1e-30
    scale = 3e38
    got = mmot.similarity(x, x, scale=scale, backend=backend)
    want = scale * (unit64(x) @ unit64(x).T)
    finite = want.abs() < torch.finfo(torch.float32).max
    assert finite.all()
    close_on_scale(got, want, 2e-6)


def just_above_the_limit(dtype: torch.dtype) -> float:
    """4 × the smallest temperature whose reciprocal fits the compute dtype."""
    return 4.0 / torch.finfo(dtype).max


def test_info_nce_temperature_just_above_the_limit(backend):
    """τ = 4/finfo.max: logits up to 8.5e37. Rows of norm 1e-3 made 1/τ · 1/‖x‖ overflow in the
    Rust kernel (NaN losses) although the losses, up to (2 · 8.5e37), are finite. float32
    resolves logits to 8.5e37 · 2^-24, so that is the tolerance on top of the relative one."""
    tau = just_above_the_limit(torch.float32)
    a = magnitude_rows("huge", 6, 5, seed=8) * 1e-23
    b = a + 0.3 * magnitude_rows("huge", 6, 5, seed=9) * 1e-23
    got = mmot.info_nce(a, b, tau, reduction="none", backend=backend)
    want = float64_info_nce(a, b, tau)
    assert torch.isfinite(want).all() and torch.isfinite(got).all(), got
    resolution = 8 * torch.finfo(torch.float32).eps / tau
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=resolution)


def test_info_nce_gradient_just_above_the_limit(backend):
    """Rows of norm 0.75 at τ = 4/finfo.max: the exact gradient is bounded by 2/(τ·‖x‖) ≈ 2.3e38,
    so the gradient must be finite and within that bound (the torch backward gave NaN: a logit a
    rounding above its log-sum-exp made e^{1e31} = inf). Its values are not compared: float32
    resolves logits of 8.5e37 only to ~1e31, so the softmax weights e^{s − lse} are decided by
    rounding there (documented; float64 inputs resolve them)."""
    tau = just_above_the_limit(torch.float32)
    gen = torch.Generator().manual_seed(10)
    a = torch.nn.functional.normalize(torch.randn(6, 5, generator=gen), dim=-1) * 0.75
    b = torch.nn.functional.normalize(torch.randn(6, 5, generator=gen), dim=-1) * 0.75
    a_, b_ = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    grads = torch.autograd.grad(mmot.info_nce(a_, b_, tau, reduction="sum", backend=backend), (a_, b_))
    bound = 2.0 / (tau * 0.75) * (1 + 1e-5)
    for grad in grads:
        assert torch.isfinite(grad).all(), grad
        assert grad.abs().max() <= bound


def test_anchor_consistency_temperature_just_above_the_limit(backend):
    """τ = 4/finfo.max: where the exact loss is finite (targets of 1, negative cosines) the loss
    and gradient are finite and match float64; an entry whose exact loss overflows makes the
    mean +inf, never NaN."""
    tau = just_above_the_limit(torch.float32)
    sim = torch.tensor([0.9, 0.5, -0.2, -0.9, 0.3, -0.7])
    target = torch.tensor([1.0, 1.0, 0.0, 0.4, 1.0, 0.2])
    sim_ = sim.clone().requires_grad_(True)
    got = mmot.anchor_consistency_loss(sim_, target, tau, backend=backend)
    (grad,) = torch.autograd.grad(got, sim_)
    want, want_grad = exact_anchor(sim, target, tau)
    assert torch.isfinite(want).all()
    torch.testing.assert_close(got.double(), want.mean(), rtol=1e-5, atol=1e-6)
    close_on_scale(grad, want_grad / sim.numel(), 1e-5)
    target[0] = 0.5  # (1 - t)·e^{0.9/τ} overflows: the exact loss is +inf
    assert mmot.anchor_consistency_loss(sim, target, tau, backend=backend).item() == math.inf


# ---------------------------------------------------------------- similarity / info_nce: scale-safe rows

# Rows whose squared norm overflows float32 (1e20, 1e30), underflows it (1e-30: below the 1e-12
# floor, where x̂ = x / 1e-12) or is ordinary, mixed in one call.
ROW_MAGNITUDES = [1e20, 1.0, 1e-30, 1e30, 3e-5, 1e-25]


def mixed_rows(gen, n, d, shift=0):
    mags = torch.tensor([ROW_MAGNITUDES[(i + shift) % len(ROW_MAGNITUDES)] for i in range(n)], dtype=torch.float64)
    return (torch.randn(n, d, generator=gen, dtype=torch.float64) * mags[:, None]).float()


def exact_unit(x):
    """x / max(‖x‖, 1e-12) in float64 (the float32 inputs' squares fit float64)."""
    return torch.nn.functional.normalize(x.double(), dim=-1, eps=1e-12)


def assert_products_close(got, want, xh, yh, rtol=1e-5):
    """Entries of x̂ ŷᵀ agree to rtol of Σ|x̂_k ŷ_k| (the cosine's own rounding scale)."""
    bound = rtol * (xh.abs() @ yh.abs().transpose(-1, -2))
    assert torch.isfinite(got).all()
    err = (got.double() - want).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"


def test_similarity_normalize_scale_safe_rows(backend):
    """Huge and tiny rows give the float64 cosines (and their gradients) on every backend."""
    gen = torch.Generator().manual_seed(11)
    x, y = mixed_rows(gen, 6, 5), mixed_rows(gen, 5, 5, shift=2)
    xd = x.double().requires_grad_(True)
    yd = y.double().requires_grad_(True)
    want = exact_unit(xd) @ exact_unit(yd).T
    g = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    want_gx, want_gy = torch.autograd.grad((want * g).sum(), (xd, yd))
    xs, ys = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    got = mmot.similarity(xs, ys, backend=backend)
    xh, yh = exact_unit(x), exact_unit(y)
    assert_products_close(got, want.detach(), xh, yh)
    gx, gy = torch.autograd.grad(got, (xs, ys), g.float())
    for got_g, want_g in ((gx, want_gx), (gy, want_gy)):
        assert torch.isfinite(got_g).all()
        # Per row: the gradient's scale is |g|·‖ŷ‖ / ‖x‖, so compare relative to each row's largest.
        scale = want_g.abs().amax(-1, keepdim=True)
        torch.testing.assert_close(got_g.double() / scale, want_g / scale, rtol=0, atol=2e-4)


def exact_info_nce(a, b, temperature):
    """Per-pair symmetric InfoNCE loss in float64, straight from the definition (normalize=True)."""
    s = (exact_unit(a) @ exact_unit(b).T) / temperature
    diag = s.diagonal()
    return (torch.logsumexp(s, 1) - diag) + (torch.logsumexp(s, 0) - diag)


def check_info_nce(backend, a, b, temperature, rtol):
    """Forward: float64's value where it fits float32, +inf where it exceeds it, never NaN.
    Backward: finite where float64's gradient fits, and close to it."""
    ad = a.double().requires_grad_(True)
    bd = b.double().requires_grad_(True)
    want = exact_info_nce(ad, bd, temperature)
    gen = torch.Generator().manual_seed(5)
    g = torch.rand(want.shape, generator=gen, dtype=torch.float64) + 0.5
    want_ga, want_gb = torch.autograd.grad((want * g).sum(), (ad, bd))
    want = want.detach()
    a_, b_ = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    got = mmot.info_nce(a_, b_, temperature, reduction="none", backend=backend)
    big = torch.finfo(torch.float32).max
    fits = want.abs() < big * (1 - 1e-3)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.double()[fits], want[fits], rtol=rtol, atol=1e-5)
    assert (got[~fits] == math.inf).all()
    ga, gb = torch.autograd.grad(got, (a_, b_), g.float())
    for got_g, want_g in ((ga, want_ga), (gb, want_gb)):
        assert not torch.isnan(got_g).any()
        fine = want_g.abs().amax(-1) < big * 1e-2
        scale = want_g.abs().amax(-1, keepdim=True)[fine]
        assert torch.isfinite(got_g[fine]).all()
        torch.testing.assert_close(got_g.double()[fine] / scale, want_g[fine] / scale, rtol=0, atol=2e-3)


def test_info_nce_normalize_scale_safe_rows(backend):
    """Huge and tiny rows in InfoNCE give the float64 loss and gradient on every backend."""
    gen = torch.Generator().manual_seed(12)
    a, b = mixed_rows(gen, 6, 5), mixed_rows(gen, 6, 5, shift=3)
    check_info_nce(backend, a, b, 0.1, rtol=1e-4)
    x = torch.randn(3, 4, generator=gen) * 1e20
    check_info_nce(backend, x, x + 1e19, 0.1, rtol=1e-4)


@pytest.mark.parametrize("temperature", [3e-39, 1e-37, 1e-30])
def test_info_nce_tiny_temperature_inf_not_nan(backend, temperature):
    """At a temperature near the smallest accepted (1/max), 1/τ times a row's inverse norm
    overflows float32; the loss is float64's where it fits and +inf where it exceeds float32."""
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    check_info_nce(backend, a, b, temperature, rtol=1e-4)
    # Rows of every magnitude at a small temperature (tiny rows: 1/τ · 1e12 overflows).
    check_info_nce(backend, mixed_rows(gen, 6, 4), mixed_rows(gen, 6, 4, shift=1), temperature, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_similarity_scale_beyond_dtype_is_refused(backend, dtype):
    """A scale that is itself inf in the compute dtype (float32 for these inputs) is refused."""
    x = torch.randn(3, 4).to(dtype)
    for scale in (1e39, -1e39):
        with pytest.raises(ValueError, match="'scale'"):
            mmot.similarity(x, x, scale=scale, backend=backend)
    got = mmot.similarity(x.double(), x.double(), scale=1e39, backend=backend)  # fits float64
    torch.testing.assert_close(got, 1e39 * exact_unit(x) @ exact_unit(x).T, rtol=1e-6, atol=0)
