"""Contrastive multiview coding (Tian et al. 2019) on the L and ab views of Lab, plain and ring.

Each image is converted from RGB to CIE Lab *inside the model* (so a user feeds RGB, normalised
with the card's mean/std); a half-width ResNet encodes L (1 channel), another encodes ab
(2 channels). Each stream has a memory bank; the loss is cross-view NCE in both directions:
``z_l`` against the ab bank (its own entry positive, negatives drawn from the bank or, ring
variant, from the ring of the bank ranked by similarity to ``z_l``), and ``z_ab`` against the L bank.
The card holds both streams (keys ``l.*`` and ``ab.*``); frozen-feature transfer concatenates them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.methods.base import MOMENTUM, POSITIVE, MemoryBank, Method, ProjectionHead, in_range
from pretrain.methods.registry import register_method
from ringbench.backbones import STREAM_CHANNELS, TwoStreamBackbone


@dataclass
class CMCConfig:
    bank_momentum: float = in_range(0.5, *MOMENTUM)
    num_negatives: int = in_range(4096, *POSITIVE)
    head_dim: int = in_range(128, *POSITIVE)
    width: float = in_range(0.5, *POSITIVE)
    shared_negatives: bool = True  # one draw for the whole batch; false: a draw per anchor (official)


@register_method
class CMC(Method):
    name = "cmc"
    accepted_losses = ("nce", "ring")
    config_section = CMCConfig
    views = 1

    def __init__(self, cfg, dataset_size: int, stem: str, mean=None, std=None) -> None:
        super().__init__(cfg, dataset_size, stem, mean, std)
        cc = cfg["cmc"]
        self.width = float(cc["width"])
        self.backbone = TwoStreamBackbone(cfg["arch"], stem, self.mean, self.std, self.width)
        self.head_l = ProjectionHead(cast(int, self.backbone.l.feature_dim), cc["head_dim"], mlp=False)
        self.head_ab = ProjectionHead(cast(int, self.backbone.ab.feature_dim), cc["head_dim"], mlp=False)
        self.bank_l = MemoryBank(dataset_size, cc["head_dim"], cc["bank_momentum"], seed=self.seed)
        self.bank_ab = MemoryBank(dataset_size, cc["head_dim"], cc["bank_momentum"], seed=self.seed + 1)
        self.shared_negatives = bool(cc["shared_negatives"])
        # A draw per anchor is with replacement from the whole bank (as the official code draws), so
        # only the shared draw is capped at the bank's size.
        self.num_negatives = int(cc["num_negatives"])
        if self.shared_negatives:
            self.num_negatives = min(self.num_negatives, dataset_size)

    def ring_pool_size(self, world_size: int = 1) -> int:
        return len(self.bank_l)

    def _cross(self, anchor: torch.Tensor, bank: MemoryBank, index: torch.Tensor) -> torch.Tensor:
        positives = bank.memory[index].detach()
        if self.loss_cfg["name"] == "ring":
            samples = self.loss_cfg["num_samples"] or self.num_negatives
            return self.contrast(anchor, positives, bank.memory.detach(), num_samples=samples)
        per_anchor = None if self.shared_negatives else len(anchor)
        return self.contrast(anchor, positives, bank.sample(self.num_negatives, self.generator, per_anchor))

    def training_step(self, views, index):
        feat_l, feat_ab = self.backbone.encode(views[0])
        z_l = F.normalize(self.head_l(feat_l), dim=1)
        z_ab = F.normalize(self.head_ab(feat_ab), dim=1)
        loss_l = self._cross(z_l, self.bank_ab, index)  # L anchors, ab memory
        loss_ab = self._cross(z_ab, self.bank_l, index)  # ab anchors, L memory
        loss = loss_l + loss_ab
        self.bank_l.update(index, z_l.detach())
        self.bank_ab.update(index, z_ab.detach())
        return loss, {
            "loss": loss.detach().item(),
            "loss_l": loss_l.detach().item(),
            "loss_ab": loss_ab.detach().item(),
        }

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(x), dim=1)

    def card_streams(self) -> dict[str, nn.Module]:
        return {"l": self.backbone.l, "ab": self.backbone.ab}

    def card_meta(self) -> dict:
        return {"stream_width": self.width, "colour_space": "lab", "stream_channels": dict(STREAM_CHANNELS)}
