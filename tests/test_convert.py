"""ringbench-convert: card -> VISSL -> Detectron2 .pkl (read back by the safe unpickler) -> torchvision -> card,
weights bit-equal; the card's meta survives the Detectron2 and VISSL files; a foreign file's card keeps its source."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ringbench.card import BackboneCard, load_card, make_meta, save_card
from ringbench.cli import run_main
from tests.foreign import build_foreign, random_state
from transfer.checkpoints import load_backbone
from transfer.convert import card_of, main


def _card(path: Path) -> Path:
    meta = make_meta(
        method="moco", loss="ring", dataset="synthetic", image_size=32, mean=[0.5, 0.4, 0.3], std=[0.2] * 3
    )
    return save_card(BackboneCard("resnet18", random_state("resnet18", "cifar"), "cifar", meta), path)


def test_round_trip_through_every_format_is_bit_equal(tmp_path, capsys):
    original = load_card(_card(tmp_path / "ring.pth"))
    src = tmp_path / "ring.pth"
    for to, name in [("vissl", "a.torch"), ("detectron2", "b.pkl"), ("torchvision", "c.pth"), ("card", "d.pth")]:
        assert main([str(src), str(tmp_path / name), "--to", to]) == 0
        src = tmp_path / name
    final = load_card(src)
    assert final.state_dict.keys() == original.state_dict.keys()
    assert all(
        torch.equal(final.state_dict[k], v) and final.state_dict[k].dtype == v.dtype
        for k, v in original.state_dict.items()
    )
    assert final.meta["normalisation"] == "assumed-imagenet", "a bare torchvision state dict carries no meta"
    # the Detectron2 file (read by the safe unpickler) carries the card's meta, which it had from the VISSL file
    d2 = load_backbone(tmp_path / "b.pkl")
    assert d2.source_format == "detectron2" and card_of(d2).meta == original.meta and d2.stem == "cifar"
    assert "wrote" in capsys.readouterr().out


def test_foreign_checkpoint_to_card_keeps_its_normalisation_method_and_name(tmp_path):
    obj, _ = build_foreign("simclr-v1", random_state("resnet18"))
    torch.save(obj, tmp_path / "simclr.pth")
    assert main([str(tmp_path / "simclr.pth"), str(tmp_path / "card.pth"), "--to", "card", "--from", "simclr-v1"]) == 0
    card = load_card(tmp_path / "card.pth")
    assert card.meta["mean"] == [0.0, 0.0, 0.0] and card.meta["std"] == [1.0, 1.0, 1.0]
    assert card.meta["method"] == "simclr-v1" and card.meta["source_name"] == "simclr"
    assert len(card.meta["source_sha256"]) == 64 and card.meta["image_size"] == 224


def test_cli_errors_are_one_line_and_leave_nothing(tmp_path, capsys):
    card_path = tmp_path / "ring.pth"
    card_path.write_bytes(b"not read")
    assert run_main(main, [str(card_path), str(tmp_path / "x.pth"), "--to", "detectron2"]) == 2
    assert "name it *.pkl" in capsys.readouterr().err
    assert run_main(main, [str(card_path), str(card_path), "--to", "card", "--force"]) == 2
    assert run_main(main, [str(card_path), str(card_path), "--to", "card"]) == 2
    assert "exists" in capsys.readouterr().err
    assert run_main(main, [str(tmp_path / "none.pth"), str(tmp_path / "y.pth"), "--to", "card"]) == 2
    assert run_main(main, [str(card_path), str(tmp_path / "y.pth"), "--to", "card"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 2
    assert list(tmp_path.iterdir()) == [card_path]
    with pytest.raises(SystemExit):
        main(["--help"])
