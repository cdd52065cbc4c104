"""The embedded detection dataset: synthetic shape scenes written as a real COCO dataset.

``write_synthetic_coco(root, ...)`` renders scenes with :func:`ringbench.shapes.render_scene`
(the renderer of the pretraining data) and writes::

    root/annotations/instances_{train,val}.json   boxes, RLE masks, keypoints
    root/images/{train,val}/000000.png ...

Every category (one per shape) carries COCO's ``keypoints`` and ``skeleton`` fields; the OKS sigmas
the keypoint evaluation needs are in ``info.keypoint_oks_sigmas`` and :func:`keypoint_metadata`.
Keypoint coordinates follow COCO's convention (pixel indices: the continuous coordinate minus 0.5),
which is what Detectron2's COCO loader and evaluator assume. Image ``i`` of a split depends only on
``(seed, split, i)``; the folder appears complete or not at all (written beside it, then renamed).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ringbench import shapes
from ringbench.fileio import as_write_error, current_umask

SPLITS = {"train": 0, "val": 1}
DEFAULTS: dict[str, Any] = {
    "num_train": 128,
    "num_val": 32,
    "height": 96,
    "width": 128,
    "max_objects": 3,
    "min_radius": 0.12,
    "max_radius": 0.25,
    "seed": 0,
}


def annotation_path(root: Path, split: str) -> Path:
    return Path(root) / "annotations" / f"instances_{split}.json"


def image_dir(root: Path, split: str) -> Path:
    return Path(root) / "images" / split


def categories() -> list[dict[str, Any]]:
    """COCO categories (id = shape index + 1), each with keypoint names and skeleton."""
    return [
        {
            "id": i + 1,
            "name": name,
            "supercategory": "shape",
            "keypoints": list(shapes.KEYPOINT_NAMES),
            "skeleton": [list(pair) for pair in shapes.KEYPOINT_SKELETON],
        }
        for i, name in enumerate(shapes.SHAPES)
    ]


def keypoint_metadata() -> dict[str, Any]:
    """Detectron2 metadata for the keypoints: names, horizontal-flip pairs, OKS sigmas."""
    return {
        "keypoint_names": list(shapes.KEYPOINT_NAMES),
        "keypoint_flip_map": [tuple(pair) for pair in shapes.KEYPOINT_FLIP_MAP],
        "keypoint_oks_sigmas": list(shapes.KEYPOINT_SIGMAS),
    }


def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_util

    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _coco_keypoints(keypoints: np.ndarray) -> tuple[list[float], int]:
    """Continuous ``(K, 3)`` keypoints -> COCO's flat list in pixel-index coordinates."""
    flat: list[float] = []
    for x, y, v in keypoints:
        if v > 0:
            flat += [round(max(float(x) - 0.5, 0.0), 2), round(max(float(y) - 0.5, 0.0), 2), 2]
        else:
            flat += [0, 0, 0]
    return flat, int(sum(1 for row in keypoints if row[2] > 0))


def build_split(
    split: str,
    num_images: int,
    height: int,
    width: int,
    max_objects: int,
    seed: int,
    min_radius: float = DEFAULTS["min_radius"],
    max_radius: float = DEFAULTS["max_radius"],
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """One split as a COCO dict and its images (pure function of the arguments)."""
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    pixels: list[np.ndarray] = []
    for index in range(num_images):
        rng = np.random.default_rng([seed, SPLITS[split], index])
        image, objects = shapes.render_scene(
            rng, height, width, max_objects=max_objects, min_radius=min_radius, max_radius=max_radius
        )
        image_id = index + 1
        images.append({"id": image_id, "file_name": f"{index:06d}.png", "height": height, "width": width})
        pixels.append(image)
        for obj in objects:
            keypoints, visible = _coco_keypoints(np.asarray(obj["keypoints"], dtype=np.float64))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(obj["category"]) + 1,
                    "bbox": [round(float(v), 2) for v in obj["bbox"]],
                    "area": float(np.asarray(obj["mask"]).sum()),
                    "iscrowd": 0,
                    "segmentation": _rle(np.asarray(obj["mask"])),
                    "keypoints": keypoints,
                    "num_keypoints": visible,
                }
            )
    coco = {
        "info": {
            "description": f"ringbench synthetic shapes ({split})",
            "version": "1",
            "keypoint_oks_sigmas": list(shapes.KEYPOINT_SIGMAS),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories(),
    }
    return coco, pixels


def write_synthetic_coco(
    root: str | os.PathLike,
    num_train: int = DEFAULTS["num_train"],
    num_val: int = DEFAULTS["num_val"],
    height: int = DEFAULTS["height"],
    width: int = DEFAULTS["width"],
    max_objects: int = DEFAULTS["max_objects"],
    min_radius: float = DEFAULTS["min_radius"],
    max_radius: float = DEFAULTS["max_radius"],
    seed: int = DEFAULTS["seed"],
) -> Path:
    """Write the dataset to ``root`` (replacing nothing: the folder must not exist yet)."""
    from PIL import Image

    root = Path(root)
    if root.exists():
        raise FileExistsError(f"{root} already exists")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        os.chmod(staging, 0o777 & ~current_umask())  # the data set's folder: the umask's mode, not mkdtemp's 0700
        for split, count in (("train", num_train), ("val", num_val)):
            coco, pixels = build_split(split, count, height, width, max_objects, seed, min_radius, max_radius)
            folder = image_dir(staging, split)
            folder.mkdir(parents=True)
            for info, image in zip(coco["images"], pixels):
                Image.fromarray(image).save(folder / info["file_name"])
            annotation_path(staging, split).parent.mkdir(exist_ok=True)
            annotation_path(staging, split).write_text(json.dumps(coco))
        os.rename(staging, root)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(f"{root} already exists") from exc  # another process finished first
        if isinstance(exc, OSError):  # a full disk, a read-only cache: one line
            raise as_write_error(root, exc) from exc
        raise
    return root


def dataset_key(params: dict[str, Any]) -> str:
    """Short content key of the generator settings (folder name in the cache)."""
    text = json.dumps({**DEFAULTS, **params}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def ensure_synthetic_coco(cache_dir: str | os.PathLike, **params: Any) -> Path:
    """The dataset for ``params`` under ``cache_dir``, written on first use."""
    unknown = set(params) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown synthetic COCO settings {sorted(unknown)}")
    root = Path(cache_dir) / f"synthetic_coco_{dataset_key(params)}"
    if annotation_path(root, "val").is_file():
        return root
    try:
        return write_synthetic_coco(root, **{**DEFAULTS, **params})
    except FileExistsError:  # written concurrently: another process renamed its copy in first
        if annotation_path(root, "val").is_file():
            return root
        raise
