"""Many-shot linear evaluation: a multinomial logistic regression on frozen, cached features.

Tasks ``linear_stl10``, ``linear_imagenet`` and ``linear_synthetic`` (embedded shapes, nothing on
disk); ``linear_cifar10`` and ``linear_cifar100`` follow Kornblith et al. 2019 (``transfer.kornblith``,
which shares this family's flags and readers). Protocol:

1. features of every train and test image (``metadataset.features``: cached per backbone hash);
2. L2-normalised features; hold out a stratified 20% of train; fit one model per weight decay of a
   log grid on the other 80% (all grid points in one batched solve) and keep the one with the
   best held-out accuracy (ties: the stronger regularisation);
3. refit on all of train (train + held-out) with that weight decay; report test top-1 accuracy.

The solver is the one the few-shot probes use (``ringbench.logreg.solve_logreg``), and so is the
default grid. Datasets are read from their usual on-disk layouts under ``--data-root`` (the folders
torchvision extracts: CIFAR's "python version" batches, STL-10's binary files; an ImageFolder for
ImageNet), read directly (without torchvision's checksum of the official archives, so that subsets
work); nothing is ever downloaded.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, cast

import numpy as np
import torch

from metadataset.probes import DEFAULT_GRID
from metadataset.sources import ImageSet, data_digest, decode_image
from ringbench.config import add_schema_flags, settings_from_args
from ringbench.errors import UserError
from ringbench.fileio import resolved_path
from ringbench.logreg import SELECTION_MAX_ITER, SELECTION_TOL, l2_normalise, logreg_logits, solve_logreg, solver_dtype
from transfer.tasks import Task, TaskContext, TaskResult, register

DATA_ROOT_ENV = "RINGBENCH_DATA"
LAYOUTS = {  # dataset -> (folder under the data root, what it must hold)
    "cifar10": ("cifar-10-batches-py", ["data_batch_1", "data_batch_5", "test_batch"]),
    "cifar100": ("cifar-100-python", ["train", "test"]),
    "stl10": ("stl10_binary", ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"]),
    "imagenet": ("imagenet", ["train", "val"]),
}


@dataclass
class LinearSettings:
    """The linear family's settings (flags ``--linear-*``) with their defaults."""

    linear_grid: str = field(
        default=",".join(f"{g:g}" for g in DEFAULT_GRID),
        metadata={"help": "comma-separated weight decays to choose from"},
    )
    linear_path: str = field(
        default="1e-6:1e5:45",
        metadata={"help": "Kornblith tasks: the regularisation path (1/C), start:stop:num log-spaced"},
    )
    linear_val_fraction: float = field(
        default=0.2, metadata={"help": "fraction of train held out to choose the weight decay", "range": ((0,), (1,))}
    )
    linear_seed: int = field(default=0, metadata={"help": "seed of the held-out split", "range": (0, None)})
    linear_max_iter: int = field(default=1000, metadata={"help": "L-BFGS iterations per fit", "range": (1, None)})
    linear_image_size: Optional[int] = field(
        default=None, metadata={"help": "resize images to this size (default: the backbone card's)", "range": (1, None)}
    )
    linear_synthetic_classes: int = field(
        default=32, metadata={"help": "linear_synthetic: shape classes", "range": (2, None)}
    )
    linear_synthetic_train: int = field(
        default=40, metadata={"help": "linear_synthetic: train images per class", "range": (2, None)}
    )
    linear_synthetic_test: int = field(
        default=10, metadata={"help": "linear_synthetic: test images per class", "range": (1, None)}
    )


def add_linear_arguments(parser: argparse.ArgumentParser) -> None:
    """The linear family's flags (added once to the shared ``transfer/run.py`` parser)."""
    add_schema_flags(parser, LinearSettings, "linear evaluation tasks (linear_*)")


# --- datasets ------------------------------------------------------------------------------------


def data_root_setting(args: argparse.Namespace) -> str | None:
    """The data root of a task's config: ``--data-root``, else ``$RINGBENCH_DATA``, resolved (a symlink loop is
    one line); None when neither is given (the task's ``validate`` then names the layout it expects)."""
    root = getattr(args, "data_root", None) or os.environ.get(DATA_ROOT_ENV)
    return str(resolved_path(root, "--data-root")) if root else None


def synthetic_setting(settings: dict[str, Any], prefix: str) -> dict[str, int]:
    """The embedded shapes' sizes of a family's twin, from its ``--<prefix>-synthetic-*`` settings."""
    return {part: settings[f"{prefix}_synthetic_{part}"] for part in ("classes", "train", "test")}


def split_features(backbone: Any, dataset: str, config: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    """The card's frozen features of the data set's train and test splits (``metadataset.features``, cached per
    backbone hash), at the config's image size (the card's by default): what the linear and kNN tasks read."""
    image_size = config["image_size"] or backbone.default_image_size
    feats = {}
    for split in ("train", "test"):
        image_set = open_linear_split(dataset, split, config.get("data_root"), config, image_size)
        feats[split] = ctx.features(backbone, image_set, image_size, config["pooling"])
    return feats


def dataset_folder(name: str, root: str | os.PathLike | None, task: str | None = None) -> Path:
    """The dataset's folder in its usual layout, or a :class:`UserError` naming the expected path and the task
    (``linear_<name>`` by default) that needs it."""
    task = task or f"linear_{name}"
    folder_name, required = LAYOUTS[name]
    if root is None:
        raise UserError(
            f"{task} needs its data: pass --data-root (the folder holding {folder_name}/) or set "
            f"${DATA_ROOT_ENV}; nothing is downloaded"
        )
    root = Path(root).expanduser()
    candidates = [root / folder_name] + ([root] if name == "imagenet" else [])
    for folder in candidates:
        if all((folder / r).exists() for r in required):
            return folder
    raise UserError(
        f"{task}: expected {root / folder_name}/ holding {', '.join(required)} "
        f"(the torchvision / ImageFolder layout); nothing is downloaded"
    )


def _array_set(
    name: str, split: str, images: np.ndarray, labels: np.ndarray, classes: list[str], fingerprint: Any
) -> ImageSet:
    """An :class:`ImageSet` over ``uint8 (N, H, W, 3)`` images already in memory."""
    from PIL import Image

    def items() -> Iterator[tuple[int, str, Any]]:
        for i in range(len(labels)):
            yield int(labels[i]), f"{split}/{i}", (lambda i=i: Image.fromarray(images[i]))

    return ImageSet(
        name=name,
        split=split,
        class_names=classes,
        items=items,
        counts=np.bincount(labels, minlength=len(classes)).astype(np.int64),
        fingerprint=data_digest(name, split, fingerprint),
    )


def _listing(folder: Path) -> list:
    return sorted([str(p.relative_to(folder)), p.stat().st_size] for p in folder.iterdir() if p.is_file())


def read_cifar(folder: Path, name: str, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """CIFAR-10/100 "python version" (pretraining's reader): ``uint8 (N, 32, 32, 3)``, labels, class names."""
    from ringbench.readers import cifar, cifar_class_names

    num_classes = 10 if name == "cifar10" else 100
    ds = cifar(folder, split, num_classes)
    return ds.images, np.asarray(ds.targets, dtype=np.int64), cifar_class_names(folder, num_classes)


def read_stl10(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """STL-10 binary (pretraining's reader): ``uint8 (N, 96, 96, 3)``, labels 0..9, class names."""
    from ringbench.readers import ArrayDataset, stl10

    ds = cast(ArrayDataset, stl10(folder, split))  # one split ('train' or 'test'): a single array
    names = folder / "class_names.txt"
    classes = names.read_text().split() if names.exists() else [str(c) for c in range(10)]
    return np.ascontiguousarray(ds.images), np.asarray(ds.targets, dtype=np.int64), classes


def open_linear_split(name: str, split: str, root: str | None, config: dict[str, Any], image_size: int) -> ImageSet:
    """The ``train`` or ``test`` images of one linear-evaluation dataset."""
    if name == "synthetic":
        from ringbench.shapes import SyntheticShapes

        per_class = config["synthetic"]["train" if split == "train" else "test"]
        ds = SyntheticShapes(
            num_classes=config["synthetic"]["classes"],
            images_per_class=per_class,
            image_size=image_size,
            seed=0,
            split=split,
        )

        def items() -> Iterator[tuple[int, str, Any]]:
            for i in range(len(ds)):
                yield ds.targets[i], f"{split}/{i}", (lambda i=i: ds[i][0])

        return ImageSet(
            name="linear_synthetic",
            split=split,
            class_names=ds.classes,
            items=items,
            counts=np.bincount(ds.targets, minlength=ds.num_classes).astype(np.int64),
            fingerprint=data_digest("synthetic", split, config["synthetic"], image_size),
        )
    folder = dataset_folder(name, root)
    if name in ("cifar10", "cifar100"):
        return _array_set(name, split, *read_cifar(folder, name, split), _listing(folder))
    if name == "stl10":
        return _array_set(name, split, *read_stl10(folder, split), _listing(folder))
    # imagenet: ImageFolder train/ and val/
    import torchvision

    ds = torchvision.datasets.ImageFolder(str(folder / ("train" if split == "train" else "val")))

    def folder_items() -> Iterator[tuple[int, str, Any]]:
        for path, label in ds.samples:
            yield label, os.path.relpath(path, folder), (lambda path=path: decode_image(Path(path).read_bytes()))

    sizes = [[os.path.relpath(p, folder), os.path.getsize(p)] for p, _ in ds.samples]
    return ImageSet(
        name="imagenet",
        split=split,
        class_names=list(ds.classes),
        items=folder_items,
        counts=np.bincount(ds.targets, minlength=len(ds.classes)).astype(np.int64),
        fingerprint=data_digest("imagenet", split, sizes),
    )


# --- the protocol ----------------------------------------------------------------------------------


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of a stratified held-out subset: ``round(fraction * n_c)`` of each class
    (at least one when the class has two or more images)."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        k = round(fraction * len(members))
        k = min(max(k, 1 if len(members) > 1 else 0), len(members) - 1)
        held[members[:k]] = True
    return held


def fit_and_score(
    train_x: np.ndarray,
    train_y: np.ndarray,
    eval_x: np.ndarray,
    eval_y: np.ndarray,
    grid: list[float],
    num_classes: int,
    device: str,
    max_iter: int,
    tol: float = 1e-6,
) -> np.ndarray:
    """Accuracy on ``eval`` of one model per weight decay in ``grid`` (one batched solve)."""
    dtype = solver_dtype(device)
    x = l2_normalise(torch.tensor(np.asarray(train_x), dtype=dtype, device=device))
    ex = l2_normalise(torch.tensor(np.asarray(eval_x), dtype=dtype, device=device))
    # centre and rotate to the principal axes of train: exact (the bias absorbs the shift, the
    # penalty is rotation invariant); uncorrelated coordinates suit the solver's preconditioner
    mean = x.mean(0)
    _, axes = torch.linalg.eigh((x - mean).T @ (x - mean))
    x, ex = ((x - mean) @ axes)[None], ((ex - mean) @ axes)[None]
    y = torch.as_tensor(train_y, dtype=torch.long, device=device)[None]
    lam = torch.tensor([grid], dtype=dtype, device=device)
    weights = torch.ones(1, len(grid), len(train_y), dtype=dtype, device=device)
    class_mask = torch.ones(1, num_classes, dtype=torch.bool, device=device)
    w, b = solve_logreg(x, y, weights, class_mask, lam, max_iter=max_iter, tol=tol)
    pred = logreg_logits(ex, w, b)[0].argmax(-1).cpu().numpy()  # (N, P)
    return (pred == np.asarray(eval_y)[:, None]).mean(0)


def linear_evaluation(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    num_classes: int,
    grid: list[float],
    val_fraction: float = 0.2,
    seed: int = 0,
    device: str = "cpu",
    max_iter: int = 1000,
) -> dict[str, Any]:
    """The protocol of the module docstring; returns test accuracy, the chosen weight decay and
    the held-out accuracy of every grid point."""
    held = stratified_holdout(train_y, val_fraction, seed)
    # ranking the grid needs less precision than the final fit (as in the few-shot probe's CV)
    val_acc = fit_and_score(
        train_x[~held],
        train_y[~held],
        train_x[held],
        train_y[held],
        grid,
        num_classes,
        device,
        min(max_iter, 4 * SELECTION_MAX_ITER),
        SELECTION_TOL,
    )
    best = max(range(len(grid)), key=lambda i: (val_acc[i], grid[i]))
    test_acc = fit_and_score(train_x, train_y, test_x, test_y, [grid[best]], num_classes, device, max_iter)[0]
    return {
        "test_acc": float(test_acc),
        "weight_decay": float(grid[best]),
        "val_acc": {f"{g:g}": float(a) for g, a in zip(grid, val_acc)},
    }


# --- tasks -----------------------------------------------------------------------------------------


def _parse_grid(text: str) -> list[float]:
    try:
        grid = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--linear-grid must be comma-separated numbers, got {text!r}") from None
    if not grid or any(not 0 < g < float("inf") for g in grid):
        raise UserError(f"--linear-grid needs positive weight decays, got {text!r}")
    return sorted(grid)


def make_linear_task(dataset: str, description: str) -> Task:
    def make_config(args: argparse.Namespace) -> dict[str, Any]:
        settings = settings_from_args(args, LinearSettings)
        config = {
            "dataset": dataset,
            "grid": _parse_grid(settings["linear_grid"]),
            "val_fraction": settings["linear_val_fraction"],
            "seed": settings["linear_seed"],
            "max_iter": settings["linear_max_iter"],
            "image_size": settings["linear_image_size"],
            "pooling": "avg",
            "probe": "logreg",
            "features": "l2-normalised",
        }
        if dataset == "synthetic":
            config["synthetic"] = synthetic_setting(settings, "linear")
        else:
            config["data_root"] = data_root_setting(args)
        return config

    def validate(backbone: Any, config: dict[str, Any]) -> None:
        if dataset != "synthetic":
            dataset_folder(dataset, config["data_root"])

    def run(backbone: Any, config: dict[str, Any], ctx: TaskContext) -> TaskResult:
        feats = split_features(backbone, dataset, config, ctx)
        num_classes = feats["train"].num_classes
        start = time.perf_counter()
        out = linear_evaluation(
            np.asarray(feats["train"].features),
            feats["train"].labels,
            np.asarray(feats["test"].features),
            feats["test"].labels,
            num_classes,
            config["grid"],
            config["val_fraction"],
            config["seed"],
            ctx.device,
            config["max_iter"],
        )
        print(
            f"linear_{dataset}: test accuracy {100 * out['test_acc']:.2f}% (weight decay {out['weight_decay']:g})",
            file=sys.stderr,
        )
        extra = {
            "weight_decay": out["weight_decay"],
            "val_acc": out["val_acc"],
            "train_images": len(feats["train"].labels),
            "test_images": len(feats["test"].labels),
            "skipped_images": {s: len(f.skipped) for s, f in feats.items()},
            "feature_cache": {s: {"hit": f.from_cache, "path": str(f.path)} for s, f in feats.items()},
            "solve_seconds": round(time.perf_counter() - start, 3),
        }
        return TaskResult(metrics={"acc": 100 * out["test_acc"]}, seeds=[config["seed"]], extra=extra)

    return Task(
        name=f"linear_{dataset}",
        family="linear",
        description=description,
        make_config=make_config,
        run=run,
        validate=validate,
        add_arguments=add_linear_arguments,
        primary_metric="acc",
        needs_data=dataset != "synthetic",
        unused_flags=("linear_path",)
        if dataset == "synthetic"
        else ("linear_path", "linear_synthetic_classes", "linear_synthetic_train", "linear_synthetic_test"),
    )


for _name, _text in (
    ("stl10", "linear evaluation on STL-10 labelled train/test (torchvision layout under --data-root)"),
    ("imagenet", "linear evaluation on ImageNet (ImageFolder train/ and val/ under --data-root)"),
    ("synthetic", "linear evaluation on the synthetic shapes (embedded)"),
):
    register(make_linear_task(_name, _text))
