"""Pretraining: data -> method steps -> checkpoints, JSONL log, kNN monitor -> backbone card.

:func:`train` sets up (data, method, optimizer, resume) and runs :class:`pretrain.loop.Trainer` with
the hooks of :mod:`pretrain.hooks`. What a run guarantees:

* A checkpoint is written atomically after every epoch (``WORKDIR/checkpoint.pth``), before the kNN
  monitor runs (and again with its result); a new run with the same config and work folder resumes
  from it, first running a monitor that the interruption skipped. Data order, augmentations and the
  methods' random draws are seeded per epoch, so a resumed run repeats an uninterrupted one.
* ``WORKDIR/log.jsonl``: one JSON object per line (steps every ``train.log_every``, and epochs),
  appended whole; on resume it is rebuilt from the checkpoint, so the killed epoch's lines go.
* One process per work folder: the main process holds an ``fcntl`` lock on ``WORKDIR/.lock``.
* The kNN monitor (k=200, temperature-weighted) runs on a held-out split after each epoch.
* AMP and channels-last are used on CUDA only.
* Under ``torchrun`` it runs DDP (NCCL on CUDA, gloo on CPU). ``train.batch_size`` is the global
  batch; a ``DistributedSampler`` (also in one process) deals each epoch's shuffled order to the
  processes without overlap, so step ``s`` trains on the same images for any number of processes
  (the tail that does not fill a global batch is dropped). Process 0 writes the log, checkpoints
  and the card (atomically) while the others wait; the logged values are means over processes.
* A non-finite loss stops the run with a clear message; the last good checkpoint is kept.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from pretrain import distributed as dist
from pretrain.checkpoint import CHECKPOINT_NAME, config_changes, load_resume_state, save_checkpoint
from pretrain.data.loaders import prepare_data
from pretrain.hooks import LOG_NAME, CardWriter, Checkpointer, JsonlLog, KnnMonitor, ProgressBar, TensorBoard
from pretrain.knn import evaluate_knn
from pretrain.loop import HookBase, Trainer, TrainingDiverged
from pretrain.methods import Method, build_method, get_method
from pretrain.step import build_optimizer, learning_rate, optimisation_step, use_cuda_extras, wrap_for_processes
from ringbench.errors import UserError
from ringbench.fileio import folder_lock, remove_stale_temps

# The trainer's library surface (bench/, sweeps and tests use it), wherever each piece lives.
__all__ = [
    "CHECKPOINT_NAME",
    "LOG_NAME",
    "TrainResult",
    "TrainingDiverged",
    "build_optimizer",
    "config_changes",
    "default_hooks",
    "evaluate_knn",
    "learning_rate",
    "load_resume_state",
    "optimisation_step",
    "prepare_data",
    "save_checkpoint",
    "train",
    "wrap_for_processes",
]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    card_path: Path | None
    method: Method
    history: list[dict[str, Any]] = field(default_factory=list)


def train(
    cfg: Mapping[str, Any],
    out: str | Path | None,
    workdir: str | Path,
    device: str | torch.device = "cpu",
    fresh: bool = False,
    progress: bool = True,
    tensorboard: bool = True,
) -> TrainResult:
    """Pretrain as ``cfg`` says; resume from ``workdir`` if it holds a checkpoint; write the card to ``out``.

    The main process holds ``workdir``'s lock throughout: a second run on it is refused at once."""
    main_process = int(os.environ.get("RANK", "0")) == 0
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    with folder_lock(workdir, "--workdir") if main_process else contextlib.nullcontext():
        if main_process:
            remove_stale_temps(workdir)  # temporary checkpoints of killed runs
        if device.type == "cuda" and dist.launched_by_torchrun():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_from_env(device)  # the process group torchrun describes, if any; left whatever happens
        try:
            return _train(cfg, out, Path(workdir), device, fresh, progress, tensorboard)
        finally:
            dist.leave()


def default_hooks(
    cfg: Mapping[str, Any], out: str | Path | None, workdir: Path, progress: bool, tensorboard: bool = True
) -> list[HookBase]:
    """The hooks of a run, in the order that keeps its guarantees (see :mod:`pretrain.hooks`)."""
    # save_checkpoint and evaluate_knn are looked up here, at run time, so that replacing them in
    # this module (as the crash tests do) reaches the hooks.
    checkpointer = Checkpointer(workdir / CHECKPOINT_NAME, save=save_checkpoint)
    return [
        ProgressBar(progress),
        checkpointer,
        KnnMonitor(checkpointer, evaluate=evaluate_knn),
        JsonlLog(workdir / LOG_NAME),
        *([TensorBoard(workdir)] if tensorboard else []),
        CardWriter(out),
    ]


def _train(
    cfg: Mapping[str, Any],
    out: str | Path | None,
    workdir: Path,
    device: torch.device,
    fresh: bool,
    progress: bool,
    tensorboard: bool = True,
) -> TrainResult:
    """Set up the method, its data and optimizer, resume from ``workdir``'s checkpoint, run the loop."""
    world = dist.world_size()
    tc = cfg["train"]
    if tc["batch_size"] % world:
        raise UserError(f"train.batch_size {tc['batch_size']} is not divisible by the {world} processes")

    torch.manual_seed(tc["seed"])
    method_class = get_method(cfg["method"])
    data = prepare_data(cfg, method_class.views, method_class.labelled)
    if method_class.trains and len(data.train) < tc["batch_size"]:
        raise UserError(f"dataset has {len(data.train)} images, fewer than train.batch_size={tc['batch_size']}")
    method = build_method(cfg, len(data.train), data.stem, data.spec.mean, data.spec.std)
    if method.labelled:
        targets = list(cast(Any, data.train.base).targets)  # every dataset reader has targets
        method.set_labels(targets, max(data.spec.num_classes, max(targets, default=-1) + 1))
    method = method.to(device)
    method.check_ring(world)
    if use_cuda_extras(cfg, device, "channels_last"):
        method = method.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, method)
    use_amp = use_cuda_extras(cfg, device, "amp")
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    ckpt_path = workdir / CHECKPOINT_NAME
    if dist.is_main():
        workdir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    state = None if fresh else load_resume_state(ckpt_path, cfg)
    start_epoch, history = 0, []
    if state is not None:
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        if use_amp and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
        if dist.is_main():
            log.info("resuming from %s after epoch %d", ckpt_path, start_epoch)

    model = wrap_for_processes(method, device)
    trainer = Trainer(cfg, method, model, optimizer, scaler, data, device, ckpt_path, start_epoch, history)
    trainer.register_hooks(default_hooks(cfg, out, workdir, progress, tensorboard))
    trainer.train()
    return TrainResult(card_path=trainer.card_path, method=method, history=trainer.history)
