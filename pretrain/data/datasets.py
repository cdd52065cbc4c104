"""Pretraining data: the data sets a ``data`` config section names (read by :mod:`ringbench.readers`,
never downloading) and the embedded synthetic default, with what the trainer and the card need to know."""

from __future__ import annotations

from collections.abc import Mapping, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from ringbench.card import IMAGENET_MEAN, IMAGENET_STD
from ringbench.errors import UserError
from ringbench.readers import cifar, image_folder, stl10

if TYPE_CHECKING:
    from ringbench.shapes import SyntheticShapes


@dataclass(frozen=True)
class DataSpec:
    """What the trainer and the card need to know about a dataset."""

    name: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_classes: int


CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
STL10_STATS = ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713))


def synthetic(cfg: Mapping[str, Any], split: str) -> SyntheticShapes:
    from ringbench.shapes import SyntheticShapes

    images = cfg["synthetic_images_per_class"]
    if split != "train":
        images = max(1, images // 4)
    return SyntheticShapes(
        num_classes=cfg["synthetic_classes"],
        images_per_class=images,
        image_size=cfg["synthetic_image_size"],
        seed=cfg["synthetic_seed"],
        split="train" if split == "train" else "val",
    )


Triple = tuple[float, float, float]


def channel_stats(dataset: torch.utils.data.Dataset, count: int = 256) -> tuple[Triple, Triple]:
    """Per-channel mean and std (0-1 units) over the first ``count`` images."""
    size = len(cast(Sized, dataset))
    pixels = np.stack([np.asarray(dataset[i][0], dtype=np.float64) / 255.0 for i in range(min(count, size))])
    flat = pixels.reshape(-1, 3)  # three channels, so three means and three stds
    mean = cast(Triple, tuple(round(float(v), 4) for v in flat.mean(0)))
    std = cast(Triple, tuple(round(max(float(v), 1e-3), 4) for v in flat.std(0)))
    return mean, std


def open_splits(
    data_cfg: Mapping[str, Any],
) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset, torch.utils.data.Dataset, DataSpec]:
    """``(pretraining set, kNN memory set, kNN held-out query set, spec)`` for a ``data`` config section.

    The kNN sets are labelled: the training split (memory) and the test / validation split (queries).
    """
    name, root = data_cfg["name"], data_cfg["root"]
    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    if name == "synthetic":
        train, test = synthetic(data_cfg, "train"), synthetic(data_cfg, "val")
        mean, std = channel_stats(train)
        spec = DataSpec(name, data_cfg["synthetic_image_size"], mean, std, train.num_classes)
        return train, train, test, spec
    if root is None or not Path(root).exists():
        raise UserError(f"dataset {name!r}: data root {root!r} does not exist (set --data-root)")
    if name in ("cifar10", "cifar100"):
        classes = 10 if name == "cifar10" else 100
        stats = CIFAR10_STATS if classes == 10 else CIFAR100_STATS
        train, test = cifar(root, "train", classes), cifar(root, "test", classes)
        return train, train, test, DataSpec(name, 32, *stats, classes)
    if name == "stl10":
        labelled = stl10(root, "train")
        pretraining = stl10(root, data_cfg.get("stl10_split", "train+unlabeled"))
        return pretraining, labelled, stl10(root, "test"), DataSpec(name, 96, *STL10_STATS, 10)
    if name == "imagefolder":
        train_folder, val_folder = image_folder(root, "train"), image_folder(root, "val")
        classes = len(train_folder.classes)
        return train_folder, train_folder, val_folder, DataSpec(name, 224, IMAGENET_MEAN, IMAGENET_STD, classes)
    raise UserError(f"unknown dataset {name!r}")
