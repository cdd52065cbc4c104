"""MoCo v2 augmentations sized to the data, evaluation transforms, and the multi-view wrapper."""

from __future__ import annotations

from collections.abc import Callable, Sequence, Sized
from typing import Any, cast

import torch
from torchvision import transforms as T


def moco_v2_augmentation(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    blur: bool | None = None,
    hue: float = 0.1,
    grayscale: float = 0.2,
    jitter: float = 0.8,
    scale_min: float = 0.2,
) -> Callable:
    """MoCo v2 (Chen et al. 2020): random resized crop (scale 0.2-1), colour jitter 0.4/0.4/0.4/0.1
    with p=0.8, grayscale p=0.2, Gaussian blur (sigma 0.1-2, p=0.5), horizontal flip. ``scale_min``:
    the crop's smallest area fraction (0.08 is torchvision's default, used by SimCLR and HCL).

    ``blur=None`` keeps the blur only for images of 96 px and above: at 32 px (CIFAR) it erases
    the image, and the CIFAR recipes leave it out. ``hue``, ``grayscale`` and the jitter probability
    ``jitter`` can be lowered for data whose classes are defined by colour (the synthetic shapes) or
    for methods that learn from colour (CMC's ab view).
    """
    if blur is None:
        blur = image_size >= 96
    steps: list[Any] = [
        T.RandomResizedCrop(image_size, scale=(scale_min, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, hue)], p=jitter),
        T.RandomGrayscale(p=grayscale),
    ]
    if blur:
        kernel = max(3, int(0.1 * image_size) // 2 * 2 + 1)  # ~10% of the side, odd
        steps.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5))
    steps += [T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def ring_official_augmentation(
    image_size: int, mean: Sequence[float], std: Sequence[float], scale_min: float = 0.2
) -> Callable:
    """The official ring code's default training transforms (its ``load_default_transforms``): random
    resized crop (scale 0.2-1), grayscale p=0.2, then colour jitter 0.4/0.4/0.4 with hue 0.4 on *every*
    image, horizontal flip; no blur. The official recipe crops to 224 px on CIFAR and STL-10 alike."""
    return T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=(scale_min, 1.0)),
            T.RandomGrayscale(p=0.2),
            T.ColorJitter(0.4, 0.4, 0.4, 0.4),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def eval_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], native_size: int | None = None
) -> Callable:
    """Deterministic transform for features: small images as they are (resized if the size differs),
    ImageNet-style resize to ``size * 256 / 224`` then centre crop for large ones."""
    steps: list[Any] = []
    if native_size is None or native_size != image_size:
        resize = image_size if image_size <= 96 else round(image_size * 256 / 224)
        steps += [T.Resize(resize), T.CenterCrop(image_size)]
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


class MultiView:
    """Apply ``transform`` ``views`` times to one image: the two-crop wrapper (``views=2``)."""

    def __init__(self, transform: Callable, views: int = 2) -> None:
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        self.transform = transform
        self.views = views

    def __call__(self, image: Any) -> list[torch.Tensor]:
        return [self.transform(image) for _ in range(self.views)]

    def __repr__(self) -> str:
        return f"MultiView(views={self.views}, transform={self.transform!r})"


class IndexedDataset(torch.utils.data.Dataset):
    """``(views, index)`` items: the index addresses memory-bank entries (IR, CMC)."""

    def __init__(self, base: torch.utils.data.Dataset, transform: Callable) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(cast(Sized, self.base))

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, _ = self.base[index]
        return self.transform(image), index
