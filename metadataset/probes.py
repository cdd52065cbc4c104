"""Probes on frozen features: one interface, ``fit_predict(support_x, support_y, query_x) -> query_pred``, and
``fit_predict_many(tasks, keys=None)`` for many episodes at once (``keys``: each episode's identity, for a probe
that draws random numbers, so that every card draws the same ones on the same episode).

* :class:`LogisticRegressionProbe`: multinomial logistic regression on L2-normalised features,
  ``min_{W,b} mean_i CE(W^T x_i + b, y_i) + (lambda/2) ||W||^2`` (the bias is not penalised; this is
  scikit-learn's ``LogisticRegression(C=1/(lambda n))``). ``lambda`` is fixed, or chosen per episode
  by stratified cross-validation on the support set over a log grid. Many episodes (and all
  grid points and folds of each) are solved at once as one batched problem
  (:func:`ringbench.logreg.solve_logreg`), in ``n`` coordinates of each support's span instead of
  ``D`` when there are fewer support examples than dimensions (``metadataset.episode_batch``:
  exact up to float32 rounding).
* :class:`CentroidProbe`: nearest class mean under cosine similarity (ProtoNet-style).
* :class:`ProtoNetProbe`: nearest class mean of the raw features under Euclidean distance (ProtoNet's own rule).
* :class:`KNNProbe`: k nearest support examples under cosine similarity, majority vote.
* :class:`metadataset.sgd_probe.SGDLinearProbe` (``sgd_linear``): BSCD-FSL's frozen-feature baseline, a linear
  layer trained by SGD on the raw support features, batched over episodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from metadataset.episode_batch import (
    EpisodeBatch,
    gram_factor,
    pad_batch,
    padded_labels,
    plan_chunks,
    remap_labels,
    remap_labels_many,
    score_queries,
    stack_padded,
)
from metadataset.sgd_probe import SGDLinearProbe
from ringbench.errors import UserError
from ringbench.logreg import (
    MASKED_LOGIT,
    SELECTION_MAX_ITER,
    SELECTION_TOL,
    few_threads_if_small,
    l2_normalise,
    logreg_logits,
    solve_logreg,
    solver_dtype,
)

DEFAULT_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def stratified_folds(y: torch.Tensor, valid: torch.Tensor, folds: int) -> torch.Tensor:
    """Fold index of every support example: its rank within its class, modulo ``folds``."""
    onehot = torch.nn.functional.one_hot(y, int(y.max()) + 1) * valid[..., None]
    rank = (onehot.cumsum(1) - 1).gather(-1, y[..., None]).squeeze(-1)
    return rank % folds


@dataclass
class LogisticRegressionProbe:
    """L2-regularised multinomial logistic regression; ``weight_decay`` a number or ``"cv"``."""

    weight_decay: float | str = "cv"
    grid: Sequence[float] = DEFAULT_GRID
    folds: int = 3
    max_iter: int = 500
    tol: float = 1e-6
    device: str = "cpu"
    max_elements: int = 1 << 25  # bound on the tensor elements of one batched solve (memory)
    name: str = field(default="logreg", init=False)

    def __post_init__(self) -> None:
        if self.weight_decay != "cv":
            try:
                self.weight_decay = float(self.weight_decay)
            except (TypeError, ValueError):
                raise UserError(f"weight decay must be a number or 'cv', got {self.weight_decay!r}") from None
            if self.weight_decay < 0:
                raise UserError(f"weight decay must be >= 0, got {self.weight_decay}")
        if self.folds < 2:
            raise UserError(f"cross-validation needs at least 2 folds, got {self.folds}")

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "probe": self.name,
            "weight_decay": self.weight_decay,
            "max_iter": self.max_iter,
            "tol": self.tol,
        }
        if self.weight_decay == "cv":
            cfg.update(grid=[float(g) for g in self.grid], folds=self.folds)
        return cfg

    def fit_predict(self, support_x: np.ndarray, support_y: np.ndarray, query_x: np.ndarray) -> np.ndarray:
        return self.fit_predict_many([(support_x, support_y, query_x)])[0]

    def fit_predict_many(
        self, tasks: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], keys: Sequence[Sequence[int]] | None = None
    ) -> list[np.ndarray]:
        """Predictions for many episodes, solved in as few batched problems as memory allows
        (episodes of similar sizes together, so that little is padding). ``keys`` (the episodes' identities) are
        not needed: the solution draws no random numbers."""
        remapped = remap_labels_many([sy for _, sy, _ in tasks])
        problems = len(self.grid) * self.folds if self.weight_decay == "cv" else 1
        dim = tasks[0][0].shape[1] if tasks else 0
        sizes = np.array([(len(sy), len(c), len(qx)) for (_, sy, qx), (c, _) in zip(tasks, remapped)]).reshape(-1, 3)
        order = np.lexsort(sizes.T[::-1])  # by support size, then ways, then queries (stable)
        out: list[np.ndarray] = [np.empty(0)] * len(tasks)
        for start, stop in plan_chunks(sizes[order], dim, problems, self.max_elements):
            chunk = order[start:stop]
            n, k = sizes[chunk, 0].max(), sizes[chunk, 1].max()
            with few_threads_if_small(len(chunk) * n * min(n, dim) * problems * k):
                preds = self._solve_chunk([(tasks[i][0], remapped[i][1], tasks[i][2]) for i in chunk])
            for i, pred in zip(chunk, preds):
                out[i] = remapped[i][0][pred]
        return out

    def _solve_chunk(self, tasks) -> list[np.ndarray]:
        dtype = solver_dtype(self.device)
        n, d = max(len(t[1]) for t in tasks), tasks[0][0].shape[1]
        if self.weight_decay != "cv" and n < d:
            return self._solve_chunk_fixed(tasks, dtype)
        batch = pad_batch(tasks, self.device, dtype, project=True, principal=self.weight_decay == "cv")
        lam = (
            self._choose_weight_decay(batch)
            if self.weight_decay == "cv"
            else torch.full((len(tasks), 1), float(self.weight_decay), dtype=dtype, device=self.device)
        )
        weight, bias = solve_logreg(
            batch.x, batch.y, batch.valid[:, None].to(dtype), batch.class_mask, lam, self.max_iter, self.tol
        )
        logits = logreg_logits(batch.query, weight, bias)[:, :, 0].masked_fill(~batch.class_mask[:, None], MASKED_LOGIT)
        pred = logits.argmax(-1).cpu().numpy()
        return [pred[i, : len(t[2])] for i, t in enumerate(tasks)]

    def _solve_chunk_fixed(self, tasks, dtype: torch.dtype) -> list[np.ndarray]:
        """A fixed ``lambda`` with fewer support examples than dimensions: the solution of
        :func:`pad_batch` + :func:`solve_logreg`, computed from each episode's raw support Gram matrix.

        With ``S0`` the raw support rows, ``R`` their norms and ``P`` the centring on the real rows,
        the normalised, centred support is ``S = P R^-1 S0``. Factor the raw Gram matrix once,
        ``S0 S0^T = F F^T`` (Cholesky), then ``Z = P R^-1 F`` are coordinates of the support in its own
        span (``Z Z^T = S S^T``), and the solver's weights ``w`` in them are the feature-space weights
        ``W = S0^T F^-T w``: the ``(B, N, D)`` features are never rescaled or centred element by element,
        and the normalisation and centring cost one pass over the small ``(N, N)`` factor. Each
        episode's queries are scored with one ``(K, D) @ (D, m)`` product (``argmax`` of
        ``(q / |q| - mean) W + b``), never projected onto the support."""
        b, n, d = len(tasks), max(len(t[1]) for t in tasks), tasks[0][0].shape[1]
        y, valid, class_mask = padded_labels([t[1] for t in tasks], n)
        raw = torch.from_numpy(stack_padded([t[0] for t in tasks], n, d)).to(self.device)  # (B, N, D) float32
        gram0 = raw @ raw.transpose(1, 2)
        real = torch.from_numpy(valid).to(device=self.device, dtype=dtype)
        inv_norm = real / gram0.diagonal(dim1=1, dim2=2).to(dtype).sqrt().clamp_min(1e-12)  # R^-1 on the real rows
        share = real / real.sum(1, keepdim=True).clamp_min(1)  # the mean's weights
        upper, to_span = gram_factor(gram0, dtype)  # the small (N, N) algebra in the solver's precision
        # Z^T = F^T R^-1 - m 1^T, m = F^T R^-1 share (the support's weighted mean row of R^-1 F), with the
        # padding rows of Z zero: written transposed in one pass, as the solver reads it
        mean = upper @ (inv_norm * share)[..., None]  # (B, N, 1)
        centre = mean if bool(valid.all()) else mean * real[:, None, :]
        coords = torch.addcmul(-centre, upper, inv_norm[:, None, :]).transpose(1, 2)
        lam = torch.full((b, 1), float(self.weight_decay), dtype=dtype, device=self.device)
        y_t, valid_t, mask_t = (torch.from_numpy(a).to(self.device) for a in (y, valid, class_mask))
        weight, bias = solve_logreg(coords, y_t, valid_t[:, None].to(dtype), mask_t, lam, self.max_iter, self.tol)
        # scoring in the features' precision (float32)
        along = to_span(weight[:, :, 0]).to(raw.dtype)  # F^-T w, (B, N, K): W = S0^T along
        feature_weight = along.transpose(1, 2) @ raw  # W^T, (B, K, D)
        mean_score = ((share * inv_norm).to(raw.dtype)[:, None, :] @ gram0 @ along)[:, 0]  # mean W = mean S0^T along
        offset = (bias[:, 0].to(raw.dtype) - mean_score).masked_fill(~mask_t, MASKED_LOGIT)
        pred = score_queries([t[2] for t in tasks], feature_weight.cpu().numpy(), offset.cpu().numpy())
        return [pred[i, : len(t[2])] for i, t in enumerate(tasks)]

    def _choose_weight_decay(self, batch: EpisodeBatch) -> torch.Tensor:
        """Per-episode ``lambda`` maximising stratified k-fold accuracy on the support set
        (ties broken by validation log-loss); all folds and grid points in one solve."""
        dtype = batch.x.dtype
        grid = torch.tensor(list(self.grid), dtype=dtype, device=batch.x.device)
        g, f = len(grid), self.folds
        fold = stratified_folds(batch.y, batch.valid, f)  # (B, N)
        fold_of_problem = torch.arange(f, device=fold.device).repeat(g)  # problem p = grid i * f + fold j
        held_out = (fold[:, None, :] == fold_of_problem[None, :, None]) & batch.valid[:, None]  # (B, P, N)
        train = (~held_out & batch.valid[:, None]).to(dtype)
        lam = grid.repeat_interleave(f)[None].expand(len(batch.x), -1).contiguous()
        # choosing among grid points needs far less precision than the final fit
        max_iter, tol = min(self.max_iter, SELECTION_MAX_ITER), max(self.tol, SELECTION_TOL)
        weight, bias = solve_logreg(batch.x, batch.y, train, batch.class_mask, lam, max_iter, tol)
        logits = logreg_logits(batch.x, weight, bias).masked_fill(~batch.class_mask[:, None, None], MASKED_LOGIT)
        correct = (logits.argmax(-1) == batch.y[..., None]).to(dtype).transpose(1, 2)  # (B, P, N)
        index = batch.y[:, :, None, None].expand(-1, -1, logits.shape[2], 1)
        nll = (torch.logsumexp(logits, -1) - logits.gather(-1, index).squeeze(-1)).transpose(1, 2)
        mask = held_out.to(dtype)
        acc = (correct * mask).sum(-1).reshape(-1, g, f).sum(-1) / mask.sum(-1).reshape(-1, g, f).sum(-1)
        loss = (nll * mask).sum(-1).reshape(-1, g, f).sum(-1) / mask.sum(-1).reshape(-1, g, f).sum(-1)
        best = (acc - 1e-6 * loss).argmax(-1)
        return grid[best][:, None]


class _PerEpisode:
    """Probes cheap enough to run episode by episode."""

    name = ""

    if TYPE_CHECKING:  # each subclass defines it

        def fit_predict(self, support_x: np.ndarray, support_y: np.ndarray, query_x: np.ndarray) -> np.ndarray: ...

    def fit_predict_many(self, tasks, keys=None):  # no random numbers: the episodes' keys are not needed
        return [self.fit_predict(*t) for t in tasks]


@dataclass
class CentroidProbe(_PerEpisode):
    """Nearest class centroid of L2-normalised features, cosine similarity."""

    name: str = field(default="centroid", init=False)

    def config(self) -> dict[str, Any]:
        return {"probe": self.name}

    def fit_predict(self, support_x, support_y, query_x) -> np.ndarray:
        classes, codes = remap_labels(support_y)
        sx = l2_normalise(support_x)
        centroids = np.zeros((len(classes), sx.shape[1]), dtype=np.float64)
        np.add.at(centroids, codes, sx)
        centroids = l2_normalise(centroids / np.bincount(codes)[:, None])
        return classes[np.argmax(l2_normalise(query_x) @ centroids.T, axis=1)]


@dataclass
class ProtoNetProbe(_PerEpisode):
    """Nearest class mean of the raw features under squared Euclidean distance: Prototypical Networks' rule (Snell
    et al. 2017, eq. 1-2), which BSCD-FSL's and ssl-transfer's few-shot scripts use on frozen features."""

    name: str = field(default="protonet", init=False)

    def config(self) -> dict[str, Any]:
        return {"probe": self.name}

    def fit_predict(self, support_x, support_y, query_x) -> np.ndarray:
        classes, codes = remap_labels(support_y)
        sx = np.asarray(support_x, dtype=np.float64)
        prototypes = np.zeros((len(classes), sx.shape[1]), dtype=np.float64)
        np.add.at(prototypes, codes, sx)
        prototypes /= np.bincount(codes)[:, None]
        qx = np.asarray(query_x, dtype=np.float64)
        # ||q - p||^2 = ||q||^2 - 2 q.p + ||p||^2; ||q||^2 is the same for every class
        return classes[np.argmin((prototypes**2).sum(1)[None, :] - 2 * qx @ prototypes.T, axis=1)]


@dataclass
class KNNProbe(_PerEpisode):
    """k nearest support examples under cosine similarity; majority vote, ties to the larger
    summed similarity."""

    k: int = 1
    name: str = field(default="knn", init=False)

    def __post_init__(self) -> None:
        if self.k < 1:
            raise UserError(f"k-NN needs k >= 1, got {self.k}")

    def config(self) -> dict[str, Any]:
        return {"probe": self.name, "k": self.k}

    def fit_predict(self, support_x, support_y, query_x) -> np.ndarray:
        classes, codes = remap_labels(support_y)
        sim = l2_normalise(query_x) @ l2_normalise(support_x).T
        k = min(self.k, len(codes))
        nearest = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        votes = np.zeros((len(query_x), len(classes)))
        near_sim = np.take_along_axis(sim, nearest, axis=1)
        np.add.at(votes, (np.arange(len(query_x))[:, None], codes[nearest]), 1.0)
        scores = np.zeros_like(votes)
        np.add.at(scores, (np.arange(len(query_x))[:, None], codes[nearest]), near_sim)
        return classes[np.argmax(votes + 1e-3 * scores / (k + 1), axis=1)]


PROBES = ("logreg", "centroid", "protonet", "knn", "sgd_linear")


def make_probe(name: str, weight_decay: float | str = "cv", knn_k: int = 1, device: str = "cpu", **kwargs):
    """Build a probe by name (``logreg``, ``centroid``, ``protonet``, ``knn``, ``sgd_linear``); ``weight_decay`` is
    logreg's (``sgd_linear`` keeps BSCD-FSL's own values, its fields)."""
    if name == "logreg":
        return LogisticRegressionProbe(weight_decay=weight_decay, device=device, **kwargs)
    if name == "centroid":
        return CentroidProbe()
    if name == "protonet":
        return ProtoNetProbe()
    if name == "knn":
        return KNNProbe(k=knn_k)
    if name == "sgd_linear":
        return SGDLinearProbe(device=device)
    raise UserError(f"unknown probe {name!r}; choose one of {list(PROBES)}")


def probe_from_config(config: dict[str, Any], device: str = "cpu"):
    """Rebuild a probe from its ``config()`` (as stored in a task config)."""
    cfg = dict(config)
    name = cfg.pop("probe")
    if name == "logreg":
        return LogisticRegressionProbe(device=device, **cfg)
    if name == "knn":
        return KNNProbe(k=cfg.get("k", 1))
    if name == "sgd_linear":
        return SGDLinearProbe(device=device, **cfg)
    return make_probe(name)
