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

The protocol's maths (the path, the metrics, the per-image samples) is :mod:`transfer.kornblith_protocol`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from metadataset.sources import ImageSet, data_digest
from ringbench.config import settings_from_args
from ringbench.errors import UserError
from transfer.battery_data import BATTERY, BatterySet, Listing, Split
from transfer.kornblith_protocol import (
    KORNBLITH_IMAGE_SIZE,
    METRICS,
    PATH_TOL,
    RESIZE,
    kornblith_evaluation,
    kornblith_multilabel_evaluation,
    parse_path,
    per_image_values,
)
from transfer.linear import (
    DATA_ROOT_ENV,
    LinearSettings,
    add_linear_arguments,
    data_root_setting,
    stratified_holdout,
    synthetic_setting,
)
from transfer.tasks import Task, TaskContext, TaskResult, register


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
        config["synthetic"] = synthetic_setting(settings, "linear")
    else:
        config["data_root"] = root
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
        part: ctx.features(
            backbone, _image_set(task_name, listing, part), image_size, config["pooling"], resize=config["resize"]
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
        return set_config(spec, settings_from_args(args, LinearSettings), data_root_setting(args))

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
        root = data_root_setting(args)
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
        extra["aggregates"] = {"mean": list(metric_of.values())}  # the leaderboard's average rank leaves it out
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
