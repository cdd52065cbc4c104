"""Fine-tuning's training and scoring (:mod:`transfer.finetune`'s tasks use them): the data pipeline (ssl-transfer's
``finetune.py`` augmentation and test transform, with every random draw a function of the seed and the step), the
model (the card's backbone and a fresh linear head), the training loop with its checkpoints and resume, and the
metrics on validation and test. The protocol: docs/finetune.md.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ringbench.errors import UserError
from ringbench.fileio import atomic_save
from transfer.finetune_protocol import (
    MOMENTUM,
    augment_rng,
    batch_indices,
    bn_momentum,
    cosine_lr,
    crop_box,
    steps_per_epoch,
)
from transfer.kornblith_protocol import METRICS, RESIZE
from transfer.tasks import TaskContext

CHECKPOINT_FORMAT = "ringbench-finetune-checkpoint-1"
FORCE_HINT = "rerun with --force to train it again from the card"
LOG_EVERY = 10  # steps between TensorBoard points (each reads the loss back from the device)
CHECKPOINT_EVERY = 500  # steps between checkpoints unless --finetune-checkpoint-every (ctx.options) says otherwise


@dataclass
class Pool:
    """Images and their labels: ``load(i)`` a PIL image, ``labels[i]`` its class (or devkit row, multi-label)."""

    load: Callable[[int], Any]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> Pool:
        indices = np.asarray(indices)
        return Pool(lambda i: self.load(int(indices[i])), self.labels[indices])

    def __add__(self, other: Pool) -> Pool:
        n = len(self)
        return Pool(lambda i: self.load(i) if i < n else other.load(i - n), np.concatenate([self.labels, other.labels]))


def pool_of(split: Any, in_memory: bool = False) -> Pool:
    """A :class:`transfer.battery_data.Split` as a pool (``in_memory``: every image loaded once, for the twin)."""
    if in_memory:
        images = [split.load(i) for i in range(len(split))]
        return Pool(images.__getitem__, np.asarray(split.labels))
    return Pool(split.load, np.asarray(split.labels))


def _to_tensor(image: Any, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    return (array - mean[:, None, None]) / std[:, None, None]


class TrainBatches(torch.utils.data.Dataset):
    """Item ``step``: that step's images (:func:`~transfer.finetune_protocol.batch_indices`), each randomly
    resized-cropped (bicubic) and flipped with its own generator (:func:`~transfer.finetune_protocol.augment_rng`),
    normalised with the card's mean and std; and their labels. A function of the step alone."""

    def __init__(self, pool: Pool, batch_size: int, seed: int, image_size: int, mean: Any, std: Any) -> None:
        self.pool, self.batch_size, self.seed, self.size = pool, batch_size, seed, image_size
        self.mean, self.std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        indices = batch_indices(len(self.pool), self.batch_size, self.seed, step)
        images = []
        for position, i in enumerate(indices):
            rng = augment_rng(self.seed, step, position)
            image = self.pool.load(int(i)).convert("RGB")
            left, top, w, h = crop_box(image.width, image.height, rng)
            image = image.crop((left, top, left + w, top + h)).resize((self.size, self.size), Image.BICUBIC)  # type: ignore[attr-defined]
            if rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)  # type: ignore[attr-defined]
            images.append(_to_tensor(image, self.mean, self.std))
        return torch.stack(images), torch.as_tensor(self.pool.labels[indices])


class TestImages(torch.utils.data.Dataset):
    """The test transform: shorter side to the image size (bicubic), the centre crop, the card's mean and std."""

    def __init__(self, pool: Pool, image_size: int, mean: Any, std: Any) -> None:
        self.pool, self.size = pool, image_size
        self.mean, self.std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.pool)

    def __getitem__(self, i: int) -> torch.Tensor:
        from metadataset.features import preprocess

        return preprocess(self.pool.load(i), self.size, self.mean, self.std, RESIZE)


# --- training --------------------------------------------------------------------------------------


class Classifier(nn.Module):
    """The card's backbone (pooled features) and a fresh linear head."""

    def __init__(self, backbone: nn.Module, feature_dim: int, outputs: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_classifier(backbone: Any, outputs: int, seed: int) -> Classifier:
    """The card's weights and a head initialised (PyTorch's default for ``nn.Linear``) from ``seed``.

    A single-stream card's backbone is made on the meta device and given copies of the card's tensors (the same
    module as ``backbone.build_model``, without initialising weights that are overwritten at once)."""
    if backbone.streams:
        body = backbone.build_model("cpu")
    else:
        from ringbench.backbones import create_backbone

        with torch.device("meta"):
            body = create_backbone(backbone.arch, backbone.stem)
        body.load_state_dict({k: v.clone() for k, v in backbone.state_dict.items()}, strict=True, assign=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Classifier(body, int(body.feature_dim), outputs)


def set_train_mode(model: nn.Module, batch_norm: str) -> None:
    model.train()
    if batch_norm == "frozen":
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def _criterion(multilabel: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if multilabel:  # ssl-transfer: BCEWithLogitsLoss on target == 1 (difficult images count as negatives)
        return lambda out, y: nn.functional.binary_cross_entropy_with_logits(out, (y == 1).to(out.dtype))
    return lambda out, y: nn.functional.cross_entropy(out, y.long())


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint (``weights_only``); anything unreadable is one line naming ``--force``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: zipfile, pickle and runtime errors alike
        raise UserError(f"{path}: damaged fine-tuning checkpoint ({type(exc).__name__}); {FORCE_HINT}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a fine-tuning checkpoint of this version; {FORCE_HINT}")
    return state


def finetune(
    backbone: Any,
    outputs: int,
    pool: Pool,
    lr: float,
    weight_decay: float,
    config: dict[str, Any],
    folder: Path,
    ctx: TaskContext,
    desc: str,
    after_step: Callable[[int], None] | None = None,
) -> tuple[Classifier, dict[str, Any]]:
    """Train the card's backbone and a fresh head on ``pool`` for ``config["steps"]`` steps (the protocol of the
    module docstring), checkpointing into ``folder/checkpoint.pth``; continue from that checkpoint when there is
    one (``ctx.force``: start again). Returns the model and what to record about the training."""
    device = torch.device(ctx.device)
    cuda = device.type == "cuda"
    total, batch = config["steps"], config["batch_size"]
    model = build_classifier(backbone, outputs, config["seed"])
    per_epoch = steps_per_epoch(len(pool), batch)
    momentum = bn_momentum(per_epoch)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum
    meta = {"lr": lr, "weight_decay": weight_decay, "steps": total, "images": len(pool), "batch_size": batch}
    path = folder / "checkpoint.pth"
    start = 0
    state: dict[str, Any] | None = None
    if ctx.force:
        path.unlink(missing_ok=True)
    elif path.exists():
        state = read_checkpoint(path)
        if state.get("meta") != meta:
            raise UserError(f"{path}: a checkpoint of another training ({state.get('meta')}); {FORCE_HINT}")
        try:
            model.load_state_dict(state["model"])
        except (KeyError, RuntimeError):
            raise UserError(f"{path}: not a checkpoint of this model; {FORCE_HINT}") from None
        start = int(state["step"])
    model.to(device)
    if cuda:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, nesterov=True, weight_decay=weight_decay)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        if cuda and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
    criterion = _criterion(np.asarray(pool.labels).ndim == 2)
    began = time.perf_counter()

    def save(step: int) -> None:
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "meta": meta,
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": torch.get_rng_state(),
        }
        if cuda:
            checkpoint["cuda_rng"] = torch.cuda.get_rng_state(device)
        atomic_save(checkpoint, path)

    if start < total:
        from tqdm import tqdm

        set_train_mode(model, config["batch_norm"])
        batches = TrainBatches(pool, batch, config["seed"], config["image_size"], backbone.mean, backbone.std)
        loader = torch.utils.data.DataLoader(
            batches,
            batch_size=None,
            sampler=range(start, total),
            num_workers=ctx.options.get("workers", 0),
            pin_memory=cuda,
        )
        bar = tqdm(total=total, initial=start, desc=desc, file=sys.stderr, disable=ctx.debug, leave=False)
        writer = None
        if ctx.tensorboard:  # beside the checkpoint; a resumed run purges the points past it (no doubled curve)
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(folder / "tensorboard"), purge_step=start + 1 if start else None)
        for step, (x, y) in zip(range(start, total), loader):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(lr, step, total)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                out = model(x)
            loss = criterion(out.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done = step + 1
            if writer is not None and (done % LOG_EVERY == 0 or done == total):
                writer.add_scalar("train/loss", float(loss), done)
                writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], done)
            if done % ctx.options.get("checkpoint_every", CHECKPOINT_EVERY) == 0 or done == total:
                if writer is not None:
                    writer.flush()  # the events up to the checkpoint are on disk with it
                save(done)
            bar.update(1)
            if after_step is not None:
                after_step(done)
        bar.close()
        if writer is not None:
            writer.close()
    info = {
        "steps_per_epoch": per_epoch,
        "bn_momentum": momentum,
        "resumed_from_step": start,
        "train_seconds": round(time.perf_counter() - began, 3),
    }
    return model, info


def predict(model: nn.Module, pool: Pool, config: dict[str, Any], backbone: Any, ctx: TaskContext) -> np.ndarray:
    """The model's outputs ``(N, outputs)`` on ``pool`` under the test transform (eval mode)."""
    device = torch.device(ctx.device)
    cuda = device.type == "cuda"
    loader = torch.utils.data.DataLoader(
        TestImages(pool, config["image_size"], backbone.mean, backbone.std),
        batch_size=config["batch_size"],
        num_workers=ctx.options.get("workers", 0),
        pin_memory=cuda,
    )
    model.eval()
    outputs = []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        for x in loader:
            x = x.to(device, non_blocking=True)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            outputs.append(model(x).float().cpu())
    return torch.cat(outputs).double().numpy()


def score(outputs: np.ndarray, labels: np.ndarray, metric: str, classes: int, split: str) -> dict[str, Any]:
    """The metric (a fraction) of ``outputs``; single-label: each image's correctness too; multi-label: the per-class
    APs (validation: over the classes with a positive image; test: every class needs one, as the devkit)."""
    from transfer.voc07 import POSITIVE, voc11_average_precision, voc11_mean_average_precision

    if metric != "map11":
        pred = outputs.argmax(1)
        return {"value": METRICS[metric][0](pred, labels, classes), "correct": pred == labels}
    if split == "val":
        kept = [c for c in range(labels.shape[1]) if (labels[:, c] == POSITIVE).any()]
        if not kept:
            raise UserError("finetune_voc2007: no class has a positive validation image")
        aps = [voc11_average_precision(outputs[:, c], labels[:, c]) for c in kept]
        return {"value": float(np.mean(aps)), "classes": len(kept)}
    missing = [c for c in range(labels.shape[1]) if not (labels[:, c] == POSITIVE).any()]
    if missing:
        raise UserError(f"finetune_voc2007: classes {missing} have no positive test image (the devkit's AP needs one)")
    value, aps = voc11_mean_average_precision(outputs, labels)
    return {"value": value, "ap": aps}
