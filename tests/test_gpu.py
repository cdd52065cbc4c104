"""The CUDA path, each piece small (``pytest -m gpu``; ``make check-gpu`` runs it with the GPU benchmarks).

Skipped where CUDA is absent and never part of ``make test``'s selection. What it checks: every pretraining
method two steps on CUDA with AMP and channels-last, its card loading on the CPU with the same features; the
ring on CUDA against the CPU (same members, values to 1e-5, also under autocast); DDP over NCCL in one
process, with SimCLR's SyncBatchNorm and MoCo's shuffle-BN; Detectron2's synthetic tasks on CUDA, in this
process and through the launcher; the few-shot probes, the many-shot linear task and cross-domain few-shot on CUDA
against the CPU; fine-tuning in bf16 with its CUDA generator checkpointed.

``RINGBENCH_GPU_TEST_DEVICE=cpu`` runs the same tests on the CPU (AMP and channels-last then stay off, as the
trainer rules): a check of the tests themselves on a machine without a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ringbench.cli import run_main
from tests.helpers import REPO, free_port, write_card

DEVICE = os.environ.get("RINGBENCH_GPU_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]
ON_CUDA = DEVICE == "cuda"
# Every pretraining recipe; the two steps of each run on synthetic 32-px shapes.
METHODS = (
    "ir",
    "ir_ring",
    "moco",
    "moco_ring",
    "cmc",
    "cmc_ring",
    "simclr",
    "simclr_ring",
    "simclr_hcl",
    "simclr_dcl",
    "supervised",
)
TWO_STEPS = ["train.epochs=1", "train.max_steps_per_epoch=2", "train.batch_size=32", "knn.enabled=false"]


def _pretrain(tmp_path: Path, config: str, *extra: str) -> Path:
    from pretrain.run import main

    out = tmp_path / f"{config}.pth"
    argv = ["--config", config, "--profile", "demo", "--device", DEVICE, "--out", str(out)]
    argv += ["--workdir", str(tmp_path / config), "--no-progress", *TWO_STEPS, *extra]
    assert run_main(main, argv) == 0
    return out


def _losses(workdir: Path) -> list[float]:
    lines = [json.loads(line) for line in (workdir / "log.jsonl").read_text().splitlines()]
    return [float(v) for line in lines for k, v in line.items() if k == "loss"]


def _features(card_path: Path, device: str, amp: bool) -> torch.Tensor:
    from transfer.checkpoints import load_backbone

    model = load_backbone(card_path).build_model(device).eval()  # as a transfer task builds it (CMC: two streams)
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    context = torch.autocast("cuda", dtype=torch.float16) if amp else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), context:
        return model(images).float().cpu()


@pytest.mark.parametrize("config", METHODS)
def test_every_method_trains_two_steps_with_amp_and_its_card_loads_on_the_cpu(tmp_path, config):
    card = _pretrain(tmp_path, config)
    losses = _losses(tmp_path / config)
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    on_cpu = _features(card, "cpu", amp=False)
    here = _features(card, DEVICE, amp=ON_CUDA)
    assert torch.isfinite(on_cpu).all()
    torch.testing.assert_close(here, on_cpu, rtol=2e-2, atol=2e-2)  # fp16 autocast against fp32


@pytest.mark.parametrize("samples", [None, 512])
def test_the_ring_on_the_device_matches_the_cpu(samples):
    from pretrain.losses import pair_logits, ring_logits, ring_loss

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(64, 128, generator=g), torch.randn(64, 128, generator=g)
    queue = torch.nn.functional.normalize(torch.randn(65536, 128, generator=g), dim=1)

    def loss_on(device: str, autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x = q.to(device).requires_grad_()
        draws = torch.Generator(device=device).manual_seed(1) if samples else None
        context = torch.autocast("cuda", dtype=torch.float16) if autocast else torch.autocast("cpu", enabled=False)
        with context:
            value = ring_loss(x, k.to(device), queue.to(device), 0.07, 0.1, 0.1, samples, draws)
        value.backward()
        return value.detach().cpu(), x.grad.cpu()

    reference, reference_grad = loss_on("cpu", False)
    for autocast in (False, ON_CUDA):
        value, grad = loss_on(DEVICE, autocast)
        if samples is None:  # draws come from each device's own generator; the whole ring is exact
            torch.testing.assert_close(value, reference, rtol=1e-5, atol=0)
            torch.testing.assert_close(grad, reference_grad, rtol=1e-4, atol=1e-7)
        assert torch.isfinite(value) and value.dtype == torch.float32  # the loss runs in fp32 under autocast
    _, neg = pair_logits(q, k, queue, 0.07)
    on_cpu = ring_logits(neg, 0.1, 0.1)
    on_device = ring_logits(neg.to(DEVICE), 0.1, 0.1).cpu()
    torch.testing.assert_close(on_device, on_cpu, rtol=1e-5, atol=0)  # the same members, in column order


def test_the_in_batch_ring_on_the_device_matches_the_cpu():
    from pretrain.losses import in_batch_ring_loss

    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(128, 64, generator=g), torch.randn(128, 64, generator=g)
    reference = in_batch_ring_loss(z1, z2, 0.5, 0.5, 0.1)
    value = in_batch_ring_loss(z1.to(DEVICE), z2.to(DEVICE), 0.5, 0.5, 0.1).cpu()
    torch.testing.assert_close(value, reference, rtol=1e-5, atol=0)


@pytest.mark.parametrize("config", ["moco", "simclr"])  # MoCo's shuffle-BN; SimCLR's SyncBatchNorm
def test_ddp_in_one_process_through_torchrun(tmp_path, config):
    out = tmp_path / f"{config}.pth"
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(free_port())]
    argv += ["pretrain/run.py", "--config", config, "--profile", "demo", "--device", DEVICE, "--out", str(out)]
    argv += ["--workdir", str(tmp_path / config), "--no-progress", *TWO_STEPS]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.is_file() and _losses(tmp_path / config)


@pytest.fixture(scope="module")
def small_card(tmp_path_factory) -> Path:
    return write_card(tmp_path_factory.mktemp("card") / "card.pth", arch="resnet18", stem="cifar")


def _transfer(tmp_path: Path, card: Path, task: str, device: str, *flags: str) -> dict:
    from transfer.run import main

    results = tmp_path / f"results-{device}"
    argv = ["--backbone", str(card), "--task", task, "--device", device, "--results", str(results)]
    argv += ["--output-dir", str(tmp_path / f"runs-{device}"), "--cache-dir", str(tmp_path / f"cache-{device}")]
    assert run_main(main, [*argv, *flags]) == 0
    (record_file,) = results.rglob("*.json")
    return json.loads(record_file.read_text())


@pytest.mark.parametrize("task", ["syn_det", "syn_instseg", "syn_kp"])
def test_detectron2_synthetic_tasks_train_on_the_device(tmp_path, small_card, task):
    record = _transfer(tmp_path, small_card, task, DEVICE, "--iters", "20")
    assert record["metrics"] and all(v == v for v in record["metrics"].values())  # no NaN
    ops = record["engine_versions"].get("detectron2_compiled_ops", "")
    print(f"{task}: compiled ops {ops or 'not reported'}")  # the stand-ins, shown with -s


def test_detectron2_through_the_launcher_with_num_gpus_1(tmp_path, small_card):
    flags = ("--iters", "20", "--num-gpus", "1") if ON_CUDA else ("--iters", "20", "--num-procs", "1")
    record = _transfer(tmp_path, small_card, "syn_det", DEVICE, *flags)
    assert record["extra"]["world_size"] == 1


def test_the_few_shot_probes_on_the_device_predict_as_on_the_cpu(tmp_path, small_card):
    for probe in ("logreg", "centroid"):
        flags = ("--probe", probe, "--episodes", "200")
        here = _transfer(tmp_path / probe, small_card, "fewshot_synthetic", DEVICE, *flags)
        cpu = _transfer(tmp_path / probe, small_card, "fewshot_synthetic", "cpu", *flags)
        a = torch.tensor(here["extra"]["episode_accuracies"]["synthetic"])
        b = torch.tensor(cpu["extra"]["episode_accuracies"]["synthetic"])
        assert len(a) == len(b) == 200
        assert (a == b).float().mean() >= 0.995, probe  # episodes whose every query is predicted alike


@pytest.mark.parametrize("task", ["linear_synthetic", "linear_kornblith_synthetic"])  # the grid; Kornblith's path
def test_the_linear_tasks_on_the_device_match_the_cpu(tmp_path, small_card, task):
    here = _transfer(tmp_path, small_card, task, DEVICE)
    cpu = _transfer(tmp_path, small_card, task, "cpu")
    assert abs(here["metrics"]["acc"] - cpu["metrics"]["acc"]) <= 0.5


def test_cross_domain_few_shot_on_the_device_as_on_the_cpu(tmp_path, small_card):
    """BSCD-FSL's twin: ProtoNet's rule predicts alike; the support-set SGD baseline (the same draws on both
    devices, but 100 epochs of float32 steps on features that differ in their last bits) scores alike on average."""
    for probe, tolerance in (("protonet", 0.0), ("sgd_linear", 3.0)):
        flags = ("--probe", probe, "--episodes", "100", "--cdfsl-shots", "5,20", "--cdfsl-synthetic-images", "35")
        here = _transfer(tmp_path / probe, small_card, "cdfsl_synthetic", DEVICE, *flags)
        cpu = _transfer(tmp_path / probe, small_card, "cdfsl_synthetic", "cpu", *flags)
        for metric in ("acc_5shot", "acc_20shot"):
            a, b = torch.tensor(here["extra"]["per_episode"][metric]), torch.tensor(cpu["extra"]["per_episode"][metric])
            assert len(a) == len(b) == 100
            if tolerance:
                assert abs(here["metrics"][metric] - cpu["metrics"][metric]) <= tolerance, (probe, metric)
            else:
                assert (a == b).float().mean() >= 0.99, (probe, metric)


def test_fine_tuning_trains_on_the_device_in_bf16_and_checkpoints_its_generator(tmp_path, small_card):
    """finetune_synthetic on the device (bf16 autocast and channels-last on CUDA): two grid points, the refit and
    the test; the refit's checkpoint holds the CUDA generator's state, so a requeued job resumes it."""
    from transfer.finetune_train import read_checkpoint

    flags = ("--finetune-lrs", "0.1,0.01", "--finetune-wds", "0", "--finetune-steps", "20", "--finetune-workers", "2")
    record = _transfer(tmp_path, small_card, "finetune_synthetic", DEVICE, *flags)
    assert 0 <= record["metrics"]["acc"] <= 100 and len(record["extra"]["grid"]) == 2
    assert all(row["val"] == row["val"] for row in record["extra"]["grid"])  # no NaN
    (checkpoint,) = (tmp_path / f"runs-{DEVICE}").rglob("final/*/checkpoint.pth")
    assert ("cuda_rng" in read_checkpoint(checkpoint)) == ON_CUDA
