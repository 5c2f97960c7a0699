"""Independent, deliberately naive forms of the ops, written from the paper's description.

They share no code with mmot: the dense (K, N, K) Multi-SK as the SSPC code builds it, a
SwAV-style loop, a plain alternating-scaling loop, similarity by explicit loops, InfoNCE through
F.cross_entropy and the anchor term through its softplus form. Tests compare every backend with
these in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dense_multi_sinkhorn(scores, k, eps, n_iters, slot_weights, anchor_mass=None, normalize="minmax"):
    """SSPC's Multi-SK on the full (K slots, N, K anchors) tensor, for one (N, K) problem."""
    s = scores.double()
    n, n_anchors = s.shape
    w = torch.as_tensor(slot_weights, dtype=torch.float64)
    r = torch.full((n_anchors,), n / n_anchors, dtype=torch.float64) if anchor_mass is None else anchor_mass.double()
    # exp(w_m S / eps) would overflow at small eps: subtracting each (slot, anchor) column's max
    # is absorbed by the first normalisation, which rescales every (m, a) column.
    logits = w[:, None, None] * s[None] / eps
    p = torch.exp(logits - logits.amax(dim=1, keepdim=True))
    for _ in range(n_iters):
        p = p / p.sum(dim=1, keepdim=True) * r[None, None, :]
        p = p / p.sum(dim=0, keepdim=True)
        p = p / p.sum(dim=2, keepdim=True)
    t = p[n_anchors - k :].sum(0)
    if normalize == "minmax":
        lo, hi = t.min(dim=1, keepdim=True).values, t.max(dim=1, keepdim=True).values
        t = torch.where(hi > lo, (t - lo) / torch.where(hi > lo, hi - lo, 1.0), 0.0)
    return t


def swav_sinkhorn(scores, eps, n_iters):
    """SwAV's distributed_sinkhorn for one process, returned as (B, K)."""
    q = torch.exp(scores.double() / eps).t()
    n_protos, batch = q.shape
    q = q / q.sum()
    for _ in range(n_iters):  # out of place, so autograd can differentiate it
        q = q / q.sum(dim=1, keepdim=True) / n_protos
        q = q / q.sum(dim=0, keepdim=True) / batch
    return (q * batch).t()


def alternating_sinkhorn(scores, eps, n_iters, row_mass, col_mass):
    """Plain alternating scaling of the full matrix with generic masses, in float64."""
    p = torch.exp(scores.double() / eps)
    for _ in range(n_iters):
        p = p * (col_mass.double() / p.sum(0))[None, :]
        p = p * (row_mass.double() / p.sum(1))[:, None]
    return p


def loop_similarity(x, y, normalize, scale):
    """Similarity of two 2-D inputs by explicit row loops."""
    out = torch.empty(x.shape[0], y.shape[0], dtype=torch.float64)
    for i in range(x.shape[0]):
        for j in range(y.shape[0]):
            a, b = x[i].double(), y[j].double()
            if normalize:
                a = a / max(a.norm().item(), 1e-12)
                b = b / max(b.norm().item(), 1e-12)
            out[i, j] = scale * (a * b).sum()
    return out


def cross_entropy_info_nce(a, b, temperature, valid=None, symmetric=True, normalize=True):
    """The textbook form: drop invalid pairs, build the logits, cross-entropy against the diagonal."""
    if valid is not None:
        a, b = a[valid], b[valid]
    if a.shape[0] == 0:
        return (a.sum() + b.sum()) * 0.0
    if normalize:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = a @ b.T / temperature
    labels = torch.arange(a.shape[0])
    loss = F.cross_entropy(logits, labels)
    if symmetric:
        loss = loss + F.cross_entropy(logits.T, labels)
    return loss


def softplus_anchor_consistency(sim, target, temperature):
    """BCE-with-logits of z = exp(sim / temperature) written out: softplus(z) - t z, averaged over every entry."""
    z = torch.exp(sim / temperature)
    return (torch.log1p(torch.exp(-z)) + z - target * z).mean()


def materialized_brownian_bridge(a, b, mid, t, sigma=1.0, normalize=True):
    """Per-row losses from the literal (N, N, D) bridge points: no expansion of the squared distance."""
    if normalize:
        a, b, mid = F.normalize(a, dim=-1), F.normalize(b, dim=-1), F.normalize(mid, dim=-1)
    t = torch.as_tensor(t, dtype=a.dtype).expand(a.shape[0])
    points = (1 - t)[:, None, None] * a[None, :, :] + t[:, None, None] * b[None, :, :]  # [i, j] = bridge j at t_i
    logits = -((mid[:, None, :] - points) ** 2).sum(-1) / (2 * sigma**2 * t * (1 - t))[:, None]
    return F.cross_entropy(logits, torch.arange(a.shape[0]), reduction="none")


def materialized_geometric_consistency(a, b, normalize=True):
    """[mean (S − Sᵀ)², mean (P − Q)²] from the literal N×N matrices S = âb̂ᵀ, P = ââᵀ, Q = b̂b̂ᵀ."""
    if normalize:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    s, p, q = a @ b.T, a @ a.T, b @ b.T
    return torch.stack((((s - s.T) ** 2).mean(), ((p - q) ** 2).mean()))


def materialized_feature_separation(shared, specific, normalize=True):
    """mean over i, j of (ŝ_i·ŝ_j)(ĥ_i·ĥ_j), from the two literal N×N Grams: ‖ŜᵀĤ‖²_F / N² written as ⟨ŜŜᵀ, ĤĤᵀ⟩ / N²."""
    if normalize:
        shared, specific = F.normalize(shared, dim=-1), F.normalize(specific, dim=-1)
    if shared.shape[0] == 0:
        return (shared.sum() + specific.sum()) * 0.0
    return ((shared @ shared.T) * (specific @ specific.T)).mean()


def materialized_multi_info_nce(x, present, pair_weights, temperature, symmetric=True, normalize=True):
    """PCMC by its definition: per pair, the rows both modalities have, their logits and
    F.cross_entropy each way; (the (M, M) pair losses, the weighted mean over non-empty pairs)."""
    m = x.shape[0]
    losses = torch.zeros(m, m, dtype=torch.float64)
    total, weight = torch.zeros((), dtype=torch.float64), 0.0
    for i in range(m):
        for j in range(i + 1, m):
            keep = present[i] & present[j]
            if not bool(keep.any()):
                continue
            a, b = x[i][keep].double(), x[j][keep].double()
            if normalize:
                a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
            logits = a @ b.T / temperature
            target = torch.arange(a.shape[0])
            loss = F.cross_entropy(logits, target) + (F.cross_entropy(logits.T, target) if symmetric else 0.0)
            losses[i, j] = loss
            total = total + float(pair_weights[i, j]) * loss
            weight += float(pair_weights[i, j])
    return losses, total / weight if weight > 0 else total


def materialized_similarity_regression(x, present=None, t=1.0, u=0.0, margin=None, normalize=True):
    """(M, M) per-pair losses of PCMR's regression from the literal N×N similarities of each pair, in float64.

    Entry (p, q), p < q: rows present in both, S their similarity matrix; mean over the diagonal of
    (S_ii − t)² plus the mean over the off-diagonal entries of (S_ij − u)² (hinged at the margin).
    """
    x = x.double()
    if normalize:
        x = F.normalize(x, dim=-1)
    m, n = x.shape[0], x.shape[1]
    if present is None:
        present = torch.ones(m, n, dtype=torch.bool)
    out = torch.zeros(m, m, dtype=torch.float64) + 0.0 * x.sum()  # connected to x even when every pair is empty
    for p in range(m):
        for q in range(p + 1, m):
            keep = present[p] & present[q]
            s = x[p][keep] @ x[q][keep].T
            k = s.shape[0]
            eye = torch.eye(k, dtype=torch.bool)
            total = s.new_zeros(())
            if k > 0:
                total = total + ((s[eye] - t) ** 2).mean()
            if k > 1:
                off = s[~eye] - u
                if margin is not None:
                    off = torch.relu(off - margin)
                total = total + (off**2).mean()
            out[p, q] = total
    return out


def materialized_nt_xent(x, y, temperature=0.1, normalize=True):
    """Per-row NT-Xent (2N,) from the literal 2N×2N logits: the diagonal removed by boolean indexing, then cross-entropy."""
    x, y = x.double(), y.double()
    if normalize:
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    n = x.shape[0]
    z = torch.cat([x, y])
    logits = z @ z.T / temperature
    keep = ~torch.eye(2 * n, dtype=torch.bool)
    logits = logits[keep].reshape(2 * n, 2 * n - 1)  # row r without column r
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    target = partner - (partner > torch.arange(2 * n)).long()  # column index after the removal
    return F.cross_entropy(logits, target, reduction="none")


def materialized_comm_loss(z1, z2, temperature=0.1, weights=None):
    """(loss, terms) of CoMM from materialized_nt_xent: term i = ½[NCE(z1[i], z2[-1]) + NCE(z2[i], z1[-1])]."""
    terms = torch.stack(
        [
            0.5 * (materialized_nt_xent(z1[i], z2[-1], temperature).mean() + materialized_nt_xent(z2[i], z1[-1], temperature).mean())
            for i in range(z1.shape[0])
        ]
    )
    w = torch.ones(z1.shape[0], dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    return (terms * w).sum() / len(terms), terms


def eps_sequence(eps, n_iters, start=None, decay=0.5):
    """ε per iteration of a geometric schedule (start·decay^t by repeated products, floored at eps)."""
    if start is None:
        return [eps] * n_iters
    seq, e = [], float(start)
    for _ in range(n_iters):
        seq.append(max(eps, e))
        e *= decay
    return seq


def general_sinkhorn(scores, row_mass, col_mass, eps_seq, f0=None, reach=None, tol=None):
    """One (N, K) problem: column then row log-scalings at ε_t, KL-relaxed with weight ``reach``
    (POT's reference measure r⊗c). Returns plan, f, g, iterations run, marginal error."""
    s = scores.double()
    log_r, log_c = row_mass.double().log(), col_mass.double().log()
    f = torch.zeros(s.shape[0], dtype=torch.float64) if f0 is None else f0.double()
    t, err = 0, None
    for e in eps_seq:
        tau = 1.0 if reach is None else reach / (reach + e)
        g = e * log_c - tau * e * torch.logsumexp((s + f[:, None]) / e, dim=0)
        f = e * log_r - tau * e * torch.logsumexp((s + g[None, :]) / e, dim=1)
        plan = torch.exp((s + f[:, None] + g[None, :]) / e)
        target = log_c.exp() * torch.exp((s + f[:, None]) / e).sum(0) ** (1 - tau)
        err = ((plan.sum(0) - target).abs() / target).max()
        t += 1
        if tol is not None and e == eps_seq[-1] and err <= tol:
            break
    return plan, f, g, t, err


def general_multi_sinkhorn(scores, k, eps_seq, slot_weights, tol=None, normalize="minmax"):
    """One (N, K) problem: the dense Multi-SK on log P[m, n, a] with ε_t per iteration (at fixed
    potentials ε·log P is unchanged, so a change of ε rescales log P). Returns T, iterations, error."""
    s = scores.double()
    n, n_anchors = s.shape
    w = torch.as_tensor(slot_weights, dtype=torch.float64)
    log_r = torch.log(torch.tensor(n / n_anchors, dtype=torch.float64))
    log_p = w[:, None, None] * s[None] / eps_seq[0]
    previous, t, err = eps_seq[0], 0, None
    for e in eps_seq:
        log_p = log_p * previous / e
        previous = e
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True) + log_r
        log_p = log_p - torch.logsumexp(log_p, dim=0, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, dim=2, keepdim=True)
        err = ((log_p.exp().sum(1) - log_r.exp()).abs() / log_r.exp()).max()
        t += 1
        if tol is not None and e == eps_seq[-1] and err <= tol:
            break
    out = log_p[n_anchors - k :].exp().sum(0)
    if normalize == "minmax":
        lo, hi = out.min(dim=1, keepdim=True).values, out.max(dim=1, keepdim=True).values
        out = torch.where(hi > lo, (out - lo) / torch.where(hi > lo, hi - lo, 1.0), 0.0)
    return out, t, err
