"""Full fine-tuning as Kornblith et al. 2019 ("Do Better ImageNet Models Transfer Better?", CVPR; its fine-tuning
setup), as implemented in ``linusericsson/ssl-transfer``'s ``finetune.py`` (Ericsson et al., CVPR 2021).

Tasks ``finetune_<name>`` for the data sets of ``transfer.battery_data.BATTERY`` and ``finetune_synthetic`` (the
embedded shapes; nothing on disk). For each point of the grid (learning rate x weight decay,
:func:`transfer.finetune_protocol.expand_grid`) the card's backbone and a fresh linear head on its pooled features
are trained on train and scored on validation (the linear battery's rule: the creators' val split, else a seeded
stratified 20% of train); the best point (:data:`~transfer.finetune_protocol.CHOICE_RULE`) is trained again on
train + validation and scored once on test with the data set's metric. Training: SGD with Nesterov momentum 0.9,
a cosine learning rate over 5,000 steps of 64 images, ssl-transfer's augmentation (random resized crop, bicubic,
and a horizontal flip) and test transform (shorter side bicubic to the image size, the centre crop); BatchNorm in
training mode with Kornblith's momentum (``--finetune-batch-norm train``) or frozen. VOC2007 is multi-label: one
sigmoid output per class, binary cross-entropy on "positive" (difficult counts as negative, as ssl-transfer's
reader), the devkit's 11-point mAP. The protocol, its sources and what differs: docs/finetune.md.

Each point is its own run, ``transfer/run.py --grid-point NAME`` (a sweep's job; its result is
``<run folder>/points/<name>/result.json``); the task's run without it trains the points not yet finished, reuses
the others, chooses and refits. Every training checkpoints (model, optimizer, step, RNG) atomically every
``--finetune-checkpoint-every`` steps and at its end, and a run started again continues from there to the same
weights (data order and augmentation are functions of the seed and the step).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ringbench.config import add_schema_flags, settings_from_args
from ringbench.errors import UserError
from ringbench.fileio import atomic_write_text, folder_lock, read_json_object
from transfer.battery_data import BATTERY, BatterySet, Listing
from transfer.finetune_protocol import (
    CHOICE_RULE,
    DEFAULT_BATCH,
    DEFAULT_LRS,
    DEFAULT_STEPS,
    DEFAULT_WDS,
    GridPoint,
    choose_point,
    expand_grid,
    parse_values,
)
from transfer.finetune_train import CHECKPOINT_EVERY, FORCE_HINT, Pool, finetune, pool_of, predict, score
from transfer.kornblith_protocol import KORNBLITH_IMAGE_SIZE, METRICS, RESIZE, per_image_values
from transfer.linear import DATA_ROOT_ENV, data_root_setting, stratified_holdout, synthetic_setting
from transfer.tasks import Task, TaskContext, TaskResult, check_grid_point, get_task, register

BATCH_NORM_MODES = {
    "train": "BatchNorm in training mode (batch statistics; running averages with Kornblith's momentum), as "
    "ssl-transfer's model.train()",
    "frozen": "BatchNorm in eval mode: the card's running statistics, kept; its scale and shift still trained",
}
TWIN = {"steps": 10, "image_size": 16, "workers": 0}  # finetune_synthetic's defaults (CPU-sized)


@dataclass
class FinetuneSettings:
    """The fine-tuning family's settings (flags ``--finetune-*``) with their defaults."""

    finetune_steps: Optional[int] = field(
        default=None,
        metadata={"help": f"SGD steps of each training (default {DEFAULT_STEPS}; {TWIN['steps']} for the twin)",
                  "range": (1, None)},
    )  # fmt: skip
    finetune_batch_size: int = field(default=DEFAULT_BATCH, metadata={"help": "images per step", "range": (1, None)})
    finetune_lrs: str = field(
        default=",".join(f"{v:g}" for v in DEFAULT_LRS), metadata={"help": "comma-separated learning rates of the grid"}
    )
    finetune_wds: str = field(
        default=",".join(f"{v:g}" for v in DEFAULT_WDS),
        metadata={"help": "comma-separated weight decays of the grid (each divided by the learning rate)"},
    )
    finetune_batch_norm: str = field(default="train", metadata={"help": "'train' or 'frozen' (docs/finetune.md)"})
    finetune_seed: int = field(
        default=0, metadata={"help": "seed of the held-out split, data order, augmentation, head", "range": (0, None)}
    )
    finetune_val_fraction: float = field(
        default=0.2, metadata={"help": "share of train held out for validation", "range": ((0,), (1,))}
    )
    finetune_image_size: Optional[int] = field(
        default=None,
        metadata={"help": f"crop size (default {KORNBLITH_IMAGE_SIZE}; {TWIN['image_size']} for the twin)",
                  "range": (1, None)},
    )  # fmt: skip
    finetune_synthetic_classes: int = field(
        default=8, metadata={"help": "finetune_synthetic: classes", "range": (2, None)}
    )
    finetune_synthetic_train: int = field(
        default=20, metadata={"help": "finetune_synthetic: train images per class", "range": (2, None)}
    )
    finetune_synthetic_test: int = field(
        default=10, metadata={"help": "finetune_synthetic: test images per class", "range": (1, None)}
    )
    finetune_workers: Optional[int] = field(
        default=None,
        metadata={
            "help": "data-loading processes (default 8; 0 for the twin); the same weights with any number, so "
            "not part of the record's identity",
            "range": (0, None),
        },
    )
    finetune_checkpoint_every: int = field(
        default=CHECKPOINT_EVERY,
        metadata={
            "help": "steps between checkpoints (and one at the end); not part of the record's identity",
            "range": (1, None),
        },
    )


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    """The fine-tuning family's flags (added once to the shared ``transfer/run.py`` parser)."""
    add_schema_flags(parser, FinetuneSettings, "fine-tuning tasks (finetune_*)")


# --- data ------------------------------------------------------------------------------------------


@dataclass
class Data:
    train: Pool
    val: Pool
    trainval: Pool
    test: Pool
    classes: list[str]
    info: dict[str, Any]


def read_data(spec: BatterySet, config: dict[str, Any], task_name: str) -> Data:
    """The splits of the protocol: train and validation (creators' or a stratified share of train), their union
    (ssl-transfer's trainval: all of train for the held-out sets) and test."""
    listing = read_listing(spec, config, task_name)
    twin = config["dataset"] == "synthetic"
    pools = {name: pool_of(split, twin) for name, split in listing.splits.items()}
    if spec.validation == "creators":
        train, val = pools["train"], pools["val"]
        trainval = train + val
    else:
        held = stratified_holdout(pools["train"].labels, config["val_fraction"], config["seed"])
        train, val = pools["train"].subset(np.flatnonzero(~held)), pools["train"].subset(np.flatnonzero(held))
        trainval = pools["train"]
    return Data(train, val, trainval, pools["test"], listing.classes, dict(listing.info))


def read_listing(spec: BatterySet, config: dict[str, Any], task_name: str) -> Listing:
    if config["dataset"] == "synthetic":
        from transfer.kornblith import synthetic_listing

        return synthetic_listing(config, config["image_size"])
    if config["data_root"] is None:
        raise UserError(
            f"{task_name} needs its data: pass --data-root (the folder holding {spec.layout}) or set "
            f"${DATA_ROOT_ENV}; nothing is downloaded"
        )
    return spec.read(Path(config["data_root"]), config["seed"])


# --- grid points -----------------------------------------------------------------------------------


def point_folder(ctx: TaskContext, point: GridPoint) -> Path:
    return Path(ctx.output_dir) / "points" / point.name


REQUIRED_KEYS = ("point", "lr", "wd", "weight_decay", "val", "steps_per_epoch", "bn_momentum", "train_seconds")


def read_point_result(path: Path) -> dict[str, Any]:
    """A finished point's ``result.json``; a damaged one is one line naming ``--force``."""
    return read_json_object(path, "grid-point result", FORCE_HINT, required=REQUIRED_KEYS)


def run_point(
    backbone: Any, config: dict[str, Any], ctx: TaskContext, data: Data, point: GridPoint, task_name: str
) -> dict[str, Any]:
    """One grid point: train on train, score on validation, write ``points/<name>/result.json`` (then its
    checkpoint goes: the result is what is reused). A finished point is read back, not trained again, unless
    ``--force`` without ``--keep-grid-points`` (a forced sweep's task job keeps what its forced point jobs made)."""
    folder = point_folder(ctx, point)
    result = folder / "result.json"
    with folder_lock(folder, f"grid point {point.name}"):
        if ctx.force and not ctx.keep_grid_points:
            result.unlink(missing_ok=True)
        elif result.exists():
            return {**read_point_result(result), "reused": True}
        model, info = finetune(
            backbone, len(data.classes), data.train, point.lr, point.weight_decay, config, folder, ctx,
            f"{task_name} {point.name}",
        )  # fmt: skip
        began = time.perf_counter()
        val = score(predict(model, data.val, config, backbone, ctx), data.val.labels, config["metric"],
                    len(data.classes), "val")  # fmt: skip
        row = {
            "point": point.name,
            "lr": point.lr,
            "wd": point.wd,
            "weight_decay": point.weight_decay,
            "val": 100 * val["value"],
            **info,
            "val_seconds": round(time.perf_counter() - began, 3),
            "train_images": len(data.train),
            "val_images": len(data.val),
        }
        atomic_write_text(result, json.dumps(row, indent=1) + "\n")
        (folder / "checkpoint.pth").unlink(missing_ok=True)
    print(f"{task_name}: {point.name} validation {METRICS[config['metric']][2]} {row['val']:.2f}%", file=sys.stderr)
    return {**row, "reused": False}


GRID_KEYS = ("point", "lr", "wd", "weight_decay", "val")


def run_task(spec: BatterySet, backbone: Any, config: dict[str, Any], ctx: TaskContext, task_name: str) -> TaskResult:
    """The task: one point (``ctx.grid_point``), or every point, the choice, the refit on train + val and the test."""
    check_grid_point(get_task(task_name), config, ctx.grid_point)  # before any data is read
    data = read_data(spec, config, task_name)
    points = {p.name: p for p in expand_grid(config["lrs"], config["wds"])}
    metric_name, words = METRICS[config["metric"]][1:]
    if ctx.grid_point is not None:
        row = run_point(backbone, config, ctx, data, points[ctx.grid_point], task_name)
        return TaskResult(metrics={f"val_{metric_name}": row["val"]}, extra=row, write_record=False)
    rows = [run_point(backbone, config, ctx, data, p, task_name) for p in points.values()]
    best = choose_point(rows)
    chosen = points[best["point"]]
    folder = Path(ctx.output_dir) / "final" / chosen.name
    with folder_lock(folder, "the refit"):
        model, info = finetune(
            backbone, len(data.classes), data.trainval, chosen.lr, chosen.weight_decay, config, folder, ctx,
            f"{task_name} refit {chosen.name}",
        )  # fmt: skip
    began = time.perf_counter()
    test = score(predict(model, data.test, config, backbone, ctx), data.test.labels, config["metric"],
                 len(data.classes), "test")  # fmt: skip
    test_seconds = time.perf_counter() - began
    print(f"{task_name}: {chosen.name} test {words} {100 * test['value']:.2f}%", file=sys.stderr)
    extra: dict[str, Any] = {}
    if config["metric"] == "map11":
        extra["ap"] = {c: 100 * a for c, a in zip(data.classes, test["ap"])}
    else:
        extra["samples_over"] = "test images"  # as the linear battery: intervals and paired deltas over test images
        extra["per_episode"] = {metric_name: per_image_values(test["correct"], data.test.labels, config["metric"])}
    extra.update(
        {
            "metric": config["metric"],
            "metric_name": words,
            "grid": [{k: row[k] for k in GRID_KEYS} for row in rows],
            "chosen": {k: best[k] for k in GRID_KEYS},
            "choice_rule": CHOICE_RULE,
            "grid_reused": [row["point"] for row in rows if row["reused"]],
            "steps": config["steps"],
            "batch_size": config["batch_size"],
            "steps_per_epoch": {"train": rows[0]["steps_per_epoch"], "trainval": info["steps_per_epoch"]},
            "bn_momentum_pytorch": {"train": rows[0]["bn_momentum"], "trainval": info["bn_momentum"]},
            "train_images": len(data.train),
            "val_images": len(data.val),
            "test_images": len(data.test),
            "refit_resumed_from_step": info["resumed_from_step"],
            "seconds": {
                "grid_train": round(sum(row["train_seconds"] for row in rows), 3),
                "refit_train": info["train_seconds"],
                "test": round(test_seconds, 3),
            },
            "data": data.info,
        }
    )
    return TaskResult(metrics={metric_name: 100 * test["value"]}, seeds=[config["seed"]], extra=extra)


# --- tasks -----------------------------------------------------------------------------------------


SYNTHETIC = BatterySet(
    "synthetic", "synthetic shapes", lambda root, seed: Listing("", Path("."), [], {}), "embedded",
    "train_fraction", "top1", 0,
)  # fmt: skip


def make_config(spec: BatterySet, settings: dict[str, Any], root: str | None) -> dict[str, Any]:
    """The config of ``finetune_<spec.name>`` from the family's settings (``root``: --data-root)."""
    twin = spec is SYNTHETIC
    mode = settings["finetune_batch_norm"]
    if mode not in BATCH_NORM_MODES:
        raise UserError(f"--finetune-batch-norm must be one of {', '.join(BATCH_NORM_MODES)}, got {mode!r}")
    config: dict[str, Any] = {
        "dataset": spec.name,
        "protocol": "kornblith2019-finetune",
        "steps": settings["finetune_steps"] or (TWIN["steps"] if twin else DEFAULT_STEPS),
        "batch_size": settings["finetune_batch_size"],
        "lrs": sorted(parse_values(settings["finetune_lrs"], "--finetune-lrs", allow_zero=False), reverse=True),
        "wds": sorted(parse_values(settings["finetune_wds"], "--finetune-wds", allow_zero=True)),
        "weight_decay": "wd / lr",
        "optimizer": "sgd-nesterov-0.9",
        "schedule": "cosine",
        "batch_norm": settings["finetune_batch_norm"],
        "bn_momentum": "max(1 - 10 / steps_per_epoch, 0.9)",
        "augmentation": "random-resized-crop-bicubic-hflip",
        "resize": RESIZE,
        "image_size": settings["finetune_image_size"] or (TWIN["image_size"] if twin else KORNBLITH_IMAGE_SIZE),
        "validation": spec.validation,
        "val_fraction": settings["finetune_val_fraction"] if spec.validation == "train_fraction" else None,
        "seed": settings["finetune_seed"],
        "metric": spec.metric,
    }
    if twin:
        config["synthetic"] = synthetic_setting(settings, "finetune")
    else:
        config["data_root"] = root
    return config


def make_finetune_task(spec: BatterySet) -> Task:
    twin = spec is SYNTHETIC
    task_name = f"finetune_{spec.name}"

    def config_of(args: argparse.Namespace) -> dict[str, Any]:
        return make_config(spec, settings_from_args(args, FinetuneSettings), data_root_setting(args))

    def validate(backbone: Any, config: dict[str, Any]) -> None:
        if not twin:
            read_listing(spec, config, task_name)

    def options(args: argparse.Namespace) -> dict[str, Any]:
        """How to run, not what: the same weights with any number of loader processes or checkpoints (tested)."""
        settings = settings_from_args(args, FinetuneSettings)
        workers = settings["finetune_workers"]
        return {
            "workers": workers if workers is not None else (TWIN["workers"] if twin else 8),
            "checkpoint_every": settings["finetune_checkpoint_every"],
        }

    def run(backbone: Any, config: dict[str, Any], ctx: TaskContext) -> TaskResult:
        return run_task(spec, backbone, config, ctx, task_name)

    def grid_points(config: dict[str, Any]) -> list[str]:
        return [p.name for p in expand_grid(config["lrs"], config["wds"])]

    unused = [] if twin else ["finetune_synthetic_classes", "finetune_synthetic_train", "finetune_synthetic_test"]
    if spec.validation == "creators":
        unused.append("finetune_val_fraction")
    description = (
        f"Kornblith et al. 2019 fine-tuning grid on the synthetic shapes (embedded; {TWIN['image_size']} px, "
        f"{TWIN['steps']} steps)"
        if twin
        else f"Kornblith et al. 2019 fine-tuning on {spec.title} ({METRICS[spec.metric][2]}; --data-root)"
    )
    return Task(
        name=task_name,
        family="finetune",
        description=description,
        make_config=config_of,
        run=run,
        validate=validate,
        add_arguments=add_finetune_arguments,
        primary_metric=METRICS[spec.metric][1],
        needs_data=not twin,
        unused_flags=tuple(unused),
        grid_points=grid_points,
        make_options=options,
    )


for _spec in [*BATTERY.values(), SYNTHETIC]:
    register(make_finetune_task(_spec))
