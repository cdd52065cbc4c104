"""Kornblith et al. 2019's linear path (``transfer.kornblith``): the regularisation choice against
scikit-learn on the same split, mean per-class accuracy against a reference, the preprocessing against
torchvision's transforms, and the embedded twin ``linear_kornblith_synthetic`` end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score

from ringbench.errors import UserError
from tests.helpers import family_args, write_card
from tests.test_metadataset_probes import _one_blas_thread  # noqa: F401 (autouse fixture)
from transfer.checkpoints import load_backbone
from transfer.kornblith_protocol import (
    KORNBLITH_PATH,
    kornblith_evaluation,
    kornblith_multilabel_evaluation,
    mean_per_class_accuracy,
    parse_path,
    per_image_values,
    top1,
)
from transfer.linear import add_linear_arguments
from transfer.tasks import TaskContext, get_task


def _args(*argv):
    return family_args(add_linear_arguments, *argv)


def _gaussians(rng, n, classes=4, dim=8, spread=2.0):
    means = rng.normal(size=(classes, dim))
    y = np.arange(n) % classes
    return (means[y] + spread * rng.normal(size=(n, dim))).astype(np.float32), y


def test_the_path_is_kornblith_s():
    assert len(KORNBLITH_PATH) == 45 and KORNBLITH_PATH[0] == pytest.approx(1e-6) and KORNBLITH_PATH[-1] == 1e5
    assert parse_path("1e-6:1e5:45") == pytest.approx(KORNBLITH_PATH)
    with pytest.raises(UserError, match="--linear-path"):
        parse_path("1e-6,1e5")


def test_regularisation_choice_matches_sklearn():
    """Every value's validation score and the chosen value as scikit-learn's ``LogisticRegression(C=1/value)``
    fitted to convergence on the same split; the refit on train + validation scores the same on test."""
    rng = np.random.default_rng(0)
    x, y = _gaussians(rng, 200)
    tx, ty = _gaussians(np.random.default_rng(0), 120)  # same means (same seed), other noise
    tx = tx + 0.5 * rng.normal(size=tx.shape).astype(np.float32)
    train, val, test = (x[:120], y[:120]), (x[120:], y[120:]), (tx, ty)
    path = [1e-2, 1.0, 10.0, 100.0, 1000.0]
    out = kornblith_evaluation(train, val, test, 4, "mean_per_class", path, tol=1e-8, dtype=torch.float64)

    def sk(fit_x, fit_y, value):
        return LogisticRegression(C=1 / value, tol=1e-10, max_iter=5000).fit(fit_x.astype(float), fit_y)

    curve = {}
    for value in path:
        pred = sk(*train, value).predict(val[0].astype(float))
        curve[value] = balanced_accuracy_score(val[1], pred)
        assert out["val_curve"][f"{value:.6g}"] == pytest.approx(curve[value], abs=1.01 / 20)  # one image of 80
    best = max(path, key=lambda v: (out["val_curve"][f"{v:.6g}"], -v))
    assert out["value"] == best and curve[best] == pytest.approx(max(curve.values()), abs=1.01 / 20)
    ref = sk(np.concatenate([train[0], val[0]]), np.concatenate([train[1], val[1]]), best)
    assert out["test"] == pytest.approx(balanced_accuracy_score(ty, ref.predict(tx.astype(float))), abs=1.01 / 30)


def test_mean_per_class_accuracy_against_a_reference():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 7, 300)
    labels[labels == 5] = 6  # class 5 absent from the labels: not averaged over
    pred = np.where(rng.random(300) < 0.6, labels, rng.choice([0, 1, 2, 3, 4, 6], 300))
    assert mean_per_class_accuracy(pred, labels, 7) == pytest.approx(balanced_accuracy_score(labels, pred))
    recalls = [np.mean(pred[labels == c] == c) for c in np.unique(labels)]
    assert mean_per_class_accuracy(pred, labels, 7) == pytest.approx(np.mean(recalls))


@pytest.mark.parametrize("metric", ["top1", "mean_per_class"])
def test_per_image_values_average_to_the_metric_and_pair_cards(metric):
    """The per-image samples' plain mean is the metric (top-1, or mean per-class accuracy with unequal
    classes), and the mean of two cards' paired differences is the difference of their metrics."""
    from leaderboard.cells import make_cell

    rng = np.random.default_rng(4)
    labels = np.repeat([0, 1, 2, 4], [5, 17, 2, 9])  # class 3 absent, unequal counts
    score = {"top1": top1, "mean_per_class": mean_per_class_accuracy}[metric]
    preds = [np.where(rng.random(len(labels)) < p, labels, (labels + 1) % 5) for p in (0.4, 0.8)]
    samples = [per_image_values(pred == labels, labels, metric) for pred in preds]
    for pred, values in zip(preds, samples):
        assert len(values) == len(labels) and np.mean(values) == pytest.approx(100 * score(pred, labels, 5))
    diffs = np.subtract(samples[1], samples[0])
    assert diffs.mean() == pytest.approx(100 * (score(preds[1], labels, 5) - score(preds[0], labels, 5)))
    record = {"metrics": {"m": float(np.mean(samples[0]))}, "extra": {"per_episode": {"m": samples[0]}}}
    record["extra"]["samples_over"] = "test images"
    cell = make_cell(record, "m")
    assert cell.n == len(labels) and cell.over == "test images" and cell.lo <= cell.mean <= cell.hi


def test_preprocessing_is_torchvision_s_resize_and_centre_crop():
    from PIL import Image
    from torchvision import transforms

    from metadataset.features import preprocess

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 47, 3), dtype=np.uint8))
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    reference = transforms.Compose(
        [
            transforms.Resize(16, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(16),
            transforms.ToTensor(),
            transforms.Normalize(mean.tolist(), std.tolist()),
        ]
    )(image)
    got = preprocess(image, 16, mean, std, "shorter-bicubic-crop")
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=0)


def test_the_embedded_twin_end_to_end(tmp_path):
    card = write_card(tmp_path / "card.pth", image_size=16)
    task = get_task("linear_kornblith_synthetic")
    config = task.make_config(
        _args(
            "--linear-synthetic-classes",
            "3",
            "--linear-synthetic-train",
            "10",
            "--linear-synthetic-test",
            "3",
            "--linear-path",
            "1e-2:1e2:5",
        )
    )
    assert config["resize"] == "shorter-bicubic-crop" and config["protocol"] == "kornblith2019"
    backbone = load_backbone(card)
    task.validate(backbone, config)
    ctx = TaskContext(output_dir=tmp_path / "run", cache_dir=tmp_path / "cache")
    result = task.run(backbone, config, ctx)
    assert 0 <= result.metrics["acc"] <= 100 and result.extra["metric"] == "top1"
    assert result.extra["train_images"] + result.extra["val_images"] == 30 and result.extra["test_images"] == 9
    assert len(result.extra["val_curve"]) == 5 and result.extra["regularisation"] in config["path"]
    samples = result.extra["per_episode"]["acc"]
    assert result.extra["samples_over"] == "test images" and len(samples) == 9 and set(samples) <= {0.0, 100.0}
    assert np.mean(samples) == pytest.approx(result.metrics["acc"])
    again = task.run(backbone, config, ctx)
    assert again.extra["feature_cache"]["train"]["hit"] and again.metrics == result.metrics


def test_a_battery_task_names_its_missing_data(tmp_path):
    task = get_task("linear_flowers102")
    assert task.primary_metric == "mean_per_class_acc"
    with pytest.raises(UserError, match="--data-root"):
        task.validate(None, task.make_config(_args()))
    with pytest.raises(UserError, match=r"expected .*flowers-102.*imagelabels\.mat"):
        task.validate(None, task.make_config(_args("--data-root", str(tmp_path))))
    with pytest.raises(UserError, match="--linear-grid: not used"):
        from transfer.run import main

        main(["--backbone", "x.pth", "--task", "linear_flowers102", "--linear-grid", "1"])


@pytest.mark.parametrize("extrapolate", [False, True])
def test_the_path_solver_finds_each_value_s_solution(extrapolate):
    """``solve_logreg_path`` (features prepared once, warm starts, optional secant predictor) against
    ``solve_logreg`` from zero for each value."""
    from ringbench.logreg import solve_logreg, solve_logreg_path

    rng = np.random.default_rng(1)
    x, y = _gaussians(rng, 60, classes=3, dim=5)
    xt = torch.tensor(x, dtype=torch.float64)[None]
    yt = torch.tensor(y)[None]
    weights, mask = torch.ones(1, 1, 60, dtype=torch.float64), torch.ones(1, 3, dtype=torch.bool)
    lams = [1.0, 0.1, 0.01]
    path = list(solve_logreg_path(xt, yt, weights, mask, lams, tol=1e-8, extrapolate=extrapolate))
    for lam, (w, b) in zip(lams, path):
        ref_w, ref_b = solve_logreg(xt, yt, weights, mask, torch.tensor([[lam]], dtype=torch.float64), tol=1e-8)
        torch.testing.assert_close(w, ref_w, atol=1e-5, rtol=0)
        torch.testing.assert_close(b - b.mean(), ref_b - ref_b.mean(), atol=1e-5, rtol=0)


def test_multilabel_path_matches_sklearn_per_class():
    """linear_voc2007's path: per class a two-class softmax (ssl-transfer's ``multi_class='multinomial'`` on
    binary labels, i.e. scikit-learn's binary ``LogisticRegression(C=2/value)``), difficult images negative in
    training and ignored by the devkit's AP; one value for all classes, chosen by validation 11-point mAP."""
    from transfer.voc07 import voc11_mean_average_precision

    rng = np.random.default_rng(5)
    centres = 1.5 * rng.normal(size=(3, 6))

    def draw(m):
        y = np.where(rng.random((m, 3)) < 0.4, 1, -1).astype(np.int8)
        y[rng.random((m, 3)) < 0.1] = 0  # difficult
        x = (y != -1).astype(float) @ centres + rng.normal(size=(m, 6))
        return x.astype(np.float32), y

    train, val, test = draw(80), draw(40), draw(60)
    path = [1e-2, 1.0, 10.0, 100.0]
    out = kornblith_multilabel_evaluation(train, val, test, path, tol=1e-9, dtype=torch.float64)

    def scores(fit, value, x):
        return np.stack(
            [
                LogisticRegression(C=2 / value, tol=1e-12, max_iter=5000)
                .fit(fit[0].astype(float), fit[1][:, c] == 1)
                .decision_function(x.astype(float))
                for c in range(3)
            ],
            1,
        )

    curve = {v: voc11_mean_average_precision(scores(train, v, val[0]), val[1])[0] for v in path}
    for value in path:
        assert out["val_curve"][f"{value:.6g}"] == pytest.approx(curve[value], abs=1e-9)
    assert out["value"] == max(path, key=lambda v: (curve[v], -v)) and out["val_classes"] == 3
    trainval = (np.concatenate([train[0], val[0]]), np.concatenate([train[1], val[1]]))
    ref_map, ref_aps = voc11_mean_average_precision(scores(trainval, out["value"], test[0]), test[1])
    assert out["test"] == pytest.approx(ref_map, abs=1e-9) and out["ap"] == pytest.approx(ref_aps, abs=1e-9)


def test_linear_voc2007_names_its_missing_data(tmp_path):
    task = get_task("linear_voc2007")
    assert task.primary_metric == "map11"
    with pytest.raises(UserError, match=r"VOC2007: expected .*VOCdevkit/VOC2007/ImageSets/Main/ \(the VOC devkit"):
        task.validate(None, task.make_config(_args("--data-root", str(tmp_path))))


@pytest.mark.slow
def test_linear_voc2007_on_a_devkit_layout(tmp_path, twin_card):
    from PIL import Image

    from tests.test_voc07 import write_voc2007
    from transfer.voc07 import DIFFICULT, NEGATIVE, POSITIVE

    task = get_task("linear_voc2007")
    rng = np.random.default_rng(0)
    ids = {s: [f"{s[:2]}{i:04d}" for i in range(20)] for s in ("train", "val", "test")}
    labels = {}
    for split in ids:
        matrix = np.full((20, 20), NEGATIVE, dtype=np.int8)
        matrix[np.arange(20), np.arange(20)] = POSITIVE
        matrix[np.arange(20), (np.arange(20) + 1) % 20] = DIFFICULT
        labels[split] = matrix
    write_voc2007(tmp_path / "data", ids, labels)
    jpegs = tmp_path / "data" / "VOCdevkit" / "VOC2007" / "JPEGImages"
    for names in ids.values():
        for i in names:
            Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(jpegs / f"{i}.jpg")
    card, cache = twin_card
    backbone = load_backbone(card)
    flags = ["--data-root", str(tmp_path / "data"), "--linear-image-size", "16", "--linear-path", "1e-1:1e1:3"]
    config = task.make_config(_args(*flags))
    assert config["validation"] == "creators" and config["metric"] == "map11"
    task.validate(backbone, config)
    result = task.run(backbone, config, TaskContext(output_dir=tmp_path / "run", cache_dir=cache))
    assert set(result.metrics) == {"map11"} and 0 < result.metrics["map11"] <= 100
    assert len(result.extra["ap"]) == 20 and result.metrics["map11"] == pytest.approx(
        np.mean([*result.extra["ap"].values()])
    )
    assert result.extra["train_images"] == result.extra["val_images"] == result.extra["test_images"] == 20
    assert len(result.extra["val_curve"]) == 3 and "per_episode" not in result.extra


def test_linear_kornblith_runs_every_set_into_one_record(tmp_path, twin_card):
    """The all-sets task on two stand-in sets (the shapes read as a top-1 and a mean per-class set): each
    set's metric, chosen value, curve and per-image samples, and their mean; the real task names the first
    missing data set."""
    from transfer.battery_data import BatterySet
    from transfer.kornblith import make_kornblith_all_task, synthetic_listing

    task = get_task("linear_kornblith")
    assert task.headline_metrics[0] == "mean" and len(task.headline_metrics) == 13
    assert "voc2007/map11" in task.headline_metrics and "flowers102/mean_per_class_acc" in task.headline_metrics
    with pytest.raises(UserError, match=r"first missing is Food-101 .*expected .*food-101/meta/train\.json"):
        task.validate(None, task.make_config(_args("--data-root", str(tmp_path))))
    shapes = {"synthetic": {"classes": 3, "train": 8, "test": 3}}

    def read(root, seed):
        return synthetic_listing(shapes, 16)

    sets = {
        "a": BatterySet("a", "A", read, "a/", "train_fraction", "top1", 3),
        "b": BatterySet("b", "B", read, "b/", "train_fraction", "mean_per_class", 3),
    }
    both = make_kornblith_all_task(sets, name="linear_two")
    flags = ["--data-root", str(tmp_path), "--linear-image-size", "16", "--linear-path", "1e-1:1e1:3"]
    config = both.make_config(_args(*flags))
    assert config["sets"]["a"] == get_task("linear_cifar10").make_config(_args(*flags)) | {
        "dataset": "a"
    }  # each set's config is its own task's
    card, cache = twin_card
    result = both.run(load_backbone(card), config, TaskContext(output_dir=tmp_path / "run", cache_dir=cache))
    assert list(result.metrics) == ["mean", "a/acc", "b/mean_per_class_acc"]
    assert result.metrics["mean"] == pytest.approx(
        (result.metrics["a/acc"] + result.metrics["b/mean_per_class_acc"]) / 2
    )
    for metric, samples in result.extra["per_episode"].items():
        assert len(samples) == 9 and np.mean(samples) == pytest.approx(result.metrics[metric])
    assert set(result.extra["sets"]) == {"a", "b"} and len(result.extra["sets"]["b"]["val_curve"]) == 3
    assert result.extra["regularisation"]["a"] == result.extra["sets"]["a"]["regularisation"]
