"""One optimisation step and what it needs: the optimizer and its learning-rate schedule, the DDP
wrapper, and AMP and channels-last, which are used on CUDA only (where they pay; on CPU they are
slower or unsupported)."""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from collections.abc import Mapping
from typing import Any

import torch

from pretrain import distributed as dist
from pretrain.methods import Method

log = logging.getLogger(__name__)


def use_cuda_extras(cfg: Mapping[str, Any], device: torch.device, key: str) -> bool:
    """Whether ``train.amp`` / ``train.channels_last`` (``key``) applies: asked for, and on CUDA."""
    return device.type == "cuda" and bool(cfg["train"][key])


def to_device(x: torch.Tensor, device: torch.device, cfg: Mapping[str, Any]) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if use_cuda_extras(cfg, device, "channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def learning_rate(cfg: Mapping[str, Any], epoch: int) -> float:
    """Per-epoch learning rate: ``step`` (x gamma at each milestone fraction of training), ``cosine``, ``constant``.

    ``optim.milestone_rounding="int"`` drops at ``epoch >= int(m * E)`` as the official ring code does;
    ``"exact"`` at ``epoch >= m * E``.
    """
    oc, epochs = cfg["optim"], cfg["train"]["epochs"]
    if oc["schedule"] == "step":
        whole = oc["milestone_rounding"] == "int"
        passed = sum(epoch >= (int(m * epochs) if whole else m * epochs) for m in oc["milestones"])
        return oc["lr"] * oc["gamma"] ** passed
    if oc["schedule"] == "cosine":
        return oc["lr"] * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    return oc["lr"]


def build_optimizer(cfg: Mapping[str, Any], method: Method) -> torch.optim.Optimizer:
    oc = cfg["optim"]
    params = [p for p in method.parameters() if p.requires_grad]
    if oc["name"] == "adam":
        return torch.optim.Adam(params, lr=oc["lr"], weight_decay=oc["weight_decay"])
    return torch.optim.SGD(params, lr=oc["lr"], momentum=oc["momentum"], weight_decay=oc["weight_decay"])


def wrap_for_processes(method: Method, device: torch.device) -> torch.nn.Module:
    """The module the loop calls: ``method`` itself in one process, else DDP around it (SyncBN first
    for methods that want global batch statistics, on CUDA). Buffers are not broadcast at each step
    (queues and banks stay identical by their gathered updates; BN statistics are shared per epoch)."""
    if dist.world_size() == 1:
        return method
    if method.sync_batchnorm and device.type == "cuda":
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    elif method.sync_batchnorm and dist.is_main():
        log.warning("%s: batch norm is per process on CPU (PyTorch has no CPU SyncBatchNorm)", method.name)
    ddp = torch.nn.parallel.DistributedDataParallel
    # no buffer sync at each forward (the name changed in recent PyTorch; both still sync at init)
    no_sync = (
        "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters else "broadcast_buffers"
    )
    device_ids = [device.index] if device.type == "cuda" else None  # CPU: no device_ids
    options: dict[str, Any] = {no_sync: False}
    return ddp(method, device_ids=device_ids, **options)


def optimisation_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    views: list[torch.Tensor],
    index: torch.Tensor,
    cfg: Mapping[str, Any],
    device: torch.device,
    use_amp: bool,
) -> tuple[float, dict[str, float]]:
    """One step: ``(loss, logs)``, both means over the processes. A loss that is not finite on some
    process is stepped on none (they all see the same mean, and stop together)."""
    loss, logs = _forward(model, views, index, cfg, device, use_amp)
    logs = dist.mean_over_processes({**logs, "_loss": float(loss.detach())})
    value = logs.pop("_loss")
    if math.isfinite(value):
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return value, logs


def _forward(
    model: torch.nn.Module,
    views: list[torch.Tensor],
    index: torch.Tensor,
    cfg: Mapping[str, Any],
    device: torch.device,
    use_amp: bool,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One training step's loss (and logs), under autocast on CUDA when AMP is on."""
    views = [to_device(v, device, cfg) for v in views]
    autocast = torch.autocast("cuda", dtype=torch.float16) if use_amp else contextlib.nullcontext()
    with autocast:
        return model(views, index.to(device))
