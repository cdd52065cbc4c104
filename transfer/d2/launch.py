"""One launch path for Detectron2 runs: N processes on one machine or on M machines, on GPU or CPU.

Detectron2 v0.6's ``launch`` asserts CUDA and hard-codes NCCL (``detectron2/engine/launch.py``), so it
cannot run a process group on CPU. This module keeps its shape and flag names (``--num-gpus``,
``--num-machines``, ``--machine-rank``, ``--dist-url``) and chooses the backend by device: NCCL on CUDA
(one process per GPU, ``torch.cuda.set_device(local_rank)``), gloo on CPU (``--num-procs`` processes).
Each worker joins the process group, sets Detectron2's per-machine group
(``detectron2.utils.comm._LOCAL_PROCESS_GROUP``, which ``comm.get_local_rank`` and
``comm.get_local_size`` read) as Detectron2's own worker does, and waits at ``comm.synchronize``.

Under Slurm (the sweep's multi-node jobs) the machine rank and the rendezvous address come from the job
environment: :func:`slurm_rendezvous` (submitit's ``JobEnvironment``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ringbench.config import add_schema_flags, settings_from_args
from ringbench.errors import UserError

TIMEOUT = datetime.timedelta(minutes=30)  # Detectron2's DEFAULT_TIMEOUT


@dataclass
class LaunchSettings:
    """How a Detectron2 run is spread over processes (not part of a record's identity: the total batch
    and the schedule are; see :func:`transfer.d2.tasks.make_config`)."""

    num_gpus: Optional[int] = field(
        default=None, metadata={"help": "with --device cuda: GPUs (processes) per machine (default: all visible)"}
    )
    num_procs: Optional[int] = field(
        default=None, metadata={"help": "with --device cpu: processes per machine, joined by gloo (default: 1)"}
    )
    num_machines: int = field(default=1, metadata={"help": "machines taking part in each run"})
    machine_rank: int = field(default=0, metadata={"help": "this machine's rank, 0..num-machines-1"})
    dist_url: Optional[str] = field(
        default=None,
        metadata={
            "help": "rendezvous of the process group, the same on every machine: tcp://HOST:PORT with machine 0's "
            "address (default on one machine: a free local port)"
        },
    )


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    add_schema_flags(parser, LaunchSettings, "Detectron2 processes and machines (Detectron2's flag names)")


@dataclass(frozen=True)
class Launch:
    """A resolved launch: ``procs_per_machine`` x ``num_machines`` processes, ``backend`` by device."""

    procs_per_machine: int = 1
    num_machines: int = 1
    machine_rank: int = 0
    dist_url: str = "auto"
    backend: str = "gloo"

    @property
    def world_size(self) -> int:
        return self.procs_per_machine * self.num_machines

    def as_dict(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "procs_per_machine": self.procs_per_machine,
            "num_machines": self.num_machines,
            "backend": self.backend,
        }


def resolve(settings: dict[str, Any], device: str) -> Launch:
    """Check the launch flags against the device; one-line errors for what cannot run."""
    cuda = device.startswith("cuda")
    machines, rank, url = int(settings["num_machines"]), int(settings["machine_rank"]), settings["dist_url"]
    if machines < 1:
        raise UserError(f"--num-machines must be at least 1, got {machines}")
    if not 0 <= rank < machines:
        raise UserError(f"--machine-rank must be in 0..{machines - 1} (--num-machines {machines}), got {rank}")
    if cuda:
        if settings["num_procs"] is not None:
            raise UserError("--num-procs is for --device cpu; on CUDA give --num-gpus (one process per GPU)")
        procs = num_gpus(device, settings["num_gpus"])
        if procs > 1 and device != "cuda":
            raise UserError(f"--num-gpus {procs} runs one process per GPU: give --device cuda, not {device}")
    else:
        if settings["num_gpus"]:
            raise UserError(f"--num-gpus {settings['num_gpus']} needs --device cuda; on CPU give --num-procs N")
        procs = 1 if settings["num_procs"] is None else int(settings["num_procs"])
        if procs < 1:
            raise UserError(f"--num-procs must be at least 1, got {procs}")
    if url is None:
        if machines > 1:
            raise UserError(
                f"--num-machines {machines} needs --dist-url tcp://HOST:PORT (machine 0's address, the same on "
                f"every machine)"
            )
        url = "auto"
    elif url == "auto" and machines > 1:
        raise UserError("--dist-url auto works on one machine only; give machine 0's tcp://HOST:PORT")
    elif url != "auto" and not url.startswith(("tcp://", "file://", "env://")):
        raise UserError(f"--dist-url {url!r}: expected tcp://HOST:PORT (or file://PATH, env://)")
    return Launch(procs, machines, rank, url, "nccl" if cuda else "gloo")


def launch_from_args(args: argparse.Namespace, device: str) -> Launch:
    return resolve(settings_from_args(args, LaunchSettings), device)


def num_gpus(device: str, requested: int | None) -> int:
    """GPUs per machine: ``--num-gpus``, else all visible for ``--device cuda`` (one for ``cuda:N``)."""
    available = torch.cuda.device_count()
    wanted = requested if requested is not None else (available if device == "cuda" else 1)
    if wanted < 1:
        raise UserError(f"--num-gpus must be at least 1 with --device cuda, got {wanted}")
    if wanted > available:
        raise UserError(f"--num-gpus {wanted}: only {available} CUDA devices are visible")
    return wanted


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(main: Callable[..., Any], spec: Launch, args: tuple = ()) -> None:
    """Run ``main(*args)`` in every process of ``spec`` on this machine (here, if there is one in all)."""
    if spec.world_size == 1:
        main(*args)
        return
    import torch.multiprocessing as mp

    url = f"tcp://127.0.0.1:{free_port()}" if spec.dist_url == "auto" else spec.dist_url
    mp.spawn(_worker, nprocs=spec.procs_per_machine, args=(main, spec, url, args), daemon=False)


def _worker(local_rank: int, main: Callable[..., Any], spec: Launch, url: str, args: tuple) -> None:
    import torch.distributed as dist

    from transfer.d2.compat import d2

    comm = d2().utils.comm
    rank = spec.machine_rank * spec.procs_per_machine + local_rank
    if spec.backend == "gloo":  # share this machine's cores between its processes
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.procs_per_machine))
    dist.init_process_group(spec.backend, init_method=url, world_size=spec.world_size, rank=rank, timeout=TIMEOUT)
    try:
        for machine in range(spec.num_machines):  # every process creates every group, in the same order
            ranks = list(range(machine * spec.procs_per_machine, (machine + 1) * spec.procs_per_machine))
            group = dist.new_group(ranks)
            if machine == spec.machine_rank:
                comm._LOCAL_PROCESS_GROUP = group
        if spec.backend == "nccl":
            torch.cuda.set_device(local_rank)
        comm.synchronize()
        main(*args)
        comm.synchronize()
    finally:
        comm._LOCAL_PROCESS_GROUP = None
        dist.destroy_process_group()


def slurm_rendezvous(port_base: int = 29500) -> tuple[int, str]:
    """This node's rank and the rendezvous URL of a multi-node Slurm job (submitit's ``JobEnvironment``:
    ``SLURM_NODEID`` and the first host of ``SLURM_JOB_NODELIST``; the port is derived from the job id,
    so every node of the job computes the same URL)."""
    import submitit

    env = submitit.JobEnvironment()
    job = str(os.environ.get("SLURM_ARRAY_JOB_ID") or env.job_id).split("_")[0]
    task = os.environ.get("SLURM_ARRAY_TASK_ID", "0")
    port = port_base + (int(job) * 7 + int(task)) % 10000 if job.isdigit() and task.isdigit() else port_base
    return int(env.node), f"tcp://{env.hostnames[0]}:{port}"
