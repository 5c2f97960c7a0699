"""Every bad input of DESIGN.md §2.5 gets a ValueError or TypeError naming the op and argument."""

import pytest
import torch

import mmot

S = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
NAN = S.clone()
NAN[2, 1] = float("nan")
INF = S.clone()
INF[0, 0] = float("inf")

CASES = [
    # (call, error type, words the message must contain)
    (lambda: mmot.multi_sinkhorn(S[0]), ValueError, ["mmot.multi_sinkhorn", "'scores'", "(..., N, K)"]),
    (lambda: mmot.multi_sinkhorn(S.numpy()), TypeError, ["mmot.multi_sinkhorn", "'scores'", "torch.Tensor"]),
    (lambda: mmot.multi_sinkhorn(torch.ones(6, 4, dtype=torch.int64)), TypeError, ["mmot.multi_sinkhorn", "'scores'", "floating"]),
    (lambda: mmot.multi_sinkhorn(S.to(torch.complex64)), TypeError, ["'scores'", "floating"]),
    (lambda: mmot.multi_sinkhorn(torch.empty(6, 0)), ValueError, ["'scores'", "K >= 1"]),
    (lambda: mmot.multi_sinkhorn(S, k=0), ValueError, ["mmot.multi_sinkhorn", "'k'", "1..4"]),
    (lambda: mmot.multi_sinkhorn(S, k=5), ValueError, ["'k'", "1..4"]),
    (lambda: mmot.multi_sinkhorn(S, k=2.0), TypeError, ["'k'", "int"]),
    (lambda: mmot.multi_sinkhorn(S, eps=0.0), ValueError, ["'eps'", "positive"]),
    (lambda: mmot.multi_sinkhorn(S, eps=-1), ValueError, ["'eps'", "positive"]),
    (lambda: mmot.multi_sinkhorn(S, eps=float("nan")), ValueError, ["'eps'"]),
    (lambda: mmot.multi_sinkhorn(S, eps="0.1"), TypeError, ["'eps'"]),
    (lambda: mmot.multi_sinkhorn(S, n_iters=0), ValueError, ["'n_iters'", ">= 1"]),
    (lambda: mmot.multi_sinkhorn(S, n_iters=True), TypeError, ["'n_iters'", "int"]),
    (lambda: mmot.multi_sinkhorn(S, low_weight=0.0), ValueError, ["'low_weight'", "positive"]),
    (lambda: mmot.multi_sinkhorn(S, slot_weights=[1.0, 1.0]), ValueError, ["'slot_weights'", "4"]),
    (lambda: mmot.multi_sinkhorn(S, slot_weights=[1.0, -1.0, 1.0, 1.0]), ValueError, ["'slot_weights'", "positive"]),
    (lambda: mmot.multi_sinkhorn(S, slot_weights="abcd"), TypeError, ["'slot_weights'"]),
    (lambda: mmot.multi_sinkhorn(S, anchor_mass=torch.full((4,), -1.5)), ValueError, ["'anchor_mass'", "positive"]),
    (lambda: mmot.multi_sinkhorn(S, anchor_mass=torch.full((4,), 2.0)), ValueError, ["'anchor_mass'", "sum to N = 6"]),
    (lambda: mmot.multi_sinkhorn(S, anchor_mass=torch.full((5,), 1.2)), ValueError, ["'anchor_mass'", "shape"]),
    (lambda: mmot.multi_sinkhorn(S, anchor_mass=torch.ones(4, dtype=torch.int32)), TypeError, ["'anchor_mass'", "floating"]),
    (lambda: mmot.multi_sinkhorn(S, anchor_mass=torch.full((4,), 1.5, device="meta")), ValueError, ["'anchor_mass'", "device"]),
    (lambda: mmot.multi_sinkhorn(S, normalize="l2"), ValueError, ["'normalize'", "minmax"]),
    (lambda: mmot.multi_sinkhorn(S, log_domain="yes"), ValueError, ["'log_domain'"]),
    (lambda: mmot.multi_sinkhorn(S, backend="cuda"), ValueError, ["'backend'", "rust"]),
    (lambda: mmot.multi_sinkhorn(S.to("meta"), backend="triton"), ValueError, ["'triton'", "CUDA"]),
    (lambda: mmot.multi_sinkhorn(S.to("meta"), backend="rust"), ValueError, ["'rust'", "CPU"]),
    (lambda: mmot.multi_sinkhorn(NAN), ValueError, ["mmot.multi_sinkhorn", "'scores'", "finite"]),
    (lambda: mmot.multi_sinkhorn(INF, backend="torch"), ValueError, ["'scores'", "finite"]),
    (lambda: mmot.sinkhorn(S[0]), ValueError, ["mmot.sinkhorn", "'scores'"]),
    (lambda: mmot.sinkhorn(S.long()), TypeError, ["mmot.sinkhorn", "floating"]),
    (lambda: mmot.sinkhorn(S, eps=0), ValueError, ["mmot.sinkhorn", "'eps'"]),
    (lambda: mmot.sinkhorn(S, n_iters=-2), ValueError, ["mmot.sinkhorn", "'n_iters'"]),
    (lambda: mmot.sinkhorn(S, row_mass=-torch.ones(6)), ValueError, ["'row_mass'", "positive"]),
    (lambda: mmot.sinkhorn(S, row_mass=torch.ones(6), col_mass=torch.ones(4)), ValueError, ["'col_mass'", "sum"]),
    (lambda: mmot.sinkhorn(S, col_mass=torch.ones(3)), ValueError, ["'col_mass'", "shape"]),
    (lambda: mmot.sinkhorn(S, row_mass=torch.ones(6, device="meta")), ValueError, ["'row_mass'", "device"]),
    (lambda: mmot.sinkhorn(INF), ValueError, ["mmot.sinkhorn", "'scores'", "finite"]),
    (lambda: mmot.sinkhorn(S, log_domain=None), ValueError, ["'log_domain'"]),
    (lambda: mmot.similarity(S, S[:, :3]), ValueError, ["mmot.similarity", "feature size"]),
    (lambda: mmot.similarity(S, S.float()), TypeError, ["mmot.similarity", "'y'", "dtype"]),
    (lambda: mmot.similarity(S.expand(2, 6, 4), S.expand(3, 6, 4)), ValueError, ["mmot.similarity", "broadcast"]),
    (lambda: mmot.similarity(S[0], S), ValueError, ["mmot.similarity", "'x'"]),
    (lambda: mmot.similarity(S, S.to("meta")), ValueError, ["mmot.similarity", "'y'", "device"]),
    (lambda: mmot.similarity(S, S, scale=float("inf")), ValueError, ["'scale'"]),
    (lambda: mmot.similarity(S, S, normalize=1), TypeError, ["'normalize'"]),
    (lambda: mmot.similarity(NAN, S), ValueError, ["mmot.similarity", "'x'", "finite"]),
    (lambda: mmot.set_checks("no"), TypeError, ["mmot.set_checks", "bool"]),
]


@pytest.mark.parametrize("index", range(len(CASES)))
def test_bad_input_is_named(index):
    call, error, words = CASES[index]
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{word!r} missing from: {info.value}"


def test_value_checks_can_be_switched_off():
    previous = mmot.set_checks(False)
    try:
        out = mmot.multi_sinkhorn(S, anchor_mass=torch.full((4,), 2.0, dtype=torch.float64))  # wrong total, unchecked
        assert out.shape == S.shape
        with pytest.raises(ValueError, match="'k'"):  # parameter checks always run
            mmot.multi_sinkhorn(S, k=9)
    finally:
        mmot.set_checks(previous)
    with pytest.raises(ValueError, match="sum to N"):
        mmot.multi_sinkhorn(S, anchor_mass=torch.full((4,), 2.0, dtype=torch.float64))
