"""Weighted k-nearest-neighbour evaluation on frozen, cached features (Wu et al. 2018).

Tasks ``knn_cifar10``, ``knn_cifar100``, ``knn_stl10``, ``knn_imagenet`` and ``knn_synthetic``
(embedded shapes, nothing on disk). Protocol (Wu et al. 2018, "Unsupervised Feature Learning via
Non-Parametric Instance Discrimination"; the benchmark of VISSL's ``nearest_neighbor`` configs and
mmselfsup's kNN, with their temperature and neighbour counts as the issue fixes them):

1. features of every train and test image (``metadataset.features``: cached per backbone hash,
   the same cache entries as the linear tasks);
2. L2-normalised features; the similarity of a test and a training image is their cosine;
3. the ``k`` most similar training images vote for their class with weight ``exp(s / T)``,
   ``T = 0.07``; the class with the largest vote is the prediction; top-1 accuracy for
   ``k = 20`` and ``k = 200`` (both from one neighbour search, in one record).

The training features are scanned in chunks of :data:`TRAIN_CHUNK` rows against query batches of
:data:`QUERY_BATCH` test images, keeping a running top-``k`` per test image, so that memory stays
bounded whatever the training set (ImageNet's 1.28 M x 2048): see :func:`knn_peak_bytes`. It runs on
``--device`` (a GPU where there is one).

Every record keeps each test image's correctness (``extra.per_episode``: 100 or 0 per test image,
in the images' fixed order), so that the leaderboard's interval is a bootstrap over test images and
its Δ between two cards is paired over the same images.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from ringbench.config import add_schema_flags, settings_from_args
from transfer.linear import data_root_setting, dataset_folder, split_features, synthetic_setting
from transfer.tasks import Task, TaskContext, TaskResult, register

KS = (20, 200)  # neighbour counts reported (Wu et al. 2018 use 200; mmselfsup reports 10, 20, 100, 200)
TEMPERATURE = 0.07  # vote weight exp(s / T) (Wu et al. 2018; mmselfsup; VISSL's default SIGMA is 0.1)
TRAIN_CHUNK = 65_536  # training rows scanned at once
QUERY_BATCH = 1_024  # test rows compared with one chunk at once


@dataclass
class KnnSettings:
    """The kNN family's settings (flags ``--knn-*``) with their defaults."""

    knn_image_size: Optional[int] = field(
        default=None, metadata={"help": "resize images to this size (default: the backbone card's)", "range": (1, None)}
    )
    knn_synthetic_classes: int = field(
        default=32, metadata={"help": "knn_synthetic: shape classes", "range": (2, None)}
    )
    knn_synthetic_train: int = field(
        default=40, metadata={"help": "knn_synthetic: train images per class", "range": (1, None)}
    )
    knn_synthetic_test: int = field(
        default=10, metadata={"help": "knn_synthetic: test images per class", "range": (1, None)}
    )


def add_knn_arguments(parser: argparse.ArgumentParser) -> None:
    """The kNN family's flags (added once to the shared ``transfer/run.py`` parser)."""
    add_schema_flags(parser, KnnSettings, "k-nearest-neighbour tasks (knn_*)")


# --- the search and the vote ---------------------------------------------------------------------


def _normalised(x: np.ndarray | torch.Tensor, device: str) -> torch.Tensor:
    """Rows scaled to unit norm, as float32 on ``device``: a copy (of a memory-mapped chunk, say),
    normalised in place so that the device holds one copy only."""
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.array(x, dtype=np.float32))
    else:
        t = torch.as_tensor(x, dtype=torch.float32).clone()
    t = t.to(device)
    return t.div_(t.norm(dim=1, keepdim=True).clamp_min_(1e-12))


def nearest_neighbours(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    k: int,
    device: str = "cpu",
    chunk: int = TRAIN_CHUNK,
    query_batch: int = QUERY_BATCH,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities ``(M, k)`` (descending) and labels ``(M, k)`` of the ``k`` training
    images nearest to each test image (``k`` is capped at the training set's size).

    ``train_x`` may be a memory map: it is read ``chunk`` rows at a time, normalised on ``device``
    and compared with ``query_batch`` test rows at a time; a running top-``k`` is merged per chunk."""
    n, m = len(train_x), len(test_x)
    k = min(int(k), n)
    if k < 1 or m == 0:
        raise ValueError("nearest_neighbours needs training and test images")
    query = _normalised(test_x, device)
    best_s = torch.full((m, k), -float("inf"), device=device)
    best_y = torch.full((m, k), -1, dtype=torch.long, device=device)
    for start in range(0, n, chunk):
        x = _normalised(train_x[start : start + chunk], device)
        y = torch.as_tensor(np.asarray(train_y[start : start + chunk]), dtype=torch.long, device=device)
        kk = min(k, len(x))
        for q in range(0, m, query_batch):
            sims = query[q : q + query_batch] @ x.T  # (B, chunk)
            top_s, top_i = sims.topk(kk, dim=1)
            both_s = torch.cat([best_s[q : q + query_batch], top_s], dim=1)
            both_y = torch.cat([best_y[q : q + query_batch], y[top_i]], dim=1)
            keep_s, keep_i = both_s.topk(k, dim=1)
            best_s[q : q + query_batch] = keep_s
            best_y[q : q + query_batch] = both_y.gather(1, keep_i)
            del sims, top_s, top_i, both_s, both_y
    return best_s, best_y


def weighted_vote(
    sims: torch.Tensor, labels: torch.Tensor, k: int, num_classes: int, temperature: float = TEMPERATURE
) -> torch.Tensor:
    """Predicted class of each row: the ``k`` nearest (first ``k`` columns) vote ``exp(s / T)``."""
    k = min(k, sims.shape[1])
    votes = torch.zeros(sims.shape[0], num_classes, dtype=sims.dtype, device=sims.device)
    votes.scatter_add_(1, labels[:, :k], (sims[:, :k] / temperature).exp())
    return votes.argmax(dim=1)


def knn_evaluation(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    num_classes: int,
    ks: Sequence[int] = KS,
    temperature: float = TEMPERATURE,
    device: str = "cpu",
    chunk: int = TRAIN_CHUNK,
    query_batch: int = QUERY_BATCH,
) -> dict[int, np.ndarray]:
    """Per ``k``: whether each test image is classified correctly (bool ``(M,)``)."""
    sims, labels = nearest_neighbours(train_x, train_y, test_x, max(ks), device, chunk, query_batch)
    truth = torch.as_tensor(np.asarray(test_y), dtype=torch.long, device=sims.device)
    return {
        k: (weighted_vote(sims, labels, k, num_classes, temperature) == truth).cpu().numpy().astype(bool) for k in ks
    }


def knn_peak_bytes(
    n_test: int, dim: int, k: int = max(KS), chunk: int = TRAIN_CHUNK, query_batch: int = QUERY_BATCH
) -> int:
    """Bytes the search holds at once on its device (float32 features, int64 labels): the normalised
    test features, one normalised training chunk and its labels, one block of similarities and
    its top-k, the running top-k and the merge of one query batch. Independent of the training set's
    size. ImageNet (50,000 x 2048 test, k = 200): about 1.3 GB with the defaults."""
    b = min(query_batch, n_test)
    return (
        4 * n_test * dim  # test features
        + (4 * dim + 8) * chunk  # training chunk and its labels
        + 4 * b * chunk  # similarities of one query batch
        + 12 * n_test * k  # running top-k (similarity, label)
        + 3 * 12 * b * 2 * k  # top-k of the block, the merge and its result
    )


# --- tasks -----------------------------------------------------------------------------------------


def make_knn_task(dataset: str, description: str) -> Task:
    def make_config(args: argparse.Namespace) -> dict[str, Any]:
        settings = settings_from_args(args, KnnSettings)
        config: dict[str, Any] = {
            "dataset": dataset,
            "ks": list(KS),
            "temperature": TEMPERATURE,
            "image_size": settings["knn_image_size"],
            "pooling": "avg",
            "features": "l2-normalised",
            "similarity": "cosine",
        }
        if dataset == "synthetic":
            config["synthetic"] = synthetic_setting(settings, "knn")
        else:
            config["data_root"] = data_root_setting(args)
        return config

    def validate(backbone: Any, config: dict[str, Any]) -> None:
        if dataset != "synthetic":
            dataset_folder(dataset, config["data_root"], f"knn_{dataset}")

    def run(backbone: Any, config: dict[str, Any], ctx: TaskContext) -> TaskResult:
        feats = split_features(backbone, dataset, config, ctx)
        start = time.perf_counter()
        correct = knn_evaluation(
            feats["train"].features,
            feats["train"].labels,
            feats["test"].features,
            feats["test"].labels,
            feats["train"].num_classes,
            config["ks"],
            config["temperature"],
            ctx.device,
        )
        metrics = {f"top1_k{k}": 100.0 * float(c.mean()) for k, c in correct.items()}
        print(
            f"knn_{dataset}: " + ", ".join(f"k={k} top-1 {metrics[f'top1_k{k}']:.2f}%" for k in correct),
            file=sys.stderr,
        )
        n_train, n_test = len(feats["train"].labels), len(feats["test"].labels)
        extra = {
            "samples_over": "test images",  # what the leaderboard's interval is over
            # one value per test image (percent: 100 right, 0 wrong), in the images' fixed order:
            # the leaderboard bootstraps over them and pairs two cards image by image
            "per_episode": {f"top1_k{k}": [100 * int(v) for v in c] for k, c in correct.items()},
            "train_images": n_train,
            "test_images": n_test,
            "neighbours_used": {f"top1_k{k}": min(k, n_train) for k in correct},
            "skipped_images": {s: len(f.skipped) for s, f in feats.items()},
            "feature_cache": {s: {"hit": f.from_cache, "path": str(f.path)} for s, f in feats.items()},
            "search_seconds": round(time.perf_counter() - start, 3),
            "search_peak_bytes": knn_peak_bytes(n_test, int(feats["test"].features.shape[1]), max(config["ks"])),
        }
        return TaskResult(metrics=metrics, extra=extra)

    return Task(
        name=f"knn_{dataset}",
        family="knn",
        description=description,
        make_config=make_config,
        run=run,
        validate=validate,
        add_arguments=add_knn_arguments,
        primary_metric=f"top1_k{max(KS)}",
        headline=tuple(f"top1_k{k}" for k in KS),
        needs_data=dataset != "synthetic",
        unused_flags=()
        if dataset == "synthetic"
        else ("knn_synthetic_classes", "knn_synthetic_train", "knn_synthetic_test"),
    )


for _name, _text in (
    ("cifar10", "weighted kNN (k 20, 200; T 0.07) on CIFAR-10 (torchvision layout under --data-root)"),
    ("cifar100", "weighted kNN (k 20, 200; T 0.07) on CIFAR-100 (torchvision layout under --data-root)"),
    ("stl10", "weighted kNN (k 20, 200; T 0.07) on STL-10 labelled train/test (torchvision layout, --data-root)"),
    ("imagenet", "weighted kNN (k 20, 200; T 0.07) on ImageNet (ImageFolder train/ and val/ under --data-root)"),
    ("synthetic", "weighted kNN (k 20, 200; T 0.07) on the synthetic shapes (embedded)"),
):
    register(make_knn_task(_name, _text))
