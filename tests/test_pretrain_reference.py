"""The reference rows' cards: random initialisation (no training, seeded) and supervised
cross-entropy (learns the labels; STL-10 through its labelled split only), made by the ordinary
pretraining entry point and read by the transfer stage like any card."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import pretrain.train as trainer
from pretrain.config import load_config
from pretrain.data.transforms import eval_transform
from ringbench.backbones import create_backbone
from ringbench.card import load_card
from ringbench.cli import run_main
from ringbench.errors import UserError
from tests.test_pretrain_methods import one_thread  # noqa: F401  (autouse fixture)

TINY_DATA = [
    "data.workers=0",
    "data.synthetic_classes=4",
    "data.synthetic_image_size=16",
    "knn.enabled=false",
]


def test_random_card_is_the_seeded_initial_backbone_and_trains_nothing(tmp_path: Path):
    from pretrain.run import main

    out = tmp_path / "random_s3.pth"
    argv = [
        "--config",
        "random",
        "--profile",
        "demo",
        "--seed",
        "3",
        "--out",
        str(out),
        "--workdir",
        str(tmp_path / "w"),
    ]
    assert run_main(main, [*argv, *TINY_DATA, "--no-progress"]) == 0
    card = load_card(out)
    assert card.meta["method"] == "random" and card.meta["loss"] == "none" and card.meta["epochs"] == 0
    assert card.meta["seed"] == 3 and card.meta["loss_params"] == {} and card.stem == "cifar"
    torch.manual_seed(3)  # what the trainer does before it builds the method
    expected = create_backbone("resnet18", "cifar").state_dict()
    assert set(card.state_dict) == set(expected)
    assert all(torch.equal(card.state_dict[k], expected[k]) for k in expected)
    assert not (tmp_path / "w" / trainer.CHECKPOINT_NAME).exists()  # no epoch ran
    other = trainer.train(load_config("random", [*TINY_DATA, "train.seed=4"]), tmp_path / "s4.pth", tmp_path / "w4")
    assert not torch.equal(load_card(other.card_path).state_dict["conv1.weight"], card.state_dict["conv1.weight"])


def test_reference_methods_take_only_their_loss():
    with pytest.raises(UserError, match="does not apply to method 'supervised'"):
        load_config("supervised", ["loss.name=nce"])
    with pytest.raises(UserError, match="does not apply to method 'moco'"):
        load_config("moco", ["loss.name=ce"])
    with pytest.raises(UserError, match="does not apply to method 'random'"):
        load_config("random", ["loss.name=ring"])


def _train_accuracy(method, dataset, spec, image_size: int) -> float:
    plain = eval_transform(image_size, spec.mean, spec.std, native_size=spec.image_size)
    images = torch.stack([plain(dataset[i][0]) for i in range(len(dataset))])
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    method.eval()
    with torch.no_grad():
        logits = method.classifier(method.backbone(images))
    return float((logits.argmax(1) == labels).float().mean()) * 100


@pytest.mark.slow
def test_supervised_learns_the_synthetic_labels(tmp_path: Path):
    """Cross-entropy on 4 classes x 16 images: after 30 short epochs (about a minute on 2 cores) the classifier is
    right on far more training images than chance (25%: more correct than chance's 99.99th percentile, 30 of 64)."""
    cfg = load_config(
        "supervised",
        [
            *TINY_DATA,
            "data.synthetic_images_per_class=16",
            "train.batch_size=16",
            "train.epochs=30",
            "optim.schedule=cosine",
            "optim.lr=0.02",  # the He et al. 0.1 is for batch 256; batch 16 trains best lower
            "train.log_every=1",
        ],
    )
    result = trainer.train(cfg, tmp_path / "sup.pth", tmp_path / "w", progress=False)
    data = trainer.prepare_data(cfg, 1, labelled=True)
    base = data.train.base
    assert result.method.labels.tolist() == list(base.targets)
    accuracy = _train_accuracy(result.method, base, data.spec, 16)
    from scipy.stats import binom

    assert accuracy / 100 * 64 > binom.ppf(0.9999, 64, 0.25), accuracy
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < 0.6 * losses[0]
    card = load_card(result.card_path)
    assert card.meta["method"] == "supervised" and card.meta["loss"] == "ce" and card.meta["epochs"] == 30
    assert set(card.state_dict) == set(result.method.backbone.state_dict())  # the classifier is not in it
    from transfer.checkpoints import load_backbone

    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():  # transfer rebuilds the backbone the method trained
        assert torch.allclose(load_backbone(result.card_path).build_model()(x), result.method.backbone(x), atol=1e-5)


def _write_stl10(root: Path, train_labels: list[int], unlabeled: int) -> None:
    """Tiny STL-10 binary files: (C, W, H) column-major uint8 images, labels 1-10."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", len(train_labels)), ("test", 2), ("unlabeled", unlabeled)):
        hwc = rng.integers(0, 256, size=(n, 96, 96, 3), dtype=np.uint8)
        hwc.transpose(0, 3, 2, 1).tofile(folder / f"{split}_X.bin")
    np.array(train_labels, dtype=np.uint8).tofile(folder / "train_y.bin")
    np.array([1, 2], dtype=np.uint8).tofile(folder / "test_y.bin")


def test_supervised_stl10_trains_on_the_labelled_split_only(tmp_path: Path):
    _write_stl10(tmp_path, [3, 10, 1, 7], unlabeled=6)
    cfg = load_config(
        "supervised",
        [
            "data.name=stl10",
            f"data.root={tmp_path}",
            "data.image_size=16",
            "data.workers=0",
            "train.epochs=1",
            "train.batch_size=4",
            "knn.k=2",
        ],
    )
    result = trainer.train(cfg, tmp_path / "sup.pth", tmp_path / "w", progress=False)
    assert result.method.labels.tolist() == [2, 9, 0, 6]  # train_y - 1; the 6 unlabeled images are not there
    assert result.method.classifier.out_features == 10
    card = load_card(result.card_path)
    assert card.meta["dataset"] == "stl10" and card.meta["image_size"] == 16
    contrastive = trainer.prepare_data(load_config("moco", [f"data.root={tmp_path}", "data.name=stl10"]), 2)
    assert len(contrastive.train) == 10  # the contrastive methods do use the unlabeled images


@pytest.mark.heavy
def test_supervised_resumes_with_its_classifier(tmp_path: Path):
    """A rerun in the same work folder loads the checkpoint, classifier and label table included."""
    cfg = load_config(
        "supervised", [*TINY_DATA, "data.synthetic_images_per_class=4", "train.batch_size=8", "train.epochs=1"]
    )
    first = trainer.train(cfg, None, tmp_path / "w", progress=False)
    again = trainer.train(cfg, None, tmp_path / "w", progress=False)
    assert again.history == first.history
    assert torch.equal(again.method.classifier.weight, first.method.classifier.weight)
