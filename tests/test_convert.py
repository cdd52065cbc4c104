"""ringbench-convert: card <-> torchvision <-> Detectron2 .pkl (read back by the safe unpickler) <-> VISSL,
weights bit-equal through every hop; the card's meta survives the Detectron2 and VISSL files."""

from __future__ import annotations

import pickle

import pytest
import torch

from ringbench.card import load_card
from tests.foreign import build_foreign
from tests.helpers import resnet_state, write_card
from transfer.checkpoints import load_backbone
from transfer.convert import main


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_round_trip_through_every_format_is_bit_equal(tmp_path, capsys):
    card_path = write_card(tmp_path / "ring.pth", arch="resnet18", stem="cifar")
    original = load_card(card_path)
    chain = [("vissl", "a.torch"), ("detectron2", "b.pkl"), ("torchvision", "c.pth"), ("card", "d.pth")]
    src = card_path
    for to, name in chain:
        assert main([str(src), str(tmp_path / name), "--to", to]) == 0
        src = tmp_path / name
        assert _same_weights(load_backbone(src).state_dict, original.state_dict), to
    # the Detectron2 file is Detectron2's layout, and a pickle of NumPy arrays only
    with open(tmp_path / "b.pkl", "rb") as handle:
        d2 = pickle.load(handle)
    assert "stem.conv1.weight" in d2["model"] and "res5.1.conv2.norm.running_var" in d2["model"]
    assert torch.load(tmp_path / "a.torch", weights_only=True)["classy_state_dict"]["base_model"]["model"]["trunk"]
    # meta travels through VISSL and Detectron2 files (not through a bare torchvision state dict)
    for name in ("a.torch", "b.pkl"):
        back = tmp_path / f"back-{name}.pth"
        assert main([str(tmp_path / name), str(back), "--to", "card"]) == 0
        assert load_card(back).meta == original.meta and load_card(back).stem == "cifar"
    assert load_card(tmp_path / "d.pth").meta["normalisation"] == "assumed-imagenet"
    assert "wrote" in capsys.readouterr().out


def test_foreign_checkpoint_to_card_keeps_its_normalisation_method_and_name(tmp_path):
    obj, _ = build_foreign("simclr-v1", resnet_state("resnet18", seed=3))
    torch.save(obj, tmp_path / "simclr.pth")
    assert main([str(tmp_path / "simclr.pth"), str(tmp_path / "card.pth"), "--to", "card", "--from", "simclr-v1"]) == 0
    card = load_card(tmp_path / "card.pth")
    assert card.meta["mean"] == [0.0, 0.0, 0.0] and card.meta["std"] == [1.0, 1.0, 1.0]
    assert card.meta["method"] == "simclr-v1" and card.meta["source_name"] == "simclr"
    assert len(card.meta["source_sha256"]) == 64 and card.meta["image_size"] == 224


def test_cli_errors_are_one_line_and_leave_nothing(tmp_path, capsys):
    from ringbench.cli import run_main

    card_path = write_card(tmp_path / "ring.pth")
    assert run_main(main, [str(card_path), str(tmp_path / "x.pth"), "--to", "detectron2"]) == 2
    assert "name it *.pkl" in capsys.readouterr().err and not (tmp_path / "x.pth").exists()
    assert run_main(main, [str(card_path), str(card_path), "--to", "card", "--force"]) == 2
    assert run_main(main, [str(card_path), str(card_path), "--to", "card"]) == 2
    assert "exists" in capsys.readouterr().err
    assert run_main(main, [str(tmp_path / "none.pth"), str(tmp_path / "y.pth"), "--to", "card"]) == 2
    assert list(tmp_path.iterdir()) == [card_path]
    with pytest.raises(SystemExit):
        main(["--help"])
