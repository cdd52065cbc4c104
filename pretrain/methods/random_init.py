"""The random-initialisation reference: the backbone as its constructor leaves it, seeded by
``train.seed`` (``torch.manual_seed`` before the build), written as a card without one step of
training. Transfer tables need it as their floor: how far fine-tuning or a probe gets with no
pretraining at all. The trainer runs no epoch for it (``trains = False``); the card says
``method: random``, ``loss: none``, ``epochs: 0``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.methods.base import Method
from pretrain.methods.registry import register_method
from ringbench.backbones import create_backbone


@register_method
class RandomInit(Method):
    name = "random"
    accepted_losses = ("none",)
    views = 1
    trains = False

    def __init__(self, cfg, dataset_size: int, stem: str, mean=None, std=None) -> None:
        super().__init__(cfg, dataset_size, stem, mean, std)
        self.backbone = create_backbone(cfg["arch"], stem)

    def training_step(self, views, index):
        raise RuntimeError("the random-initialisation reference is never trained")

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(x), dim=1)

    def card_streams(self) -> dict[str, nn.Module]:
        return {"": self.backbone}

    def card_meta(self) -> dict[str, Any]:
        return {"epochs": 0}

    def loss_params(self) -> dict[str, Any]:
        return {}
