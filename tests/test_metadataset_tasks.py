"""Few-shot tasks end to end: ``fewshot_digits`` with a small backbone card, a Meta-Dataset task on
records written in the official format, and the shared CLI."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from metadataset.evaluate import confidence_interval
from ringbench.cli import run_main
from ringbench.errors import UserError
from ringbench.store import load_records
from tests.helpers import write_card
from tests.test_metadataset_sources import image_bytes, write_omniglot
from transfer.checkpoints import load_backbone
from transfer.fewshot import add_fewshot_arguments
from transfer.run import main as run_transfer
from transfer.tasks import TaskContext, all_tasks, get_task


@pytest.fixture(scope="module")
def card(tmp_path_factory):
    return write_card(tmp_path_factory.mktemp("card") / "small.pth", image_size=16)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-root", default=None)
    add_fewshot_arguments(parser)
    add_fewshot_arguments(parser)  # a second call (another task of the family) adds nothing
    return parser.parse_args(list(argv))


def test_tasks_are_registered():
    tasks = all_tasks()
    names = {
        f"md_{s}"
        for s in (
            "ilsvrc",
            "omniglot",
            "aircraft",
            "cub",
            "dtd",
            "quickdraw",
            "fungi",
            "vgg_flower",
            "traffic_sign",
            "mscoco",
        )
    } | {"md_all", "fewshot_synthetic", "fewshot_digits"}
    assert names <= set(tasks)
    assert tasks["md_all"].primary_metric == "acc_avg" and not tasks["fewshot_digits"].needs_data


def test_fewshot_digits_end_to_end(card, tmp_path):
    task = get_task("fewshot_digits")
    backbone = load_backbone(card)
    config = task.make_config(_args("--episodes", "40", "--max-images-per-class", "25"))
    assert config["episode_mode"] == "fixed" and config["episode_rules"] == {"ways": 5, "shots": 5, "queries": 15}
    task.validate(backbone, config)
    ctx = TaskContext(output_dir=tmp_path / "run", cache_dir=tmp_path / "cache")
    result = task.run(backbone, config, ctx)
    accs = np.array(result.extra["episode_accuracies"]["digits"])
    assert len(accs) == 40 and ((accs >= 0) & (accs <= 1)).all()
    assert result.metrics["acc"] == pytest.approx(100 * accs.mean(), abs=1e-3)
    assert result.ci95["acc"] == pytest.approx(100 * confidence_interval(accs), abs=1e-3)
    assert result.metrics["acc"] > 35  # 5-way chance is 20: digits are easy even for a random network
    assert result.extra["feature_cache"]["digits"]["hit"] is False and result.extra["images"]["digits"] == 250
    assert result.extra["skipped_images"]["digits"] == 0
    again = task.run(backbone, config, ctx)  # same seed: same episodes, features from the cache
    assert again.extra["feature_cache"]["digits"]["hit"] is True
    assert again.extra["episode_accuracies"] == result.extra["episode_accuracies"]
    centroid = task.run(
        backbone,
        task.make_config(_args("--episodes", "40", "--max-images-per-class", "25", "--probe", "centroid")),
        ctx,
    )
    assert centroid.extra["episode_accuracies"] != result.extra["episode_accuracies"]


def test_meta_dataset_task_on_official_records(card, tmp_path):
    """md_omniglot: variable-way episodes inside one alphabet, per-episode accuracies kept."""
    write_omniglot(tmp_path / "records")
    task = get_task("md_omniglot")
    config = task.make_config(
        _args("--md-root", str(tmp_path / "records"), "--episodes", "12", "--probe", "logreg", "--weight-decay", "0.01")
    )
    assert config["episode_mode"] == "variable" and config["md_root"].endswith("records")
    backbone = load_backbone(card)
    task.validate(backbone, config)
    result = task.run(backbone, config, TaskContext(output_dir=tmp_path / "run", cache_dir=tmp_path / "cache"))
    assert len(result.extra["episode_accuracies"]["omniglot"]) == 12
    assert 5 <= result.extra["mean_ways"]["omniglot"] <= 6  # alphabets of 5 and 6 characters
    assert result.extra["images"]["omniglot"] == 44


def test_corrupt_image_is_counted_in_the_result(card, tmp_path):
    folder = tmp_path / "data" / "mscoco"
    for c in range(5):
        (folder / f"c{c}").mkdir(parents=True)
        for i in range(4):
            (folder / f"c{c}" / f"{i}.jpg").write_bytes(image_bytes(c * 4 + i, fmt="JPEG"))
    (folder / "c3" / "2.jpg").write_bytes(b"not a jpeg")
    (folder / "splits.json").write_text(json.dumps({"train": [], "valid": [], "test": [f"c{c}" for c in range(5)]}))
    task = get_task("md_mscoco")
    config = task.make_config(_args("--data-root", str(tmp_path / "data"), "--episodes", "5", "--probe", "knn"))
    with pytest.warns(UserWarning, match="corrupt image c3/2.jpg"):
        result = task.run(load_backbone(card), config, TaskContext(output_dir=tmp_path, cache_dir=tmp_path / "c"))
    assert result.extra["skipped_images"]["mscoco"] == 1 and result.extra["skipped_refs"]["mscoco"] == ["c3/2.jpg"]


def test_bad_settings_and_data_are_user_errors(card, tmp_path):
    backbone = load_backbone(card)
    with pytest.raises(UserError, match="--probe"):
        get_task("fewshot_digits").make_config(_args("--probe", "svm"))
    with pytest.raises(UserError, match="--weight-decay"):
        get_task("fewshot_digits").make_config(_args("--weight-decay", "lots"))
    task = get_task("md_dtd")
    with pytest.raises(UserError, match="--md-root"):
        task.validate(backbone, task.make_config(_args()))
    folder = tmp_path / "dtd"
    for c in range(4):
        (folder / f"t{c}").mkdir(parents=True)
        for i in range(3):
            (folder / f"t{c}" / f"{i}.png").write_bytes(image_bytes(i))
    (folder / "splits.json").write_text(json.dumps({"train": [], "valid": [], "test": [f"t{c}" for c in range(4)]}))
    config = task.make_config(_args("--md-root", str(tmp_path), "--episodes", "2"))
    with pytest.raises(UserError, match="4 classes; episodes need at least 5"):
        task.validate(backbone, config)  # before any feature extraction
    with pytest.raises(UserError, match="4 classes; episodes need at least 5"):
        task.run(backbone, config, TaskContext(output_dir=tmp_path, cache_dir=tmp_path / "c"))
    for i in (1, 2):
        (folder / "t1" / f"{i}.png").unlink()
    (folder / "t4").mkdir()
    for i in (0, 1):
        (folder / "t4" / f"{i}.png").write_bytes(image_bytes(i))
    (folder / "splits.json").write_text(json.dumps({"test": [f"t{c}" for c in range(5)]}))
    with pytest.raises(UserError, match="'t1' \\(1\\)"):  # a class with fewer than 2 images
        task.validate(backbone, config)
    config_file = tmp_path / "fs.yaml"
    config_file.write_text("episodes: 7\nprobe: centroid\nbogus: 1\n")
    with pytest.raises(UserError, match=r"fs\.yaml: unknown config key 'bogus'"):
        get_task("fewshot_digits").make_config(_args("--fewshot-config", str(config_file)))
    config_file.write_text("episodes: many\n")
    with pytest.raises(UserError, match=r"fs\.yaml: 'episodes' must be an int, got 'many'"):
        get_task("fewshot_digits").make_config(_args("--fewshot-config", str(config_file)))


def test_yaml_config_and_flags(tmp_path):
    config_file = tmp_path / "fs.yaml"
    config_file.write_text("episodes: 7\nprobe: centroid\n")
    config = get_task("fewshot_digits").make_config(_args("--fewshot-config", str(config_file), "--episodes", "9"))
    assert config["episodes"] == 9 and config["probe"] == {"probe": "centroid"}  # flags override the file
    fixed = get_task("md_aircraft").make_config(_args("--ways", "10", "--shots", "1"))
    assert fixed["episode_mode"] == "fixed" and fixed["episode_rules"] == {"ways": 10, "shots": 1, "queries": 15}


def test_cli_runs_fewshot_digits_and_appends_a_record(card, tmp_path, capsys):
    code = run_main(
        run_transfer,
        [
            "--backbone",
            str(card),
            "--task",
            "fewshot_digits",
            "--episodes",
            "6",
            "--max-images-per-class",
            "20",
            "--probe",
            "centroid",
            "--results",
            str(tmp_path / "results"),
            "--output-dir",
            str(tmp_path / "runs"),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
    )
    assert code == 0, capsys.readouterr().err
    (record,) = load_records(tmp_path / "results")
    assert record["task"] == "fewshot_digits" and record["family"] == "fewshot"
    assert set(record["metrics"]) == {"acc"} and record["ci95"]["acc"] > 0
    assert record["headline"] == ["acc"]  # the task's headline metrics travel with the record
    assert len(record["extra"]["episode_accuracies"]["digits"]) == 6
    capsys.readouterr()
    code = run_main(
        run_transfer,
        [
            "--backbone",
            str(card),
            "--task",
            "md_aircraft",
            "--md-root",
            str(tmp_path / "nowhere"),
            "--results",
            str(tmp_path / "results"),
        ],
    )
    err = capsys.readouterr().err
    assert code == 2 and "no folder" in err and "Traceback" not in err
