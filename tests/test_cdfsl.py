"""Cross-domain few-shot (``transfer.cdfsl``, ``transfer.cdfsl_data``): the four readers on tiny files in the
benchmark's exact layouts, the episodes, ``cdfsl_synthetic`` and ``cdfsl_all`` end to end, and ``fewshot_<set>``
on a tiny CIFAR-10 written in its python-batch layout."""

from __future__ import annotations

import json
import os
import pickle
import zlib

import numpy as np
import pytest
from PIL import Image

from leaderboard.cells import make_cell
from metadataset.evaluate import confidence_interval, episode_seed
from metadataset.probes import CentroidProbe
from metadataset.sampling import FixedEpisodes, iter_episodes
from metadataset.sgd_probe import SGDLinearProbe
from ringbench.errors import UserError
from tests.helpers import family_args
from transfer.cdfsl import parse_shots
from transfer.cdfsl_data import CHESTX_CLASSES, read_chestx, read_cropdiseases, read_eurosat, read_isic
from transfer.checkpoints import load_backbone
from transfer.fewshot import add_fewshot_arguments
from transfer.run import main as run_transfer
from transfer.tasks import TaskContext, all_tasks, get_task

ISIC_HEADER = "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC"
CHESTX_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)


def _image(path, fmt="JPEG", shade=0):
    """A tiny image file (6x4): noise around one colour per shade, so that classes overlap a little."""
    rng = np.random.default_rng(zlib.crc32(str(path.name).encode()))
    pixels = np.clip(40 * shade + rng.normal(scale=60, size=(4, 6, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels[..., 0]) if fmt == "PNG" else Image.fromarray(pixels)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt)


def write_cropdiseases(root, per_class=(5, 5, 5, 5, 5)):
    base = root / "CropDiseases" / "dataset" / "train"
    for c, n in enumerate(per_class):
        for i in range(n):  # ImageFolder reads below sub-folders too
            _image(base / f"Plant{c}___disease" / ("deep" if i == 0 else "") / f"{i}.JPG", shade=c)
        (base / f"Plant{c}___disease" / "notes.txt").write_text("not an image")


def write_eurosat(root, per_class=(5, 5, 5, 5, 5)):
    for c, n in enumerate(per_class):
        for i in range(n):
            _image(root / "EuroSAT" / "2750" / f"Class{c}" / f"Class{c}_{i}.jpg", shade=c)


def write_isic(root, per_class=(5, 5, 5, 5, 5, 1, 1)):
    base = root / "ISIC"
    rows = [ISIC_HEADER]
    for c, n in enumerate(per_class):
        for i in range(n):
            name = f"ISIC_{c:02d}{i:05d}"
            rows.append(",".join([name] + ["1.0" if k == c else "0.0" for k in range(7)]))
            _image(base / "ISIC2018_Task3_Training_Input" / f"{name}.jpg", shade=c)
    csv = base / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv"
    csv.parent.mkdir(parents=True)
    csv.write_text("\n".join(rows) + "\n")


def write_chestx(root, per_class=(5, 5, 5, 5, 5, 0, 1)):
    base = root / "chestX"
    rows = [CHESTX_HEADER]
    for c, n in enumerate(per_class):
        for i in range(n):
            rows.append(f"{c:05d}_{i:03d}.png,{CHESTX_CLASSES[c]},0,{c},58,M,PA,2682,2749,0.143,0.143,")
            _image(base / "images" / f"{c:05d}_{i:03d}.png", fmt="PNG", shade=c)
    # left out by the benchmark's rule: no finding, Pneumonia, several findings, a class it does not use
    for i, labels in enumerate(["No Finding", "Pneumonia", "Effusion|Mass", "Hernia"]):
        rows.append(f"skip_{i}.png,{labels},0,99,40,F,AP,2500,2048,0.168,0.168,")
    (base / "Data_Entry_2017.csv").write_text("\n".join(rows) + "\n")


def _one_line_error(reader, root, path):
    """The reader's error is one line naming the missing ``path`` and the expected layout."""
    with pytest.raises(UserError) as info:
        reader(root)
    assert str(path) in str(info.value) and "layout" in str(info.value) and "\n" not in str(info.value)


def test_image_folder_readers_and_a_symlink_cycle(tmp_path):
    write_cropdiseases(tmp_path, (2, 3, 2, 2, 2))
    crop = read_cropdiseases(tmp_path)
    assert crop.classes == [f"Plant{c}___disease" for c in range(5)]
    split = crop.splits["all"]
    assert split.refs[:3] == ["Plant0___disease/1.JPG", "Plant0___disease/deep/0.JPG", "Plant1___disease/1.JPG"]
    assert split.labels.tolist() == [0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4] and split.load(0).size == (6, 4)
    os.symlink("..", tmp_path / "CropDiseases" / "dataset" / "train" / "Plant2___disease" / "loop")
    with pytest.raises(UserError, match="symlink cycle") as info:
        read_cropdiseases(tmp_path)
    assert "\n" not in str(info.value)
    write_eurosat(tmp_path, (1, 2, 1, 1, 1))
    euro = read_eurosat(tmp_path)
    assert euro.classes[1] == "Class1" and euro.splits["all"].refs[1:3] == [
        "Class1/Class1_0.jpg",
        "Class1/Class1_1.jpg",
    ]
    _one_line_error(read_eurosat, tmp_path / "elsewhere", tmp_path / "elsewhere" / "EuroSAT" / "2750")


def test_isic_reads_the_one_hot_csv(tmp_path):
    write_isic(tmp_path, (1, 2, 0, 0, 0, 1, 1))
    isic = read_isic(tmp_path)
    assert isic.classes == ISIC_HEADER.split(",")[1:]
    split = isic.splits["all"]
    assert split.labels.tolist() == [0, 1, 1, 5, 6]
    assert split.refs[0] == "ISIC2018_Task3_Training_Input/ISIC_0000000.jpg" and split.load(4).mode == "RGB"
    image = tmp_path / "ISIC" / "ISIC2018_Task3_Training_Input" / "ISIC_0100001.jpg"
    image.unlink()
    _one_line_error(read_isic, tmp_path, image)
    csv = tmp_path / "ISIC" / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv"
    csv.write_text(ISIC_HEADER + "\nISIC_0000000,0.0,0.0,0.0,0.0,0.0,0.0,0.0\n")
    with pytest.raises(UserError, match="line 2: expected an image name and 7 one-hot values"):
        read_isic(tmp_path)
    csv.unlink()
    _one_line_error(read_isic, tmp_path, csv)


def test_chestx_keeps_the_benchmarks_single_label_classes(tmp_path):
    write_chestx(tmp_path, (1, 0, 2, 0, 0, 0, 1))
    chest = read_chestx(tmp_path)
    assert chest.classes == [
        "Atelectasis",
        "Cardiomegaly",
        "Effusion",
        "Infiltration",
        "Mass",
        "Nodule",
        "Pneumothorax",
    ]
    split = chest.splits["all"]
    assert split.labels.tolist() == [0, 2, 2, 6]  # no finding, Pneumonia, several findings, Hernia: left out
    assert split.refs == [
        "images/00000_000.png",
        "images/00002_000.png",
        "images/00002_001.png",
        "images/00006_000.png",
    ]
    loaded = split.load(3)
    assert loaded.size == (256, 256) and loaded.mode == "RGB"  # the loader's resize((256, 256)).convert('RGB')
    with Image.open(tmp_path / "chestX" / "images" / "00006_000.png") as raw:  # grey, resized, then RGB
        expected = np.asarray(raw.resize((256, 256), Image.BICUBIC))  # type: ignore[attr-defined]
    assert (np.asarray(loaded) == expected[..., None]).all()
    (tmp_path / "chestX" / "images" / "00002_001.png").unlink()
    _one_line_error(read_chestx, tmp_path, tmp_path / "chestX" / "images" / "00002_001.png")
    (tmp_path / "chestX" / "Data_Entry_2017.csv").unlink()
    _one_line_error(read_chestx, tmp_path, tmp_path / "chestX" / "Data_Entry_2017.csv")


def test_episodes_are_five_way_k_shot_fifteen_queries_and_seeded():
    labels = np.repeat(np.arange(8), 70)
    rules = FixedEpisodes(5, 50, 15)
    first = list(iter_episodes(episode_seed(0, "eurosat/50shot"), labels, 8, 4, rules))
    again = list(iter_episodes(episode_seed(0, "eurosat/50shot"), labels, 8, 4, rules))
    other = list(iter_episodes(episode_seed(1, "eurosat/50shot"), labels, 8, 4, rules))
    for e in first:
        assert len(np.unique(labels[e.support])) == 5 and len(e.support) == 250 and len(e.query) == 75
        assert np.bincount(e.query_labels).tolist() == [15] * 5 and not set(e.support) & set(e.query)
        assert (labels[e.support][::50] == labels[e.query][::15]).all()  # episode label -> one class
    assert all(np.array_equal(a.support, b.support) and np.array_equal(a.query, b.query) for a, b in zip(first, again))
    assert not all(np.array_equal(a.support, b.support) for a, b in zip(first, other))
    assert parse_shots("50, 5,20") == [5, 20, 50] and parse_shots([5]) == [5]
    with pytest.raises(UserError, match="--cdfsl-shots"):
        parse_shots("5,x")


@pytest.fixture
def card(twin_card):
    """The suite's small card (made once per session); the tests run it at 8 px."""
    return twin_card[0]


def test_cdfsl_synthetic_through_the_cli(card, tmp_path):
    """One record holds every shot count; per-episode accuracies give the interval, as the leaderboard reads it.
    The episodes are those of ``(seed, "synthetic/<k>shot")`` over the labels: the same for every card."""
    common = ["--task", "cdfsl_synthetic", "--episodes", "10", "--synthetic-classes", "5", "--image-size", "8"]
    common += ["--cdfsl-synthetic-images", "7", "--cdfsl-shots", "2,1", "--queries", "3", "--probe", "centroid"]
    paths = ["--results", str(tmp_path / "res"), "--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path)]
    assert run_transfer(["--backbone", str(card), *common, *paths, "--debug"]) == 0
    (path,) = (tmp_path / "res" / "cdfsl_synthetic").glob("*.json")
    rec = json.loads(path.read_text())
    assert set(rec["metrics"]) == {"acc_1shot", "acc_2shot"} and rec["config"]["shots"] == [1, 2]
    assert rec["config"]["resize"] == "scale-1.15-crop" and rec["config"]["synthetic"] == {"classes": 5, "images": 7}
    for metric in ("acc_1shot", "acc_2shot"):
        values = np.array(rec["extra"]["per_episode"][metric])
        assert len(values) == 10 and rec["metrics"][metric] == pytest.approx(values.mean(), abs=1e-3)
        assert rec["ci95"][metric] == pytest.approx(confidence_interval(values), abs=1e-3)
        cell = make_cell(rec, metric)  # the leaderboard's cell: the record's interval, its episodes as samples
        assert cell.n == 10 and cell.samples == pytest.approx(values.tolist())
    # the centroid probe on the episodes of (seed 0, "synthetic/2shot"), recomputed from the cached features
    (feats,) = (tmp_path / "features").iterdir()
    x, y = np.load(feats / "features.npy"), np.load(feats / "labels.npy")
    episodes = iter_episodes(episode_seed(0, "synthetic/2shot"), y, 5, 10, FixedEpisodes(5, 2, 3))
    probe = CentroidProbe()
    expected = [
        np.mean(probe.fit_predict(x[e.support], e.support_labels, x[e.query]) == e.query_labels) for e in episodes
    ]
    np.testing.assert_allclose(rec["extra"]["per_episode"]["acc_2shot"], 100 * np.array(expected), atol=1e-3)
    for flag, value in (("--shots", "5"), ("--md-split", "test"), ("--synthetic-images", "30")):
        with pytest.raises(UserError, match=f"{flag}: not used by task cdfsl_synthetic"):
            run_transfer(["--backbone", str(card), *common, *paths, flag, value])
    with pytest.raises(UserError, match="--cdfsl-shots: not used by task fewshot_digits"):
        run_transfer(["--backbone", str(card), "--task", "fewshot_digits", "--cdfsl-shots", "5", *paths])


def test_cdfsl_all_on_the_four_layouts(card, tmp_path):
    write_cropdiseases(tmp_path, (3, 3, 3, 3, 3))
    write_eurosat(tmp_path, (3, 3, 3, 3, 3))
    write_isic(tmp_path, (3, 3, 3, 3, 3, 2, 2))
    write_chestx(tmp_path, (3, 3, 3, 3, 3, 2, 2))
    task = get_task("cdfsl_all")
    argv = ["--data-root", str(tmp_path), "--cdfsl-shots", "2,1", "--queries", "1", "--episodes", "4"]
    config = task.make_config(family_args(add_fewshot_arguments, *argv, "--image-size", "8", "--probe", "centroid"))
    assert config["probe"] == {"probe": "centroid"} and config["sets"] == ["cropdiseases", "eurosat", "isic", "chestx"]
    backbone = load_backbone(card)
    task.validate(backbone, config)
    ctx = TaskContext(output_dir=tmp_path / "run", cache_dir=tmp_path / "cache")
    result = task.run(backbone, config, ctx)
    for k in (1, 2):
        per_set = [result.metrics[f"{s}/acc_{k}shot"] for s in config["sets"]]
        assert result.metrics[f"acc_{k}shot"] == pytest.approx(np.mean(per_set))
        intervals = [result.ci95[f"{s}/acc_{k}shot"] for s in config["sets"]]
        assert result.ci95[f"acc_{k}shot"] == pytest.approx(np.sqrt(np.sum(np.square(intervals))) / 4)
        paired = np.mean([result.extra["per_episode"][f"{s}/acc_{k}shot"] for s in config["sets"]], axis=0)
        np.testing.assert_allclose(result.extra["per_episode"][f"acc_{k}shot"], paired, atol=1e-3)
        assert result.extra["aggregates"][f"acc_{k}shot"] == [f"{s}/acc_{k}shot" for s in config["sets"]]
    assert result.extra["images"] == {"cropdiseases": 15, "eurosat": 15, "isic": 19, "chestx": 19}
    cached = sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "features").iterdir())
    assert cached == ["cdfsl_chestx", "cdfsl_cropdiseases", "cdfsl_eurosat", "cdfsl_isic"]  # shared with cdfsl_<set>
    single = get_task("cdfsl_isic").make_config(family_args(add_fewshot_arguments, *argv, "--image-size", "8"))
    assert get_task("cdfsl_isic").run(backbone, single, ctx).extra["feature_cache"]["isic"]["hit"]
    config["queries"] = 2  # 2 shots + 2 queries: no class of 3 images has that many
    with pytest.raises(UserError, match=r"cdfsl_all \(cropdiseases\): 5-way 2-shot 2-query episodes need 5 classes"):
        task.validate(backbone, config)
    missing = task.make_config(family_args(add_fewshot_arguments, "--data-root", str(tmp_path / "none")))
    with pytest.raises(UserError, match="the first missing is cropdiseases: CropDiseases: expected"):
        task.validate(backbone, missing)


def write_cifar10(root, labels):
    """CIFAR-10's python batches: five train batches and a test batch (``labels`` split over the six)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    rng = np.random.default_rng(0)
    for name, part in zip(names, np.array_split(np.asarray(labels), 6)):
        data = rng.integers(0, 256, size=(len(part), 3072), dtype=np.uint8)
        with open(folder / name, "wb") as handle:
            pickle.dump({"batch_label": name, "labels": part.tolist(), "data": data}, handle)


def test_fewshot_on_a_battery_set_pools_its_splits(card, tmp_path):
    write_cifar10(tmp_path, np.arange(36) % 6)  # 6 images of each of 6 classes, over train and test
    task = get_task("fewshot_cifar10")
    args = ["--data-root", str(tmp_path), "--shots", "2", "--queries", "4", "--episodes", "5", "--image-size", "8"]
    config = task.make_config(family_args(add_fewshot_arguments, *args, "--probe", "sgd_linear"))
    assert config["probe"] == SGDLinearProbe().config()
    config["probe"] = {"probe": "centroid"}
    assert (config["ways"], config["shots"], config["queries"]) == (5, [2], 4) and config["image_size"] == 8
    backbone = load_backbone(card)
    task.validate(backbone, config)
    result = task.run(backbone, config, TaskContext(output_dir=tmp_path / "run", cache_dir=tmp_path / "cache"))
    assert result.extra["images"] == {"cifar10": 36}  # train and test pooled, as ssl-transfer's SetDataset
    assert result.extra["classes"] == {"cifar10": 6}  # the four classes with no image are left out, as there
    values = result.extra["per_episode"]["acc"]
    assert len(values) == 5 and result.metrics["acc"] == pytest.approx(np.mean(values), abs=1e-3)
    default = task.make_config(family_args(add_fewshot_arguments, "--data-root", str(tmp_path)))
    assert (default["shots"], default["queries"], default["episodes"], default["image_size"]) == ([5], 15, 600, 224)
    with pytest.raises(UserError, match="5-way 5-shot 15-query episodes need 5 classes"):
        task.validate(backbone, default)
    assert "fewshot_voc2007" not in all_tasks() and "fewshot_dtd" in all_tasks()  # VOC2007 is multi-label
    with pytest.raises(UserError, match="fewshot_cifar10 needs its data: pass --data-root"):
        task.validate(backbone, {**config, "data_root": None})
