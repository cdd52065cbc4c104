"""Probes on frozen features: one interface, ``fit_predict(support_x, support_y, query_x) -> query_pred``.

* :class:`LogisticRegressionProbe`: multinomial logistic regression on L2-normalised features,
  ``min_{W,b} mean_i CE(W^T x_i + b, y_i) + (lambda/2) ||W||^2`` (the bias is not penalised; this is
  scikit-learn's ``LogisticRegression(C=1/(lambda n))``). ``lambda`` is fixed, or chosen per episode
  by stratified cross-validation on the support set over a log grid. Many episodes (and all
  grid points and folds of each) are solved at once as one batched problem with L-BFGS
  (:func:`solve_logreg`).
* :class:`CentroidProbe`: nearest class mean under cosine similarity (ProtoNet-style).
* :class:`KNNProbe`: k nearest support examples under cosine similarity, majority vote.

Few-shot speed-up, exact up to float32 rounding: features are centred on the support mean (the
bias absorbs the shift; the penalty is on ``W`` only), and the minimiser's ``W`` lies in the span
of the centred support features (the gradient of the data term is ``X^T G``), so with fewer
support examples than dimensions each episode is solved in ``n`` coordinates along the principal
axes of its support (or a cheaper triangular basis of it) instead of ``D`` (:func:`_span_coordinates`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ringbench.errors import UserError

DEFAULT_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
CV_TOL = 1e-4  # gradient tolerance of the cross-validation fits
CV_MAX_ITER = 100  # and their iterations: ranking grid points needs no more
_MASKED = -1e9  # logit of a padding class


def l2_normalise(x: np.ndarray | torch.Tensor, eps: float = 1e-12):
    if isinstance(x, torch.Tensor):
        return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)
    x = np.asarray(x)
    x = x.astype(np.result_type(x.dtype, np.float32), copy=False)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def solver_dtype(device: str | torch.device) -> torch.dtype:
    """float64 on CPU (cheap there, and matches reference solvers closely); float32 on GPUs."""
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


# --- the batched solver -----------------------------------------------------------------------


def logreg_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x (B, N, D)``, ``weight (B, D, P, K)``, ``bias (B, P, K)`` -> logits ``(B, N, P, K)``.

    ``P`` problems per batch item share its features (grid points, folds): one matmul, no copies.
    """
    b, d, p, k = weight.shape
    return torch.bmm(x, weight.reshape(b, d, p * k)).reshape(b, x.shape[1], p, k) + bias[:, None]


def logreg_objective(
    x: torch.Tensor,
    y: torch.Tensor,
    sample_weight: torch.Tensor,
    class_mask: torch.Tensor,
    lam: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """Per-problem ``(B, P)`` objective: weighted mean cross-entropy + ``lam/2 ||W||^2``."""
    logits = logreg_logits(x, weight, bias).masked_fill(~class_mask[:, None, None, :], _MASKED)
    index = y[:, :, None, None].expand(-1, -1, logits.shape[2], 1)
    ce = torch.logsumexp(logits, dim=-1) - logits.gather(-1, index).squeeze(-1)  # (B, N, P)
    w = sample_weight.transpose(1, 2)  # (B, N, P)
    data = (ce * w).sum(1) / w.sum(1).clamp_min(1.0)
    return data + 0.5 * lam * weight.pow(2).sum(dim=(1, 3))


def solve_logreg(
    x: torch.Tensor,
    y: torch.Tensor,
    sample_weight: torch.Tensor,
    class_mask: torch.Tensor,
    lam: torch.Tensor,
    max_iter: int = 500,
    tol: float = 1e-6,
    history: int = 10,
    precondition: bool = True,
    ftol: float = 1e-14,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve ``B x P`` independent L2-regularised multinomial logistic regressions at once.

    ``x (B, N, D)`` features (padding rows arbitrary), ``y (B, N)`` labels in ``[0, K)``,
    ``sample_weight (B, P, N)`` (0 drops a sample: padding, or a held-out fold), ``class_mask (B, K)``
    (False: a padding class), ``lam (B, P)``. Returns ``weight (B, D, P, K)``, ``bias (B, P, K)``.

    Batched L-BFGS (Nocedal & Wright, Algorithm 7.4/7.5) in which every problem keeps its own
    curvature pairs, step length (Armijo backtracking) and stopping test (max |gradient| < ``tol``,
    or a relative decrease of the objective below ``ftol``: the limit of floating point),
    so that a badly conditioned problem (small ``lambda``) does not slow down the others. One
    function evaluation serves all problems: the objectives are independent, so the gradient of
    their sum is every problem's gradient.

    ``precondition``: optimise ``phi = sqrt(m) * theta`` (elementwise), ``m`` the diagonal of the
    curvature of each problem's quadratic model at ``theta = 0``,
    ``M = X~^T diag(w) X~ / (K sum w) + lambda I`` (``X~`` = features with a column of ones for the
    bias). This is nearly exact when the feature coordinates are uncorrelated, as the span
    coordinates of the few-shot probe and the rotated features of the linear evaluation are:
    frozen-backbone features are often nearly collinear (cosine ~0.99 for an untrained network),
    which makes unscaled gradient steps crawl.
    """
    with _few_threads_if_small(x.numel() * lam.shape[1] * class_mask.shape[1]):
        return _solve_logreg(x, y, sample_weight, class_mask, lam, max_iter, tol, history, precondition, ftol)


@contextlib.contextmanager
def _few_threads_if_small(work: int, small: int = 1 << 30) -> Iterator[None]:
    """One intra-op thread for small problems: thread synchronisation would cost more than the
    arithmetic (and, on a busy machine, spinning threads slow everything down many-fold)."""
    before = torch.get_num_threads()
    if work < small and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _solve_logreg(x, y, sample_weight, class_mask, lam, max_iter, tol, history, precondition, ftol):
    problem = _Problem.build(x, y, sample_weight, class_mask, lam, precondition)
    phi = _lbfgs(problem, max_iter, tol, history, ftol)
    return problem.weight_and_bias(phi)


@dataclass
class _Problem:
    """The ``B x P`` objectives of :func:`solve_logreg` in the solver's variables ``phi``.

    Parameters are laid out ``(B, P, K, D+1)`` (the last feature column is the bias) and logits
    ``(B, P, K, N)``, so that every problem's parameters are one contiguous block (its dot products are
    plain sums) and the softmax over the few classes runs across rows of ``N`` samples, not along rows
    of ``K`` (its reductions about twice as fast for ``K = 5``). On these small tensors every elementwise operation
    costs about as much as the products, so the evaluation is written with as few of them as possible.

    ``theta = phi * scale`` (the diagonal preconditioner). With one problem per batch item the scale
    is folded into the features once (``[x, 1] * scale``, and the ridge becomes ``lambda scale^2``)
    instead of being applied to the parameters and the gradient at every evaluation.
    """

    features_t: torch.Tensor  # (B, D+1, N): [x, 1] transposed, times the scale when it is folded in
    target: torch.Tensor  # (B, P, K, N): one-hot label times the sample's share of its problem's weight
    share: torch.Tensor  # (B, P, 1, N)
    ridge: torch.Tensor  # (B, P, 1, D+1): lambda on W (in phi's units), 0 on the bias
    mask: torch.Tensor | None  # (B, 1, K, 1): 0, or a large negative logit on padding classes
    scale: torch.Tensor | None  # (B, P, 1, D+1) when not folded into the features
    unscale: torch.Tensor | None  # (B, P, 1, D+1): theta = phi * unscale at the end
    shape: tuple[int, int, int, int]  # B, P, K, D+1

    @classmethod
    def build(cls, x, y, sample_weight, class_mask, lam, precondition: bool) -> _Problem:
        b, n, d = x.shape
        p, k = lam.shape[1], class_mask.shape[1]
        share = (sample_weight / sample_weight.sum(-1, keepdim=True).clamp_min(1.0))[:, :, None]  # (B, P, 1, N)
        onehot = torch.nn.functional.one_hot(y, k).to(x.dtype).transpose(1, 2)  # (B, K, N)
        ridge = torch.zeros(b, p, 1, d + 1, dtype=x.dtype, device=x.device)
        ridge[..., :d] = lam[:, :, None, None]
        mask = None if bool(class_mask.all()) else torch.where(class_mask, 0.0, _MASKED).to(x.dtype)[:, None, :, None]
        unscale = _curvature_diagonal(x, sample_weight, class_mask, lam).rsqrt()[:, :, None] if precondition else None
        fold = p == 1
        # [x, 1] (times the scale when folded), written once, transposed: (B, D+1, N)
        features_t = torch.empty(b, d + 1, n, dtype=x.dtype, device=x.device)
        if unscale is not None and fold:
            torch.mul(x.transpose(1, 2), unscale[:, 0, 0, :d, None], out=features_t[:, :d])
            features_t[:, d] = unscale[:, 0, 0, d, None]
            ridge = ridge * unscale.square()
        else:
            features_t[:, :d] = x.transpose(1, 2)
            features_t[:, d] = 1.0
        return cls(
            features_t,
            onehot[:, None] * share,
            share,
            ridge,
            mask,
            None if fold else unscale,
            unscale,
            (b, p, k, d + 1),
        )

    def zeros(self) -> torch.Tensor:
        return self.features_t.new_zeros(self.shape)

    def select(self, rows: torch.Tensor) -> _Problem:
        """The problems of the batch items ``rows`` only."""
        return _Problem(
            self.features_t[rows],
            self.target[rows],
            self.share[rows],
            self.ridge[rows],
            None if self.mask is None else self.mask[rows],
            None if self.scale is None else self.scale[rows],
            None if self.unscale is None else self.unscale[rows],
            (len(rows), *self.shape[1:]),
        )

    def value_and_grad(self, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f, g = self.evaluate(phi, grad=True)
        assert g is not None
        return f, g

    def value(self, phi: torch.Tensor) -> torch.Tensor:
        return self.evaluate(phi, grad=False)[0]

    def evaluate(self, phi: torch.Tensor, grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``F = sum_n w_n (lse_n - logit_{n,y_n}) + 1/2 lambda ||W||^2`` per problem ``(B, P)`` and,
        written out (no autograd graph), ``dF/dlogits = (softmax - onehot) w``,
        ``dF/dtheta = [x, 1]^T dF/dlogits + lambda W`` (times the scale: the gradient in ``phi``)."""
        b, p, k, d1 = self.shape
        theta = phi if self.scale is None else phi * self.scale
        logits = torch.bmm(theta.view(b, p * k, d1), self.features_t).view(b, p, k, -1)
        if self.mask is not None:
            logits.add_(self.mask)
        top = logits.amax(2, keepdim=True)  # (B, P, 1, N)
        e = (logits - top).exp_()
        total = e.sum(2, keepdim=True)
        penalised = self.ridge * theta
        f = (self.share * (top + total.log())).sum((2, 3)) - (logits * self.target).sum((2, 3))
        f = f + 0.5 * (penalised * theta).sum((2, 3))
        if not grad:
            return f, None
        dlogits = e.mul_(self.share / total).sub_(self.target)
        features = self.features_t.transpose(1, 2)
        g = torch.baddbmm(penalised.view(b, p * k, d1), dlogits.view(b, p * k, -1), features).view(self.shape)
        return f, (g if self.scale is None else g.mul_(self.scale))

    def weight_and_bias(self, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``weight (B, D, P, K)``, ``bias (B, P, K)`` from the solver's variables."""
        theta = phi if self.unscale is None else phi * self.unscale
        return theta[..., :-1].permute(0, 3, 1, 2).contiguous(), theta[..., -1].contiguous()


def _dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-problem inner products ``(B, P)`` of ``(B, P, K, D+1)`` tensors."""
    return (u * v).sum((2, 3))


def _per(v: torch.Tensor) -> torch.Tensor:
    """``(B, P)`` -> broadcastable over ``(B, P, K, D+1)``."""
    return v[:, :, None, None]


def _lbfgs(problem: _Problem, max_iter: int, tol: float, history: int, ftol: float) -> torch.Tensor:
    """Batched L-BFGS from ``phi = 0`` (see :func:`solve_logreg`); returns the solver's variables.

    Once most batch items have converged, the rest are gathered into a smaller batch, so that the
    last iterations (which few problems need) cost in proportion to those problems; a converged
    problem's variables are final either way, so the result is unchanged."""
    phi = problem.zeros()
    solved = problem.zeros()  # every batch item's variables, written when it leaves the solve
    rows = torch.arange(len(phi), device=phi.device)  # the batch items still in the solve
    f, g = problem.value_and_grad(phi)
    pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    if problem.unscale is None:
        gamma = 1.0 / g.abs().sum((2, 3)).clamp_min(1.0)  # first step as torch's L-BFGS
    else:
        gamma = torch.ones_like(f)  # preconditioned: a Newton step of the quadratic model
    active = g.abs().amax((2, 3)) > tol
    for _ in range(max_iter):
        busy = active.any(1)
        if not busy.any():
            break
        if int(busy.sum()) <= 0.75 * len(busy):  # gather the unconverged items into a smaller batch
            solved[rows] = phi
            keep = busy.nonzero()[:, 0]
            rows, problem = rows[keep], problem.select(keep)
            phi, f, g, gamma, active = (t[keep] for t in (phi, f, g, gamma, active))
            pairs = [(s[keep], yv[keep], rho[keep]) for s, yv, rho in pairs]
        direction = _two_loop(g, pairs, gamma)
        slope = _dot(g, direction)
        uphill = slope >= 0
        if uphill.any():  # not a descent direction: restart with steepest descent
            direction = torch.where(_per(uphill), -g * _per(gamma), direction)
            slope = _dot(g, direction)
        new_phi, new_f, new_g, failed = _armijo(problem, phi, f, g, direction, slope, active)
        active &= ~failed  # no decrease possible: converged to machine precision
        s, yv = new_phi - phi, new_g - g
        sy = _dot(s, yv)
        good = sy > 1e-10
        rho = torch.where(good, 1.0 / torch.where(good, sy, torch.ones_like(sy)), torch.zeros_like(sy))
        pairs = [*pairs, (s, yv, rho)][-history:]
        gamma = torch.where(good, sy / _dot(yv, yv).clamp_min(1e-30), gamma)
        stalled = (f - new_f) <= ftol * torch.maximum(f.abs(), new_f.abs()).clamp_min(1.0)
        phi, f, g = new_phi, new_f, new_g
        active &= (g.abs().amax((2, 3)) > tol) & ~stalled
    solved[rows] = phi
    return solved


def _two_loop(g: torch.Tensor, pairs, gamma: torch.Tensor) -> torch.Tensor:
    """``-H g``, ``H`` each problem's L-BFGS inverse-curvature estimate (Nocedal & Wright, Algorithm
    7.4); started from ``-g`` so that the direction needs no final negation."""
    q = g.neg()
    alphas = []
    for s, yv, rho in reversed(pairs):
        a = rho * _dot(s, q)
        q.addcmul_(yv, _per(a), value=-1)
        alphas.append(a)
    r = q.mul_(_per(gamma))
    for (s, yv, rho), a in zip(pairs, reversed(alphas)):
        r.addcmul_(s, _per(a - rho * _dot(yv, r)))
    return r


def _armijo(problem: _Problem, phi, f, g, direction, slope, active):
    """Armijo backtracking, per problem. The full step (nearly always taken) is evaluated with its
    gradient, so that accepting it costs one evaluation. Returns the new ``phi``, ``F``, gradient and
    the problems for which no step decreased ``F``."""
    trial = phi + direction
    f_trial, g_trial = problem.value_and_grad(trial)
    ok = active & (f_trial <= f + 1e-4 * slope)
    todo = active & ~ok
    if bool(ok.all()):
        return trial, f_trial, g_trial, todo
    new_phi, new_f = torch.where(_per(ok), trial, phi), torch.where(ok, f_trial, f)
    new_g = torch.where(_per(ok), g_trial, g)
    if todo.any():
        step = torch.where(todo, 0.5, 1.0).to(f.dtype)
        for _ in range(29):
            trial = phi + _per(step) * direction
            f_trial = problem.value(trial)
            ok = todo & (f_trial <= f + 1e-4 * step * slope)
            new_phi = torch.where(_per(ok), trial, new_phi)
            new_f = torch.where(ok, f_trial, new_f)
            todo &= ~ok
            if not todo.any():
                break
            step = torch.where(todo, step * 0.5, step)
        new_f, new_g = problem.value_and_grad(new_phi)
    return new_phi, new_f, new_g, todo


def _curvature_diagonal(
    x: torch.Tensor, sample_weight: torch.Tensor, class_mask: torch.Tensor, lam: torch.Tensor
) -> torch.Tensor:
    """``(B, P, D+1)`` diagonal of each problem's ``M`` (see :func:`solve_logreg`), the last entry
    the bias's; ``x (B, N, D)`` the features."""
    norm = sample_weight / sample_weight.sum(-1, keepdim=True).clamp_min(1.0)
    classes = class_mask.sum(-1).clamp_min(2).to(x.dtype)[:, None, None]
    diag = torch.cat([torch.bmm(norm, x.square()), norm.sum(-1, keepdim=True)], -1) / classes  # (B, P, D+1)
    out = diag + (1e-6 * diag.mean(-1, keepdim=True) + 1e-12)
    out[..., :-1] += lam[..., None]  # the ridge: on W, not on the bias
    return out


@dataclass
class _Batch:
    """Episodes padded to common sizes; support features projected onto their own span."""

    x: torch.Tensor  # (B, N, r)
    y: torch.Tensor  # (B, N)
    valid: torch.Tensor  # (B, N) bool
    class_mask: torch.Tensor  # (B, K) bool
    query: torch.Tensor  # (B, M, r)


def _pad_batch(
    tasks: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    device,
    dtype,
    project: bool,
    group: int = 64,
    principal: bool = True,
) -> _Batch:
    """Pad episodes to common sizes; with ``project`` and fewer support examples than dimensions,
    express every feature in coordinates of its episode's support span (see the module docstring).

    Features are L2-normalised, then centred on their episode's support mean (an exact change of
    the bias). The span coordinates come from Gram matrices (:func:`_span_coordinates`); inner
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
        support = l2_normalise(torch.from_numpy(_stack_padded([t[0] for t in chunk], n, d)).to(device))
        query = torch.from_numpy(_stack_padded([t[2] for t in chunk], m, d)).to(device)
        # centre on the support mean: exact (the bias absorbs it; the penalty is on W only), and it
        # decouples the bias from W, which the diagonal preconditioner relies on
        real = torch.from_numpy(valid[rows]).to(device)[..., None]
        mean = (support * real).sum(1, keepdim=True) / real.sum(1, keepdim=True).clamp_min(1)
        support = (support - mean) * real
        if kernel:  # span coordinates in float32 (the features' precision), then ``dtype``
            query_norm = query.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            cross = torch.bmm(query, support.transpose(1, 2)) / query_norm - mean @ support.transpose(1, 2)
            coords = _span_coordinates(support @ support.transpose(1, 2), cross, principal)
            x[rows], q[rows] = (t.to(dtype) for t in coords)
        else:
            x[rows], q[rows] = support.to(dtype), (l2_normalise(query) - mean).to(dtype)
    y_t, valid_t, class_mask_t = (torch.from_numpy(a).to(device) for a in (y, valid, class_mask))
    return _Batch(x, y_t, valid_t, class_mask_t, q)


def _padded_labels(labels: Sequence[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def _stack_padded(arrays: Sequence[np.ndarray], rows: int, dim: int) -> np.ndarray:
    """``(len(arrays), rows, dim)`` float32, each array's rows first, zeros after."""
    if all(len(a) == rows for a in arrays):
        return np.stack(arrays).astype(np.float32, copy=False)
    out = np.zeros((len(arrays), rows, dim), dtype=np.float32)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return out


def _span_coordinates(
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
        return _span_coordinates(gram, cross, principal=True, rel_eps=rel_eps)
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


def _gram_factor(
    gram: torch.Tensor, dtype: torch.dtype, rel_eps: float = 1e-6
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``F^T (B, n, n)``, ``F F^T = gram``, in ``dtype``, and the map ``v -> F^-T v`` (``(B, n, K)``).

    ``F^T`` is the upper Cholesky factor of ``gram`` plus ``rel_eps`` of its largest diagonal entry
    (and 1 on the diagonal of padding rows, which are zero in ``gram``; the caller zeroes their
    coordinates). Not positive definite even so: the principal axes, dropping what they must
    (:func:`_span_coordinates`)."""
    gram = gram.to(dtype)
    upper, _ = _jittered_cholesky(gram, rel_eps)
    if upper is None:
        eye = torch.eye(gram.shape[-1], dtype=dtype, device=gram.device).expand(gram.shape)
        factor, inverse_t = _span_coordinates(gram, eye, principal=True, rel_eps=rel_eps)
        return factor.transpose(1, 2), lambda v: inverse_t @ v
    found = upper
    return found, lambda v: torch.linalg.solve_triangular(found, v, upper=True)


def _row_dots(x: np.ndarray, out: np.ndarray) -> None:
    """``out[i] = x[i] . x[i]``: NumPy's vectorised ``vecdot`` (NumPy >= 2), else ``einsum``."""
    if hasattr(np, "vecdot"):
        np.vecdot(x, x, out=out)
    else:
        np.einsum("ij,ij->i", x, x, out=out)


def _score_queries(queries: Sequence[np.ndarray], weight_t: np.ndarray, offset: np.ndarray) -> np.ndarray:
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

    def fit_predict_many(self, tasks: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """Predictions for many episodes, solved in as few batched problems as memory allows
        (episodes of similar sizes together, so that little is padding)."""
        remapped = _remap_many([sy for _, sy, _ in tasks])
        problems = len(self.grid) * self.folds if self.weight_decay == "cv" else 1
        dim = tasks[0][0].shape[1] if tasks else 0
        sizes = np.array([(len(sy), len(c), len(qx)) for (_, sy, qx), (c, _) in zip(tasks, remapped)]).reshape(-1, 3)
        order = np.lexsort(sizes.T[::-1])  # by support size, then ways, then queries (stable)
        out: list[np.ndarray] = [np.empty(0)] * len(tasks)
        for start, stop in _plan_chunks(sizes[order], dim, problems, self.max_elements):
            chunk = order[start:stop]
            n, k = sizes[chunk, 0].max(), sizes[chunk, 1].max()
            with _few_threads_if_small(len(chunk) * n * min(n, dim) * problems * k):
                preds = self._solve_chunk([(tasks[i][0], remapped[i][1], tasks[i][2]) for i in chunk])
            for i, pred in zip(chunk, preds):
                out[i] = remapped[i][0][pred]
        return out

    def _solve_chunk(self, tasks) -> list[np.ndarray]:
        dtype = solver_dtype(self.device)
        n, d = max(len(t[1]) for t in tasks), tasks[0][0].shape[1]
        if self.weight_decay != "cv" and n < d:
            return self._solve_chunk_fixed(tasks, dtype)
        batch = _pad_batch(tasks, self.device, dtype, project=True, principal=self.weight_decay == "cv")
        lam = (
            self._choose_weight_decay(batch)
            if self.weight_decay == "cv"
            else torch.full((len(tasks), 1), float(self.weight_decay), dtype=dtype, device=self.device)
        )
        weight, bias = solve_logreg(
            batch.x, batch.y, batch.valid[:, None].to(dtype), batch.class_mask, lam, self.max_iter, self.tol
        )
        logits = logreg_logits(batch.query, weight, bias)[:, :, 0].masked_fill(~batch.class_mask[:, None], _MASKED)
        pred = logits.argmax(-1).cpu().numpy()
        return [pred[i, : len(t[2])] for i, t in enumerate(tasks)]

    def _solve_chunk_fixed(self, tasks, dtype: torch.dtype) -> list[np.ndarray]:
        """A fixed ``lambda`` with fewer support examples than dimensions: the solution of
        :func:`_pad_batch` + :func:`solve_logreg`, computed from each episode's raw support Gram matrix.

        With ``S0`` the raw support rows, ``R`` their norms and ``P`` the centring on the real rows,
        the normalised, centred support is ``S = P R^-1 S0``. Factor the raw Gram matrix once,
        ``S0 S0^T = F F^T`` (Cholesky), then ``Z = P R^-1 F`` are coordinates of the support in its own
        span (``Z Z^T = S S^T``), and the solver's weights ``w`` in them are the feature-space weights
        ``W = S0^T F^-T w``: the ``(B, N, D)`` features are never rescaled or centred element by element,
        and the normalisation and centring cost one pass over the small ``(N, N)`` factor. Each
        episode's queries are scored with one ``(K, D) @ (D, m)`` product (``argmax`` of
        ``(q / |q| - mean) W + b``), never projected onto the support."""
        b, n, d = len(tasks), max(len(t[1]) for t in tasks), tasks[0][0].shape[1]
        y, valid, class_mask = _padded_labels([t[1] for t in tasks], n)
        raw = torch.from_numpy(_stack_padded([t[0] for t in tasks], n, d)).to(self.device)  # (B, N, D) float32
        gram0 = raw @ raw.transpose(1, 2)
        real = torch.from_numpy(valid).to(device=self.device, dtype=dtype)
        inv_norm = real / gram0.diagonal(dim1=1, dim2=2).to(dtype).sqrt().clamp_min(1e-12)  # R^-1 on the real rows
        share = real / real.sum(1, keepdim=True).clamp_min(1)  # the mean's weights
        upper, to_span = _gram_factor(gram0, dtype)  # the small (N, N) algebra in the solver's precision
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
        offset = (bias[:, 0].to(raw.dtype) - mean_score).masked_fill(~mask_t, _MASKED)
        pred = _score_queries([t[2] for t in tasks], feature_weight.cpu().numpy(), offset.cpu().numpy())
        return [pred[i, : len(t[2])] for i, t in enumerate(tasks)]

    def _choose_weight_decay(self, batch: _Batch) -> torch.Tensor:
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
        weight, bias = solve_logreg(
            batch.x, batch.y, train, batch.class_mask, lam, min(self.max_iter, CV_MAX_ITER), max(self.tol, CV_TOL)
        )
        logits = logreg_logits(batch.x, weight, bias).masked_fill(~batch.class_mask[:, None, None], _MASKED)
        correct = (logits.argmax(-1) == batch.y[..., None]).to(dtype).transpose(1, 2)  # (B, P, N)
        index = batch.y[:, :, None, None].expand(-1, -1, logits.shape[2], 1)
        nll = (torch.logsumexp(logits, -1) - logits.gather(-1, index).squeeze(-1)).transpose(1, 2)
        mask = held_out.to(dtype)
        acc = (correct * mask).sum(-1).reshape(-1, g, f).sum(-1) / mask.sum(-1).reshape(-1, g, f).sum(-1)
        loss = (nll * mask).sum(-1).reshape(-1, g, f).sum(-1) / mask.sum(-1).reshape(-1, g, f).sum(-1)
        best = (acc - 1e-6 * loss).argmax(-1)
        return grid[best][:, None]


def _episode_cost(n, m, k, d: int, problems: int):
    """Tensor elements one episode adds to a batched solve (integers or arrays of them): features in
    ``r = min(n, d)`` coordinates (and their Gram matrices), and per problem the L-BFGS history and logits."""
    r = np.minimum(n, d)
    return (n + m + n) * r + problems * (30 * (r + 1) * k + 4 * n * k)


def _plan_chunks(sizes: np.ndarray, dim: int, problems: int, max_elements: int) -> Iterator[tuple[int, int]]:
    """Consecutive ranges ``[start, stop)`` of episodes with ``sizes (E, 3)`` = (support, ways, queries),
    each as long as its batch, padded to its largest sizes, stays within ``max_elements`` (at least
    one episode). Vectorised: the cost of every prefix of the rest at once (it grows with the prefix)."""
    start = 0
    while start < len(sizes):
        peak = np.maximum.accumulate(sizes[start:], axis=0)
        cost = np.arange(1, len(peak) + 1) * _episode_cost(peak[:, 0], peak[:, 2], peak[:, 1], dim, problems)
        stop = start + max(1, int(np.searchsorted(cost, max_elements, side="right")))
        yield start, stop
        start = stop


def _remap_many(label_sets: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`_remap` of many episodes' labels; small non-negative integers (the usual case) in one
    vectorised pass over all episodes."""
    arrays = [np.asarray(labels) for labels in label_sets]
    flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    if not flat.size or flat.dtype.kind not in "iu" or flat.min() < 0 or flat.max() >= 4 * flat.size:
        return [_remap(labels) for labels in arrays]
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


def _remap(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Arbitrary labels -> ``(classes, codes in 0..K-1)``."""
    labels = np.asarray(labels)
    if labels.dtype.kind in "iu" and labels.size and 0 <= labels.min() and labels.max() < 4 * labels.size:
        present = np.bincount(labels) > 0  # small non-negative integers: no sort
        classes = np.flatnonzero(present)
        return classes.astype(labels.dtype), (np.cumsum(present) - 1)[labels].astype(np.int64)
    classes, codes = np.unique(labels, return_inverse=True)
    return classes, codes.astype(np.int64)


class _PerEpisode:
    """Probes cheap enough to run episode by episode."""

    name = ""

    if TYPE_CHECKING:  # each subclass defines it

        def fit_predict(self, support_x: np.ndarray, support_y: np.ndarray, query_x: np.ndarray) -> np.ndarray: ...

    def fit_predict_many(self, tasks):
        return [self.fit_predict(*t) for t in tasks]


@dataclass
class CentroidProbe(_PerEpisode):
    """Nearest class centroid of L2-normalised features, cosine similarity."""

    name: str = field(default="centroid", init=False)

    def config(self) -> dict[str, Any]:
        return {"probe": self.name}

    def fit_predict(self, support_x, support_y, query_x) -> np.ndarray:
        classes, codes = _remap(support_y)
        sx = l2_normalise(support_x)
        centroids = np.zeros((len(classes), sx.shape[1]), dtype=np.float64)
        np.add.at(centroids, codes, sx)
        centroids = l2_normalise(centroids / np.bincount(codes)[:, None])
        return classes[np.argmax(l2_normalise(query_x) @ centroids.T, axis=1)]


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
        classes, codes = _remap(support_y)
        sim = l2_normalise(query_x) @ l2_normalise(support_x).T
        k = min(self.k, len(codes))
        nearest = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        votes = np.zeros((len(query_x), len(classes)))
        near_sim = np.take_along_axis(sim, nearest, axis=1)
        np.add.at(votes, (np.arange(len(query_x))[:, None], codes[nearest]), 1.0)
        scores = np.zeros_like(votes)
        np.add.at(scores, (np.arange(len(query_x))[:, None], codes[nearest]), near_sim)
        return classes[np.argmax(votes + 1e-3 * scores / (k + 1), axis=1)]


PROBES = ("logreg", "centroid", "knn")


def make_probe(name: str, weight_decay: float | str = "cv", knn_k: int = 1, device: str = "cpu", **kwargs):
    """Build a probe by name (``logreg``, ``centroid``, ``knn``)."""
    if name == "logreg":
        return LogisticRegressionProbe(weight_decay=weight_decay, device=device, **kwargs)
    if name == "centroid":
        return CentroidProbe()
    if name == "knn":
        return KNNProbe(k=knn_k)
    raise UserError(f"unknown probe {name!r}; choose one of {list(PROBES)}")


def probe_from_config(config: dict[str, Any], device: str = "cpu"):
    """Rebuild a probe from its ``config()`` (as stored in a task config)."""
    cfg = dict(config)
    name = cfg.pop("probe")
    if name == "logreg":
        return LogisticRegressionProbe(device=device, **cfg)
    if name == "knn":
        return KNNProbe(k=cfg.get("k", 1))
    return make_probe(name)
