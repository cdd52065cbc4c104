"""Weighted kNN: the chunked search and vote against a brute-force reference, and ``knn_synthetic``
end to end (per-image correctness for the leaderboard's paired bootstrap)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ringbench.errors import UserError
from tests.helpers import family_args
from transfer.checkpoints import load_backbone
from transfer.knn import add_knn_arguments, knn_evaluation, knn_peak_bytes
from transfer.tasks import TaskContext, get_task


def _brute_force(train_x, train_y, test_x, k, t, num_classes):
    """Wu et al.'s vote written out directly in float64: every similarity, a full sort."""
    a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    b = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    sims = b.astype(np.float64) @ a.T.astype(np.float64)
    preds = []
    for row in sims:
        order = np.argsort(-row, kind="stable")[:k]
        votes = np.zeros(num_classes)
        for j in order:
            votes[train_y[j]] += np.exp(row[j] / t)
        preds.append(int(np.argmax(votes)))
    return np.array(preds)


def _args(*argv):
    return family_args(add_knn_arguments, *argv)


@pytest.mark.parametrize("chunk,query_batch", [(7, 5), (1000, 1000)])
def test_chunked_weighted_knn_matches_brute_force(chunk, query_batch):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 12))
    train_y = rng.integers(0, 6, 230)
    train_x = (centres[train_y] + 1.2 * rng.normal(size=(230, 12))).astype(np.float32)
    test_y = rng.integers(0, 6, 40)
    test_x = (centres[test_y] + 1.2 * rng.normal(size=(40, 12))).astype(np.float32)
    got = knn_evaluation(train_x, train_y, test_x, test_y, 6, ks=(1, 20, 200), chunk=chunk, query_batch=query_batch)
    for k in (1, 20, 200):
        want = _brute_force(train_x, train_y, test_x, k, 0.07, 6) == test_y
        np.testing.assert_array_equal(got[k], want)
    # more neighbours than training images: all of them vote
    small = knn_evaluation(train_x[:9], train_y[:9], test_x, test_y, 6, ks=(200,), chunk=4)
    np.testing.assert_array_equal(small[200], _brute_force(train_x[:9], train_y[:9], test_x, 9, 0.07, 6) == test_y)


def test_peak_memory_does_not_grow_with_the_training_set():
    assert knn_peak_bytes(50_000, 2048) < 1.5e9
    assert knn_peak_bytes(10, 4, chunk=100) == 4 * 40 + 24 * 100 + 4 * 10 * 100 + 12 * 10 * 200 + 36 * 10 * 400


def test_missing_data_names_the_knn_task(tmp_path):
    task = get_task("knn_cifar10")
    with pytest.raises(UserError, match="knn_cifar10 needs its data"):
        task.validate(None, task.make_config(_args()))
    with pytest.raises(UserError, match=r"expected .*cifar-10-batches-py/"):
        task.validate(None, task.make_config(_args("--data-root", str(tmp_path))))


def test_knn_synthetic_end_to_end(tmp_path, twin_card):
    card, cache = twin_card
    task = get_task("knn_synthetic")
    config = task.make_config(
        _args("--knn-synthetic-classes", "4", "--knn-synthetic-train", "6", "--knn-synthetic-test", "3")
    )
    assert config["ks"] == [20, 200] and config["temperature"] == 0.07
    backbone = load_backbone(card)
    task.validate(backbone, config)
    ctx = TaskContext(output_dir=tmp_path / "run", cache_dir=cache)
    result = task.run(backbone, config, ctx)
    assert set(result.metrics) == {"top1_k20", "top1_k200"} and task.headline_metrics == ("top1_k20", "top1_k200")
    per_image = result.extra["per_episode"]
    assert len(per_image["top1_k20"]) == 12 and set(per_image["top1_k200"]) <= {0, 100}
    assert result.metrics["top1_k20"] == pytest.approx(np.mean(per_image["top1_k20"]))
    assert result.extra["neighbours_used"] == {"top1_k20": 20, "top1_k200": 24}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_knn_on_cuda_matches_the_cpu():
    rng = np.random.default_rng(2)
    train_x = rng.normal(size=(5000, 64)).astype(np.float32)
    train_y = rng.integers(0, 10, 5000)
    test_x = rng.normal(size=(300, 64)).astype(np.float32)
    test_y = rng.integers(0, 10, 300)
    cpu = knn_evaluation(train_x, train_y, test_x, test_y, 10, chunk=1024, query_batch=128)
    cuda = knn_evaluation(train_x, train_y, test_x, test_y, 10, device="cuda", chunk=1024, query_batch=128)
    for k in cpu:  # float32 on both; a different summation order may flip a near tie
        assert (cpu[k] != cuda[k]).sum() <= 2
