"""Many few-shot episodes as one padded batch, in coordinates of each episode's support span.

What the batched logistic-regression probe (``metadataset.probes``) does to its episodes before and
after :func:`ringbench.logreg.solve_logreg`, none of it specific to logistic regression:

* labels coded ``0..K-1`` per episode (:func:`remap_labels`, :func:`remap_labels_many`);
* episodes grouped into batches that fit a memory bound (:func:`plan_chunks`, :func:`episode_cost`) and
  padded to common sizes (:func:`pad_batch`, :func:`padded_labels`, :func:`stack_padded`): padding rows
  have sample weight 0, padding classes are masked;
* span algebra: features L2-normalised and centred on the support mean (the bias absorbs the shift;
  the penalty is on ``W`` only), and, with fewer support examples ``n`` than dimensions ``D``, written
  in ``n`` coordinates of the support's span (:func:`span_coordinates`, from Gram matrices): the
  minimiser's ``W`` lies in that span (the data term's gradient is ``X^T G``), so the solve is exact
  in ``n`` coordinates instead of ``D``. :func:`gram_factor` maps weights found in span coordinates
  back to feature space, and :func:`score_queries` scores the queries there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ringbench.logreg import l2_normalise


def remap_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Arbitrary labels -> ``(classes, codes in 0..K-1)``."""
    labels = np.asarray(labels)
    if labels.dtype.kind in "iu" and labels.size and 0 <= labels.min() and labels.max() < 4 * labels.size:
        present = np.bincount(labels) > 0  # small non-negative integers: no sort
        classes = np.flatnonzero(present)
        return classes.astype(labels.dtype), (np.cumsum(present) - 1)[labels].astype(np.int64)
    classes, codes = np.unique(labels, return_inverse=True)
    return classes, codes.astype(np.int64)


def remap_labels_many(label_sets: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`remap_labels` of many episodes' labels; small non-negative integers (the usual case) in one
    vectorised pass over all episodes."""
    arrays = [np.asarray(labels) for labels in label_sets]
    flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    if not flat.size or flat.dtype.kind not in "iu" or flat.min() < 0 or flat.max() >= 4 * flat.size:
        return [remap_labels(labels) for labels in arrays]
    sizes = np.array([len(a) for a in arrays])
    episode = np.repeat(np.arange(len(arrays)), sizes)
    present = np.zeros((len(arrays), int(flat.max()) + 1), dtype=bool)
    present[episode, flat] = True
    codes = (np.cumsum(present, axis=1) - 1)[episode, flat].astype(np.int64)
    counts = present.sum(1)
    if (sizes == sizes[0]).all() and (counts == counts[0]).all():  # the usual N-way K-shot: no per-episode calls
        classes = np.nonzero(present)[1].astype(flat.dtype).reshape(len(arrays), counts[0])
        return list(zip(classes, codes.reshape(len(arrays), sizes[0])))
    return [
        (np.flatnonzero(row).astype(flat.dtype), part)
        for row, part in zip(present, np.split(codes, np.cumsum(sizes)[:-1]))
    ]


def episode_cost(n, m, k, d: int, problems: int):
    """Tensor elements one episode adds to a batched solve (integers or arrays of them): features in
    ``r = min(n, d)`` coordinates (and their Gram matrices), and per problem the L-BFGS history and logits."""
    r = np.minimum(n, d)
    return (n + m + n) * r + problems * (30 * (r + 1) * k + 4 * n * k)


def plan_chunks(sizes: np.ndarray, dim: int, problems: int, max_elements: int) -> Iterator[tuple[int, int]]:
    """Consecutive ranges ``[start, stop)`` of episodes with ``sizes (E, 3)`` = (support, ways, queries),
    each as long as its batch, padded to its largest sizes, stays within ``max_elements`` (at least
    one episode). Vectorised: the cost of every prefix of the rest at once (it grows with the prefix)."""
    start = 0
    while start < len(sizes):
        peak = np.maximum.accumulate(sizes[start:], axis=0)
        cost = np.arange(1, len(peak) + 1) * episode_cost(peak[:, 0], peak[:, 2], peak[:, 1], dim, problems)
        stop = start + max(1, int(np.searchsorted(cost, max_elements, side="right")))
        yield start, stop
        start = stop


@dataclass
class EpisodeBatch:
    """Episodes padded to common sizes; support features projected onto their own span."""

    x: torch.Tensor  # (B, N, r)
    y: torch.Tensor  # (B, N)
    valid: torch.Tensor  # (B, N) bool
    class_mask: torch.Tensor  # (B, K) bool
    query: torch.Tensor  # (B, M, r)


def pad_batch(
    tasks: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    device,
    dtype,
    project: bool,
    group: int = 64,
    principal: bool = True,
) -> EpisodeBatch:
    """Pad episodes to common sizes; with ``project`` and fewer support examples than dimensions,
    express every feature in coordinates of its episode's support span (see the module docstring).

    Features are L2-normalised, then centred on their episode's support mean (an exact change of
    the bias). The span coordinates come from Gram matrices (:func:`span_coordinates`); inner
    products with any weight vector in the span are unchanged. Padding rows are zero.
    Episodes are gathered ``group`` at a time to bound memory.
    """
    b = len(tasks)
    n = max(len(t[1]) for t in tasks)
    m = max(len(t[2]) for t in tasks)
    d = tasks[0][0].shape[1]
    k = max(int(t[1].max()) + 1 for t in tasks)
    kernel = project and n < d
    width = n if kernel else d
    x = torch.zeros(b, n, width, dtype=dtype, device=device)
    q = torch.zeros(b, m, width, dtype=dtype, device=device)
    y = np.zeros((b, n), dtype=np.int64)
    valid = np.zeros((b, n), dtype=bool)
    class_mask = np.zeros((b, k), dtype=bool)
    for first in range(0, b, group):
        chunk = tasks[first : first + group]
        rows = slice(first, first + len(chunk))
        for i, (_, sy, _) in enumerate(chunk, first):
            y[i, : len(sy)] = sy
            valid[i, : len(sy)] = True
            class_mask[i, sy] = True
        support = l2_normalise(torch.from_numpy(stack_padded([t[0] for t in chunk], n, d)).to(device))
        query = torch.from_numpy(stack_padded([t[2] for t in chunk], m, d)).to(device)
        # centre on the support mean: exact (the bias absorbs it; the penalty is on W only), and it
        # decouples the bias from W, which the diagonal preconditioner relies on
        real = torch.from_numpy(valid[rows]).to(device)[..., None]
        mean = (support * real).sum(1, keepdim=True) / real.sum(1, keepdim=True).clamp_min(1)
        support = (support - mean) * real
        if kernel:  # span coordinates in float32 (the features' precision), then ``dtype``
            query_norm = query.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            cross = torch.bmm(query, support.transpose(1, 2)) / query_norm - mean @ support.transpose(1, 2)
            coords = span_coordinates(support @ support.transpose(1, 2), cross, principal)
            x[rows], q[rows] = (t.to(dtype) for t in coords)
        else:
            x[rows], q[rows] = support.to(dtype), (l2_normalise(query) - mean).to(dtype)
    y_t, valid_t, class_mask_t = (torch.from_numpy(a).to(device) for a in (y, valid, class_mask))
    return EpisodeBatch(x, y_t, valid_t, class_mask_t, q)


def padded_labels(labels: Sequence[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label codes ``0..K-1`` padded to ``(B, n)`` (0 after the real rows), the real rows ``(B, n)`` and the
    classes present ``(B, K)``, ``K`` the largest code plus one."""
    b = len(labels)
    valid = np.zeros((b, n), dtype=bool)
    if all(len(sy) == n for sy in labels):
        y = np.stack(labels).astype(np.int64, copy=False)
        valid[:] = True
    else:
        y = np.zeros((b, n), dtype=np.int64)
        for i, sy in enumerate(labels):
            y[i, : len(sy)], valid[i, : len(sy)] = sy, True
    class_mask = np.zeros((b, int(y.max()) + 1), dtype=bool)
    class_mask[np.arange(b)[:, None], y] = True  # padding rows add class 0, which every episode has
    return y, valid, class_mask


def stack_padded(arrays: Sequence[np.ndarray], rows: int, dim: int) -> np.ndarray:
    """``(len(arrays), rows, dim)`` float32, each array's rows first, zeros after."""
    if all(len(a) == rows for a in arrays):
        return np.stack(arrays).astype(np.float32, copy=False)
    out = np.zeros((len(arrays), rows, dim), dtype=np.float32)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return out


def span_coordinates(
    gram: torch.Tensor, cross: torch.Tensor, principal: bool = True, rel_eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """From ``gram = S S^T (B, n, n)`` and ``cross = Q S^T (B, m, n)``: coordinates ``Z`` of the
    support rows and of the queries in the span of the support, with ``Z Z^T = gram`` and the
    query-support inner products kept.

    ``principal``: ``Z = U D^{1/2}`` (``gram = U D U^T``), queries ``Q S^T U D^{-1/2}``: the principal
    axes of the support, where ``Z^T Z = D`` is diagonal and the solver's diagonal preconditioner is
    nearly exact (worth it when many weakly regularised problems are solved: cross-validation);
    directions with eigenvalue below ``rel_eps`` of the largest (repeated images, padding, float32
    rounding) are dropped. Otherwise ``Z = L`` (Cholesky of ``gram`` plus ``rel_eps`` of its largest
    diagonal entry; padding rows stay zero), queries ``Q S^T L^{-T}``: many times cheaper.
    """
    if principal:
        evals, evecs = torch.linalg.eigh(gram)
        keep = evals > rel_eps * evals.amax(-1, keepdim=True).clamp_min(1e-30)
        root = torch.where(keep, evals.clamp_min(0).sqrt(), torch.zeros_like(evals))
        inv_root = torch.where(keep, 1.0 / root.clamp_min(1e-30), torch.zeros_like(evals))
        return evecs * root[:, None, :], (cross @ evecs) * inv_root[:, None, :]
    upper, padding = _jittered_cholesky(gram, rel_eps)
    if upper is None:  # not positive definite even so: the principal axes drop what they must
        return span_coordinates(gram, cross, principal=True, rel_eps=rel_eps)
    coords = torch.linalg.solve_triangular(upper, cross, upper=True, left=False)  # Q S^T L^-T
    return upper.transpose(1, 2) * (1 - padding)[..., None], coords


def _jittered_cholesky(gram: torch.Tensor, rel_eps: float) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The upper Cholesky factor ``L^T`` of ``gram`` plus ``rel_eps`` of its largest diagonal entry and
    1 on the diagonal of padding rows (zero in ``gram``), or None where some matrix is not positive
    definite even so; and the padding rows ``(B, n)`` (1.0), whose coordinates the callers zero."""
    diag = gram.diagonal(dim1=-2, dim2=-1)
    padding = (diag == 0).to(gram.dtype)
    jitter = rel_eps * diag.amax(-1, keepdim=True).clamp_min(1e-30)
    upper, info = torch.linalg.cholesky_ex(gram + torch.diag_embed(padding + jitter), upper=True)
    return (None if bool((info > 0).any()) else upper), padding


def gram_factor(
    gram: torch.Tensor, dtype: torch.dtype, rel_eps: float = 1e-6
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``F^T (B, n, n)``, ``F F^T = gram``, in ``dtype``, and the map ``v -> F^-T v`` (``(B, n, K)``).

    ``F^T`` is the upper Cholesky factor of ``gram`` plus ``rel_eps`` of its largest diagonal entry
    (and 1 on the diagonal of padding rows, which are zero in ``gram``; the caller zeroes their
    coordinates). Not positive definite even so: the principal axes, dropping what they must
    (:func:`span_coordinates`)."""
    gram = gram.to(dtype)
    upper, _ = _jittered_cholesky(gram, rel_eps)
    if upper is None:
        eye = torch.eye(gram.shape[-1], dtype=dtype, device=gram.device).expand(gram.shape)
        factor, inverse_t = span_coordinates(gram, eye, principal=True, rel_eps=rel_eps)
        return factor.transpose(1, 2), lambda v: inverse_t @ v
    found = upper
    return found, lambda v: torch.linalg.solve_triangular(found, v, upper=True)


def _row_dots(x: np.ndarray, out: np.ndarray) -> None:
    """``out[i] = x[i] . x[i]``: NumPy's vectorised ``vecdot`` (NumPy >= 2), else ``einsum``."""
    if hasattr(np, "vecdot"):
        np.vecdot(x, x, out=out)
    else:
        np.einsum("ij,ij->i", x, x, out=out)


def score_queries(queries: Sequence[np.ndarray], weight_t: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Predicted class ``(B, m)`` of every episode's queries: ``argmax_k (q / |q|) . w_k + offset_k``,
    computed as ``argmax_k q . w_k + |q| offset_k`` (the same for ``|q| > 0``) from ``weight_t (B, K, D)``
    and ``offset (B, K)``. Each episode's query array is read once (its squared norms are taken
    while it is in cache), never stacked: this pass over the queries is most of the probe's
    memory traffic."""
    b, k = offset.shape
    m = max(len(q) for q in queries)
    scores = np.zeros((b, k, m), dtype=np.float32)
    squares = np.zeros((b, m), dtype=np.float32)
    for i, q in enumerate(queries):
        q = np.asarray(q, dtype=np.float32)
        np.matmul(weight_t[i], q.T, out=scores[i, :, : len(q)])
        _row_dots(q, squares[i, : len(q)])
    scores += np.sqrt(squares)[:, None, :] * offset[:, :, None]
    return scores.argmax(1)
