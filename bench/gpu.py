"""GPU benchmarks: the ratios of the CPU benchmarks where the real runs happen, on CUDA with AMP.

    python bench/gpu.py [--rounds 9] [--batch 64] [--only losses throughput detectron2 probe]

1. ``ring_loss`` / ``nce_loss`` forward+backward under autocast, B=256, K=65,536, D=128 (target <= 1.10);
2. pretraining images/s of ResNet-50 at 224 px with AMP and channels-last: ring-MoCo / MoCo (target >= 0.95),
   and MoCo against a bare torchvision forward-backward loop of the encoder alone (how close a pretraining
   step runs to what the GPU does for one encoder; MoCo adds a key encoder's forward and the queue);
3. our Detectron2 runner against a bare ``SimpleTrainer`` on CUDA (``bench/transfer.py --device cuda``; <= 1.05);
4. the batched few-shot probe on CUDA against scikit-learn (``bench/fewshot.py --device cuda``).

Every timing is the median of interleaved rounds (``bench/interleave.py``) with ``torch.cuda.synchronize`` inside
each call; ratios are printed, never asserted. Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run by path: make the repository importable without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.interleave import interleaved, machine_line
from ringbench.cli import add_common_flags, run_main

PARTS = ("losses", "throughput", "detectron2", "probe")
# ratio -> (target, "<=" or ">="); the MoCo / bare-encoder ratio is reported without one
TARGETS = {
    "ring / nce, AMP, B=256 K=65,536 D=128": (1.10, "<="),
    "ring-MoCo / MoCo images/s, ResNet-50 224 px, AMP": (0.95, ">="),
}


def synced(fn):
    """``fn`` with the GPU's queue drained after it, so that wall time is the GPU's time."""

    def call() -> None:
        fn()
        torch.cuda.synchronize()

    return call


def loss_ratios(rounds: int) -> dict[str, float]:
    from pretrain.losses import nce_loss, ring_loss

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(256, 128, device="cuda", generator=g)
    k = torch.randn(256, 128, device="cuda", generator=g)
    queue = torch.nn.functional.normalize(torch.randn(65536, 128, device="cuda", generator=g), dim=1)

    def fwd_bwd(loss) -> None:
        x = q.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.float16):
            value = loss(x)
        value.backward()

    medians = interleaved(
        {
            "nce": synced(lambda: fwd_bwd(lambda x: nce_loss(x, k, queue, 0.07))),
            "ring": synced(lambda: fwd_bwd(lambda x: ring_loss(x, k, queue, 0.07, 0.1, 0.1))),
        },
        rounds,
    )
    return {"ring / nce, AMP, B=256 K=65,536 D=128": medians["ring"] / medians["nce"]}


def throughput_ratios(rounds: int, batch: int) -> dict[str, float]:
    import torchvision

    from pretrain.config import load_config
    from pretrain.methods import build_method

    images = torch.rand(batch, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    views = [images, images.flip(3)]
    index = torch.arange(batch, device="cuda")

    def method_step(loss: str):
        cfg = load_config(None, ["method=moco", f"loss.name={loss}", "arch=resnet50", f"train.batch_size={batch}"])
        torch.manual_seed(0)
        method = build_method(cfg, 1_281_167, "imagenet").to("cuda").to(memory_format=torch.channels_last)
        method.set_epoch(0)
        optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.03, momentum=0.9)
        scaler = torch.amp.GradScaler("cuda")

        def step() -> None:
            with torch.autocast("cuda", dtype=torch.float16):
                value, _ = method(views, index)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(value).backward()
            scaler.step(optimizer)
            scaler.update()

        return step

    encoder = torchvision.models.resnet50(num_classes=128).to("cuda").to(memory_format=torch.channels_last)
    bare_optimizer = torch.optim.SGD(encoder.parameters(), lr=0.03, momentum=0.9)
    bare_scaler = torch.amp.GradScaler("cuda")

    def bare_step() -> None:
        with torch.autocast("cuda", dtype=torch.float16):
            value = encoder(images).float().pow(2).mean()
        bare_optimizer.zero_grad(set_to_none=True)
        bare_scaler.scale(value).backward()
        bare_scaler.step(bare_optimizer)
        bare_scaler.update()

    medians = interleaved(
        {"MoCo": synced(method_step("nce")), "ring-MoCo": synced(method_step("ring")), "bare": synced(bare_step)},
        rounds,
    )
    for name, seconds in medians.items():
        print(f"   {name:10s} {batch / seconds:8.1f} images/s (median step {seconds * 1e3:.1f} ms)")
    return {
        "ring-MoCo / MoCo images/s, ResNet-50 224 px, AMP": medians["MoCo"] / medians["ring-MoCo"],
        "MoCo / bare encoder forward-backward images/s": medians["bare"] / medians["MoCo"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds (medians are compared)")
    parser.add_argument("--batch", type=int, default=64, help="pretraining batch (throughput part)")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="the parts to run")
    add_common_flags(parser)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here; nothing measured (run it on a GPU machine, see docs/benchmarks.md)")
        return 0
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(machine_line())
    ratios: dict[str, float] = {}
    if "losses" in args.only:
        ratios.update(loss_ratios(args.rounds))
    if "throughput" in args.only:
        ratios.update(throughput_ratios(args.rounds, args.batch))
    for name, value in ratios.items():
        target, sense = TARGETS.get(name, (None, ""))
        if target is None:
            print(f"{name}: {value:.3f}")
            continue
        met = value <= target if sense == "<=" else value >= target
        print(f"{name}: {value:.3f} (target {sense} {target}) {'ok' if met else 'MISSED'}")
    if "detectron2" in args.only:
        from bench import transfer

        transfer.main(["--device", "cuda"])
    if "probe" in args.only:
        from bench import fewshot

        fewshot.main(["--device", "cuda", "--rounds", "3"])
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
