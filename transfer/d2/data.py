"""Dataset registration for the Detectron2 tasks: COCO 2017, PASCAL VOC 07+12, synthetic shapes.

Roots follow Detectron2's convention: ``--data-root`` or the ``DETECTRON2_DATASETS`` environment
variable, holding ``coco/`` and ``VOC2007/``, ``VOC2012/`` as Detectron2's builtin datasets expect.
Nothing is downloaded: a missing file is a :class:`UserError` naming the expected path and how to get
the data. Every dataset, the synthetic one included, is registered through Detectron2's own
functions (``register_coco_instances``, ``register_pascal_voc``).

The file checks (``coco_files``, ``voc_files``, :func:`check_files`) do not import Detectron2, so
that a task can validate its inputs before anything heavy starts.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ringbench.errors import UserError
from ringbench.fileio import resolved_path

ENV_VAR = "DETECTRON2_DATASETS"
COCO_HOWTO = (
    "download COCO 2017 (train2017, val2017 images and annotations_trainval2017) and unpack it as "
    "<root>/coco/{train2017,val2017,annotations}; <root> is --data-root or $" + ENV_VAR
)
VOC_HOWTO = (
    "download PASCAL VOC 2007 (trainval and test) and VOC 2012 (trainval) and unpack them as "
    "<root>/VOC2007 and <root>/VOC2012 (each with Annotations/, ImageSets/Main/, JPEGImages/); "
    "<root> is --data-root or $" + ENV_VAR
)


@dataclass
class Splits:
    """Registered dataset names and what the evaluator needs."""

    train: tuple[str, ...]
    test: tuple[str, ...]
    evaluator: str  # "coco" | "voc"
    num_classes: int
    num_keypoints: int = 0
    kpt_oks_sigmas: list[float] = field(default_factory=list)


def resolve_data_root(explicit: str | os.PathLike | None) -> Path | None:
    """``--data-root`` if given, else ``$DETECTRON2_DATASETS``, else None."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else None


def coco_files(root: Path, annotations: str) -> dict[str, tuple[Path, Path]]:
    """``split -> (json file, image folder)`` for COCO 2017 (``annotations``: instances / person_keypoints)."""
    coco = Path(root) / "coco"
    return {
        split: (coco / "annotations" / f"{annotations}_{split}2017.json", coco / f"{split}2017")
        for split in ("train", "val")
    }


def voc_files(root: Path) -> dict[str, tuple[Path, str, int]]:
    """``name -> (VOC folder, split, year)`` for VOC07+12 trainval and VOC07 test."""
    root = Path(root)
    return {
        "voc_2007_trainval": (root / "VOC2007", "trainval", 2007),
        "voc_2012_trainval": (root / "VOC2012", "trainval", 2012),
        "voc_2007_test": (root / "VOC2007", "test", 2007),
    }


def check_files(task: str, root: Path | None) -> None:
    """Raise :class:`UserError` naming the first missing file of a real dataset."""
    if task.startswith("syn_"):
        return
    howto = VOC_HOWTO if task.startswith("voc") else COCO_HOWTO
    if root is None:
        raise UserError(f"task {task} needs a dataset root: pass --data-root or set ${ENV_VAR}; {howto}")
    if task.startswith("voc"):
        paths = []
        for folder, split, _ in voc_files(root).values():
            paths += [folder / "ImageSets" / "Main" / f"{split}.txt", folder / "Annotations", folder / "JPEGImages"]
    else:
        kind = "person_keypoints" if task == "coco_kp" else "instances"
        paths = [p for pair in coco_files(root, kind).values() for p in pair]
    for path in paths:
        if not path.exists():
            raise UserError(f"task {task}: expected {path}, which does not exist; {howto}")


def _name(base: str, root: Path) -> str:
    """Dataset names carry a hash of the root, so two roots can be registered in one process."""
    return f"{base}@{hashlib.sha256(str(resolved_path(root, 'data root')).encode()).hexdigest()[:8]}"


def _register_coco(name: str, metadata: dict[str, Any], json_file: Path, image_root: Path) -> str:
    from transfer.d2.compat import d2

    D2 = d2()
    if name not in D2.data.DatasetCatalog.list():
        D2.data.datasets.register_coco_instances(name, metadata, str(json_file), str(image_root))
    return name


def register_coco(root: Path, task: str) -> Splits:
    from transfer.d2.compat import d2

    keypoints = task == "coco_kp"
    kind = "person_keypoints" if keypoints else "instances"
    metadata: dict[str, Any] = {}
    if keypoints:
        builtin = d2().data.datasets.builtin_meta._get_builtin_metadata("coco_person")
        metadata = {k: builtin[k] for k in ("keypoint_names", "keypoint_flip_map", "keypoint_connection_rules")}
    names = {
        split: _register_coco(_name(f"rb_coco_2017_{split}_{kind}", root), metadata, js, img)
        for split, (js, img) in coco_files(root, kind).items()
    }
    return Splits(
        (names["train"],),
        (names["val"],),
        "coco",
        num_classes=1 if keypoints else 80,
        num_keypoints=17 if keypoints else 0,
    )


def register_voc(root: Path) -> Splits:
    from transfer.d2.compat import d2

    D2 = d2()
    registered = {}
    for base, (folder, split, year) in voc_files(root).items():
        name = _name(base, root)
        if name not in D2.data.DatasetCatalog.list():
            D2.data.datasets.register_pascal_voc(name, str(folder), split, year)
            D2.data.MetadataCatalog.get(name).set(evaluator_type="pascal_voc")
        registered[base] = name
    return Splits(
        (registered["voc_2007_trainval"], registered["voc_2012_trainval"]),
        (registered["voc_2007_test"],),
        "voc",
        num_classes=20,
    )


def splits_without_data(task: str) -> Splits:
    """The splits of ``task`` under Detectron2's builtin names, nothing registered or read (``--print-config``)."""
    from ringbench import shapes

    if task.startswith("syn_"):
        return Splits(
            ("rb_synthetic_train",),
            ("rb_synthetic_val",),
            "coco",
            num_classes=shapes.NUM_SHAPES,
            num_keypoints=shapes.NUM_KEYPOINTS,
            kpt_oks_sigmas=list(shapes.KEYPOINT_SIGMAS),
        )
    if task.startswith("voc"):
        return Splits(("voc_2007_trainval", "voc_2012_trainval"), ("voc_2007_test",), "voc", num_classes=20)
    if task == "coco_kp":
        return Splits(("keypoints_coco_2017_train",), ("keypoints_coco_2017_val",), "coco", 1, num_keypoints=17)
    return Splits(("coco_2017_train",), ("coco_2017_val",), "coco", num_classes=80)


def register_synthetic(root: Path) -> Splits:
    """Register a dataset written by :mod:`transfer.d2.synthetic_coco` (train and val)."""
    from ringbench import shapes
    from transfer.d2 import synthetic_coco

    meta = synthetic_coco.keypoint_metadata()
    sigmas = meta.pop("keypoint_oks_sigmas")
    metadata = {**meta, "thing_classes": list(shapes.SHAPES)}
    names = {
        split: _register_coco(
            _name(f"rb_synthetic_{split}", root),
            metadata,
            synthetic_coco.annotation_path(root, split),
            synthetic_coco.image_dir(root, split),
        )
        for split in ("train", "val")
    }
    return Splits(
        (names["train"],),
        (names["val"],),
        "coco",
        num_classes=shapes.NUM_SHAPES,
        num_keypoints=shapes.NUM_KEYPOINTS,
        kpt_oks_sigmas=list(sigmas),
    )
