"""The pretraining loop, in Detectron2's ``TrainerBase`` / ``HookBase`` style: :class:`Trainer` runs
the epochs and steps; everything done around them (checkpoints, the log, the kNN monitor, the card,
the progress bar: :mod:`pretrain.hooks`) is a :class:`HookBase` it calls at fixed points, so each
concern is one small class and the loop stays a loop.

Order within an epoch (the guarantees of :mod:`pretrain.train` rest on it): the learning rate, the
method's epoch and the augmentation seed are set; ``before_epoch``; per step ``run_step`` then
``after_step``; batch-norm statistics are shared from process 0 and the epoch's record joins
``history``; ``after_epoch`` (hooks in registration order); a barrier. Hooks run on every process
and decide themselves what only process 0 does.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from pretrain import distributed as dist
from pretrain import seeds
from pretrain.data.loaders import DataBundle, epoch_loader
from pretrain.methods import Method
from pretrain.step import learning_rate, optimisation_step
from ringbench.errors import UserError


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


class HookBase:
    """Work done around the loop. The trainer calls each registered hook's methods in registration
    order, on every process; ``self.trainer`` is the trainer. An exception stops the run there."""

    trainer: Trainer

    def before_train(self) -> None:
        """After setup and resume, before the first epoch (a resumed run's pending work)."""

    def before_epoch(self) -> None:
        """After the epoch's learning rate, seeds and loader are set."""

    def after_step(self) -> None:
        """After each optimisation step (``trainer.step``, ``trainer.logs``)."""

    def after_epoch(self) -> None:
        """After the epoch's record is ``trainer.history[-1]``."""

    def after_train(self) -> None:
        """After the last epoch; not after a failure."""


class Trainer:
    """Runs epochs ``start_epoch .. train.epochs`` of ``method`` (called through ``model``, its DDP
    wrapper when there are several processes) with ``hooks`` around them; the state hooks read is
    public: ``epoch`` and ``step`` (0-based), ``steps`` (this epoch's), ``lr``, ``logs`` (the last
    step's, means over processes), ``images_per_s``, ``completed_epochs`` and ``history`` (one record
    per finished epoch)."""

    def __init__(
        self,
        cfg: Mapping[str, Any],
        method: Method,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        data: DataBundle,
        device: torch.device,
        checkpoint_path: Path,
        start_epoch: int = 0,
        history: list[dict[str, Any]] | None = None,
    ) -> None:
        self.cfg, self.method, self.model, self.data, self.device = cfg, method, model, data, device
        self.optimizer, self.scaler, self.use_amp = optimizer, scaler, scaler.is_enabled()
        self.checkpoint_path = checkpoint_path  # named when the loss diverges
        self.world, self.rank = dist.world_size(), dist.rank()
        self.per_process = cfg["train"]["batch_size"] // self.world
        self.epochs = cfg["train"]["epochs"] if method.trains else 0  # random reference: the initial weights
        self.start_epoch = self.completed_epochs = start_epoch
        self.history: list[dict[str, Any]] = list(history or [])
        self.hooks: list[HookBase] = []
        self.card_path: Path | None = None  # set by the hook that writes the card
        self.epoch = self.step = self.steps = 0
        self.lr, self.images_per_s = 0.0, 0.0
        self.logs: dict[str, float] = {}

    @property
    def resumed(self) -> bool:
        return self.start_epoch > 0

    def register_hooks(self, hooks: Iterable[HookBase]) -> None:
        for hook in hooks:
            hook.trainer = self
            self.hooks.append(hook)

    def train(self) -> None:
        self._call("before_train")
        dist.barrier()  # the others wait while process 0 does a resumed run's pending work
        for epoch in range(self.start_epoch, self.epochs):
            self.epoch = epoch
            loader = self._start_epoch()
            self._call("before_epoch")
            for step, (views, index) in enumerate(itertools.islice(loader, self.steps)):
                self.step = step
                self.run_step(views, index)
                self._call("after_step")
            self._finish_epoch()
            self._call("after_epoch")
            dist.barrier()
        self._call("after_train")
        dist.barrier()

    def run_step(self, views: list[torch.Tensor], index: torch.Tensor) -> None:
        """One optimisation step; a loss that is not finite stops the run (no process steps on it)."""
        value, self.logs = optimisation_step(
            self.model, self.optimizer, self.scaler, views, index, self.cfg, self.device, self.use_amp
        )
        if not math.isfinite(value):
            kept = (
                f"the last good checkpoint {self.checkpoint_path} (after epoch {self.completed_epochs}) is kept"
                if self.completed_epochs
                else "no checkpoint had been written yet"
            )
            raise TrainingDiverged(
                f"loss became {value} at epoch {self.epoch + 1}, step {self.step + 1}: training diverged; "
                f"{kept}. Lower optim.lr or turn off train.amp, then rerun to resume"
            )
        self._seen += len(index) * self.world
        self._loss_sum += self.logs["loss"]
        self.images_per_s = self._seen / max(time.perf_counter() - self._started, 1e-9)

    def _start_epoch(self) -> Iterable:
        """Set this epoch's learning rate, schedules and seeds; its loader (the same order and draws
        whether the run was resumed or not)."""
        tc = self.cfg["train"]
        self.lr = learning_rate(self.cfg, self.epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.method.set_epoch(self.epoch)
        # the augmentations of the main process (data workers are seeded by the loader)
        torch.manual_seed(seeds.stream_seed(tc["seed"], seeds.AUGMENT, self.epoch, self.rank))
        loader = epoch_loader(self.data.train, self.cfg, self.per_process, self.epoch, self.world, self.rank)
        self.steps = len(loader) if tc["max_steps_per_epoch"] is None else min(len(loader), tc["max_steps_per_epoch"])
        self.model.train()
        self._started, self._seen, self._loss_sum = time.perf_counter(), 0, 0.0
        return loader

    def _finish_epoch(self) -> None:
        dist.broadcast_batchnorm_stats_(self.method)  # process 0's BN statistics everywhere
        self.completed_epochs = self.epoch + 1
        self.history.append(
            {
                "epoch": self.epoch + 1,
                "loss": self._loss_sum / max(self.steps, 1),
                "lr": self.lr,
                "w_outer": self.method.w_outer,
                "images_per_s": round(self._seen / max(time.perf_counter() - self._started, 1e-9), 2),
            }
        )

    def _call(self, stage: str) -> None:
        for hook in self.hooks:
            getattr(hook, stage)()
