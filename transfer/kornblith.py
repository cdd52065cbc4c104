"""Many-shot linear evaluation as Kornblith et al. 2019 ("Do Better ImageNet Models Transfer Better?",
CVPR; restated in SimCLR's appendix B.8, implemented in ``linusericsson/ssl-transfer``'s ``linear.py``).

Tasks ``linear_<name>`` for the twelve data sets of ``transfer.battery_data.BATTERY`` (Food-101,
CIFAR-10/100, Birdsnap, SUN397, Stanford Cars, FGVC-Aircraft, VOC2007, DTD, Oxford-IIIT Pet, Caltech-101,
Flowers-102), ``linear_kornblith`` (all twelve in one record: each one's metric and their mean) and
``linear_kornblith_synthetic``, the same path on the embedded shapes (nothing on disk). VOC2007 is
multi-label: one two-class model per class, 11-point mAP (:func:`kornblith_multilabel_evaluation`).
Protocol:

1. images: shorter side to 224 by bicubic interpolation, the centre 224 x 224, the card's mean and std
   (``metadataset.features``, ``resize="shorter-bicubic-crop"``); features from the global average pool
   (CMC: both streams), cached per backbone hash; used as they are (no normalisation, as ssl-transfer);
2. an L2-regularised multinomial logistic regression by L-BFGS for each of 45 values log-spaced over
   [1e-6, 1e5] (:data:`KORNBLITH_PATH`), fitted on train, scored on validation with the data set's metric:
   the creators' validation split (Aircraft, DTD, Flowers), else a seeded stratified 20% of train;
3. the best value (ties: the smallest, as ssl-transfer's strict ``>`` over ascending values) refitted on
   train + validation; the metric on test: top-1 accuracy, or mean per-class accuracy (Aircraft, Pets,
   Caltech-101, Flowers).

Every record keeps one value per test image (``extra.per_episode``, ``extra.samples_over: "test images"``,
:func:`per_image_values`) whose mean is the metric, so that the leaderboard's interval is over test images
and a Δ between two cards is paired image by image, as the kNN tasks'.

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

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metadataset.features import cached_features
from metadataset.sources import ImageSet, data_digest
from ringbench.config import settings_from_args
from ringbench.errors import UserError
from ringbench.fileio import resolved_path
from ringbench.logreg import few_threads_if_small, logreg_logits, solve_logreg, solve_logreg_path
from transfer.battery_data import BATTERY, BatterySet, Listing, Split
from transfer.linear import DATA_ROOT_ENV, LinearSettings, add_linear_arguments, stratified_holdout
from transfer.tasks import Task, TaskContext, TaskResult, register
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


# --- the path --------------------------------------------------------------------------------------


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


def _image_set(task: str, listing: Listing, split: str) -> ImageSet:
    """A split as an image set; a multi-label split's (labels ``(N, classes)``) "class" of each image is
    its row, as ``transfer.voc07.voc2007_image_set``, so that a skipped image drops its row."""
    data = listing.splits[split]
    rows = np.asarray(data.labels).ndim == 2

    def items() -> Iterator[tuple[int, str, Any]]:
        for i, ref in enumerate(data.refs):
            yield (i if rows else int(data.labels[i])), ref, (lambda i=i: data.load(i))

    return ImageSet(
        name=task,
        split=split,
        class_names=list(data.refs) if rows else listing.classes,
        items=items,
        counts=(
            np.ones(len(data.refs), dtype=np.int64)
            if rows
            else np.bincount(data.labels, minlength=len(listing.classes)).astype(np.int64)
        ),
        fingerprint=data_digest(task, split, data.fingerprint),
        info=dict(listing.info),
    )


def _labels_of(listing: Listing, split: str, feature_labels: np.ndarray) -> np.ndarray:
    """The labels of the images whose features exist: the class indices themselves, or (multi-label)
    the rows of the split's label matrix."""
    labels = np.asarray(listing.splits[split].labels)
    return labels[np.asarray(feature_labels)] if labels.ndim == 2 else np.asarray(feature_labels)


def _first_of(dataset: Any) -> Callable[[int], Any]:
    return lambda i: dataset[i][0]


def synthetic_listing(config: dict[str, Any], image_size: int) -> Listing:
    """The embedded twin's data: the shared shapes renderer's train and test splits."""
    from ringbench.shapes import SyntheticShapes

    splits = {}
    for split in ("train", "test"):
        ds = SyntheticShapes(
            num_classes=config["synthetic"]["classes"],
            images_per_class=config["synthetic"][split],
            image_size=image_size,
            seed=0,
            split=split,
        )
        splits[split] = Split(
            refs=[f"{split}/{i}" for i in range(len(ds))],
            labels=np.asarray(ds.targets, dtype=np.int64),
            load=_first_of(ds),
            fingerprint=[config["synthetic"], image_size],
        )
    return Listing("synthetic", Path("."), list(ds.classes), splits)


SYNTHETIC = BatterySet(
    "kornblith_synthetic", "synthetic shapes", lambda root, seed: Listing("", Path("."), [], {}), "embedded",
    "train_fraction", "top1", 0,
)  # fmt: skip


def set_config(spec: BatterySet, settings: dict[str, Any], root: str | None) -> dict[str, Any]:
    """The config of ``linear_<spec.name>`` from the linear family's settings (``root``: --data-root)."""
    config: dict[str, Any] = {
        "dataset": spec.name,
        "protocol": "kornblith2019",
        "path": list(parse_path(settings["linear_path"])),
        "validation": spec.validation,
        "val_fraction": settings["linear_val_fraction"] if spec.validation == "train_fraction" else None,
        "seed": settings["linear_seed"],
        "metric": spec.metric,
        "max_iter": settings["linear_max_iter"],
        "tol": PATH_TOL,
        "image_size": settings["linear_image_size"] or (None if spec is SYNTHETIC else KORNBLITH_IMAGE_SIZE),
        "resize": RESIZE,
        "pooling": "avg",
        "features": "raw",
    }
    if spec is SYNTHETIC:
        config["synthetic"] = {
            "classes": settings["linear_synthetic_classes"],
            "train": settings["linear_synthetic_train"],
            "test": settings["linear_synthetic_test"],
        }
    else:
        config["data_root"] = str(resolved_path(root, "--data-root")) if root else None
    return config


def read_set(spec: BatterySet, config: dict[str, Any], image_size: int, task_name: str) -> Listing:
    """The data set's listing, or a one-line :class:`UserError` naming what is missing."""
    if spec is SYNTHETIC:
        return synthetic_listing(config, image_size)
    if config["data_root"] is None:
        raise UserError(
            f"{task_name} needs its data: pass --data-root (the folder holding {spec.layout}) or set "
            f"${DATA_ROOT_ENV}; nothing is downloaded"
        )
    return spec.read(Path(config["data_root"]), config["seed"])


def evaluate_set(
    spec: BatterySet, backbone: Any, config: dict[str, Any], ctx: TaskContext, task_name: str
) -> tuple[dict[str, float], dict[str, Any]]:
    """One data set's metrics (percent) and the record's ``extra`` for them: features (cached), the path
    on the validation split, the refit, the test metric."""
    image_size = config["image_size"] or backbone.default_image_size
    listing = read_set(spec, config, image_size, task_name)
    parts = ["train", "val", "test"] if spec.validation == "creators" else ["train", "test"]
    feats = {
        part: cached_features(
            backbone,
            _image_set(task_name, listing, part),
            ctx.feature_cache_dir,
            image_size=image_size,
            pooling=config["pooling"],
            device=ctx.device,
            progress=not ctx.debug,
            resize=config["resize"],
        )
        for part in parts
    }
    arrays = {p: (np.asarray(f.features), _labels_of(listing, p, f.labels)) for p, f in feats.items()}
    if spec.validation == "train_fraction":
        x, y = arrays.pop("train")
        held = stratified_holdout(y, config["val_fraction"], config["seed"])
        arrays["train"], arrays["val"] = (x[~held], y[~held]), (x[held], y[held])
    metric_name, words = METRICS[spec.metric][1:]
    common = (config["path"], ctx.device, config["max_iter"], config["tol"])
    extra: dict[str, Any] = {}
    if spec.problem == "multilabel":
        out = kornblith_multilabel_evaluation(arrays["train"], arrays["val"], arrays["test"], *common)
        extra["ap"] = {c: 100 * a for c, a in zip(listing.classes, out["ap"])}
        extra["val_classes"] = out["val_classes"]
    else:
        out = kornblith_evaluation(
            arrays["train"], arrays["val"], arrays["test"], len(listing.classes), spec.metric, *common
        )
        extra["samples_over"] = "test images"  # what the leaderboard's interval is over
        # one value per test image in the images' fixed order, whose mean is the metric (per_image_values)
        extra["per_episode"] = {metric_name: per_image_values(out["correct"], arrays["test"][1], spec.metric)}
    print(f"{task_name}: test {words} {100 * out['test']:.2f}% (1/C = {out['value']:.3g})", file=sys.stderr)
    extra.update(
        {
            "metric": spec.metric,
            "metric_name": words,
            "regularisation": out["value"],
            "regularisation_meaning": "1/C of scikit-learn's LogisticRegression (lambda = value / n)",
            "val_curve": {k: 100 * v for k, v in out["val_curve"].items()},
            "train_images": len(arrays["train"][1]),
            "val_images": len(arrays["val"][1]),
            "test_images": len(arrays["test"][1]),
            "skipped_images": {p: len(f.skipped) for p, f in feats.items()},
            "feature_cache": {p: {"hit": f.from_cache, "path": str(f.path)} for p, f in feats.items()},
            "data": listing.info,
            "path_seconds": round(out["path_seconds"], 3),
            "refit_seconds": round(out["refit_seconds"], 3),
        }
    )
    return {metric_name: 100 * out["test"]}, extra


def make_kornblith_task(spec: BatterySet) -> Task:
    synthetic = spec is SYNTHETIC
    task_name = f"linear_{spec.name}"
    metric_name = METRICS[spec.metric][1]

    def make_config(args: argparse.Namespace) -> dict[str, Any]:
        root = getattr(args, "data_root", None) or os.environ.get(DATA_ROOT_ENV)
        return set_config(spec, settings_from_args(args, LinearSettings), root)

    def validate(backbone: Any, config: dict[str, Any]) -> None:
        if not synthetic:
            read_set(spec, config, KORNBLITH_IMAGE_SIZE, task_name)

    def run(backbone: Any, config: dict[str, Any], ctx: TaskContext) -> TaskResult:
        metrics, extra = evaluate_set(spec, backbone, config, ctx, task_name)
        return TaskResult(metrics=metrics, seeds=[config["seed"]], extra=extra)

    unused = ["linear_grid"]
    if not synthetic:
        unused += ["linear_synthetic_classes", "linear_synthetic_train", "linear_synthetic_test"]
    if spec.validation == "creators":
        unused.append("linear_val_fraction")
    description = (
        "Kornblith et al. 2019 linear path on the synthetic shapes (embedded)"
        if synthetic
        else f"Kornblith et al. 2019 linear evaluation on {spec.title} ({METRICS[spec.metric][2]}; --data-root)"
    )
    return Task(
        name=task_name,
        family="linear",
        description=description,
        make_config=make_config,
        run=run,
        validate=validate,
        add_arguments=add_linear_arguments,
        primary_metric=metric_name,
        needs_data=not synthetic,
        unused_flags=tuple(unused),
    )


def make_kornblith_all_task(sets: dict[str, BatterySet], name: str = "linear_kornblith") -> Task:
    """``linear_kornblith``: every data set of ``sets`` (the twelve of :data:`BATTERY`) in one record.

    Each data set runs exactly as its own task ``linear_<set>`` (the same config, ``config["sets"][set]``,
    and the same feature cache entries); the metrics are ``<set>/<metric>`` (``acc``,
    ``mean_per_class_acc`` or ``map11``) and ``mean``, their unweighted mean. ``extra["sets"][set]`` holds
    each one's chosen value, validation curve, image counts and timings; ``extra["per_episode"]`` the
    per-image values of the single-label sets (``<set>/<metric>``: intervals over their test images).
    ``mean`` has no samples: it averages over different test sets.

    All twelve are required: a data set missing under ``--data-root`` is a one-line error naming the
    first missing one's expected file and layout. There is no subset flag: a mean over another selection
    is another number, and each data set has its own task (``linear_<set>``) for a partial battery."""
    metric_of = {s: f"{s}/{METRICS[spec.metric][1]}" for s, spec in sets.items()}

    def make_config(args: argparse.Namespace) -> dict[str, Any]:
        settings = settings_from_args(args, LinearSettings)
        root = getattr(args, "data_root", None) or os.environ.get(DATA_ROOT_ENV)
        return {
            "dataset": "kornblith",
            "protocol": "kornblith2019",
            "sets": {s: set_config(spec, settings, root) for s, spec in sets.items()},
        }

    def validate(backbone: Any, config: dict[str, Any]) -> None:
        for s, spec in sets.items():
            cfg = config["sets"][s]
            if cfg["data_root"] is None:
                raise UserError(
                    f"{name} needs its data: pass --data-root (the folder holding all {len(sets)} data sets' "
                    f"layouts, docs/battery.md) or set ${DATA_ROOT_ENV}; nothing is downloaded"
                )
            try:
                read_set(spec, cfg, KORNBLITH_IMAGE_SIZE, name)
            except UserError as exc:
                raise UserError(
                    f"{name} runs all {len(sets)} data sets; the first missing is {spec.title} "
                    f"(linear_{s} alone runs one): {exc}"
                ) from None

    def run(backbone: Any, config: dict[str, Any], ctx: TaskContext) -> TaskResult:
        metrics: dict[str, float] = {}
        extra: dict[str, Any] = {"samples_over": "test images", "per_episode": {}, "sets": {}, "regularisation": {}}
        for s, spec in sets.items():
            values, set_extra = evaluate_set(spec, backbone, config["sets"][s], ctx, f"linear_{s}")
            (value,) = values.values()
            metrics[metric_of[s]] = value
            for metric, samples in set_extra.pop("per_episode", {}).items():
                extra["per_episode"][f"{s}/{metric}"] = samples
            set_extra.pop("samples_over", None)
            extra["sets"][s] = set_extra
            extra["regularisation"][s] = set_extra["regularisation"]
        metrics["mean"] = float(np.mean([metrics[m] for m in metric_of.values()]))
        extra["mean_over"] = list(metric_of.values())
        print(f"{name}: mean over {len(sets)} data sets {metrics['mean']:.2f}", file=sys.stderr)
        seeds = sorted({c["seed"] for c in config["sets"].values()})
        return TaskResult(metrics={"mean": metrics.pop("mean"), **metrics}, seeds=seeds, extra=extra)

    return Task(
        name=name,
        family="linear",
        description=f"Kornblith et al. 2019 linear evaluation, all {len(sets)} data sets and their mean (--data-root)",
        make_config=make_config,
        run=run,
        validate=validate,
        add_arguments=add_linear_arguments,
        primary_metric="mean",
        headline=("mean", *metric_of.values()),
        needs_data=True,
        unused_flags=("linear_grid", "linear_synthetic_classes", "linear_synthetic_train", "linear_synthetic_test"),
    )


for _spec in [*BATTERY.values(), SYNTHETIC]:
    register(make_kornblith_task(_spec))
register(make_kornblith_all_task(BATTERY))
