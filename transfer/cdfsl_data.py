"""BSCD-FSL's four target data sets, read as the benchmark's loaders read them (``IBM/cdfsl-benchmark``,
``datasets/*_few_shot.py`` with the folders of its ``configs.py``). Layouts under ``--data-root``:

* CropDiseases (``CropDisease_few_shot.py``): torchvision ``ImageFolder`` over ``CropDiseases/dataset/train/``,
  ``<class>/<image>``: classes the sorted folder names (38), images every file with an image suffix below each.
* EuroSAT (``EuroSAT_few_shot.py``): ``ImageFolder`` over ``EuroSAT/2750/<class>/<image>.jpg`` (10 classes).
* ISIC 2018 task 3 (``ISIC_few_shot.py``): ``ISIC/ISIC2018_Task3_Training_GroundTruth/
  ISIC2018_Task3_Training_GroundTruth.csv`` (header ``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC``, one-hot rows; the
  class is the first non-zero column) and ``ISIC/ISIC2018_Task3_Training_Input/<image>.jpg`` (7 classes).
* ChestX-ray8 (``Chest_few_shot.py``): ``chestX/Data_Entry_2017.csv`` (columns ``Image Index``, ``Finding
  Labels``, ...) and ``chestX/images/<Image Index>``. Only images with a single finding among Atelectasis,
  Cardiomegaly, Effusion, Infiltration, Mass, Nodule, Pneumothorax are used (``No Finding``, Pneumonia and
  multi-finding images are left out: 7 classes, in that order); each image is first resized to 256 x 256
  (Pillow's bicubic, as the loader's ``Image.resize((256, 256))``) and made RGB.

The whole data set is the pool of every episode, as in the benchmark. A missing file is a one-line
:class:`UserError` naming it and the layout; image folders are torchvision's ``ImageFolder`` walked cycle-safely
(``ringbench.readers.image_folder_dataset``).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ringbench.errors import UserError
from ringbench.readers import image_folder_dataset
from transfer.battery_data import Listing, Split, file_split, need_path

CHESTX_CLASSES = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumothorax")
CHESTX_LEFT_OUT = ("No Finding", "Pneumonia")
CHESTX_SIZE = 256  # Chest_few_shot.py resizes every image to 256 x 256 before its transform

CROP_LAYOUT = "CropDiseases in BSCD-FSL's layout: CropDiseases/dataset/train/<class>/<image>"
EUROSAT_LAYOUT = "EuroSAT (RGB) in BSCD-FSL's layout: EuroSAT/2750/<class>/<image>.jpg"
ISIC_CSV = "ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv"
ISIC_LAYOUT = f"ISIC 2018 task 3 in BSCD-FSL's layout: ISIC/{{{ISIC_CSV}, ISIC2018_Task3_Training_Input/<image>.jpg}}"
CHESTX_LAYOUT = "ChestX-ray8 in BSCD-FSL's layout: chestX/{Data_Entry_2017.csv, images/<Image Index>}"


def image_folder(name: str, folder: Path, layout: str) -> tuple[list[str], list[str], list[int]]:
    """torchvision ``ImageFolder``'s classes (sorted sub-folders) and images, as the benchmark's loaders read them,
    walked cycle-safely (``ringbench.readers.image_folder_dataset``): ``(classes, refs relative to folder, labels)``."""
    need_path(name, folder, layout, folder=True)
    try:
        dataset = image_folder_dataset(folder)
    except UserError as exc:
        raise UserError(f"{name}: {exc} ({layout})") from None
    refs = [os.path.relpath(path, folder).replace(os.sep, "/") for path, _ in dataset.samples]
    return list(dataset.classes), refs, [label for _, label in dataset.samples]


def _rows(path: Path, layout: str) -> tuple[list[str], list[list[str]]]:
    """A CSV file's header and rows (blank lines dropped)."""
    try:
        with open(path, newline="") as handle:
            table = [row for row in csv.reader(handle) if row]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: not a readable CSV file ({exc}; {layout})") from exc
    if not table:
        raise UserError(f"{path}: empty CSV file ({layout})")
    return [h.strip() for h in table[0]], table[1:]


def _single(name: str, folder: Path, refs: list[str], labels: list[int], classes: list[str], layout: str) -> Listing:
    return Listing(name, folder, classes, {"all": file_split(name, folder, refs, labels, layout)})


def read_cropdiseases(root: Path) -> Listing:
    folder = root / "CropDiseases" / "dataset" / "train"
    classes, refs, labels = image_folder("CropDiseases", folder, CROP_LAYOUT)
    return _single("cropdiseases", folder, refs, labels, classes, CROP_LAYOUT)


def read_eurosat(root: Path) -> Listing:
    folder = root / "EuroSAT" / "2750"
    classes, refs, labels = image_folder("EuroSAT", folder, EUROSAT_LAYOUT)
    return _single("eurosat", folder, refs, labels, classes, EUROSAT_LAYOUT)


def read_isic(root: Path) -> Listing:
    name, base = "ISIC 2018", root / "ISIC"
    path = need_path(name, base / ISIC_CSV, ISIC_LAYOUT)
    need_path(name, base / "ISIC2018_Task3_Training_Input", ISIC_LAYOUT, folder=True)
    header, rows = _rows(path, ISIC_LAYOUT)
    if len(header) < 3 or header[0] != "image":
        raise UserError(f"{path}: expected the header 'image,MEL,NV,BCC,AKIEC,BKL,DF,VASC', got {','.join(header)!r}")
    classes = header[1:]
    refs, labels = [], []
    for line, row in enumerate(rows, 2):
        try:
            values = [float(v) for v in row[1 : len(header)]]
        except ValueError:
            values = []
        hot = [i for i, v in enumerate(values) if v != 0]
        if len(values) != len(classes) or not hot:
            raise UserError(f"{path}, line {line}: expected an image name and {len(classes)} one-hot values")
        refs.append(f"ISIC2018_Task3_Training_Input/{row[0].strip()}.jpg")
        labels.append(hot[0])  # the loader's (labels != 0).argmax(axis=1)
    return _single("isic", base, refs, labels, classes, ISIC_LAYOUT)


def read_chestx(root: Path) -> Listing:
    name, base = "ChestX-ray8", root / "chestX"
    path = need_path(name, base / "Data_Entry_2017.csv", CHESTX_LAYOUT)
    need_path(name, base / "images", CHESTX_LAYOUT, folder=True)
    header, rows = _rows(path, CHESTX_LAYOUT)
    if header[:2] != ["Image Index", "Finding Labels"]:
        raise UserError(f"{path}: expected the columns 'Image Index,Finding Labels,...', got {','.join(header[:2])!r}")
    index = {c: i for i, c in enumerate(CHESTX_CLASSES)}
    refs, labels = [], []
    for row in rows:
        findings = row[1].split("|") if len(row) > 1 else []
        if len(findings) == 1 and findings[0] not in CHESTX_LEFT_OUT and findings[0] in index:
            refs.append(f"images/{row[0].strip()}")
            labels.append(index[findings[0]])
    listing = _single("chestx", base, refs, labels, list(CHESTX_CLASSES), CHESTX_LAYOUT)
    plain = listing.splits["all"]
    listing.splits["all"] = Split(plain.refs, plain.labels, _chestx_loader(base, plain.refs), plain.fingerprint)
    return listing


def _chestx_loader(base: Path, refs: list[str]) -> Callable[[int], Any]:
    """The loader's ``Image.open(path).resize((256, 256)).convert('RGB')`` (Pillow's default filter for a
    grey or RGB image: bicubic)."""
    from PIL import Image

    def load(i: int) -> Any:
        with Image.open(base / refs[i]) as image:
            image.load()
            return image.resize((CHESTX_SIZE, CHESTX_SIZE), Image.BICUBIC).convert("RGB")  # type: ignore[attr-defined]

    return load


CDFSL_SETS: dict[str, tuple[str, Callable[[Path], Listing], str]] = {
    "cropdiseases": ("CropDiseases", read_cropdiseases, CROP_LAYOUT),
    "eurosat": ("EuroSAT", read_eurosat, EUROSAT_LAYOUT),
    "isic": ("ISIC 2018", read_isic, ISIC_LAYOUT),
    "chestx": ("ChestX-ray8", read_chestx, CHESTX_LAYOUT),
}
