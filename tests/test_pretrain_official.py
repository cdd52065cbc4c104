"""The official recipes (configs/pretrain/official/): every resolved value against the official code's.

The official values are written here with the file they come from; each test maps them to our keys
(e.g. the ring code's ``k = 4096`` with ``self_negative`` -> ``k - 1 = 4095`` drawn negatives).
Sources: the ring paper's code, github.com/mhw32/contrastive-ring-public (RING); HCL's code,
github.com/joshr17/HCL (HCL); CMC's code, github.com/HobbitLong/CMC (CMC).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision import transforms as T

from pretrain.config import load_config
from pretrain.data.transforms import moco_v2_augmentation, ring_official_augmentation
from pretrain.losses import ring_bounds
from pretrain.methods import build_method
from pretrain.methods.simclr import hcl_beta
from pretrain.train import learning_rate
from ringbench.config import find_config
from ringbench.ring_schedules import official_ring_threshold
from tests.helpers import REPO

OFFICIAL = REPO / "configs" / "pretrain" / "official"
DATASETS = ("cifar10", "cifar100", "stl10")

# RING config/pretrain/nce/nce.json, nce_ring.json, mocov2/moco.json, moco_ring.json (the values used).
RING_JSON = {
    "nce": {"k": 4096, "t": 0.07, "m": 0},
    "nce_ring": {"k": 4096, "t": 0.07, "m": 0, "thres_outer": 0.1, "thres_inner": 0.1, "max_anneal_epoch": 100},
    "moco": {"k": 4096, "t": 0.07, "m": 0.999},
    "moco_ring": {"k": 65536, "t": 0.07, "m": 0.999, "thres_outer": 0.1, "thres_inner": 0.1, "max_anneal_epoch": 100},
}
RING_SHARED = {  # the same in all four JSON files
    "seed": 1337,
    "out_dim": 128,
    "batch_size": 256,
    "learning_rate": 0.03,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "num_epochs": 200,
}
RING_CODE = {
    "lr_schedule": (0.68, 0.83),  # scripts/run.py: schedule=(int(0.68*E), int(0.83*E)), x0.1 at epoch >= each
    "init_thres": 1.0,  # src/systems/systems.py: the annealing policies start at 1.0
    "resnet_version": "resnet18",  # src/systems/systems.py create_encoder default; conv3x3 off (ImageNet stem)
    "crop": 224,  # src/datasets/datasets.py load_default_transforms: RandomResizedCrop(224, scale=(0.2, 1.))
    "crop_scale_min": 0.2,
    "normalise": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    "stl10_split": "train",  # src/datasets/stl10.py: split='train' if train
}
# HCL image/main.py argparse defaults and body; image/utils.py train_transform; image/model.py.
HCL = {
    "temperature": 0.5,
    "tau_plus": 0.1,
    "beta": 1.0,
    "batch_size": 256,
    "epochs": 400,
    "feature_dim": 128,
    "k": 200,
    "lr": 1e-3,
    "weight_decay": 1e-6,
    "n_steps": 9,
    "hidden": 512,
    "arch": "resnet50",
    "crop": 32,
    "crop_scale_min": 0.08,  # RandomResizedCrop(32): torchvision's default scale
    "mean": [0.4914, 0.4822, 0.4465],
    "std": [0.2023, 0.1994, 0.2010],
    "stl10_split": "train+unlabeled",
}
# CMC train_CMC.py argparse defaults, with README.md's ResNet command (--batch_size 128 --nce_k 16384 --softmax).
CMC = {
    "batch_size": 128,
    "epochs": 240,
    "learning_rate": 0.03,
    "lr_decay_epochs": (120, 160, 200),
    "lr_decay_rate": 0.1,
    "weight_decay": 1e-4,
    "momentum": 0.9,
    "nce_k": 16384,
    "nce_t": 0.07,
    "nce_m": 0.5,
    "feat_dim": 128,
    "crop_low": 0.2,
    "crop": 224,
    "stream_width": 0.5,  # models/resnet.py ResNetV1 (resnet18v1)
}


def _load(name: str) -> dict:
    return load_config(OFFICIAL / f"{name}.yaml", ["data.root=unused"])


def _flat(cfg: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _ring_expected(kind: str, ring: bool, dataset: str) -> dict:
    j, s, c = RING_JSON[kind + ("_ring" if ring else "")], RING_SHARED, RING_CODE
    want = {
        "arch": c["resnet_version"],
        "stem": "imagenet",
        "data.name": dataset,
        "data.image_size": c["crop"],
        "data.augmentation": "ring_official",
        "data.crop_scale_min": c["crop_scale_min"],
        "data.mean": c["normalise"][0],
        "data.std": c["normalise"][1],
        "loss.name": "ring" if ring else "nce",
        "loss.t": j["t"],
        "optim.name": "sgd",
        "optim.lr": s["learning_rate"],
        "optim.momentum": s["momentum"],
        "optim.weight_decay": s["weight_decay"],
        "optim.schedule": "step",
        "optim.milestones": list(c["lr_schedule"]),
        "optim.gamma": 0.1,
        "optim.milestone_rounding": "int",
        "train.epochs": s["num_epochs"],
        "train.batch_size": s["batch_size"],
        "train.seed": s["seed"],
        "train.amp": False,
    }
    if dataset == "stl10":
        want["data.stl10_split"] = c["stl10_split"]
    if ring:
        want.update(
            {
                "loss.w_outer": j["thres_outer"],
                "loss.w_inner": j["thres_inner"],
                "loss.schedule": "constant",  # every *_anneal flag is false
                "loss.w_outer_start": c["init_thres"],
                "loss.anneal_epochs": j["max_anneal_epoch"],
                "loss.rounding": "int",
                "loss.schedule_style": "official",
            }
        )
    if kind == "nce":
        want.update(
            {
                "method": "ir",
                "ir.bank_momentum": j["m"],
                "ir.num_negatives": j["k"] - 1,  # self_negative: k - 1 draws plus the positive
                "ir.head_dim": s["out_dim"],
                "ir.mlp": True,  # CustomResNet: l1 -> ReLU -> l2 always
                "ir.shared_negatives": False,  # randint(0, N, (batch_size, k - 1))
            }
        )
        if ring:
            want["loss.num_samples"] = j["k"] - 1
    else:
        want.update(
            {
                "method": "moco",
                "moco.momentum": j["m"],
                "moco.queue_size": j["k"],
                "moco.cap_queue": False,
                "moco.head_dim": s["out_dim"],
                "moco.mlp": True,
                "moco.shuffle_groups": 1,  # shuffle_bn: one randperm over the batch, one BN batch
            }
        )
    return want


CASES = [
    (f"{kind}{'_ring' if ring else ''}_{ds}", kind, ring, ds)
    for kind in ("nce", "moco")
    for ring in (0, 1)
    for ds in DATASETS
]


@pytest.mark.parametrize("name,kind,ring,dataset", CASES)
def test_ring_code_recipes_value_for_value(name, kind, ring, dataset):
    name = name.replace("nce", "ir")
    got = _flat(_load(name))
    want = _ring_expected(kind, bool(ring), dataset)
    assert {k: got[k] for k in want} == want


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("ring", [False, True])
def test_cmc_recipes_value_for_value(dataset, ring):
    got = _flat(_load(f"cmc{'_ring' if ring else ''}_{dataset}"))
    want = {
        "method": "cmc",
        "arch": "resnet18",
        "stem": "imagenet",
        "data.image_size": CMC["crop"],
        "data.crop_scale_min": CMC["crop_low"],
        "data.color_jitter": 0.0,
        "data.grayscale": 0.0,
        "data.blur": False,
        "loss.name": "ring" if ring else "nce",
        "loss.t": CMC["nce_t"],
        "cmc.width": CMC["stream_width"],
        "cmc.bank_momentum": CMC["nce_m"],
        "cmc.num_negatives": CMC["nce_k"],
        "cmc.head_dim": CMC["feat_dim"],
        "cmc.shared_negatives": False,  # NCEAverage: multinomial.draw(batchSize * (K + 1))
        "optim.lr": CMC["learning_rate"],
        "optim.momentum": CMC["momentum"],
        "optim.weight_decay": CMC["weight_decay"],
        "optim.gamma": CMC["lr_decay_rate"],
        "train.epochs": CMC["epochs"],
        "train.batch_size": CMC["batch_size"],
        "train.amp": False,
    }
    if ring:
        ring_json = RING_JSON["nce_ring"]
        want.update({"loss.w_outer": ring_json["thres_outer"], "loss.w_inner": ring_json["thres_inner"]})
        want.update({"loss.num_samples": CMC["nce_k"], "loss.rounding": "int", "loss.schedule_style": "official"})
    assert {k: got[k] for k in want} == want
    cfg = _load(f"cmc_{dataset}")
    for epoch in range(cfg["train"]["epochs"]):  # util.adjust_learning_rate: 1-based epoch > each decay epoch
        steps = int(np.sum(epoch + 1 > np.asarray(CMC["lr_decay_epochs"])))
        assert learning_rate(cfg, epoch) == pytest.approx(CMC["learning_rate"] * CMC["lr_decay_rate"] ** steps)


HCL_LOSSES = {
    "simclr": {"loss.name": "ntxent"},  # --estimator easy: Ng = sum(neg)
    "simclr_dcl": {"loss.name": "dcl", "loss.tau_plus": HCL["tau_plus"]},  # beta = 0
    "simclr_hcl": {"loss.name": "hcl", "loss.tau_plus": HCL["tau_plus"], "loss.beta": HCL["beta"]},
    "simclr_hcl_anneal": {
        "loss.name": "hcl",
        "loss.beta": HCL["beta"],
        "loss.beta_anneal_epochs": HCL["epochs"],
        "loss.beta_anneal_steps": HCL["n_steps"],
    },
}


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("recipe", sorted(HCL_LOSSES))
def test_hcl_recipes_value_for_value(recipe, dataset):
    got = _flat(_load(f"{recipe}_{dataset}"))
    want = {
        "method": "simclr",
        "arch": HCL["arch"],
        "stem": "cifar",  # model.py: conv1 3x3 stride 1, no max-pool
        "data.name": dataset,
        "data.image_size": HCL["crop"],
        "data.augmentation": "mocov2",
        "data.crop_scale_min": HCL["crop_scale_min"],
        "data.color_jitter": 0.8,
        "data.jitter_hue": 0.1,
        "data.grayscale": 0.2,
        "data.blur": True,
        "data.mean": HCL["mean"],
        "data.std": HCL["std"],
        "loss.t": HCL["temperature"],
        "simclr.head_dim": HCL["feature_dim"],
        "simclr.hidden_dim": HCL["hidden"],
        "optim.name": "adam",
        "optim.lr": HCL["lr"],
        "optim.weight_decay": HCL["weight_decay"],
        "optim.schedule": "constant",
        "train.epochs": HCL["epochs"],
        "train.batch_size": HCL["batch_size"],
        "train.amp": False,
        "knn.k": HCL["k"],
        "knn.t": HCL["temperature"],
        **HCL_LOSSES[recipe],
    }
    if dataset == "stl10":
        want["data.stl10_split"] = HCL["stl10_split"]
    assert {k: got[k] for k in want} == want


def test_every_official_file_is_tested_and_names_its_source():
    tested = {c[0].replace("nce", "ir") for c in CASES}
    tested |= {f"cmc{r}_{d}" for r in ("", "_ring") for d in DATASETS}
    tested |= {f"{r}_{d}" for r in HCL_LOSSES for d in DATASETS}
    files = {p.stem: p.read_text() for p in OFFICIAL.glob("*.yaml")}
    assert set(files) == tested
    for text in files.values():
        assert "Reproduces " in text and any(repo in text for repo in ("contrastive-ring-public", "HCL", "CMC"))


def test_official_configs_are_found_by_name():
    assert find_config("official/moco_ring_cifar10", "pretrain") == OFFICIAL / "moco_ring_cifar10.yaml"


def test_official_lr_milestones_round_down():
    """scripts/run.py drops at int(0.68 E), int(0.83 E); at E = 150, 0.68 E = 102.00000000000001."""
    official = _load("moco_cifar10")
    for epochs in (200, 150, 7):
        cfg = {**official, "train": {**official["train"], "epochs": epochs}}
        for epoch in range(epochs):
            lr = 0.03 * 0.1 ** sum(epoch >= m for m in (int(0.68 * epochs), int(0.83 * epochs)))
            assert learning_rate(cfg, epoch) == pytest.approx(lr)
    ours = load_config("moco", ["train.epochs=150"])
    assert learning_rate(ours, 102) == pytest.approx(0.03)  # ours: epoch >= 0.68 E
    assert learning_rate({**ours, "train": {**ours["train"], "epochs": 150}}, 103) == pytest.approx(0.003)


def test_ring_bounds_int_rounding_is_the_official_one():
    # instdisc.py / moco.py: outer = int(thres_outer * K), inner = int(thres_inner * outer)
    assert ring_bounds(100, 0.29, 0.1, "int") == (int(0.1 * int(0.29 * 100)), int(0.29 * 100)) == (2, 28)
    assert ring_bounds(100, 0.29, 0.1) == (2, 29)  # ours: floor(w K + 1e-9)
    assert ring_bounds(65536, 0.1, 0.1, "int") == ring_bounds(65536, 0.1, 0.1) == (655, 6553)


def test_official_annealing_policies():
    """src/utils/policy.py, per iteration over S = int(max_anneal_epoch * int(N / B)) iterations."""
    s = 1000
    linear = [official_ring_threshold(i, "linear", 0.1, 1.0, s) for i in (0, 1, s - 1, s, 5 * s)]
    assert linear == pytest.approx([1.0, 1.0 - 0.9 / (s - 1), 0.1, 0.1, 0.1])
    step = [official_ring_threshold(i, "step", 0.1, 1.0, s) for i in (0, 99, 100, 899, 900, 999, s)]
    assert step == pytest.approx([1.0, 1.0, 0.9, 0.2, 0.1, 0.1, 0.1])  # 10 levels of int(1000 / 10) steps
    assert official_ring_threshold(10, "exponential", 0.1, 1.0, s) == pytest.approx(0.9 * math.exp(-1.0) + 0.1)
    assert official_ring_threshold(3, "constant", 0.1, 1.0, s) == 0.1


def test_official_annealing_runs_per_iteration_in_the_method():
    cfg = load_config(
        None,
        [
            *("method=ir", "loss.name=ring", "loss.schedule=linear", "loss.schedule_style=official"),
            *("loss.anneal_epochs=2", "train.batch_size=8", "ir.num_negatives=16", "ir.head_dim=8"),
        ],
    )
    method = build_method(cfg, 40, "cifar")  # int(40 / 8) = 5 iterations an epoch, anneal over 10
    method.set_epoch(1)
    seen = []
    views = [torch.randn(8, 3, 8, 8)]
    for step in range(3):
        method(views, torch.arange(8) + 8 * step)
        seen.append(method.w_outer)
    assert seen == pytest.approx([official_ring_threshold(5 + i, "linear", 0.1, 1.0, 10) for i in range(3)])


def test_hcl_beta_steps():
    """image/main.py: betas = iter(linspace(beta, 0, 9)); after each epoch % int(400 / 9) == 0, beta = next(betas)."""
    beta, epochs, steps = 1.0, 400, 9
    betas, current, official = iter(np.linspace(beta, 0, steps)), beta, []
    for epoch in range(1, epochs + 1):
        official.append(current)
        if epoch % int(epochs / steps) == 0:
            current = next(betas)
    assert [hcl_beta(e, beta, epochs, steps) for e in range(epochs)] == pytest.approx(official)
    assert hcl_beta(50, 1.0, 100) == pytest.approx(0.5)  # ours: linear per epoch


def test_official_transforms():
    aug = ring_official_augmentation(224, *RING_CODE["normalise"])
    kinds = [type(t) for t in aug.transforms]
    assert kinds == [
        T.RandomResizedCrop,
        T.RandomGrayscale,
        T.ColorJitter,
        T.RandomHorizontalFlip,
        T.ToTensor,
        T.Normalize,
    ]
    crop, gray, jitter = aug.transforms[:3]
    assert crop.size == (224, 224) and crop.scale == (0.2, 1.0) and gray.p == 0.2
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == (
        (0.6, 1.4),
        (0.6, 1.4),
        (0.6, 1.4),
        (-0.4, 0.4),
    )
    hcl = moco_v2_augmentation(32, HCL["mean"], HCL["std"], True, 0.1, 0.2, 0.8, HCL["crop_scale_min"])
    assert hcl.transforms[0].scale == (0.08, 1.0)
    blur = next(t.transforms[0] for t in hcl.transforms if isinstance(t, T.RandomApply) and t.p == 0.5)
    assert blur.kernel_size == (3, 3)  # utils.py: GaussianBlur(kernel_size=int(0.1 * 32))


def test_official_methods_build_as_the_official_models():
    ir = build_method(_load("ir_cifar10"), 100, "imagenet")
    assert [type(m) for m in ir.encoder.head] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]
    assert ir.encoder.head[0].weight.shape == (512, 512) and ir.encoder.head[2].weight.shape == (128, 512)
    assert ir.bank.momentum == 0.0 and ir.num_negatives == 4095
    assert ir.bank.sample(4095, torch.Generator().manual_seed(0), anchors=3).shape == (3, 4095, 128)
    moco = build_method(_load("moco_ring_cifar10"), 1000, "imagenet")
    assert len(moco.queue) == 65536  # not capped at half of the 1,000 images
    assert isinstance(moco.encoder.backbone.maxpool, torch.nn.MaxPool2d)  # the ImageNet stem
