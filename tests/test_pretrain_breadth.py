"""CMC (Lab two-stream) and SimCLR (NT-Xent, ring, HCL, DCL): steps, colour conversion, cards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import pretrain.train as trainer
from pretrain.config import load_config
from pretrain.losses import hcl_loss, in_batch_ring_loss, nt_xent_loss
from ringbench.backbones import TwoStreamBackbone, rgb_to_lab, scaled_resnet
from ringbench.card import load_card
from tests.test_pretrain_methods import _views, one_thread, tiny_method  # noqa: F401  (autouse fixture)
from tests.test_pretrain_train import TINY_RUN

REPO = Path(__file__).resolve().parents[1]


def test_lab_conversion_matches_scikit_image():
    from skimage.color import rgb2lab

    rgb = torch.rand(3, 3, 7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rgb[0, :, 0, 0] = 0.0  # black and white corners: both branches of the gamma and of f(t)
    rgb[0, :, 0, 1] = 1.0
    rgb[1, :, 2, 2] = 0.02
    want = np.stack([rgb2lab(img.permute(1, 2, 0).numpy()) for img in rgb])
    got = rgb_to_lab(rgb).permute(0, 2, 3, 1).numpy()
    assert np.allclose(got, want, atol=1e-6)


def test_half_width_streams_keep_torchvision_keys():
    from ringbench.backbones import backbone_keys

    model = scaled_resnet("resnet18", "cifar", in_channels=2, width=0.5)
    assert set(model.state_dict()) == backbone_keys("resnet18", "cifar")
    assert model.conv1.weight.shape == (32, 2, 3, 3) and model.layer4[1].conv2.weight.shape == (256, 256, 3, 3)
    assert model(torch.zeros(2, 2, 16, 16)).shape == (2, 256) and model.feature_dim == 256


def test_two_stream_model_takes_normalised_rgb():
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    model = TwoStreamBackbone("resnet18", "cifar", mean, std, width=0.25).eval()
    rgb = torch.rand(2, 3, 8, 8)
    l_view, ab_view = model.views((rgb - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    lab = rgb_to_lab(rgb)
    assert torch.allclose(l_view[:, 0], (lab[:, 0] - 50) / 50, atol=1e-4)
    assert ab_view.shape == (2, 2, 8, 8) and ab_view.abs().max() <= 1.0 + 1e-4
    assert model(torch.zeros(2, 3, 8, 8)).shape == (2, model.feature_dim) and model.feature_dim == 256


@pytest.mark.parametrize("loss", ["nce", "ring"])
def test_cmc_step_updates_both_banks(loss):
    method = tiny_method(
        "method=cmc", f"loss.name={loss}", "loss.num_samples=6", "cmc.num_negatives=16", "cmc.width=0.25"
    )
    banks = method.bank_l.memory.clone(), method.bank_ab.memory.clone()
    index = torch.tensor([0, 5, 9, 13, 17, 21, 30, 39])
    out, logs = method.training_step(_views(1), index)
    assert torch.isfinite(out) and logs["loss"] == pytest.approx(logs["loss_l"] + logs["loss_ab"], rel=1e-5)
    out.backward()
    assert method.backbone.l.conv1.weight.grad is not None and method.backbone.ab.conv1.weight.grad is not None
    for bank, before in zip((method.bank_l, method.bank_ab), banks):
        assert not torch.allclose(bank.memory[index], before[index])
        rest = torch.ones(40, dtype=torch.bool)
        rest[index] = False
        assert torch.equal(bank.memory[rest], before[rest])


@pytest.mark.parametrize("loss", ["ntxent", "ring", "hcl", "dcl"])
def test_simclr_step(loss):
    method = tiny_method("method=simclr", f"loss.name={loss}", "loss.t=0.5", "simclr.hidden_dim=64")
    views = _views(2)
    out, _ = method.training_step(views, torch.arange(8))
    assert torch.isfinite(out)
    out.backward()
    assert all(p.grad is not None for p in method.encoder.parameters())
    with torch.no_grad():
        z1, z2 = method.encoder(views[0]), method.encoder(views[1])
    if loss == "ntxent":
        assert out.item() == pytest.approx(nt_xent_loss(z1, z2, 0.5).item(), rel=1e-4)
    if loss == "ring":  # the method's ring is the in-batch ring
        assert out.item() == pytest.approx(in_batch_ring_loss(z1, z2, 0.5, 0.5, 0.25).item(), rel=1e-4)


def test_hcl_beta_anneal():
    method = tiny_method("method=simclr", "loss.name=hcl", "loss.beta=2.0", "loss.beta_anneal_epochs=10")
    method.set_epoch(5)
    assert method.beta == pytest.approx(1.0)
    method.set_epoch(12)
    assert method.beta == 0.0
    z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    assert hcl_loss(z1, z2, 0.5, 0.0, method.beta).item() == pytest.approx(nt_xent_loss(z1, z2, 0.5).item(), rel=1e-6)


@pytest.mark.parametrize("name", ["cmc", "cmc_ring", "simclr", "simclr_ring", "simclr_hcl", "simclr_dcl"])
def test_breadth_configs(name):
    cfg = load_config(REPO / "configs" / "pretrain" / f"{name}.yaml")
    assert cfg["method"] == name.split("_")[0]
    if name.startswith("simclr"):
        assert (cfg["optim"]["name"], cfg["optim"]["lr"], cfg["optim"]["weight_decay"]) == ("adam", 1e-3, 1e-6)
        assert cfg["loss"]["t"] == 0.5 and cfg["simclr"]["head_dim"] == 128 and cfg["train"]["batch_size"] == 256
    if name == "simclr_hcl":
        assert (cfg["loss"]["tau_plus"], cfg["loss"]["beta"]) == (0.1, 1.0)
    if name.startswith("cmc"):
        assert cfg["cmc"]["width"] == 0.5 and cfg["data"]["color_jitter"] == 0.0


@pytest.mark.parametrize(("name", "grayscale"), [("simclr_dcl", 0.2), ("moco_ring", 0.2), ("cmc_ring", 0.0)])
def test_demo_profile_keeps_each_methods_grayscale(name, grayscale):
    """The demo profile must not switch random grayscale off: with it off, uniform in-batch
    negatives learn each image's background colour (NT-Xent and DCL fell below a random network),
    while CMC's own config keeps it off because its ab view is colour."""
    cfg = load_config(REPO / "configs" / "pretrain" / f"{name}.yaml", profile="demo")
    assert cfg["data"]["grayscale"] == grayscale and cfg["data"]["jitter_hue"] == 0.0


def test_cmc_card_is_two_stream_and_loads_in_transfer(tmp_path: Path):
    cfg = load_config(
        None,
        [
            *TINY_RUN,
            "method=cmc",
            "loss.name=ring",
            "loss.num_samples=4",
            "cmc.num_negatives=8",
            "cmc.width=0.25",
            "train.epochs=1",
            "knn.enabled=false",
        ],
    )
    result = trainer.train(cfg, tmp_path / "cmc.pth", tmp_path / "w", progress=False)
    card = load_card(result.card_path)
    assert card.streams == ("l", "ab") and card.meta["stream_width"] == 0.25 and card.meta["method"] == "cmc"
    assert {k.split(".")[0] for k in card.state_dict} == {"l", "ab"}
    assert card.state_dict["l.conv1.weight"].shape[1] == 1 and card.state_dict["ab.conv1.weight"].shape[1] == 2
    from transfer.checkpoints import load_backbone

    model = load_backbone(result.card_path).build_model()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = torch.cat(result.method.eval().backbone.encode(x), dim=1)
        assert torch.allclose(model(x), want, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cmc", "cmc_ring", "simclr", "simclr_ring", "simclr_hcl", "simclr_dcl"])
def test_breadth_methods_beat_random_init(name, tmp_path: Path):
    """A few epochs of each method on synthetic shapes beat the same model randomly initialised
    (kNN monitor; ImageNet stem to keep it to about three minutes per method on 2 CPU cores)."""
    from tests.test_pretrain_train import _knn_gain

    cfg = load_config(
        REPO / "configs" / "pretrain" / f"{name}.yaml",
        [
            "stem=imagenet",
            "data.synthetic_images_per_class=20",
            "train.epochs=16",
            "knn.every=1000",
            "knn.max_test=320",
        ],
        profile="demo",
    )
    trained, random_best = _knn_gain(cfg, tmp_path)
    assert trained > random_best + 3, (trained, random_best)
