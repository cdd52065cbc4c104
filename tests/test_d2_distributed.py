"""Detectron2 on several CPU processes (gloo): the launcher, MoCo's naiveSyncBN, two "machines" on this host,
and a killed run resumed from its checkpoint.

The default suite keeps one small 2-process run (``syn_det --num-procs 2``); the rest is ``slow``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ringbench.cli import run_main
from ringbench.store import load_records
from tests.helpers import REPO, write_card
from transfer.run import main as run_transfer

pytest.importorskip("detectron2")

TINY = ["--ims-per-batch", "2", "--syn-train-images", "4", "--syn-val-images", "2"]


@pytest.fixture(scope="module")
def card(tmp_path_factory) -> Path:
    return write_card(tmp_path_factory.mktemp("card") / "r18.pth", arch="resnet18", stem="cifar")


def _common(card: Path, tmp_path: Path) -> list[str]:
    return [
        "--backbone",
        str(card),
        "--task",
        "syn_det",
        "--device",
        "cpu",
        "--results",
        str(tmp_path / "res"),
        "--output-dir",
        str(tmp_path / "runs"),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]


@pytest.mark.heavy
def test_syn_det_on_two_cpu_processes(card, tmp_path, capsys):
    """``--device cpu --num-procs 2``: two gloo processes train with DDP and evaluate; the record says so."""
    code = run_main(run_transfer, [*_common(card, tmp_path), "--num-procs", "2", "--iters", "2", *TINY])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    (record,) = load_records(tmp_path / "res")
    assert record["extra"]["world_size"] == 2 and record["extra"]["ims_per_batch"] == 2
    assert record["extra"]["launch"]["backend"] == "gloo" and record["extra"]["launch"]["procs_per_machine"] == 2
    assert record["extra"]["norm"] == {"RESNETS.NORM": "naiveSyncBN", "FPN.NORM": "naiveSyncBN"}
    assert all(math.isfinite(v) for v in record["metrics"].values()) and "bbox/AP" in record["metrics"]
    (seed_dir,) = (tmp_path / "runs").glob("*/syn_det/*/seed0")
    assert (seed_dir / "log.txt.rank1").is_file()  # the second rank ran and logged on its own


def test_launch_flags_are_checked(card, tmp_path, capsys):
    common = [*_common(card, tmp_path), *TINY]
    for argv, message in [
        (["--num-gpus", "2"], "--num-gpus 2 needs --device cuda"),
        (["--num-machines", "2"], "needs --dist-url tcp://HOST:PORT"),
        (["--num-machines", "2", "--machine-rank", "2", "--dist-url", "tcp://h:1"], "--machine-rank must be in 0..1"),
        (["--num-procs", "0"], "--num-procs must be at least 1"),
        (["--num-procs", "2", "--ims-per-batch", "3"], "does not split over 2 processes"),
    ]:
        code = run_main(run_transfer, [*common, *argv])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (argv, err[-500:])


# --- naiveSyncBN on 2 gloo processes == BN over the whole batch on one ----------------------------------------
def _bn_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 5, 6, generator=g) * 2 + 1
    w_out = torch.randn(8, 3, 5, 6, generator=g)  # the loss weights: loss = sum(out * w_out)
    weight, bias = torch.rand(3, generator=g) + 0.5, torch.randn(3, generator=g)
    return x, w_out, weight, bias


def _naive_sync_bn_worker(out_file: str) -> None:
    import torch.distributed as dist

    from transfer.d2.compat import d2

    D2 = d2()
    comm = D2.utils.comm
    rank, world = comm.get_rank(), comm.get_world_size()
    x, w_out, weight, bias = _bn_batch()
    half = x.shape[0] // world
    part = x[rank * half : (rank + 1) * half].clone().requires_grad_(True)
    bn = D2.layers.get_norm("naiveSyncBN", 3)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    out = bn(part)
    (out * w_out[rank * half : (rank + 1) * half]).sum().backward()
    grads = torch.stack([bn.weight.grad, bn.bias.grad])
    dist.all_reduce(grads)  # the gradient of the whole loss (the sum of the ranks' losses)
    outs = comm.gather({"out": out.detach(), "grad_in": part.grad}, dst=0)
    if comm.is_main_process():
        torch.save(
            {
                "out": torch.cat([o["out"] for o in outs]),
                "grad_in": torch.cat([o["grad_in"] for o in outs]),
                "grad_weight": grads[0],
                "grad_bias": grads[1],
                "running_mean": bn.running_mean,
                "running_var": bn.running_var,
                "world_size": world,
            },
            out_file,
        )


@pytest.mark.slow
def test_naive_sync_bn_on_two_processes_equals_bn_on_the_whole_batch(tmp_path):
    """Detectron2's NaiveSyncBatchNorm over 2 gloo processes, each with half the batch, against
    ``nn.BatchNorm2d`` over the whole batch in one process: outputs, gradients (input, weight, bias) and
    running mean to 1e-5. The running variance is Detectron2's biased estimate (E[x^2] - E[x]^2, its
    ``NaiveSyncBatchNorm.forward``), where BatchNorm2d keeps the unbiased one: equal after the factor
    (n-1)/n, n = N*H*W values per channel."""
    from transfer.d2.launch import Launch, launch

    out_file = tmp_path / "bn.pt"
    launch(_naive_sync_bn_worker, Launch(procs_per_machine=2, backend="gloo"), (str(out_file),))
    got = torch.load(out_file, weights_only=True)
    assert got["world_size"] == 2
    x, w_out, weight, bias = _bn_batch()
    ref = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        ref.weight.copy_(weight)
        ref.bias.copy_(bias)
    xr = x.clone().requires_grad_(True)
    out = ref(xr)
    (out * w_out).sum().backward()
    torch.testing.assert_close(got["out"], out.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["grad_in"], xr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["grad_weight"], ref.weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["grad_bias"], ref.bias.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["running_mean"], ref.running_mean, atol=1e-5, rtol=1e-5)
    n = x.shape[0] * x.shape[2] * x.shape[3]
    m = ref.momentum
    unbiased = (ref.running_var - (1 - m)) / m
    torch.testing.assert_close(got["running_var"], (1 - m) + m * unbiased * (n - 1) / n, atol=1e-5, rtol=1e-5)


# --- two "machines" on this host, one process each ----------------------------------------------------------
def _cli(argv: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "PASSIVE"}
    with open(log, "w") as handle:
        return subprocess.Popen(
            [sys.executable, str(REPO / "transfer" / "run.py"), *argv],
            cwd=REPO,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@pytest.mark.slow
def test_two_machines_on_this_host(card, tmp_path):
    """``--num-machines 2 --machine-rank 0/1 --dist-url tcp://127.0.0.1:PORT``: two launches, one process each,
    complete one run; machine 0 writes the record (world size 2), machine 1 none."""
    from transfer.d2.launch import free_port

    url = f"tcp://127.0.0.1:{free_port()}"
    argv = [*_common(card, tmp_path), "--iters", "2", *TINY, "--num-machines", "2", "--dist-url", url]
    procs = [_cli([*argv, "--machine-rank", str(r)], tmp_path / f"machine{r}.log") for r in (0, 1)]
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    logs = [(tmp_path / f"machine{r}.log").read_text() for r in (0, 1)]
    assert codes == [0, 0], [log[-2000:] for log in logs]
    assert "machine 0 writes the record" in logs[1]
    (record,) = load_records(tmp_path / "res")
    assert record["extra"]["world_size"] == 2
    assert record["extra"]["launch"]["num_machines"] == 2 and record["extra"]["launch"]["procs_per_machine"] == 1


# --- a killed run resumes from its last checkpoint --------------------------------------------------------------
@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint(card, tmp_path):
    """A run killed after its first checkpoint resumes from it on a rerun (the log says from which
    iteration), and a rerun of the finished seed does not train again."""
    argv = [*_common(card, tmp_path), "--iters", "40", *TINY]  # a checkpoint every 4 iterations
    proc = _cli(argv, tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 600
        while not list((tmp_path / "runs").glob("*/syn_det/*/seed0/last_checkpoint")):
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    (seed_dir,) = (tmp_path / "runs").glob("*/syn_det/*/seed0")
    saved = (seed_dir / "last_checkpoint").read_text().strip()
    assert saved.startswith("model_0") and not (seed_dir / "results.json").exists()
    state = torch.load(seed_dir / saved, weights_only=True)  # our checkpoints hold tensors and numbers only
    done = int(state["iteration"])
    assert 3 <= done < 39 and (done + 1) % 4 == 0
    assert "optimizer" in state["trainer"]["_trainer"] and state["trainer"]["hooks"]  # optimizer and LR schedule

    code = run_main(run_transfer, argv)
    assert code == 0
    log = (seed_dir / "log.txt").read_text()
    assert f"resuming from iteration {done + 1} of 40" in log
    assert f"trained {40 - done - 1} iterations" in log
    metrics = [json.loads(line) for line in (seed_dir / "metrics.json").read_text().splitlines()]
    assert metrics[-1]["iteration"] == 39
    (record,) = load_records(tmp_path / "res")
    assert record["extra"]["launch"]["per_seed"][0]["resumed_from_iter"] == done + 1

    for path in (tmp_path / "res").rglob("*.json"):
        path.unlink()  # the record goes; the seed's result stays: the rerun trains nothing
    code = run_main(run_transfer, argv)
    assert code == 0
    assert len(load_records(tmp_path / "res")) == 1
    assert (seed_dir / "log.txt").read_text().count("trained ") == 1


# --- the sweep's multi-node jobs ------------------------------------------------------------------------------
def test_sweep_multi_node_job_takes_rank_and_rendezvous_from_slurm(card, tmp_path, monkeypatch):
    """A plan job with ``nodes: 2`` asks for two machines; on each Slurm node its arguments get that node's
    rank and the first host of the job as rendezvous (submitit's JobEnvironment), the same URL on every node."""
    from sweep.expand import expand
    from sweep.jobs import multi_node_argv, node_rank
    from sweep.plan import Layout, load_plan
    from transfer.d2.launch import LaunchSettings
    from transfer.run import build_parser

    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(
        f"backbones: [{{path: {card}}}]\ntasks:\n  voc_det: {{resources: {{gpus: 8, nodes: 2}}}}\n"
        "  fewshot_digits: {episodes: 5}\n"
    )
    layout = Layout(tmp_path, tmp_path / "res", tmp_path / "sweeps" / "plan")
    jobs = {j.task: j for j in expand(load_plan(plan_file), layout, "cpu")}
    argv = jobs["voc_det"].argv
    assert argv[argv.index("--num-gpus") + 1] == "8" and argv[argv.index("--num-machines") + 1] == "2"
    assert "--num-machines" not in jobs["fewshot_digits"].argv
    assert multi_node_argv(argv) == argv  # outside Slurm: nothing added
    urls = set()
    for node in (0, 1):
        for key, value in {
            "SUBMITIT_EXECUTOR": "slurm",
            "SLURM_JOB_ID": "4321",
            "SLURM_NODEID": str(node),
            "SLURM_JOB_NODELIST": "gpu[07-08]",
        }.items():
            monkeypatch.setenv(key, value)
        args = build_parser().parse_args(multi_node_argv(argv))
        assert (args.machine_rank, args.num_machines) == (node, 2) and node_rank() == node
        assert set(vars(args)) >= {f.name for f in dataclasses.fields(LaunchSettings)}
        urls.add(args.dist_url)
    (url,) = urls
    assert url.startswith("tcp://gpu07:")
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"backbones: [{{path: {card}}}]\ntasks:\n  fewshot_digits: {{resources: {{nodes: 2}}}}\n")
    from ringbench.errors import UserError

    with pytest.raises(UserError, match="nodes > 1 needs a Detectron2 task"):
        expand(load_plan(bad), layout, "cpu")


def test_launch_resolution_by_device(monkeypatch):
    """NCCL with one process per visible GPU on CUDA, gloo with --num-procs on CPU (no GPU needed to check)."""
    from ringbench.errors import UserError
    from transfer.d2.launch import Launch, resolve

    flags = {"num_gpus": None, "num_procs": None, "num_machines": 1, "machine_rank": 0, "dist_url": None}
    assert resolve(flags, "cpu") == Launch(1, 1, 0, "auto", "gloo")
    assert resolve({**flags, "num_procs": 3}, "cpu").world_size == 3
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    two = resolve({**flags, "num_machines": 2, "machine_rank": 1, "dist_url": "tcp://10.0.0.1:29500"}, "cuda")
    assert two == Launch(8, 2, 1, "tcp://10.0.0.1:29500", "nccl") and two.world_size == 16
    assert resolve({**flags, "num_gpus": 4}, "cuda").procs_per_machine == 4
    assert resolve(flags, "cuda:3").procs_per_machine == 1
    for bad, device, message in [
        ({"num_gpus": 9}, "cuda", "only 8 CUDA devices"),
        ({"num_gpus": 2}, "cuda:1", "give --device cuda"),
        ({"num_procs": 2}, "cuda", "--num-procs is for --device cpu"),
        ({"num_machines": 2, "dist_url": "auto"}, "cpu", "works on one machine only"),
        ({"dist_url": "10.0.0.1:29500"}, "cpu", "expected tcp://HOST:PORT"),
    ]:
        with pytest.raises(UserError, match=message):
            resolve({**flags, **bad}, device)


class _Payload:
    def __reduce__(self):
        return (os.getcwd, ())  # a harmless call standing for arbitrary code


def test_checkpointer_never_unpickles_code(tmp_path):
    """Our Detectron2 checkpointer reads .pth files with weights_only and a .pkl only after the restricted
    unpickler accepted it: a pickle that would call a function is refused with a one-line error."""
    import pickle

    from ringbench.errors import UserError
    from transfer.d2.train import checkpointer_class

    model = torch.nn.Linear(2, 2)
    Checkpointer = checkpointer_class()
    for name in ("evil.pkl", "evil.pth"):
        path = tmp_path / name
        if name.endswith(".pkl"):
            path.write_bytes(pickle.dumps({"model": {"weight": _Payload()}}))
        else:
            torch.save({"model": {"weight": _Payload()}}, path)
        with pytest.raises(UserError, match=r"not allowed|refused|not a"):
            Checkpointer(model).load(str(path))
    saver = Checkpointer(model, str(tmp_path / "ok"))
    (tmp_path / "ok").mkdir()
    saver.save("model_0000001", iteration=1)
    assert (tmp_path / "ok" / "last_checkpoint").read_text() == "model_0000001.pth"
    assert not list((tmp_path / "ok").glob(".*"))  # no temporary file left
    fresh = torch.nn.Linear(2, 2)
    assert Checkpointer(fresh).load(str(tmp_path / "ok" / "model_0000001.pth"))["iteration"] == 1
    torch.testing.assert_close(fresh.weight, model.weight)
