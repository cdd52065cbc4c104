"""What the benchmark scripts share besides their timing (``interleave.py``): a backbone card to time.

Scripts run by path (``python bench/x.py``) put the repository root on ``sys.path`` first, so they
import this module as ``bench.common``.
"""

from __future__ import annotations

from pathlib import Path


def random_card(folder: Path) -> Path:
    """``folder/random_resnet18.pth``: a seeded, randomly initialised ResNet-18 with the CIFAR stem, as the
    ``random`` reference method's card (no training, 32 px): a default backbone that needs no data or training."""
    import torch

    from ringbench.backbones import create_backbone
    from ringbench.card import BackboneCard, make_meta, save_card

    torch.manual_seed(0)
    state = create_backbone("resnet18", "cifar").state_dict()
    meta = make_meta(
        method="random",
        loss="none",
        dataset="none",
        image_size=32,
        mean=[0.5, 0.5, 0.5],
        std=[0.25, 0.25, 0.25],
        epochs=0,
        seed=0,
    )
    return save_card(BackboneCard("resnet18", state, "cifar", meta), folder / "random_resnet18.pth")
