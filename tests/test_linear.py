"""Many-shot linear evaluation: the protocol against scikit-learn, the dataset readers on files
written in the real formats, and ``linear_synthetic`` end to end."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from ringbench.errors import UserError
from ringbench.logreg import l2_normalise
from tests.helpers import family_args, write_card
from tests.test_metadataset_probes import _one_blas_thread  # noqa: F401 (autouse fixture)
from transfer.checkpoints import load_backbone
from transfer.linear import (
    add_linear_arguments,
    linear_evaluation,
    open_linear_split,
    read_cifar,
    read_stl10,
    stratified_holdout,
)
from transfer.tasks import TaskContext, get_task


def _gaussians(rng, n_per_class, classes=4, dim=16, spread=1.5):
    means = rng.normal(size=(classes, dim))
    x = np.concatenate([means[c] + spread * rng.normal(size=(n_per_class, dim)) for c in range(classes)])
    return x.astype(np.float32), np.repeat(np.arange(classes), n_per_class)


def _args(*argv):
    return family_args(add_linear_arguments, *argv)


def test_stratified_holdout():
    labels = np.repeat(np.arange(3), [10, 20, 2])
    held = stratified_holdout(labels, 0.2, seed=0)
    assert [held[labels == c].sum() for c in range(3)] == [2, 4, 1]
    np.testing.assert_array_equal(held, stratified_holdout(labels, 0.2, seed=0))
    assert (held != stratified_holdout(labels, 0.2, seed=1)).any()


def test_protocol_matches_sklearn():
    rng = np.random.default_rng(0)
    train_x, train_y = _gaussians(rng, 40)
    test_x, test_y = train_x[::2] + 0.3 * rng.normal(size=train_x[::2].shape).astype(np.float32), train_y[::2]
    grid = [1e-4, 1e-2, 1.0]
    out = linear_evaluation(train_x, train_y, test_x, test_y, 4, grid, 0.2, seed=0)
    held = stratified_holdout(train_y, 0.2, 0)

    def sk(x, y, lam):
        return LogisticRegression(C=1 / (lam * len(y)), tol=1e-8, max_iter=2000).fit(l2_normalise(x.astype(float)), y)

    for lam in grid:
        ref = np.mean(
            sk(train_x[~held], train_y[~held], lam).predict(l2_normalise(train_x[held].astype(float))) == train_y[held]
        )
        assert out["val_acc"][f"{lam:g}"] == pytest.approx(ref, abs=1.5 / held.sum())
    best = max(grid, key=lambda g: (out["val_acc"][f"{g:g}"], g))
    assert out["weight_decay"] == best
    ref_test = np.mean(sk(train_x, train_y, best).predict(l2_normalise(test_x.astype(float))) == test_y)
    assert out["test_acc"] == pytest.approx(ref_test, abs=0.005)


def _write_cifar10(root, n_train=6, n_test=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", n_train) for i in range(1, 6)] + [("test_batch", n_test)]:
        batch = {
            "batch_label": name,
            "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            "labels": [int(v) for v in rng.integers(0, 10, size=n)],
            "filenames": [f"{i}.png" for i in range(n)],
        }
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [f"name{c}" for c in range(10)], "num_vis": 3072}, handle)
    return folder


def test_cifar_reader_on_the_python_batch_format(tmp_path):
    folder = _write_cifar10(tmp_path)
    images, labels, classes = read_cifar(folder, "cifar10", "train")
    assert images.shape == (30, 32, 32, 3) and len(labels) == 30 and classes[3] == "name3"
    with open(folder / "data_batch_2", "rb") as handle:
        raw = pickle.load(handle)
    # row layout: 1024 red, 1024 green, 1024 blue values, row-major 32x32
    np.testing.assert_array_equal(images[6, 0, 1], raw["data"][0][[1, 1025, 2049]])
    assert labels[6] == raw["labels"][0]
    test = open_linear_split("cifar10", "test", str(tmp_path), {}, 32)
    assert len(test) == 4 and next(iter(test.items()))[2]().size == (32, 32)


def test_stl10_reader_on_the_binary_format(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(3, 96, 96, 3), dtype=np.uint8)  # (N, H, W, C)
    images.transpose(0, 3, 2, 1).tofile(folder / "train_X.bin")  # stored (N, C, W, H): column-major planes
    np.array([1, 10, 4], dtype=np.uint8).tofile(folder / "train_y.bin")
    got, labels, _ = read_stl10(folder, "train")
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(labels, [0, 9, 3])


def test_missing_or_bad_data_is_a_clear_error(tmp_path):
    task = get_task("linear_cifar100")
    backbone = None
    with pytest.raises(UserError, match="--data-root"):
        task.validate(backbone, task.make_config(_args()))
    with pytest.raises(UserError, match=r"expected .*cifar-100-python/ holding train, test"):
        task.validate(backbone, task.make_config(_args("--data-root", str(tmp_path))))
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="not a CIFAR python batch"):
        read_cifar(folder, "cifar10", "test")
    with pytest.raises(UserError, match="--linear-grid"):
        get_task("linear_synthetic").make_config(_args("--linear-grid", "0.1,-1"))


def test_linear_synthetic_end_to_end(tmp_path):
    card = write_card(tmp_path / "card.pth", image_size=16)
    task = get_task("linear_synthetic")
    config = task.make_config(
        _args(
            "--linear-synthetic-classes",
            "6",
            "--linear-synthetic-train",
            "15",
            "--linear-synthetic-test",
            "5",
            "--linear-grid",
            "1e-4,1e-2,1",
        )
    )
    backbone = load_backbone(card)
    task.validate(backbone, config)
    ctx = TaskContext(output_dir=tmp_path / "run", cache_dir=tmp_path / "cache")
    result = task.run(backbone, config, ctx)
    assert 0 <= result.metrics["acc"] <= 100 and result.extra["train_images"] == 90
    assert result.extra["test_images"] == 30 and result.extra["weight_decay"] in (1e-4, 1e-2, 1.0)
    again = task.run(backbone, config, ctx)
    assert again.extra["feature_cache"]["train"]["hit"] and again.metrics == result.metrics
