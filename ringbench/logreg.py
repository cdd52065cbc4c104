"""Batched L2-regularised multinomial logistic regression: many independent problems in one L-BFGS solve.

The objective of every problem (Kornblith et al. 2019's linear evaluation; scikit-learn's
``LogisticRegression(C=1/(lambda n))``; the bias is not penalised)::

    min_{W,b}  sum_i w_i CE(W^T x_i + b, y_i) / max(sum_i w_i, 1)  +  (lambda/2) ||W||^2

Problems come as a batch ``B`` of feature sets (episodes, data sets), each with ``P`` problems that
share its features but not their sample weights (folds, held-out splits) or their ``lambda`` (a grid,
a regularisation path). :func:`solve_logreg` solves all ``B x P`` at once, optionally from given
weights (warm starts along a path), each to its own stopping test. Shared by the few-shot probes
(``metadataset.probes``: hundreds of tiny episodes) and the many-shot linear tasks (``transfer.linear``:
one large problem, a grid of ``lambda``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

SELECTION_TOL = 1e-4  # gradient tolerance of fits that only rank values of lambda (cross-validation, hold-out)
SELECTION_MAX_ITER = 100  # and their iterations: ranking grid points needs no more
MASKED_LOGIT = -1e9  # logit of a padding class


def l2_normalise(x: np.ndarray | torch.Tensor, eps: float = 1e-12):
    """Rows scaled to unit L2 norm (a norm below ``eps`` counts as ``eps``); arrays in at least float32.
    Both callers fit on L2-normalised features (the few-shot probes' cosine geometry; Kornblith et al.)."""
    if isinstance(x, torch.Tensor):
        return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)
    x = np.asarray(x)
    x = x.astype(np.result_type(x.dtype, np.float32), copy=False)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def solver_dtype(device: str | torch.device) -> torch.dtype:
    """float64 on CPU (cheap there, and matches reference solvers closely); float32 on GPUs."""
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


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
    logits = logreg_logits(x, weight, bias).masked_fill(~class_mask[:, None, None, :], MASKED_LOGIT)
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
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve ``B x P`` independent L2-regularised multinomial logistic regressions at once.

    ``x (B, N, D)`` features (padding rows arbitrary), ``y (B, N)`` labels in ``[0, K)``,
    ``sample_weight (B, P, N)`` (0 drops a sample: padding, or a held-out fold), ``class_mask (B, K)``
    (False: a padding class), ``lam (B, P)`` (each problem its own). Returns ``weight (B, D, P, K)``,
    ``bias (B, P, K)``. ``init``: a starting ``(weight, bias)`` of those shapes (a warm start, e.g. the
    solution at the neighbouring ``lambda`` of a regularisation path); default zero. A problem whose
    start already passes the stopping test is returned unchanged.

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
    with few_threads_if_small(x.numel() * lam.shape[1] * class_mask.shape[1]):
        problem = _Problem.build(x, y, sample_weight, class_mask, lam, precondition)
        start = problem.zeros() if init is None else problem.variables(*init)
        return problem.weight_and_bias(_lbfgs(problem, start, max_iter, tol, history, ftol))


def solve_logreg_path(
    x: torch.Tensor,
    y: torch.Tensor,
    sample_weight: torch.Tensor,
    class_mask: torch.Tensor,
    lams: Sequence[float],
    max_iter: int = 500,
    tol: float = 1e-6,
    history: int = 10,
    ftol: float = 1e-14,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    extrapolate: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A regularisation path: the problems of :func:`solve_logreg` (``P = 1``: ``sample_weight (B, 1, N)``)
    solved for each ``lambda`` of ``lams`` in turn, each started from the previous solution (the first from
    ``init``, default zero); yields ``(weight (B, D, 1, K), bias (B, 1, K))`` per value.

    The same solutions as calling :func:`solve_logreg` with ``init`` along the path, without preparing the
    features again for every value: only the ridge and the diagonal preconditioner change (the scale is
    applied to the parameters, not folded into the features). ``extrapolate``: start each fit after the second
    from ``2 theta_k - theta_{k-1}`` (a secant predictor, for evenly spaced values on a log scale), which
    saves about a third of the evaluations along Kornblith et al.'s path."""
    b, _, d = x.shape
    zero = x.new_zeros(b, 1)
    with few_threads_if_small(x.numel() * class_mask.shape[1]):
        problem = _Problem.build(x, y, sample_weight, class_mask, zero, precondition=True, fold=False)
        data_diagonal = _curvature_diagonal(x, sample_weight, class_mask, zero)  # (B, 1, D+1), lambda = 0
        assert problem.unscale is not None
        theta = problem.zeros() if init is None else problem.variables(*init) * problem.unscale
        before = None
        for lam in lams:
            diagonal = data_diagonal.clone()
            diagonal[..., :-1] += float(lam)
            unscale = diagonal.rsqrt()[:, :, None]  # (B, 1, 1, D+1)
            problem.ridge[..., :d] = float(lam)
            problem.scale = problem.unscale = unscale
            start = theta if before is None or not extrapolate else 2 * theta - before
            phi = _lbfgs(problem, start / unscale, max_iter, tol, history, ftol)
            before, theta = theta, phi * unscale
            yield problem.weight_and_bias(phi)


@contextlib.contextmanager
def few_threads_if_small(work: int, small: int = 1 << 30) -> Iterator[None]:
    """One intra-op thread for small problems: thread synchronisation would cost more than the
    arithmetic (and, on a busy machine, spinning threads slow everything down many-fold)."""
    before = torch.get_num_threads()
    if work < small and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
    def build(cls, x, y, sample_weight, class_mask, lam, precondition: bool, fold: bool | None = None) -> _Problem:
        b, n, d = x.shape
        p, k = lam.shape[1], class_mask.shape[1]
        share = (sample_weight / sample_weight.sum(-1, keepdim=True).clamp_min(1.0))[:, :, None]  # (B, P, 1, N)
        onehot = torch.nn.functional.one_hot(y, k).to(x.dtype).transpose(1, 2)  # (B, K, N)
        ridge = torch.zeros(b, p, 1, d + 1, dtype=x.dtype, device=x.device)
        ridge[..., :d] = lam[:, :, None, None]
        mask = (
            None if bool(class_mask.all()) else torch.where(class_mask, 0.0, MASKED_LOGIT).to(x.dtype)[:, None, :, None]
        )
        unscale = _curvature_diagonal(x, sample_weight, class_mask, lam).rsqrt()[:, :, None] if precondition else None
        fold = p == 1 if fold is None else fold
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

    def variables(self, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The solver's variables ``phi`` of ``weight (B, D, P, K)``, ``bias (B, P, K)``: the inverse of
        :meth:`weight_and_bias`."""
        if weight.shape != (self.shape[0], self.shape[3] - 1, self.shape[1], self.shape[2]):
            raise ValueError(f"initial weight of shape {tuple(weight.shape)}; the problems need (B, D, P, K)")
        theta = torch.cat([weight.permute(0, 2, 3, 1), bias[..., None]], -1).to(self.features_t)
        return theta if self.unscale is None else theta / self.unscale


def _dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-problem inner products ``(B, P)`` of ``(B, P, K, D+1)`` tensors."""
    return (u * v).sum((2, 3))


def _per(v: torch.Tensor) -> torch.Tensor:
    """``(B, P)`` -> broadcastable over ``(B, P, K, D+1)``."""
    return v[:, :, None, None]


def _lbfgs(problem: _Problem, phi: torch.Tensor, max_iter: int, tol: float, history: int, ftol: float) -> torch.Tensor:
    """Batched L-BFGS from the solver's variables ``phi`` (see :func:`solve_logreg`); returns them solved.

    Once most batch items have converged, the rest are gathered into a smaller batch, so that the
    last iterations (which few problems need) cost in proportion to those problems; a converged
    problem's variables are final either way, so the result is unchanged."""
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
