"""PASCAL VOC2007 classification: the devkit's image lists and its 11-point average precision.

Shared by the tasks that evaluate on VOC2007 classification (``svm_voc2007``,
``svm_voc2007_lowshot``, and the many-shot linear ``linear_voc2007``). The API:

* :func:`read_voc2007_classification` ``(root, split) -> (image paths, labels)``: ``labels`` is
  ``int8 (N, 20)`` in the devkit's encoding, :data:`POSITIVE` (1), :data:`DIFFICULT` (0),
  :data:`NEGATIVE` (-1), columns in :data:`VOC_CLASSES` order;
* :func:`voc11_average_precision` ``(scores, labels) -> float``: one class, exactly as the VOC2007
  devkit's ``VOCevalcls.m`` (difficult images ignored; precision interpolated at recall
  0, 0.1, ..., 1), and :func:`voc11_mean_average_precision` over the 20 columns;
* :func:`voc2007_image_set` ``(root, split) -> (ImageSet, labels)``: the split as an image set for
  ``metadataset.features.cached_features``; each image's "class" is its row, so that the labels of
  the images whose features exist are ``labels[features.labels]`` (a corrupt image is skipped);
* :func:`allpoint_average_precision`: the area under the interpolated precision-recall curve (VOC2010
  and later devkits), which VISSL's and mmselfsup's SVM benchmarks report (``calculate_ap`` in
  VISSL's ``vissl/utils/svm_utils/evaluate.py``): kept so that their published numbers can be compared.

The layout is the devkit's: ``<root>/VOCdevkit/VOC2007/ImageSets/Main/<class>_<split>.txt``, one line
``<image id> <1|0|-1>`` per image of the split (the same images, in the same order, in every class's
file), and ``JPEGImages/<image id>.jpg``. ``root`` may also be the ``VOCdevkit`` or ``VOC2007`` folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from metadataset.sources import ImageSet, data_digest, decode_image
from ringbench.errors import UserError

VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
POSITIVE, DIFFICULT, NEGATIVE = 1, 0, -1
SPLITS = ("train", "val", "trainval", "test")
LAYOUT = (
    "the VOC devkit layout: VOCdevkit/VOC2007/ImageSets/Main/<class>_<split>.txt (lines '<image id> <1|0|-1>') "
    "and VOCdevkit/VOC2007/JPEGImages/<image id>.jpg; nothing is downloaded"
)


def voc2007_folder(root: str | os.PathLike | None) -> Path:
    """The ``VOC2007`` folder under ``root`` (which may be it, ``VOCdevkit`` or the folder above),
    or a one-line :class:`UserError` naming the expected path and the layout."""
    if root is None:
        raise UserError(f"VOC2007 needs its data: pass --data-root (the folder holding VOCdevkit/); {LAYOUT}")
    root = Path(root).expanduser()
    for folder in (root / "VOCdevkit" / "VOC2007", root / "VOC2007", root):
        if (folder / "ImageSets" / "Main").is_dir():
            return folder
    raise UserError(f"VOC2007: expected {root / 'VOCdevkit' / 'VOC2007' / 'ImageSets' / 'Main'}/ ({LAYOUT})")


def _read_class_file(path: Path) -> tuple[list[str], list[int]]:
    if not path.is_file():
        raise UserError(f"VOC2007: expected {path} ({LAYOUT})")
    ids, values = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or parts[1] not in ("1", "0", "-1"):
            raise UserError(f"VOC2007: {path} line {number} is {line!r}, not '<image id> <1|0|-1>' ({LAYOUT})")
        ids.append(parts[0])
        values.append(int(parts[1]))
    return ids, values


def read_voc2007_classification(root: str | os.PathLike | None, split: str) -> tuple[list[Path], np.ndarray]:
    """The images of ``split`` (train, val, trainval, test) and their labels ``int8 (N, 20)``:
    1 positive, 0 difficult, -1 negative (the devkit's values), columns in :data:`VOC_CLASSES` order."""
    if split not in SPLITS:
        raise ValueError(f"unknown VOC2007 split {split!r}; choose one of {SPLITS}")
    folder = voc2007_folder(root)
    main = folder / "ImageSets" / "Main"
    ids: list[str] | None = None
    columns = []
    for name in VOC_CLASSES:
        path = main / f"{name}_{split}.txt"
        these, values = _read_class_file(path)
        if ids is None:
            ids = these
        elif these != ids:
            raise UserError(
                f"VOC2007: {path} lists other images than {main / (VOC_CLASSES[0] + '_' + split + '.txt')} "
                f"(every class's file lists the split's images in the same order; {LAYOUT})"
            )
        columns.append(values)
    assert ids is not None
    if not ids:
        raise UserError(f"VOC2007: {main / (VOC_CLASSES[0] + '_' + split + '.txt')} lists no images ({LAYOUT})")
    if len(set(ids)) != len(ids):
        raise UserError(f"VOC2007: {main / (VOC_CLASSES[0] + '_' + split + '.txt')} lists an image twice ({LAYOUT})")
    paths = [folder / "JPEGImages" / f"{i}.jpg" for i in ids]
    for path in paths:
        if not path.is_file():
            raise UserError(f"VOC2007: expected {path} ({LAYOUT})")
    return paths, np.asarray(columns, dtype=np.int8).T.copy()


def voc2007_image_set(root: str | os.PathLike | None, split: str) -> tuple[ImageSet, np.ndarray]:
    """The images of ``split`` as an :class:`ImageSet` named ``voc2007`` whose class indices are the
    rows of ``labels`` (one "class" per image, named by its id), and ``labels`` as
    :func:`read_voc2007_classification` returns them. The fingerprint covers ids, labels and file sizes."""
    paths, labels = read_voc2007_classification(root, split)

    def items() -> Iterator[tuple[int, str, Any]]:
        for row, path in enumerate(paths):
            yield row, f"{split}/{path.name}", (lambda path=path: decode_image(path.read_bytes()))

    ids = [p.stem for p in paths]
    image_set = ImageSet(
        name="voc2007",
        split=split,
        class_names=ids,
        items=items,
        counts=np.ones(len(ids), dtype=np.int64),
        fingerprint=data_digest("voc2007", split, ids, labels.tolist(), [p.stat().st_size for p in paths]),
    )
    return image_set, labels


# --- average precision -----------------------------------------------------------------------------

# The recall thresholds of the devkit's ``for t=0:0.1:1``: MATLAB's colon operator computes the first
# half of the range as k * 0.1 and the second half as 1 - (10 - k) * 0.1, so 0.3 is 0.30000000000000004
# (a recall of exactly 3/10 does not reach it) and 0.7 is 0.7 (Python's np.arange would give 0.7000000000000001).
RECALL_THRESHOLDS = tuple([k * 0.1 for k in range(6)] + [1 - (10 - k) * 0.1 for k in range(6, 11)])


def _ranked(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Cumulative true and false positives down the ranking (difficult images dropped: they count as
    neither, as in the devkit) and the number of positives. Ties keep the images' order, as MATLAB's
    ``sort(-out)`` (stable) does."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in shape")
    if not np.isin(labels, (POSITIVE, DIFFICULT, NEGATIVE)).all():
        raise ValueError("labels must be 1 (positive), 0 (difficult) or -1 (negative)")
    keep = labels != DIFFICULT
    scores, labels = scores[keep], labels[keep]
    positives = int((labels == POSITIVE).sum())
    if positives == 0:
        raise ValueError("average precision needs at least one positive image")
    order = np.argsort(-scores, kind="stable")
    hits = labels[order] == POSITIVE
    return np.cumsum(hits), np.cumsum(~hits), positives


def voc11_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """The VOC2007 devkit's classification AP (``VOCevalcls.m``), a fraction in [0, 1]: the mean
    over recall thresholds t = 0, 0.1, ..., 1 of the largest precision at a recall of at least t
    (0 where none). ``labels``: 1 positive, 0 difficult (ignored), -1 negative."""
    tp, fp, positives = _ranked(scores, labels)
    recall = tp / positives
    precision = tp / (tp + fp)
    total = 0.0
    for t in RECALL_THRESHOLDS:
        reached = precision[recall >= t]
        total += float(reached.max()) if reached.size else 0.0
    return total / 11


def allpoint_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """The area under the precision-recall curve with precision made monotone (VOC2010+ devkits;
    VISSL's and mmselfsup's SVM benchmarks), a fraction; difficult images ignored."""
    tp, fp, positives = _ranked(scores, labels)
    recall = np.concatenate([[0.0], tp / positives, [1.0]])
    precision = np.concatenate([[0.0], tp / (tp + fp), [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[steps] - recall[steps - 1]) * precision[steps]))


def voc11_mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> tuple[float, list[float]]:
    """The mean over classes (columns) of :func:`voc11_average_precision`, and each class's AP."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    if scores.ndim != 2 or scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be the same (N, classes)")
    aps = [voc11_average_precision(scores[:, c], labels[:, c]) for c in range(scores.shape[1])]
    return float(np.mean(aps)), aps
