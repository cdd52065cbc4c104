"""Fine-tuning tasks (transfer/finetune.py, transfer/finetune_protocol.py): the protocol's formulas, the grid and
its choice rule, resume after a kill, --grid-point jobs and the embedded twin end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ringbench.errors import UserError
from tests.helpers import family_args, tensorboard_scalars
from transfer.finetune import SYNTHETIC, FinetuneSettings, add_finetune_arguments, make_config, read_data
from transfer.finetune_protocol import (
    CROP_RATIO,
    CROP_SCALE,
    batch_indices,
    bn_momentum,
    choose_point,
    cosine_lr,
    crop_box,
    expand_grid,
    steps_per_epoch,
)
from transfer.finetune_train import build_classifier, finetune
from transfer.tasks import TaskContext, get_task

TINY = [
    "--finetune-steps", "2", "--finetune-batch-size", "4", "--finetune-image-size", "8",
    "--finetune-synthetic-classes", "2", "--finetune-synthetic-train", "4", "--finetune-synthetic-test", "2",
    "--finetune-workers", "0",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """A tiny ResNet's steps are many times slower with two torch threads on a busy machine (measured: 0.5 s against
    3-6 s for three steps at 8 px on the shared 2-core machine); conftest restores the count after each test."""
    torch.set_num_threads(1)


def _config(*argv: str) -> dict:
    from ringbench.config import settings_from_args

    args = family_args(add_finetune_arguments, *argv)
    return make_config(SYNTHETIC, settings_from_args(args, FinetuneSettings), None)


def test_bn_momentum_is_kornblith_s_decay_in_pytorch_s_convention():
    for s in (1, 5, 50, 100, 101, 250, 1000, 20000):
        decay = max(1 - 10 / s, 0.9)  # Kornblith et al. 2019: running = decay * running + (1 - decay) * batch
        assert bn_momentum(s) == pytest.approx(1 - decay, abs=1e-15)
    assert bn_momentum(100) == pytest.approx(0.1) and bn_momentum(1000) == pytest.approx(0.01)
    assert steps_per_epoch(640, 64) == 10 and steps_per_epoch(641, 64) == 11 and steps_per_epoch(3, 64) == 1


def test_the_schedule_is_cosine_annealing_to_zero():
    base, total = 0.1, 50
    # PyTorch's CosineAnnealingLR(T_max=total, eta_min=0) as ssl-transfer steps it: lr_t = base (1 + cos(pi t / T)) / 2
    for step in range(total + 1):
        assert cosine_lr(base, step, total) == pytest.approx(base * (1 + math.cos(math.pi * step / total)) / 2)
    assert cosine_lr(base, 0, total) == base and cosine_lr(base, total // 2, total) == pytest.approx(base / 2)
    assert cosine_lr(base, total, total) == pytest.approx(0, abs=1e-18)
    assert all(cosine_lr(base, t + 1, total) < cosine_lr(base, t, total) for t in range(total))


def test_the_default_grid_is_ssl_transfer_s():
    config = _config()
    points = expand_grid(config["lrs"], config["wds"])
    assert len(points) == 20 and len({p.name for p in points}) == 20
    assert [p.name for p in points[:6]] == [
        "lr0.1_wd0", "lr0.1_wd1e-06", "lr0.1_wd1e-05", "lr0.1_wd0.0001", "lr0.1_wd0.001", "lr0.01_wd0",
    ]  # fmt: skip
    assert points[-1].name == "lr0.0001_wd0.001"
    lrs, wds = np.logspace(-4, -1, 4), np.concatenate([[0], np.logspace(-6, -3, 4)])
    expected = {(lr, wd / lr) for lr in lrs for wd in wds}  # ssl-transfer: grid = [(l, w / l) ...]
    got = {(p.lr, p.weight_decay) for p in points}
    for (lr, decay), (lr_ref, decay_ref) in zip(sorted(got), sorted(expected)):
        assert lr == pytest.approx(lr_ref, rel=1e-12) and decay == pytest.approx(decay_ref, rel=1e-12)
    assert get_task("finetune_synthetic").grid_points(config) == [p.name for p in points]
    narrowed = _config("--finetune-lrs", "0.01,0.1", "--finetune-wds", "1e-4")
    assert get_task("finetune_synthetic").grid_points(narrowed) == ["lr0.1_wd0.0001", "lr0.01_wd0.0001"]
    assert expand_grid([0.01], [1e-4])[0].weight_decay == pytest.approx(1e-2)
    for flags, message in (
        (("--finetune-lrs", "0.1,0"), "positive"),
        (("--finetune-wds", "-1"), "non-negative"),
        (("--finetune-lrs", "0.1,0.10000001"), "listed twice"),
        (("--finetune-batch-norm", "sync"), "train, frozen"),
    ):
        with pytest.raises(UserError, match=message):
            _config(*flags)


def test_loader_processes_and_checkpoint_interval_are_not_the_record_s_identity():
    """They change how a run goes, not its weights (test_loader_processes_draw_the_same_batches): ctx.options, so a
    sweep's point jobs and its task job agree on the identity whatever each machine's loader count."""
    from transfer.resolve import task_config

    plain = task_config("finetune_synthetic", {})
    assert task_config("finetune_synthetic", {"finetune_workers": 3, "finetune_checkpoint_every": 7}) == plain
    assert task_config("finetune_synthetic", {"finetune_steps": 3})[1] != plain[1]
    args = family_args(add_finetune_arguments, "--finetune-workers", "3", "--finetune-checkpoint-every", "7")
    assert get_task("finetune_dtd").make_options(args) == {"workers": 3, "checkpoint_every": 7}
    assert get_task("finetune_synthetic").make_options(family_args(add_finetune_arguments))["workers"] == 0


def test_the_choice_rule_and_its_ties():
    def table(values):
        return [{"point": f"p{i}", "lr": lr, "wd": wd, "val": v} for i, (lr, wd, v) in enumerate(values)]

    assert choose_point(table([(0.1, 0, 50.0), (0.01, 0, 60.0), (0.001, 1e-5, 55.0)]))["point"] == "p1"
    # ties: the larger learning rate, then the smaller weight decay, whatever the table's order
    tied = table([(0.001, 0, 70.0), (0.01, 1e-4, 70.0), (0.01, 1e-6, 70.0), (0.1, 0, 69.9)])
    assert choose_point(tied)["point"] == "p2"
    assert choose_point(list(reversed(tied)))["point"] == "p2"
    with pytest.raises(ValueError):
        choose_point([])


def test_data_order_and_crops_are_functions_of_the_step():
    seen = np.concatenate([batch_indices(10, 4, 0, step) for step in range(3)])  # one epoch: 4 + 4 + 2
    assert sorted(seen) == list(range(10)) and len(batch_indices(10, 4, 0, 2)) == 2
    assert np.array_equal(batch_indices(10, 4, 0, 4), batch_indices(10, 4, 0, 4))
    assert not np.array_equal(np.concatenate([batch_indices(10, 4, 0, s) for s in (3, 4, 5)]), seen)
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, w, h = crop_box(40, 30, rng)
        assert 0 <= left and left + w <= 40 and 0 <= top and top + h <= 30
        assert CROP_SCALE[0] * 1200 * 0.9 <= w * h and CROP_RATIO[0] * 0.8 <= w / h <= CROP_RATIO[1] * 1.2


def _train(backbone, config, folder: Path, options: dict | None = None, **kw):
    data = read_data(SYNTHETIC, config, "finetune_synthetic")
    ctx = TaskContext(output_dir=folder, debug=True, force=kw.pop("force", False), options=options or {})
    return finetune(backbone, len(data.classes), data.train, 0.05, 1e-3, config, folder, ctx, "t", **kw)


def _kill_at(at: int):
    def after_step(step: int) -> None:
        if step == at:
            raise KeyboardInterrupt

    return after_step


def test_a_killed_training_resumes_to_the_same_weights(tmp_path, twin_card):
    from transfer.checkpoints import load_backbone

    backbone = load_backbone(twin_card[0])
    config = _config(*TINY, "--finetune-steps", "3")
    every = {"checkpoint_every": 2}
    whole, info = _train(backbone, config, tmp_path / "whole", every)
    assert info["resumed_from_step"] == 0 and (tmp_path / "whole" / "checkpoint.pth").exists()
    # 6 training images (2 of 8 held out), batches of 4: 2 steps per epoch, momentum min(10 / 2, 0.1) = 0.1
    assert info["steps_per_epoch"] == 2 and whole.backbone.bn1.momentum == pytest.approx(0.1)
    assert not torch.equal(whole.backbone.bn1.running_mean.cpu(), backbone.state_dict["bn1.running_mean"])

    with pytest.raises(KeyboardInterrupt):
        _train(backbone, config, tmp_path / "killed", every, after_step=_kill_at(2))
    resumed, info = _train(backbone, config, tmp_path / "killed", every)
    assert info["resumed_from_step"] == 2
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    curves = [tensorboard_scalars(tmp_path / run / "tensorboard") for run in ("whole", "killed")]
    assert curves[0]["train/loss"] == curves[1]["train/loss"] and [p[0] for p in curves[0]["train/lr"]] == [3]
    start = build_classifier(backbone, 2, config["seed"]).state_dict()
    assert not torch.equal(a["head.weight"], start["head.weight"]) and torch.equal(a["head.bias"], b["head.bias"])

    (tmp_path / "killed" / "checkpoint.pth").write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(UserError, match=r"damaged fine-tuning checkpoint.*--force") as err:
        _train(backbone, config, tmp_path / "killed")
    assert "\n" not in str(err.value)
    with pytest.raises(KeyboardInterrupt):  # --force: trains again from the card (step 1 is reached)
        _train(backbone, config, tmp_path / "killed", force=True, after_step=_kill_at(1))


def test_grid_point_jobs_then_the_task_s_run_through_main(tmp_path, twin_card, capsys):
    from transfer.run import main

    card = twin_card[0]
    common = ["--backbone", str(card), "--task", "finetune_synthetic", "--results", str(tmp_path / "results"),
              "--output-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
              "--debug", *TINY, "--finetune-lrs", "0.1,0.01", "--finetune-wds", "0"]  # fmt: skip
    assert main([*common, "--grid-point", "lr0.01_wd0"]) == 0
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").rglob("*.json"))
    (point,) = (tmp_path / "runs").rglob("points/lr0.01_wd0/result.json")
    assert not (point.parent / "checkpoint.pth").exists()
    before = point.stat().st_mtime_ns
    with pytest.raises(UserError, match="not a point"):
        main([*common, "--grid-point", "lr1_wd0"])
    capsys.readouterr()

    assert main(common) == 0
    assert point.stat().st_mtime_ns == before  # reused, not trained again
    (path,) = (tmp_path / "results").rglob("*.json")
    record = json.loads(path.read_text())
    extra = record["extra"]
    assert [row["point"] for row in extra["grid"]] == ["lr0.1_wd0", "lr0.01_wd0"]
    assert extra["grid_reused"] == ["lr0.01_wd0"]
    assert extra["grid"][1]["val"] == json.loads(point.read_text())["val"]
    assert extra["chosen"] == max(extra["grid"], key=lambda r: (r["val"], r["lr"]))
    samples = extra["per_episode"]["acc"]
    assert extra["samples_over"] == "test images" and len(samples) == extra["test_images"] == 4
    assert np.mean(samples) == pytest.approx(record["metrics"]["acc"])
    assert extra["steps"] == 2 and record["config"]["lrs"] == [0.1, 0.01] and record["family"] == "finetune"
    assert "lr0.1_wd0 test top-1 accuracy" in capsys.readouterr().err
    # a forced sweep: the point jobs ran again with --force; its task job rewrites the record and keeps them
    assert main([*common, "--force", "--keep-grid-points"]) == 0
    assert point.stat().st_mtime_ns == before
    assert json.loads(path.read_text())["extra"]["grid_reused"] == ["lr0.1_wd0", "lr0.01_wd0"]
    with pytest.raises(UserError, match="--finetune-val-fraction: not used"):
        main(["--backbone", str(card), "--task", "finetune_dtd", "--finetune-val-fraction", "0.1"])


def test_voc2007_is_multi_label_and_frozen_batch_norm_keeps_the_card_s_statistics(tmp_path, twin_card):
    from PIL import Image

    from tests.test_voc07 import write_voc2007
    from transfer.checkpoints import load_backbone
    from transfer.finetune_train import _criterion, read_checkpoint
    from transfer.voc07 import DIFFICULT, NEGATIVE, POSITIVE

    ids = {s: [f"{s[:2]}{i:04d}" for i in range(20)] for s in ("train", "val", "test")}
    matrix = np.full((20, 20), NEGATIVE, dtype=np.int8)
    matrix[np.arange(20), np.arange(20)] = POSITIVE
    matrix[np.arange(20), (np.arange(20) + 1) % 20] = DIFFICULT
    write_voc2007(tmp_path / "data", ids, dict.fromkeys(ids, matrix))
    rng = np.random.default_rng(0)
    for names in ids.values():
        for i in names:
            image = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
            image.save(tmp_path / "data" / "VOCdevkit" / "VOC2007" / "JPEGImages" / f"{i}.jpg")
    task = get_task("finetune_voc2007")
    flags = [*TINY[:6], "--finetune-workers", "0", "--finetune-steps", "1", "--finetune-lrs", "0.01"]
    args = family_args(add_finetune_arguments, "--data-root", str(tmp_path / "data"), *flags,
                       "--finetune-wds", "0", "--finetune-batch-norm", "frozen")  # fmt: skip
    config = task.make_config(args)
    assert config["validation"] == "creators" and config["metric"] == "map11" and config["val_fraction"] is None
    backbone = load_backbone(twin_card[0])
    task.validate(backbone, config)
    result = task.run(backbone, config, TaskContext(output_dir=tmp_path / "run", debug=True))
    assert set(result.metrics) == {"map11"} and 0 <= result.metrics["map11"] <= 100
    assert result.metrics["map11"] == pytest.approx(np.mean([*result.extra["ap"].values()]))
    assert "per_episode" not in result.extra and result.extra["train_images"] == 20
    assert [row["point"] for row in result.extra["grid"]] == ["lr0.01_wd0"]
    weights = read_checkpoint(tmp_path / "run" / "final" / "lr0.01_wd0" / "checkpoint.pth")["model"]
    assert torch.equal(weights["backbone.bn1.running_mean"], backbone.state_dict["bn1.running_mean"])
    assert not torch.equal(weights["backbone.conv1.weight"], backbone.state_dict["conv1.weight"])
    out, labels = torch.zeros(2, 20), torch.as_tensor(matrix[:2])
    reference = torch.nn.functional.binary_cross_entropy_with_logits(out, (labels == POSITIVE).float())
    assert _criterion(True)(out, labels) == reference  # difficult (0) is a negative, as ssl-transfer's target == 1


def test_a_damaged_point_result_is_one_line_naming_force(tmp_path, twin_card):
    from transfer.checkpoints import load_backbone

    task = get_task("finetune_synthetic")
    config = _config(*TINY, "--finetune-lrs", "0.1", "--finetune-wds", "0")
    folder = tmp_path / "run" / "points" / "lr0.1_wd0"
    folder.mkdir(parents=True)
    (folder / "result.json").write_text('{"point": "lr0.1_wd0", "lr": 0.1')
    ctx = TaskContext(output_dir=tmp_path / "run", debug=True, grid_point="lr0.1_wd0")
    with pytest.raises(UserError, match=r"result\.json: damaged grid-point result.*--force") as err:
        task.run(load_backbone(twin_card[0]), config, ctx)
    assert "\n" not in str(err.value)
    ctx.grid_point = "lr0.2_wd0"
    with pytest.raises(UserError, match="not a point of finetune_synthetic's grid"):
        task.run(load_backbone(twin_card[0]), config, ctx)


@pytest.mark.slow
def test_loader_processes_draw_the_same_batches(tmp_path, twin_card):
    from transfer.checkpoints import load_backbone

    backbone = load_backbone(twin_card[0])
    weights = []
    config = _config(*TINY, "--finetune-steps", "3")
    for workers in (0, 2):
        model, _ = _train(backbone, config, tmp_path / str(workers), {"workers": workers})
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.slow
def test_a_job_killed_by_sigkill_resumes_through_main(tmp_path, twin_card):
    """transfer/run.py in a subprocess, killed (SIGKILL) once a point's checkpoint exists, started again: the same
    validation metric, refit weights and record as an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.helpers import REPO
    from transfer.finetune_train import read_checkpoint

    def argv(out: Path) -> list[str]:
        return [sys.executable, "transfer/run.py", "--backbone", str(twin_card[0]), "--task", "finetune_synthetic",
                "--results", str(out / "results"), "--output-dir", str(out / "runs"), "--cache-dir", str(out / "c"),
                "--device", "cpu", "--debug", *TINY, "--finetune-steps", "30",
                "--finetune-checkpoint-every", "1", "--finetune-lrs", "0.1", "--finetune-wds", "0"]  # fmt: skip

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(argv(tmp_path / "killed"), cwd=REPO, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "killed").rglob("points/*/checkpoint.pth")) and time.monotonic() < deadline:
        assert job.poll() is None, "the job ended before its first checkpoint"
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert not list((tmp_path / "killed").rglob("result.json"))
    for out in (tmp_path / "killed", tmp_path / "whole"):
        done = subprocess.run(argv(out), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
    (resumed,) = (tmp_path / "killed").rglob("points/*/result.json")
    (whole,) = (tmp_path / "whole").rglob("points/*/result.json")
    assert json.loads(resumed.read_text())["resumed_from_step"] > 0
    assert json.loads(resumed.read_text())["val"] == json.loads(whole.read_text())["val"]
    finals = [read_checkpoint(next(out.rglob("final/*/checkpoint.pth")))["model"] for out in (tmp_path / "killed",
              tmp_path / "whole")]  # fmt: skip
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
    records = [json.loads(next((out / "results").rglob("*.json")).read_text()) for out in (tmp_path / "killed",
               tmp_path / "whole")]  # fmt: skip
    assert records[0]["metrics"] == records[1]["metrics"]
    assert records[0]["extra"]["per_episode"] == records[1]["extra"]["per_episode"]
