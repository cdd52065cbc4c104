"""Contrastive losses as pure functions on tensors (no state, no I/O).

Embeddings are L2-normalised inside each function, so every similarity is a cosine; logits are
cosine / temperature ``t``. Every loss is a mean over anchors.

* :func:`nce_loss`: InfoNCE with the positive at index 0 (MoCo, IR with a memory bank).
* :func:`ring_loss`: conditional negative sampling ("ring", Wu et al., ICLR 2021): negatives whose
  similarity rank to the anchor lies in ``[floor(w_inner * outer), outer)``, ``outer = floor(w_outer * K)``.
* :func:`nt_xent_loss`, :func:`hcl_loss`, :func:`dcl_loss`: SimCLR in-batch losses with hard
  (Robinson et al., ICLR 2021) and debiased (Chuang et al., NeurIPS 2020) negatives, in log space.
* :func:`ring_threshold`: the schedule of ``w_outer`` over training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ringbench.errors import UserError

RING_SCHEDULES = ("constant", "linear", "step", "exponential")
HCL_ESTIMATORS = ("hard", "easy")


# ---------------------------------------------------------------------------------------------
# Validation


def check_temperature(t: float) -> None:
    if not t > 0:
        raise UserError(f"loss temperature t must be > 0, got {t}")


def check_ring(w_outer: float, w_inner: float, num_samples: int | None = None) -> None:
    """The ring parameters on their own (before the number of negatives is known)."""
    if not 0 < w_outer <= 1:
        raise UserError(f"ring w_outer must be in (0, 1], got {w_outer}")
    if not 0 <= w_inner < 1:
        raise UserError(f"ring w_inner must be in [0, 1), got {w_inner}")
    if num_samples is not None and num_samples < 1:
        raise UserError(f"ring num_samples must be >= 1, got {num_samples}")


def ring_bounds(num_negatives: int, w_outer: float, w_inner: float) -> tuple[int, int]:
    """Rank bounds ``(inner, outer)`` of the ring among ``num_negatives`` negatives ("dynamic inner").

    ``outer = floor(w_outer * K)``, ``inner = floor(w_inner * outer)``; the ring is ranks
    ``[inner, outer)`` with rank 0 the negative most similar to the anchor.
    """
    check_ring(w_outer, w_inner)
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


def pair_logits(
    q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, t: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive logits ``(B,)`` and negative logits ``(B, K)``.

    ``negatives`` is either a shared ``(K, D)`` set (queue, memory bank) or per-anchor ``(B, K, D)``.
    """
    check_temperature(t)
    q, k, negatives = _normalise(q), _normalise(k), _normalise(negatives)
    pos = (q * k).sum(-1) / t
    scaled = q / t  # divide the (B, D) side, not the (B, K) logits
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


def nce_loss(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, t: float = 0.07) -> torch.Tensor:
    """InfoNCE (Oord et al. 2018; MoCo eq. 1): cross-entropy with the positive ``k`` at index 0."""
    pos, neg = pair_logits(q, k, negatives, t)
    logits = torch.cat([pos[:, None], neg], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def _outer_candidates(neg: torch.Tensor, outer: int, sample: int = 4096) -> torch.Tensor:
    """A ``(B, M)`` superset of each row's top ``outer`` logits, ``M`` a little above ``outer``.

    For large K (a 65,536-entry queue) a threshold below each row's ``outer``-th largest logit is
    read from a strided subsample of the columns (with a 4-sigma binomial margin); the logits above
    it are packed row by row and padded with ``-inf``. Rows where the estimate falls short (rare)
    make the whole batch fall back to the full row. The selection is exact either way; only the
    work differs.
    """
    rows, k = neg.shape
    if k < 4 * sample or 2 * outer > k:
        return neg
    with torch.no_grad():
        sub = neg[:, :: k // sample]
        frac = outer / k
        rank = min(sub.shape[1], math.ceil(frac * sub.shape[1] + 4 * math.sqrt(frac * (1 - frac) * sub.shape[1]) + 8))
        low = torch.topk(sub, rank, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
        row, col = (neg >= low).nonzero().unbind(1)  # row-major: rows ascend
        starts = torch.searchsorted(row, torch.arange(rows + 1, device=neg.device))
        counts = starts[1:] - starts[:-1]
        if bool((counts < outer).any()):
            return neg
        slot = torch.arange(len(row), device=neg.device) - starts[:-1][row]
        flat = row * k + col
        width = int(counts.max())
    padded = neg.new_full((rows * width,), -math.inf)
    return padded.scatter(0, row * width + slot, neg.reshape(-1).gather(0, flat)).view(rows, width)


def ring_logits(
    neg: torch.Tensor,
    w_outer: float,
    w_inner: float,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
    draw_rows: torch.Tensor | None = None,
    draw_total: int | None = None,
) -> torch.Tensor:
    """Select the ring from negative logits ``(B, K)``.

    MoCo flavour (``num_samples=None``): ``(B, M)`` logits, ``M >= ring size``, in which every entry
    outside the ring is ``-inf`` (each row holds exactly ``outer - inner`` finite entries, in no
    particular order; a logsumexp over the row is the logsumexp over the ring). IR flavour:
    ``(B, num_samples)`` ring members drawn uniformly with replacement, from ``generator``; with
    ``draw_rows``, the draws are rows ``draw_rows`` of those for ``draw_total`` anchors (one process's
    share of a global batch: the draws do not depend on the number of processes).

    No row is sorted: the rank thresholds are selected with two partial selections (``topk``,
    unsorted) on a small candidate set -- drop all but the ``outer`` largest, then the ``inner``
    largest.
    """
    check_ring(w_outer, w_inner, num_samples)
    inner, outer = ring_bounds(neg.shape[1], w_outer, w_inner)
    cand = _outer_candidates(neg, outer)
    with torch.no_grad():
        drop = torch.zeros(cand.shape, dtype=torch.bool, device=cand.device)
        if cand.shape[1] > outer:
            drop.scatter_(1, torch.topk(cand, cand.shape[1] - outer, dim=1, largest=False, sorted=False).indices, True)
        if inner > 0:
            kept = cand.masked_fill(drop, -math.inf)
            drop.scatter_(1, torch.topk(kept, inner, dim=1, sorted=False).indices, True)
    if num_samples is None:
        return cand.masked_fill(drop, -math.inf)
    ring = cand[~drop].view(len(cand), outer - inner)
    device = generator.device if generator is not None else ring.device
    total = ring.shape[0] if draw_rows is None else draw_total
    if total is None:
        raise ValueError("draw_rows needs draw_total")
    picks = torch.randint(0, outer - inner, (total, num_samples), generator=generator, device=device)
    if draw_rows is not None:
        picks = picks[draw_rows.to(device)]
    return ring.gather(1, picks.to(ring.device))


def ring_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    negatives: torch.Tensor,
    t: float = 0.07,
    w_outer: float = 0.1,
    w_inner: float = 0.1,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
    draw_rows: torch.Tensor | None = None,
    draw_total: int | None = None,
) -> torch.Tensor:
    """Conditional negative sampling (Wu et al., ICLR 2021, "ring" / CNCE).

    Negatives are ranked by similarity to the anchor ``q``; those of rank in
    ``[floor(w_inner * outer), outer)``, ``outer = floor(w_outer * K)``, form the ring. MoCo flavour
    (``num_samples=None``): the partition is the whole ring; IR flavour: ``num_samples`` draws from
    the ring with replacement (``draw_rows``/``draw_total``: see :func:`ring_logits`).
    ``loss = -mean(pos - logsumexp([pos, ring]))``.
    """
    pos, neg = pair_logits(q, k, negatives, t)
    ring = ring_logits(neg, w_outer, w_inner, num_samples, generator, draw_rows, draw_total)
    return contrastive_from_logits(pos, ring)


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, t: float = 0.5, rows: torch.Tensor | None = None) -> torch.Tensor:
    """SimCLR's NT-Xent over the ``2B`` anchors of a batch (Chen et al. 2020, eq. 1); ``rows``: only
    those anchors (see :func:`in_batch_logits`)."""
    pos, neg = in_batch_logits(z1, z2, t, rows)
    return contrastive_from_logits(pos, neg)


def in_batch_ring_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    t: float = 0.5,
    w_outer: float = 0.1,
    w_inner: float = 0.1,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ring over SimCLR's in-batch negatives (each anchor ranks its own ``2B - 2`` negatives);
    ``rows``: only those anchors, with the draws they get in the whole batch."""
    pos, neg = in_batch_logits(z1, z2, t, rows)
    ring = ring_logits(neg, w_outer, w_inner, num_samples, generator, rows, 2 * z1.shape[0])
    return contrastive_from_logits(pos, ring)


def _log_sub_exp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log(exp(a) - exp(b))`` where ``a > b``, ``-inf`` elsewhere (gradient-safe)."""
    gap = torch.clamp(b - a, max=-1e-12)
    return torch.where(a > b, a + torch.log(-torch.expm1(gap)), torch.full_like(a, -math.inf))


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
    ``rows``: only those anchors (see :func:`in_batch_logits`).
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


def dcl_loss(
    z1: torch.Tensor, z2: torch.Tensor, t: float = 0.5, tau_plus: float = 0.1, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Debiased contrastive loss (Chuang et al., NeurIPS 2020): :func:`hcl_loss` with ``beta = 0``."""
    return hcl_loss(z1, z2, t=t, tau_plus=tau_plus, beta=0.0, estimator="hard", rows=rows)


# ---------------------------------------------------------------------------------------------
# Schedules


def ring_threshold(
    epoch: float,
    schedule: str = "constant",
    w_outer: float = 0.1,
    w_outer_start: float = 1.0,
    anneal_epochs: int = 100,
    steps: int = 4,
) -> float:
    """``w_outer`` at ``epoch`` (0-based): the ring shrinks from ``w_outer_start`` to ``w_outer``.

    ``constant``: always ``w_outer`` (the official default). Over ``anneal_epochs``, then constant:
    ``linear`` interpolation; ``step``: ``steps`` equal drops, the last one at ``anneal_epochs``;
    ``exponential``: geometric interpolation ``start * (end / start) ** progress``.
    """
    if schedule not in RING_SCHEDULES:
        raise UserError(f"unknown ring schedule {schedule!r}; expected one of {list(RING_SCHEDULES)}")
    check_ring(w_outer, 0.0)
    check_ring(w_outer_start, 0.0)
    if schedule == "constant":
        return float(w_outer)
    if anneal_epochs < 1:
        raise UserError(f"ring anneal_epochs must be >= 1, got {anneal_epochs}")
    progress = min(max(epoch / anneal_epochs, 0.0), 1.0)
    if schedule == "linear":
        return float(w_outer_start + (w_outer - w_outer_start) * progress)
    if schedule == "step":
        if steps < 1:
            raise UserError(f"ring schedule steps must be >= 1, got {steps}")
        progress = math.floor(progress * steps + 1e-9) / steps
        return float(w_outer_start + (w_outer - w_outer_start) * progress)
    return float(w_outer_start * (w_outer / w_outer_start) ** progress)
