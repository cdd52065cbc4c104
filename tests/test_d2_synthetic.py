"""The synthetic COCO-format dataset: real files, read back by pycocotools and Detectron2, scored by COCOEvaluator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ringbench import shapes
from transfer.d2 import synthetic_coco

SMALL = dict(num_train=4, num_val=3, height=64, width=80, max_objects=3, seed=5)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synthetic_coco.write_synthetic_coco(tmp_path_factory.mktemp("syn") / "ds", **SMALL)


def test_files_match_the_renderer(dataset):
    from PIL import Image
    from pycocotools import mask as mask_util
    from pycocotools.coco import COCO

    coco = json.loads(synthetic_coco.annotation_path(dataset, "train").read_text())
    assert len(coco["images"]) == 4
    for cat in coco["categories"]:
        assert cat["keypoints"] == list(shapes.KEYPOINT_NAMES)
        assert cat["skeleton"] == [list(p) for p in shapes.KEYPOINT_SKELETON]
    assert coco["info"]["keypoint_oks_sigmas"] == list(shapes.KEYPOINT_SIGMAS)
    api = COCO(str(synthetic_coco.annotation_path(dataset, "train")))  # the official reader accepts it
    for index, info in enumerate(coco["images"]):
        image, objects = shapes.render_scene(
            np.random.default_rng([5, 0, index]),
            64,
            80,
            max_objects=3,
            min_radius=synthetic_coco.DEFAULTS["min_radius"],
            max_radius=synthetic_coco.DEFAULTS["max_radius"],
        )
        stored = np.asarray(Image.open(synthetic_coco.image_dir(dataset, "train") / info["file_name"]))
        np.testing.assert_array_equal(stored, image)
        anns = api.loadAnns(api.getAnnIds(imgIds=[info["id"]]))
        assert len(anns) == len(objects)
        for ann, obj in zip(anns, objects):
            np.testing.assert_array_equal(mask_util.decode(ann["segmentation"]).astype(bool), obj["mask"])
            np.testing.assert_allclose(ann["bbox"], obj["bbox"], atol=0.01)
            assert ann["area"] == obj["mask"].sum() and ann["category_id"] == obj["category"] + 1
            kps = np.asarray(ann["keypoints"], dtype=float).reshape(-1, 3)
            visible = obj["keypoints"][:, 2] > 0
            np.testing.assert_allclose(kps[visible, :2], np.maximum(obj["keypoints"][visible, :2] - 0.5, 0), atol=0.01)
            assert ann["num_keypoints"] == visible.sum()


def test_deterministic_by_seed(tmp_path, dataset):
    again = synthetic_coco.write_synthetic_coco(tmp_path / "again", **SMALL)
    other = synthetic_coco.write_synthetic_coco(tmp_path / "other", **{**SMALL, "seed": 6})
    for split in ("train", "val"):
        ours = synthetic_coco.annotation_path(dataset, split).read_bytes()
        assert synthetic_coco.annotation_path(again, split).read_bytes() == ours
        assert synthetic_coco.annotation_path(other, split).read_bytes() != ours


def test_cache_reuses_and_never_leaves_partial_folders(tmp_path, monkeypatch):
    first = synthetic_coco.ensure_synthetic_coco(tmp_path, **SMALL)
    assert synthetic_coco.ensure_synthetic_coco(tmp_path, **SMALL) == first
    assert synthetic_coco.ensure_synthetic_coco(tmp_path, **{**SMALL, "num_val": 2}) != first

    def boom(*args, **kwargs):
        raise RuntimeError("renderer failed")

    monkeypatch.setattr(synthetic_coco.shapes, "render_scene", boom)
    with pytest.raises(RuntimeError):
        synthetic_coco.ensure_synthetic_coco(tmp_path, **{**SMALL, "seed": 99})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        {first.name, synthetic_coco.ensure_synthetic_coco(tmp_path, **{**SMALL, "num_val": 2}).name}
    )


def test_detectron2_registration_and_perfect_predictions_score_100(dataset, tmp_path):
    """GT registered through register_coco_instances, fed back as predictions: AP 100 for boxes, masks, keypoints."""
    pytest.importorskip("detectron2")
    from transfer.d2 import data
    from transfer.d2.compat import d2, has_compiled_ops

    D2 = d2()
    splits = data.register_synthetic(dataset)
    records = D2.data.DatasetCatalog.get(splits.test[0])
    assert len(records) == 3
    meta = D2.data.MetadataCatalog.get(splits.test[0])
    assert meta.thing_classes == list(shapes.SHAPES) and meta.keypoint_names == list(shapes.KEYPOINT_NAMES)
    evaluator = D2.evaluation.COCOEvaluator(
        splits.test[0],
        tasks=("bbox", "segm", "keypoints"),
        distributed=False,
        output_dir=str(tmp_path),
        use_fast_impl=has_compiled_ops(),
        kpt_oks_sigmas=splits.kpt_oks_sigmas,
    )
    evaluator.reset()
    for record in records:
        h, w = record["height"], record["width"]
        # as Detectron2's mapper leaves them: keypoints as (K, 3) arrays
        annos = [
            {**a, "keypoints": np.asarray(a["keypoints"], dtype=np.float64).reshape(-1, 3)}
            for a in record["annotations"]
        ]
        inst = D2.data.detection_utils.annotations_to_instances(annos, (h, w), mask_format="bitmask")
        pred = D2.structures.Instances((h, w))
        pred.pred_boxes = inst.gt_boxes
        pred.scores = torch.ones(len(annos))
        pred.pred_classes = inst.gt_classes
        pred.pred_masks = inst.gt_masks.tensor
        kps = inst.gt_keypoints.tensor.clone()
        kps[:, :, 2] = 1.0  # visibility -> keypoint score
        pred.pred_keypoints = kps
        evaluator.process([{"image_id": record["image_id"]}], [{"instances": pred}])
    results = evaluator.evaluate()
    for kind in ("bbox", "segm", "keypoints"):
        assert results[kind]["AP"] == pytest.approx(100.0, abs=0.5), (kind, results[kind])


def test_two_processes_writing_one_dataset_both_get_it(tmp_path, monkeypatch):
    """Two sweep jobs start together: the one whose rename comes second (onto the other's non-empty
    folder, ENOTEMPTY on Linux) uses the folder the first one wrote, and leaves no staging copy."""
    real_rename = synthetic_coco.os.rename
    other: list = []

    def rename_after_the_other_process(src, dst):
        if not other:  # the other process finishes its copy just before this one renames
            monkeypatch.setattr(synthetic_coco.os, "rename", real_rename)
            other.append(synthetic_coco.write_synthetic_coco(dst, **SMALL))
        return real_rename(src, dst)

    monkeypatch.setattr(synthetic_coco.os, "rename", rename_after_the_other_process)
    root = synthetic_coco.ensure_synthetic_coco(tmp_path, **SMALL)
    assert other == [root] and synthetic_coco.annotation_path(root, "val").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [root.name]
