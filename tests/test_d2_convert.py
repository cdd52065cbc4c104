"""torchvision -> Detectron2 ResNet conversion: key rules, checked loading, equal features, MoCo checkpoints."""

from __future__ import annotations

import pytest
import torch

from ringbench.errors import UserError
from tests.helpers import resnet_state
from transfer.d2 import convert


def test_key_rules():
    assert convert.resnet_key("conv1.weight") == "stem.conv1.weight"
    assert convert.resnet_key("bn1.running_var") == "stem.conv1.norm.running_var"
    assert convert.resnet_key("layer1.0.conv2.weight") == "res2.0.conv2.weight"
    assert convert.resnet_key("layer3.5.bn3.bias") == "res4.5.conv3.norm.bias"
    assert convert.resnet_key("layer2.0.downsample.0.weight") == "res3.0.shortcut.weight"
    assert convert.resnet_key("layer4.0.downsample.1.running_mean") == "res5.0.shortcut.norm.running_mean"
    with pytest.raises(UserError, match=r"fc\.weight"):
        convert.resnet_key("fc.weight")
    assert convert.place("res5.0.conv1.weight", "c4") == "roi_heads.res5.0.conv1.weight"
    assert convert.place("res4.0.conv1.weight", "c4") == "backbone.res4.0.conv1.weight"
    assert convert.place("stem.conv1.weight", "fpn") == "backbone.bottom_up.stem.conv1.weight"


pytest.importorskip("detectron2", reason="Detectron2 is installed by `make setup`")

from transfer.d2.convert import detectron2_to_torchvision  # noqa: E402
from transfer.d2.modeling import build_resnet, check_conversion  # noqa: E402


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_round_trip_every_key_and_same_features(arch):
    import torchvision

    state = resnet_state(arch, "imagenet", seed=1)
    resnet = build_resnet(arch, "imagenet")
    loaded = convert.load_converted(resnet, convert.torchvision_to_detectron2(state))
    assert set(loaded) == set(resnet.state_dict())  # every Detectron2 key filled
    back = detectron2_to_torchvision(resnet.state_dict())
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    # Same weights, same computation: the torchvision trunk and Detectron2's res5 agree.
    ref = getattr(torchvision.models, arch)(weights=None)
    ref.load_state_dict(state, strict=False)
    ref.eval(), resnet.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        trunk = torch.nn.Sequential(
            ref.conv1, ref.bn1, ref.relu, ref.maxpool, ref.layer1, ref.layer2, ref.layer3, ref.layer4
        )
        torch.testing.assert_close(resnet(x)["res5"], trunk(x), rtol=1e-4, atol=1e-4)


def test_cifar_stem_card_converts():
    state = resnet_state("resnet18", "cifar")
    assert state["conv1.weight"].shape[-1] == 3
    keys = check_conversion("resnet18", "cifar", state)
    assert "stem.conv1.weight" in keys
    resnet = build_resnet("resnet18", "cifar")
    assert resnet.output_shape()["res2"].stride == 2  # the pretrained stride-1 conv, then one 2x pool
    with pytest.raises(UserError, match="shape mismatches"):  # a 3x3 stem is not a 7x7 one
        check_conversion("resnet18", "imagenet", state)


def test_unmatched_keys_are_listed():
    state = resnet_state("resnet18", "imagenet")
    missing = {k: v for k, v in state.items() if not k.startswith("layer4.1.")}
    with pytest.raises(UserError, match=r"not filled.*res5\.1\."):
        check_conversion("resnet18", "imagenet", missing, source="card.pth")
    extra = dict(state, **{"layer4.2.conv1.weight": torch.zeros(512, 512, 3, 3)})
    with pytest.raises(UserError, match=r"no place in the model.*res5\.2\.conv1\.weight"):
        check_conversion("resnet18", "imagenet", extra)
    with pytest.raises(UserError, match=r"not filled.*shape mismatches.*res2\.0\.conv1\.weight \(64, 64, 3, 3\)"):
        check_conversion("resnet50", "imagenet", state)  # a ResNet-18 card read as ResNet-50


def test_c4_layout_puts_res5_in_the_box_head():
    from transfer.d2.compat import d2
    from transfer.d2.modeling import add_ringbench_config, register

    D2 = d2()
    register()
    cfg = D2.config.get_cfg()
    add_ringbench_config(cfg)
    cfg.merge_from_file(str(__import__("transfer.d2.train", fromlist=["x"]).config_path("voc_det.yaml")))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    model = D2.modeling.build_model(cfg)
    state = resnet_state("resnet50", "imagenet")
    loaded = convert.load_converted(model, convert.torchvision_to_detectron2(state, "c4"))
    assert "roi_heads.res5.2.conv3.weight" in loaded and "backbone.res4.5.conv3.weight" in loaded
    norm_after_res5 = [k for k in model.state_dict() if k.startswith("roi_heads.res5.3.")]
    assert norm_after_res5 and not set(norm_after_res5) & set(loaded)  # the extra norm is a head


def test_moco_checkpoint_converts(tmp_path):
    from transfer.checkpoints import load_backbone

    state = resnet_state("resnet50", "imagenet", seed=3)
    moco = {f"module.encoder_q.{k}": v for k, v in state.items()}
    moco["module.encoder_q.fc.0.weight"] = torch.zeros(2048, 2048)
    moco["module.encoder_q.fc.2.weight"] = torch.zeros(128, 2048)
    moco.update({f"module.encoder_k.{k}": v for k, v in state.items()})
    moco["module.queue"] = torch.zeros(128, 16)
    torch.save({"epoch": 200, "arch": "resnet50", "state_dict": moco}, tmp_path / "moco_v2_200ep.pth.tar")
    backbone = load_backbone(tmp_path / "moco_v2_200ep.pth.tar")
    assert backbone.source_format == "moco" and backbone.arch == "resnet50"
    keys = check_conversion(backbone.arch, backbone.stem, backbone.state_dict)
    resnet = build_resnet("resnet50", "imagenet")
    convert.load_converted(resnet, convert.torchvision_to_detectron2(backbone.state_dict))
    assert len(keys) == len(resnet.state_dict())
    torch.testing.assert_close(resnet.state_dict()["res5.2.conv3.weight"], state["layer4.2.conv3.weight"])
