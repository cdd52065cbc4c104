"""Dataset readers on small files written in the real on-disk formats; augmentations; kNN."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.data.datasets import open_splits
from pretrain.data.transforms import IndexedDataset, MultiView, eval_transform, moco_v2_augmentation
from pretrain.knn import knn_accuracy, knn_predict
from ringbench.errors import UserError
from ringbench.readers import cifar, image_folder, stl10


def _write_cifar(root: Path, classes: int, per_file: int = 6) -> dict[str, tuple[np.ndarray, list[int]]]:
    rng = np.random.default_rng(0)
    if classes == 10:
        folder, key, names = (
            root / "cifar-10-batches-py",
            "labels",
            [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
        )
    else:
        folder, key, names = root / "cifar-100-python", "fine_labels", ["train", "test"]
    folder.mkdir(parents=True)
    written = {}
    for name in names:
        data = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, size=per_file).tolist()
        with open(folder / name, "wb") as handle:  # as the original python-version archives: latin1 keys
            pickle.dump(
                {"batch_label": name, key: labels, "data": data, "filenames": [f"{i}.png" for i in range(per_file)]},
                handle,
            )
        written[name] = (data, labels)
    return written


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_reads_torchvision_layout(tmp_path: Path, classes: int):
    written = _write_cifar(tmp_path, classes)
    train, test = cifar(tmp_path, "train", classes), cifar(tmp_path, "test", classes)
    first = "data_batch_1" if classes == 10 else "train"
    test_name = "test_batch" if classes == 10 else "test"
    assert len(train) == (30 if classes == 10 else 6) and len(test) == 6
    image, label = train[1]
    assert isinstance(image, Image.Image) and image.size == (32, 32)
    raw = written[first][0][1]
    # channel-planar rows: R plane, then G, then B; pixel (row 0, col 1) is entry 1 of each plane
    assert np.asarray(image)[0, 1].tolist() == [raw[1], raw[1024 + 1], raw[2048 + 1]]
    assert label == written[first][1][1]
    assert test.targets == written[test_name][1]


def test_cifar_missing_files_is_user_error(tmp_path: Path):
    with pytest.raises(UserError, match=r"cifar-10-batches-py.*data_batch_1"):
        cifar(tmp_path, "train", 10)
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="not a CIFAR python batch"):
        cifar(tmp_path, "test", 10)


def test_cifar_refuses_code_in_pickles(tmp_path: Path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({"data": Path("x"), "labels": []}, handle)
    with pytest.raises(UserError, match="not allowed"):
        cifar(tmp_path, "test", 10)


def test_stl10_binary_layout(tmp_path: Path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    rng = np.random.default_rng(1)
    images = {}
    for split, n in (("train", 3), ("test", 2), ("unlabeled", 4)):
        hwc = rng.integers(0, 256, size=(n, 96, 96, 3), dtype=np.uint8)
        images[split] = hwc
        hwc.transpose(0, 3, 2, 1).tofile(folder / f"{split}_X.bin")  # STL-10 stores (C, W, H), column-major
        if split != "unlabeled":
            np.array([1, 10, 5][:n], dtype=np.uint8).tofile(folder / f"{split}_y.bin")
    train = stl10(tmp_path, "train")
    assert np.array_equal(np.asarray(train[2][0]), images["train"][2]) and train.targets == [0, 9, 4]
    both = stl10(tmp_path, "train+unlabeled")
    assert len(both) == 7 and both.targets[3:] == [-1] * 4
    assert np.array_equal(np.asarray(both[5][0]), images["unlabeled"][2])
    (folder / "test_X.bin").write_bytes(b"\0" * 100)
    with pytest.raises(UserError, match="3x96x96"):
        stl10(tmp_path, "test")
    with pytest.raises(UserError, match="stl10_binary"):
        stl10(tmp_path / "nowhere", "train")


def test_image_folder(tmp_path: Path):
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / split / cls / "a.png")
    cfg = {"name": "imagefolder", "root": str(tmp_path)}
    train, _knn_train, test, spec = open_splits(cfg)
    assert len(train) == 2 and train.classes == ["cat", "dog"] and spec.image_size == 224
    assert test[1][1] == 1 and test[1][0].size == (40, 30)
    with pytest.raises(UserError, match="no folder"):
        image_folder(tmp_path / "train" / "cat", "val")


def test_synthetic_splits_and_stats():
    cfg = {
        "name": "synthetic",
        "root": None,
        "synthetic_classes": 4,
        "synthetic_images_per_class": 8,
        "synthetic_image_size": 16,
        "synthetic_seed": 0,
    }
    train, _knn_train, test, spec = open_splits(cfg)
    assert len(train) == 32 and len(test) == 8 and spec.num_classes == 4 and spec.image_size == 16
    pixels = np.stack([np.asarray(train[i][0]) / 255.0 for i in range(32)]).reshape(-1, 3)
    assert np.allclose(spec.mean, pixels.mean(0), atol=1e-3)
    assert not np.array_equal(np.asarray(train[0][0]), np.asarray(test[0][0]))


def test_augmentations_sized_to_data():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 60, 3), dtype=np.uint8))
    for size, blurred in ((32, False), (96, True), (224, True)):
        aug = moco_v2_augmentation(size, (0.5,) * 3, (0.25,) * 3)
        assert aug(image).shape == (3, size, size)
        assert any("GaussianBlur" in repr(t) for t in aug.transforms) == blurred
    views = MultiView(moco_v2_augmentation(32, (0.5,) * 3, (0.25,) * 3), 2)(image)
    assert len(views) == 2 and not torch.equal(views[0], views[1])
    assert eval_transform(224, (0.5,) * 3, (0.25,) * 3)(image).shape == (3, 224, 224)
    indexed = IndexedDataset([(image, 3)] * 5, MultiView(eval_transform(32, (0.5,) * 3, (0.25,) * 3), 1))
    views, index = indexed[4]
    assert index == 4 and views[0].shape == (3, 32, 32)


def test_knn_matches_scikit_learn_weighted_vote():
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(0)
    train = rng.normal(size=(300, 16)).astype(np.float32)
    labels = rng.integers(0, 5, 300)
    test = rng.normal(size=(50, 16)).astype(np.float32)
    t, k = 0.1, 20
    ref = KNeighborsClassifier(k, metric="cosine", algorithm="brute", weights=lambda d: np.exp((1 - d) / t))
    want = ref.fit(train, labels).predict(test)
    got = knn_predict(torch.from_numpy(train), torch.from_numpy(labels), torch.from_numpy(test), 5, k=k, t=t, chunk=7)
    assert np.array_equal(got.numpy(), want)
    acc = knn_accuracy(
        torch.from_numpy(train), torch.from_numpy(labels), torch.from_numpy(test), torch.from_numpy(want), 5, k, t
    )
    assert acc == 100.0


def test_stream_seeds_never_collide():
    # The old scheme seed*1000 + epoch*10 + rank gave (epoch 0, rank 10) the seed of (epoch 1, rank 0).
    from pretrain.seeds import AUGMENT, METHOD, ORDER, WORKERS, stream_seed

    grid = [(s, k, e, r) for s in range(3) for k in (AUGMENT, WORKERS) for e in range(50) for r in range(64)]
    grid += [(s, METHOD, e) for s in range(3) for e in range(50)] + [(s, ORDER) for s in range(3)]
    values = [stream_seed(*coords) for coords in grid]
    assert len(set(values)) == len(values)
    assert all(0 <= v < 2**63 for v in values)
    assert stream_seed(0, AUGMENT, 0, 10) != stream_seed(0, AUGMENT, 1, 0)
    assert stream_seed(7, METHOD, 3) == stream_seed(7, METHOD, 3)  # a function of its inputs
