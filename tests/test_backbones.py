"""Checkpoint adapters: every supported format, strict keys, and normalisation defaults."""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from ringbench.card import IMAGENET_MEAN
from ringbench.errors import UserError
from ringbench.resnets import RESNETS
from tests.helpers import write_card
from transfer.checkpoints import infer_resnet_arch, load_backbone


@pytest.fixture(scope="module")
def tv18():
    torch.manual_seed(1)
    return torchvision.models.resnet18().state_dict()


def _same_backbone(backbone, reference):
    ref = {k: v for k, v in reference.items() if not k.startswith("fc.")}
    assert backbone.state_dict.keys() == ref.keys()
    for key, value in ref.items():
        assert torch.equal(backbone.state_dict[key], value), key


def test_card(tmp_path):
    path = write_card(tmp_path / "ring_moco.pth", arch="resnet18", stem="cifar")
    bb = load_backbone(path)
    assert (bb.name, bb.arch, bb.stem, bb.source_format) == ("ring_moco", "resnet18", "cifar", "card")
    assert bb.mean == (0.5, 0.4, 0.3) and bb.image_size == 32 and len(bb.sha256) == 64
    assert load_backbone(path, name="custom").name == "custom"


def test_moco_checkpoint(tmp_path, tv18, caplog):
    state = {f"module.encoder_q.{k}": v for k, v in tv18.items() if not k.startswith("fc.")}
    state["module.encoder_q.fc.0.weight"] = torch.randn(512, 512)  # MoCo v2's MLP head
    state["module.encoder_q.fc.2.weight"] = torch.randn(128, 512)
    state.update({f"module.encoder_k.{k}": v + 1 for k, v in tv18.items()})
    state["module.queue"], state["module.queue_ptr"] = torch.randn(128, 64), torch.zeros(1, dtype=torch.long)
    path = tmp_path / "moco_v2_200ep.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": state, "optimizer": {"state": {}}}, path)
    with caplog.at_level(logging.WARNING):
        bb = load_backbone(path)
    assert bb.source_format == "moco" and bb.arch == "resnet18" and bb.stem == "imagenet"
    _same_backbone(bb, tv18)  # the query encoder, not the momentum one
    assert bb.mean == IMAGENET_MEAN and "ImageNet mean/std" in caplog.text
    assert any(k.startswith("module.encoder_k.") or k.startswith("encoder_k.") for k in bb.dropped_keys)


def test_ring_lightning_checkpoint_with_small_resnet_names(tmp_path):
    """The official ring code saves its system: ``model.`` (a CIFAR ResNet with ``shortcut``
    modules and a projection head in ``fc``), the momentum encoder ``model_k.`` and the queue."""
    torch.manual_seed(2)
    from ringbench.backbones import create_backbone

    cifar = create_backbone("resnet18", "cifar").state_dict()
    renamed = {k.replace(".downsample.", ".shortcut."): v for k, v in cifar.items()}
    state = {f"model.{k}": v for k, v in renamed.items()}
    state["model.fc.0.weight"], state["model.fc.2.weight"] = torch.randn(512, 512), torch.randn(128, 512)
    state.update({f"model_k.{k}": v for k, v in renamed.items()})
    state["moco_queue"], state["moco_queue_ptr"] = torch.randn(4096, 128), torch.zeros(1, dtype=torch.long)
    path = tmp_path / "epoch=199.ckpt"
    torch.save({"epoch": 199, "global_step": 10, "pytorch-lightning_version": "1.0.0", "state_dict": state}, path)
    bb = load_backbone(path)
    assert (bb.source_format, bb.arch, bb.stem) == ("lightning", "resnet18", "cifar")
    _same_backbone(bb, cifar)


def test_plain_torchvision_resnet50(tmp_path):
    torch.manual_seed(3)
    state = torchvision.models.resnet50().state_dict()
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    bb = load_backbone(path)
    assert (bb.source_format, bb.arch, bb.stem) == ("torchvision", "resnet50", "imagenet")
    _same_backbone(bb, state)
    x = torch.randn(2, 3, 64, 64)
    reference = torchvision.models.resnet50()
    reference.load_state_dict(state)
    reference.fc = torch.nn.Identity()
    torch.testing.assert_close(bb.build_model()(x), reference.eval()(x))


def test_timm_checkpoint_of_a_non_resnet(tmp_path):
    import timm

    torch.manual_seed(4)
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10)
    path = tmp_path / "timm.pth.tar"
    torch.save(
        {"arch": "mobilenetv3_small_050", "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path
    )
    bb = load_backbone(path)
    assert (bb.source_format, bb.arch) == ("timm", "mobilenetv3_small_050")
    assert "classifier.weight" in bb.dropped_keys
    net = bb.build_model()
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, net.feature_dim)


def _to_detectron2(key: str) -> str:
    """Forward key map written independently of the adapter, for the round trip."""
    if key.startswith(("conv1.", "bn1.")):
        return "stem." + key.replace("bn1.", "conv1.norm.")
    stage, rest = re.match(r"layer(\d)\.(.*)", key).groups()
    rest = rest.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
    rest = re.sub(r"bn(\d)\.", r"conv\1.norm.", rest)
    return f"res{int(stage) + 1}.{rest}"


def test_detectron2_pickle(tmp_path, tv18):
    d2 = {
        _to_detectron2(k): v.numpy()
        for k, v in tv18.items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }
    path = tmp_path / "R-18.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": d2, "__author__": "MOCO", "matching_heuristics": True}, f)
    bb = load_backbone(path)
    assert (bb.source_format, bb.arch) == ("detectron2", "resnet18")
    _same_backbone(bb, {k: v for k, v in tv18.items()})


def test_strict_keys_missing_and_unexpected(tmp_path, tv18):
    missing = {k: v for k, v in tv18.items() if k != "layer4.1.conv2.weight"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(UserError, match=r"missing 1 backbone keys \[layer4.1.conv2.weight\]"):
        load_backbone(tmp_path / "missing.pth")
    extra = dict(tv18, **{"adapter.weight": torch.zeros(3)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(UserError, match=r"unexpected 1 keys that are not a known head \[adapter.weight\]"):
        load_backbone(tmp_path / "extra.pth")
    wrong_shape = dict(tv18, **{"layer1.0.conv1.weight": torch.zeros(1)})
    torch.save(wrong_shape, tmp_path / "shape.pth")
    with pytest.raises(UserError, match=r"wrong shape .*layer1.0.conv1.weight \(1,\) \(expected \(64, 64, 3, 3\)\)"):
        load_backbone(tmp_path / "shape.pth")  # refused when read, not in the model's load_state_dict


def test_unknown_layouts_are_refused(tmp_path, tv18):
    odd = {k: v for k, v in tv18.items() if not k.startswith("layer4.1.")}  # 2,2,2,1 blocks
    torch.save(odd, tmp_path / "odd.pth")
    with pytest.raises(UserError, match="cannot tell the architecture"):
        load_backbone(tmp_path / "odd.pth")
    torch.save({"weights": np.zeros(3).tolist()}, tmp_path / "nothing.pth")
    with pytest.raises(UserError, match="no tensors"):
        load_backbone(tmp_path / "nothing.pth")


@pytest.mark.parametrize("arch", list(RESNETS))
def test_every_resnet_layout_is_recognised(arch):
    """The layouts come from ``ringbench.resnets.RESNETS``: a plain torchvision state dict names its architecture."""
    with torch.device("meta"):  # keys and shapes only, no memory
        state = getattr(torchvision.models, arch)().state_dict()
    assert infer_resnet_arch(state, Path(f"{arch}.pth")) == arch


def test_card_with_unknown_arch(tmp_path):
    path = write_card(tmp_path / "c.pth")
    raw = torch.load(path, weights_only=True)
    raw["arch"] = "resnet9000"
    torch.save(raw, path)
    with pytest.raises(UserError, match="unknown architecture 'resnet9000'"):
        load_backbone(path)


@pytest.mark.parametrize("layout", ["fpn", "c4"])
def test_detectron2_whole_model_pickle(tmp_path, layout):
    """A trained Detectron2 model: the ResNet sits under backbone.bottom_up. (FPN) or backbone. with
    res5 in roi_heads. (C4), beside heads that are dropped."""
    torch.manual_seed(5)
    from transfer.d2.convert import torchvision_to_detectron2

    tv50 = torchvision.models.resnet50().state_dict()
    trunk = {k: v for k, v in tv50.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    model = {k: v.numpy() for k, v in torchvision_to_detectron2(trunk, layout).items()}
    model["proposal_generator.rpn_head.conv.weight"] = np.zeros((4, 4, 3, 3), np.float32)
    model["roi_heads.box_predictor.cls_score.weight"] = np.zeros((3, 8), np.float32)
    path = tmp_path / f"model_final_{layout}.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": model}, f)
    bb = load_backbone(path)
    assert (bb.source_format, bb.arch) == ("detectron2", "resnet50")
    _same_backbone(bb, tv50)
