"""Detectron2 through transfer.d2.compat: stand-ins, and a Mask+Keypoint R-CNN training step on CPU."""

from __future__ import annotations

import pytest
import torch

from ringbench.errors import UserError

pytest.importorskip("detectron2", reason="Detectron2 is installed by `make setup`")

from transfer.d2 import compat


def test_stand_ins_only_where_needed():
    D2 = compat.d2()
    applied = compat.stand_ins()
    from PIL import Image

    assert Image.LINEAR == Image.BILINEAR  # present either natively (old Pillow) or by the stand-in
    if compat.has_compiled_ops():
        assert "detectron2._C" not in applied
    else:
        import detectron2._C as ops

        assert "detectron2._C" in applied
        with pytest.raises(compat.MissingCompiledOp, match="box_iou_rotated"):
            ops.box_iou_rotated(torch.zeros(1, 5), torch.zeros(1, 5))
        with pytest.raises(compat.MissingCompiledOp, match="box_iou_rotated"):
            D2.structures.pairwise_iou_rotated(
                D2.structures.RotatedBoxes(torch.tensor([[5.0, 5, 4, 4, 0]])),
                D2.structures.RotatedBoxes(torch.tensor([[5.0, 5, 4, 4, 0]])),
            )
    versions = compat.engine_versions()
    assert versions["detectron2"] == D2.version and versions["torch"] == torch.__version__


def test_missing_detectron2_is_a_user_error(monkeypatch):
    monkeypatch.setattr(compat, "is_installed", lambda: False)
    monkeypatch.setitem(compat._STATE, "compiled_ops", None)
    with pytest.raises(UserError, match=r"make setup.*transfer\.d2\.install"):
        compat.has_compiled_ops()


def _instances(D2, height, width, num_keypoints):
    boxes = torch.tensor([[10.0, 12.0, 60.0, 70.0], [70.0, 20.0, 130.0, 100.0]])
    masks = torch.zeros(2, height, width, dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
        masks[i, y0:y1, x0:x1] = True
    keypoints = torch.zeros(2, num_keypoints, 3)
    keypoints[:, :, 0] = (boxes[:, :1] + boxes[:, 2:3]) / 2
    keypoints[:, :, 1] = torch.linspace(0, 1, num_keypoints) * (boxes[:, 3:4] - boxes[:, 1:2]) + boxes[:, 1:2]
    keypoints[:, :, 2] = 2
    inst = D2.structures.Instances((height, width))
    inst.gt_boxes = D2.structures.Boxes(boxes)
    inst.gt_classes = torch.tensor([0, 0])
    inst.gt_masks = D2.structures.BitMasks(masks)
    inst.gt_keypoints = D2.structures.Keypoints(keypoints)
    return inst


def test_model_zoo_mask_keypoint_rcnn_trains_one_step_on_cpu():
    D2 = compat.d2()
    cfg = D2.config.get_cfg()
    cfg.merge_from_file(D2.model_zoo.get_config_file("COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.RESNETS.NORM = "BN"  # random init: frozen BN diverges at once
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 100
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    torch.manual_seed(0)
    model = D2.modeling.build_model(cfg)
    model.train()
    height, width = 128, 160
    batch = [
        {
            "image": torch.randint(0, 255, (3, height, width), dtype=torch.uint8).float(),
            "instances": _instances(D2, height, width, cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS),
        }
        for _ in range(2)
    ]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    with D2.utils.events.EventStorage(0):
        losses = model(batch)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    assert {"loss_cls", "loss_box_reg", "loss_mask", "loss_keypoint", "loss_rpn_cls", "loss_rpn_loc"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    grads = [p.grad for p in model.roi_heads.mask_head.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
