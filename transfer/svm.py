"""VOC07 linear SVMs and low-shot SVMs on frozen, cached features (Goyal et al., ICCV 2019).

Tasks ``svm_voc2007`` and ``svm_voc2007_lowshot`` (VOC2007 classification under ``--data-root``,
read by :mod:`transfer.voc07`), and their embedded twins ``svm_synthetic`` and
``svm_synthetic_lowshot`` (the synthetic shapes as a one-vs-rest problem: an image is positive for
its class and negative for every other; no difficult images).

Values copied from VISSL's configs, whose SVM section is the same in both:
``configs/config/benchmark/linear_image_classification/voc07/eval_resnet_8gpu_transfer_voc07_svm.yaml``
and ``configs/config/benchmark/low_shot_transfer/voc07/eval_resnet_8gpu_transfer_voc07_low_shot_svm.yaml``
(facebookresearch/vissl): costs ``[0.01, 0.1, 1.0, 2, 5, 10, 15, 20, 50, 100, 1000]``, features
normalised (``f / (||f|| + 1e-5)``), squared hinge loss, l2 penalty, dual solver, ``max_iter`` 2000,
3 cross-validation folds; low shot ``k_values: [1, 2, 4, 8, 16, 32, 64, 96]`` and
``sample_inds: [1, 2, 3, 4, 5]``. The classifier settings VISSL passes in code
(``vissl/utils/svm_utils/svm_trainer.py``): scikit-learn's ``LinearSVC`` with
``class_weight={1: 2, -1: 1}``, ``intercept_scaling=1.0``, ``tol=1e-4``; the cross-validation score is
scikit-learn's ``average_precision`` over ``cv=3`` (stratified, unshuffled) folds.

``svm_voc2007``: one SVM per class on trainval (difficult images are negatives in training, as in
VISSL's ``svm_trainer.py``), the cost of each class the one with the best mean cross-validated AP
(first on ties), refit on all of trainval; the test metric is the VOC2007 devkit's 11-point mAP
(difficult images ignored), with the all-point mAP that VISSL reports beside it.

``svm_voc2007_lowshot``: for each of five seeded samples and each k, per class k positives and
19 k negatives drawn from trainval (difficult images never drawn; VISSL's
``extra_scripts/create_low_shot_samples.py``), one SVM per class. VISSL then reports, per k, the cost
with the best mean *test* AP; here the cost is chosen without the test set (DESIGN: choose on
validation, evaluate test once): by ``min(3, k)``-fold cross-validation on the sample itself, the
cost with the best AP averaged over classes and folds (one cost per sample and k, as VISSL's is one
per k); at k = 1 no fold can hold out a positive, so the cost chosen at k = 2 for the same sample is
used. The test mAP at every cost is kept in the record (``extra.test_map_by_cost``), from which
VISSL's number (its maximum) can be read.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ringbench.config import add_schema_flags, settings_from_args
from ringbench.errors import UserError
from transfer.linear import data_root_setting, open_linear_split, synthetic_setting
from transfer.tasks import Task, TaskContext, TaskResult, register
from transfer.voc07 import (
    NEGATIVE,
    POSITIVE,
    allpoint_average_precision,
    read_voc2007_classification,
    voc11_average_precision,
    voc2007_folder,
    voc2007_image_set,
)

# VISSL configs/config/benchmark/linear_image_classification/voc07/eval_resnet_8gpu_transfer_voc07_svm.yaml
# (SVM.costs.costs_list; the same in low_shot_transfer/voc07/eval_resnet_8gpu_transfer_voc07_low_shot_svm.yaml)
COSTS = (0.01, 0.1, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 50.0, 100.0, 1000.0)
FOLDS = 3  # SVM.cross_val_folds
MAX_ITER = 2000  # SVM.max_iter
# VISSL low_shot_transfer/voc07/eval_resnet_8gpu_transfer_voc07_low_shot_svm.yaml (SVM.low_shot)
LOWSHOT_KS = (1, 2, 4, 8, 16, 32, 64, 96)
LOWSHOT_SAMPLES = 5  # sample_inds: [1, 2, 3, 4, 5]
SYNTHETIC_LOWSHOT_KS = (1, 2, 4)
NORM_EPS = 1e-5  # vissl/utils/svm_utils/svm_trainer.py, _normalize_features


@dataclass
class SvmSettings:
    """The SVM family's settings (flags ``--svm-*``) with their defaults."""

    svm_costs: str = field(
        default=",".join(f"{c:g}" for c in COSTS), metadata={"help": "comma-separated SVM costs (C) to choose from"}
    )
    svm_folds: int = field(default=FOLDS, metadata={"help": "cross-validation folds", "range": (2, None)})
    svm_max_iter: int = field(default=MAX_ITER, metadata={"help": "LinearSVC iterations", "range": (1, None)})
    svm_lowshot_ks: Optional[str] = field(
        default=None,
        metadata={
            "help": "low-shot positives per class, comma-separated (default: 1,2,4,8,16,32,64,96; "
            "svm_synthetic_lowshot: 1,2,4)"
        },
    )
    svm_lowshot_samples: int = field(
        default=LOWSHOT_SAMPLES, metadata={"help": "low-shot samples per k", "range": (1, None)}
    )
    svm_lowshot_seed: int = field(default=0, metadata={"help": "seed of the low-shot samples", "range": (0, None)})
    svm_image_size: Optional[int] = field(
        default=None, metadata={"help": "resize images to this size (default: the backbone card's)", "range": (1, None)}
    )
    svm_synthetic_classes: int = field(
        default=8, metadata={"help": "svm_synthetic*: shape classes", "range": (2, None)}
    )
    svm_synthetic_train: int = field(
        default=20, metadata={"help": "svm_synthetic*: train images per class", "range": (2, None)}
    )
    svm_synthetic_test: int = field(
        default=10, metadata={"help": "svm_synthetic*: test images per class", "range": (1, None)}
    )


def add_svm_arguments(parser: argparse.ArgumentParser) -> None:
    """The SVM family's flags (added once to the shared ``transfer/run.py`` parser)."""
    add_schema_flags(parser, SvmSettings, "VOC07 SVM and low-shot SVM tasks (svm_*)")


# --- the classifiers -------------------------------------------------------------------------------


def normalise_features(x: np.ndarray) -> np.ndarray:
    """VISSL's ``_normalize_features``: each row divided by its norm plus 1e-5, in float64."""
    x = np.asarray(x, dtype=np.float64)
    return x / (np.linalg.norm(x, axis=1) + NORM_EPS)[:, None]


def make_svc(cost: float, max_iter: int = MAX_ITER) -> Any:
    """VISSL's ``LinearSVC`` (``svm_trainer.py``), seeded (VISSL leaves the dual solver's shuffling unseeded)."""
    from sklearn.svm import LinearSVC

    return LinearSVC(
        C=cost,
        class_weight={1: 2, -1: 1},
        intercept_scaling=1.0,
        penalty="l2",
        loss="squared_hinge",
        tol=1e-4,
        dual=True,
        max_iter=max_iter,
        random_state=0,
    )


class _Fits:
    """Counts fits and the ones that stopped at ``max_iter`` (scikit-learn's ConvergenceWarning)."""

    def __init__(self) -> None:
        self.total = 0
        self.not_converged = 0

    def __call__(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from sklearn.exceptions import ConvergenceWarning

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            out = fn(*args, **kwargs)
        self.total += 1
        self.not_converged += any(issubclass(w.category, ConvergenceWarning) for w in caught)
        return out


def cross_validated_ap(
    x: np.ndarray, y: np.ndarray, costs: Sequence[float], folds: int, max_iter: int, fits: _Fits
) -> np.ndarray:
    """Mean over ``folds`` stratified (unshuffled) folds of scikit-learn's average precision of the
    decision function, per cost: what VISSL's ``cross_val_score(clf, X, y, cv=folds,
    scoring="average_precision")`` computes (a test checks it), with the folds split once for all costs."""
    from sklearn.metrics import average_precision_score
    from sklearn.model_selection import StratifiedKFold

    splits = list(StratifiedKFold(n_splits=folds).split(x, y))
    scores = np.zeros((len(costs), len(splits)))
    for j, (fit_rows, held_rows) in enumerate(splits):
        for i, cost in enumerate(costs):
            model = fits(make_svc(cost, max_iter).fit, x[fit_rows], y[fit_rows])
            scores[i, j] = average_precision_score(y[held_rows], model.decision_function(x[held_rows]))
    return scores.mean(axis=1)


def _binary(labels: np.ndarray) -> np.ndarray:
    """Training targets: positive 1, anything else (negative, difficult) -1 (VISSL's svm_trainer)."""
    return np.where(labels == POSITIVE, 1, -1)


def svm_evaluation(
    train_x: np.ndarray,
    train_labels: np.ndarray,
    test_x: np.ndarray,
    test_labels: np.ndarray,
    costs: Sequence[float] = COSTS,
    folds: int = FOLDS,
    max_iter: int = MAX_ITER,
) -> dict[str, Any]:
    """One SVM per class (column): cost by cross-validated AP on train, refit, test AP (fractions)."""
    x, tx = normalise_features(train_x), normalise_features(test_x)
    fits = _Fits()
    cv_ap, chosen, ap11, ap_all = [], [], [], []
    for c in range(train_labels.shape[1]):
        y = _binary(train_labels[:, c])
        scores = cross_validated_ap(x, y, costs, folds, max_iter, fits)
        best = int(np.argmax(scores))  # the first of equal scores, as np.argmax in VISSL
        model = fits(make_svc(costs[best], max_iter).fit, x, y)
        out = model.decision_function(tx)
        cv_ap.append(scores.tolist())
        chosen.append(float(costs[best]))
        ap11.append(voc11_average_precision(out, test_labels[:, c]))
        ap_all.append(allpoint_average_precision(out, test_labels[:, c]))
    return {
        "map": float(np.mean(ap11)),
        "map_allpoint": float(np.mean(ap_all)),
        "ap": ap11,
        "ap_allpoint": ap_all,
        "cost": chosen,
        "cv_ap": cv_ap,
        "fits": fits.total,
        "fits_not_converged": fits.not_converged,
    }


def lowshot_sample(labels: np.ndarray, k: int, rng: np.random.Generator, names: Sequence[str]) -> list[np.ndarray]:
    """Per class, the rows of k positives and (classes - 1) * k negatives drawn without replacement
    (VISSL's ``generate_voc07_low_shot_samples``); difficult images are never drawn."""
    classes = labels.shape[1]
    rows = []
    for c in range(classes):
        pos, neg = np.flatnonzero(labels[:, c] == POSITIVE), np.flatnonzero(labels[:, c] == NEGATIVE)
        if len(pos) < k or len(neg) < (classes - 1) * k:
            raise UserError(
                f"low-shot k={k}: class {names[c]} has {len(pos)} positive and {len(neg)} negative training "
                f"images, fewer than {k} and {(classes - 1) * k}"
            )
        rows.append(
            np.concatenate([rng.choice(pos, k, replace=False), rng.choice(neg, (classes - 1) * k, replace=False)])
        )
    return rows


def lowshot_evaluation(
    train_x: np.ndarray,
    train_labels: np.ndarray,
    test_x: np.ndarray,
    test_labels: np.ndarray,
    ks: Sequence[int] = LOWSHOT_KS,
    samples: int = LOWSHOT_SAMPLES,
    seed: int = 0,
    costs: Sequence[float] = COSTS,
    folds: int = FOLDS,
    max_iter: int = MAX_ITER,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The low-shot protocol of the module docstring; mAPs are fractions. ``per_sample[s]["map_k<k>"]``
    is sample s's 11-point test mAP at k with the cost chosen by cross-validation."""
    if 1 in ks and 2 not in ks:
        raise UserError("low-shot k = 1 takes its cost from k = 2 (one positive cannot be cross-validated): add 2")
    names = list(class_names or [str(c) for c in range(train_labels.shape[1])])
    x, tx = normalise_features(train_x), normalise_features(test_x)
    fits = _Fits()
    classes = train_labels.shape[1]
    per_sample: list[dict[str, float]] = []
    per_sample_allpoint: list[dict[str, float]] = []
    by_cost: dict[str, list[list[float]]] = {f"k{k}": [] for k in ks}
    chosen: dict[str, list[float]] = {f"k{k}": [] for k in ks}
    for s in range(samples):
        cost_index: dict[int, int] = {}
        test_ap: dict[int, np.ndarray] = {}  # k -> (costs, classes) 11-point AP
        test_ap_all: dict[int, np.ndarray] = {}
        for k in sorted(ks, reverse=True):  # k = 2 before k = 1
            rng = np.random.default_rng([seed, s, k])
            rows = lowshot_sample(train_labels, k, rng, names)
            cv = np.zeros((len(costs), classes))
            ap11 = np.zeros((len(costs), classes))
            ap_all = np.zeros((len(costs), classes))
            for c in range(classes):
                y = np.where(np.arange(len(rows[c])) < k, 1, -1)
                if k >= 2:
                    cv[:, c] = cross_validated_ap(x[rows[c]], y, costs, min(folds, k), max_iter, fits)
                for i, cost in enumerate(costs):
                    out = fits(make_svc(cost, max_iter).fit, x[rows[c]], y).decision_function(tx)
                    ap11[i, c] = voc11_average_precision(out, test_labels[:, c])
                    ap_all[i, c] = allpoint_average_precision(out, test_labels[:, c])
            cost_index[k] = int(np.argmax(cv.mean(1))) if k >= 2 else cost_index[2]
            test_ap[k], test_ap_all[k] = ap11, ap_all
        per_sample.append({f"map_k{k}": float(test_ap[k][cost_index[k]].mean()) for k in ks})
        per_sample_allpoint.append({f"map_k{k}": float(test_ap_all[k][cost_index[k]].mean()) for k in ks})
        for k in ks:
            by_cost[f"k{k}"].append(test_ap[k].mean(1).tolist())
            chosen[f"k{k}"].append(float(costs[cost_index[k]]))
    return {
        "per_sample": per_sample,
        "per_sample_allpoint": per_sample_allpoint,
        "test_map_by_cost": by_cost,
        "cost": chosen,
        "fits": fits.total,
        "fits_not_converged": fits.not_converged,
    }


# --- data and tasks ------------------------------------------------------------------------------------


def _parse_list(text: str, flag: str, kind: type) -> list:
    try:
        values = [kind(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 < v < float("inf") for v in values):
        raise UserError(f"{flag} needs positive values, got {text!r}")
    return sorted(set(values))


def _features(
    dataset: str, backbone: Any, config: dict[str, Any], ctx: TaskContext
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str], dict[str, Any]]:
    """Features and label matrices (1 / 0 / -1) of train(val) and test, the class names and cache facts."""
    image_size = config["image_size"] or backbone.default_image_size
    feats, labels = {}, {}
    info: dict[str, Any] = {"skipped_images": {}, "feature_cache": {}}
    names: list[str] = []
    for split in ("train", "test"):
        if dataset == "voc2007":
            image_set, matrix = voc2007_image_set(config["data_root"], "trainval" if split == "train" else "test")
            from transfer.voc07 import VOC_CLASSES

            names = list(VOC_CLASSES)
        else:
            image_set = open_linear_split("synthetic", split, None, config, image_size)
            matrix = None
            names = list(image_set.class_names)
        fs = ctx.features(backbone, image_set, image_size, config["pooling"])
        if matrix is None:  # one-vs-rest: positive for its class, negative for every other
            matrix = np.where(np.eye(len(names), dtype=bool)[fs.labels], POSITIVE, NEGATIVE).astype(np.int8)
        else:  # rows of the images whose features exist (a corrupt image is skipped)
            matrix = matrix[fs.labels]
        feats[split], labels[split] = np.asarray(fs.features), matrix
        info["skipped_images"][split] = len(fs.skipped)
        info["feature_cache"][split] = {"hit": fs.from_cache, "path": str(fs.path)}
    return feats, labels, names, info


def make_svm_task(dataset: str, lowshot: bool, description: str) -> Task:
    name = f"svm_{dataset}" + ("_lowshot" if lowshot else "")

    def make_config(args: argparse.Namespace) -> dict[str, Any]:
        settings = settings_from_args(args, SvmSettings)
        config: dict[str, Any] = {
            "dataset": dataset,
            "costs": _parse_list(settings["svm_costs"], "--svm-costs", float),
            "folds": settings["svm_folds"],
            "max_iter": settings["svm_max_iter"],
            "image_size": settings["svm_image_size"],
            "pooling": "avg",
            "features": "l2-normalised (f / (|f| + 1e-5))",
            "classifier": "LinearSVC squared hinge l2 dual, class_weight {1: 2, -1: 1}, tol 1e-4",
        }
        if lowshot:
            default_ks = SYNTHETIC_LOWSHOT_KS if dataset == "synthetic" else LOWSHOT_KS
            ks = settings["svm_lowshot_ks"] or ",".join(map(str, default_ks))
            config["lowshot"] = {
                "ks": _parse_list(ks, "--svm-lowshot-ks", int),
                "samples": settings["svm_lowshot_samples"],
                "seed": settings["svm_lowshot_seed"],
            }
            if 1 in config["lowshot"]["ks"] and 2 not in config["lowshot"]["ks"]:
                raise UserError("--svm-lowshot-ks: k = 1 takes its cost from k = 2; add 2")
        if dataset == "synthetic":
            config["synthetic"] = synthetic_setting(settings, "svm")
        else:
            config["data_root"] = data_root_setting(args)
        return config

    def validate(backbone: Any, config: dict[str, Any]) -> None:
        if dataset == "voc2007":
            voc2007_folder(config["data_root"])
            for split in ("trainval", "test"):
                read_voc2007_classification(config["data_root"], split)

    def run(backbone: Any, config: dict[str, Any], ctx: TaskContext) -> TaskResult:
        feats, labels, names, info = _features(dataset, backbone, config, ctx)
        start = time.perf_counter()
        extra: dict[str, Any] = {
            "train_images": len(labels["train"]),
            "test_images": len(labels["test"]),
            "classes": names,
            **info,
        }
        if not lowshot:
            out = svm_evaluation(
                feats["train"],
                labels["train"],
                feats["test"],
                labels["test"],
                config["costs"],
                config["folds"],
                config["max_iter"],
            )
            metrics = {"map": 100 * out["map"], "map_allpoint": 100 * out["map_allpoint"]}
            extra.update(
                ap={n: 100 * a for n, a in zip(names, out["ap"])},
                ap_allpoint={n: 100 * a for n, a in zip(names, out["ap_allpoint"])},
                cost=dict(zip(names, out["cost"])),
                cv_ap={n: a for n, a in zip(names, out["cv_ap"])},
                fits=out["fits"],
                fits_not_converged=out["fits_not_converged"],
            )
            print(f"{name}: test mAP (11-point) {metrics['map']:.2f}", file=sys.stderr)
        else:
            low = config["lowshot"]
            out = lowshot_evaluation(
                feats["train"],
                labels["train"],
                feats["test"],
                labels["test"],
                low["ks"],
                low["samples"],
                low["seed"],
                config["costs"],
                config["folds"],
                config["max_iter"],
                names,
            )
            per_sample = [{m: 100 * v for m, v in s.items()} for s in out["per_sample"]]
            metrics = {m: float(np.mean([s[m] for s in per_sample])) for m in per_sample[0]}
            sd = {m: float(np.std([s[m] for s in per_sample], ddof=1)) if len(per_sample) > 1 else 0.0 for m in metrics}
            extra.update(
                per_seed=per_sample,  # one mapping per low-shot sample: the leaderboard's interval over samples
                samples_over="low-shot samples",
                sd=sd,
                per_sample_allpoint=[{m: 100 * v for m, v in s.items()} for s in out["per_sample_allpoint"]],
                test_map_by_cost={
                    k: [[100 * v for v in row] for row in rows] for k, rows in out["test_map_by_cost"].items()
                },
                cost=out["cost"],
                fits=out["fits"],
                fits_not_converged=out["fits_not_converged"],
            )
            print(
                f"{name}: test mAP (11-point) "
                + ", ".join(f"k={m[5:]} {metrics[m]:.2f} ± {sd[m]:.2f}" for m in metrics),
                file=sys.stderr,
            )
        extra["solve_seconds"] = round(time.perf_counter() - start, 3)
        seeds = list(range(config["lowshot"]["samples"])) if lowshot else []
        return TaskResult(metrics=metrics, seeds=seeds, extra=extra)

    synthetic_flags = ("svm_synthetic_classes", "svm_synthetic_train", "svm_synthetic_test")
    lowshot_flags = ("svm_lowshot_ks", "svm_lowshot_samples", "svm_lowshot_seed")
    default_ks = SYNTHETIC_LOWSHOT_KS if dataset == "synthetic" else LOWSHOT_KS
    return Task(
        name=name,
        family="svm",
        description=description,
        make_config=make_config,
        run=run,
        validate=validate,
        add_arguments=add_svm_arguments,
        primary_metric=f"map_k{max(default_ks)}" if lowshot else "map",
        headline=tuple(f"map_k{k}" for k in default_ks) if lowshot else ("map",),
        needs_data=dataset != "synthetic",
        unused_flags=(() if dataset == "synthetic" else synthetic_flags) + (() if lowshot else lowshot_flags),
    )


for _dataset, _lowshot, _text in (
    ("voc2007", False, "VOC07 linear SVM per class, cost by 3-fold CV, 11-point test mAP (devkit under --data-root)"),
    ("voc2007", True, "VOC07 low-shot SVM, k 1-96 positives x 5 samples, 11-point mAP per k (devkit, --data-root)"),
    ("synthetic", False, "VOC07 SVM protocol on the synthetic shapes, one-vs-rest (embedded)"),
    ("synthetic", True, "VOC07 low-shot SVM protocol on the synthetic shapes, one-vs-rest (embedded)"),
):
    register(make_svm_task(_dataset, _lowshot, _text))
