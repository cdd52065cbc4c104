"""Detectron2 tasks: schedule rule, metrics, validation errors, and short syn_* runs from a ResNet-18 card."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from ringbench.cli import run_main
from ringbench.errors import UserError
from ringbench.store import load_records
from tests.helpers import write_card
from transfer.d2 import tasks as d2tasks
from transfer.d2 import train
from transfer.run import main as run_transfer
from transfer.tasks import TaskContext, get_task

TINY = ["--iters", "3", "--ims-per-batch", "2", "--syn-train-images", "4", "--syn-val-images", "2"]


def _args(*argv: str):
    from transfer.run import build_parser

    return build_parser().parse_args(["--backbone", "x.pth", "--task", "syn_det", *argv])


def test_linear_scaling_rule():
    ref = {"ims_per_batch": 16, "base_lr": 0.02, "max_iter": 90000, "steps": [60000, 80000], "warmup_iters": 1000}
    assert train.scale_schedule(ref) == {**ref, "steps": [60000, 80000]}
    half = train.scale_schedule(ref, ims_per_batch=8)
    assert half == {
        "ims_per_batch": 8,
        "base_lr": 0.01,
        "max_iter": 180000,
        "steps": [120000, 160000],
        "warmup_iters": 2000,
    }
    short = train.scale_schedule(ref, ims_per_batch=32, iters=100, lr=0.5)
    assert short["max_iter"] == 100 and short["base_lr"] == 0.5 and short["ims_per_batch"] == 32
    assert short["steps"] == [67, 89] and short["warmup_iters"] == round(500 * 100 / 45000)


def test_make_config_reads_the_task_yaml_and_flags():
    config = get_task("syn_kp").make_config(_args("--ims-per-batch", "8", "--seeds", "2", "--syn-val-images", "5"))
    ref = train.solver_reference("syn_kp.yaml")
    assert config["config_file"] == "syn_kp.yaml" and len(config["config_sha256"]) == 64
    assert config["base_lr"] == pytest.approx(ref["base_lr"] * 8 / ref["ims_per_batch"])
    assert config["max_iter"] == round(ref["max_iter"] * ref["ims_per_batch"] / 8)
    assert config["seeds"] == 2 and config["synthetic"]["num_val"] == 5
    coco = get_task("coco_det").make_config(_args("--data-root", "/data/d2"))
    assert coco["data_root"] == "/data/d2" and coco["max_iter"] == 90000 and "synthetic" not in coco


def test_flatten_results_handles_empty_and_undefined():
    nan = float("nan")
    metrics, extra = train.flatten_results(
        {
            "bbox": {"AP": 40.0, "AP50": 60.0, "AP75": 41.0, "APs": 30.0, "APm": 45.0, "APl": nan, "AP-circle": 50.0},
            "segm": {"AP": nan, "AP50": nan, "AP75": nan, "APs": nan, "APm": nan, "APl": nan},
        }
    )
    assert metrics == {
        "bbox/AP": 40.0,
        "bbox/AP50": 60.0,
        "bbox/AP75": 41.0,
        "bbox/APs": 30.0,
        "bbox/APm": 45.0,
        "segm/AP": 0.0,
        "segm/AP50": 0.0,
        "segm/AP75": 0.0,
    }
    assert extra["per_category"] == {"bbox/AP-circle": 50.0}
    assert extra["no_predictions"] == ["segm"] and "bbox/APl" in extra["undefined"]


def test_aggregate_over_seeds():
    from scipy import stats

    runs = [{"metrics": {"bbox/AP": v}} for v in (10.0, 14.0, 15.0)]
    result = d2tasks.aggregate(runs, [0, 1, 2], {})
    values = np.array([10.0, 14.0, 15.0])
    assert result.metrics["bbox/AP"] == pytest.approx(values.mean())
    assert result.extra["std"]["bbox/AP"] == pytest.approx(values.std(ddof=1))
    half = stats.t.ppf(0.975, 2) * values.std(ddof=1) / math.sqrt(3)
    assert result.ci95["bbox/AP"] == pytest.approx(half)
    assert d2tasks.aggregate(runs[:1], [0], {}).ci95 == {}


@pytest.fixture(scope="module")
def card(tmp_path_factory) -> Path:
    return write_card(tmp_path_factory.mktemp("card") / "r18.pth", arch="resnet18", stem="cifar")


def _backbone(path: Path):
    from transfer.checkpoints import load_backbone

    return load_backbone(path)


def test_validation_errors(card, tmp_path):
    from dataclasses import replace

    pytest.importorskip("detectron2")
    backbone = _backbone(card)
    task = get_task("syn_det")
    config = task.make_config(_args(*TINY))
    with pytest.raises(UserError, match="--seeds must be at least 1"):
        task.validate(backbone, {**config, "seeds": 0})
    two_stream = replace(backbone, meta={**backbone.meta, "streams": ["l", "ab"]})
    with pytest.raises(UserError, match=r"two-stream card \(l\+ab\).*resnet18, resnet34, resnet50"):
        task.validate(two_stream, config)
    with pytest.raises(UserError, match=r"'vit_tiny_patch16_224' has no Detectron2 backbone.*resnet18"):
        task.validate(replace(backbone, arch="vit_tiny_patch16_224"), config)
    with pytest.raises(UserError, match=r"C4 layout.*resnet50"):
        get_task("voc_det").validate(backbone, get_task("voc_det").make_config(_args("--data-root", str(tmp_path))))
    with pytest.raises(UserError, match=r"needs a dataset root.*DETECTRON2_DATASETS"):
        get_task("coco_det").validate(backbone, {**get_task("coco_det").make_config(_args()), "data_root": None})
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    with pytest.raises(UserError, match=r"instances_train2017\.json, which does not exist; download COCO 2017"):
        get_task("coco_instseg").validate(
            backbone, get_task("coco_instseg").make_config(_args("--data-root", str(tmp_path)))
        )
    broken = replace(
        backbone, state_dict={k: v for k, v in backbone.state_dict.items() if not k.startswith("layer4.1")}
    )
    with pytest.raises(UserError, match=r"not filled.*res5\.1"):
        task.validate(broken, config)


@pytest.mark.parametrize(
    "name,expected",
    [
        ("syn_det", {"bbox/AP", "bbox/AP50", "bbox/AP75"}),
        ("syn_instseg", {"bbox/AP", "segm/AP"}),
        ("syn_kp", {"bbox/AP", "keypoints/AP"}),
    ],
)
def test_syn_task_trains_and_evaluates(card, tmp_path, name, expected):
    pytest.importorskip("detectron2")
    task = get_task(name)
    backbone = _backbone(card)
    config = task.make_config(_args(*TINY))
    task.validate(backbone, config)
    ctx = TaskContext(output_dir=tmp_path / "out", device="cpu", cache_dir=tmp_path / "cache")
    result = task.run(backbone, config, ctx)
    assert expected <= set(result.metrics)
    assert all(math.isfinite(v) and 0.0 <= v <= 100.0 for v in result.metrics.values())
    assert result.seeds == [0] and result.engine_versions["detectron2"]
    seed_dir = ctx.output_dir / "seed0"
    assert (seed_dir / "model_final.pth").is_file() and (seed_dir / "config.yaml").is_file()
    lines = [json.loads(line) for line in (seed_dir / "metrics.json").read_text().splitlines()]
    assert lines[-1]["iteration"] == 2 and math.isfinite(lines[-1]["total_loss"])
    assert result.extra["timings"][0]["iters_per_s"] > 0
    from tests.helpers import tensorboard_scalars

    scalars = tensorboard_scalars(seed_dir)  # Detectron2's TensorboardXWriter, beside metrics.json
    assert scalars["total_loss"][-1] == (2, pytest.approx(lines[-1]["total_loss"], rel=1e-5))


def test_run_cli_appends_a_record(card, tmp_path, capsys):
    pytest.importorskip("detectron2")
    common = [
        "--backbone",
        str(card),
        "--task",
        "syn_det",
        "--results",
        str(tmp_path / "res"),
        "--output-dir",
        str(tmp_path / "runs"),
        "--cache-dir",
        str(tmp_path / "cache"),
        *TINY,
    ]
    code = run_main(run_transfer, common)
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    assert "bbox/AP" in out.out and "it/s" in out.err
    records = load_records(tmp_path / "res")
    assert len(records) == 1 and records[0]["task"] == "syn_det"
    assert all(math.isfinite(v) for v in records[0]["metrics"].values())
    code = run_main(run_transfer, [*common, "--eval-only"])  # the final weights of the run above, not trained again
    evaluated = capsys.readouterr()
    assert code == 0, evaluated.err[-2000:]
    assert "trained" not in evaluated.err
    records = load_records(tmp_path / "res")
    trained, evaluated_only = sorted(records, key=lambda r: r["config"]["eval_only"])  # two identities
    assert not trained["config"]["eval_only"] and evaluated_only["config"]["eval_only"] is True
    assert evaluated_only["metrics"] == pytest.approx(trained["metrics"])
    code = run_main(run_transfer, [*common, "--seeds", "0"])  # a new config: validated before anything runs
    err = capsys.readouterr().err
    assert code == 2 and "--seeds must be at least 1" in err and "Traceback" not in err


def test_frozen_backbone_keeps_the_cards_weights_and_statistics(card, tmp_path):
    """``--freeze-at 5`` (frozen-feature detection): the whole ResNet, CIFAR stem included, ends training
    with the card's weights and BN statistics while the FPN and heads learn; 0 is not in the config."""
    pytest.importorskip("detectron2")
    import torch

    from transfer.d2 import convert

    task = get_task("syn_det")
    assert "freeze_at" not in task.make_config(_args(*TINY))  # records made before the flag keep their identity
    config = task.make_config(_args(*TINY, "--freeze-at", "5"))
    assert config["freeze_at"] == 5
    backbone = _backbone(card)
    with pytest.raises(UserError, match="--freeze-at must be 0-5"):
        task.validate(backbone, {**config, "freeze_at": 6})
    ctx = TaskContext(output_dir=tmp_path / "out", device="cpu", cache_dir=tmp_path / "cache")
    task.run(backbone, config, ctx)
    final = torch.load(ctx.output_dir / "seed0" / "model_final.pth", weights_only=True)["model"]
    initial = convert.torchvision_to_detectron2(backbone.state_dict)
    resnet = {k: v for k, v in initial.items() if not k.endswith("num_batches_tracked")}
    assert all(torch.equal(final[f"backbone.bottom_up.{k}"], v) for k, v in resnet.items())
    heads = [k for k in final if k.startswith("backbone.fpn_lateral") and k.endswith("weight")]
    assert heads  # the FPN is trained (its weights are not the card's: it has none)
