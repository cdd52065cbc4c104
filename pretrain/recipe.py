"""What a pretraining run resolves to, as a library question: a recipe (a config, shipped name or path, with
``pretrain/run.py`` flags, ``key=value`` overrides and a seed) gives the config the run trains with; a card on
disk is that run's result when the config it records does not differ. A sweep asks these to decide which cards
to (re)train, without running anything."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def recipe_config(config: str | os.PathLike, args: Sequence[str] = (), seed: int | None = None) -> dict[str, Any]:
    """The config of ``pretrain/run.py --config CONFIG ARGS --seed SEED``, checked; an unknown flag or key, or
    a bad value, is a one-line :class:`UserError`."""
    from pretrain.run import build_parser, resolve_config
    from ringbench.cli import parse_args_strictly

    argv = ["--config", os.fspath(config), *args, *(["--seed", str(seed)] if seed is not None else [])]
    return resolve_config(parse_args_strictly(build_parser(), argv))


def card_changes(card: str | os.PathLike, config: Mapping[str, Any]) -> list[str] | None:
    """The config keys in which the card at ``card`` differs from ``config`` ([] = the card is the result of a
    run with ``config``); None when there is no card."""
    if not Path(card).exists():
        return None
    from pretrain.train import config_changes
    from ringbench.card import load_card

    return config_changes(load_card(card).meta.get("config") or {}, config)
