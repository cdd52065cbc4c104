"""Test helpers: small real backbone cards and running the CLIs as a user would."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def resnet_state(arch: str = "resnet18", stem: str = "imagenet", seed: int = 0) -> dict[str, torch.Tensor]:
    """A randomly initialised backbone's state dict (torchvision keys, no fc): a copy of one made once
    per (arch, stem, seed), since initialising a ResNet is a large part of many tests' time."""
    state, rng_after = _resnet_state(arch, stem, seed)
    torch.set_rng_state(rng_after)  # the global generator ends where making the model would leave it
    return {k: v.clone() for k, v in state.items()}


@functools.lru_cache(maxsize=16)
def _resnet_state(arch: str, stem: str, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    from ringbench.backbones import create_backbone

    torch.manual_seed(seed)
    state = create_backbone(arch, stem).state_dict()
    return state, torch.get_rng_state()


def write_card(path: Path, arch: str = "resnet18", stem: str = "cifar", seed: int = 0, **meta) -> Path:
    from ringbench.card import BackboneCard, make_meta, save_card

    fields = dict(
        method="moco",
        loss="ring",
        loss_params={"t": 0.07},
        dataset="synthetic",
        epochs=1,
        image_size=32 if stem == "cifar" else 224,
        mean=[0.5, 0.4, 0.3],
        std=[0.25, 0.25, 0.25],
        seed=seed,
        config={},
    )
    fields.update(meta)
    return save_card(
        BackboneCard(arch=arch, stem=stem, state_dict=resnet_state(arch, stem, seed), meta=make_meta(**fields)), path
    )


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python <args>`` from the repository root, as a user would."""
    return subprocess.run([sys.executable, *args], cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a process group's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(fn, world: int, *args) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` processes given the environment torchrun gives its
    workers (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` on a free local
    port), so that code joining a process group from the environment runs as under torchrun, without it.

    Forked, not spawned: the workers start with torch and the test module already imported (seconds
    less). An exception in a worker is raised here; a port taken by another program between its choice
    and the rendezvous (the machine is shared) is retried with another.
    """
    import torch.multiprocessing as mp

    for attempt in range(3):
        try:
            mp.start_processes(
                _process_entry, args=(fn, world, free_port(), args), nprocs=world, join=True, start_method="fork"
            )
            return
        except mp.ProcessRaisedException as error:
            if "address already in use" not in str(error).lower() or attempt == 2:
                raise


def _process_entry(rank: int, fn, world: int, port: int, args: tuple) -> None:
    import os

    os.environ.update(
        WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    fn(rank, world, *args)


def family_args(add_arguments, *argv: str):
    """``argv`` parsed as ``transfer/run.py`` parses a task family's flags (its ``add_arguments``, ``--data-root``)."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--data-root", default=None)
    add_arguments(parser)
    return parser.parse_args(list(argv))


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files in ``folder``, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
