"""Every foreign checkpoint format: built with its project's key names around a random torchvision
ResNet, it loads to the same features, bit-equal; foreign heads, missing keys and wrong shapes are
refused with the keys named. In the default suite on ResNet-18 (ResNet-50, one state shared, where
the project has bottlenecks only), checked in memory except for the files that need their own reader
(BYOL's pickle, DINO's argparse flags); every format on ResNet-50 files in the slow sweep."""

from __future__ import annotations

import functools
import pickle
from pathlib import Path

import pytest
import torch

from ringbench.errors import UserError
from tests.foreign import BOTTLENECK_ONLY, FORMATS, READ_AS, build_foreign, model_with, random_state, write_foreign
from transfer.checkpoints import SOURCE_FORMATS, Backbone, backbone_from_checkpoint, load_backbone

IN_MEMORY = [f for f in FORMATS if f != "byol"]


@functools.lru_cache(maxsize=2)
def _reference(arch: str) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(state, input, torchvision's features), once per session and arch (ResNet-50 shared by its tests)."""
    state = random_state(arch, seed=3)
    x = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return state, x, model_with(arch, dict(state))(x)


def _arch(fmt: str) -> str:
    return "resnet50" if fmt in BOTTLENECK_ONLY else "resnet18"


def _load(fmt: str, state: dict[str, torch.Tensor], extra: dict | None = None) -> Backbone:
    obj, kwargs = build_foreign(fmt, state, extra)
    return backbone_from_checkpoint(obj, Path(f"{fmt}.pth"), "0" * 64, **kwargs)


def _assert_same_features(fmt: str, backbone: Backbone, arch: str) -> None:
    state, x, expected = _reference(arch)
    assert backbone.source_format == READ_AS.get(fmt, fmt) and backbone.arch == arch
    assert backbone.state_dict.keys() == state.keys()
    assert all(torch.equal(backbone.state_dict[k], state[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(model_with(arch, backbone.state_dict)(x), expected)
    assert backbone.dropped_keys, "the project's heads are listed as dropped"


@pytest.mark.parametrize("fmt", IN_MEMORY)
def test_format_loads_to_the_same_features(fmt):
    state = _reference(_arch(fmt))[0]
    _assert_same_features(fmt, _load(fmt, state), _arch(fmt))


def test_byol_pickle_loads_to_the_same_features(tmp_path):
    """BYOL's Haiku pickle through the safe unpickler (protocol 4 here for speed; protocol 2, as BYOL writes
    it, in the slow sweep and on small arrays below)."""
    path, kwargs = write_foreign("byol", _reference("resnet18")[0], tmp_path, protocol=4)
    _assert_same_features("byol", load_backbone(path, **kwargs), "resnet18")


def test_protocol_2_pickles_and_argparse_flags_are_read(tmp_path):
    """Protocol 2 stores NumPy's bytes through _codecs.encode; DINO, PyContrast and MoCo files keep argparse flags."""
    import argparse

    import numpy as np

    from ringbench.card import load_checkpoint_file, load_numpy_pickle

    with open(tmp_path / "p2.pkl", "wb") as handle:
        pickle.dump({"experiment_state": 1, "w": np.arange(3, dtype=np.float32)}, handle, protocol=2)
    assert load_numpy_pickle(tmp_path / "p2.pkl", stand_ins=True)["w"].tolist() == [0.0, 1.0, 2.0]
    torch.save({"args": argparse.Namespace(arch="resnet50"), "teacher": {}}, tmp_path / "flags.pth")
    assert load_checkpoint_file(tmp_path / "flags.pth")["args"].arch == "resnet50"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_format_loads_resnet50_files_to_the_same_features(fmt, tmp_path):
    path, kwargs = write_foreign(fmt, _reference("resnet50")[0], tmp_path)
    _assert_same_features(fmt, load_backbone(path, **kwargs), "resnet50")


def test_every_format_cites_its_source():
    for name, rules in SOURCE_FORMATS.items():
        if name not in ("card", "lightning", "torchvision", "timm", "detectron2"):
            assert rules.source, name
    assert {READ_AS.get(f, f) for f in FORMATS} <= set(SOURCE_FORMATS)


def test_simclr_keeps_inputs_unnormalised_and_others_assume_imagenet():
    state = _reference("resnet18")[0]
    named = _load("simclr-v1", state)
    assert named.mean == (0.0, 0.0, 0.0) and named.std == (1.0, 1.0, 1.0)
    obj, _ = build_foreign("simclr-v1", state)
    plain = backbone_from_checkpoint(obj, Path("x.pth"), "0" * 64)  # without the name its keys are torchvision's
    assert plain.source_format == "torchvision" and plain.meta["normalisation"] == "assumed-imagenet"
    obj, _ = build_foreign("swav", state)
    with pytest.raises(UserError, match="not the 'simclr-v1'"):
        backbone_from_checkpoint(obj, Path("x.pth"), "0" * 64, source_format="simclr-v1")


def test_dino_reads_the_teacher_unless_told():
    state = _reference("resnet18")[0]
    obj, _ = build_foreign("dino", state)
    obj["student"] = dict(obj["student"], **{"module.backbone.conv1.weight": state["conv1.weight"] + 1})  # type: ignore[index]
    teacher = backbone_from_checkpoint(obj, Path("d.pth"), "0" * 64)
    assert torch.equal(teacher.state_dict["conv1.weight"], state["conv1.weight"]) and "student" in teacher.dropped_keys
    student = backbone_from_checkpoint(obj, Path("d.pth"), "0" * 64, dino_key="student")
    assert torch.equal(student.state_dict["conv1.weight"], state["conv1.weight"] + 1)


_FOREIGN_KEY = {"byol": "mystery/w"}


def _refusals(fmt: str, load) -> None:
    state = _reference(_arch(fmt))[0]
    with pytest.raises(UserError, match=r"not a known head.*mystery"):
        load(fmt, state, {_FOREIGN_KEY.get(fmt, "mystery_head.weight"): torch.ones(3)})
    gone = "layer4.1.bn2.weight" if _arch(fmt) == "resnet18" else "layer4.2.bn3.weight"
    with pytest.raises(UserError, match=rf"missing 1 backbone keys \[{gone}\]"):
        load(fmt, {k: v for k, v in state.items() if k != gone})
    with pytest.raises(UserError, match=r"wrong shape.*layer2\.0\.bn1\.running_var \(7,\)"):
        load(fmt, dict(state, **{"layer2.0.bn1.running_var": torch.ones(7)}))


@pytest.mark.parametrize("fmt", IN_MEMORY)
def test_foreign_head_missing_key_and_wrong_shape_are_refused(fmt):
    _refusals(fmt, _load)


@pytest.mark.slow
def test_byol_refusals_name_the_keys(tmp_path):
    def load(fmt, state, extra=None):
        return load_backbone(write_foreign(fmt, state, tmp_path, extra)[0])

    _refusals("byol", load)


def test_pickles_run_nothing(tmp_path):
    """A weights pickle naming any other global (os.system) is refused; BYOL's needs its online network."""
    import pickle

    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85q\x01Rq\x02.")
    with pytest.raises(UserError, match=r"os\.system is not allowed"):
        load_backbone(bad)
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(pickle.dumps({"experiment_state": {"online_params": 1}}))
    with pytest.raises(UserError, match="online_params"):
        load_backbone(empty)
