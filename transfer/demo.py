"""The main job on the embedded default data: pretrain, transfer, compare (``make demo``).

    python -m transfer.demo [--plan configs/demo.yaml] [--workdir .] [--quick] [--force]

Runs exactly the commands a user would run, one stage at a time, as listed in the plan
(``configs/demo.yaml``): ``pretrain/run.py`` for each backbone card, ``transfer/run.py`` for each
(card, task), then ``transfer/leaderboard.py``. Everything is reused on a second run: a card made
with the config the plan resolves to is not retrained (one made with another config is trained again
from scratch) and an existing record is not recomputed (``--force`` redoes the transfer).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run by path: make the repository importable without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ringbench.cli import add_common_flags, run_main
from ringbench.errors import UserError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PLAN = REPO / "configs" / "demo.yaml"


def load_plan(path: Path) -> dict[str, Any]:
    from ringbench.config import read_yaml_mapping

    plan = read_yaml_mapping(path, "demo plan")
    for key in ("backbones", "tasks"):
        if not plan.get(key):
            raise UserError(f"{path}: the plan needs a non-empty {key!r} list")
    return plan


STAGE_MODULES = {
    "pretrain/run.py": "pretrain.run",
    "transfer/run.py": "transfer.run",
    "transfer/leaderboard.py": "transfer.leaderboard",
}


def run_stage_in_process(script: str, argv: list[str]) -> int:
    """Run a stage script's ``main(argv)`` in this process (as ``python script argv`` would): its exit code."""
    import importlib

    return run_main(importlib.import_module(STAGE_MODULES[script]).main, argv)


def _run(cmd: list[str], step: str, in_process: bool = False) -> None:
    print(f"\n==> [{step}] {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    code = run_stage_in_process(cmd[1], cmd[2:]) if in_process else subprocess.run(cmd, cwd=REPO).returncode
    if code != 0:
        raise UserError(f"{step} failed (exit {code}): {shlex.join(cmd)}")
    print(f"    [{step}] done in {time.perf_counter() - start:.0f} s", flush=True)


def _recorded(run_args: list[str]) -> bool:
    """Whether ``transfer/run.py run_args`` would skip: its record (backbone hash, task, config) exists.

    Checked here, without starting a process per run, so that a second demo takes seconds."""
    from ringbench.fileio import sha256_file
    from transfer.run import build_parser, existing_record

    parsed = build_parser().parse_args(run_args)
    return existing_record(parsed, sha256_file(parsed.backbone)) is not None


def main(argv: Sequence[str] | None = None, in_process: bool = False) -> int:
    """The demo; ``in_process`` runs each stage's ``main`` in this process instead of a subprocess (tests)."""
    parser = argparse.ArgumentParser(
        prog="python -m transfer.demo",
        description="Run the suite end to end on the embedded synthetic data: pretrain plain and ring backbones "
        "(MoCo and IR pairs), transfer each to detection, segmentation, keypoints and few-shot tasks, and write the "
        "leaderboard.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--plan", type=Path, default=DEFAULT_PLAN, help="YAML plan: backbones, tasks, flags")
    parser.add_argument("--workdir", type=Path, default=REPO, help="where cards/, runs/, cache/ and results/ go")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="leave out the plan's optional backbones (the IR pair): about half the time",
    )
    parser.add_argument("--force", action="store_true", help="recompute transfer records that exist")
    parser.add_argument("--device", default="auto", help="device for every stage")
    add_common_flags(parser)
    args = parser.parse_args(argv)
    plan = load_plan(args.plan)
    from pretrain.run import card_changes
    from transfer.run import resolve_device

    device = resolve_device(args.device)
    work = args.workdir.resolve()
    cards, runs, results = work / "cards", work / "runs", work / "results"
    py = sys.executable
    debug = ["--debug"] if args.debug else []
    start = time.perf_counter()

    backbones = [b for b in plan["backbones"] if not (args.quick and b.get("optional"))]
    for b in backbones:
        card = cards / f"{b['name']}.pth"
        pretrain_args = [
            "--config",
            str(REPO / b["config"]),
            "--out",
            str(card),
            "--workdir",
            str(runs / "pretrain" / b["name"]),
            "--device",
            device,
            *map(str, plan.get("pretrain_args", [])),
            *map(str, b.get("args", [])),
        ]
        changed = card_changes(pretrain_args)  # [] reuse the card, a list retrain it, None train it
        if changed == []:
            print(f"==> [pretrain {b['name']}] reusing {card}")
            continue
        if changed:  # the plan or a config changed since the card was made: its checkpoints are stale too
            print(
                f"==> [pretrain {b['name']}] {card} was made with another config (differs in {changed[:6]}): "
                "pretraining again"
            )
            pretrain_args.append("--fresh")
        _run([py, "pretrain/run.py", *pretrain_args, *debug], f"pretrain {b['name']}", in_process)

    for task in plan["tasks"]:
        name, extra = (task, []) if isinstance(task, str) else (task["name"], task.get("args", []))
        for b in backbones:
            run_args = [
                "--backbone",
                str(cards / f"{b['name']}.pth"),
                "--task",
                name,
                "--results",
                str(results),
                "--output-dir",
                str(runs / "transfer"),
                "--cache-dir",
                str(work / "cache"),
                "--device",
                device,
                *map(str, extra),
            ]
            if not args.force and _recorded(run_args):
                print(f"==> [{name} {b['name']}] reusing its record in {results}")
                continue
            _run(
                [py, "transfer/run.py", *run_args, *(["--force"] if args.force else []), *debug],
                f"{name} {b['name']}",
                in_process,
            )

    board = [py, "transfer/leaderboard.py", "--results", str(results)]
    _run([*board, "--format", "md", "--out", str(results / "leaderboard.md")], "leaderboard md", in_process)
    _run([*board, "--format", "html", "--out", str(results / "leaderboard.html")], "leaderboard html", in_process)
    print("\n" + (results / "leaderboard.md").read_text())
    print(
        f"demo finished in {time.perf_counter() - start:.0f} s; tables in {results}/leaderboard.md and "
        f"{results}/leaderboard.html"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
