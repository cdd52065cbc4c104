"""What a transfer run resolves to, as a library question: a task and its flags give the task's config and its
hash, which with the card's SHA-256 is the identity of the record the run writes (and is skipped for). It needs
no backbone, data or device, so a sweep asks it once per (task, flags) of a plan, not once per job."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def flag_argv(flags: Mapping[str, Any]) -> list[str]:
    """Flags named as in a plan or a settings mapping, as ``transfer/run.py`` arguments:
    ``{episodes: 300, eval_only: true}`` -> ``["--episodes", "300", "--eval-only"]`` (False and None: left out)."""
    argv: list[str] = []
    for key, value in flags.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def task_config(task: str, flags: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """``(config, config hash)`` that ``transfer/run.py --task TASK`` with ``flags`` records.

    The flags are read by ``transfer/run.py``'s own parser, so they mean what they mean on its command line;
    an unknown flag, a bad value or a flag the task does not use is a one-line :class:`UserError`."""
    from ringbench.cli import parse_args_strictly
    from ringbench.records import config_hash
    from transfer.run import build_parser, refuse_foreign_flags
    from transfer.tasks import get_task

    args = parse_args_strictly(build_parser(), ["--task", task, *flag_argv(flags or {})])
    spec = get_task(args.task)
    refuse_foreign_flags(args, spec)
    config = spec.make_config(args)
    return config, config_hash(config)


def task_grid_points(task: str, config: Mapping[str, Any]) -> list[str]:
    """The grid points of ``task`` with ``config`` (``transfer/run.py --grid-point NAME`` runs one alone), or ``[]``
    for a task without a grid: a sweep makes one job of each point, then the task's own job after them."""
    from transfer.tasks import get_task

    spec = get_task(task)
    return list(spec.grid_points(dict(config))) if spec.grid_points is not None else []
