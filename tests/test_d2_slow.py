"""Slow: syn_det from a trained card beats the same schedule from random initialisation.

The trained card is a ResNet-18 (CIFAR stem) trained for a few minutes to classify synthetic shapes
images (32 px, 64 classes of shape x colour x texture); the random card has the same architecture,
normalisation and metadata but untrained weights. Both go through the same syn_det run (default
schedule and dataset), so any difference comes from the backbone weights reaching the detector.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pretrain.backbones import create_backbone
from pretrain.checkpoint import BackboneCard, make_meta, save_card

pytestmark = pytest.mark.slow


def _shapes_tensors(num_classes: int, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    from pretrain.data.shapes import SyntheticShapes

    ds = SyntheticShapes(num_classes=num_classes, images_per_class=per_class, image_size=32, seed=1)
    images = torch.stack([torch.from_numpy(ds.image(i)).permute(2, 0, 1) for i in range(len(ds))]).float() / 255
    return images, torch.tensor(ds.targets)


def _card(path: Path, state: dict, mean: list[float], std: list[float], method: str) -> Path:
    meta = make_meta(method=method, loss="cross-entropy" if method == "supervised" else "none",
                     dataset="synthetic-shapes", image_size=32, mean=mean, std=std, seed=0)
    return save_card(BackboneCard("resnet18", state, "cifar", meta), path)


def trained_and_random_cards(folder: Path, steps: int = 150, batch: int = 32) -> tuple[Path, Path]:
    torch.manual_seed(0)
    images, labels = _shapes_tensors(64, 16)
    mean = images.mean(dim=(0, 2, 3))
    std = images.std(dim=(0, 2, 3))
    model = create_backbone("resnet18", "cifar")
    random_state = {k: v.clone() for k, v in model.state_dict().items()}
    head = nn.Linear(model.feature_dim, 64)
    params = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(images), (batch,))
        x = (images[idx] - mean[:, None, None]) / std[:, None, None]
        flip = torch.rand(batch) < 0.5
        x[flip] = x[flip].flip(-1)
        loss = nn.functional.cross_entropy(head(model(x)), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    m, s = mean.tolist(), std.tolist()
    return (_card(folder / "trained.pth", model.state_dict(), m, s, "supervised"),
            _card(folder / "random.pth", random_state, m, s, "random"))


def test_syn_det_from_trained_card_beats_random_init(tmp_path):
    pytest.importorskip("detectron2")
    import argparse

    from transfer.backbones import load_backbone
    from transfer.tasks import TaskContext, get_task

    trained, random = trained_and_random_cards(tmp_path)
    task = get_task("syn_det")
    config = task.make_config(argparse.Namespace())
    ap = {}
    for card in (trained, random):
        backbone = load_backbone(card)
        task.validate(backbone, config)
        ctx = TaskContext(output_dir=tmp_path / card.stem, device="cpu", cache_dir=tmp_path / "cache")
        ap[card.stem] = task.run(backbone, config, ctx).metrics["bbox/AP"]
    assert ap["trained"] > ap["random"] + 5.0, ap
