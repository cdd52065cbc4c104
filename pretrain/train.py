"""The pretraining loop: data -> method steps -> checkpoints, JSONL log, kNN monitor -> backbone card.

* A checkpoint is written atomically after every epoch (``WORKDIR/checkpoint.pth``); a new run
  with the same config and work folder resumes from it. Data order, augmentations and the
  methods' random draws are seeded per epoch, so a resumed run repeats an uninterrupted one.
* ``WORKDIR/log.jsonl``: one JSON object per line (steps every ``train.log_every``, and epochs).
* The kNN monitor (k=200, temperature-weighted) runs on a held-out split after each epoch.
* AMP and channels-last are used on CUDA only.
* Under ``torchrun`` it runs DDP (NCCL on CUDA, gloo on CPU); process 0 writes files.
* A non-finite loss stops the run with a clear message; the last good checkpoint is kept.
"""

from __future__ import annotations

import contextlib
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
from pretrain.data.transforms import IndexedDataset, MultiView, eval_transform, moco_v2_augmentation
from pretrain.knn import extract_features, knn_accuracy
from pretrain.methods import Method, build_method
from ringbench.card import BackboneCard, load_checkpoint_file, make_meta, save_card
from ringbench.errors import UserError
from ringbench.fileio import atomic_save

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
    augment = moco_v2_augmentation(
        size, spec.mean, spec.std, dc["blur"], dc["jitter_hue"], dc["grayscale"], dc["color_jitter"]
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
    """Per-epoch learning rate: ``step`` (x gamma at each milestone fraction of training), ``cosine``, ``constant``."""
    oc, epochs = cfg["optim"], cfg["train"]["epochs"]
    if oc["schedule"] == "step":
        passed = sum(epoch >= m * epochs for m in oc["milestones"])
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
    with open(path, "a") as handle:  # one write per line
        handle.write(json.dumps(record) + "\n")


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
    """Pretrain as ``cfg`` says; resume from ``workdir`` if it holds a checkpoint; write the card to ``out``."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    dist.init_from_env(device)
    if device.type == "cuda" and dist.launched_by_torchrun():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
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

    workdir = Path(workdir)
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

    model: torch.nn.Module = method
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )

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
            loss, logs = _forward(model, batch_views, index, cfg, device, use_amp)
            if not torch.isfinite(loss):
                kept = (
                    f"the last good checkpoint {ckpt_path} (after epoch {last_good}) is kept"
                    if last_good
                    else "no checkpoint had been written yet"
                )
                raise TrainingDiverged(
                    f"loss became {loss.detach().item()} at epoch {epoch + 1}, step {step + 1}: training diverged; "
                    f"{kept}. Lower optim.lr or turn off train.amp, then rerun to resume"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
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
        if world > 1:
            dist.broadcast_buffers_(method)  # BN statistics of process 0 everywhere
        record = {
            "epoch": epoch + 1,
            "loss": loss_sum / max(steps, 1),
            "lr": lr,
            "w_outer": method.w_outer,
            "images_per_s": round(seen / max(time.perf_counter() - started, 1e-9), 2),
        }
        kc = cfg["knn"]
        if kc["enabled"] and ((epoch + 1) % kc["every"] == 0 or epoch + 1 == epochs) and dist.is_main():
            record["knn_top1"] = evaluate_knn(method, data, cfg, device)
        history.append(record)
        if dist.is_main():
            _append_log(log_path, record)
            state = {
                "format": CHECKPOINT_FORMAT,
                "config": _plain_config(cfg),
                "epoch": epoch + 1,
                "method": method.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if use_amp else {},
                "history": history,
            }
            save_checkpoint(ckpt_path, state)
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
    """This epoch's batches: order and worker seeds are a function of (seed, epoch)."""
    seed = cfg["train"]["seed"]
    generator = torch.Generator().manual_seed(seeds.stream_seed(seed, seeds.ORDER, epoch))
    sampler: torch.utils.data.DistributedSampler | None = None
    if world > 1:
        sampler = torch.utils.data.DistributedSampler(dataset, world, rank, shuffle=True, seed=seed, drop_last=True)
        sampler.set_epoch(epoch)
    workers = cfg["data"]["workers"]
    return DataLoader(
        dataset,
        batch_size=batch,
        shuffle=sampler is None,
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
