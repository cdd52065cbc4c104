"""The protocol of Kornblith et al. 2019's many-shot linear evaluation, as pure functions on features: the
45-value regularisation path, the metrics (top-1, mean per-class accuracy, VOC's 11-point mAP), per-image samples
whose mean is the metric, and the evaluation of one data set (:func:`kornblith_evaluation`; multi-label VOC2007:
:func:`kornblith_multilabel_evaluation`). The tasks that read the data and write records are
:mod:`transfer.kornblith`.

**The regularisation value** ``c`` of the path is scikit-learn's ``1 / C`` (ssl-transfer sets
``C = 1 / c``): scikit-learn minimises ``C sum_i CE_i + ||W||^2 / 2``, which is ``C n`` times
``mean_i CE_i + ||W||^2 / (2 C n)``; the solver here (``ringbench.logreg``) minimises
``mean_i CE_i + (lambda / 2) ||W||^2``, so ``lambda = c / n``, ``n`` the number of images of that fit
(the refit on train + validation keeps ``c``, as ssl-transfer keeps ``C``). The bias is not penalised
in either.

**The path** is solved from the strongest regularisation to the weakest (``solve_logreg_path``), each fit
started from the previous solution moved on by the last step (a warm start with a secant predictor: the values
are evenly log-spaced), and the refit from the chosen value's solution. Fits stop at a preconditioned
gradient of 1e-4: at the weakest values (``lambda`` ~ 1e-10, nearly separable data) the solution is not
unique in practice and the validation curve there depends on the path, as scikit-learn's does.
Features are centred and rotated to the principal axes of train + validation first: exact (the
bias absorbs the shift, the penalty is rotation invariant) and well conditioned for the solver's diagonal
preconditioner.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ringbench.errors import UserError
from ringbench.logreg import few_threads_if_small, logreg_logits, solve_logreg, solve_logreg_path
from transfer.voc07 import POSITIVE, voc11_average_precision, voc11_mean_average_precision

KORNBLITH_PATH = tuple(float(v) for v in np.logspace(-6, 5, 45))  # 1 / C, Kornblith et al. 2019
KORNBLITH_IMAGE_SIZE = 224
RESIZE = "shorter-bicubic-crop"
PATH_TOL = 1e-4  # gradient tolerance (in the preconditioned variables) of every fit along the path


# --- metrics ---------------------------------------------------------------------------------------


def top1(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Share of images whose predicted class is their label."""
    return float(np.mean(np.asarray(pred) == np.asarray(labels))) if len(labels) else 0.0


def mean_per_class_accuracy(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Mean over the classes present in ``labels`` of each class's recall (ssl-transfer: the confusion
    matrix's diagonal over its row sums, averaged)."""
    labels, pred = np.asarray(labels), np.asarray(pred)
    present = np.unique(labels)
    if not len(present):
        return 0.0
    hits = np.bincount(labels[pred == labels], minlength=num_classes)[present]
    return float(np.mean(hits / np.bincount(labels, minlength=num_classes)[present]))


def per_image_values(correct: np.ndarray, labels: np.ndarray, metric: str) -> list[float]:
    """One value per test image (percentage points, in the images' order) whose plain mean is the metric,
    so that the leaderboard's interval is a bootstrap over test images and a Δ between two cards pairs
    them image by image (``leaderboard/cells.py``).

    ``top1``: 100 for a correct image, 0 for a wrong one. ``mean_per_class``: a correct image of class
    ``c`` is worth ``100 N / (K n_c)`` (``N`` test images, ``K`` classes present, ``n_c`` of them in
    ``c``), a wrong one 0: the mean over images is then ``(1/K) sum_c hits_c / n_c``, the mean per-class
    accuracy exactly, and the paired differences of two cards average to the difference of their metrics.
    A bootstrap over these values treats the class counts as random (they are fixed by the test split):
    with balanced classes its variance is at least the stratified one, so the interval is conservative."""
    correct, labels = np.asarray(correct, dtype=bool), np.asarray(labels)
    if metric == "top1":
        return [100.0 * float(c) for c in correct]
    if metric != "mean_per_class":
        raise ValueError(f"no per-image values for the metric {metric!r}")
    present, index, counts = np.unique(labels, return_inverse=True, return_counts=True)
    worth = 100.0 * len(labels) / (len(present) * counts[index])
    return np.where(correct, worth, 0.0).tolist()


def _voc11_map(scores: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """The VOC2007 devkit's 11-point mAP of ``scores (N, classes)`` against its labels (1 / 0 / -1)."""
    return voc11_mean_average_precision(scores, labels)[0]


# metric key -> (function, name of the record's metric, words)
METRICS: dict[str, tuple[Callable[[np.ndarray, np.ndarray, int], float], str, str]] = {
    "top1": (top1, "acc", "top-1 accuracy"),
    "mean_per_class": (mean_per_class_accuracy, "mean_per_class_acc", "mean per-class accuracy"),
    "map11": (_voc11_map, "map11", "11-point mAP"),  # multi-label (VOC2007): scores and devkit labels (N, classes)
}


class _Rotated:
    """Features centred and rotated to the principal axes of ``reference`` (exact for the model)."""

    def __init__(self, reference: np.ndarray, device: str, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.device = device
        x = torch.tensor(np.asarray(reference), dtype=self.dtype, device=device)
        self.mean = x.mean(0)
        centred = x - self.mean
        with few_threads_if_small(x.shape[1] ** 3):  # a small eigh is slower with threads on a busy machine
            _, self.axes = torch.linalg.eigh(centred.T @ centred)

    def __call__(self, x: np.ndarray) -> torch.Tensor:
        t = torch.tensor(np.asarray(x), dtype=self.dtype, device=self.device)  # a copy: cached features are read-only
        return ((t - self.mean) @ self.axes)[None]


def _fit(
    x: torch.Tensor,
    y: np.ndarray,
    value: float,
    num_classes: int,
    init: tuple[torch.Tensor, torch.Tensor] | None,
    max_iter: int,
    tol: float,
    ftol: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[1]
    labels = torch.as_tensor(y, dtype=torch.long, device=x.device)[None]
    lam = torch.tensor([[value / n]], dtype=x.dtype, device=x.device)
    weights = torch.ones(1, 1, n, dtype=x.dtype, device=x.device)
    mask = torch.ones(1, num_classes, dtype=torch.bool, device=x.device)
    return solve_logreg(x, labels, weights, mask, lam, max_iter=max_iter, tol=tol, ftol=ftol, init=init)


def _predict(x: torch.Tensor, model: tuple[torch.Tensor, torch.Tensor]) -> np.ndarray:
    return logreg_logits(x, *model)[0, :, 0].argmax(-1).cpu().numpy()


def _decision(x: torch.Tensor, model: tuple[torch.Tensor, torch.Tensor]) -> np.ndarray:
    """A two-class model's score: the positive class's logit minus the negative's."""
    logits = logreg_logits(x, *model)[0, :, 0]
    return (logits[:, 1] - logits[:, 0]).double().cpu().numpy()


def kornblith_evaluation(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    metric: str = "top1",
    path: tuple[float, ...] | list[float] = KORNBLITH_PATH,
    device: str = "cpu",
    max_iter: int = 1000,
    tol: float = PATH_TOL,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Steps 2-3 of the module docstring on ``(features, labels)`` of train, validation and test.

    ``dtype``: the solver's arithmetic, float32 by default on every device (twice as fast as float64 on
    CPUs; the path's fits stop at a gradient of ``tol`` = 1e-4, well above float32's resolution, and CPU and
    GPU then agree). Returns the test metric (a fraction), each test image's correctness (``correct``, bool),
    the chosen value (``1 / C``), the validation curve ``{value: metric}`` and the seconds of the path and of
    the refit."""
    score = METRICS[metric][0]
    values = sorted(float(v) for v in path)
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = train, val, test
    start = time.perf_counter()
    rotate = _Rotated(np.concatenate([np.asarray(train_x), np.asarray(val_x)]), device, dtype)
    x_train, x_val = rotate(train_x), rotate(val_x)
    curve: dict[float, float] = {}
    models: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
    n = x_train.shape[1]
    labels = torch.as_tensor(np.asarray(train_y), dtype=torch.long, device=x_train.device)[None]
    weights = torch.ones(1, 1, n, dtype=dtype, device=x_train.device)
    mask = torch.ones(1, num_classes, dtype=torch.bool, device=x_train.device)
    strongest_first = list(reversed(values))  # each fit starts from the previous (stronger) one's solution
    ftol = 64 * torch.finfo(dtype).eps  # as scikit-learn's lbfgs: no progress left to make at this precision
    lams = [v / n for v in strongest_first]
    fits = solve_logreg_path(x_train, labels, weights, mask, lams, max_iter, tol, ftol=ftol, extrapolate=True)
    for value, model in zip(strongest_first, fits):
        models[value] = model
        curve[value] = score(_predict(x_val, model), val_y, num_classes)
    best = max(values, key=lambda v: (curve[v], -v))  # ties: the smallest value, as ssl-transfer
    path_seconds = time.perf_counter() - start
    start = time.perf_counter()
    x_all = torch.cat([x_train, x_val], 1)
    y_all = np.concatenate([np.asarray(train_y), np.asarray(val_y)])
    final = _fit(x_all, y_all, best, num_classes, models[best], max_iter, tol, ftol)
    test_pred = _predict(rotate(test_x), final)
    test_score = score(test_pred, test_y, num_classes)
    return {
        "test": test_score,
        "correct": test_pred == np.asarray(test_y),
        "value": best,
        "val_curve": {f"{v:.6g}": curve[v] for v in values},
        "path_seconds": path_seconds,
        "refit_seconds": time.perf_counter() - start,
    }


def kornblith_multilabel_evaluation(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    path: tuple[float, ...] | list[float] = KORNBLITH_PATH,
    device: str = "cpu",
    max_iter: int = 1000,
    tol: float = PATH_TOL,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """VOC2007 classification as ssl-transfer's ``linear.py`` (``LogisticRegression.fit_logistic_regression``
    with ``metric == 'mAP'``): one classifier per class, all with one regularisation value.

    Labels are the devkit's matrices ``(N, classes)``: 1 positive, 0 difficult, -1 negative. As ssl-transfer
    (``datasets/voc2007.py``: ``target == 1``), a class's classifier is trained on every image, positive
    (1) against the rest: difficult images count as negatives in training. ssl-transfer's classifier is
    ``LogisticRegression(multi_class='multinomial')`` on binary labels, i.e. a two-class softmax with both
    class vectors penalised (the same as a binary logistic regression with ``C`` doubled); this is the same
    two-class model (``solve_logreg_path`` with ``K = 2``, ``lambda = value / n``), its score the logit
    difference. For each value of the path (strongest first, warm starts), every class is fitted on train
    and scored on val; the value with the best validation 11-point mAP (ties: the smallest value) is refitted
    on train + val (the devkit's trainval) per class; the metric is the devkit's 11-point mAP on test
    (``transfer.voc07``: difficult images ignored, as ``VOCevalcls.m``; ssl-transfer counts them as
    negatives and uses scikit-learn's precision-recall curve). A class with no positive validation image
    is left out of the validation mAP (``val_classes`` counts those kept); test needs a positive per class.

    Returns the test mAP (a fraction), each class's test AP, the chosen value, the validation curve and
    the seconds of the path and of the refit."""
    values = sorted(float(v) for v in path)
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = train, val, test
    train_y, val_y, test_y = np.asarray(train_y), np.asarray(val_y), np.asarray(test_y)
    classes = train_y.shape[1]
    start = time.perf_counter()
    rotate = _Rotated(np.concatenate([np.asarray(train_x), np.asarray(val_x)]), device, dtype)
    x_train, x_val = rotate(train_x), rotate(val_x)
    n = x_train.shape[1]
    weights = torch.ones(1, 1, n, dtype=dtype, device=x_train.device)
    mask = torch.ones(1, 2, dtype=torch.bool, device=x_train.device)
    strongest_first = list(reversed(values))
    ftol = 64 * torch.finfo(dtype).eps
    lams = [v / n for v in strongest_first]
    val_scores = {v: np.empty(val_y.shape) for v in values}
    models: dict[tuple[int, float], tuple[torch.Tensor, torch.Tensor]] = {}
    for c in range(classes):
        labels = torch.as_tensor(train_y[:, c] == POSITIVE, dtype=torch.long, device=x_train.device)[None]
        fits = solve_logreg_path(x_train, labels, weights, mask, lams, max_iter, tol, ftol=ftol, extrapolate=True)
        for value, model in zip(strongest_first, fits):
            models[c, value] = model
            val_scores[value][:, c] = _decision(x_val, model)
    scored = [c for c in range(classes) if (val_y[:, c] == POSITIVE).any()]
    if not scored:
        raise UserError("linear_voc2007: no class has a positive validation image")
    curve = {
        v: float(np.mean([voc11_average_precision(val_scores[v][:, c], val_y[:, c]) for c in scored])) for v in values
    }
    best = max(values, key=lambda v: (curve[v], -v))  # ties: the smallest value, as ssl-transfer
    path_seconds = time.perf_counter() - start
    start = time.perf_counter()
    x_all, x_test = torch.cat([x_train, x_val], 1), rotate(test_x)
    y_all = np.concatenate([train_y, val_y])
    test_scores = np.empty(test_y.shape)
    for c in range(classes):
        model = _fit(x_all, y_all[:, c] == POSITIVE, best, 2, models[c, best], max_iter, tol, ftol)
        test_scores[:, c] = _decision(x_test, model)
    missing = [c for c in range(classes) if not (test_y[:, c] == POSITIVE).any()]
    if missing:
        raise UserError(f"linear_voc2007: classes {missing} have no positive test image (the devkit's AP needs one)")
    test_map, aps = voc11_mean_average_precision(test_scores, test_y)
    return {
        "test": test_map,
        "ap": aps,
        "value": best,
        "val_curve": {f"{v:.6g}": curve[v] for v in values},
        "val_classes": len(scored),
        "path_seconds": path_seconds,
        "refit_seconds": time.perf_counter() - start,
    }


# --- tasks -----------------------------------------------------------------------------------------


def parse_path(text: str) -> tuple[float, ...]:
    """``start:stop:num`` (log-spaced, inclusive) -> the values."""
    try:
        start, stop, num = (float(p) for p in str(text).split(":"))
    except ValueError:
        raise UserError(f"--linear-path must be start:stop:num (log-spaced), got {text!r}") from None
    if not (0 < start <= stop < float("inf")) or num < 1 or num != int(num):
        raise UserError(f"--linear-path needs 0 < start <= stop and a whole num >= 1, got {text!r}")
    return tuple(float(v) for v in np.logspace(np.log10(start), np.log10(stop), int(num)))
