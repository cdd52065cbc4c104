"""The collective operations the methods and the trainer need (each a no-op in one process).

Launch with ``torchrun --nproc_per_node N pretrain/run.py ...``: the trainer reads ``WORLD_SIZE`` /
``RANK`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT`` from the environment and joins a process
group, NCCL on CUDA, gloo on CPU. Rank order is the order of the global batch: process ``r`` holds its
rows ``[r * b, (r + 1) * b)``.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

# Process 0 runs the kNN monitor and writes checkpoints while the others wait at a barrier: longer
# than NCCL's 10-minute default.
TIMEOUT = datetime.timedelta(hours=2)

_joined_here = False


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
    """Join the process group torchrun describes (no-op when not launched by torchrun, or already in one)."""
    global _joined_here
    if launched_by_torchrun() and not is_distributed():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
        _joined_here = True


def leave() -> None:
    """Destroy the process group if :func:`init_from_env` created it (a caller's own group is kept)."""
    global _joined_here
    if _joined_here and is_distributed():
        dist.destroy_process_group()
    _joined_here = False


@torch.no_grad()
def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from every process along dim 0 (no gradient), rank order
    (MoCo's ``concat_all_gather``)."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns to each process the gradient of the SUM of every process's
    loss with respect to its own rows (an all-reduce of the gathered gradient, then its slice).
    Unlike reduce-scatter, all-reduce exists on gloo as well as NCCL."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rows = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = rank() * ctx.rows
        return grad[start : start + ctx.rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from every process along dim 0, rank order, keeping the gradient.

    With DDP averaging the parameter gradients over ``W`` processes, each computing the mean loss
    of its own anchors against the gathered batch, the step is the one-process step on the whole
    batch: ``(1/W) * sum_r d loss_r / d theta`` = d(mean over all anchors)/d theta.
    """
    if not is_distributed():
        return tensor
    return _GatherWithGrad.apply(tensor)


def local_rows(local: int) -> torch.Tensor:
    """The rows of the global batch (rank order) this process holds, for ``local`` rows per process."""
    return torch.arange(local) + rank() * local


@torch.no_grad()
def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_distributed():
        dist.broadcast(tensor, src)
    return tensor


@torch.no_grad()
def broadcast_batchnorm_stats_(module: torch.nn.Module) -> None:
    """Make every process hold rank 0's batch-norm running statistics (they see different batches).

    Only these: queues and memory banks are kept identical by their gathered updates, and a bank of
    ImageNet's size is hundreds of megabytes.
    """
    for sub in module.modules():
        if isinstance(sub, torch.nn.modules.batchnorm._NormBase):
            for buffer in sub.buffers(recurse=False):
                broadcast_(buffer)


def mean_over_processes(values: dict[str, float]) -> dict[str, float]:
    """The mean of each logged value over the processes (every process passes the same keys)."""
    if not is_distributed() or not values:
        return values
    keys = sorted(values)
    backend_cuda = dist.get_backend() == "nccl"
    packed = torch.tensor([values[k] for k in keys], dtype=torch.float64, device="cuda" if backend_cuda else "cpu")
    dist.all_reduce(packed)
    return {k: v / world_size() for k, v in zip(keys, packed.tolist())}


def barrier() -> None:
    if is_distributed():
        dist.barrier()
