"""The supervised reference: cross-entropy on the dataset's labels through a linear classifier on
the backbone's pooled features (He et al. 2016's ImageNet recipe in ``configs/pretrain/supervised.yaml``),
with the same augmentation, optimizer and schedule machinery as the contrastive methods.

Transfer papers compare with this row (MoCo, He et al. 2020, Tables 2-5: "IN-1M supervised"). It
trains on the *labelled* training split (:attr:`labelled`: STL-10's ``train``, never its unlabeled
images; the synthetic shapes, CIFAR and ImageFolder ``train``); the trainer hands it the split's
labels with :meth:`set_labels`, and a batch's labels are looked up by the images' indices. Only the
backbone goes into the card; the classifier is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.methods.base import Method
from pretrain.methods.registry import register_method
from ringbench.backbones import create_backbone
from ringbench.errors import UserError


@register_method
class Supervised(Method):
    name = "supervised"
    accepted_losses = ("ce",)
    views = 1
    labelled = True

    labels: torch.Tensor

    def __init__(self, cfg, dataset_size: int, stem: str, mean=None, std=None) -> None:
        super().__init__(cfg, dataset_size, stem, mean, std)
        self.backbone = create_backbone(cfg["arch"], stem)
        self.classifier: nn.Linear | None = None
        self.register_buffer("labels", torch.full((dataset_size,), -1, dtype=torch.long))

    def set_labels(self, targets: Sequence[int], num_classes: int) -> None:
        """The label of every training image (by index) and the classifier over ``num_classes``."""
        labels = torch.as_tensor(list(targets), dtype=torch.long)
        if labels.shape != self.labels.shape:
            raise UserError(f"supervised: {len(labels)} labels for {self.labels.shape[0]} images")
        if labels.numel() == 0 or int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise UserError(f"supervised: every training image needs a label in [0, {num_classes})")
        self.labels.copy_(labels)
        self.classifier = nn.Linear(cast(int, self.backbone.feature_dim), num_classes).to(self.labels.device)

    def training_step(self, views, index):
        if self.classifier is None:
            raise RuntimeError("supervised: set_labels() must be called before training")
        logits = self.classifier(self.backbone(views[0]))
        target = self.labels[index]
        loss = F.cross_entropy(logits.float(), target)
        accuracy = (logits.argmax(1) == target).float().mean().item() * 100.0
        return loss, {"loss": loss.detach().item(), "train_acc": accuracy}

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(x), dim=1)

    def card_streams(self) -> dict[str, nn.Module]:
        return {"": self.backbone}

    def loss_params(self) -> dict[str, Any]:
        return {}
