"""The pretraining loop's hooks (:class:`pretrain.loop.HookBase`), in the order :mod:`pretrain.train`
registers them: :class:`ProgressBar`, :class:`Checkpointer`, :class:`KnnMonitor`, :class:`JsonlLog`,
:class:`TensorBoard` (unless turned off), :class:`CardWriter`. That order is the crash guarantee: after
an epoch its checkpoint is written first, then the monitor runs (and the checkpoint is written again
with its result), then the log line; so a monitor that fails or is killed loses no training, and a
resumed run runs it first. Only process 0 writes files or runs the monitor.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from pretrain import distributed as dist
from pretrain.checkpoint import checkpoint_state, plain_config, save_checkpoint
from pretrain.data.loaders import DataBundle
from pretrain.knn import evaluate_knn, monitor_due
from pretrain.loop import HookBase
from pretrain.methods import Method
from ringbench.card import BackboneCard, make_meta, save_card
from ringbench.fileio import append_line, atomic_write_text

log = logging.getLogger(__name__)

LOG_NAME = "log.jsonl"


class ProgressBar(HookBase):
    """A tqdm bar per epoch on process 0 (loss and images per second)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def before_epoch(self) -> None:
        t = self.trainer
        if self.enabled and dist.is_main():
            from tqdm import tqdm

            self.bar = tqdm(total=t.steps, desc=f"epoch {t.epoch + 1}/{t.epochs}", dynamic_ncols=True, leave=False)

    def after_step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{self.trainer.logs['loss']:.4f}", img_s=f"{self.trainer.images_per_s:.1f}")

    def after_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Checkpointer(HookBase):
    """Writes the training state to ``path`` atomically after every epoch, and when :meth:`save` is
    asked again (the monitor's result), so a killed run resumes from its last finished epoch."""

    def __init__(self, path: Path, save: Callable[[Path, dict], None] = save_checkpoint) -> None:
        self.path, self._save = path, save

    def save(self) -> None:
        t = self.trainer
        if dist.is_main():
            state = checkpoint_state(t.cfg, t.completed_epochs, t.method, t.optimizer, t.scaler, t.history)
            self._save(self.path, state)

    def after_epoch(self) -> None:
        self.save()


class KnnMonitor(HookBase):
    """The kNN top-1 on the held-out split (``knn_top1`` in the epoch's record) when
    :func:`~pretrain.knn.monitor_due`, after the epoch's checkpoint; then saves it with ``checkpointer``.
    A resumed run whose last epoch's monitor was due and did not finish runs it first."""

    def __init__(self, checkpointer: Checkpointer, evaluate: Callable[..., float] = evaluate_knn) -> None:
        self.checkpointer, self.evaluate = checkpointer, evaluate

    def before_train(self) -> None:
        t = self.trainer
        if t.history and monitor_due(t.cfg, t.completed_epochs) and "knn_top1" not in t.history[-1]:
            self._run()  # killed during the monitor, after the epoch's checkpoint

    def after_epoch(self) -> None:
        if monitor_due(self.trainer.cfg, self.trainer.completed_epochs):
            self._run()

    def _run(self) -> None:
        t = self.trainer
        if dist.is_main():
            t.history[-1]["knn_top1"] = self.evaluate(t.method, t.data, t.cfg, t.device)
            self.checkpointer.save()


class JsonlLog(HookBase):
    """``log.jsonl``: a line per ``train.log_every`` steps and per epoch, each appended whole. A new
    run starts a new log; a resumed one rebuilds it from the checkpoint's history (:func:`rebuild_log`)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def before_train(self) -> None:
        if not dist.is_main():
            return
        if self.trainer.resumed:
            rebuild_log(self.path, self.trainer.history)
        else:
            self.path.unlink(missing_ok=True)

    def after_step(self) -> None:
        t = self.trainer
        if dist.is_main() and (t.step + 1) % t.cfg["train"]["log_every"] == 0:
            line = {"epoch": t.epoch + 1, "step": t.step + 1, "lr": t.lr, "w_outer": t.method.w_outer}
            _append(self.path, {**line, "images_per_s": round(t.images_per_s, 2), **t.logs})

    def after_epoch(self) -> None:
        t = self.trainer
        if dist.is_main():
            _append(self.path, t.history[-1])
            log.info("epoch %d/%d: %s", t.epoch + 1, t.epochs, json.dumps(t.history[-1]))


def _append(path: Path, record: Mapping[str, Any]) -> None:
    append_line(path, json.dumps(record))  # whole line or nothing, even on a full disk


def rebuild_log(path: Path, history: list[dict[str, Any]]) -> None:
    """The log of a resumed run: each checkpointed epoch's step lines, then its epoch line (from the
    checkpoint's history); the lines of the epoch that was killed are dropped, so none repeats."""
    steps: dict[int, list[str]] = {}
    if path.is_file():
        for line in path.read_bytes().decode("utf-8", "replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut by the kill
            if isinstance(entry, dict) and "step" in entry and isinstance(entry.get("epoch"), int):
                steps.setdefault(entry["epoch"], []).append(line)
    lines = [line for record in history for line in (*steps.get(record["epoch"], ()), json.dumps(record))]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


class TensorBoard(HookBase):
    """TensorBoard event files beside ``log.jsonl`` (process 0): per logged step the loss, learning rate, the
    ring's kept share of the negatives (``w_outer`` (1 - ``w_inner``)), images per second and, on CUDA, the
    peak GPU memory; per epoch the mean loss and the kNN top-1. A resumed run purges the events past its
    checkpoint, so the curves do not double back."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.writer: Any = None

    def before_train(self) -> None:
        t = self.trainer
        if dist.is_main():
            from torch.utils.tensorboard import SummaryWriter

            purge = self._steps_before(t.completed_epochs) + 1 if t.resumed else None
            self.writer = SummaryWriter(log_dir=str(self.folder), purge_step=purge)

    def _steps_before(self, epoch: int) -> int:
        """Optimiser steps before ``epoch``: the x axis of every curve (each epoch has as many steps)."""
        t = self.trainer
        per_epoch = len(t.data.train) // t.cfg["train"]["batch_size"]
        cap = t.cfg["train"]["max_steps_per_epoch"]
        return epoch * (per_epoch if cap is None else min(per_epoch, cap))

    def after_step(self) -> None:
        t = self.trainer
        if self.writer is None or (t.step + 1) % t.cfg["train"]["log_every"]:
            return
        step = self._steps_before(t.epoch) + t.step + 1
        scalars = {"train/loss": t.logs["loss"], "train/lr": t.lr, "train/images_per_s": t.images_per_s}
        if t.cfg["loss"]["name"] == "ring":
            scalars["ring/kept_share"] = t.method.w_outer * (1 - t.cfg["loss"]["w_inner"])
        if t.device.type == "cuda":
            scalars["gpu/max_memory_gib"] = torch.cuda.max_memory_allocated(t.device) / 2**30
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def after_epoch(self) -> None:
        t = self.trainer
        if self.writer is None:
            return
        step = self._steps_before(t.epoch + 1)
        record = t.history[-1]
        self.writer.add_scalar("epoch/loss", record["loss"], step)
        if "knn_top1" in record:
            self.writer.add_scalar("epoch/knn_top1", record["knn_top1"], step)
        self.writer.flush()

    def after_train(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class CardWriter(HookBase):
    """After the last epoch, the backbone card to ``out`` (atomically; none if ``out`` is None)."""

    def __init__(self, out: str | Path | None) -> None:
        self.out = out

    def after_train(self) -> None:
        t = self.trainer
        if self.out is not None and dist.is_main():
            t.card_path = save_card(make_card(t.method, t.cfg, t.data, t.history), self.out)
            log.info("wrote backbone card %s", t.card_path)


def make_card(method: Method, cfg: Mapping[str, Any], data: DataBundle, history: list[dict]) -> BackboneCard:
    """The backbone card of a trained method (the meta the transfer stage reads)."""
    streams = method.card_streams()
    state = {
        (f"{name}." if name else "") + key: value.detach().cpu()
        for name, module in streams.items()
        for key, value in module.state_dict().items()
    }
    meta = make_meta(
        method=method.name,
        loss=cfg["loss"]["name"],
        loss_params=method.loss_params(),
        dataset=data.spec.name,
        epochs=cfg["train"]["epochs"],
        image_size=data.image_size,
        mean=list(data.spec.mean),
        std=list(data.spec.std),
        seed=cfg["train"]["seed"],
        config=plain_config(cfg),
        knn_top1=next((h["knn_top1"] for h in reversed(history) if "knn_top1" in h), None),
    )
    if any(streams):
        meta["streams"] = list(streams)
    meta.update(method.card_meta())
    return BackboneCard(arch=cfg["arch"], state_dict=state, stem=method.stem, meta=meta)
