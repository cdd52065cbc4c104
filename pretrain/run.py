"""Pretrain a backbone and write its card.

Examples::

    python pretrain/run.py --config moco_ring --data synthetic --profile demo --out ring_moco.pth
    python pretrain/run.py --config moco_ring --data cifar10 --data-root ~/data --out ring_moco.pth
    torchrun --nproc_per_node 8 pretrain/run.py --config moco --data imagefolder --data-root /imagenet --device cuda
    torchrun --nproc_per_node 2 pretrain/run.py --config moco_ring --profile demo   # 2 CPU processes (gloo)

Shipped configs (configs/pretrain/): ir, ir_ring, moco, moco_ring, cmc, cmc_ring, simclr,
simclr_ring, simclr_hcl, simclr_dcl -- each paper's hyper-parameters -- and the reference rows
random (initial weights, no training) and supervised (cross-entropy on the labels), on the embedded synthetic
data unless --data says otherwise (CIFAR-10/100 and STL-10 in torchvision's folder layout, or an
ImageFolder root with train/ and val/; nothing is downloaded).

Settings come from the YAML config, then ``--profile``, then the flags, then ``key=value``
overrides (e.g. ``loss.w_outer=0.05 train.seed=1``); an unknown key is an error. A work folder
keeps ``checkpoint.pth`` (written every epoch; a rerun with the same config resumes from it) and
``log.jsonl``.

Under torchrun (NCCL on CUDA, gloo on CPU) ``--batch-size`` is the global batch, split evenly over the
processes; process 0 writes the log, the checkpoints and the card.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pretrain.config import DATASETS, PROFILES, load_config
from ringbench.cli import add_common_flags, resolve_device, run_main
from ringbench.errors import UserError
from ringbench.fileio import check_writable_dir, remove_stale_temps


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain/run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="YAML config: a path, or the name of a shipped one (moco_ring, ir, ...: "
        "configs/pretrain/); defaults if omitted",
    )
    parser.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        help="preset overrides; 'demo' = small synthetic run of a few minutes on CPU",
    )
    parser.add_argument("--data", choices=DATASETS, help="dataset (sets data.name); 'synthetic' needs no files")
    parser.add_argument("--data-root", type=Path, help="folder holding the dataset in torchvision's layout")
    parser.add_argument("--epochs", type=int, help="training epochs (train.epochs)")
    parser.add_argument("--batch-size", type=int, help="global batch size (train.batch_size)")
    parser.add_argument("--lr", type=float, help="base learning rate (optim.lr)")
    parser.add_argument("--seed", type=int, help="random seed (train.seed)")
    parser.add_argument("--arch", help="resnet18, resnet50, ... or a timm model name")
    parser.add_argument("--out", type=Path, help="backbone card to write (default: WORKDIR/card.pth)")
    parser.add_argument(
        "--workdir", type=Path, help="checkpoints and log.jsonl (default: runs/pretrain/<config name>-<dataset>)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto (default: cpu)")
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (default: torch's choice; 1 is faster on a busy shared machine)",
    )
    parser.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in the work folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--no-tensorboard",
        action="store_true",
        help="no TensorBoard event files in the work folder (written by default)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. loss.w_outer=0.05")
    add_common_flags(parser)
    return parser


def flag_settings(args: argparse.Namespace) -> dict[str, object]:
    """The config keys the named flags set (dotted), for those given."""
    pairs = {
        "data.name": args.data,
        "data.root": str(args.data_root) if args.data_root else None,
        "train.epochs": args.epochs,
        "train.batch_size": args.batch_size,
        "optim.lr": args.lr,
        "train.seed": args.seed,
        "arch": args.arch,
    }
    return {key: value for key, value in pairs.items() if value is not None}


def resolve_config(args: argparse.Namespace) -> dict:
    """The config a run with these arguments trains with: YAML <- profile <- flags <- overrides (printing it
    needs no data root)."""
    need_data = not getattr(args, "print_config", False)
    return load_config(
        args.config, args.overrides, profile=args.profile, flags=flag_settings(args), need_data=need_data
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)  # first: a bogus device wastes nothing
    cfg = resolve_config(args)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg, sort_keys=False))
        return 0
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    name = args.config.stem if args.config else "default"
    workdir = args.workdir or Path("runs") / "pretrain" / f"{name}-{cfg['data']['name']}"
    out = args.out or workdir / "card.pth"
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; name the card file to write")
    check_writable_dir(workdir, "--workdir")
    check_writable_dir(out.parent, "--out's folder")
    remove_stale_temps(out.parent)  # a card write cut by a kill
    from pretrain.train import train

    result = train(
        cfg,
        out,
        workdir,
        device=device,
        fresh=args.fresh,
        progress=not args.no_progress,
        tensorboard=not args.no_tensorboard,
    )
    if result.card_path is not None:
        last = result.history[-1] if result.history else {}
        knn = f", kNN top-1 {last['knn_top1']:.1f}%" if "knn_top1" in last else ""
        print(f"wrote {result.card_path}{knn}")
    return 0


def cli() -> None:
    """Console-script entry point (see pyproject.toml)."""
    sys.exit(run_main(main))


if __name__ == "__main__":
    cli()
