"""BSCD-FSL's linear probe (``metadataset.sgd_probe``), batched over episodes, against the benchmark's own loop
run episode by episode: ``nn.Linear`` + ``torch.optim.SGD`` over the same initial weights and permutations."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from metadataset.features import cache_key, preprocess
from metadataset.probes import PROBES, make_probe, probe_from_config
from metadataset.sgd_probe import SGDLinearProbe, episode_randomness
from ringbench.errors import UserError


def reference_loop(support_x, support_y, query_x, probe: SGDLinearProbe, dtype=torch.float64):
    """``finetune.py``'s frozen-backbone loop (minibatches of ``batch_size`` over a fresh permutation per epoch)."""
    ways = int(support_y.max()) + 1
    draw = episode_randomness(support_x, support_y, ways, probe.epochs, probe.seed)
    layer = torch.nn.Linear(support_x.shape[1], ways).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(draw.weight))
        layer.bias.copy_(torch.from_numpy(draw.bias))
    opt = torch.optim.SGD(
        layer.parameters(),
        lr=probe.lr,
        momentum=probe.momentum,
        dampening=probe.dampening,
        weight_decay=probe.weight_decay,
    )
    x, y = torch.from_numpy(support_x).to(dtype), torch.from_numpy(support_y)
    for epoch in range(probe.epochs):
        perm = torch.from_numpy(draw.permutations[epoch])
        for start in range(0, len(y), probe.batch_size):
            batch = perm[start : start + probe.batch_size]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(layer(x[batch]), y[batch]).backward()
            opt.step()
    with torch.no_grad():
        pred = layer(torch.from_numpy(query_x).to(dtype)).argmax(1).numpy()
    return pred, layer.weight.detach().numpy(), layer.bias.detach().numpy()


def _episodes(rng, shapes, dim=12):
    """Episodes ``(ways, shots)``: class means apart, so that the classifier learns something."""
    tasks = []
    for ways, shots in shapes:
        means = rng.normal(scale=2.0, size=(ways, dim))
        sy = np.repeat(np.arange(ways), shots)
        sx = (means[sy] + rng.normal(size=(len(sy), dim))).astype(np.float32)
        qy = np.repeat(np.arange(ways), 4)
        qx = (means[qy] + rng.normal(size=(len(qy), dim))).astype(np.float32)
        tasks.append((sx, sy, qx))
    return tasks


def _trained(probe, tasks):
    ways = [int(t[1].max()) + 1 for t in tasks]
    draws = [episode_randomness(sx, sy, k, probe.epochs, probe.seed) for (sx, sy, _), k in zip(tasks, ways)]
    weight, bias = probe.train([t[0] for t in tasks], [t[1] for t in tasks], draws, max(ways), ways)
    return ways, weight.numpy(), bias.numpy()


def test_batched_episodes_equal_the_per_episode_loop():
    """Different support sizes and ways in one batch (padding, episodes whose epoch ends early)."""
    probe = SGDLinearProbe(epochs=6, dtype="float64")
    tasks = _episodes(np.random.default_rng(0), [(5, 5), (3, 2), (5, 3), (4, 1)])
    ways, weight, bias = _trained(probe, tasks)
    preds = probe.fit_predict_many(tasks)
    for i, (sx, sy, qx) in enumerate(tasks):
        ref_pred, ref_w, ref_b = reference_loop(sx, sy, qx, probe)
        np.testing.assert_allclose(weight[i, : ways[i]], ref_w, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(bias[i, : ways[i]], ref_b, rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(preds[i], ref_pred)
        assert (preds[i] == np.repeat(np.arange(ways[i]), 4)).mean() > 0.5  # it learnt (chance <= 1/3)


def test_float32_default_and_momentum_free_sgd_match_the_loop():
    tasks = _episodes(np.random.default_rng(1), [(5, 4), (5, 4)])
    for probe, dtype, tol in (
        (SGDLinearProbe(epochs=4), torch.float32, 1e-5),
        (SGDLinearProbe(epochs=3, momentum=0), torch.float64, 1e-6),
    ):
        _, weight, _ = _trained(probe, tasks)
        preds = probe.fit_predict_many(tasks)
        for i, (sx, sy, qx) in enumerate(tasks):
            ref_pred, ref_w, _ = reference_loop(sx, sy, qx, probe, dtype)
            np.testing.assert_allclose(weight[i], ref_w, atol=tol)
            np.testing.assert_array_equal(preds[i], ref_pred)


def test_an_episode_draws_its_own_randomness_whatever_the_batch():
    tasks = _episodes(np.random.default_rng(2), [(5, 2), (5, 2), (3, 3)])
    probe = SGDLinearProbe(epochs=3)
    together = probe.fit_predict_many(tasks)
    alone = [probe.fit_predict(*t) for t in tasks]
    for a, b in zip(together, alone):
        np.testing.assert_array_equal(a, b)
    one, two = (episode_randomness(t[0], t[1], 5, 3, 0) for t in tasks[:2])
    assert not np.array_equal(one.weight, two.weight) and not np.array_equal(one.permutations, two.permutations)
    assert sorted(one.permutations[0]) == list(range(10))  # a permutation of the support set per epoch
    bound = 1 / np.sqrt(12)  # nn.Linear's default law
    assert np.abs(one.weight).max() <= bound and np.abs(one.bias).max() <= bound


def test_every_card_draws_the_same_randomness_on_the_same_episode():
    """Through ``evaluate_source`` an episode's draws come from its identity (the episodes' seed and its index), not
    from its features: two cards start each episode from the same weights and see the same minibatches, so their
    accuracies pair on those too; another episode draws others."""
    from metadataset.evaluate import episode_seed, evaluate_source
    from metadataset.sampling import FixedEpisodes

    seen: list[list] = []

    class Recording(SGDLinearProbe):
        def fit_predict_many(self, tasks, keys=None):
            seen.append([episode_randomness(t[0], t[1], 5, self.epochs, self.seed, k) for t, k in zip(tasks, keys)])
            return super().fit_predict_many(tasks, keys)

    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(6), 8)
    for dim in (12, 12):  # two cards: other features of the same width
        evaluate_source("s", rng.normal(size=(48, dim)), labels, list("abcdef"), Recording(epochs=2),
                        FixedEpisodes(5, 2, 2), episodes=3)  # fmt: skip
    first, second = seen
    for a, b in zip(first, second):
        assert np.array_equal(a.weight, b.weight) and np.array_equal(a.permutations, b.permutations)
    assert not np.array_equal(first[0].weight, first[1].weight)
    key = (*episode_seed(0, "s"), 1)
    assert np.array_equal(first[1].weight, episode_randomness(np.zeros((10, 12)), np.zeros(10), 5, 2, 0, key).weight)
    with pytest.raises(ValueError, match="2 episode keys for 1 episodes"):
        SGDLinearProbe().fit_predict_many(_episodes(rng, [(5, 2)]), keys=[(0,), (1,)])


def test_labels_are_mapped_back_and_the_probe_is_registered():
    (sx, sy, qx), *_ = _episodes(np.random.default_rng(3), [(3, 3)])
    pred = SGDLinearProbe(epochs=2).fit_predict(sx, sy * 7 + 2, qx)
    assert set(pred) <= {2, 9, 16}
    probe = make_probe("sgd_linear")
    assert "sgd_linear" in PROBES and probe.config() == {
        "probe": "sgd_linear",
        "epochs": 100,
        "lr": 0.01,
        "momentum": 0.9,
        "dampening": 0.9,
        "weight_decay": 1e-3,
        "batch_size": 4,
        "seed": 0,
    }
    assert probe_from_config(probe.config()) == probe
    with pytest.raises(UserError, match="epochs"):
        SGDLinearProbe(epochs=0)


def test_scale_then_crop_resize_is_the_benchmarks_test_transform():
    """``scale-1.15-crop`` = ``Compose([Resize([int(1.15 S)] * 2), CenterCrop(S), ToTensor(), Normalize])``."""
    from PIL import Image
    from torchvision import transforms

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(30, 41, 3), dtype=np.uint8))
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    reference = transforms.Compose(
        [transforms.Resize([27, 27]), transforms.CenterCrop(24), transforms.ToTensor(), transforms.Normalize(mean, std)]
    )
    out = preprocess(image, 24, torch.tensor(mean), torch.tensor(std), resize="scale-1.15-crop")
    np.testing.assert_allclose(out.numpy(), reference(image).numpy(), atol=1e-5)

    card = SimpleNamespace(sha256="0" * 64, mean=mean, std=std)
    image_set = SimpleNamespace(name="s", split="all", fingerprint="f")
    assert cache_key(card, image_set, 24, "avg", resize="scale-1.15-crop")["resize"] == "scale-1.15-crop"  # type: ignore[arg-type]
    assert "resize" not in cache_key(card, image_set, 24, "avg")  # type: ignore[arg-type]
