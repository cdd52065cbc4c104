"""Benchmark: pretraining throughput (images/s) of ResNet-18 on 32-px synthetic data, MoCo vs ring-MoCo.

Both methods run the same optimiser steps on the same batches (augmented synthetic images, the
queue filled to ``--queue`` entries); the ring's selection is the only difference. Prints each
rate and the ratio. Run: ``python bench/pretrain_throughput.py [--batch 64 --steps 5 --queue 4096 --threads 2]``.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from pretrain.config import load_config
from pretrain.methods import build_method
from pretrain.train import build_optimizer, prepare_data
from ringbench.cli import add_common_flags, run_main


def images_per_second(cfg: dict, batches: list[list[torch.Tensor]], dataset_size: int) -> float:
    torch.manual_seed(0)
    method = build_method(cfg, dataset_size, "cifar")
    method.set_epoch(0)
    optimizer = build_optimizer(cfg, method)
    index = torch.arange(len(batches[0][0]))

    def step(views):
        loss, _ = method(views, index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step(batches[0])  # warm-up
    start = time.perf_counter()
    for views in batches[1:]:
        step(views)
    return len(index) * (len(batches) - 1) / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method (after one warm-up)")
    parser.add_argument("--queue", type=int, default=4096, help="MoCo queue size")
    parser.add_argument("--threads", type=int, default=2)
    add_common_flags(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    common = [
        f"train.batch_size={args.batch}",
        f"moco.queue_size={args.queue}",
        "data.workers=0",
        "data.synthetic_classes=64",
        f"data.synthetic_images_per_class={max(1, args.queue // 64)}",
    ]
    plain = load_config(None, ["method=moco", "loss.name=nce", *common])
    ring = load_config(None, ["method=moco", "loss.name=ring", *common])
    data = prepare_data(plain, views=2)
    loader = torch.utils.data.DataLoader(
        data.train, batch_size=args.batch, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0)
    )
    batches = []
    for views, _ in loader:
        batches.append(views)
        if len(batches) == args.steps + 1:
            break
    rate_plain = images_per_second(plain, batches, len(data.train))
    rate_ring = images_per_second(ring, batches, len(data.train))
    print(f"ResNet-18 (cifar stem), 32 px synthetic, batch {args.batch}, queue {args.queue}, {args.threads} threads")
    print(f"MoCo        {rate_plain:8.1f} images/s")
    print(f"ring-MoCo   {rate_ring:8.1f} images/s")
    print(f"ring / plain throughput: {rate_ring / rate_plain:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
