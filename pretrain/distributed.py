"""The few collective operations the methods and the trainer need (no-ops in one process).

Launch with ``torchrun --nproc_per_node N pretrain/run.py ...``: the trainer reads ``WORLD_SIZE`` /
``RANK`` / ``LOCAL_RANK`` from the environment and uses NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: torch.device) -> None:
    """Join the process group torchrun describes (no-op when not launched by torchrun)."""
    if launched_by_torchrun() and not is_distributed():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


@torch.no_grad()
def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from every process along dim 0 (no gradient), rank order."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_distributed():
        dist.broadcast(tensor, src)
    return tensor


@torch.no_grad()
def broadcast_buffers_(module: torch.nn.Module) -> None:
    """Make every process hold rank 0's buffers (BN statistics, queues, banks)."""
    for buffer in module.buffers():
        broadcast_(buffer)


def barrier() -> None:
    if is_distributed():
        dist.barrier()
