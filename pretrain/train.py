"""The pretraining loop: data -> method steps -> checkpoints, JSONL log, kNN monitor -> backbone card.

* A checkpoint is written atomically after every epoch (``WORKDIR/checkpoint.pth``), before the kNN
  monitor runs (and again with its result); a new run with the same config and work folder resumes
  from it, first running a monitor that the interruption skipped. Data order, augmentations and the
  methods' random draws are seeded per epoch, so a resumed run repeats an uninterrupted one.
* ``WORKDIR/log.jsonl``: one JSON object per line (steps every ``train.log_every``, and epochs),
  appended whole; on resume it is rebuilt from the checkpoint, so the killed epoch's lines go.
* One process per work folder: the main process holds an ``fcntl`` lock on ``WORKDIR/.lock``.
* The kNN monitor (k=200, temperature-weighted) runs on a held-out split after each epoch.
* AMP and channels-last are used on CUDA only.
* Under ``torchrun`` it runs DDP (NCCL on CUDA, gloo on CPU). ``train.batch_size`` is the global
  batch; a ``DistributedSampler`` (also in one process) deals each epoch's shuffled order to the
  processes without overlap, so step ``s`` trains on the same images for any number of processes
  (the tail that does not fill a global batch is dropped). Process 0 writes the log, checkpoints
  and the card (atomically) while the others wait; the logged values are means over processes.
* A non-finite loss stops the run with a clear message; the last good checkpoint is kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from pretrain import distributed as dist
from pretrain import seeds
from pretrain.config import resolved_stem
from pretrain.data.datasets import DataSpec, open_splits
from pretrain.data.transforms import (
    IndexedDataset,
    MultiView,
    eval_transform,
    moco_v2_augmentation,
    ring_official_augmentation,
)
from pretrain.knn import extract_features, knn_accuracy
from pretrain.methods import Method, build_method
from ringbench.card import BackboneCard, load_checkpoint_file, make_meta, save_card
from ringbench.errors import UserError
from ringbench.fileio import append_line, atomic_save, atomic_write_text, folder_lock, remove_stale_temps

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "ringbench-pretrain-checkpoint/1"
CHECKPOINT_NAME = "checkpoint.pth"
LOG_NAME = "log.jsonl"


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    card_path: Path | None
    method: Method
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class DataBundle:
    train: IndexedDataset
    knn_train: Dataset
    knn_test: Dataset
    spec: DataSpec
    image_size: int
    stem: str


def prepare_data(cfg: Mapping[str, Any], views: int, labelled: bool = False) -> DataBundle:
    """The pretraining set (multi-view MoCo v2 augmentations, with indices) and the kNN splits;
    ``labelled``: the pretraining set is the labelled training split (STL-10 without its unlabeled images)."""
    train, knn_train, knn_test, spec = open_splits(cfg["data"])
    if labelled:
        train = knn_train
    size = int(cfg["data"]["image_size"] or spec.image_size)
    dc = cfg["data"]
    if dc["mean"] is not None or dc["std"] is not None:  # a recipe's own normalisation (the card records it)
        spec = dataclasses.replace(spec, mean=tuple(dc["mean"] or spec.mean), std=tuple(dc["std"] or spec.std))
    if dc["augmentation"] == "ring_official":
        augment = ring_official_augmentation(size, spec.mean, spec.std, dc["crop_scale_min"])
    else:
        augment = moco_v2_augmentation(
            size,
            spec.mean,
            spec.std,
            dc["blur"],
            dc["jitter_hue"],
            dc["grayscale"],
            dc["color_jitter"],
            dc["crop_scale_min"],
        )
    plain = eval_transform(size, spec.mean, spec.std, native_size=spec.image_size)
    kc = cfg["knn"]
    return DataBundle(
        train=IndexedDataset(train, MultiView(augment, views)),
        knn_train=_subset(_Transformed(knn_train, plain), kc["max_train"], seed=1),
        knn_test=_subset(_Transformed(knn_test, plain), kc["max_test"], seed=2),
        spec=spec,
        image_size=size,
        stem=resolved_stem(cfg, size),
    )


class _Transformed(Dataset):
    def __init__(self, base: Dataset, transform) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(cast(Sized, self.base))

    def __getitem__(self, index: int):
        image, label = self.base[index]
        return self.transform(image), label


def _subset(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    if limit is None or len(cast(Sized, dataset)) <= limit:
        return dataset
    keep = torch.randperm(len(cast(Sized, dataset)), generator=torch.Generator().manual_seed(seed))[:limit]
    return Subset(dataset, sorted(keep.tolist()))


def evaluate_knn(method: Method, data: DataBundle, cfg: Mapping[str, Any], device: torch.device) -> float:
    """kNN top-1 (%) on the held-out split with the method's backbone features."""
    kc = cfg["knn"]
    loader = lambda ds: DataLoader(ds, batch_size=256, shuffle=False, num_workers=cfg["data"]["workers"])  # noqa: E731
    was_training = method.training
    method.eval()
    encode = lambda x: method.features(_to_device(x, device, cfg))  # noqa: E731
    try:
        train_f, train_y = extract_features(encode, loader(data.knn_train), device)
        test_f, test_y = extract_features(encode, loader(data.knn_test), device)
    finally:
        method.train(was_training)
    labelled = train_y >= 0
    return knn_accuracy(train_f[labelled], train_y[labelled], test_f, test_y, data.spec.num_classes, kc["k"], kc["t"])


def _use_cuda_extras(cfg: Mapping[str, Any], device: torch.device, key: str) -> bool:
    return device.type == "cuda" and bool(cfg["train"][key])


def _to_device(x: torch.Tensor, device: torch.device, cfg: Mapping[str, Any]) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if _use_cuda_extras(cfg, device, "channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def learning_rate(cfg: Mapping[str, Any], epoch: int) -> float:
    """Per-epoch learning rate: ``step`` (x gamma at each milestone fraction of training), ``cosine``, ``constant``.

    ``optim.milestone_rounding="int"`` drops at ``epoch >= int(m * E)`` as the official ring code does;
    ``"exact"`` at ``epoch >= m * E``.
    """
    oc, epochs = cfg["optim"], cfg["train"]["epochs"]
    if oc["schedule"] == "step":
        whole = oc["milestone_rounding"] == "int"
        passed = sum(epoch >= (int(m * epochs) if whole else m * epochs) for m in oc["milestones"])
        return oc["lr"] * oc["gamma"] ** passed
    if oc["schedule"] == "cosine":
        return oc["lr"] * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    return oc["lr"]


def build_optimizer(cfg: Mapping[str, Any], method: Method) -> torch.optim.Optimizer:
    oc = cfg["optim"]
    params = [p for p in method.parameters() if p.requires_grad]
    if oc["name"] == "adam":
        return torch.optim.Adam(params, lr=oc["lr"], weight_decay=oc["weight_decay"])
    return torch.optim.SGD(params, lr=oc["lr"], momentum=oc["momentum"], weight_decay=oc["weight_decay"])


def _plain_config(cfg: Mapping[str, Any]) -> dict:
    return json.loads(json.dumps(cfg))


def config_changes(recorded: Mapping[str, Any], cfg: Mapping[str, Any]) -> list[str]:
    """The dotted keys in which a config stored in a checkpoint or card differs from ``cfg`` ([] = same)."""
    return sorted(_diff(recorded, _plain_config(cfg)))


def load_resume_state(path: Path, cfg: Mapping[str, Any]) -> dict | None:
    if not path.exists():
        return None
    state = load_checkpoint_file(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a pretraining checkpoint; remove it or use another --workdir")
    changed = config_changes(state["config"], cfg)
    if changed:
        raise UserError(
            f"{path}: was written with a different config (differs in {changed[:6]}); "
            "use another --workdir, or --fresh to start over"
        )
    return state


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in set(a) | set(b) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: a crash mid-write leaves the previous checkpoint in place."""
    atomic_save(state, path)


def _append_log(path: Path, record: Mapping[str, Any]) -> None:
    append_line(path, json.dumps(record))  # whole line or nothing, even on a full disk


def rebuild_log(path: Path, history: list[dict[str, Any]]) -> None:
    """The log of a resumed run: each checkpointed epoch's step lines, then its epoch line (from the
    checkpoint's history); the lines of the epoch that was killed are dropped, so none repeats."""
    steps: dict[int, list[str]] = {}
    if path.is_file():
        for line in path.read_bytes().decode("utf-8", "replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut by the kill
            if isinstance(entry, dict) and "step" in entry and isinstance(entry.get("epoch"), int):
                steps.setdefault(entry["epoch"], []).append(line)
    lines = [line for record in history for line in (*steps.get(record["epoch"], ()), json.dumps(record))]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def monitor_due(cfg: Mapping[str, Any], epoch: int) -> bool:
    """Whether the kNN monitor runs after ``epoch`` (1-based): every ``knn.every`` epochs and the last."""
    kc = cfg["knn"]
    return bool(kc["enabled"]) and (epoch % kc["every"] == 0 or epoch == cfg["train"]["epochs"])


def _checkpoint(cfg: Mapping[str, Any], epoch: int, method: Method, optimizer, scaler, history: list) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "config": _plain_config(cfg),
        "epoch": epoch,
        "method": method.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else {},
        "history": history,
    }


def make_card(method: Method, cfg: Mapping[str, Any], data: DataBundle, history: list[dict]) -> BackboneCard:
    """The backbone card of a trained method (the meta the transfer stage reads)."""
    streams = method.card_streams()
    state = {
        (f"{name}." if name else "") + key: value.detach().cpu()
        for name, module in streams.items()
        for key, value in module.state_dict().items()
    }
    meta = make_meta(
        method=method.name,
        loss=cfg["loss"]["name"],
        loss_params=method.loss_params(),
        dataset=data.spec.name,
        epochs=cfg["train"]["epochs"],
        image_size=data.image_size,
        mean=list(data.spec.mean),
        std=list(data.spec.std),
        seed=cfg["train"]["seed"],
        config=_plain_config(cfg),
        knn_top1=next((h["knn_top1"] for h in reversed(history) if "knn_top1" in h), None),
    )
    if any(streams):
        meta["streams"] = list(streams)
    meta.update(method.card_meta())
    return BackboneCard(arch=cfg["arch"], state_dict=state, stem=method.stem, meta=meta)


def train(
    cfg: Mapping[str, Any],
    out: str | Path | None,
    workdir: str | Path,
    device: str | torch.device = "cpu",
    fresh: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Pretrain as ``cfg`` says; resume from ``workdir`` if it holds a checkpoint; write the card to ``out``.

    The main process holds ``workdir``'s lock throughout: a second run on it is refused at once."""
    main_process = int(os.environ.get("RANK", "0")) == 0
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    with folder_lock(workdir, "--workdir") if main_process else contextlib.nullcontext():
        if main_process:
            remove_stale_temps(workdir)  # temporary checkpoints of killed runs
        if device.type == "cuda" and dist.launched_by_torchrun():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_from_env(device)  # the process group torchrun describes, if any; left whatever happens
        try:
            return _train(cfg, out, Path(workdir), device, fresh, progress)
        finally:
            dist.leave()


def wrap_for_processes(method: Method, device: torch.device) -> torch.nn.Module:
    """The module the loop calls: ``method`` itself in one process, else DDP around it (SyncBN first
    for methods that want global batch statistics, on CUDA). Buffers are not broadcast at each step
    (queues and banks stay identical by their gathered updates; BN statistics are shared per epoch)."""
    if dist.world_size() == 1:
        return method
    if method.sync_batchnorm and device.type == "cuda":
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    elif method.sync_batchnorm and dist.is_main():
        log.warning("%s: batch norm is per process on CPU (PyTorch has no CPU SyncBatchNorm)", method.name)
    ddp = torch.nn.parallel.DistributedDataParallel
    # no buffer sync at each forward (the name changed in recent PyTorch; both still sync at init)
    no_sync = (
        "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters else "broadcast_buffers"
    )
    device_ids = [device.index] if device.type == "cuda" else None  # CPU: no device_ids
    options: dict[str, Any] = {no_sync: False}
    return ddp(method, device_ids=device_ids, **options)


def optimisation_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    views: list[torch.Tensor],
    index: torch.Tensor,
    cfg: Mapping[str, Any],
    device: torch.device,
    use_amp: bool,
) -> tuple[float, dict[str, float]]:
    """One step: ``(loss, logs)``, both means over the processes. A loss that is not finite on some
    process is stepped on none (they all see the same mean, and stop together)."""
    loss, logs = _forward(model, views, index, cfg, device, use_amp)
    logs = dist.mean_over_processes({**logs, "_loss": float(loss.detach())})
    value = logs.pop("_loss")
    if math.isfinite(value):
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return value, logs


def _train(
    cfg: Mapping[str, Any], out: str | Path | None, workdir: Path, device: torch.device, fresh: bool, progress: bool
) -> TrainResult:
    world, rank = dist.world_size(), dist.rank()
    tc = cfg["train"]
    if tc["batch_size"] % world:
        raise UserError(f"train.batch_size {tc['batch_size']} is not divisible by the {world} processes")
    per_process = tc["batch_size"] // world

    torch.manual_seed(tc["seed"])
    from pretrain.methods import method_classes

    method_class = method_classes()[cfg["method"]]
    data = prepare_data(cfg, method_class.views, method_class.labelled)
    if method_class.trains and len(data.train) < tc["batch_size"]:
        raise UserError(f"dataset has {len(data.train)} images, fewer than train.batch_size={tc['batch_size']}")
    method = build_method(cfg, len(data.train), data.stem, data.spec.mean, data.spec.std)
    if method.labelled:
        targets = list(cast(Any, data.train.base).targets)  # every dataset reader has targets
        method.set_labels(targets, max(data.spec.num_classes, max(targets, default=-1) + 1))
    method = method.to(device)
    method.check_ring(world)
    if _use_cuda_extras(cfg, device, "channels_last"):
        method = method.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, method)
    use_amp = _use_cuda_extras(cfg, device, "amp")
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    ckpt_path, log_path = workdir / CHECKPOINT_NAME, workdir / LOG_NAME
    if dist.is_main():
        workdir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    state = None if fresh else load_resume_state(ckpt_path, cfg)
    start_epoch, history = 0, []
    if state is None and dist.is_main():
        log_path.unlink(missing_ok=True)  # a new run starts a new log
    if state is not None:
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        if use_amp and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
        if dist.is_main():
            log.info("resuming from %s after epoch %d", ckpt_path, start_epoch)
            if history and monitor_due(cfg, start_epoch) and "knn_top1" not in history[-1]:
                # killed during the monitor, after the epoch's checkpoint: run it now
                history[-1]["knn_top1"] = evaluate_knn(method, data, cfg, device)
                save_checkpoint(ckpt_path, _checkpoint(cfg, start_epoch, method, optimizer, scaler, history))
            rebuild_log(log_path, history)

    model = wrap_for_processes(method, device)

    epochs = tc["epochs"] if method.trains else 0  # the random reference: its card is the initial weights
    last_good = start_epoch
    for epoch in range(start_epoch, epochs):
        lr = learning_rate(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        method.set_epoch(epoch)
        torch.manual_seed(seeds.stream_seed(tc["seed"], seeds.AUGMENT, epoch, rank))  # augmentations, main process
        loader = _epoch_loader(data.train, cfg, per_process, epoch, world, rank)
        steps = len(loader) if tc["max_steps_per_epoch"] is None else min(len(loader), tc["max_steps_per_epoch"])
        model.train()
        bar = _progress(progress and dist.is_main(), steps, f"epoch {epoch + 1}/{epochs}")
        started, seen, loss_sum = time.perf_counter(), 0, 0.0
        for step, (batch_views, index) in enumerate(loader):
            if step >= steps:
                break
            value, logs = optimisation_step(model, optimizer, scaler, batch_views, index, cfg, device, use_amp)
            if not math.isfinite(value):
                kept = (
                    f"the last good checkpoint {ckpt_path} (after epoch {last_good}) is kept"
                    if last_good
                    else "no checkpoint had been written yet"
                )
                raise TrainingDiverged(
                    f"loss became {value} at epoch {epoch + 1}, step {step + 1}: training diverged; "
                    f"{kept}. Lower optim.lr or turn off train.amp, then rerun to resume"
                )
            seen += len(index) * world
            loss_sum += logs["loss"]
            rate = seen / max(time.perf_counter() - started, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4f}", img_s=f"{rate:.1f}")
            if dist.is_main() and (step + 1) % tc["log_every"] == 0:
                _append_log(
                    log_path,
                    {
                        "epoch": epoch + 1,
                        "step": step + 1,
                        "lr": lr,
                        "w_outer": method.w_outer,
                        "images_per_s": round(rate, 2),
                        **logs,
                    },
                )
        bar.close()
        dist.broadcast_batchnorm_stats_(method)  # process 0's BN statistics everywhere
        record = {
            "epoch": epoch + 1,
            "loss": loss_sum / max(steps, 1),
            "lr": lr,
            "w_outer": method.w_outer,
            "images_per_s": round(seen / max(time.perf_counter() - started, 1e-9), 2),
        }
        history.append(record)
        if dist.is_main():
            # the epoch's checkpoint first: a monitor that fails (or is killed) loses no training
            save_checkpoint(ckpt_path, _checkpoint(cfg, epoch + 1, method, optimizer, scaler, history))
            if monitor_due(cfg, epoch + 1):
                record["knn_top1"] = evaluate_knn(method, data, cfg, device)
                save_checkpoint(ckpt_path, _checkpoint(cfg, epoch + 1, method, optimizer, scaler, history))
            _append_log(log_path, record)
            log.info("epoch %d/%d: %s", epoch + 1, epochs, json.dumps(record))
        last_good = epoch + 1
        dist.barrier()

    card_path = None
    if out is not None and dist.is_main():
        card_path = save_card(make_card(method, cfg, data, history), out)
        log.info("wrote backbone card %s", card_path)
    dist.barrier()
    return TrainResult(card_path=card_path, method=method, history=history)


def _forward(
    model: torch.nn.Module,
    views: list[torch.Tensor],
    index: torch.Tensor,
    cfg: Mapping[str, Any],
    device: torch.device,
    use_amp: bool,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One training step's loss (and logs), under autocast on CUDA when AMP is on."""
    views = [_to_device(v, device, cfg) for v in views]
    autocast = torch.autocast("cuda", dtype=torch.float16) if use_amp else contextlib.nullcontext()
    with autocast:
        return model(views, index.to(device))


def _epoch_loader(
    dataset: Dataset, cfg: Mapping[str, Any], batch: int, epoch: int, world: int, rank: int
) -> DataLoader:
    """This process's batches of ``batch`` images in this epoch.

    The order is a function of (seed, epoch): ``DistributedSampler`` shuffles the whole set and deals
    position ``p`` to process ``p % world``, so global step ``s`` holds positions ``[s*B, (s+1)*B)``
    of the order for any ``world`` (``B = world * batch``). ``drop_last`` on the sampler drops at most
    ``world - 1`` images (no process repeats one to even out), on the loader the images that do not fill
    a batch: ``floor(N / B)`` steps either way. Data workers are seeded per (epoch, rank).
    """
    seed = cfg["train"]["seed"]
    sampler: torch.utils.data.DistributedSampler[int] = torch.utils.data.DistributedSampler(
        dataset, world, rank, shuffle=True, seed=seeds.stream_seed(seed, seeds.ORDER), drop_last=True
    )
    sampler.set_epoch(epoch)
    generator = torch.Generator().manual_seed(seeds.stream_seed(seed, seeds.WORKERS, epoch, rank))
    workers = cfg["data"]["workers"]
    return DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        generator=generator,
        num_workers=workers,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw) -> None: ...
    def close(self) -> None: ...


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)
