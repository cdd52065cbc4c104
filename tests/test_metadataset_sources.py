"""Readers: official Meta-Dataset records (written here with the ``tfrecord`` writer), image folders,
and the embedded sources."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metadataset.sources import (
    MD_SOURCES,
    class_record_files,
    digits_source,
    limit_per_class,
    open_source,
    synthetic_source,
)
from ringbench.errors import UserError


def image_bytes(seed: int, size: int = 12, fmt: str = "PNG") -> bytes:
    """A small random image, encoded as Meta-Dataset stores them."""
    array = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def write_class_records(path: Path, class_id: int, images: list[bytes]) -> None:
    """One class's records file: examples with ``image`` (encoded bytes) and ``label`` (int64)."""
    from tfrecord import TFRecordWriter

    writer = TFRecordWriter(str(path))
    for data in images:
        writer.write({"image": (data, "byte"), "label": (class_id, "int")})
    writer.close()


def write_flat_source(root: Path, name: str, splits=(4, 2, 6), per_class=(3, 4, 5), fmt="PNG") -> Path:
    """A ``DatasetSpecification`` source: ``<root>/<name>/<id>.tfrecords`` + ``dataset_spec.json``."""
    folder = root / name
    folder.mkdir(parents=True)
    total = sum(splits)
    counts = {}
    for cid in range(total):
        n = per_class[cid % len(per_class)]
        write_class_records(folder / f"{cid}.tfrecords", cid, [image_bytes(100 * cid + i, fmt=fmt) for i in range(n)])
        counts[str(cid)] = n
    spec = {
        "name": name,
        "classes_per_split": dict(zip(("TRAIN", "VALID", "TEST"), splits)),
        "images_per_class": counts,
        "class_names": {str(c): f"class{c:02d}" for c in range(total)},
        "path": str(folder),
        "file_pattern": "{}.tfrecords",
        "__class__": "DatasetSpecification",
    }
    (folder / "dataset_spec.json").write_text(json.dumps(spec, indent=2))
    return folder


def write_omniglot(root: Path) -> Path:
    """A ``BiLevelDatasetSpecification``: superclasses (alphabets) per split, classes per superclass."""
    folder = root / "omniglot"
    folder.mkdir(parents=True)
    per_super = {0: 2, 1: 3, 2: 5, 3: 6}
    total = sum(per_super.values())
    for cid in range(total):
        write_class_records(folder / f"{cid}.tfrecords", cid, [image_bytes(7 * cid + i) for i in range(4)])
    spec = {
        "name": "omniglot",
        "superclasses_per_split": {"TRAIN": 1, "VALID": 1, "TEST": 2},
        "classes_per_superclass": {str(k): v for k, v in per_super.items()},
        "images_per_class": {str(c): 4 for c in range(total)},
        "superclass_names": {str(k): f"alphabet{k}" for k in per_super},
        "class_names": {str(c): f"char{c}" for c in range(total)},
        "path": str(folder),
        "file_pattern": "{}.tfrecords",
        "__class__": "BiLevelDatasetSpecification",
    }
    (folder / "dataset_spec.json").write_text(json.dumps(spec))
    return folder


def _node(wn_id, children=(), parents=()):
    return {"wn_id": wn_id, "words": wn_id, "children_ids": sorted(children), "parents_ids": sorted(parents)}


def write_ilsvrc(root: Path) -> Path:
    """A ``HierarchicalDatasetSpecification``: one WordNet subgraph per split, ids by split."""
    folder = root / "ilsvrc_2012"
    folder.mkdir(parents=True)
    train = [_node("n00", ["n01", "n02"]), _node("n01", parents=["n00"]), _node("n02", parents=["n00"])]
    valid = [_node("n10", ["n11"]), _node("n11", parents=["n10"])]
    # test: root -> A (leaves t1, t2, t3), B (leaves t3, t4, t5, t6); t3 has two parents
    test = [
        _node("t0", ["tA", "tB"]),
        _node("tA", ["t1", "t2", "t3"], ["t0"]),
        _node("tB", ["t3", "t4", "t5", "t6"], ["t0"]),
        _node("t1", parents=["tA"]),
        _node("t2", parents=["tA"]),
        _node("t3", parents=["tA", "tB"]),
        _node("t4", parents=["tB"]),
        _node("t5", parents=["tB"]),
        _node("t6", parents=["tB"]),
    ]
    leaves = ["n01", "n02", "n11", "t1", "t2", "t3", "t4", "t5", "t6"]  # class ids 0..8
    for cid, _ in enumerate(leaves):
        write_class_records(folder / f"{cid}.tfrecords", cid, [image_bytes(3 * cid + i) for i in range(3)])
    spec = {
        "name": "ilsvrc_2012",
        "split_subgraphs": {"TRAIN": train, "VALID": valid, "TEST": test},
        "images_per_class": {
            "TRAIN": {"n00": 6, "n01": 3, "n02": 3},
            "VALID": {"n10": 3, "n11": 3},
            "TEST": {w: 3 for w in leaves[3:]} | {"t0": 18, "tA": 9, "tB": 12},
        },
        "class_names": {str(c): w for c, w in enumerate(leaves)},
        "path": str(folder),
        "file_pattern": "{}.tfrecords",
        "__class__": "HierarchicalDatasetSpecification",
    }
    (folder / "dataset_spec.json").write_text(json.dumps(spec))
    return folder


def test_records_reader_returns_the_written_images(tmp_path):
    write_flat_source(tmp_path, "aircraft")
    test = open_source("aircraft", tmp_path, split="test")
    assert test.class_names == [f"class{c:02d}" for c in range(6, 12)]  # ids after TRAIN (4) and VALID (2)
    np.testing.assert_array_equal(test.counts, [3, 4, 5, 3, 4, 5])
    items = list(test.items())
    assert len(items) == len(test) == 24
    label, ref, load = items[5]  # class index 1 (id 7), its 3rd image
    assert (label, ref) == (1, "7.tfrecords#2")
    expected = np.asarray(Image.open(io.BytesIO(image_bytes(100 * 7 + 2))).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(load()), expected)
    train = open_source("aircraft", tmp_path, split="train")
    assert train.class_names == ["class00", "class01", "class02", "class03"]
    assert train.fingerprint != test.fingerprint


def test_records_reader_reads_gzip_compressed_records(tmp_path):
    """Records re-written with GZIP compression (TFRecordOptions(compression_type="GZIP")) read the same."""
    import gzip

    folder = write_flat_source(tmp_path / "plain", "dtd")
    packed = tmp_path / "packed" / "dtd"
    packed.mkdir(parents=True)
    for f in folder.iterdir():
        data = f.read_bytes()
        (packed / f.name).write_bytes(gzip.compress(data) if f.suffix == ".tfrecords" else data)
    assert (packed / "6.tfrecords").read_bytes()[:2] == b"\x1f\x8b"
    plain, zipped = open_source("dtd", tmp_path / "plain"), open_source("dtd", tmp_path / "packed")
    pairs = list(zip(plain.items(), zipped.items(), strict=True))
    assert len(pairs) == 24
    for (label_a, ref_a, load_a), (label_b, ref_b, load_b) in pairs:
        assert (label_a, ref_a) == (label_b, ref_b)
        np.testing.assert_array_equal(np.asarray(load_a()), np.asarray(load_b()))


def test_records_reader_decodes_jpeg_and_accepts_the_official_folder_name(tmp_path):
    write_flat_source(tmp_path, "cu_birds", fmt="JPEG")
    cub = open_source("cub", tmp_path)  # short name -> records folder cu_birds
    assert cub.info["reader"] == "records" and cub.num_classes == 6
    image = next(iter(cub.items()))[2]()
    assert image.mode == "RGB" and image.size == (12, 12)


def test_records_shards(tmp_path):
    folder = tmp_path / "dtd"
    folder.mkdir()
    for cid in range(5):
        for shard in range(2):
            write_class_records(folder / f"{cid}_{shard}.tfrecords", cid, [image_bytes(cid * 10 + shard)])
    spec = {
        "name": "dtd",
        "classes_per_split": {"TRAIN": 0, "VALID": 0, "TEST": 5},
        "images_per_class": {str(c): 2 for c in range(5)},
        "class_names": {str(c): str(c) for c in range(5)},
        "path": "x",
        "file_pattern": "{}_{}.tfrecords",
        "__class__": "DatasetSpecification",
    }
    (folder / "dataset_spec.json").write_text(json.dumps(spec))
    assert [f.name for f in class_record_files(folder, "{}_{}.tfrecords", 3)] == ["3_0.tfrecords", "3_1.tfrecords"]
    assert [label for label, _, _ in open_source("dtd", tmp_path).items()] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_omniglot_bilevel_structure(tmp_path):
    write_omniglot(tmp_path)
    test = open_source("omniglot", tmp_path)
    # test superclasses 2 and 3 hold class ids 5..9 and 10..15
    assert test.class_names == [f"char{c}" for c in range(5, 16)]
    np.testing.assert_array_equal(test.structure.superclass_of, [2] * 5 + [3] * 6)
    valid = open_source("omniglot", tmp_path, split="valid")
    assert valid.class_names == ["char2", "char3", "char4"]


def test_ilsvrc_dag_structure(tmp_path):
    write_ilsvrc(tmp_path)
    test = open_source("ilsvrc", tmp_path)
    assert test.class_names == ["t1", "t2", "t3", "t4", "t5", "t6"]  # ids 3..8
    nodes = {tuple(n.tolist()) for n in test.structure.node_leaves}
    assert nodes == {(0, 1, 2, 3, 4, 5), (0, 1, 2), (2, 3, 4, 5)}  # t0, tA, tB: t3 under both
    assert list(test.counts) == [3] * 6


def test_folder_reader(tmp_path):
    folder = tmp_path / "vgg_flower"
    for c in range(6):
        (folder / f"flower{c}").mkdir(parents=True)
        for i in range(3):
            (folder / f"flower{c}" / f"{i}.png").write_bytes(image_bytes(c * 3 + i))
    (folder / "flower0" / "notes.txt").write_text("not an image")
    (folder / "splits.json").write_text(
        json.dumps({"train": ["flower0"], "valid": [], "test": [f"flower{c}" for c in range(1, 6)]})
    )
    test = open_source("vgg_flower", tmp_path)
    assert test.info["reader"] == "folder" and test.num_classes == 5
    items = list(test.items())
    assert [r for _, r, _ in items[:2]] == ["flower1/0.png", "flower1/1.png"]
    np.testing.assert_array_equal(
        np.asarray(items[0][2]()), np.asarray(Image.open(io.BytesIO(image_bytes(3))).convert("RGB"))
    )
    assert open_source("vgg_flower", tmp_path, split="train").counts.tolist() == [3]


def test_bad_input_is_a_clear_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown source 'imagenet21k'"):
        open_source("imagenet21k", tmp_path)
    with pytest.raises(UserError, match="--md-root"):
        open_source("aircraft", None)
    with pytest.raises(UserError, match="no folder"):
        open_source("aircraft", tmp_path)
    folder = tmp_path / "traffic_sign"
    folder.mkdir()
    write_class_records(folder / "0.tfrecords", 0, [image_bytes(0)])
    with pytest.raises(UserError, match=r"has no dataset_spec\.json"):
        open_source("traffic_sign", tmp_path)
    (tmp_path / "mscoco" / "cat").mkdir(parents=True)
    with pytest.raises(UserError, match=r"has no splits\.json"):
        open_source("mscoco", tmp_path)
    write_flat_source(tmp_path, "aircraft")
    (tmp_path / "aircraft" / "8.tfrecords").unlink()
    with pytest.raises(UserError, match="class 8 has no records file"):
        open_source("aircraft", tmp_path)
    with pytest.raises(UserError, match="unknown split"):
        open_source("aircraft", tmp_path, split="val")


def test_every_meta_dataset_source_is_known():
    assert set(MD_SOURCES.values()) == {
        "ilsvrc_2012",
        "omniglot",
        "aircraft",
        "cu_birds",
        "dtd",
        "quickdraw",
        "fungi",
        "vgg_flower",
        "traffic_sign",
        "mscoco",
    }


def test_embedded_sources():
    digits = digits_source()
    assert digits.num_classes == 10 and len(digits) == 1797
    label, _, load = next(iter(digits.items()))
    image = load()
    assert label == 0 and image.size == (8, 8) and image.mode == "RGB"
    synth = synthetic_source(num_classes=8, images_per_class=3, image_size=24)
    items = list(synth.items())
    assert len(items) == 24 and items[0][2]().size == (24, 24)
    np.testing.assert_array_equal(np.asarray(items[4][2]()), np.asarray(list(synth.items())[4][2]()))
    from ringbench.shapes import class_order

    assert not set(class_order(256)[-8:]) & set(class_order(64))  # held-out classes
    small = limit_per_class(digits, 5)
    assert len(list(small.items())) == 50 and small.fingerprint != digits.fingerprint
