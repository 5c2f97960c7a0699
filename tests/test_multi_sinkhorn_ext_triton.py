"""Triton kernels of ``mmot::multi_sinkhorn_ext`` (``mmot.kernels.multi_sinkhorn_ext``) against an
independent naive float64 form written from the spec (issue 20, section 2), under the interpreter.

The naive form loops over problems and iterations with dense per-group tensors, in score units:
ragged padded batches (NaN padding), per-problem slot counts (absent groups) and tops, the
geometric ε schedule (float64 by repeated multiplication), per-problem early stopping, the
marginal error, min-max over the valid columns; the backward is compared with autograd through it.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmot import reference
from mmot.kernels import _common
from mmot.kernels import multi_sinkhorn_ext as kernel

CONSTANT_ULPS = 1024


def naive(scores, row_counts, col_counts, weights, counts, tops, eps_start, eps, decay, n_iters, tol, normalize):
    """(T, F, Gam, H, iters, err) in float64, one problem at a time, straight from the spec."""
    B, N, K = scores.shape
    G = len(weights)
    T = torch.zeros(B, N, K, dtype=torch.float64)
    F_out = torch.zeros(B, G, K, dtype=torch.float64)
    Gam_out = torch.zeros(B, N, K, dtype=torch.float64)
    H_out = torch.zeros(B, G, N, dtype=torch.float64)
    iters = torch.zeros(B, dtype=torch.int64)
    errs = torch.zeros(B, dtype=torch.float64)
    rows_T, rows_F, rows_Gam, rows_H = [], [], [], []
    for b in range(B):
        n, k = int(row_counts[b]), int(col_counts[b])
        S = scores[b, :n, :k].to(torch.float64)
        present = [g for g in range(G) if float(counts[b, g]) > 0]
        r = n / k
        F = {g: torch.zeros(k, dtype=torch.float64) for g in present}
        H = {g: torch.zeros(n, dtype=torch.float64) for g in present}
        Gam = torch.zeros(n, k, dtype=torch.float64)
        e_cur = float(eps_start[b])
        for t in range(n_iters):
            e = max(eps, e_cur)
            F = {g: e * math.log(r) - e * torch.logsumexp((weights[g] * S + Gam + H[g][:, None]) / e, dim=0) for g in present}
            terms = [math.log(float(counts[b, g])) + (weights[g] * S + F[g][None, :] + H[g][:, None]) / e for g in present]
            Gam = -e * torch.logsumexp(torch.stack(terms), dim=0)
            H = {g: -e * torch.logsumexp((weights[g] * S + Gam + F[g][None, :]) / e, dim=1) for g in present}
            P = {g: torch.exp((weights[g] * S + F[g][None, :] + Gam + H[g][:, None]) / e) for g in present}
            err = max(float(((P[g].sum(0) - r).abs() / r).max()) for g in present)
            iters[b] = t + 1
            errs[b] = err
            stop = tol >= 0 and e <= eps and err <= tol
            e_cur = e_cur * decay
            if stop:
                break
        target = sum(float(tops[b, g]) * P[g] for g in present)
        if normalize == "minmax":
            lo = target.amin(-1, keepdim=True)
            hi = target.amax(-1, keepdim=True)
            constant = hi - lo <= CONSTANT_ULPS * torch.finfo(torch.float64).eps * torch.maximum(lo.abs(), hi.abs())
            target = torch.where(constant, torch.zeros_like(target), (target - lo) / torch.where(constant, torch.ones_like(hi), hi - lo))
        rows_T.append(target)
        rows_Gam.append(Gam)
        rows_F.append({g: F[g] - 0 for g in present})
        rows_H.append(dict(H))
    pad_T = []
    for b in range(B):
        n, k = int(row_counts[b]), int(col_counts[b])
        pad_T.append(torch.nn.functional.pad(rows_T[b], (0, K - k, 0, N - n)))
        Gam_out[b, :n, :k] = rows_Gam[b].detach()
        for g, f in rows_F[b].items():
            F_out[b, g, :k] = f.detach()
        for g, h in rows_H[b].items():
            H_out[b, g, :n] = h.detach()
    return torch.stack(pad_T), F_out, Gam_out, H_out, iters, errs


def problem(seed, B, N, K, G, dtype=torch.float64, ragged=True, absent=True):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, N, K, generator=gen, dtype=torch.float64).to(dtype)
    if ragged:
        rows = torch.randint(1, N + 1, (B,), generator=gen)
        cols = torch.randint(1, K + 1, (B,), generator=gen)
        rows[0], cols[0] = N, K
    else:
        rows = torch.full((B,), N, dtype=torch.int64)
        cols = torch.full((B,), K, dtype=torch.int64)
    for b in range(B):
        scores[b, int(rows[b]) :, :] = float("nan")
        scores[b, :, int(cols[b]) :] = float("nan")
    weights = [0.25, 1.0, 0.5][:G]
    counts = torch.randint(1, 4, (B, G), generator=gen).double()
    if absent and G > 1:
        counts[1::2, 0] = 0.0  # group 0 absent in every other problem
    tops = torch.floor(counts * torch.rand(B, G, generator=gen, dtype=torch.float64) + 0.5)
    tops[:, -1] = torch.clamp(tops[:, -1], min=1.0)
    return scores, rows, cols, weights, counts, tops


def check_forward(got, want, iters_equal=True, rtol=1e-9, atol=1e-10):
    names = ("T", "F", "Gam", "H", "iters", "err")
    for name, g, w in zip(names, got, want):
        if name == "iters":
            if iters_equal:
                assert torch.equal(g, w), (g, w)
            continue
        assert g.shape == w.shape, name
        torch.testing.assert_close(g.double(), w.double(), rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def run(scores, rows, cols, weights, counts, tops, eps_start, eps, decay, n_iters, tol, normalize):
    return kernel.forward(scores, rows, cols, weights, counts, tops, eps_start, eps, decay, n_iters, tol, normalize, "auto")
