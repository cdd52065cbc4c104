"""VOC07 SVM and low-shot SVM: the classifier against VISSL's settings, the low-shot samples, the
VOC2007 tasks on a devkit layout, and the embedded twins end to end."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.model_selection import cross_val_score

from ringbench.errors import UserError
from tests.helpers import family_args
from tests.test_voc07 import write_voc2007
from transfer.checkpoints import load_backbone
from transfer.svm import (
    COSTS,
    _Fits,
    add_svm_arguments,
    cross_validated_ap,
    lowshot_sample,
    make_svc,
    normalise_features,
    svm_evaluation,
)
from transfer.tasks import TaskContext, get_task
from transfer.voc07 import DIFFICULT, NEGATIVE, POSITIVE


def _args(*argv):
    return family_args(add_svm_arguments, *argv)


def test_published_values():
    config = get_task("svm_voc2007_lowshot").make_config(_args())
    assert config["costs"] == [0.01, 0.1, 1.0, 2, 5, 10, 15, 20, 50, 100, 1000] == list(COSTS)
    assert config["folds"] == 3 and config["max_iter"] == 2000
    assert config["lowshot"] == {"ks": [1, 2, 4, 8, 16, 32, 64, 96], "samples": 5, "seed": 0}
    svc = make_svc(5.0)
    assert (svc.C, svc.class_weight, svc.loss, svc.penalty, svc.dual, svc.tol) == (
        5.0,
        {1: 2, -1: 1},
        "squared_hinge",
        "l2",
        True,
        1e-4,
    )
    x = np.array([[3.0, 4.0]])
    np.testing.assert_allclose(normalise_features(x), x / (5 + 1e-5))
    with pytest.raises(UserError, match="add 2"):
        get_task("svm_voc2007_lowshot").make_config(_args("--svm-lowshot-ks", "1,4"))


def test_cost_chosen_by_cross_validation_and_difficult_ignored_at_test():
    rng = np.random.default_rng(0)
    train_x = rng.normal(size=(60, 5))
    train_labels = np.where(train_x[:, :2] > 0.3, POSITIVE, NEGATIVE).astype(np.int8)
    test_x = rng.normal(size=(40, 5))
    test_labels = np.where(test_x[:, :2] > 0.3, POSITIVE, NEGATIVE).astype(np.int8)
    test_labels[:5, 0] = DIFFICULT
    out = svm_evaluation(train_x, train_labels, test_x, test_labels, costs=[0.01, 10.0], folds=3)
    assert len(out["cv_ap"]) == 2 and all(len(row) == 2 for row in out["cv_ap"])
    assert out["cost"] == [[0.01, 10.0][int(np.argmax(row))] for row in out["cv_ap"]]
    assert 0.5 < out["map"] <= 1 and out["fits"] == 2 * (2 * 3 + 1)
    # the folds and score of VISSL's call
    y = np.where(train_labels[:, 1] == POSITIVE, 1, -1)
    x = normalise_features(train_x)
    want = [cross_val_score(make_svc(c), x, y, cv=3, scoring="average_precision").mean() for c in (0.01, 10.0)]
    np.testing.assert_allclose(cross_validated_ap(x, y, [0.01, 10.0], 3, 2000, _Fits()), want, rtol=1e-12)


def test_lowshot_sample_draws_k_positives_and_19k_negatives():
    labels = np.full((200, 20), NEGATIVE, dtype=np.int8)
    labels[np.arange(200), np.arange(200) % 20] = POSITIVE
    labels[:20, 3] = DIFFICULT
    rows = lowshot_sample(labels, 4, np.random.default_rng(0), [str(c) for c in range(20)])
    for c, r in enumerate(rows):
        assert len(r) == 80 and len(set(r)) == 80
        assert (labels[r[:4], c] == POSITIVE).all() and (labels[r[4:], c] == NEGATIVE).all()
    again = lowshot_sample(labels, 4, np.random.default_rng(0), [str(c) for c in range(20)])
    assert all((a == b).all() for a, b in zip(rows, again))
    with pytest.raises(UserError, match="class 0 has 10 positive"):
        lowshot_sample(labels, 11, np.random.default_rng(0), [str(c) for c in range(20)])


def test_voc2007_tasks_refuse_a_missing_devkit_file(tmp_path):
    task = get_task("svm_voc2007")
    with pytest.raises(UserError, match="--data-root"):
        task.validate(None, task.make_config(_args()))
    write_voc2007(tmp_path, {"trainval": ["000005"]}, {"trainval": np.ones((1, 20), dtype=np.int8)})
    with pytest.raises(UserError, match=r"expected .*ImageSets/Main/aeroplane_test.txt"):
        task.validate(None, task.make_config(_args("--data-root", str(tmp_path))))


@pytest.mark.parametrize("task_name", ["svm_synthetic", "svm_synthetic_lowshot"])
def test_svm_twins_end_to_end(tmp_path, twin_card, task_name):
    card, cache = twin_card
    task = get_task(task_name)
    flags = ["--svm-synthetic-classes", "4", "--svm-synthetic-train", "6", "--svm-synthetic-test", "3"]
    flags += ["--svm-costs", "0.1,10", "--svm-lowshot-ks", "1,2", "--svm-lowshot-samples", "2"]
    if task_name == "svm_synthetic":
        flags = flags[:-4]
    config = task.make_config(_args(*flags))
    backbone = load_backbone(card)
    result = task.run(backbone, config, TaskContext(output_dir=tmp_path / "run", cache_dir=cache))
    assert result.extra["train_images"] == 24 and result.extra["test_images"] == 12
    if task_name == "svm_synthetic":
        assert set(result.metrics) == {"map", "map_allpoint"} and 0 < result.metrics["map"] <= 100
        assert set(result.extra["cost"].values()) <= {0.1, 10.0}
    else:
        assert set(result.metrics) == {"map_k1", "map_k2"} and len(result.extra["per_seed"]) == 2
        assert result.metrics["map_k2"] == pytest.approx(np.mean([s["map_k2"] for s in result.extra["per_seed"]]))
        assert result.extra["cost"]["k1"] == result.extra["cost"]["k2"]
        assert len(result.extra["test_map_by_cost"]["k1"][0]) == 2


@pytest.mark.slow
def test_voc2007_tasks_end_to_end_on_a_devkit_layout(tmp_path, twin_card):
    from PIL import Image

    rng = np.random.default_rng(0)
    ids = {"trainval": [f"{i:06d}" for i in range(40)], "test": [f"{i:06d}" for i in range(100, 120)]}
    labels = {}
    for split, names in ids.items():
        matrix = np.full((len(names), 20), NEGATIVE, dtype=np.int8)
        matrix[np.arange(len(names)), np.arange(len(names)) % 20] = POSITIVE
        labels[split] = matrix
    labels["test"][0, 5] = DIFFICULT
    write_voc2007(tmp_path / "data", ids, labels)
    jpegs = tmp_path / "data" / "VOCdevkit" / "VOC2007" / "JPEGImages"
    for names in ids.values():
        for i in names:
            Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(jpegs / f"{i}.jpg")
    card, cache = twin_card
    backbone = load_backbone(card)
    root = ["--data-root", str(tmp_path / "data"), "--svm-costs", "0.1,10"]
    full = get_task("svm_voc2007")
    config = full.make_config(_args(*root))
    full.validate(backbone, config)
    result = full.run(backbone, config, TaskContext(output_dir=tmp_path / "run", cache_dir=cache))
    assert result.extra["train_images"] == 40 and result.extra["test_images"] == 20
    assert len(result.extra["ap"]) == 20 and 0 <= result.metrics["map"] <= 100
    low = get_task("svm_voc2007_lowshot")
    config = low.make_config(_args(*root, "--svm-lowshot-ks", "1,2", "--svm-lowshot-samples", "2"))
    result = low.run(backbone, config, TaskContext(output_dir=tmp_path / "low", cache_dir=cache))
    assert result.extra["feature_cache"]["train"]["hit"] and set(result.metrics) == {"map_k1", "map_k2"}
