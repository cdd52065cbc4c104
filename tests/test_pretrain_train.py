"""The trainer: card contents, resume after an interruption, NaN handling (several processes:
tests/test_pretrain_distributed.py), and ring-MoCo learning something (kNN above a randomly initialised ResNet-18)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import pretrain.train as trainer
from pretrain.config import load_config
from pretrain.methods import build_method
from ringbench.card import load_card, load_checkpoint_file
from ringbench.errors import UserError
from tests.helpers import tensorboard_scalars
from tests.test_pretrain_methods import one_thread  # noqa: F401  (autouse fixture)

TINY_RUN = [
    "method=moco",
    "data.workers=0",
    "data.synthetic_classes=4",
    "data.synthetic_images_per_class=4",
    "data.synthetic_image_size=16",
    "train.batch_size=8",
    "train.epochs=2",
    "train.log_every=1",
    "moco.queue_size=16",
    "moco.shuffle_groups=2",
    "loss.w_outer=0.5",
    "loss.w_inner=0.25",
    "knn.max_train=16",
    "knn.max_test=8",
    "knn.k=5",
]


def tiny_cfg(*overrides: str) -> dict:
    return load_config(None, [*TINY_RUN, *overrides])


def test_card_meta_and_log(tmp_path: Path):
    cfg = tiny_cfg("train.epochs=1")
    result = trainer.train(cfg, tmp_path / "card.pth", tmp_path / "work", progress=False)
    card = load_card(result.card_path)
    assert card.arch == "resnet18" and card.stem == "cifar"
    meta = card.meta
    assert meta["method"] == "moco" and meta["loss"] == "ring" and meta["dataset"] == "synthetic"
    assert meta["loss_params"]["w_outer"] == 0.5 and meta["loss_params"]["schedule"] == "constant"
    assert meta["epochs"] == 1 and meta["image_size"] == 16 and meta["seed"] == 0 and meta["config"] == cfg
    assert len(meta["mean"]) == 3 and "knn_top1" in meta
    assert set(card.state_dict) == set(result.method.encoder.backbone.state_dict())
    assert torch.equal(card.state_dict["conv1.weight"], result.method.encoder.backbone.conv1.weight.detach())
    lines = [json.loads(line) for line in (tmp_path / "work" / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "step" in line] == [1, 2]
    assert "knn_top1" in lines[-1] and lines[-1]["images_per_s"] > 0
    from transfer.checkpoints import load_backbone

    backbone = load_backbone(result.card_path)  # the transfer stage reads it strictly
    assert backbone.stem == "cifar" and backbone.build_model()(torch.zeros(1, 3, 16, 16)).shape == (1, 512)
    scalars = tensorboard_scalars(tmp_path / "work")  # TensorBoard events beside the log, the same numbers
    assert [step for step, _ in scalars["train/loss"]] == [1, 2]  # one point per logged step
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([line["loss"] for line in lines if "step" in line])
    assert scalars["ring/kept_share"][0][1] == pytest.approx(0.5 * (1 - 0.25))  # w_outer (1 - w_inner)
    assert {"train/lr", "train/images_per_s", "epoch/loss", "epoch/knn_top1"} <= set(scalars)


def test_resume_after_interruption_matches_uninterrupted(tmp_path: Path, monkeypatch):
    cfg = tiny_cfg("method=ir", "loss.num_samples=4")
    straight = trainer.train(cfg, None, tmp_path / "a", progress=False).method.state_dict()

    real_save = trainer.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        raise KeyboardInterrupt  # killed right after the first epoch's checkpoint

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(cfg, None, tmp_path / "b", progress=False)
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    assert load_checkpoint_file(tmp_path / "b" / "checkpoint.pth")["epoch"] == 1
    resumed = trainer.train(cfg, None, tmp_path / "b", progress=False)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    for key, value in straight.items():
        assert torch.equal(value, resumed.method.state_dict()[key]), key
    with pytest.raises(UserError, match="different config"):
        trainer.train(tiny_cfg("method=ir", "loss.num_samples=5"), None, tmp_path / "b", progress=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path, monkeypatch):
    from pretrain.methods.moco import MoCo

    real_step = MoCo.training_step

    def step(self, views, index):
        loss, logs = real_step(self, views, index)
        return (loss * float("nan"), logs) if self.epoch == 1 else (loss, logs)

    monkeypatch.setattr(MoCo, "training_step", step)
    with pytest.raises(trainer.TrainingDiverged, match=r"loss became nan at epoch 2, step 1.*after epoch 1"):
        trainer.train(tiny_cfg(), tmp_path / "card.pth", tmp_path / "w", progress=False, tensorboard=False)
    assert load_checkpoint_file(tmp_path / "w" / "checkpoint.pth")["epoch"] == 1
    assert not (tmp_path / "card.pth").exists()
    assert not list((tmp_path / "w").glob("events.out.tfevents.*"))  # --no-tensorboard: no event files


def test_empty_ring_is_refused_before_training(tmp_path: Path):
    with pytest.raises(UserError, match="ring is empty: 8 negatives"):
        trainer.train(tiny_cfg("loss.w_outer=0.1"), tmp_path / "c.pth", tmp_path / "w", progress=False)
    assert not (tmp_path / "w" / "checkpoint.pth").exists()


def _knn_gain(cfg: dict, tmp_path: Path) -> tuple[float, float]:
    """(kNN top-1 after training, best of 3 randomly initialised models)."""
    from pretrain.methods import method_classes

    data = trainer.prepare_data(cfg, method_classes()[cfg["method"]].views)
    random_acc = []
    for seed in range(3):
        torch.manual_seed(seed)
        untrained = build_method(cfg, len(data.train), data.stem, data.spec.mean, data.spec.std)
        random_acc.append(trainer.evaluate_knn(untrained, data, cfg, torch.device("cpu")))
    trained = trainer.train(cfg, None, tmp_path, progress=False).history[-1]["knn_top1"]
    return trained, max(random_acc)


@pytest.mark.slow
def test_ring_moco_beats_random_resnet18(tmp_path: Path):
    """A few epochs of ring-MoCo (ResNet-18, 32-px synthetic shapes, 64 classes) lift the kNN monitor
    above the best of three randomly initialised ResNet-18s. The ImageNet stem (stride 4 before the
    first stage) keeps this to a minute or two on 2 CPU cores."""
    cfg = load_config(
        Path(__file__).resolve().parents[1] / "configs/pretrain/moco_ring.yaml",
        [
            "stem=imagenet",
            "data.synthetic_images_per_class=20",
            "train.epochs=8",
            "optim.lr=0.06",
            "knn.every=1000",
            "knn.max_test=320",
        ],
        profile="demo",
    )
    trained, random_best = _knn_gain(cfg, tmp_path)
    assert trained > random_best + 3, (trained, random_best)


def test_the_loop_calls_its_hooks_in_order(tmp_path: Path, monkeypatch):
    """The loop is epochs of steps with hooks around them: a hook added after the defaults sees each
    point once, the epoch's checkpoint already written when its ``after_epoch`` runs."""
    from pretrain.loop import HookBase

    calls: list[str] = []

    class Recorder(HookBase):
        def before_train(self):
            calls.append("before_train")

        def before_epoch(self):
            calls.append(f"before_epoch {self.trainer.epoch}")

        def after_step(self):
            calls.append(f"step {self.trainer.step}")

        def after_epoch(self):
            saved = load_checkpoint_file(tmp_path / "w" / "checkpoint.pth")["epoch"]
            calls.append(f"after_epoch {self.trainer.epoch}, checkpoint of epoch {saved}")

        def after_train(self):
            calls.append("after_train")

    default_hooks = trainer.default_hooks
    monkeypatch.setattr(trainer, "default_hooks", lambda *args: [*default_hooks(*args), Recorder()])
    trainer.train(tiny_cfg("knn.enabled=false"), None, tmp_path / "w", progress=False)
    epoch = lambda e: [f"before_epoch {e}", "step 0", "step 1", f"after_epoch {e}, checkpoint of epoch {e + 1}"]  # noqa: E731
    assert calls == ["before_train", *epoch(0), *epoch(1), "after_train"]
