"""What the trainer reads: the pretraining set (augmented views, with indices), the kNN monitor's
splits, and each epoch's seeded, sharded loader."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sized
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from pretrain import seeds
from pretrain.config import resolved_stem
from pretrain.data.datasets import DataSpec, open_splits
from pretrain.data.transforms import (
    IndexedDataset,
    MultiView,
    eval_transform,
    moco_v2_augmentation,
    ring_official_augmentation,
)


@dataclass
class DataBundle:
    train: IndexedDataset
    knn_train: Dataset
    knn_test: Dataset
    spec: DataSpec
    image_size: int
    stem: str


def prepare_data(cfg: Mapping[str, Any], views: int, labelled: bool = False) -> DataBundle:
    """The pretraining set (multi-view MoCo v2 augmentations, with indices) and the kNN splits;
    ``labelled``: the pretraining set is the labelled training split (STL-10 without its unlabeled images)."""
    train, knn_train, knn_test, spec = open_splits(cfg["data"])
    if labelled:
        train = knn_train
    size = int(cfg["data"]["image_size"] or spec.image_size)
    dc = cfg["data"]
    if dc["mean"] is not None or dc["std"] is not None:  # a recipe's own normalisation (the card records it)
        spec = dataclasses.replace(spec, mean=tuple(dc["mean"] or spec.mean), std=tuple(dc["std"] or spec.std))
    if dc["augmentation"] == "ring_official":
        augment = ring_official_augmentation(size, spec.mean, spec.std, dc["crop_scale_min"])
    else:
        augment = moco_v2_augmentation(
            size,
            spec.mean,
            spec.std,
            dc["blur"],
            dc["jitter_hue"],
            dc["grayscale"],
            dc["color_jitter"],
            dc["crop_scale_min"],
        )
    plain = eval_transform(size, spec.mean, spec.std, native_size=spec.image_size)
    kc = cfg["knn"]
    return DataBundle(
        train=IndexedDataset(train, MultiView(augment, views)),
        knn_train=_subset(_Transformed(knn_train, plain), kc["max_train"], seed=1),
        knn_test=_subset(_Transformed(knn_test, plain), kc["max_test"], seed=2),
        spec=spec,
        image_size=size,
        stem=resolved_stem(cfg, size),
    )


class _Transformed(Dataset):
    def __init__(self, base: Dataset, transform) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(cast(Sized, self.base))

    def __getitem__(self, index: int):
        image, label = self.base[index]
        return self.transform(image), label


def _subset(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    if limit is None or len(cast(Sized, dataset)) <= limit:
        return dataset
    keep = torch.randperm(len(cast(Sized, dataset)), generator=torch.Generator().manual_seed(seed))[:limit]
    return Subset(dataset, sorted(keep.tolist()))


def epoch_loader(dataset: Dataset, cfg: Mapping[str, Any], batch: int, epoch: int, world: int, rank: int) -> DataLoader:
    """This process's batches of ``batch`` images in this epoch.

    The order is a function of (seed, epoch): ``DistributedSampler`` shuffles the whole set and deals
    position ``p`` to process ``p % world``, so global step ``s`` holds positions ``[s*B, (s+1)*B)``
    of the order for any ``world`` (``B = world * batch``). ``drop_last`` on the sampler drops at most
    ``world - 1`` images (no process repeats one to even out), on the loader the images that do not fill
    a batch: ``floor(N / B)`` steps either way. Data workers are seeded per (epoch, rank).
    """
    seed = cfg["train"]["seed"]
    sampler: torch.utils.data.DistributedSampler[int] = torch.utils.data.DistributedSampler(
        dataset, world, rank, shuffle=True, seed=seeds.stream_seed(seed, seeds.ORDER), drop_last=True
    )
    sampler.set_epoch(epoch)
    generator = torch.Generator().manual_seed(seeds.stream_seed(seed, seeds.WORKERS, epoch, rank))
    workers = cfg["data"]["workers"]
    return DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        generator=generator,
        num_workers=workers,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )
