"""Overhead of our Detectron2 runner over a bare Detectron2 training loop.

    python bench/transfer.py [--backbone card.pth] [--task syn_det] [--iters 40]

Both sides train the same model (built from the same config, with the same converted backbone
weights) on the same registered synthetic COCO data, from the same seed:

* ours: ``transfer.d2.train``'s trainer (``DefaultTrainer`` with our writers and hooks: timer,
  LR schedule, console/JSON metrics);
* bare: Detectron2's ``SimpleTrainer`` on ``build_detection_train_loader`` and ``build_optimizer``
  with no hooks.

The two loops advance in lockstep, one iteration each in alternating order, each iteration run as
``TrainerBase.train`` runs it (``before_step``, ``run_step``, ``after_step``), so that a change in
machine load hits both; the ratio of the median iteration times (after 3 warm-up iterations) is
printed (target <= 1.05). Ratios are measured in this one run and printed, never asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run by path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ringbench.cli import add_common_flags, run_main


def _setup(backbone, task: str, iters: int, folder: Path):
    from transfer.d2 import data as d2data
    from transfer.d2 import train
    from transfer.d2.tasks import make_config

    args = argparse.Namespace(iters=iters)
    config = make_config(task, args)
    splits = train.register_datasets(task, config, str(folder / "cache"), d2data)
    return config, splits


def _trainers(cfg, backbone):
    """(ours, bare) trainers on identically built and initialised models and data loaders."""
    from transfer.d2 import convert, train
    from transfer.d2.compat import d2

    D2 = d2()
    converted = convert.torchvision_to_detectron2(backbone.state_dict, train.layout_of(cfg))
    D2.utils.env.seed_all_rng(cfg.SEED)
    ours = train.trainer_class()(cfg)
    convert.load_converted(ours.model, converted)
    D2.utils.env.seed_all_rng(cfg.SEED)
    model = D2.modeling.build_model(cfg)
    convert.load_converted(model, converted)
    bare = D2.engine.SimpleTrainer(
        model, D2.data.build_detection_train_loader(cfg), D2.solver.build_optimizer(cfg, model)
    )
    for trainer in (ours, bare):
        trainer.iter = trainer.start_iter = 0
        trainer.max_iter = cfg.SOLVER.MAX_ITER
        trainer.storage = D2.utils.events.EventStorage(0)
    return ours, bare


def _step(trainer, iteration: int) -> float:
    """One iteration exactly as ``TrainerBase.train`` runs it (hooks included); its wall time."""
    with trainer.storage:
        trainer.iter = iteration
        start = time.perf_counter()
        trainer.before_step()
        trainer.run_step()
        trainer.after_step()
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the GPU's time, not only the launch's
        return time.perf_counter() - start


def measure(cfg, backbone, warmup: int = 3) -> tuple[list[float], list[float]]:
    """Per-iteration times of both loops, interleaved step by step (alternating which goes first)."""
    ours, bare = _trainers(cfg, backbone)
    for trainer in (ours, bare):
        with trainer.storage:
            trainer.before_train()
    times: dict[int, list[float]] = {0: [], 1: []}
    for iteration in range(cfg.SOLVER.MAX_ITER):
        order = (0, 1) if iteration % 2 == 0 else (1, 0)
        for which in order:
            elapsed = _step((ours, bare)[which], iteration)
            if iteration >= warmup:
                times[which].append(elapsed)
    for trainer in (ours, bare):
        trainer.iter += 1
        with trainer.storage:
            trainer.after_train()
    return times[0], times[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--backbone", type=Path, help="backbone checkpoint (default: a random ResNet-18 card)")
    parser.add_argument("--task", default="syn_det", choices=["syn_det", "syn_instseg", "syn_kp"])
    parser.add_argument("--iters", type=int, default=40, help="training iterations of each loop")
    parser.add_argument("--device", default="cpu", help="where both loops train (cpu, cuda)")
    add_common_flags(parser)
    args = parser.parse_args(argv)

    import logging

    from bench.common import random_card
    from transfer.checkpoints import load_backbone
    from transfer.d2 import train

    quiet = logging.getLogger("detectron2")  # INFO-enabled (so Detectron2 adds no handler of its own), silent
    quiet.setLevel(logging.INFO)
    quiet.propagate = False
    quiet.addHandler(logging.NullHandler())
    with tempfile.TemporaryDirectory(prefix="bench-d2-") as tmp:
        folder = Path(tmp)
        backbone = load_backbone(args.backbone or random_card(folder))
        config, splits = _setup(backbone, args.task, args.iters, folder)
        cfg = train.build_cfg(config, backbone, splits, folder / "out", args.device, seed=0)
        ours, bare = measure(cfg, backbone)
    ratio = statistics.median(ours) / statistics.median(bare)
    print(
        f"{args.task} ({backbone.arch}, {len(ours)} timed iterations each, interleaved): ours "
        f"{statistics.median(ours):.3f} s/it, bare SimpleTrainer {statistics.median(bare):.3f} s/it (medians); "
        f"mean {statistics.fmean(ours):.3f} vs {statistics.fmean(bare):.3f}; overhead ratio {ratio:.3f} "
        f"(target <= 1.05)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
