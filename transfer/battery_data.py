"""The many-shot linear battery's data sets (Kornblith et al. 2019), read from their on-disk layouts.

One reader per data set, each over the files torchvision's class of that name reads with
``download=False`` (so an existing torchvision root works as it is), or, where torchvision has no
class or no split, over the creators' own release. Nothing is downloaded, and no checksum of the
official archives is asked for, so subsets work. Layouts under ``--data-root``:

* FGVC-Aircraft (``FGVCAircraft``, variant level): ``fgvc-aircraft-2013b/data/{variants.txt,
  images_variant_{train,val,test}.txt, images/<id>.jpg}``; the creators' train / val / test.
* Stanford Cars (``StanfordCars``, its current layout): ``stanford_cars/{cars_train/, cars_test/,
  cars_test_annos_withlabels.mat, devkit/{cars_train_annos.mat, cars_meta.mat}}``.
* DTD (``DTD``, partition 1): ``dtd/dtd/{images/<class>/<name>.jpg, labels/{train1,val1,test1}.txt}``
  (torchvision's), or the archive's ``dtd/{images, labels}`` directly.
* Flowers-102 (``Flowers102``): ``flowers-102/{jpg/image_<05d>.jpg, imagelabels.mat, setid.mat}``
  (``trnid`` / ``valid`` / ``tstid``).
* Food-101 (``Food101``): ``food-101/{images/<class>/<id>.jpg, meta/train.json, meta/test.json}``.
* Oxford-IIIT Pet (``OxfordIIITPet``): ``oxford-iiit-pet/{images/<id>.jpg, annotations/trainval.txt,
  annotations/test.txt}``.
* SUN397 (``SUN397`` has no split; the official partition files, as ssl-transfer reads them):
  ``SUN397/{ClassName.txt, <letter>/<class>/sun_*.jpg}`` and ``Training_01.txt`` / ``Testing_01.txt``
  (the first of the ten partitions) in ``SUN397/Partitions/`` or ``SUN397/`` itself.
* Caltech-101 (``Caltech101``): ``caltech101/101_ObjectCategories/<class>/image_<04d>.jpg``;
  ``BACKGROUND_Google`` is left out as torchvision does; 30 random training images per class
  (seeded), the rest test.
* Birdsnap (no torchvision class; the creators' release v1.1 after its ``get_birdsnap.py``):
  ``birdsnap/{species.txt, test_images.txt, download/images/<dir>/<file>.jpg}`` (``images/`` directly
  under ``birdsnap/`` is read too). ``species.txt`` is tab-separated with a header (``id common
  scientific dir``): the classes in id order, each read from its ``dir``; ``test_images.txt`` (a
  header line, then ``<dir>/<file>.jpg`` per line) names the test images, every other image is
  train. Images the download did not get are absent (Flickr removes photos): the listed test images
  that are missing are counted in the record, not an error.
* CIFAR-10/100: the "python version" batches (``ringbench.readers``).
* PASCAL VOC2007 classification (the devkit's layout, ``transfer.voc07``): ``VOCdevkit/VOC2007/
  {ImageSets/Main/<class>_{train,val,test}.txt, JPEGImages/<id>.jpg}``; the creators' train / val / test.
  Its labels are a matrix ``(N, 20)`` in the devkit's encoding (1 positive, 0 difficult, -1 negative):
  a multi-label problem, one binary classifier per class.

A missing file or folder is a one-line :class:`UserError` naming the expected path and the layout.
Each reader returns :class:`Listing`: class names and, per split, labels and a loader per image.
:data:`BATTERY` is the table the linear tasks iterate over: reader, split rule and metric.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ringbench.errors import UserError
from ringbench.readers import walk_files
from transfer.voc07 import LAYOUT as VOC_LAYOUT
from transfer.voc07 import VOC_CLASSES, read_voc2007_classification, voc2007_folder

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CALTECH_TRAIN_PER_CLASS = 30  # Kornblith et al. 2019, as Fei-Fei et al. 2004


@dataclass
class Split:
    """The images of one split: ``labels[i]`` of the image ``refs[i]`` (a path relative to the data set's
    folder, or an index), read by ``load(i)`` (a PIL image; raises on a corrupt one)."""

    refs: list[str]
    labels: np.ndarray
    load: Callable[[int], Any]
    fingerprint: Any  # what identifies the split's data (file sizes, an array listing)

    def __len__(self) -> int:
        return len(self.refs)


@dataclass
class Listing:
    """One data set: class names and its splits (``train``, ``test`` and, when its creators give one, ``val``)."""

    name: str
    folder: Path
    classes: list[str]
    splits: dict[str, Split]
    info: dict[str, Any] = field(default_factory=dict)  # e.g. Birdsnap's images the download did not get


# --- helpers -----------------------------------------------------------------------------------------


def _missing(name: str, path: Path, layout: str) -> UserError:
    return UserError(f"{name}: expected {path} ({layout}); nothing is downloaded")


def need_path(name: str, path: Path, layout: str, folder: bool = False) -> Path:
    """``path`` (a folder if ``folder``), or a one-line :class:`UserError` naming it and the data set's layout."""
    if not (path.is_dir() if folder else path.is_file()):
        raise _missing(name, path, layout)
    return path


def _lines(path: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not a text file ({exc})") from exc


def _loadmat(name: str, path: Path, layout: str, keys: tuple[str, ...]) -> dict[str, Any]:
    import scipy.io

    need_path(name, path, layout)
    try:
        mat = scipy.io.loadmat(str(path), squeeze_me=True)
    except Exception as exc:  # scipy raises ValueError, TypeError, MatReadError... on a bad file
        raise UserError(f"{path}: not a readable .mat file ({type(exc).__name__}: {exc})") from exc
    absent = [k for k in keys if k not in mat]
    if absent:
        raise UserError(f"{path}: no {', '.join(absent)} in this .mat file ({layout})")
    return mat


def _open_image(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


def file_split(name: str, folder: Path, refs: list[str], labels: list[int], layout: str) -> Split:
    """A split of image files ``folder/ref``; a listed file that is absent is a one-line error."""
    sizes = []
    for ref in refs:
        try:
            sizes.append(os.path.getsize(folder / ref))
        except OSError:
            raise UserError(
                f"{name}: expected {folder / ref} (listed by the split files; {layout}); nothing is downloaded"
            ) from None
    return Split(
        refs=list(refs),
        labels=np.asarray(labels, dtype=np.int64),
        load=lambda i: _open_image(folder / refs[i]),
        fingerprint=[list(refs), sizes],
    )


def _within(folder: Path, ref: str) -> str:
    """``ref`` if it names a file inside ``folder`` (no absolute path, no ``..``), else a :class:`UserError`."""
    parts = Path(ref).parts
    if not ref or Path(ref).is_absolute() or ".." in parts:
        raise UserError(f"{folder}: the split files name {ref!r}, which is not a path inside the data set")
    return ref


# --- the readers ---------------------------------------------------------------------------------------


AIRCRAFT_LAYOUT = (
    "FGVC-Aircraft in torchvision's layout: fgvc-aircraft-2013b/data/{variants.txt, "
    "images_variant_{train,val,test}.txt, images/<id>.jpg}"
)


def read_aircraft(root: Path, seed: int = 0) -> Listing:
    name = "FGVC-Aircraft"
    data = root / "fgvc-aircraft-2013b" / "data"
    classes = _lines(need_path(name, data / "variants.txt", AIRCRAFT_LAYOUT))
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split in ("train", "val", "test"):
        refs, labels = [], []
        for line in _lines(need_path(name, data / f"images_variant_{split}.txt", AIRCRAFT_LAYOUT)):
            image, _, label = line.partition(" ")
            if label not in index:
                raise UserError(f"{data / f'images_variant_{split}.txt'}: variant {label!r} is not in variants.txt")
            refs.append(f"images/{_within(data, image)}.jpg")
            labels.append(index[label])
        splits[split] = file_split(name, data, refs, labels, AIRCRAFT_LAYOUT)
    return Listing("aircraft", data, classes, splits)


CARS_LAYOUT = (
    "Stanford Cars in torchvision's layout: stanford_cars/{cars_train/, cars_test/, "
    "cars_test_annos_withlabels.mat, devkit/{cars_train_annos.mat, cars_meta.mat}}"
)


def read_cars(root: Path, seed: int = 0) -> Listing:
    name = "Stanford Cars"
    base = root / "stanford_cars"
    meta = _loadmat(name, base / "devkit" / "cars_meta.mat", CARS_LAYOUT, ("class_names",))
    classes = [str(c) for c in np.atleast_1d(meta["class_names"]).tolist()]
    splits = {}
    for split, annos in (
        ("train", base / "devkit" / "cars_train_annos.mat"),
        ("test", base / "cars_test_annos_withlabels.mat"),
    ):
        images = need_path(name, base / f"cars_{split}", CARS_LAYOUT, folder=True)
        records = np.atleast_1d(_loadmat(name, annos, CARS_LAYOUT, ("annotations",))["annotations"])
        try:
            refs = [f"{images.name}/{_within(base, str(r['fname']))}" for r in records]
            labels = [int(r["class"]) - 1 for r in records]  # classes are 1-based
        except (ValueError, IndexError, KeyError) as exc:
            raise UserError(f"{annos}: annotations without 'fname' and 'class' ({exc})") from exc
        if labels and not 0 <= min(labels) <= max(labels) < len(classes):
            raise UserError(f"{annos}: a class outside 1..{len(classes)} (cars_meta.mat's class_names)")
        splits[split] = file_split(name, base, refs, labels, CARS_LAYOUT)
    return Listing("cars", base, classes, splits)


DTD_LAYOUT = (
    "DTD in torchvision's layout: dtd/dtd/{images/<class>/<name>.jpg, labels/{train1,val1,test1}.txt} "
    "(or the archive's dtd/{images, labels})"
)


def read_dtd(root: Path, seed: int = 0) -> Listing:
    name = "DTD"
    base = root / "dtd" / "dtd"
    if not (base / "labels").is_dir() and (root / "dtd" / "labels").is_dir():
        base = root / "dtd"
    lists = {s: _lines(need_path(name, base / "labels" / f"{s}1.txt", DTD_LAYOUT)) for s in ("train", "val", "test")}
    classes = sorted({line.split("/")[0] for lines in lists.values() for line in lines})
    index = {c: i for i, c in enumerate(classes)}
    splits = {
        s: file_split(
            name,
            base,
            [f"images/{_within(base, line)}" for line in lines],
            [index[line.split("/")[0]] for line in lines],
            DTD_LAYOUT,
        )
        for s, lines in lists.items()
    }
    return Listing("dtd", base, classes, splits)


FLOWERS_LAYOUT = "Flowers-102 in torchvision's layout: flowers-102/{jpg/image_<05d>.jpg, imagelabels.mat, setid.mat}"


def read_flowers(root: Path, seed: int = 0) -> Listing:
    name = "Flowers-102"
    base = root / "flowers-102"
    labels = np.atleast_1d(_loadmat(name, base / "imagelabels.mat", FLOWERS_LAYOUT, ("labels",))["labels"])
    labels = labels.astype(np.int64) - 1  # 1-based
    ids = _loadmat(name, base / "setid.mat", FLOWERS_LAYOUT, ("trnid", "valid", "tstid"))
    classes = [str(c + 1) for c in range(int(labels.max()) + 1 if len(labels) else 0)]
    splits = {}
    for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        image_ids = [int(i) for i in np.atleast_1d(ids[key]).tolist()]
        if any(not 1 <= i <= len(labels) for i in image_ids):
            raise UserError(f"{base / 'setid.mat'}: {key} names an image outside imagelabels.mat's 1..{len(labels)}")
        splits[split] = file_split(
            name,
            base,
            [f"jpg/image_{i:05d}.jpg" for i in image_ids],
            [int(labels[i - 1]) for i in image_ids],
            FLOWERS_LAYOUT,
        )
    return Listing("flowers102", base, classes, splits)


FOOD_LAYOUT = "Food-101 in torchvision's layout: food-101/{images/<class>/<id>.jpg, meta/train.json, meta/test.json}"


def read_food(root: Path, seed: int = 0) -> Listing:
    name = "Food-101"
    base = root / "food-101"
    meta = {}
    for split in ("train", "test"):
        path = need_path(name, base / "meta" / f"{split}.json", FOOD_LAYOUT)
        try:
            meta[split] = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(meta[split], dict):
            raise UserError(f'{path}: expected an object class -> ["<class>/<id>", ...]')
    classes = sorted(meta["train"])
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split, entries in meta.items():
        refs, labels = [], []
        for cls, items in sorted(entries.items()):
            if cls not in index:
                raise UserError(f"{base / 'meta' / f'{split}.json'}: class {cls!r} is not in train.json")
            refs += [f"images/{_within(base, str(item))}.jpg" for item in items]
            labels += [index[cls]] * len(items)
        splits[split] = file_split(name, base, refs, labels, FOOD_LAYOUT)
    return Listing("food101", base, classes, splits)


PETS_LAYOUT = (
    "Oxford-IIIT Pet in torchvision's layout: oxford-iiit-pet/{images/<id>.jpg, annotations/trainval.txt, "
    "annotations/test.txt}"
)


def read_pets(root: Path, seed: int = 0) -> Listing:
    name = "Oxford-IIIT Pet"
    base = root / "oxford-iiit-pet"
    names: dict[int, str] = {}
    parsed = {}
    for split, file in (("train", "trainval"), ("test", "test")):
        path = need_path(name, base / "annotations" / f"{file}.txt", PETS_LAYOUT)
        refs, labels = [], []
        for line in _lines(path):
            if line.startswith("#"):
                continue
            fields = line.split()
            if len(fields) != 4 or not fields[1].isdigit():
                raise UserError(f"{path}: expected '<image id> <class id> <species> <breed id>', got {line!r}")
            refs.append(f"images/{_within(base, fields[0])}.jpg")
            labels.append(int(fields[1]) - 1)
            names.setdefault(labels[-1], " ".join(p.title() for p in fields[0].rsplit("_", 1)[0].split("_")))
        parsed[split] = (refs, labels)
    classes = [names.get(c, str(c + 1)) for c in range(max(names) + 1 if names else 0)]
    splits = {s: file_split(name, base, refs, labels, PETS_LAYOUT) for s, (refs, labels) in parsed.items()}
    return Listing("pets", base, classes, splits)


SUN_LAYOUT = (
    "SUN397: SUN397/{ClassName.txt, <letter>/<class>/sun_*.jpg} with the official partition files "
    "Training_01.txt and Testing_01.txt in SUN397/Partitions/ or SUN397/"
)


def read_sun397(root: Path, seed: int = 0) -> Listing:
    name = "SUN397"
    base = root / "SUN397"
    entries = _lines(need_path(name, base / "ClassName.txt", SUN_LAYOUT))  # "/a/abbey", "/o/outhouse/outdoor"
    index = {e.rstrip("/"): i for i, e in enumerate(entries)}
    classes = [e[3:].strip() for e in entries]  # torchvision's names: "abbey", "outhouse/outdoor"
    partitions = base / "Partitions" if (base / "Partitions" / "Training_01.txt").is_file() else base
    splits = {}
    for split, file in (("train", "Training_01.txt"), ("test", "Testing_01.txt")):
        path = need_path(name, partitions / file, SUN_LAYOUT)
        refs, labels = [], []
        for line in _lines(path):
            parent = line.rsplit("/", 1)[0]
            if parent not in index:
                raise UserError(f"{path}: {line!r} is in no class of ClassName.txt")
            refs.append(_within(base, line.lstrip("/")))
            labels.append(index[parent])
        splits[split] = file_split(name, base, refs, labels, SUN_LAYOUT)
    return Listing("sun397", base, classes, splits)


CALTECH_LAYOUT = "Caltech-101 in torchvision's layout: caltech101/101_ObjectCategories/<class>/image_<04d>.jpg"


def read_caltech101(root: Path, seed: int = 0) -> Listing:
    """30 random images of each class train (seeded), the rest test; ``BACKGROUND_Google`` left out."""
    name = "Caltech-101"
    base = root / "caltech101"
    categories = need_path(name, base / "101_ObjectCategories", CALTECH_LAYOUT, folder=True)
    classes = sorted(p.name for p in categories.iterdir() if p.is_dir() and p.name != "BACKGROUND_Google")
    rng = np.random.default_rng(seed)
    parts: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "test": ([], [])}
    seen = {os.path.realpath(categories): str(categories)}
    for label, cls in enumerate(classes):
        files = sorted(
            os.path.relpath(p, base) for p in walk_files(categories / cls, seen) if p.lower().endswith(IMAGE_SUFFIXES)
        )
        if not files:
            raise UserError(f"{name}: no image in {categories / cls} ({CALTECH_LAYOUT})")
        train = set(rng.permutation(len(files))[:CALTECH_TRAIN_PER_CLASS].tolist())
        for i, ref in enumerate(files):
            refs, labels = parts["train" if i in train else "test"]
            refs.append(ref)
            labels.append(label)
    splits = {s: file_split(name, base, refs, labels, CALTECH_LAYOUT) for s, (refs, labels) in parts.items()}
    return Listing("caltech101", base, classes, splits, {"train_per_class": CALTECH_TRAIN_PER_CLASS, "seed": seed})


BIRDSNAP_LAYOUT = (
    "Birdsnap release v1.1: birdsnap/{species.txt, test_images.txt, download/images/<dir>/<file>.jpg} "
    "(get_birdsnap.py's output; birdsnap/images/ is read too)"
)


def read_birdsnap(root: Path, seed: int = 0) -> Listing:
    name = "Birdsnap"
    base = root / "birdsnap"
    species_path = need_path(name, base / "species.txt", BIRDSNAP_LAYOUT)
    test_path = need_path(name, base / "test_images.txt", BIRDSNAP_LAYOUT)
    images = base / "download" / "images"
    if not images.is_dir() and (base / "images").is_dir():
        images = base / "images"
    need_path(name, images, BIRDSNAP_LAYOUT, folder=True)
    rows = [line.split("\t") for line in species_path.read_text().splitlines() if line.strip()]
    header = [h.strip() for h in rows[0]] if rows else []
    if not {"id", "common", "dir"} <= set(header):
        raise UserError(f"{species_path}: expected a tab-separated header 'id common scientific dir'")
    table = sorted(
        (
            (int(r[header.index("id")]), r[header.index("common")].strip(), r[header.index("dir")].strip())
            for r in rows[1:]
        ),
        key=lambda r: r[0],
    )
    classes = [common for _, common, _ in table]
    test_listed = set(_lines(test_path)[1:])  # a header line ("path"), then <dir>/<file>
    parts: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "test": ([], [])}
    seen = {os.path.realpath(images): str(images)}
    for label, (_, _, folder) in enumerate(table):
        if not (images / folder).is_dir():
            continue  # a species none of whose images were downloaded
        for path in walk_files(images / folder, seen):
            if path.lower().endswith(IMAGE_SUFFIXES):
                ref = os.path.relpath(path, images).replace(os.sep, "/")
                refs, labels = parts["test" if ref in test_listed else "train"]
                refs.append(ref)
                labels.append(label)
    splits = {s: file_split(name, images, refs, labels, BIRDSNAP_LAYOUT) for s, (refs, labels) in parts.items()}
    info = {"test_listed": len(test_listed), "test_missing": len(test_listed) - len(splits["test"])}
    return Listing("birdsnap", images, classes, splits, info)


def _array_loader(images: np.ndarray) -> Callable[[int], Any]:
    from PIL import Image

    return lambda i: Image.fromarray(np.ascontiguousarray(images[i]))


def read_cifar_listing(root: Path, num_classes: int) -> Listing:
    """CIFAR-10/100 in the "python version" layout (``ringbench.readers``): arrays in memory."""
    from ringbench.readers import cifar, cifar_class_names

    folder_name, files = (
        ("cifar-10-batches-py", [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"])
        if num_classes == 10
        else ("cifar-100-python", ["train", "test"])
    )
    folder = next((f for f in (root / folder_name, root) if all((f / n).is_file() for n in files)), None)
    if folder is None:
        raise UserError(
            f"CIFAR-{num_classes}: expected {root / folder_name}/ holding {', '.join(files)} (torchvision's "
            '"python version" layout); nothing is downloaded'
        )
    splits = {}
    for split in ("train", "test"):
        ds = cifar(root, split, num_classes)
        images = ds.images
        listing = sorted([p.name, p.stat().st_size] for p in folder.iterdir() if p.is_file())
        splits[split] = Split(
            refs=[f"{split}/{i}" for i in range(len(images))],
            labels=np.asarray(ds.targets, dtype=np.int64),
            load=_array_loader(images),
            fingerprint=listing,
        )
    return Listing(f"cifar{num_classes}", folder, cifar_class_names(root, num_classes), splits)


def _path_loader(paths: list[Path]) -> Callable[[int], Any]:
    return lambda i: _open_image(paths[i])


def read_voc2007(root: Path, seed: int = 0) -> Listing:
    """VOC2007 classification's train, val and test (``transfer.voc07``); each split's ``labels`` the
    devkit's ``int8 (N, 20)`` matrix (1 / 0 difficult / -1), its ``refs`` ``JPEGImages/<id>.jpg``."""
    folder = voc2007_folder(root)
    splits = {}
    for split in ("train", "val", "test"):
        paths, matrix = read_voc2007_classification(root, split)
        refs = [f"JPEGImages/{p.name}" for p in paths]
        splits[split] = Split(
            refs=refs,
            labels=matrix,
            load=_path_loader(paths),
            fingerprint=[refs, [p.stat().st_size for p in paths], matrix.tolist()],
        )
    return Listing("voc2007", folder, list(VOC_CLASSES), splits)


# --- the table ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatterySet:
    """One data set of the battery: how to read it, how to choose the regularisation, how to score.

    ``validation``: ``"creators"`` (the creators' ``val`` split) or ``"train_fraction"`` (a seeded
    stratified share of train). ``metric``: a key of ``transfer.kornblith_protocol.METRICS``. ``problem``:
    ``"multiclass"`` (one multinomial model, labels ``(N,)``) or ``"multilabel"`` (VOC2007: one binary
    model per class, labels the devkit's ``(N, classes)`` matrix)."""

    name: str  # task linear_<name>
    title: str
    read: Callable[[Path, int], Listing]  # (--data-root, seed) -> Listing
    layout: str
    validation: str
    metric: str
    classes: int  # in the full data set (docs, and a check on real data)
    problem: str = "multiclass"


BATTERY: dict[str, BatterySet] = {
    s.name: s
    for s in (
        BatterySet("food101", "Food-101", read_food, FOOD_LAYOUT, "train_fraction", "top1", 101),
        BatterySet(
            "cifar10",
            "CIFAR-10",
            lambda r, s: read_cifar_listing(r, 10),
            "cifar-10-batches-py/",
            "train_fraction",
            "top1",
            10,
        ),
        BatterySet(
            "cifar100",
            "CIFAR-100",
            lambda r, s: read_cifar_listing(r, 100),
            "cifar-100-python/",
            "train_fraction",
            "top1",
            100,
        ),
        BatterySet("birdsnap", "Birdsnap", read_birdsnap, BIRDSNAP_LAYOUT, "train_fraction", "top1", 500),
        BatterySet("sun397", "SUN397", read_sun397, SUN_LAYOUT, "train_fraction", "top1", 397),
        BatterySet("cars", "Stanford Cars", read_cars, CARS_LAYOUT, "train_fraction", "top1", 196),
        BatterySet("aircraft", "FGVC-Aircraft", read_aircraft, AIRCRAFT_LAYOUT, "creators", "mean_per_class", 100),
        BatterySet("voc2007", "PASCAL VOC2007", read_voc2007, VOC_LAYOUT, "creators", "map11", 20, "multilabel"),
        BatterySet("dtd", "DTD", read_dtd, DTD_LAYOUT, "creators", "top1", 47),
        BatterySet("pets", "Oxford-IIIT Pet", read_pets, PETS_LAYOUT, "train_fraction", "mean_per_class", 37),
        BatterySet(
            "caltech101", "Caltech-101", read_caltech101, CALTECH_LAYOUT, "train_fraction", "mean_per_class", 101
        ),
        BatterySet("flowers102", "Flowers-102", read_flowers, FLOWERS_LAYOUT, "creators", "mean_per_class", 102),
    )
}
