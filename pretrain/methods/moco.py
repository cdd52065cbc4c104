"""MoCo v2 (He et al. 2020; Chen et al. 2020), plain and ring.

A query encoder trained by SGD and a key encoder that follows it by EMA (``m = 0.999``); a
queue of past keys are the negatives (``K = 65,536``, at most half the dataset); a 2-layer MLP
head to 128-d. The key encoder sees the batch shuffled so that batch-norm statistics do not leak
which key belongs to which query: across processes under DDP as MoCo's code does (gather the
global batch, permute it with one permutation broadcast from process 0, encode each process's
shard, gather the keys and undo the permutation), and in one process by splitting the shuffled
batch into ``shuffle_groups`` groups that each get their own BN statistics (the per-GPU batches of
the multi-GPU recipe). Every process enqueues the keys of the whole global batch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from pretrain import distributed as dist
from pretrain.methods.base import MOMENTUM, POSITIVE, Encoder, Method, in_range
from pretrain.methods.registry import register_method


@dataclass
class MocoConfig:
    momentum: float = in_range(0.999, *MOMENTUM)
    queue_size: int = in_range(65536, *POSITIVE)
    head_dim: int = in_range(128, *POSITIVE)
    mlp: bool = True
    shuffle_groups: int = in_range(8, *POSITIVE)
    cap_queue: bool = True  # at most half the data set (the official code does not cap)


@register_method
class MoCo(Method):
    name = "moco"
    accepted_losses = ("nce", "ring")
    config_section = MocoConfig
    views = 2
    queue: torch.Tensor
    queue_ptr: torch.Tensor

    def __init__(self, cfg, dataset_size: int, stem: str, mean=None, std=None) -> None:
        super().__init__(cfg, dataset_size, stem, mean, std)
        mc = cfg["moco"]
        self.momentum = float(mc["momentum"])
        self.shuffle_groups = int(mc["shuffle_groups"])
        self.encoder = Encoder(cfg["arch"], stem, mc["head_dim"], mlp=mc["mlp"])
        self.key_encoder = copy.deepcopy(self.encoder)
        for p in self.key_encoder.parameters():
            p.requires_grad_(False)
        # At most half the dataset (unless moco.cap_queue is off, as in the official ring code): a
        # queue as long as an epoch would hold every image's own key from the previous epoch as a
        # (false) negative, the hardest one for the ring.
        size = int(mc["queue_size"])
        if mc["cap_queue"]:
            size = max(1, min(size, dataset_size // 2))
        g = torch.Generator().manual_seed(self.seed + 1)
        self.register_buffer(
            "queue", torch.nn.functional.normalize(torch.randn(size, mc["head_dim"], generator=g), dim=1)
        )
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def ring_pool_size(self, world_size: int = 1) -> int:
        return len(self.queue)

    @torch.no_grad()
    def momentum_update(self) -> None:
        for p_k, p_q in zip(self.key_encoder.parameters(), self.encoder.parameters()):
            p_k.mul_(self.momentum).add_(p_q.detach(), alpha=1 - self.momentum)

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """Key embeddings of this process's images ``x``, with shuffled batch norm."""
        k = self.global_keys(x)
        start = dist.rank() * len(x)
        return k[start : start + len(x)]

    @torch.no_grad()
    def global_keys(self, x: torch.Tensor) -> torch.Tensor:
        """Key embeddings of the global batch (rank order) with shuffled batch norm: across processes
        (each encodes one shard of the permuted global batch), or in ``shuffle_groups`` groups in one."""
        world = dist.world_size()
        if world > 1:
            everything = dist.all_gather_cat(x)
            perm = torch.randperm(len(everything), generator=self.generator).to(x.device)
            dist.broadcast_(perm)  # process 0's permutation, whatever the generators hold
            mine = perm.view(world, -1)[dist.rank()]
            k = dist.all_gather_cat(self.key_encoder(everything[mine]))
            return k[torch.argsort(perm)]
        perm = torch.randperm(len(x), generator=self.generator).to(x.device)
        groups = max(1, min(self.shuffle_groups, len(x) // 2))
        k = torch.cat([self.key_encoder(chunk) for chunk in x[perm].chunk(groups)])
        return k[torch.argsort(perm)]

    @torch.no_grad()
    def enqueue(self, k: torch.Tensor) -> None:
        """Replace the oldest keys with ``k``, the keys of the global batch (identical on every process)."""
        k = k.float()[-len(self.queue) :]
        ptr = int(self.queue_ptr)
        slots = (torch.arange(len(k), device=k.device) + ptr) % len(self.queue)
        self.queue[slots] = k
        self.queue_ptr.fill_((ptr + len(k)) % len(self.queue))

    def training_step(self, views, index):
        x_q, x_k = views[0], views[1]
        q = self.encoder(x_q)
        self.momentum_update()
        everyone = self.global_keys(x_k)
        start = dist.rank() * len(x_k)
        k = everyone[start : start + len(x_k)]
        loss = self.contrast(q, k, self.queue.clone().detach())
        self.enqueue(everyone)
        return loss, {"loss": loss.detach().item()}
