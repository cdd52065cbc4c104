"""Contrastive losses as pure functions on tensors (no state, no I/O).

Embeddings are L2-normalised inside each function, so every similarity is a cosine; logits are
cosine / temperature ``t``. Every loss is a mean over anchors.

* :func:`nce_loss`: InfoNCE with the positive at index 0 (MoCo, IR with a memory bank).
* :func:`ring_loss`: conditional negative sampling ("ring", Wu et al., ICLR 2021): negatives whose
  similarity rank to the anchor lies in ``[floor(w_inner * outer), outer)``, ``outer = floor(w_outer * K)``.
* :func:`nt_xent_loss`, :func:`hcl_loss`, :func:`dcl_loss`: SimCLR in-batch losses with hard
  (Robinson et al., ICLR 2021) and debiased (Chuang et al., NeurIPS 2020) negatives, in log space.
* The ring's schedules of ``w_outer`` (:func:`ring_threshold`, :func:`official_ring_threshold`) live in
  :mod:`ringbench.ring_schedules`, since the leaderboard's page plots them too.

Every loss runs in float32 with autocast off (:func:`full_precision`): under mixed precision the
encoder may run in float16, but the logits, the ring's rank selection and the loss do not.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from ringbench.errors import UserError
from ringbench.ring_schedules import check_ring

RING_ROUNDINGS = ("eps", "int")
HCL_ESTIMATORS = ("hard", "easy")

_F = TypeVar("_F", bound=Callable[..., torch.Tensor])


def full_precision(fn: _F) -> _F:
    """Run a loss with autocast off on the inputs' device (its tensors are cast to float32 inside),
    so that a float16/bfloat16 autocast region around the encoder leaves the loss in float32."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Validation


def check_temperature(t: float) -> None:
    if not t > 0:
        raise UserError(f"loss temperature t must be > 0, got {t}")


def ring_bounds(num_negatives: int, w_outer: float, w_inner: float, rounding: str = "eps") -> tuple[int, int]:
    """Rank bounds ``(inner, outer)`` of the ring among ``num_negatives`` negatives ("dynamic inner").

    ``outer = floor(w_outer * K)``, ``inner = floor(w_inner * outer)``; the ring is ranks
    ``[inner, outer)`` with rank 0 the negative most similar to the anchor. ``rounding="eps"``
    floors ``w * K + 1e-9`` (a product that float arithmetic puts just below an integer, such as
    ``0.29 * 100``, counts as that integer); ``"int"`` is the official code's ``int(w * K)``.
    """
    check_ring(w_outer, w_inner)
    if rounding not in RING_ROUNDINGS:
        raise UserError(f"unknown ring rounding {rounding!r}; expected one of {list(RING_ROUNDINGS)}")
    if rounding == "int":
        outer = int(w_outer * num_negatives)
        inner = int(w_inner * outer)
    else:
        outer = math.floor(w_outer * num_negatives + 1e-9)
        inner = math.floor(w_inner * outer + 1e-9)
    if outer - inner < 1:
        raise UserError(
            f"ring is empty: {num_negatives} negatives with w_outer={w_outer}, w_inner={w_inner} give ranks "
            f"[{inner}, {outer}); raise w_outer or the number of negatives"
        )
    return inner, outer


# ---------------------------------------------------------------------------------------------
# Logit helpers


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def _pair_parts(
    q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, t: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positive logits ``(B,)``, the anchors scaled by ``1/t`` and the unit negatives."""
    check_temperature(t)
    q, k, negatives = _normalise(q), _normalise(k), _normalise(negatives)
    return (q * k).sum(-1) / t, q / t, negatives  # divide the (B, D) side, not the (B, K) logits


def pair_logits(
    q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, t: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive logits ``(B,)`` and negative logits ``(B, K)``.

    ``negatives`` is either a shared ``(K, D)`` set (queue, memory bank) or per-anchor ``(B, K, D)``.
    """
    pos, scaled, negatives = _pair_parts(q, k, negatives, t)
    if negatives.dim() == 2:
        neg = scaled @ negatives.t()
    elif negatives.dim() == 3:
        neg = torch.einsum("bd,bkd->bk", scaled, negatives)
    else:
        raise ValueError(f"negatives must be (K, D) or (B, K, D), got shape {tuple(negatives.shape)}")
    return pos, neg


def contrastive_from_logits(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """``-mean(pos - logsumexp([pos, neg]))``: InfoNCE with the positive counted in the partition."""
    return -(pos - torch.logsumexp(torch.cat([pos[:, None], neg], dim=1), dim=1)).mean()


def in_batch_logits(
    z1: torch.Tensor, z2: torch.Tensor, t: float, rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """SimCLR logits for the ``2B`` anchors of two views: positives ``(2B,)``, negatives ``(2B, 2B-2)``.

    Anchor ``i`` of view 1 has positive ``i`` of view 2 (and vice versa); the negatives are the other
    ``2B - 2`` embeddings of the batch, in batch order. ``rows`` (indices into the ``2B`` anchors,
    view 1 first) keeps only those anchors: one process's share of a batch gathered from several.
    """
    check_temperature(t)
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must be equal (B, D) tensors, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    batch = z1.shape[0]
    if batch < 2:
        raise UserError("in-batch negatives need a batch of at least 2 images")
    z = _normalise(torch.cat([z1, z2], dim=0))
    n = 2 * batch
    idx = torch.arange(n, device=z.device) if rows is None else rows.to(z.device)
    sim = z[idx] @ z.t() / t
    anchors = torch.arange(len(idx), device=z.device)
    partner = (idx + batch) % n
    pos = sim[anchors, partner]
    keep = torch.ones(len(idx), n, dtype=torch.bool, device=z.device)
    keep[anchors, idx] = False
    keep[anchors, partner] = False
    neg = sim[keep].view(len(idx), n - 2)
    return pos, neg


# ---------------------------------------------------------------------------------------------
# Losses


@full_precision
def nce_loss(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, t: float = 0.07) -> torch.Tensor:
    """InfoNCE (Oord et al. 2018; MoCo eq. 1): cross-entropy with the positive ``k`` at index 0."""
    pos, neg = pair_logits(q, k, negatives, t)
    logits = torch.cat([pos[:, None], neg], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def _candidate_rank(outer: int, k: int, n: int) -> int:
    """Rank in an ``n``-column subsample that lies below the ``outer``-th largest of ``k`` columns
    with a 4-sigma binomial margin (plus 8)."""
    frac = outer / k
    return min(n, math.ceil(frac * n + 4 * math.sqrt(frac * (1 - frac) * n) + 8))


def _ring_members_torch(
    neg: torch.Tensor, inner: int, outer: int, sample: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_ring_members` in torch operations (any device)."""
    rows, k = neg.shape
    cand, cols = neg, torch.arange(k, device=neg.device).expand_as(neg)
    if k >= 4 * sample and 2 * outer <= k:  # pack each row's logits above a subsampled threshold
        sub = neg[:, :: k // sample]
        n = sub.shape[1]
        low = sub.kthvalue(n - _candidate_rank(outer, k, n) + 1, dim=1, keepdim=True).values
        flat = (neg >= low).view(-1).nonzero().squeeze(1)  # row-major: rows, then columns, ascend
        row = flat // k
        counts = torch.bincount(row, minlength=rows)
        if bool((counts >= outer).all()):
            slot = torch.arange(len(flat), device=neg.device) - (counts.cumsum(0) - counts)[row]
            width = int(counts.max())
            cand = neg.new_full((rows, width), -math.inf)
            cand[row, slot] = neg.view(-1)[flat]
            cols = torch.zeros((rows, width), dtype=torch.long, device=neg.device)
            cols[row, slot] = flat - row * k
    width, size = cand.shape[1], outer - inner
    member = cand >= cand.kthvalue(width - outer + 1, dim=1, keepdim=True).values
    if inner > 0:
        member &= cand < cand.kthvalue(width - inner + 1, dim=1, keepdim=True).values
    for r in (member.sum(1) != size).nonzero().flatten().tolist():  # a float tie at a bound: by index
        order = torch.sort(cand[r], descending=True, stable=True).indices[inner:outer]
        member[r] = False
        member[r, order] = True
    return cand[member].view(rows, size), cols[member].view(rows, size)


def _ring_members_numpy(
    neg: torch.Tensor, inner: int, outer: int, sample: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_ring_members` on the CPU, row by row with NumPy (each row stays in cache; NumPy's
    comparisons, ``flatnonzero`` and ``partition`` are several times faster there than torch's)."""
    a = neg.contiguous().numpy()
    rows, k = a.shape
    size = outer - inner
    low = np.full(rows, -np.inf, dtype=a.dtype)
    if k >= 4 * sample and 2 * outer <= k:  # keep each row's logits above a subsampled threshold
        sub = a[:, :: k // sample]
        kth = sub.shape[1] - _candidate_rank(outer, k, sub.shape[1])
        low = np.partition(sub, kth, axis=1)[:, kth]
    values = np.empty((rows, size), dtype=a.dtype)
    cols = np.empty((rows, size), dtype=np.int64)
    for r in range(rows):
        idx = np.flatnonzero(a[r] >= low[r])
        if len(idx) < outer:  # the estimate fell short: the whole row
            idx = np.arange(k)
        cand = a[r, idx]
        width = len(cand)
        member = cand >= np.partition(cand, width - outer)[width - outer]
        if inner > 0:
            member &= cand < np.partition(cand, width - inner)[width - inner]
        if np.count_nonzero(member) != size:  # a float tie at a bound: rank by index
            member[:] = False
            member[np.sort(np.argsort(-cand, kind="stable")[inner:outer])] = True
        values[r], cols[r] = cand[member], idx[member]
    return torch.from_numpy(values), torch.from_numpy(cols)


@torch.no_grad()
def _ring_members(neg: torch.Tensor, inner: int, outer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ring of each row of ``neg (B, K)``: its values and columns ``(B, outer - inner)``, in column order.

    No row is sorted. For large K the row's logits above a threshold read from a strided subsample
    of the columns (a 4-sigma margin below the ``outer``-th largest) are packed row by row; two order
    statistics of that small candidate set (``partition`` / ``kthvalue``) give the row's ``outer``-th
    and ``inner``-th largest logit, and the ring lies between them. The selection is exact either way:
    a row whose subsample estimate falls short keeps all its columns, and a row with a float tie at
    a bound is ranked by index (a stable sort).
    """
    if neg.device.type == "cpu" and neg.dtype in (torch.float32, torch.float64) and neg.shape[1] >= 16384:
        return _ring_members_numpy(neg, inner, outer)  # large K on the CPU (small K: one vectorised pass)
    return _ring_members_torch(neg, inner, outer)


def _draw(
    size: int,
    rows: int,
    num_samples: int,
    generator: torch.Generator | None,
    device,
    draw_rows: torch.Tensor | None = None,
    draw_total: int | None = None,
) -> torch.Tensor:
    """``(rows, num_samples)`` ring positions drawn uniformly with replacement from ``generator``; with
    ``draw_rows``, rows ``draw_rows`` of the draws made for ``draw_total`` anchors (one process's share
    of a global batch: the draws do not depend on the number of processes)."""
    where = generator.device if generator is not None else device
    if draw_rows is None:
        return torch.randint(0, size, (rows, num_samples), generator=generator, device=where).to(device)
    if draw_total is None:
        raise ValueError("draw_rows needs draw_total")
    picks = torch.randint(0, size, (draw_total, num_samples), generator=generator, device=where)
    return picks[draw_rows.to(where)].to(device)


def ring_logits(
    neg: torch.Tensor,
    w_outer: float,
    w_inner: float,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
    rounding: str = "eps",
    draw_rows: torch.Tensor | None = None,
    draw_total: int | None = None,
) -> torch.Tensor:
    """Select the ring from negative logits ``(B, K)`` (bounds by :func:`ring_bounds` with ``rounding``).

    MoCo flavour (``num_samples=None``): the ``(B, outer - inner)`` ring logits of each row, in column
    order. IR flavour: ``(B, num_samples)`` ring members drawn uniformly with replacement, from
    ``generator`` (``draw_rows``/``draw_total``: one process's rows of a global batch's draws, see
    :func:`_draw`). Differentiable with respect to ``neg``.
    """
    check_ring(w_outer, w_inner, num_samples)
    inner, outer = ring_bounds(neg.shape[1], w_outer, w_inner, rounding)
    cols = _ring_members(neg.detach(), inner, outer)[1]
    if num_samples is not None:
        picks = _draw(outer - inner, len(neg), num_samples, generator, neg.device, draw_rows, draw_total)
        cols = cols.gather(1, picks)
    return neg.gather(1, cols)


class _RingPartition(torch.autograd.Function):
    """``logsumexp([pos, ring])`` per anchor from the anchors ``scaled`` (already divided by ``t``) and the
    unit ``negatives``. Forward keeps only the ring's values and columns (not the ``(B, K)`` logits);
    backward scatters the ring's softmax weights into a ``(B, K)`` gradient and multiplies it back
    (one matrix product for the anchors, one for the negatives if they need a gradient)."""

    @staticmethod
    def forward(ctx, pos, scaled, negatives, inner, outer, num_samples, generator, draw_rows, draw_total):
        values, cols = _ring_members(scaled @ negatives.t(), inner, outer)
        if num_samples is not None:
            picks = _draw(outer - inner, len(scaled), num_samples, generator, scaled.device, draw_rows, draw_total)
            values, cols = values.gather(1, picks), cols.gather(1, picks)
        lse = torch.logsumexp(torch.cat([pos[:, None], values], dim=1), dim=1)
        ctx.save_for_backward(pos, scaled, negatives, values, cols, lse)
        return lse

    @staticmethod
    def backward(ctx, grad):
        pos, scaled, negatives, values, cols, lse = ctx.saved_tensors
        weights = torch.exp(values - lse[:, None]) * grad[:, None]  # d lse / d ring logit
        dense = scaled.new_zeros((len(scaled), negatives.shape[0]))
        dense.scatter_add_(1, cols, weights)  # IR draws may repeat a member
        grad_scaled = dense @ negatives if ctx.needs_input_grad[1] else None
        grad_negatives = dense.t() @ scaled if ctx.needs_input_grad[2] else None
        return grad * torch.exp(pos - lse), grad_scaled, grad_negatives, None, None, None, None, None, None


@full_precision
def ring_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    negatives: torch.Tensor,
    t: float = 0.07,
    w_outer: float = 0.1,
    w_inner: float = 0.1,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
    rounding: str = "eps",
    draw_rows: torch.Tensor | None = None,
    draw_total: int | None = None,
) -> torch.Tensor:
    """Conditional negative sampling (Wu et al., ICLR 2021, "ring" / CNCE).

    Negatives are ranked by similarity to the anchor ``q``; those of rank in
    ``[floor(w_inner * outer), outer)``, ``outer = floor(w_outer * K)``, form the ring. MoCo flavour
    (``num_samples=None``): the partition is the whole ring; IR flavour: ``num_samples`` draws from
    the ring with replacement (``draw_rows``/``draw_total``: see :func:`_draw`).
    ``loss = -mean(pos - logsumexp([pos, ring]))``.
    """
    if negatives.dim() != 2:  # per-anchor negatives (B, K, D)
        pos, neg = pair_logits(q, k, negatives, t)
        ring = ring_logits(neg, w_outer, w_inner, num_samples, generator, rounding, draw_rows, draw_total)
        return contrastive_from_logits(pos, ring)
    check_ring(w_outer, w_inner, num_samples)
    inner, outer = ring_bounds(negatives.shape[0], w_outer, w_inner, rounding)
    pos, scaled, negatives = _pair_parts(q, k, negatives, t)
    lse = _RingPartition.apply(pos, scaled, negatives, inner, outer, num_samples, generator, draw_rows, draw_total)
    return -(pos - lse).mean()


@full_precision
def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, t: float = 0.5, rows: torch.Tensor | None = None) -> torch.Tensor:
    """SimCLR's NT-Xent over the ``2B`` anchors of a batch (Chen et al. 2020, eq. 1); ``rows``: only
    those anchors (see :func:`in_batch_logits`)."""
    pos, neg = in_batch_logits(z1, z2, t, rows)
    return contrastive_from_logits(pos, neg)


@full_precision
def in_batch_ring_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    t: float = 0.5,
    w_outer: float = 0.1,
    w_inner: float = 0.1,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
    rounding: str = "eps",
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ring over SimCLR's in-batch negatives (each anchor ranks its own ``2B - 2`` negatives);
    ``rows``: only those anchors, with the draws they get in the whole batch."""
    pos, neg = in_batch_logits(z1, z2, t, rows)
    ring = ring_logits(neg, w_outer, w_inner, num_samples, generator, rounding, rows, 2 * z1.shape[0])
    return contrastive_from_logits(pos, ring)


def _log_sub_exp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log(exp(a) - exp(b))`` where ``a > b``, ``-inf`` elsewhere (gradient-safe)."""
    gap = torch.clamp(b - a, max=-1e-12)
    return torch.where(a > b, a + torch.log(-torch.expm1(gap)), torch.full_like(a, -math.inf))


@full_precision
def hcl_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    t: float = 0.5,
    tau_plus: float = 0.1,
    beta: float = 1.0,
    estimator: str = "hard",
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hard negative sampling (Robinson et al., ICLR 2021, eq. 6 / their reference loss), in log space.

    With ``s`` cosine similarities and ``N = 2B - 2`` in-batch negatives per anchor:
    ``imp = exp(beta * s_neg / t)``, ``reweight = sum(imp * exp(s_neg / t)) / mean(imp)``,
    ``Ng = max((-tau_plus * N * exp(s_pos / t) + reweight) / (1 - tau_plus), N * exp(-1 / t))``,
    ``loss = -log(exp(s_pos / t) / (exp(s_pos / t) + Ng))``. ``estimator="easy"``: ``Ng = sum(exp(s_neg / t))``.
    """
    if estimator not in HCL_ESTIMATORS:
        raise UserError(f"unknown HCL estimator {estimator!r}; expected one of {list(HCL_ESTIMATORS)}")
    if not 0 <= tau_plus < 1:
        raise UserError(f"tau_plus must be in [0, 1), got {tau_plus}")
    pos, neg = in_batch_logits(z1, z2, t, rows)
    n = neg.shape[1]
    if estimator == "easy":
        log_ng = torch.logsumexp(neg, dim=1)
    else:
        log_mean_imp = torch.logsumexp(beta * neg, dim=1) - math.log(n)
        log_reweight = torch.logsumexp((beta + 1.0) * neg, dim=1) - log_mean_imp
        log_prior = math.log(tau_plus * n) + pos if tau_plus > 0 else torch.full_like(pos, -math.inf)
        log_debiased = _log_sub_exp(log_reweight, log_prior) - math.log(1.0 - tau_plus)
        log_ng = torch.clamp(log_debiased, min=math.log(n) - 1.0 / t)
    return -(pos - torch.logaddexp(pos, log_ng)).mean()


@full_precision
def dcl_loss(
    z1: torch.Tensor, z2: torch.Tensor, t: float = 0.5, tau_plus: float = 0.1, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Debiased contrastive loss (Chuang et al., NeurIPS 2020): :func:`hcl_loss` with ``beta = 0``."""
    return hcl_loss(z1, z2, t=t, tau_plus=tau_plus, beta=0.0, estimator="hard", rows=rows)
