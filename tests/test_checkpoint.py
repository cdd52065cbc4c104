"""The backbone card: round trip, validation, and every bad file giving a clear error."""

from __future__ import annotations

import pickle

import pytest
import torch

from ringbench.card import FORMAT, BackboneCard, load_card, load_checkpoint_file, make_meta, save_card
from ringbench.errors import UserError
from tests.helpers import resnet_state, write_card


def test_card_round_trip_is_weights_only_loadable(tmp_path):
    path = write_card(tmp_path / "c.pth", arch="resnet18", stem="cifar")
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT and raw["arch"] == "resnet18" and raw["stem"] == "cifar"
    card = load_card(path)
    ref = resnet_state("resnet18", "cifar")
    assert card.state_dict.keys() == ref.keys()
    assert all(torch.equal(card.state_dict[k], ref[k]) for k in ref)
    assert card.mean == (0.5, 0.4, 0.3) and card.meta["code_version"]
    assert not list(tmp_path.glob(".*tmp")), "no temporary file left behind"


def test_newer_format_is_refused(tmp_path):
    path = write_card(tmp_path / "c.pth")
    raw = torch.load(path, weights_only=True)
    raw["format"] = "ringbench-backbone/99"
    torch.save(raw, path)
    with pytest.raises(UserError, match="newer"):
        load_card(path)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(stem="weird"), "stem"),
        (lambda d: d["meta"].pop("mean"), "missing"),
        (lambda d: d["state_dict"].update({"fc.weight": torch.zeros(2, 2)}), "classifier"),
        (lambda d: d.update(state_dict={}), "state_dict"),
        (lambda d: d["meta"].update(std=[1, 0, 1]), "positive"),
    ],
)
def test_invalid_cards_are_refused_on_save(mutate, message, tmp_path):
    card = BackboneCard(
        "resnet18",
        resnet_state(),
        "imagenet",
        make_meta(method="moco", loss="nce", dataset="x", image_size=224, mean=[0.5] * 3, std=[0.2] * 3),
    )
    data = card.to_dict()
    mutate(data)
    bad = BackboneCard(data["arch"], data["state_dict"], data["stem"], data["meta"])
    with pytest.raises(UserError, match=message):
        save_card(bad, tmp_path / "bad.pth")
    assert not (tmp_path / "bad.pth").exists()


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_checkpoint_file(tmp_path / "missing.pth")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        load_checkpoint_file(empty)
    text = tmp_path / "notes.pth"
    text.write_text("this is not a checkpoint\n")
    with pytest.raises(UserError, match="not a PyTorch checkpoint"):
        load_checkpoint_file(text)
    good = write_card(tmp_path / "c.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(UserError, match="truncated"):
        load_checkpoint_file(truncated)


class _Evil:
    def __reduce__(self):
        return (print, ("executed",))


def test_pickle_refused_by_weights_only(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "payload": _Evil()}, path)
    with pytest.raises(UserError, match="weights_only"):
        load_checkpoint_file(path)


def test_detectron2_pickle_allows_arrays_only(tmp_path):
    import numpy as np

    good = tmp_path / "model.pkl"
    with open(good, "wb") as f:
        pickle.dump({"model": {"stem.conv1.weight": np.ones((2, 3, 7, 7), np.float32)}, "__author__": "x"}, f)
    data = load_checkpoint_file(good)
    assert data["__detectron2__"] and data["state_dict"]["stem.conv1.weight"].shape == (2, 3, 7, 7)
    evil = tmp_path / "evil.pkl"
    with open(evil, "wb") as f:
        pickle.dump({"model": _Evil()}, f)
    with pytest.raises(UserError, match="not allowed"):
        load_checkpoint_file(evil)
