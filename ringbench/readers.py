"""Data-set readers from local files in torchvision's on-disk layouts (never downloading), shared by
pretraining (its data sets and kNN monitor) and transfer (the many-shot linear tasks).

Layouts (so an existing torchvision root works as it is):

* CIFAR-10: ``ROOT/cifar-10-batches-py/{data_batch_1..5, test_batch}`` (Python pickles, read safely);
* CIFAR-100: ``ROOT/cifar-100-python/{train, test}``;
* STL-10: ``ROOT/stl10_binary/{train,test}_{X,y}.bin`` and ``unlabeled_X.bin`` (column-major
  ``uint8`` 3x96x96 images, labels 1-10);
* ImageFolder (ImageNet and any other): ``ROOT/train/<class>/*.jpg`` and ``ROOT/val/<class>/*``.

Each reader checks for its files first and raises a one-line :class:`UserError` naming what is
missing. Every dataset yields ``(PIL image, label)`` and has ``targets``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from PIL import Image

from ringbench.card import load_numpy_pickle
from ringbench.errors import UserError

if TYPE_CHECKING:
    from torchvision.datasets import ImageFolder


class ArrayDataset(torch.utils.data.Dataset):
    """Images in a ``uint8`` array ``(N, H, W, 3)`` (or a memory map) with integer labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Any = None) -> None:
        if len(images) != len(labels):
            raise UserError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.targets = [int(v) for v in labels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(np.ascontiguousarray(self.images[index]))
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def _find_folder(root: Path, folder: str, files: list[str], what: str) -> Path:
    """``root/folder`` (or ``root`` itself when it is that folder) holding every name in ``files``."""
    for base in (root / folder, root):
        if all((base / f).is_file() for f in files):
            return base
    base = root / folder
    missing = [f for f in files if not (base / f).is_file()]
    raise UserError(
        f"{what}: expected {base} with {missing} (torchvision's layout; nothing is downloaded). "
        f"Point --data-root at the folder that contains '{folder}'"
    )


def _load_cifar_pickle(path: Path) -> Mapping[str, Any]:
    """One CIFAR python-format file (a batch or the meta file) through the NumPy-only unpickler."""
    entry = load_numpy_pickle(path, "CIFAR python batch")
    if not isinstance(entry, Mapping):
        raise UserError(f"{path}: not a CIFAR python batch (not a dict)")
    return entry


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    entry = _load_cifar_pickle(path)
    if "data" not in entry or label_key not in entry:
        raise UserError(f"{path}: CIFAR batch without 'data' and '{label_key}'")
    data = np.asarray(entry["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UserError(f"{path}: CIFAR 'data' must be (N, 3072) uint8, got {data.shape}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(entry[label_key], dtype=np.int64)


def cifar_class_names(root: str | Path, num_classes: int = 10) -> list[str]:
    """Class names from CIFAR's meta file (``batches.meta`` / ``meta``); numbers when it is absent."""
    folder, meta, key = (
        ("cifar-10-batches-py", "batches.meta", "label_names")
        if num_classes == 10
        else ("cifar-100-python", "meta", "fine_label_names")
    )
    for base in (Path(root) / folder, Path(root)):
        if (base / meta).is_file():
            names = _load_cifar_pickle(base / meta).get(key)
            if names is not None and len(names) == num_classes:
                return [str(n) for n in names]
    return [str(c) for c in range(num_classes)]


def cifar(root: str | Path, split: str, num_classes: int = 10) -> ArrayDataset:
    """CIFAR-10/100 from torchvision's python layout; ``split`` is ``train`` or ``test``."""
    if split not in ("train", "test"):
        raise UserError(f"CIFAR split must be 'train' or 'test', got {split!r}")
    if num_classes == 10:
        folder, key = "cifar-10-batches-py", "labels"
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    elif num_classes == 100:
        folder, key, names = "cifar-100-python", "fine_labels", [split]
    else:
        raise UserError(f"CIFAR has 10 or 100 classes, not {num_classes}")
    base = _find_folder(Path(root), folder, names, f"CIFAR-{num_classes}")
    parts = [_read_cifar_batch(base / name, key) for name in names]
    return ArrayDataset(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def _read_stl_images(path: Path) -> np.ndarray:
    size = path.stat().st_size
    if size == 0 or size % (3 * 96 * 96):
        raise UserError(f"{path}: size {size} is not a whole number of 3x96x96 STL-10 images")
    raw = np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, 3, 96, 96)
    return raw.transpose(0, 3, 2, 1)  # column-major (C, W, H) on disk -> (H, W, C); a view, not a copy


def stl10(root: str | Path, split: str) -> ArrayDataset | _Concat:
    """STL-10 binary layout; ``split`` in ``train``, ``test``, ``unlabeled``, ``train+unlabeled``
    (the pretraining set; unlabeled images get label -1)."""
    if split not in ("train", "test", "unlabeled", "train+unlabeled"):
        raise UserError(f"STL-10 split must be train, test, unlabeled or train+unlabeled, got {split!r}")
    names = {
        "train": ["train_X.bin", "train_y.bin"],
        "test": ["test_X.bin", "test_y.bin"],
        "unlabeled": ["unlabeled_X.bin"],
    }
    parts = split.split("+")
    required = [name for p in parts for name in names[p]]
    base = _find_folder(Path(root), "stl10_binary", required, "STL-10")
    images, labels = [], []
    for part in parts:
        x = _read_stl_images(base / f"{part}_X.bin")
        if part == "unlabeled":
            y = np.full(len(x), -1, dtype=np.int64)
        else:
            y = np.fromfile(base / f"{part}_y.bin", dtype=np.uint8).astype(np.int64) - 1
        images.append(x)
        labels.append(y)
    if len(images) == 1:
        return ArrayDataset(images[0], labels[0])
    return _Concat([ArrayDataset(x, y) for x, y in zip(images, labels)])


class _Concat(torch.utils.data.ConcatDataset):
    @property
    def targets(self) -> list[int]:
        return [t for d in self.datasets for t in cast(ArrayDataset, d).targets]


def walk_files(folder: str | os.PathLike, seen: dict[str, str] | None = None) -> Iterator[str]:
    """Every file under ``folder`` (sorted, symlinks followed), each real folder entered once: a folder reached
    a second time (a symlink cycle such as ``ln -s .. loop``, or two links to one folder) is refused in one line
    naming both paths, since reading it again would duplicate and mislabel images. ``os.walk`` with
    ``followlinks=True`` (torchvision's ``ImageFolder``) would read it again, or loop until the path is too long.
    ``seen`` (real path -> the path it was first reached by) is shared by walks of one data root."""
    seen = {} if seen is None else seen
    stack = [os.fspath(folder)]
    while stack:
        current = stack.pop()
        real = os.path.realpath(current)
        if real in seen:
            raise UserError(
                f"{current} is {seen[real]} again (a symlink cycle or a second link to one folder); "
                "remove the link, so that no image is read twice"
            )
        seen[real] = current
        try:
            with os.scandir(current) as scan:
                entries = sorted(scan, key=lambda e: e.name)
        except OSError as exc:
            raise UserError(f"{current}: cannot list the folder ({exc.strerror or exc})") from exc
        folders = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows symlinks; a link to itself raises ELOOP
            except OSError as exc:
                raise UserError(f"{entry.path}: cannot follow ({exc.strerror or exc})") from exc
            if is_dir:
                folders.append(entry.path)
            elif entry.is_file():
                yield entry.path
        stack.extend(reversed(folders))


def _image_folder_class() -> type:
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import has_file_allowed_extension

    class _ImageFolder(ImageFolder):
        """torchvision's ``ImageFolder`` whose files come from :func:`walk_files` (no folder read twice)."""

        @staticmethod
        def make_dataset(
            directory: str | os.PathLike,
            class_to_idx: dict[str, int],
            extensions: tuple[str, ...] | None = None,
            is_valid_file: Any = None,
            allow_empty: bool = False,
        ) -> list[tuple[str, int]]:
            def valid(path: str) -> bool:
                if is_valid_file is not None:
                    return bool(is_valid_file(path))
                return has_file_allowed_extension(path, extensions or ())

            seen = {os.path.realpath(directory): os.fspath(directory)}  # shared: class folders linked to others
            samples = [
                (path, index)
                for name, index in sorted(class_to_idx.items())
                for path in walk_files(os.path.join(directory, name), seen)
                if valid(path)
            ]
            found = {index for _, index in samples}
            empty = sorted(name for name, index in class_to_idx.items() if index not in found)
            if empty and not allow_empty:
                raise FileNotFoundError(f"found no valid image for the classes {', '.join(empty)}")
            return samples

    return _ImageFolder


def image_folder(root: str | Path, split: str) -> ImageFolder:
    """``ROOT/<split>/<class>/<image>``; ``train`` falls back to ``ROOT`` itself when it has class folders.
    Folders are walked by :func:`walk_files`: a symlink cycle or a folder linked twice is refused."""
    root = Path(root)
    folder = root / split
    try:
        if not folder.is_dir():
            if split == "train" and root.is_dir() and any(p.is_dir() for p in root.iterdir()):
                folder = root
            else:
                raise UserError(f"ImageFolder: no folder {folder} (expected {root}/{split}/<class>/<images>)")
    except OSError as exc:  # a root that is a symlink to itself
        raise UserError(f"ImageFolder {root}: cannot follow ({exc.strerror or exc})") from exc
    return image_folder_dataset(folder)


def image_folder_dataset(folder: str | Path) -> ImageFolder:
    """torchvision's ``ImageFolder`` over ``folder/<class>/<image>`` (its classes, suffixes and order), its files
    walked by :func:`walk_files`; no class folder, or a class without an image, is a one-line :class:`UserError`."""
    try:
        return _image_folder_class()(str(folder))
    except (FileNotFoundError, RuntimeError) as exc:
        raise UserError(f"ImageFolder {folder}: {' '.join(str(exc).split())[:160]}") from exc
