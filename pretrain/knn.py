"""Weighted k-nearest-neighbour monitor (Wu et al., CVPR 2018, sec. 3.4).

Each held-out image votes with its ``k`` most similar training images (cosine similarity of
L2-normalised features); neighbour ``i`` adds ``exp(s_i / t)`` to its class. ``k = 200``,
``t = 0.07`` as in the paper.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.07,
    chunk: int = 256,
) -> torch.Tensor:
    """Predicted labels ``(M,)`` of ``test_features`` ``(M, D)`` from ``train_features`` ``(N, D)``."""
    train = F.normalize(train_features.float(), dim=1)
    k = min(k, len(train))
    out = []
    for start in range(0, len(test_features), chunk):
        test = F.normalize(test_features[start : start + chunk].float(), dim=1)
        sim, idx = (test @ train.t()).topk(k, dim=1)
        votes = torch.zeros(len(test), num_classes, device=test.device)
        votes.scatter_add_(1, train_labels[idx], (sim / t).exp())
        out.append(votes.argmax(dim=1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


@torch.no_grad()
def extract_features(
    encode: Callable[[torch.Tensor], torch.Tensor], batches: Iterable, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of every ``(images, labels)`` batch."""
    feats, labels = [], []
    for images, targets in batches:
        feats.append(encode(images.to(device, non_blocking=True)).float().cpu())
        labels.append(torch.as_tensor(targets))
    return torch.cat(feats), torch.cat(labels).long()


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.07,
) -> float:
    """Top-1 accuracy (%) of :func:`knn_predict`."""
    pred = knn_predict(train_features, train_labels, test_features, num_classes, k, t)
    return float((pred == test_labels).float().mean() * 100)
