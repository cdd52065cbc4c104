"""The linear battery's readers (``transfer.battery_data``) on tiny files written in each data set's exact
layout and file names: real ``.mat`` files (``scipy.io.savemat``), the split lists, tiny JPEG images; and a
missing file in each, which is one line naming the expected path."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import scipy.io
from PIL import Image

from ringbench.errors import UserError
from transfer.battery_data import (
    BATTERY,
    read_aircraft,
    read_birdsnap,
    read_caltech101,
    read_cars,
    read_dtd,
    read_flowers,
    read_food,
    read_pets,
    read_sun397,
)

_JPEG: bytes = b""


def _image(path):
    """A 6x4 JPEG (encoded once; every file holds the same bytes)."""
    global _JPEG
    if not _JPEG:
        import io

        buffer = io.BytesIO()
        Image.new("RGB", (6, 4), (200, 30, 60)).save(buffer, format="JPEG")
        _JPEG = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_JPEG)


def _text(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


def _check(listing, split, refs, labels):
    got = listing.splits[split]
    assert got.refs == refs and got.labels.tolist() == labels
    assert got.load(0).size == (6, 4)


def _missing(reader, root, path):
    """``path`` removed, the reader's error is one line naming it."""
    path.unlink()
    with pytest.raises(UserError) as info:
        reader(root)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_aircraft(tmp_path):
    data = tmp_path / "fgvc-aircraft-2013b" / "data"
    _text(data / "variants.txt", ["707-320", "A300B4", "Cessna 172"])
    for split, rows in (
        ("train", ["0001 707-320", "0002 Cessna 172"]),
        ("val", ["0003 A300B4"]),
        ("test", ["0004 A300B4"]),
    ):
        _text(data / f"images_variant_{split}.txt", rows)
        for row in rows:
            _image(data / "images" / f"{row.split()[0]}.jpg")
    listing = read_aircraft(tmp_path)
    assert listing.classes == ["707-320", "A300B4", "Cessna 172"]
    _check(listing, "train", ["images/0001.jpg", "images/0002.jpg"], [0, 2])
    _check(listing, "val", ["images/0003.jpg"], [1])
    _missing(read_aircraft, tmp_path, data / "images_variant_val.txt")


def test_cars(tmp_path):
    base = tmp_path / "stanford_cars"
    annos = np.dtype(
        [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"), ("fname", "O")]
    )

    def write(path, rows):
        path.parent.mkdir(parents=True, exist_ok=True)
        table = np.zeros((1, len(rows)), dtype=annos)
        for i, (cls, fname) in enumerate(rows):
            table[0, i] = (1, 2, 30, 40, cls, fname)
        scipy.io.savemat(path, {"annotations": table})

    scipy.io.savemat(
        (base / "devkit").mkdir(parents=True) or base / "devkit" / "cars_meta.mat",
        {"class_names": np.array([["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]], dtype=object)},
    )
    write(base / "devkit" / "cars_train_annos.mat", [(2, "00001.jpg"), (1, "00002.jpg")])
    write(base / "cars_test_annos_withlabels.mat", [(1, "00001.jpg")])
    for ref in ("cars_train/00001.jpg", "cars_train/00002.jpg", "cars_test/00001.jpg"):
        _image(base / ref)
    listing = read_cars(tmp_path)
    assert listing.classes == ["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]
    _check(listing, "train", ["cars_train/00001.jpg", "cars_train/00002.jpg"], [1, 0])
    _check(listing, "test", ["cars_test/00001.jpg"], [0])
    assert "val" not in listing.splits
    _missing(read_cars, tmp_path, base / "cars_test_annos_withlabels.mat")


@pytest.mark.parametrize("torchvision_folder", [True, False])
def test_dtd_first_partition(tmp_path, torchvision_folder):
    base = tmp_path / "dtd" / "dtd" if torchvision_folder else tmp_path / "dtd"
    rows = {"train": ["banded/banded_0002.jpg", "zigzagged/zigzagged_0003.jpg"], "val": ["banded/banded_0004.jpg"]}
    rows["test"] = ["zigzagged/zigzagged_0005.jpg"]
    for split, lines in rows.items():
        _text(base / "labels" / f"{split}1.txt", lines)
        _text(base / "labels" / f"{split}2.txt", ["banded/banded_0099.jpg"])  # other partitions: not read
        for line in lines:
            _image(base / "images" / line)
    listing = read_dtd(tmp_path)
    assert listing.classes == ["banded", "zigzagged"]
    _check(listing, "train", ["images/banded/banded_0002.jpg", "images/zigzagged/zigzagged_0003.jpg"], [0, 1])
    _check(listing, "val", ["images/banded/banded_0004.jpg"], [0])
    _missing(read_dtd, tmp_path, base / "images" / "zigzagged" / "zigzagged_0005.jpg")


def test_flowers(tmp_path):
    base = tmp_path / "flowers-102"
    base.mkdir()
    scipy.io.savemat(base / "imagelabels.mat", {"labels": np.array([[3, 1, 2, 3, 1]], dtype=np.uint8)})
    scipy.io.savemat(
        base / "setid.mat",
        {"trnid": np.array([[1, 2]], dtype=np.uint16), "valid": np.array([[3]]), "tstid": np.array([[4, 5]])},
    )
    for i in range(1, 6):
        _image(base / "jpg" / f"image_{i:05d}.jpg")
    listing = read_flowers(tmp_path)
    assert listing.classes == ["1", "2", "3"]
    _check(listing, "train", ["jpg/image_00001.jpg", "jpg/image_00002.jpg"], [2, 0])
    _check(listing, "val", ["jpg/image_00003.jpg"], [1])
    _check(listing, "test", ["jpg/image_00004.jpg", "jpg/image_00005.jpg"], [2, 0])
    _missing(read_flowers, tmp_path, base / "setid.mat")


def test_food(tmp_path):
    base = tmp_path / "food-101"
    meta = {"train": {"waffles": ["waffles/11"], "apple_pie": ["apple_pie/12", "apple_pie/13"]}}
    meta["test"] = {"apple_pie": ["apple_pie/14"], "waffles": ["waffles/15"]}
    for split, entries in meta.items():
        (base / "meta").mkdir(parents=True, exist_ok=True)
        (base / "meta" / f"{split}.json").write_text(json.dumps(entries))
        for items in entries.values():
            for item in items:
                _image(base / "images" / f"{item}.jpg")
    listing = read_food(tmp_path)
    assert listing.classes == ["apple_pie", "waffles"]
    _check(listing, "train", ["images/apple_pie/12.jpg", "images/apple_pie/13.jpg", "images/waffles/11.jpg"], [0, 0, 1])
    _missing(read_food, tmp_path, base / "meta" / "test.json")


def test_pets(tmp_path):
    base = tmp_path / "oxford-iiit-pet"
    _text(base / "annotations" / "trainval.txt", ["Abyssinian_100 1 1 1", "american_bulldog_10 2 2 1"])
    _text(base / "annotations" / "test.txt", ["american_bulldog_11 2 2 1"])
    for name in ("Abyssinian_100", "american_bulldog_10", "american_bulldog_11"):
        _image(base / "images" / f"{name}.jpg")
    listing = read_pets(tmp_path)
    assert listing.classes == ["Abyssinian", "American Bulldog"]  # torchvision's class names
    _check(listing, "train", ["images/Abyssinian_100.jpg", "images/american_bulldog_10.jpg"], [0, 1])
    _check(listing, "test", ["images/american_bulldog_11.jpg"], [1])
    _missing(read_pets, tmp_path, base / "annotations" / "test.txt")


@pytest.mark.parametrize("partitions", ["Partitions", ""])
def test_sun397_first_partition(tmp_path, partitions):
    base = tmp_path / "SUN397"
    _text(base / "ClassName.txt", ["/a/abbey", "/o/outhouse/outdoor"])
    _text(base / partitions / "Training_01.txt", ["/a/abbey/sun_aa.jpg", "/o/outhouse/outdoor/sun_bb.jpg"])
    _text(base / partitions / "Testing_01.txt", ["/o/outhouse/outdoor/sun_cc.jpg"])
    _text(base / partitions / "Training_02.txt", ["/a/abbey/sun_zz.jpg"])  # not read
    for name in ("a/abbey/sun_aa.jpg", "o/outhouse/outdoor/sun_bb.jpg", "o/outhouse/outdoor/sun_cc.jpg"):
        _image(base / name)
    listing = read_sun397(tmp_path)
    assert listing.classes == ["abbey", "outhouse/outdoor"]
    _check(listing, "train", ["a/abbey/sun_aa.jpg", "o/outhouse/outdoor/sun_bb.jpg"], [0, 1])
    _check(listing, "test", ["o/outhouse/outdoor/sun_cc.jpg"], [1])
    _missing(read_sun397, tmp_path, base / partitions / "Testing_01.txt")


def test_caltech101_thirty_per_class_seeded(tmp_path):
    base = tmp_path / "caltech101" / "101_ObjectCategories"
    for cls, n in (("accordion", 33), ("BACKGROUND_Google", 2), ("Faces_easy", 31)):
        for i in range(1, n + 1):
            _image(base / cls / f"image_{i:04d}.jpg")
    listing = read_caltech101(tmp_path, seed=0)
    assert listing.classes == ["Faces_easy", "accordion"]  # sorted as torchvision; no BACKGROUND_Google
    train, test = listing.splits["train"], listing.splits["test"]
    assert np.bincount(train.labels).tolist() == [30, 30] and np.bincount(test.labels).tolist() == [1, 3]
    assert not set(train.refs) & set(test.refs)
    assert read_caltech101(tmp_path, seed=0).splits["test"].refs == test.refs
    assert read_caltech101(tmp_path, seed=1).splits["test"].refs != test.refs
    shutil.rmtree(base)
    with pytest.raises(UserError, match=f"expected {base}"):
        read_caltech101(tmp_path)


def test_birdsnap(tmp_path):
    base = tmp_path / "birdsnap"
    header = "id\tcommon\tscientific\tdir"
    _text(
        base / "species.txt",
        [
            header,
            "2\tBlue Jay\tCyanocitta cristata\tBlue_Jay",
            "1\tAcadian Flycatcher\tEmpidonax virescens\tAcadian_Flycatcher",
        ],
    )
    _text(base / "test_images.txt", ["path", "Blue_Jay/3.jpg", "Blue_Jay/404.jpg"])  # 404: not downloaded
    for ref in ("Acadian_Flycatcher/1.jpg", "Blue_Jay/2.jpg", "Blue_Jay/3.jpg"):
        _image(base / "download" / "images" / ref)
    listing = read_birdsnap(tmp_path)
    assert listing.classes == ["Acadian Flycatcher", "Blue Jay"]
    _check(listing, "train", ["Acadian_Flycatcher/1.jpg", "Blue_Jay/2.jpg"], [0, 1])
    _check(listing, "test", ["Blue_Jay/3.jpg"], [1])
    assert listing.info == {"test_listed": 2, "test_missing": 1}
    _missing(read_birdsnap, tmp_path, base / "test_images.txt")


def test_the_table_names_twelve_data_sets_with_their_rules():
    assert len(BATTERY) == 12
    assert {n for n, s in BATTERY.items() if s.validation == "creators"} == {"aircraft", "voc2007", "dtd", "flowers102"}
    assert {n for n, s in BATTERY.items() if s.problem == "multilabel"} == {"voc2007"}
    assert BATTERY["voc2007"].metric == "map11"
    assert {n for n, s in BATTERY.items() if s.metric == "mean_per_class"} == {
        "aircraft",
        "pets",
        "caltech101",
        "flowers102",
    }


def test_voc2007_listing_keeps_the_devkit_matrix(tmp_path):
    from tests.test_voc07 import write_voc2007
    from transfer.battery_data import read_voc2007

    ids = {"train": ["000005", "000007"], "val": ["000009"], "test": ["000001", "000002"]}
    labels = {s: np.full((len(i), 20), -1, dtype=np.int8) for s, i in ids.items()}
    labels["train"][0, 3], labels["train"][1, 3], labels["test"][1, 19] = 1, 0, 1
    write_voc2007(tmp_path, ids, labels)
    listing = read_voc2007(tmp_path)
    assert listing.classes[0] == "aeroplane" and set(listing.splits) == {"train", "val", "test"}
    assert listing.splits["train"].refs == ["JPEGImages/000005.jpg", "JPEGImages/000007.jpg"]
    np.testing.assert_array_equal(listing.splits["train"].labels, labels["train"])
    np.testing.assert_array_equal(listing.splits["test"].labels, labels["test"])
    (tmp_path / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main" / "dog_val.txt").unlink()
    with pytest.raises(UserError, match=r"expected .*ImageSets/Main/dog_val\.txt"):
        read_voc2007(tmp_path)
