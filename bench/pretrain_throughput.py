"""Benchmark: pretraining throughput (images/s) of ResNet-18 on 32-px synthetic data, MoCo vs ring-MoCo.

Both methods run the same optimiser steps on the same batches (augmented synthetic images) with a
full queue of ``--queue`` keys (not capped at the data set's size); the ring's selection is the only
difference. Steps alternate between the two (``bench/interleave.py``) and the rates compared are
batch size / median step time. Target: ring-MoCo >= 0.95x MoCo.
Run: ``python bench/pretrain_throughput.py [--batch 64 --rounds 7 --queue 65536 --threads 2]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run by path: make the repository importable without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.interleave import interleaved, machine_line
from pretrain.config import load_config
from pretrain.methods import build_method
from pretrain.train import build_optimizer, prepare_data
from ringbench.cli import add_common_flags, run_main

TARGET = 0.95


def step_function(cfg: dict, batches: list[list[torch.Tensor]], dataset_size: int):
    """One optimiser step per call, cycling over ``batches``."""
    torch.manual_seed(0)
    method = build_method(cfg, dataset_size, "cifar")
    method.set_epoch(0)
    optimizer = build_optimizer(cfg, method)
    index = torch.arange(len(batches[0][0]))
    calls = [0]

    def step() -> None:
        views = batches[calls[0] % len(batches)]
        calls[0] += 1
        loss, _ = method(views, index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved steps per method (after one warm-up)")
    parser.add_argument("--queue", type=int, default=65536, help="MoCo queue size")
    parser.add_argument("--threads", type=int, default=2)
    add_common_flags(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    common = [
        f"train.batch_size={args.batch}",
        f"moco.queue_size={args.queue}",
        "moco.cap_queue=false",
        "data.workers=0",
        "data.synthetic_classes=16",
        f"data.synthetic_images_per_class={max(1, args.batch // 8)}",
    ]
    plain = load_config(None, ["method=moco", "loss.name=nce", *common])
    ring = load_config(None, ["method=moco", "loss.name=ring", *common])
    data = prepare_data(plain, views=2)
    loader = torch.utils.data.DataLoader(
        data.train, batch_size=args.batch, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0)
    )
    batches = [views for views, _ in loader][:2]
    medians = interleaved(
        {
            "MoCo": step_function(plain, batches, len(data.train)),
            "ring-MoCo": step_function(ring, batches, len(data.train)),
        },
        args.rounds,
    )
    print(f"ResNet-18 (cifar stem), 32 px synthetic, batch {args.batch}, queue {args.queue}")
    print(machine_line())
    for name, seconds in medians.items():
        print(f"{name:10s} {args.batch / seconds:8.1f} images/s (median step {seconds:.2f} s of {args.rounds})")
    ratio = medians["MoCo"] / medians["ring-MoCo"]
    print(
        f"ring-MoCo / MoCo throughput: {ratio:.3f} (target >= {TARGET}) {'ok' if ratio >= TARGET else 'BELOW TARGET'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
