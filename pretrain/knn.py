"""The weighted k-nearest-neighbour monitor (Wu et al., CVPR 2018, sec. 3.4): how well a method's
backbone features separate a held-out split's classes while it trains, with no training of its own.

Each held-out image votes with its ``k`` most similar training images (cosine similarity of
L2-normalised features); neighbour ``i`` adds ``exp(s_i / t)`` to its class. ``k = 200``,
``t = 0.07`` as in the paper.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from pretrain.step import to_device

if TYPE_CHECKING:
    from pretrain.data.loaders import DataBundle
    from pretrain.methods import Method


def monitor_due(cfg: Mapping[str, Any], epoch: int) -> bool:
    """Whether the monitor runs after ``epoch`` (1-based): every ``knn.every`` epochs and the last."""
    kc = cfg["knn"]
    return bool(kc["enabled"]) and (epoch % kc["every"] == 0 or epoch == cfg["train"]["epochs"])


def evaluate_knn(method: Method, data: DataBundle, cfg: Mapping[str, Any], device: torch.device) -> float:
    """kNN top-1 (%) on the held-out split with the method's backbone features."""
    kc = cfg["knn"]
    loader = lambda ds: DataLoader(ds, batch_size=256, shuffle=False, num_workers=cfg["data"]["workers"])  # noqa: E731
    was_training = method.training
    method.eval()
    encode = lambda x: method.features(to_device(x, device, cfg))  # noqa: E731
    try:
        train_f, train_y = _embed(encode, loader(data.knn_train), device)
        test_f, test_y = _embed(encode, loader(data.knn_test), device)
    finally:
        method.train(was_training)
    labelled = train_y >= 0
    return knn_accuracy(train_f[labelled], train_y[labelled], test_f, test_y, data.spec.num_classes, kc["k"], kc["t"])


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
def _embed(
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
