"""The project as an installed package: configs ship as package data and are found by name.

The slow test builds the wheel, installs it (without dependencies, which this environment has)
into a folder of its own and runs the console scripts from another folder, with that folder first
on the path, so that nothing of the checkout is used.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ringbench.config import config_root, find_config
from ringbench.errors import UserError
from tests.helpers import REPO


def test_shipped_configs_are_found_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: names resolve to the shipped ones
    assert find_config("moco_ring", "pretrain") == config_root() / "pretrain" / "moco_ring.yaml"
    official = config_root() / "pretrain" / "official" / "moco_ring_stl10.yaml"
    assert find_config("official/moco_ring_stl10", "pretrain") == official
    assert find_config("meta_dataset.yaml", "metadataset").is_file()
    own = tmp_path / "mine.yaml"
    own.write_text("method: moco\n")
    assert find_config(own, "pretrain") == own and find_config("mine.yaml", "pretrain") == Path("mine.yaml")
    with pytest.raises(UserError, match=r"moco_rnig: config file not found .*'moco_ring'"):
        find_config("moco_rnig", "pretrain")
    with pytest.raises(UserError, match=r"elsewhere/x\.yaml: config file not found"):
        find_config("elsewhere/x.yaml", "pretrain")


@pytest.mark.slow
def test_installed_wheel_runs_from_another_folder(tmp_path):
    # Build from a copy of the tracked files: setuptools writes build/ and *.egg-info into the source tree.
    source = tmp_path / "source"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, check=True, capture_output=True, text=True).stdout
    for name in tracked.split():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            str(source),
            "-w",
            str(wheels),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("ringbench-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "ringbench/configs/pretrain/moco_ring.yaml" in names
    assert "ringbench/configs/pretrain/official/moco_ring_cifar10.yaml" in names
    assert "ringbench/configs/transfer/detectron2/voc_det.yaml" in names
    assert "ringbench/configs/published.yaml" in names  # the published reference numbers (ringbench.published)
    assert "ringbench/configs/zoo.yaml" in names  # the zoo of published checkpoints (transfer.zoo)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)

    code = "import ringbench, ringbench.config as c; print(ringbench.__file__, c.config_root())"
    where = run(sys.executable, "-c", code)
    assert where.returncode == 0, where.stderr
    assert all(part.startswith(str(target)) for part in where.stdout.split()), where.stdout
    pretrain = run(str(target / "bin" / "ringbench-pretrain"), "--config", "moco_ring", "--print-config")
    assert pretrain.returncode == 0, pretrain.stderr
    assert "name: ring" in pretrain.stdout and "queue_size: 65536" in pretrain.stdout
    official = run(
        str(target / "bin" / "ringbench-pretrain"),
        "--config",
        "official/moco_cifar10",
        "--data-root",
        ".",
        "--print-config",
    )
    assert official.returncode == 0, official.stderr
    assert "queue_size: 4096" in official.stdout and "cap_queue: false" in official.stdout
    tasks = run(str(target / "bin" / "ringbench-transfer"), "--list-tasks")
    assert tasks.returncode == 0 and "voc_det" in tasks.stdout and "fewshot_digits" in tasks.stdout
    zoo = run(str(target / "bin" / "ringbench-zoo"), "--cache-dir", str(tmp_path / "zoo-cache"), "list")
    assert zoo.returncode == 0 and "moco-v2" in zoo.stdout, zoo.stderr
    convert = run(str(target / "bin" / "ringbench-convert"), "--help")
    assert convert.returncode == 0 and "--to" in convert.stdout
    bad = run(str(target / "bin" / "ringbench-pretrain"), "--config", "nope")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
