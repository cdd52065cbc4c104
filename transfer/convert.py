"""``ringbench-convert IN OUT --to card|torchvision|detectron2|vissl``: one backbone, another format.

``IN`` is any checkpoint ``--backbone`` reads (a card, every format of docs/formats.md) or
``zoo:NAME`` (a fetched zoo entry). It is read strictly (``transfer.checkpoints.load_backbone``),
so the output holds exactly the ResNet's torchvision weights, under the target's names:

- ``card``: a backbone card; its meta keeps the source's normalisation, method and name
  (``source_format``, ``source_name``, ``source_sha256``), and a card read back is the same card.
- ``torchvision``: a bare state dict (``torch.save``), as ``torchvision.models.resnet50().load_state_dict``
  takes it; it cannot carry the normalisation.
- ``detectron2``: a ``.pkl`` of NumPy arrays under ``"model"`` with Detectron2's ResNet names
  (``transfer/d2/convert.py``), as Detectron2's ``convert-torchvision-to-d2.py`` writes it
  (``__author__``, ``matching_heuristics``), for ``MODEL.WEIGHTS`` with ``RESNETS.STRIDE_IN_1X1 False``.
- ``vissl``: ``classy_state_dict.base_model.model.trunk`` with ``_feature_blocks.`` keys, for VISSL's
  ``MODEL.WEIGHTS_INIT`` (``STATE_DICT_KEY_NAME: classy_state_dict``).

The Detectron2 and VISSL files also keep the card's meta under ``"ringbench_meta"`` (plain values,
which both tools ignore), so converting back gives the card's normalisation again. Weights round-trip
bit-equal through every target. Writes are atomic: a failed conversion leaves no file.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ringbench.card import BackboneCard, _plain, make_meta, save_card
from ringbench.cli import add_common_flags, run_main
from ringbench.errors import UserError
from ringbench.fileio import atomic_save, atomic_write
from transfer.checkpoints import SOURCE_FORMATS, Backbone, load_backbone

TARGETS = ("card", "torchvision", "detectron2", "vissl")
META_KEY = "ringbench_meta"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ringbench-convert",
        description="Convert a backbone between formats: a ringbench card, torchvision, Detectron2 .pkl, VISSL. "
        "IN is any checkpoint --backbone reads, or zoo:NAME (see ringbench-zoo list).",
    )
    parser.add_argument("input", metavar="IN", help="checkpoint file, or zoo:NAME")
    parser.add_argument("output", metavar="OUT", type=Path, help="file to write")
    parser.add_argument("--to", required=True, choices=TARGETS, help="output format")
    parser.add_argument(
        "--from",
        dest="source_format",
        choices=sorted(f for f in SOURCE_FORMATS if f != "card"),
        help="the input's format, where its keys do not tell (simclr-v1: torchvision keys, unnormalised inputs)",
    )
    parser.add_argument("--name", help="the backbone's name in the card's meta (default: IN's file stem)")
    parser.add_argument("--arch", help="architecture of a timm checkpoint that does not record it")
    parser.add_argument("--dino-key", choices=("teacher", "student"), default="teacher", help="DINO network to keep")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    add_common_flags(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out: Path = args.output
    if out.exists() and not args.force:
        raise UserError(f"{out}: exists; --force to replace it")
    if not args.input.startswith("zoo:") and Path(args.input).resolve() == out.resolve():
        raise UserError(f"{out}: is the input file; write the conversion to another file")
    if args.to == "detectron2" and out.suffix != ".pkl":
        raise UserError(f"{out}: a Detectron2 weights file is read by its .pkl suffix; name it *.pkl")
    backbone = load_backbone(
        args.input, name=args.name, arch=args.arch, source_format=args.source_format, dino_key=args.dino_key
    )
    convert(backbone, out, args.to)
    print(f"wrote {out} ({args.to}, {backbone.arch}, from {backbone.source_format} {backbone.name})")
    return 0


def card_of(backbone: Backbone) -> BackboneCard:
    """The backbone as a card: a card's own meta unchanged, else the source's normalisation, method and name."""
    meta = dict(backbone.meta)
    if meta.get("source_format") != backbone.source_format:  # a card's meta (read from a card, or carried)
        return BackboneCard(backbone.arch, dict(backbone.state_dict), backbone.stem, meta)
    fields = {
        "method": meta.pop("method", backbone.source_format),
        "loss": meta.pop("loss", None) or "unknown",
        "dataset": meta.pop("dataset", None) or "unknown",
        "image_size": meta.pop("image_size", None) or backbone.default_image_size,
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "source_format": backbone.source_format,
        "source_name": backbone.name,
        "source_sha256": backbone.sha256,
    }
    meta.pop("mean", None)
    meta.pop("std", None)
    return BackboneCard(backbone.arch, dict(backbone.state_dict), backbone.stem, make_meta(**{**meta, **fields}))


def convert(backbone: Backbone, out: Path, to: str) -> Path:
    """Write ``backbone`` to ``out`` in format ``to`` (atomically)."""
    if backbone.streams:
        raise UserError(f"{backbone.name}: a multi-stream card ({backbone.streams}) has no single-ResNet format")
    card = card_of(backbone)
    if to == "card":
        return save_card(card, out)
    state = {k: v.detach().cpu().contiguous() for k, v in card.state_dict.items()}
    if backbone.arch not in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152") and to != "torchvision":
        raise UserError(f"{backbone.name}: --to {to} needs a torchvision ResNet, not {backbone.arch!r}")
    carried = {"arch": card.arch, "stem": card.stem, "meta": _plain(card.meta)}
    if to == "torchvision":
        atomic_save(state, out)
    elif to == "vissl":
        trunk = {"_feature_blocks." + k: v for k, v in state.items()}
        model = {"trunk": trunk, "heads": {}}
        atomic_save({"classy_state_dict": {"base_model": {"model": model, "meta": {}}}, META_KEY: carried}, out)
    elif to == "detectron2":
        if out.suffix != ".pkl":
            raise UserError(f"{out}: a Detectron2 weights file is read by its .pkl suffix; name it *.pkl")
        from transfer.d2.convert import torchvision_to_detectron2

        arrays = {k: v.numpy() for k, v in torchvision_to_detectron2(state).items()}
        data: dict[str, Any] = {"model": arrays, "__author__": "ringbench", "matching_heuristics": True}
        data[META_KEY] = carried
        with atomic_write(out, "wb") as handle:
            pickle.dump(data, handle, protocol=4)
    else:
        raise UserError(f"--to {to!r}: expected one of {list(TARGETS)}")
    return out


def cli() -> None:
    """Console-script entry point (``ringbench-convert``)."""
    sys.exit(run_main(main))


if __name__ == "__main__":
    cli()
