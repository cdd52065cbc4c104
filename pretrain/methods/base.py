"""The method interface: a method owns its encoder(s), its negatives store and its loss.

A method is an ``nn.Module`` whose ``forward`` is :meth:`Method.training_step` (so that DDP can
wrap it): ``(views, index) -> (loss, logs)``. Everything that changes state outside the optimizer
(momentum encoders, queues, memory banks) happens inside the step, under ``no_grad``.
The trainer calls :meth:`set_epoch` at the start of every epoch (loss schedules, seeded
generators), :meth:`features` for the kNN monitor, and :meth:`card_streams` for the card.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from pretrain import distributed as dist
from pretrain import losses
from pretrain.seeds import METHOD, stream_seed
from ringbench import ring_schedules
from ringbench.backbones import create_backbone
from ringbench.card import IMAGENET_MEAN, IMAGENET_STD


class ProjectionHead(nn.Sequential):
    """MLP head ``feature_dim -> hidden -> out`` with ReLU (MoCo v2), batch norm after the hidden
    layer when ``bn`` (SimCLR / HCL), or one linear layer (IR, CMC)."""

    def __init__(
        self, in_dim: int, out_dim: int = 128, hidden_dim: int | None = None, mlp: bool = True, bn: bool = False
    ) -> None:
        if not mlp:
            super().__init__(nn.Linear(in_dim, out_dim))
            return
        hidden = hidden_dim or in_dim
        if bn:
            layers = [nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden)]
        else:
            layers = [nn.Linear(in_dim, hidden)]
        super().__init__(*layers, nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


class Encoder(nn.Module):
    """Backbone + projection head; ``forward`` returns unit-norm embeddings."""

    def __init__(
        self, arch: str, stem: str, head_dim: int, hidden_dim: int | None = None, mlp: bool = True, bn: bool = False
    ) -> None:
        super().__init__()
        self.backbone = create_backbone(arch, stem)
        self.head = ProjectionHead(cast(int, self.backbone.feature_dim), head_dim, hidden_dim, mlp, bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(x)), dim=1)


def in_range(default: Any, low: Any = None, high: Any = None) -> Any:
    """A config field with its range (``ringbench.config.check_range``: a 1-tuple bound is exclusive)."""
    return dataclasses.field(default=default, metadata={"range": (low, high)})


POSITIVE = ((0,), None)  # in_range(x, *POSITIVE): > 0
MOMENTUM = (0, (1,))  # [0, 1)


class Method(nn.Module):
    """Base class. A method registers itself (``@register_method``), sets ``name``, ``accepted_losses``,
    ``views`` (augmented views per image) and implements :meth:`training_step`; single-stream methods
    keep their card backbone in ``self.encoder.backbone``."""

    name: ClassVar[str] = ""
    accepted_losses: ClassVar[tuple[str, ...]] = ()  # the values of loss.name it takes
    config_section: ClassVar[type | None] = None  # the dataclass of its config section ``cfg[name]``, if any
    views: ClassVar[int] = 2
    # Batch norm over the whole global batch on several GPUs (SimCLR's "global BN"); MoCo shuffles
    # instead, and the memory-bank methods have no in-batch negatives.
    sync_batchnorm: ClassVar[bool] = False
    trains: ClassVar[bool] = True  # False: the card is the initial weights (the random reference)
    labelled: ClassVar[bool] = False  # True: trains on the labelled split, given by set_labels()
    encoder: Encoder  # set by the single-stream methods

    def __init__(
        self,
        cfg: Mapping[str, Any],
        dataset_size: int,
        stem: str,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.mean = tuple(mean or IMAGENET_MEAN)  # the input normalisation (models that convert colour need it)
        self.std = tuple(std or IMAGENET_STD)
        self.loss_cfg = dict(cfg["loss"])
        self.dataset_size = dataset_size
        self.stem = stem
        self.seed = int(cfg["train"]["seed"])
        self.epoch = 0
        self.w_outer = float(self.loss_cfg["w_outer"])
        self.generator = torch.Generator().manual_seed(self.seed)
        # The official ring code anneals w_outer per iteration over int(N / B) iterations an epoch.
        self.steps_per_epoch = max(1, int(dataset_size / int(cfg["train"]["batch_size"])))
        self.step_in_epoch = 0

    @classmethod
    def check_config(cls, cfg: Mapping[str, Any]) -> None:
        """The method's own cross-field checks of a config (a :class:`UserError` per problem)."""

    # -- called by the trainer ---------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Loss schedules for this epoch; reseed the method's generator (same on every process,
        so that a resumed run draws what an uninterrupted one would)."""
        self.epoch = epoch
        self.step_in_epoch = 0
        lc = self.loss_cfg
        if lc["schedule_style"] == "official":
            self._official_w_outer()
        else:
            self.w_outer = ring_schedules.ring_threshold(
                epoch, lc["schedule"], lc["w_outer"], lc["w_outer_start"], lc["anneal_epochs"], lc["schedule_steps"]
            )
        self.generator.manual_seed(stream_seed(self.seed, METHOD, epoch))

    def _official_w_outer(self) -> None:
        """``w_outer`` at this iteration under the official per-iteration policies."""
        lc = self.loss_cfg
        self.w_outer = ring_schedules.official_ring_threshold(
            self.epoch * self.steps_per_epoch + self.step_in_epoch,
            lc["schedule"],
            lc["w_outer"],
            lc["w_outer_start"],
            int(lc["anneal_epochs"] * self.steps_per_epoch),
        )

    def training_step(self, views: list[torch.Tensor], index: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def forward(self, views: list[torch.Tensor], index: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        if self.training and self.loss_cfg["schedule_style"] == "official":
            self._official_w_outer()
            self.step_in_epoch += 1
        return self.training_step(views, index)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features for the kNN monitor (what transfer will see), L2-normalised."""
        return F.normalize(self.encoder.backbone(x), dim=1)

    def card_streams(self) -> dict[str, nn.Module]:
        """Backbone(s) that become the card: ``{"": backbone}``, or one entry per stream (CMC)."""
        return {"": self.encoder.backbone}

    def set_labels(self, targets: Sequence[int], num_classes: int) -> None:
        """The training split's labels, by image index (methods with ``labelled = True``)."""

    def ring_pool_size(self, world_size: int = 1) -> int:
        """How many negatives each anchor's ring is cut from (queue, memory bank or batch)."""
        raise NotImplementedError

    def check_ring(self, world_size: int = 1) -> None:
        """Fail before any work if the ring would be empty at some epoch (the smallest ``w_outer``)."""
        lc = self.loss_cfg
        if lc["name"] == "ring":
            smallest = lc["w_outer"] if lc["schedule"] == "constant" else min(lc["w_outer"], lc["w_outer_start"])
            losses.ring_bounds(self.ring_pool_size(world_size), smallest, lc["w_inner"], lc["rounding"])

    def card_meta(self) -> dict[str, Any]:
        """Extra card metadata the method needs to rebuild its backbone (e.g. CMC's stream width)."""
        return {}

    def loss_params(self) -> dict[str, Any]:
        """The loss parameters recorded in the card (the ring schedule included)."""
        lc = self.loss_cfg
        keys = {
            "nce": ("t",),
            "ring": (
                "t",
                "w_outer",
                "w_inner",
                "num_samples",
                "schedule",
                "w_outer_start",
                "anneal_epochs",
                "schedule_steps",
                "rounding",
                "schedule_style",
            ),
            "ntxent": ("t",),
            "hcl": ("t", "tau_plus", "beta", "beta_anneal_epochs", "beta_anneal_steps", "estimator"),
            "dcl": ("t", "tau_plus"),
        }[lc["name"]]
        return {k: lc[k] for k in keys}

    # -- shared by the methods ---------------------------------------------------------------
    def contrast(
        self, q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, num_samples: int | None = None
    ) -> torch.Tensor:
        """InfoNCE or the ring over a negatives store, as the config says. On several processes the
        ring's draws for these anchors are their rows of the draws for the global batch (the same
        generator state everywhere), so they neither repeat across processes nor depend on their number."""
        lc = self.loss_cfg
        if lc["name"] == "ring":
            world = dist.world_size()
            return losses.ring_loss(
                q,
                k,
                negatives,
                lc["t"],
                self.w_outer,
                lc["w_inner"],
                num_samples=num_samples,
                generator=self.generator,
                rounding=lc["rounding"],
                draw_rows=dist.local_rows(len(q)) if world > 1 else None,
                draw_total=len(q) * world,
            )
        return losses.nce_loss(q, k, negatives, lc["t"])


class MemoryBank(nn.Module):
    """``size x dim`` unit vectors updated by momentum (Wu et al. 2018): ``v <- norm(m v + (1-m) z)``.

    Under DDP the update gathers every process's entries, so all banks stay identical.
    """

    memory: torch.Tensor

    def __init__(self, size: int, dim: int, momentum: float, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.momentum = momentum
        self.register_buffer("memory", F.normalize(torch.randn(size, dim, generator=g), dim=1))

    def __len__(self) -> int:
        return self.memory.shape[0]

    def sample(self, count: int, generator: torch.Generator, anchors: int | None = None) -> torch.Tensor:
        """``count`` entries drawn uniformly with replacement: ``(count, D)`` shared by the batch, or
        ``(anchors, count, D)``, one draw per anchor (the official ring code's IR and CMC's NCEAverage)."""
        shape = (count,) if anchors is None else (anchors, count)
        idx = torch.randint(0, len(self), shape, generator=generator)
        return self.memory[idx.to(self.memory.device)]

    @torch.no_grad()
    def update(self, index: torch.Tensor, z: torch.Tensor) -> None:
        """Move the entries of the global batch (gathered from every process) towards its embeddings."""
        index, z = dist.all_gather_cat(index), dist.all_gather_cat(z.float())
        mixed = self.momentum * self.memory[index] + (1 - self.momentum) * z
        self.memory[index] = F.normalize(mixed, dim=1)
