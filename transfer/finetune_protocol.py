"""The fine-tuning protocol's pure parts: the grid, the choice rule, the schedules, the data order and the
training augmentation's random draws (Kornblith et al. 2019, "Do Better ImageNet Models Transfer Better?",
CVPR, its fine-tuning setup; as implemented in ``linusericsson/ssl-transfer``'s
``finetune.py``). The tasks that use them are :mod:`transfer.finetune`; the protocol is docs/finetune.md.

Everything here is a function of its arguments (no global random state), so that a run killed and started
again draws exactly what an uninterrupted run draws.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ringbench.errors import UserError

# ssl-transfer finetune.py: lr = logspace(-4, -1, 4), wd = {0} U logspace(-6, -3, 4), each point (lr, wd / lr)
DEFAULT_LRS = tuple(float(v) for v in np.logspace(-4, -1, 4))
DEFAULT_WDS = (0.0, *(float(v) for v in np.logspace(-6, -3, 4)))
DEFAULT_STEPS = 5000  # ssl-transfer's --steps
DEFAULT_BATCH = 64  # ssl-transfer's --batch-size
MOMENTUM = 0.9  # SGD, Nesterov
CROP_SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop's defaults, as ssl-transfer uses it
CROP_RATIO = (3 / 4, 4 / 3)
CHOICE_RULE = (
    "the best validation metric; ties: the first in ssl-transfer's order (the larger learning rate, then the "
    "smaller weight decay), as its strict '>' over that order keeps the first"
)


@dataclass(frozen=True)
class GridPoint:
    """One point: the learning rate, the weight decay as listed (``wd``) and as SGD gets it (``wd / lr``)."""

    lr: float
    wd: float

    @property
    def weight_decay(self) -> float:
        """SGD's weight decay: the listed value divided by the learning rate (ssl-transfer: ``(l, w / l)``)."""
        return self.wd / self.lr

    @property
    def name(self) -> str:
        return point_name(self.lr, self.wd)


def point_name(lr: float, wd: float) -> str:
    """A point's stable name, ``lr0.01_wd1e-05`` (``%g`` of the listed values)."""
    return f"lr{lr:g}_wd{wd:g}"


def parse_values(text: str, flag: str, allow_zero: bool) -> list[float]:
    """Comma-separated numbers of ``--finetune-lrs`` / ``--finetune-wds`` (positive; zero too for the wds)."""
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    low_ok = (lambda v: v >= 0) if allow_zero else (lambda v: v > 0)
    if not values or not all(low_ok(v) and math.isfinite(v) for v in values):
        raise UserError(f"{flag} needs {'non-negative' if allow_zero else 'positive'} finite numbers, got {text!r}")
    names = [f"{v:g}" for v in values]
    if len(set(names)) != len(names):
        raise UserError(f"{flag}: a value is listed twice (as %g: {', '.join(names)})")
    return values


def expand_grid(lrs: Sequence[float], wds: Sequence[float]) -> list[GridPoint]:
    """Every ``(lr, wd)``, in ssl-transfer's order: learning rates from the largest, weight decays from the smallest."""
    return [GridPoint(float(lr), float(wd)) for lr in sorted(lrs, reverse=True) for wd in sorted(wds)]


def choose_point(table: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The row of ``table`` (rows with ``lr``, ``wd`` and ``val``) with the best ``val``; ties: :data:`CHOICE_RULE`."""
    if not table:
        raise ValueError("no grid point to choose from")
    return min(table, key=lambda row: (-float(row["val"]), -float(row["lr"]), float(row["wd"])))


def bn_momentum(steps_per_epoch: int) -> float:
    """PyTorch's BatchNorm ``momentum`` for Kornblith et al.'s ``max(1 - 10 / s, 0.9)``.

    Kornblith et al. give the decay ``d`` of TensorFlow's moving average, ``running = d * running + (1 - d) *
    batch``; PyTorch's ``momentum`` is the weight of the batch, ``running = (1 - m) * running + m * batch``, so
    ``m = 1 - d = min(10 / s, 0.1)``: 0.1 (PyTorch's default) for up to 100 steps per epoch, smaller above."""
    if steps_per_epoch < 1:
        raise ValueError("steps per epoch must be >= 1")
    return min(10.0 / steps_per_epoch, 0.1)  # = 1 - max(1 - 10 / s, 0.9), without 1 - 0.9's rounding


def steps_per_epoch(images: int, batch_size: int) -> int:
    """Batches in one pass over ``images`` (the last one may be smaller, as ssl-transfer's loaders keep it)."""
    return max(1, math.ceil(images / batch_size))


def cosine_lr(base: float, step: int, total: int) -> float:
    """The learning rate of step ``step`` (0-based) of ``total``: PyTorch's ``CosineAnnealingLR(T_max=total)``
    with ``eta_min = 0`` as ssl-transfer uses it (one scheduler step per SGD step), ``base (1 + cos(pi t / T)) / 2``."""
    return base * (1.0 + math.cos(math.pi * step / total)) / 2.0


def epoch_order(images: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the images in epoch ``epoch``: a permutation seeded by ``(seed, epoch)``."""
    return np.random.default_rng([seed, epoch, 0]).permutation(images)


def batch_indices(images: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The images of step ``step``: its epoch's order cut into batches of ``batch_size`` (the last one of an
    epoch smaller), epochs one after another, as a shuffling loader iterated until the step budget is spent."""
    per_epoch = steps_per_epoch(images, batch_size)
    epoch, within = divmod(step, per_epoch)
    return epoch_order(images, seed, epoch)[within * batch_size : (within + 1) * batch_size]


def crop_box(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A random-resized-crop box ``(left, top, width, height)``: the area a share of the image drawn uniformly
    from :data:`CROP_SCALE`, the aspect ratio log-uniform in :data:`CROP_RATIO`, up to ten tries; else the
    central crop at the nearest allowed ratio (the rule of torchvision's ``RandomResizedCrop``, whose draws come
    from the global generator; here they come from ``rng``)."""
    area = width * height
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif in_ratio > CROP_RATIO[1]:
        h, w = height, round(height * CROP_RATIO[1])
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def augment_rng(seed: int, step: int, position: int) -> np.random.Generator:
    """The generator of the augmentation of the ``position``-th image of step ``step``."""
    return np.random.default_rng([seed, step, position, 1])
