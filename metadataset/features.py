"""Frozen-backbone features, extracted once per image and cached on disk.

A cache entry is a folder ``<cache>/features/<source>-<split>-<size>px-<pooling>-<precision>-<sha256[:16]>/``
with

* ``features.npy``: ``float32 (N, D)``, opened memory-mapped;
* ``labels.npy``: ``int64 (N,)`` class index of every row;
* ``index.json``: the key, shapes, class names and skipped images; written last, so an entry
  without it is incomplete and ignored.

The key is ``(backbone sha256, source, split, data fingerprint, image size, pooling, precision,
normalisation, code version)``; precision is ``fp16-autocast`` on CUDA and ``fp32`` elsewhere, so
features computed on a GPU are never reused as if they were fp32 ones. An entry whose stored key
differs from the expected one (another backbone, another version of this code, changed data) or
whose arrays do not match its index is rebuilt with a message, never reused. Every file is
written to a temporary name and renamed.

Images are resized to ``image_size`` squared (no crop, as Meta-Dataset does; ``resize="square"``) or,
with ``resize="shorter-bicubic-crop"`` (Kornblith et al. 2019's linear evaluation), their shorter side
to ``image_size`` by bicubic interpolation and then centre-cropped to ``image_size`` squared
(torchvision's ``Resize(size, BICUBIC)`` + ``CenterCrop(size)``), or, with ``resize="scale-1.15-crop"``
(BSCD-FSL's and ssl-transfer ``few_shot.py``'s test transform, ``Scale`` then ``CenterCrop``), to the square
``int(1.15 * image_size)`` by bilinear interpolation and then centre-cropped to ``image_size`` squared
(torchvision's ``Resize([s, s])`` + ``CenterCrop(size)``); then normalised with the backbone's own mean and
std. The resize is part of the key when it is not the default. A corrupt image is skipped with a warning and
counted.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metadataset.sources import ImageSet
from ringbench import __version__
from ringbench.errors import UserError
from ringbench.fileio import as_write_error, atomic_write, atomic_write_text, remove_stale_temps, temp_prefix

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump whenever extraction changes what is stored
POOLINGS = ("avg",)  # the backbone's global average pooling
RESIZES = ("square", "shorter-bicubic-crop", "scale-1.15-crop")
SCALE_BEFORE_CROP = 1.15  # BSCD-FSL: ``Scale([int(1.15 * size)] * 2)`` before ``CenterCrop(size)``
MAX_WARNINGS = 20


@dataclass
class FeatureSet:
    """Features of every usable image of an :class:`ImageSet`."""

    features: np.ndarray  # (N, D) float32, memory-mapped when read from the cache
    labels: np.ndarray  # (N,) int64
    class_names: list[str]
    path: Path
    from_cache: bool
    skipped: list[str] = field(default_factory=list)  # references of corrupt images
    seconds: float = 0.0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)


def code_version() -> str:
    return f"{__version__}/features-{CACHE_VERSION}"


def precision_of(device: str) -> str:
    """The arithmetic features are computed in: fp16 autocast on CUDA, fp32 elsewhere."""
    return "fp16-autocast" if torch.device(device).type == "cuda" else "fp32"


def cache_key(
    backbone: Any, image_set: ImageSet, image_size: int, pooling: str, precision: str = "fp32", resize: str = "square"
) -> dict[str, Any]:
    key = {
        "backbone_sha256": backbone.sha256,
        "source": image_set.name,
        "split": image_set.split,
        "data": image_set.fingerprint,
        "image_size": int(image_size),
        "pooling": pooling,
        "precision": precision,
        "mean": [float(v) for v in backbone.mean],
        "std": [float(v) for v in backbone.std],
        "code_version": code_version(),
    }
    if resize != "square":  # the default is left out of the key: entries written before it existed stay valid
        key["resize"] = resize
    return key


def cache_folder(cache_dir: Path, key: dict[str, Any]) -> Path:
    name = f"{key['source']}-{key['split']}-{key['image_size']}px-{key['pooling']}-{key['precision']}"
    if "resize" in key:
        name += f"-{key['resize']}"
    name += f"-{key['backbone_sha256'][:16]}"
    return Path(cache_dir) / "features" / name


def load_cached(folder: Path, key: dict[str, Any]) -> FeatureSet | None:
    """The cached features if ``folder`` holds a complete entry with exactly this key, else None
    (with a message saying why an existing entry is not used)."""
    index_path = folder / "index.json"
    if not index_path.is_file():
        return None
    try:
        index = json.loads(index_path.read_text())
        stored = index["key"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        log.warning("%s: unreadable feature-cache index; rebuilding", index_path)
        return None
    if stored != key:
        diff = sorted(k for k in set(stored) | set(key) if stored.get(k) != key.get(k))
        log.warning("%s: feature cache was written for another %s (stale); rebuilding", folder, ", ".join(diff))
        return None
    try:
        features = np.load(folder / "features.npy", mmap_mode="r")
        labels = np.load(folder / "labels.npy")
    except (OSError, ValueError) as exc:
        log.warning("%s: feature cache arrays unreadable (%s); rebuilding", folder, exc)
        return None
    if list(features.shape) != index["shape"] or labels.shape != (features.shape[0],) or features.dtype != np.float32:
        log.warning("%s: feature cache arrays do not match their index; rebuilding", folder)
        return None
    return FeatureSet(
        features=features,
        labels=labels,
        class_names=list(index["class_names"]),
        path=folder,
        from_cache=True,
        skipped=list(index.get("skipped", [])),
        seconds=float(index.get("seconds", 0)),
    )


def preprocess(
    image: Any, image_size: int, mean: torch.Tensor, std: torch.Tensor, resize: str = "square"
) -> torch.Tensor:
    """PIL image -> normalised ``(3, S, S)`` float tensor: bilinear resize to a square, no crop
    (``square``), or shorter side to ``S`` bicubic then the centre ``S x S`` (``shorter-bicubic-crop``), or
    bilinear to the square ``int(1.15 S)`` then the centre ``S x S`` (``scale-1.15-crop``)."""
    from PIL import Image

    image = image.convert("RGB")
    if resize == "shorter-bicubic-crop":
        import torchvision.transforms.functional as tf

        image = tf.center_crop(tf.resize(image, image_size, tf.InterpolationMode.BICUBIC), [image_size, image_size])
    elif resize == "scale-1.15-crop":
        import torchvision.transforms.functional as tf

        scaled = int(image_size * SCALE_BEFORE_CROP)
        image = tf.center_crop(
            tf.resize(image, [scaled, scaled], tf.InterpolationMode.BILINEAR), [image_size, image_size]
        )
    elif image.size != (image_size, image_size):
        # Pillow sets its module-level filter constants with setattr, out of mypy's sight; the
        # typed Image.Resampling needs Pillow >= 9.1 (the project allows 9.0).
        image = image.resize((image_size, image_size), Image.BILINEAR)  # type: ignore[attr-defined]
    array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    return (array - mean[:, None, None]) / std[:, None, None]


def _batches(
    image_set: ImageSet,
    image_size: int,
    mean: torch.Tensor,
    std: torch.Tensor,
    batch_size: int,
    skipped: list[str],
    resize: str = "square",
) -> Iterator[tuple[torch.Tensor, list[int]]]:
    images: list[torch.Tensor] = []
    labels: list[int] = []
    for label, ref, load in image_set.items():
        try:
            images.append(preprocess(load(), image_size, mean, std, resize))
        except Exception as exc:
            skipped.append(ref)
            if len(skipped) <= MAX_WARNINGS:
                warnings.warn(
                    f"{image_set.name}: skipping corrupt image {ref} ({type(exc).__name__}: {exc})", stacklevel=2
                )
            continue
        labels.append(label)
        if len(images) == batch_size:
            yield torch.stack(images), labels
            images, labels = [], []
    if images:
        yield torch.stack(images), labels


def cached_features(
    backbone: Any,
    image_set: ImageSet,
    cache_dir: str | os.PathLike,
    image_size: int | None = None,
    pooling: str = "avg",
    device: str = "cpu",
    batch_size: int = 128,
    progress: bool = True,
    resize: str = "square",
    build_model: Callable[[str], Any] | None = None,
) -> FeatureSet:
    """Features of every image of ``image_set``: from the cache when its key matches, else
    computed (``backbone.build_model``, or ``build_model(device)``: one model built once for several image
    sets) and cached. ``resize``: one of :data:`RESIZES` (module docstring)."""
    if pooling not in POOLINGS:
        raise UserError(f"unknown pooling {pooling!r}; choose one of {list(POOLINGS)}")
    if resize not in RESIZES:
        raise UserError(f"unknown resize {resize!r}; choose one of {list(RESIZES)}")
    image_size = int(image_size or backbone.default_image_size)
    key = cache_key(backbone, image_set, image_size, pooling, precision_of(device), resize)
    folder = cache_folder(Path(cache_dir), key)
    cached = load_cached(folder, key)
    if cached is not None:
        return cached
    start = time.perf_counter()
    model = (build_model or backbone.build_model)(device)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    mean = torch.tensor(backbone.mean, dtype=torch.float32)
    std = torch.tensor(backbone.std, dtype=torch.float32)
    skipped: list[str] = []
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder)  # the temporary files of killed extractions
    (folder / "index.json").unlink(missing_ok=True)  # a stale entry stays invalid until rebuilt
    labels: list[int] = []
    dim = None
    from tqdm import tqdm

    bar = tqdm(
        total=len(image_set),
        desc=f"features {image_set.name}/{image_set.split}",
        unit="img",
        disable=not progress,
        leave=False,
    )
    try:
        fd, raw_path = tempfile.mkstemp(prefix=temp_prefix("features"), suffix=".raw", dir=folder)
    except OSError as exc:
        raise as_write_error(folder, exc) from exc
    try:
        with os.fdopen(fd, "wb") as raw, torch.inference_mode():
            for images, batch_labels in _batches(image_set, image_size, mean, std, batch_size, skipped, resize):
                images = images.to(device, non_blocking=True)
                if cuda:
                    images = images.to(memory_format=torch.channels_last)
                with torch.autocast("cuda", enabled=cuda):
                    out = model(images)
                out = out.float().reshape(len(images), -1).cpu().numpy()
                dim = out.shape[1]
                try:
                    raw.write(np.ascontiguousarray(out, dtype=np.float32).tobytes())
                except OSError as exc:
                    raise as_write_error(raw_path, exc) from exc
                labels.extend(batch_labels)
                bar.update(len(batch_labels))
        bar.close()
        if len(skipped) > MAX_WARNINGS:
            warnings.warn(f"{image_set.name}: skipped {len(skipped)} corrupt images in total", stacklevel=2)
        if dim is None:
            raise UserError(
                f"{image_set.name}/{image_set.split}: no readable image "
                f"({len(skipped)} corrupt, {len(image_set)} listed)"
            )
        n = len(labels)
        with atomic_write(folder / "features.npy", "wb") as handle:
            np.lib.format.write_array_header_1_0(
                handle,
                {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                    "fortran_order": False,
                    "shape": (n, dim),
                },
            )
            with open(raw_path, "rb") as raw:
                shutil.copyfileobj(raw, handle, 1 << 22)
    finally:
        if os.path.exists(raw_path):
            os.unlink(raw_path)
    with atomic_write(folder / "labels.npy", "wb") as handle:
        np.save(handle, np.asarray(labels, dtype=np.int64))
    seconds = time.perf_counter() - start
    index = {
        "key": key,
        "shape": [n, dim],
        "class_names": list(image_set.class_names),
        "skipped": skipped,
        "seconds": round(seconds, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "info": image_set.info,
    }
    atomic_write_text(folder / "index.json", json.dumps(index, indent=1))
    log.info(
        "%s/%s: %d features (%d-d) in %.1fs, cached in %s", image_set.name, image_set.split, n, dim, seconds, folder
    )
    return FeatureSet(
        features=np.load(folder / "features.npy", mmap_mode="r"),
        labels=np.asarray(labels, dtype=np.int64),
        class_names=list(image_set.class_names),
        path=folder,
        from_cache=False,
        skipped=skipped,
        seconds=seconds,
    )
