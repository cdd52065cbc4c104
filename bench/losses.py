"""Benchmark: ring_loss (top-k selection) vs a sort-based ring and vs plain InfoNCE.

Forward + backward at B=256, K=65,536, D=128 on CPU (the MoCo queue case). Prints the time of
each and the ratios; checks that the top-k ring equals the sort-based one (value and gradient).
Run: ``python bench/losses.py [--batch 256 --queue 65536 --dim 128 --repeats 5]``.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from pretrain.losses import contrastive_from_logits, nce_loss, pair_logits, ring_bounds, ring_loss
from ringbench.cli import add_common_flags, run_main


def sorted_ring_loss(q, k, negatives, t, w_outer, w_inner):
    """The same loss with a full sort of every row (the formulation to beat)."""
    pos, neg = pair_logits(q, k, negatives, t)
    inner, outer = ring_bounds(neg.shape[1], w_outer, w_inner)
    ranked = torch.sort(neg, dim=1, descending=True).values
    return contrastive_from_logits(pos, ranked[:, inner:outer])


def _time(fn, q, repeats: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    best = float("inf")
    for _ in range(repeats):
        x = q.clone().requires_grad_()
        start = time.perf_counter()
        loss = fn(x)
        loss.backward()
        best = min(best, time.perf_counter() - start)
    return best, loss.detach(), x.grad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--queue", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--w-outer", type=float, default=0.1)
    parser.add_argument("--w-inner", type=float, default=0.1)
    add_common_flags(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(args.batch, args.dim, generator=g)
    k = torch.randn(args.batch, args.dim, generator=g)
    queue = torch.nn.functional.normalize(torch.randn(args.queue, args.dim, generator=g), dim=1)
    t, wo, wi = 0.07, args.w_outer, args.w_inner
    t_ring, v_ring, g_ring = _time(lambda x: ring_loss(x, k, queue, t, wo, wi), q, args.repeats)
    t_sort, v_sort, g_sort = _time(lambda x: sorted_ring_loss(x, k, queue, t, wo, wi), q, args.repeats)
    t_nce, _, _ = _time(lambda x: nce_loss(x, k, queue, t), q, args.repeats)
    rel = abs(v_ring.item() - v_sort.item()) / abs(v_sort.item())
    grad_err = ((g_ring - g_sort).abs().max() / g_sort.abs().max()).item()
    print(f"B={args.batch} K={args.queue} D={args.dim} w_outer={wo} w_inner={wi} threads={torch.get_num_threads()}")
    print(f"ring (top-k)      {t_ring * 1e3:8.1f} ms   loss {v_ring.item():.6f}")
    print(f"ring (full sort)  {t_sort * 1e3:8.1f} ms   loss {v_sort.item():.6f}")
    print(f"nce (same queue)  {t_nce * 1e3:8.1f} ms")
    with torch.no_grad():
        inner, outer = ring_bounds(args.queue, wo, wi)
        ranked = torch.sort(pair_logits(q, k, queue, t)[1], dim=1, descending=True).values
        ties = int(
            ((ranked[:, outer - 1] == ranked[:, outer]) | (ranked[:, max(inner - 1, 0)] == ranked[:, inner])).sum()
        )
    print(f"value rel. diff vs sort: {rel:.2e}   gradient max rel. diff: {grad_err:.2e}")
    print(
        f"(rows with a float tie at a ring boundary: {ties}; either tied negative may be kept, so the gradient"
        " may differ there)"
    )
    print(f"speed-up vs sort: {t_sort / t_ring:.2f}x (target >= 3x)")
    print(f"cost vs nce:      {t_ring / t_nce:.2f}x (target <= 1.2x)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
