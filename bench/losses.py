"""Benchmark: ``ring_loss`` forward+backward against plain ``nce_loss`` on the same inputs, and against a
sort-based ring.

B=256 anchors, a K=65,536-entry queue, D=128 on CPU: the ring's two flavours -- the whole ring as
MoCo's partition, and ``--samples`` draws from it (IR) -- and InfoNCE over the whole queue. Before
timing, the values and gradients are checked against the sort-based formulation. Times are medians of
``--rounds`` interleaved rounds (``bench/interleave.py``); the ratios are printed with their targets.
Run: ``python bench/losses.py [--batch 256 --queue 65536 --dim 128 --samples 4096 --rounds 9]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run by path: make the repository importable without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.interleave import interleaved, machine_line
from pretrain.losses import contrastive_from_logits, nce_loss, pair_logits, ring_bounds, ring_loss
from ringbench.cli import add_common_flags, run_main

TARGET = 1.15  # ring / nce, both flavours


def sorted_ring_loss(q, k, negatives, t, w_outer, w_inner, samples=None, seed=0):
    """The same loss with a full sort of every row (the formulation to beat); IR draws index the ring
    in queue order, as ``ring_loss`` does."""
    pos, neg = pair_logits(q, k, negatives, t)
    inner, outer = ring_bounds(neg.shape[1], w_outer, w_inner)
    order = torch.sort(neg, dim=1, descending=True).indices[:, inner:outer]
    if samples is not None:
        order = torch.sort(order, dim=1).values  # queue order
        picks = torch.randint(0, outer - inner, (len(q), samples), generator=torch.Generator().manual_seed(seed))
        order = order.gather(1, picks)
    return contrastive_from_logits(pos, neg.gather(1, order))


def _value_and_grad(fn, q):
    x = q.clone().requires_grad_()
    loss = fn(x)
    loss.backward()
    return loss.detach(), x.grad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--queue", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--samples", type=int, default=4096, help="IR flavour: negatives drawn from the ring")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds (medians are compared)")
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
    t, wo, wi, n = 0.07, args.w_outer, args.w_inner, args.samples

    def draws():
        return torch.Generator().manual_seed(1)

    contenders = {
        "nce": lambda x: nce_loss(x, k, queue, t),
        "ring": lambda x: ring_loss(x, k, queue, t, wo, wi),
        "ring_ir": lambda x: ring_loss(x, k, queue, t, wo, wi, num_samples=n, generator=draws()),
        "sorted_ring": lambda x: sorted_ring_loss(x, k, queue, t, wo, wi),
    }
    print(f"B={args.batch} K={args.queue} D={args.dim} w_outer={wo} w_inner={wi} IR draws={n}")
    print(machine_line())
    checks = [
        ("ring (whole ring)", contenders["ring"], contenders["sorted_ring"]),
        ("ring (IR draws)", contenders["ring_ir"], lambda x: sorted_ring_loss(x, k, queue, t, wo, wi, n, seed=1)),
    ]
    for label, fast, reference in checks:
        (v1, g1), (v2, g2) = _value_and_grad(fast, q), _value_and_grad(reference, q)
        rel = abs(v1.item() - v2.item()) / abs(v2.item())
        grad = ((g1 - g2).abs().max() / g2.abs().max()).item()
        print(f"{label:18s} vs sort: value rel. diff {rel:.1e}, gradient max rel. diff {grad:.1e}")

    medians = interleaved(
        {name: (lambda fn=fn: fn(q.clone().requires_grad_()).backward()) for name, fn in contenders.items()},
        args.rounds,
    )
    print(f"forward+backward, median of {args.rounds} interleaved rounds:")
    for name, seconds in medians.items():
        print(f"  {name:12s} {seconds * 1e3:8.1f} ms")
    for name in ("ring", "ring_ir"):
        ratio = medians[name] / medians["nce"]
        verdict = "ok" if ratio <= TARGET else "ABOVE TARGET"
        print(f"{name} / nce: {ratio:.3f} (target <= {TARGET}) {verdict}")
    print(f"sorted ring / ring: {medians['sorted_ring'] / medians['ring']:.2f}x")
    print(machine_line())
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
