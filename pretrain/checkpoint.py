"""The pretraining checkpoint: the whole training state after an epoch, so that a killed run resumes
where its last finished epoch left it, and only under the config that wrote it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ringbench.card import load_checkpoint_file
from ringbench.errors import UserError
from ringbench.fileio import atomic_save

CHECKPOINT_FORMAT = "ringbench-pretrain-checkpoint/1"
CHECKPOINT_NAME = "checkpoint.pth"


def plain_config(cfg: Mapping[str, Any]) -> dict:
    """``cfg`` as plain JSON data (what checkpoints and cards store)."""
    return json.loads(json.dumps(cfg))


def config_changes(recorded: Mapping[str, Any], cfg: Mapping[str, Any]) -> list[str]:
    """The dotted keys in which a config stored in a checkpoint or card differs from ``cfg`` ([] = same)."""
    return sorted(_diff(recorded, plain_config(cfg)))


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in set(a) | set(b) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def checkpoint_state(
    cfg: Mapping[str, Any],
    epoch: int,
    method: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    history: list[dict[str, Any]],
) -> dict:
    """What a checkpoint holds after ``epoch`` (1-based) epochs."""
    return {
        "format": CHECKPOINT_FORMAT,
        "config": plain_config(cfg),
        "epoch": epoch,
        "method": method.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else {},
        "history": history,
    }


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: a crash mid-write leaves the previous checkpoint in place."""
    atomic_save(state, path)


def load_resume_state(path: Path, cfg: Mapping[str, Any]) -> dict | None:
    """The checkpoint at ``path`` (None if there is none); refused if ``cfg`` is not the config that wrote it."""
    if not path.exists():
        return None
    state = load_checkpoint_file(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a pretraining checkpoint; remove it or use another --workdir")
    changed = config_changes(state["config"], cfg)
    if changed:
        raise UserError(
            f"{path}: was written with a different config (differs in {changed[:6]}); "
            "use another --workdir, or --fresh to start over"
        )
    return state
