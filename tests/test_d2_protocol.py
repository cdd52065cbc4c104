"""MoCo's detection protocol, key by key: the resolved Detectron2 configs of voc_det and the coco_* tasks
against MoCo's detection configs (and Detectron2's own FPN configs, which MoCo's paper used for R50-FPN).

The official side is Detectron2's defaults (``get_cfg()``) overlaid with the values of the official YAML
files, written here with the file each comes from. Every key of the two configs is compared; the keys
that differ on purpose are listed in ``DELIBERATE`` (docs/detectron2.md, "Protocol differences", gives the
reasons), and any other difference fails.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from transfer.tasks import get_task

pytest.importorskip("detectron2")

MOCO = "github.com/facebookresearch/moco, detection/configs/"
D2_ZOO = "Detectron2 v0.6 model zoo, configs/"
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the card's (torchvision's ImageNet) mean and std, as fractions
IMAGENET_STD = (0.229, 0.224, 0.225)

# Official values, file by file (later files override earlier ones, as _BASE_ chains do).
MOCO_BASE_C4 = (
    MOCO + "Base-RCNN-C4-BN.yaml",
    {
        "MODEL.META_ARCHITECTURE": "GeneralizedRCNN",
        "MODEL.RPN.PRE_NMS_TOPK_TEST": 6000,
        "MODEL.RPN.POST_NMS_TOPK_TEST": 1000,
        "MODEL.ROI_HEADS.NAME": "Res5ROIHeadsExtraNorm",
        "MODEL.BACKBONE.FREEZE_AT": 0,
        "MODEL.RESNETS.NORM": "naiveSyncBN",
        "TEST.PRECISE_BN.ENABLED": True,
        "SOLVER.IMS_PER_BATCH": 16,
        "SOLVER.BASE_LR": 0.02,
    },
)
MOCO_VOC = (
    MOCO + "pascal_voc_R_50_C4_24k.yaml",
    {
        "MODEL.MASK_ON": False,
        "MODEL.WEIGHTS": "detectron2://ImageNetPretrained/MSRA/R-50.pkl",
        "MODEL.ROI_HEADS.NUM_CLASSES": 20,
        "INPUT.MIN_SIZE_TRAIN": [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800],
        "INPUT.MIN_SIZE_TEST": 800,
        "DATASETS.TRAIN": ["voc_2007_trainval", "voc_2012_trainval"],
        "DATASETS.TEST": ["voc_2007_test"],
        "SOLVER.STEPS": [18000, 22000],
        "SOLVER.MAX_ITER": 24000,
        "SOLVER.WARMUP_ITERS": 100,
    },
)
MOCO_COCO_C4_2X = (
    MOCO + "coco_R_50_C4_2x.yaml",
    {
        "MODEL.MASK_ON": True,
        "MODEL.WEIGHTS": "detectron2://ImageNetPretrained/MSRA/R-50.pkl",
        "INPUT.MIN_SIZE_TRAIN": [640, 672, 704, 736, 768, 800],
        "INPUT.MIN_SIZE_TEST": 800,
        "DATASETS.TRAIN": ["coco_2017_train"],
        "DATASETS.TEST": ["coco_2017_val"],
        "SOLVER.STEPS": [120000, 160000],
        "SOLVER.MAX_ITER": 180000,
    },
)
# pascal_voc_R_50_C4_24k_moco.yaml and coco_R_50_C4_2x_moco.yaml add the same keys to their bases
MOCO_CARD = (
    MOCO + "pascal_voc_R_50_C4_24k_moco.yaml / coco_R_50_C4_2x_moco.yaml",
    {
        "MODEL.PIXEL_MEAN": [123.675, 116.280, 103.530],
        "MODEL.PIXEL_STD": [58.395, 57.120, 57.375],
        "MODEL.WEIGHTS": "See Instructions",
        "MODEL.RESNETS.STRIDE_IN_1X1": False,
        "INPUT.FORMAT": "RGB",
    },
)
# The 1x schedule of Detectron2's C4 configs (Base-RCNN-C4.yaml), for the MoCo paper's "R50-C4, 1x" setting
D2_1X = (D2_ZOO + "Base-RCNN-C4.yaml", {"SOLVER.STEPS": [60000, 80000], "SOLVER.MAX_ITER": 90000})
# MoCo's changes to Detectron2's R50-FPN configs (MoCo ships no FPN config): its norm in the backbone
# and in FPN, nothing frozen, precise BN, and the card's input convention
MOCO_FPN = (
    MOCO + "Base-RCNN-C4-BN.yaml (norm, FREEZE_AT, PRECISE_BN) + *_moco.yaml (input), applied to FPN",
    {
        "MODEL.RESNETS.NORM": "naiveSyncBN",
        "MODEL.FPN.NORM": "naiveSyncBN",
        "MODEL.BACKBONE.FREEZE_AT": 0,
        "TEST.PRECISE_BN.ENABLED": True,
        **MOCO_CARD[1],
    },
)

# (task, Detectron2 zoo file the official side starts from or None, official layers)
PROTOCOLS = {
    "voc_det": (None, [MOCO_BASE_C4, MOCO_VOC, MOCO_CARD]),
    "coco_instseg_c4_2x": (None, [MOCO_BASE_C4, MOCO_COCO_C4_2X, MOCO_CARD]),
    "coco_instseg_c4_1x": (None, [MOCO_BASE_C4, MOCO_COCO_C4_2X, MOCO_CARD, D2_1X]),
    "coco_det": ("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", [MOCO_FPN]),
    "coco_instseg": ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml", [MOCO_FPN]),
    "coco_kp": ("COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml", [MOCO_FPN]),
}

# Keys that differ on purpose (docs/detectron2.md, "Protocol differences"): ours -> reason in those docs.
DELIBERATE_ALL = {
    "MODEL.BACKBONE.NAME",  # Detectron2's ResNet behind our builder, which also serves CIFAR-stem cards
    "MODEL.RESNETS.STEM_TYPE",  # our key: "imagenet" is Detectron2's BasicStem
    "MODEL.WEIGHTS",  # the card's weights are converted and loaded, every key checked
    "SOLVER.CHECKPOINT_PERIOD",  # sized to the schedule (about ten per run)
    "SEED",  # the seed index (recorded), not a random seed
    "OUTPUT_DIR",  # the run's folder
}


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        else:
            out[name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _same(a: Any, b: Any) -> bool:
    """Equal, numbers to 1e-9 relative (0-255 pixel statistics computed from fractions), lists element-wise."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return a == pytest.approx(b, rel=1e-9)
    return a == b


def official(task: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The official config of ``task``, flattened, and the file each overridden key comes from."""
    from transfer.d2.compat import d2
    from transfer.d2.modeling import add_ringbench_config

    D2 = d2()
    cfg = D2.config.get_cfg()
    add_ringbench_config(cfg)  # our one extra key, so that both sides have the same keys
    zoo, layers = PROTOCOLS[task]
    source = {}
    if zoo:
        cfg.merge_from_file(D2.model_zoo.get_config_file(zoo))
    flat = _flat(cfg)
    for file, values in layers:
        for key, value in values.items():
            assert key in flat, f"{file}: {key} is not a Detectron2 key"
            flat[key] = _plain(value)
            source[key] = file
    return flat, source


def ours(task: str, device: str = "cuda") -> dict[str, Any]:
    from transfer.d2.tasks import resolved_cfg

    card = SimpleNamespace(arch="resnet50", stem="imagenet", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    config = get_task(task).make_config(argparse.Namespace(data_root="/data"))
    return _flat(resolved_cfg(task, card, config, device, Path("out")))


@pytest.mark.parametrize("task", sorted(PROTOCOLS))
def test_resolved_config_matches_the_official_one_key_by_key(task):
    theirs, source = official(task)
    mine = ours(task)
    assert set(mine) == set(theirs)
    deliberate = DELIBERATE_ALL
    differ = {
        k: (mine[k], theirs[k], source.get(k, "Detectron2 default"))
        for k in theirs
        if not _same(mine[k], theirs[k]) and k not in deliberate
    }
    assert not differ, differ
    # the keys the issue names, explicitly
    keys = ["SOLVER.BASE_LR", "SOLVER.STEPS", "SOLVER.MAX_ITER", "SOLVER.WARMUP_ITERS", "SOLVER.IMS_PER_BATCH"]
    keys += ["INPUT.MIN_SIZE_TRAIN", "INPUT.MIN_SIZE_TEST", "INPUT.MAX_SIZE_TRAIN", "MODEL.RESNETS.NORM"]
    keys += ["MODEL.BACKBONE.FREEZE_AT", "MODEL.RESNETS.RES2_OUT_CHANNELS", "MODEL.RESNETS.RES5_DILATION"]
    keys += ["MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD", "INPUT.FORMAT", "TEST.PRECISE_BN.ENABLED"]
    for key in keys:
        assert _same(mine[key], theirs[key]), key
    assert mine["MODEL.RESNETS.NORM"] == "naiveSyncBN"
    assert mine["SOLVER.CHECKPOINT_PERIOD"] == min(5000, -(-mine["SOLVER.MAX_ITER"] // 10))


def test_voc_and_c4_schedules_are_moccos():
    assert ours("voc_det")["SOLVER.STEPS"] == [18000, 22000] and ours("voc_det")["SOLVER.MAX_ITER"] == 24000
    two = ours("coco_instseg_c4_2x")
    assert two["SOLVER.STEPS"] == [120000, 160000] and two["SOLVER.MAX_ITER"] == 180000 and two["MODEL.MASK_ON"]
    one = ours("coco_instseg_c4_1x")
    assert one["SOLVER.STEPS"] == [60000, 80000] and one["SOLVER.MAX_ITER"] == 90000
    assert one["MODEL.ROI_HEADS.NAME"] == two["MODEL.ROI_HEADS.NAME"] == "Res5ROIHeadsExtraNorm"


def test_print_config_from_a_card_needs_no_data(tmp_path, capsys, monkeypatch):
    """``--print-config`` on voc_det with a ResNet-50 card: MoCo's keys, the card's mean/std, no data root."""
    from ringbench.cli import run_main
    from tests.helpers import write_card
    from transfer.run import main

    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    card = write_card(tmp_path / "r50.pth", arch="resnet50", stem="imagenet", mean=[0.5, 0.4, 0.3], std=[0.2] * 3)
    code = run_main(main, ["--backbone", str(card), "--task", "voc_det", "--print-config", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    import yaml

    printed = yaml.safe_load(out)
    assert printed["SOLVER"]["MAX_ITER"] == 24000 and printed["SOLVER"]["STEPS"] == [18000, 22000]
    assert printed["SOLVER"]["WARMUP_ITERS"] == 100 and printed["SOLVER"]["IMS_PER_BATCH"] == 16
    assert printed["MODEL"]["RESNETS"]["NORM"] == "naiveSyncBN" and printed["MODEL"]["BACKBONE"]["FREEZE_AT"] == 0
    assert printed["MODEL"]["PIXEL_MEAN"] == pytest.approx([127.5, 102.0, 76.5])
    assert printed["MODEL"]["PIXEL_STD"] == pytest.approx([51.0] * 3)
    assert out.startswith("# voc_det: resolved Detectron2 config")


def test_published_reference_rows_travel_with_the_tasks():
    """MoCo's VOC numbers (detection/README.md, R50-C4 24k, mean of 5 trials), in the records' metric names:
    configs/published.yaml, read by ringbench.published."""
    from ringbench.published import published_numbers
    from transfer.d2.train import flatten_results

    expected = {  # method: (AP50, AP, AP75), as MoCo's detection README prints them
        "ImageNet-1M, supervised": (81.3, 53.5, 58.8),
        "ImageNet-1M, MoCo v1, 200ep": (81.5, 55.9, 62.6),
        "ImageNet-1M, MoCo v2, 200ep": (82.4, 57.0, 63.6),
        "ImageNet-1M, MoCo v2, 800ep": (82.5, 57.4, 64.0),
    }
    rows = published_numbers("voc_det")
    assert len(rows) == 12 and all("mean of 5 trials" in r.source and "R50-C4" in r.source for r in rows)
    table: dict[str, dict[str, float]] = {}
    for row in rows:
        table.setdefault(row.method, {})[row.metric] = row.value
    assert {m: (v["bbox/AP50"], v["bbox/AP"], v["bbox/AP75"]) for m, v in table.items()} == expected
    # the metric names are the ones a voc_det record carries
    metrics, _ = flatten_results({"bbox": {"AP": 50.0, "AP50": 80.0, "AP75": 55.0}})
    assert {r.metric for r in rows} == set(metrics) == set(get_task("voc_det").headline_metrics)
    for task in ("coco_det", "coco_instseg", "coco_kp", "coco_instseg_c4_1x", "coco_instseg_c4_2x", "syn_det"):
        assert published_numbers(task) == []  # nothing that could not be cited


def test_docs_list_every_deliberate_difference():
    from tests.helpers import REPO

    text = (REPO / "docs" / "detectron2.md").read_text()
    section = text[text.index("**Protocol differences**") : text.index("**Detectron2 installation.**")]
    for key in DELIBERATE_ALL:
        assert f"`{key}`" in section, key
