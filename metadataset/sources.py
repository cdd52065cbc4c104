"""Image sources for few-shot episodes: the ten Meta-Dataset sources and two embedded defaults.

Every source yields an :class:`ImageSet`: the classes of one split, a way to iterate over its
images, a fingerprint of the data (part of the feature-cache key) and, where the source has it,
the class structure used by the episode sampler.

Readers:

* **records** (the official converted format): ``<root>/<records name>/dataset_spec.json`` and one
  TFRecord file per class, ``<class id>.tfrecords`` (or shards ``<class id>_<k>.tfrecords``), whose
  examples hold ``image`` (encoded JPEG/PNG bytes) and ``label`` (int64). Read with the
  ``tfrecord`` package, no TensorFlow. The split's classes follow the spec: contiguous class ids
  in the order train, valid, test (``DatasetSpecification``); the same over superclasses for
  Omniglot (``BiLevelDatasetSpecification``, whose alphabets give the bi-level rule); the leaves
  of each split's WordNet subgraph for ILSVRC (``HierarchicalDatasetSpecification``, whose
  internal nodes give the DAG rule).
* **folder**: ``<root>/<source>/<class>/<image>`` plus ``<root>/<source>/splits.json`` with class
  names under ``"train"``, ``"valid"``, ``"test"`` (the official split-file format).
* **synthetic**: classes of the shared shape renderer (``ringbench.shapes``), taken from the end
  of its fixed class permutation so that they are not the classes pretraining uses by default.
* **digits**: scikit-learn's bundled handwritten digits (8x8, upsampled to the backbone's input).
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from metadataset.sampling import ClassStructure
from ringbench.errors import UserError

# short name -> folder name of the official converted records
MD_SOURCES = {
    "ilsvrc": "ilsvrc_2012",
    "omniglot": "omniglot",
    "aircraft": "aircraft",
    "cub": "cu_birds",
    "dtd": "dtd",
    "quickdraw": "quickdraw",
    "fungi": "fungi",
    "vgg_flower": "vgg_flower",
    "traffic_sign": "traffic_sign",
    "mscoco": "mscoco",
}
EMBEDDED_SOURCES = ("synthetic", "digits")
SPLITS = ("train", "valid", "test")
SPEC_FILE = "dataset_spec.json"
SPLIT_FILE = "splits.json"
# Bytes of a TFRecord record besides its data (length, its CRC, the data's CRC): a bound on records per file.
TFRECORD_FRAMING = 16
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".tif", ".tiff", ".webp")

Loader = Callable[[], Any]  # -> PIL.Image.Image, may raise on a corrupt image


@dataclass
class ImageSet:
    """The images of one split of one source.

    ``items()`` yields ``(class index, reference, load)`` in a fixed order; ``load()`` returns a
    PIL image or raises on a corrupt one. ``counts`` are the images per class as listed by the
    source (before any corrupt image is skipped).
    """

    name: str
    split: str
    class_names: list[str]
    counts: np.ndarray
    fingerprint: str
    items: Callable[[], Iterator[tuple[int, str, Loader]]]
    structure: ClassStructure | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(np.sum(self.counts))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def decode_image(data: bytes) -> Any:
    """Encoded image bytes -> RGB PIL image (raises on corrupt data)."""
    from PIL import Image

    with Image.open(io.BytesIO(bytes(data))) as img:
        img.load()
        return img.convert("RGB")


def data_digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {list(SPLITS)}")


# --- official records --------------------------------------------------------------------------


def _read_json(path: Path, missing: str) -> Any:
    """A JSON file; ``missing`` (the message) when it is absent, a clear error when it is not JSON."""
    if not path.is_file():
        raise UserError(missing)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from exc


def read_dataset_spec(folder: Path) -> dict[str, Any]:
    path = folder / SPEC_FILE
    spec = _read_json(
        path,
        f"{folder}: records folder has no {SPEC_FILE} (convert the source with Meta-Dataset's "
        f"dataset_conversion, which writes it next to the .tfrecords files)",
    )
    kind = spec.get("__class__") if isinstance(spec, dict) else None
    required = {
        "DatasetSpecification": ("classes_per_split", "images_per_class", "class_names", "file_pattern"),
        "BiLevelDatasetSpecification": (
            "superclasses_per_split",
            "classes_per_superclass",
            "images_per_class",
            "class_names",
            "file_pattern",
        ),
        "HierarchicalDatasetSpecification": ("split_subgraphs", "images_per_class", "class_names", "file_pattern"),
    }
    if kind not in required:
        raise UserError(f"{path}: '__class__' is {kind!r}, expected one of {list(required)}")
    missing = [k for k in required[kind] if k not in spec]
    if missing:
        raise UserError(f"{path}: {kind} is missing {missing}")
    _check_spec_counts(path, spec)
    return spec


def _count(path: Path, where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"{path}: {where} must be a non-negative integer, got {value!r}")
    return value


def _counts(path: Path, key: str, value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        raise UserError(f"{path}: {key} must be a JSON object of counts, got {type(value).__name__}")
    return {str(k): _count(path, f"{key}[{k!r}]", v) for k, v in value.items()}


def _check_spec_counts(path: Path, spec: dict[str, Any]) -> None:
    """Every count a non-negative integer, and no more classes than the spec names: a spec with absurd
    counts (10^9 classes, 2.5 images) is refused here, before any list or array is sized by them."""
    names = spec["class_names"]
    if not isinstance(names, dict):
        raise UserError(f"{path}: class_names must be a JSON object (class id -> name)")
    kind = spec["__class__"]
    if kind == "DatasetSpecification":
        total = sum(_counts(path, "classes_per_split", spec["classes_per_split"]).values())
    elif kind == "BiLevelDatasetSpecification":
        per_super = _counts(path, "classes_per_superclass", spec["classes_per_superclass"])
        supers = sum(_counts(path, "superclasses_per_split", spec["superclasses_per_split"]).values())
        if supers > len(per_super):
            raise UserError(f"{path}: {supers} superclasses in the splits, {len(per_super)} in classes_per_superclass")
        total = sum(per_super.values())
    else:
        total = 0  # hierarchical: the splits' leaves, each checked against class_names when read
    if total > len(names):
        raise UserError(f"{path}: the splits count {total:,} classes, class_names names {len(names):,}")
    per_class = spec["images_per_class"]
    if not isinstance(per_class, dict):
        raise UserError(f"{path}: images_per_class must be a JSON object")
    for key, value in per_class.items():
        if isinstance(value, dict):  # hierarchical: per split, per WordNet id
            _counts(path, f"images_per_class[{key!r}]", value)
        else:
            _count(path, f"images_per_class[{key!r}]", value)


def _split_range(counts_per_split: dict[str, int], split: str) -> range:
    """Contiguous ids of a split, in the order TRAIN, VALID, TEST."""
    keys = [s.upper() for s in SPLITS]
    offset = sum(int(counts_per_split.get(k, 0)) for k in keys[: keys.index(split.upper())])
    return range(offset, offset + int(counts_per_split.get(split.upper(), 0)))


def split_classes(spec: dict[str, Any], split: str) -> tuple[list[int], ClassStructure | None]:
    """Class ids of ``split`` and, for bi-level / hierarchical specs, their structure."""
    kind = spec["__class__"]
    if kind == "DatasetSpecification":
        return list(_split_range(spec["classes_per_split"], split)), None
    if kind == "BiLevelDatasetSpecification":
        per_super = {int(k): int(v) for k, v in spec["classes_per_superclass"].items()}
        supers = _split_range(spec["superclasses_per_split"], split)
        ids: list[int] = []
        superclass_of: list[int] = []
        for sc in supers:
            first = sum(per_super[s] for s in range(sc))
            ids.extend(range(first, first + per_super[sc]))
            superclass_of.extend([sc] * per_super[sc])
        return ids, ClassStructure(superclass_of=np.asarray(superclass_of))
    # HierarchicalDatasetSpecification: leaves of each split's subgraph, ids contiguous per split
    graphs = spec["split_subgraphs"]
    leaves_per_split = {
        s.upper(): sorted(n["wn_id"] for n in graphs.get(s.upper(), []) if not n["children_ids"]) for s in SPLITS
    }
    ids = list(_split_range({k: len(v) for k, v in leaves_per_split.items()}, split))
    id_of = {str(name): int(cid) for cid, name in spec["class_names"].items()}
    leaves = leaves_per_split[split.upper()]
    unknown = [w for w in leaves if w not in id_of]
    if unknown:
        raise UserError(f"dataset spec: leaves {unknown[:5]} of split {split} have no class id in 'class_names'")
    if sorted(id_of[w] for w in leaves) != ids:
        raise UserError(f"dataset spec: the {split} leaves do not have the contiguous class ids {ids[0]}..{ids[-1]}")
    position = {id_of[w]: i for i, w in enumerate(sorted(leaves, key=lambda w: id_of[w]))}
    return ids, ClassStructure(node_leaves=tuple(_node_leaves(graphs[split.upper()], id_of, position)))


def _node_leaves(nodes: list[dict[str, Any]], id_of: dict[str, int], position: dict[int, int]) -> list[np.ndarray]:
    """For every internal node (sorted by WordNet id), the split positions of the leaves it spans."""
    children = {n["wn_id"]: list(n["children_ids"]) for n in nodes}
    memo: dict[str, frozenset[str]] = {}

    def spanned(wn_id: str) -> frozenset[str]:
        if wn_id not in memo:
            kids = children.get(wn_id, [])
            memo[wn_id] = frozenset([wn_id]) if not kids else frozenset().union(*(spanned(c) for c in kids))
        return memo[wn_id]

    out = []
    for wn_id in sorted(children):
        if children[wn_id]:
            out.append(np.array(sorted(position[id_of[leaf]] for leaf in spanned(wn_id)), dtype=np.int64))
    return out


def _images_per_class(spec: dict[str, Any], class_id: int, split: str) -> int:
    counts = spec["images_per_class"]
    if spec["__class__"] == "HierarchicalDatasetSpecification":
        wn_id = spec["class_names"][str(class_id)]
        return int(counts[split.upper()][wn_id])
    value = counts[str(class_id)]
    return int(sum(value.values())) if isinstance(value, dict) else int(value)


def class_record_files(folder: Path, pattern: str, class_id: int) -> list[Path]:
    if pattern == "{}.tfrecords":
        files = [folder / f"{class_id}.tfrecords"]
    elif pattern == "{}_{}.tfrecords":
        files = sorted(Path(p) for p in glob.glob(str(folder / f"{class_id}_*.tfrecords")))
    else:
        raise UserError(
            f"{folder / SPEC_FILE}: file_pattern {pattern!r} is not '{{}}.tfrecords' or '{{}}_{{}}.tfrecords'"
        )
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        raise UserError(f"{folder}: class {class_id} has no records file ({missing[0] if missing else pattern})")
    return files


def iter_records(path: Path) -> Iterator[tuple[bytes, int]]:
    """``(image bytes, label)`` of every example in one TFRecord file, plain (as Meta-Dataset's
    converter writes them) or GZIP-compressed (recognised by its magic bytes, whatever the name)."""
    from tfrecord.reader import tfrecord_loader

    with open(path, "rb") as f:
        compression = "gzip" if f.read(2) == b"\x1f\x8b" else None
    examples = tfrecord_loader(
        str(path), None, description={"image": "byte", "label": "int"}, compression_type=compression
    )
    for example in examples:
        image = example["image"]
        yield (image if isinstance(image, bytes) else np.asarray(image).tobytes()), int(np.ravel(example["label"])[0])


def records_source(name: str, folder: Path, split: str = "test") -> ImageSet:
    """The split's classes from official Meta-Dataset records (see the module docstring)."""
    _check_split(split)
    spec = read_dataset_spec(folder)
    ids, structure = split_classes(spec, split)
    names = [str(spec["class_names"].get(str(c), c)) for c in ids]
    counts = np.array([_images_per_class(spec, c, split) for c in ids], dtype=np.int64)
    files = [class_record_files(folder, spec["file_pattern"], c) for c in ids]
    sizes = [[f.name, f.stat().st_size] for fs in files for f in fs]
    for class_id, count, class_files in zip(ids, counts, files):
        most = sum(f.stat().st_size for f in class_files) // TFRECORD_FRAMING
        if count > most:
            raise UserError(
                f"{folder / SPEC_FILE}: class {class_id} lists {count:,} images, but its records files "
                f"({', '.join(f.name for f in class_files)}) can hold at most {most:,}"
            )

    def items() -> Iterator[tuple[int, str, Loader]]:
        for index, class_files in enumerate(files):
            for path in class_files:
                for n, (data, _) in enumerate(iter_records(path)):

                    def load(data: bytes = data) -> Any:
                        return decode_image(data)

                    yield index, f"{path.name}#{n}", load

    return ImageSet(
        name=name,
        split=split,
        class_names=names,
        counts=counts,
        items=items,
        structure=structure,
        fingerprint=data_digest("records", spec, sizes, split),
        info={"reader": "records", "folder": str(folder), "spec_class": spec["__class__"]},
    )


# --- image folders -----------------------------------------------------------------------------


def folder_source(name: str, folder: Path, split: str = "test") -> ImageSet:
    """``<folder>/<class>/<image>`` with ``<folder>/splits.json`` naming each split's classes."""
    _check_split(split)
    split_path = folder / SPLIT_FILE
    splits = _read_json(
        split_path,
        f"{folder}: image folder has no {SPLIT_FILE} (a JSON object with the class "
        f"folder names under 'train', 'valid', 'test')",
    )
    try:
        classes = [str(c) for c in splits[split]]
    except (KeyError, TypeError) as exc:
        raise UserError(f"{split_path}: expected a JSON object with a list of class names under {split!r}") from exc
    files = []
    first: dict[str, str] = {}
    for cls in classes:
        cls_dir = folder / cls
        if not cls_dir.is_dir():
            raise UserError(f"{split_path}: class {cls!r} of split {split!r} has no folder {cls_dir}")
        real = os.path.realpath(cls_dir)
        if real in first:
            raise UserError(
                f"{split_path}: classes {first[real]!r} and {cls!r} are one folder ({real}); no image is read twice"
            )
        first[real] = cls
        files.append(sorted(p for p in cls_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
    counts = np.array([len(f) for f in files], dtype=np.int64)

    def items() -> Iterator[tuple[int, str, Loader]]:
        for index, paths in enumerate(files):
            for path in paths:

                def load(path: Path = path) -> Any:
                    return decode_image(path.read_bytes())

                yield index, str(path.relative_to(folder)), load

    listing = [[str(p.relative_to(folder)), p.stat().st_size] for ps in files for p in ps]
    return ImageSet(
        name=name,
        split=split,
        class_names=classes,
        counts=counts,
        items=items,
        fingerprint=data_digest("folder", classes, listing, split),
        info={"reader": "folder", "folder": str(folder)},
    )


# --- embedded defaults ---------------------------------------------------------------------------


def synthetic_source(
    num_classes: int = 32, images_per_class: int = 40, image_size: int = 32, seed: int = 0
) -> ImageSet:
    """Rendered shapes: the last ``num_classes`` classes of the renderer's fixed permutation."""
    from ringbench import shapes

    if not 5 <= num_classes <= shapes.NUM_CLASSES:
        raise UserError(f"synthetic few-shot source: num_classes must be in [5, {shapes.NUM_CLASSES}]")
    labels = shapes.class_order(shapes.NUM_CLASSES)[-num_classes:]

    def items() -> Iterator[tuple[int, str, Loader]]:
        from PIL import Image

        for index, label in enumerate(labels):
            for i in range(images_per_class):

                def load(label=int(label), i=i):
                    rng = np.random.default_rng([seed, 7, label, i])
                    return Image.fromarray(shapes.render_classification(label, rng, image_size))

                yield index, f"{label}/{i}", load

    return ImageSet(
        name="synthetic",
        split="test",
        class_names=[" ".join(shapes.class_spec(int(c))) for c in labels],
        counts=np.full(num_classes, images_per_class, dtype=np.int64),
        items=items,
        fingerprint=data_digest("synthetic", labels.tolist(), images_per_class, image_size, seed),
        info={"reader": "synthetic", "render_size": image_size},
    )


def digits_source() -> ImageSet:
    """scikit-learn's bundled handwritten digits: 1797 8x8 images of 10 classes (no download)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.argsort(data.target, kind="stable")
    images = np.clip(np.rint(data.images[order] * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    targets = data.target[order]

    def items() -> Iterator[tuple[int, str, Loader]]:
        from PIL import Image

        for i, (img, label) in enumerate(zip(images, targets)):

            def load(img: np.ndarray = img) -> Any:
                return Image.fromarray(img).convert("RGB")

            yield int(label), f"digits/{order[i]}", load

    return ImageSet(
        name="digits",
        split="test",
        class_names=[str(c) for c in range(10)],
        counts=np.bincount(targets, minlength=10).astype(np.int64),
        items=items,
        fingerprint=data_digest("digits", hashlib.sha256(images.tobytes()).hexdigest()),
        info={"reader": "sklearn.load_digits"},
    )


# --- one entry point ---------------------------------------------------------------------------


def source_folder(name: str, root: Path) -> Path:
    """``<root>/<records name>`` (e.g. ``cu_birds``), else ``<root>/<short name>`` (e.g. ``cub``)."""
    candidates = [root / MD_SOURCES[name], root / name]
    for folder in candidates:
        if folder.is_dir():
            return folder
    raise UserError(
        f"source {name!r}: no folder {candidates[0]}"
        + (f" or {candidates[1]}" if candidates[1] != candidates[0] else "")
        + " (converted Meta-Dataset records, or an image folder with splits.json); set --md-root"
    )


def open_source(
    name: str, root: str | os.PathLike | None = None, split: str = "test", image_size: int = 32, **embedded: Any
) -> ImageSet:
    """Open a source by name: one of :data:`MD_SOURCES` (needs ``root``) or :data:`EMBEDDED_SOURCES`."""
    aliases = {v: k for k, v in MD_SOURCES.items()}
    name = aliases.get(name, name)
    if name == "synthetic":
        return synthetic_source(image_size=image_size, **embedded)
    if name == "digits":
        return digits_source()
    if name not in MD_SOURCES:
        raise UserError(f"unknown source {name!r}; choose one of {list(MD_SOURCES) + list(EMBEDDED_SOURCES)}")
    if root is None:
        raise UserError(f"source {name!r} needs its data: pass --md-root (the folder holding {MD_SOURCES[name]}/)")
    folder = source_folder(name, Path(root))
    if (folder / SPEC_FILE).is_file() or any(folder.glob("*.tfrecords")):
        return records_source(name, folder, split)
    return folder_source(name, folder, split)


def limit_per_class(image_set: ImageSet, max_per_class: int | None) -> ImageSet:
    """The first ``max_per_class`` images of each class (in the source's order); None keeps all."""
    if not max_per_class or int(np.max(image_set.counts)) <= max_per_class:
        return image_set
    if max_per_class < 2:
        raise UserError(f"--max-images-per-class must be at least 2, got {max_per_class}")
    inner = image_set.items

    def items() -> Iterator[tuple[int, str, Loader]]:
        seen = np.zeros(image_set.num_classes, dtype=np.int64)
        for label, ref, load in inner():
            if seen[label] < max_per_class:
                seen[label] += 1
                yield label, ref, load

    return ImageSet(
        name=image_set.name,
        split=image_set.split,
        class_names=image_set.class_names,
        counts=np.minimum(image_set.counts, max_per_class),
        items=items,
        structure=image_set.structure,
        fingerprint=data_digest(image_set.fingerprint, "max_per_class", max_per_class),
        info={**image_set.info, "max_per_class": max_per_class},
    )
