"""Published reference numbers of the Detectron2 tasks, with their source: the leaderboard's reference rows.

One row per (task, method, metric): ``{task, metric, value, method, source}``. ``metric`` is the key
the task's records use (``bbox/AP50``: Detectron2's evaluator output, flattened by
:func:`transfer.d2.train.flatten_results`), ``value`` is in percent points, ``source`` says where the
number is printed and under which protocol. Only numbers whose table can be cited are listed: MoCo's
detection README for VOC. COCO has none here yet: the MoCo paper's COCO table (R50-FPN and R50-C4, 1x
and 2x) belongs to ``coco_instseg`` and ``coco_instseg_c4_*`` once its values are copied from the paper
itself, with the table's number.
"""

from __future__ import annotations

from typing import Any

MOCO_VOC_SOURCE = (
    "MoCo, detection/README.md (github.com/facebookresearch/moco): Faster R-CNN R50-C4, VOC07+12 trainval "
    "-> VOC07 test, 24k iterations, mean of 5 trials"
)

# method -> (AP50, AP, AP75), from MoCo's detection README, "Results"
_MOCO_VOC = {
    "ImageNet-1M, supervised": (81.3, 53.5, 58.8),
    "ImageNet-1M, MoCo v1, 200ep": (81.5, 55.9, 62.6),
    "ImageNet-1M, MoCo v2, 200ep": (82.4, 57.0, 63.6),
    "ImageNet-1M, MoCo v2, 800ep": (82.5, 57.4, 64.0),
}

PUBLISHED: tuple[dict[str, Any], ...] = tuple(
    {"task": "voc_det", "metric": metric, "value": value, "method": method, "source": MOCO_VOC_SOURCE}
    for method, values in _MOCO_VOC.items()
    for metric, value in zip(("bbox/AP50", "bbox/AP", "bbox/AP75"), values)
)


def reference_rows(task: str) -> list[dict[str, Any]]:
    """The published rows of ``task`` (empty when none can be cited), in the order they are listed."""
    return [dict(row) for row in PUBLISHED if row["task"] == task]


def reference_table(task: str) -> dict[str, dict[str, float]]:
    """``{method: {metric: value}}`` for ``task``: one reference row per published method."""
    table: dict[str, dict[str, float]] = {}
    for row in reference_rows(task):
        table.setdefault(row["method"], {})[row["metric"]] = row["value"]
    return table
