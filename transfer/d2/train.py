"""Train and evaluate a Detectron2 model from a backbone card (one task, one or more seeds).

The flow of one seed: build the Detectron2 config (task YAML + settings from the card: depth,
stage-2 width, stem, pixel mean/std in 0-255 units, RGB input), build the trainer, load the
converted backbone weights into the model with every ResNet key checked
(:func:`transfer.d2.convert.load_converted`), train, save the final weights, evaluate with
``COCOEvaluator`` (``use_fast_impl`` only with compiled ops) or the VOC evaluator. Several processes
(GPUs with NCCL, CPU processes with gloo, on one or several machines) run through
:mod:`transfer.d2.launch`; the norm is MoCo's ``naiveSyncBN`` (Detectron2's ``NaiveSyncBatchNorm``,
plain BN on one process) as the task YAML says. Checkpoints (``SOLVER.CHECKPOINT_PERIOD``, about ten
per schedule) are written atomically, and a rerun of the same run resumes from the last one.
Per-seed outputs: ``seed<N>/`` with ``log.txt`` (``log.txt.rank<R>`` for other ranks), ``config.yaml``,
``metrics.json`` (Detectron2's JSON writer), ``last_checkpoint``, ``model_final.pth``, ``results.json``
(its presence marks a finished seed, which is not run again).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ringbench.config import config_root
from ringbench.errors import UserError
from ringbench.fileio import atomic_write_text, read_json_object
from ringbench.resnets import RESNETS
from transfer.d2 import convert
from transfer.d2.compat import d2, has_compiled_ops
from transfer.d2.weights import FORCE_HINT, checkpointer_class

CONFIG_DIR = config_root() / "transfer" / "detectron2"
METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
_NORM_KEYS = (("RESNETS", "NORM"), ("FPN", "NORM"), ("ROI_BOX_HEAD", "NORM"), ("ROI_MASK_HEAD", "NORM"))
MAX_CHECKPOINT_PERIOD = 5000  # Detectron2's default period, the ceiling for long schedules


# ----------------------------------------------------------------------------------- config
def config_path(name: str) -> Path:
    return CONFIG_DIR / name


def read_config(name: str) -> dict[str, Any]:
    """A task YAML merged over its ``_BASE_`` chain by Detectron2's own reader (fvcore's
    ``CfgNode.load_yaml_with_base``, which ``merge_from_file`` uses), without importing Detectron2."""
    from fvcore.common.config import CfgNode

    path = config_path(name)
    if not path.is_file():
        raise UserError(f"{path}: Detectron2 task config not found")
    return dict(CfgNode.load_yaml_with_base(str(path), allow_unsafe=False))


def solver_reference(name: str) -> dict[str, Any]:
    """The schedule a task config states (the reference of the linear scaling rule)."""
    import ast

    solver = read_config(name).get("SOLVER", {})
    steps = solver.get("STEPS", ())
    return {
        "ims_per_batch": int(solver.get("IMS_PER_BATCH", 16)),
        "base_lr": float(solver.get("BASE_LR", 0.02)),
        "max_iter": int(solver.get("MAX_ITER", 90000)),
        "steps": list(ast.literal_eval(steps) if isinstance(steps, str) else steps),
        "warmup_iters": int(solver.get("WARMUP_ITERS", 1000)),
    }


def config_sha256(name: str) -> str:
    """Hash of the task's resolved YAML (its ``_BASE_`` chain merged): part of the run's identity."""
    import hashlib

    return hashlib.sha256(json.dumps(read_config(name), sort_keys=True, default=str).encode()).hexdigest()


def scale_schedule(
    reference: Mapping[str, Any], ims_per_batch: int | None = None, iters: int | None = None, lr: float | None = None
) -> dict[str, Any]:
    """The solver schedule for a batch size by the linear scaling rule (Goyal et al., 2017).

    With ``k = ims_per_batch / reference ims_per_batch``: the learning rate is multiplied by ``k``;
    iterations, LR steps and warm-up are divided by ``k`` (same number of epochs). ``iters``
    replaces the iteration count (steps and warm-up keep their fraction of the schedule); ``lr``
    replaces the scaled learning rate.
    """
    ref_batch = int(reference["ims_per_batch"])
    batch = int(ims_per_batch or ref_batch)
    k = batch / ref_batch
    max_iter = max(1, round(int(reference["max_iter"]) / k))
    steps = [max(1, round(int(s) / k)) for s in reference["steps"]]
    warmup = round(int(reference["warmup_iters"]) / k)
    if iters is not None:
        frac = iters / max_iter
        steps = [max(1, round(s * frac)) for s in steps]
        warmup = round(warmup * frac)
        max_iter = int(iters)
    steps = [s for s in steps if s < max_iter]
    return {
        "ims_per_batch": batch,
        "base_lr": float(lr) if lr is not None else float(reference["base_lr"]) * k,
        "max_iter": max_iter,
        "steps": steps,
        "warmup_iters": min(warmup, max_iter),
    }


def checkpoint_period(max_iter: int) -> int:
    """About ten checkpoints per schedule, at most every 5000 iterations (Detectron2's default):
    2400 for VOC's 24k, 5000 for COCO's 90k, 10 for a 100-iteration synthetic run."""
    return max(1, min(MAX_CHECKPOINT_PERIOD, math.ceil(int(max_iter) / 10)))


def build_cfg(config: Mapping[str, Any], backbone: Any, splits: Any, output_dir: Path, device: str, seed: int):
    """The Detectron2 ``CfgNode`` of one seed's run."""
    from transfer.d2.modeling import add_ringbench_config, feature_names_for_stem, register

    D2 = d2()
    register()
    cfg = D2.config.get_cfg()
    add_ringbench_config(cfg)
    cfg.merge_from_file(str(config_path(config["config_file"])))
    spec = RESNETS[backbone.arch]
    depth, res2 = spec.depth, spec.res2_out_channels
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = res2
    cfg.MODEL.RESNETS.STEM_TYPE = backbone.stem
    cfg.MODEL.RPN.IN_FEATURES = feature_names_for_stem(cfg.MODEL.RPN.IN_FEATURES, backbone.stem)
    cfg.MODEL.ROI_HEADS.IN_FEATURES = feature_names_for_stem(cfg.MODEL.ROI_HEADS.IN_FEATURES, backbone.stem)
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.BACKBONE.FREEZE_AT = int(config.get("freeze_at", 0))
    cfg.MODEL.PIXEL_MEAN = [255.0 * float(v) for v in backbone.mean]
    cfg.MODEL.PIXEL_STD = [255.0 * float(v) for v in backbone.std]
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = splits.num_classes
    if cfg.MODEL.KEYPOINT_ON:
        cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS = splits.num_keypoints
        cfg.TEST.KEYPOINT_OKS_SIGMAS = list(splits.kpt_oks_sigmas)
    cfg.DATASETS.TRAIN = tuple(splits.train)
    cfg.DATASETS.TEST = tuple(splits.test)
    cfg.SOLVER.IMS_PER_BATCH = int(config["ims_per_batch"])
    cfg.SOLVER.BASE_LR = float(config["base_lr"])
    cfg.SOLVER.MAX_ITER = int(config["max_iter"])
    cfg.SOLVER.STEPS = tuple(config["steps"])
    cfg.SOLVER.WARMUP_ITERS = int(config["warmup_iters"])
    cfg.SOLVER.CHECKPOINT_PERIOD = checkpoint_period(cfg.SOLVER.MAX_ITER)
    cfg.TEST.EVAL_PERIOD = 0
    cfg.MODEL.DEVICE = device
    cfg.SEED = int(seed)
    cfg.OUTPUT_DIR = str(output_dir)
    cfg.freeze()
    return cfg


def layout_of(cfg) -> str:
    return "fpn" if "fpn" in cfg.MODEL.BACKBONE.NAME else "c4"


def norms_of(cfg) -> dict[str, str]:
    """The norm of each part that has one (``RESNETS`` covers the backbone and the C4 res5 head)."""
    return {f"{section}.{key}": cfg.MODEL[section][key] for section, key in _NORM_KEYS if cfg.MODEL[section][key]}


# ---------------------------------------------------------------------------------- trainer
def trainer_class(tensorboard: bool = True):
    """``DefaultTrainer`` with our writers (the console, ``metrics.json`` and, with ``tensorboard``, Detectron2's
    own ``TensorboardXWriter`` into the same folder), evaluators, hooks and checkpointer (built once Detectron2
    is imported)."""
    D2: Any = d2()  # Detectron2's classes exist only at runtime: subclass them as Any
    hooks = D2.engine.hooks
    Checkpointer = checkpointer_class()

    class Trainer(D2.engine.DefaultTrainer):
        def __init__(self, cfg):
            # DefaultTrainer.__init__ (v0.6) with DDP made for the device: Detectron2's create_ddp_model
            # gives DDP device_ids=[local rank], which CPU modules refuse; on CPU they stay None.
            D2.engine.TrainerBase.__init__(self)
            model = self.build_model(cfg)
            optimizer = self.build_optimizer(cfg, model)
            data_loader = self.build_train_loader(cfg)
            ddp_args = {"device_ids": None} if cfg.MODEL.DEVICE == "cpu" else {}
            model = D2.engine.defaults.create_ddp_model(model, broadcast_buffers=False, **ddp_args)
            loop = D2.engine.AMPTrainer if cfg.SOLVER.AMP.ENABLED else D2.engine.SimpleTrainer
            self._trainer = loop(model, data_loader, optimizer)
            self.scheduler = self.build_lr_scheduler(cfg, optimizer)
            self.checkpointer = Checkpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
            self.start_iter = 0
            self.max_iter = cfg.SOLVER.MAX_ITER
            self.cfg = cfg
            self.register_hooks(self.build_hooks())

        # Detectron2 v0.6 leaves the optimizer out of the trainer's state (later versions add it as
        # "_trainer"): without it a resumed run would restart SGD momentum from zero.
        def state_dict(self):
            state = super().state_dict()
            state["_trainer"] = self._trainer.state_dict()
            return state

        def load_state_dict(self, state_dict):
            super().load_state_dict(state_dict)
            if "_trainer" in state_dict:
                self._trainer.load_state_dict(state_dict["_trainer"])

        def build_writers(self):
            os.makedirs(self.cfg.OUTPUT_DIR, exist_ok=True)  # JSONWriter does not create it
            writers = [
                D2.utils.events.CommonMetricPrinter(self.max_iter),
                D2.utils.events.JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json")),
            ]
            if tensorboard:  # loss terms, learning rate, time per iteration (process 0 builds the writers)
                writers.append(D2.utils.events.TensorboardXWriter(self.cfg.OUTPUT_DIR))
            return writers

        def build_hooks(self):
            # Evaluation runs after training (timed on its own); checkpoints every
            # SOLVER.CHECKPOINT_PERIOD iterations, the last one kept, and model_final at the end;
            # the console shows ~10 lines per run.
            period = max(1, min(20, self.max_iter // 10))
            kept = []
            for hook in super().build_hooks():
                if isinstance(hook, hooks.EvalHook):
                    continue
                if isinstance(hook, hooks.PeriodicCheckpointer):
                    period_ckpt = self.cfg.SOLVER.CHECKPOINT_PERIOD
                    hook = hooks.PeriodicCheckpointer(self.checkpointer, period_ckpt, max_to_keep=1)
                if isinstance(hook, hooks.PeriodicWriter):
                    hook = hooks.PeriodicWriter(self.build_writers(), period=period)
                kept.append(hook)
            return kept

        @classmethod
        def build_evaluator(cls, cfg, dataset_name, output_folder=None):
            folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
            kind = D2.data.MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
            if kind == "pascal_voc":
                return D2.evaluation.PascalVOCDetectionEvaluator(dataset_name)
            tasks = (
                ("bbox",) + (("segm",) if cfg.MODEL.MASK_ON else ()) + (("keypoints",) if cfg.MODEL.KEYPOINT_ON else ())
            )
            return D2.evaluation.COCOEvaluator(
                dataset_name,
                tasks=tasks,
                distributed=True,
                output_dir=folder,
                use_fast_impl=has_compiled_ops(),
                kpt_oks_sigmas=tuple(cfg.TEST.KEYPOINT_OKS_SIGMAS),
            )

    return Trainer


@contextlib.contextmanager
def run_logging(output_dir: Path, rank: int = 0) -> Iterator[None]:
    """Detectron2's log to ``output_dir/log.txt`` (and the console on rank 0) for one run."""
    logger = logging.getLogger("detectron2")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    output_dir.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("[%(asctime)s %(name)s]: %(message)s", datefmt="%H:%M:%S")
    name = "log.txt" if rank == 0 else f"log.txt.rank{rank}"  # Detectron2's naming for other ranks
    handlers: list[logging.Handler] = [logging.FileHandler(output_dir / name)]
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()


# ---------------------------------------------------------------------------------- metrics
def flatten_results(results: Mapping[str, Mapping[str, float]]) -> tuple[dict[str, float], dict[str, Any]]:
    """Detectron2 evaluator output -> ``{"bbox/AP": ...}`` and extra information.

    Per-category APs go to the extras. An evaluator that saw no predictions at all returns NaN for
    everything: the AP of an empty prediction set is 0, recorded as such (and noted). Other NaNs
    (e.g. ``APl`` with no large objects) are undefined and left out, listed in the extras.
    """
    metrics: dict[str, float] = {}
    extra: dict[str, Any] = {"per_category": {}, "undefined": [], "no_predictions": []}
    for kind, values in results.items():
        values = dict(values)
        if values and all(isinstance(v, float) and math.isnan(v) for v in values.values()):
            extra["no_predictions"].append(kind)
            values = {k: (0.0 if k in ("AP", "AP50", "AP75") else v) for k, v in values.items()}
        for key, value in values.items():
            name = f"{kind}/{key}"
            if key not in METRIC_KEYS:
                extra["per_category"][name] = None if math.isnan(value) else float(value)
            elif math.isnan(value):
                extra["undefined"].append(name)
            else:
                metrics[name] = float(value)
    return metrics, {k: v for k, v in extra.items() if v}


# -------------------------------------------------------------------------------- one seed
def run_seed(payload: dict[str, Any]) -> None:
    """One seed on this process (or as one rank of a launch); rank 0 writes ``results.json``.

    Training resumes from the seed folder's last checkpoint when there is one (a rerun of a killed
    run: Detectron2's ``resume_or_load(resume=True)``), and the log says from which iteration.
    """
    from transfer.d2 import data as d2data

    D2 = d2()
    comm = D2.utils.comm
    output_dir = Path(payload["output_dir"])
    backbone, config, seed = payload["backbone"], payload["config"], payload["seed"]
    with run_logging(output_dir, comm.get_rank()):
        log = logging.getLogger("detectron2")
        splits = register_datasets(payload["task"], config, payload["cache_dir"], d2data)
        cfg = build_cfg(config, backbone, splits, output_dir, payload["device"], seed)
        D2.utils.env.seed_all_rng(seed + comm.get_rank())
        if comm.is_main_process():
            atomic_write_text(output_dir / "config.yaml", cfg.dump())
        Trainer = trainer_class(payload.get("tensorboard", True))
        timings: dict[str, float] = {}
        start_iter = 0
        if payload.get("eval_only_weights"):
            model = Trainer.build_model(cfg)
            checkpointer_class()(model).load(payload["eval_only_weights"])
        else:
            trainer = Trainer(cfg)
            model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
            converted = convert.torchvision_to_detectron2(backbone.state_dict, layout_of(cfg))
            loaded = convert.load_converted(model, converted, source=str(backbone.path))
            log.info("loaded %d backbone tensors from %s", len(loaded), backbone.name)
            # With a checkpoint in the seed folder: its weights, optimizer, scheduler and iteration;
            # without one, MODEL.WEIGHTS is empty and the converted weights stay.
            trainer.resume_or_load(resume=True)
            start_iter = trainer.start_iter
            if start_iter:
                log.info(
                    "resuming from iteration %d of %d (%s)",
                    start_iter,
                    cfg.SOLVER.MAX_ITER,
                    trainer.checkpointer.get_checkpoint_file(),
                )
            start = time.perf_counter()
            trainer.train()
            timings["train_s"] = time.perf_counter() - start
            trained = cfg.SOLVER.MAX_ITER - start_iter
            timings["iters_per_s"] = trained / timings["train_s"] if trained else 0.0
            if comm.is_main_process():
                for old in output_dir.glob("model_[0-9]*.pth"):  # periodic checkpoints: model_final supersedes them
                    old.unlink()
            log.info(f"trained {trained} iterations in {timings['train_s']:.1f} s ({timings['iters_per_s']:.2f} it/s)")
        start = time.perf_counter()
        results = Trainer.test(cfg, model)
        timings["eval_s"] = time.perf_counter() - start
        if comm.is_main_process():
            metrics, extra = flatten_results(results)
            launch = {
                "world_size": comm.get_world_size(),
                "ims_per_batch": cfg.SOLVER.IMS_PER_BATCH,
                "ims_per_process": cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size(),
                "norm": norms_of(cfg),
                "resumed_from_iter": start_iter,
            }
            atomic_write_text(
                output_dir / "results.json",
                json.dumps(
                    {"metrics": metrics, "extra": extra, "timings": timings, "launch": launch}, indent=1, sort_keys=True
                ),
            )


def register_datasets(task: str, config: Mapping[str, Any], cache_dir: str | None, d2data) -> Any:
    if "synthetic" in config:
        from transfer.d2.synthetic_coco import ensure_synthetic_coco

        root = ensure_synthetic_coco(Path(cache_dir or "cache") / "detectron2", **config["synthetic"])
        return d2data.register_synthetic(root)
    root = Path(config["data_root"])
    d2data.check_files(task, root)
    return d2data.register_voc(root) if task.startswith("voc") else d2data.register_coco(root, task)


def launch_seed(payload: dict[str, Any], spec: Any) -> dict[str, Any] | None:
    """Run one seed on the processes of ``spec`` (:class:`transfer.d2.launch.Launch`); its ``results.json``.

    A seed whose ``results.json`` exists finished before (same card, task and config: the folder is
    named by them) and is not run again. On machines other than machine 0 there is no result here: None.
    """
    from transfer.d2.launch import launch

    result_file = Path(payload["output_dir"]) / "results.json"
    if result_file.is_file():
        logging.getLogger("detectron2").info("seed %s finished before: %s", payload["seed"], result_file)
        print(f"seed {payload['seed']}: finished before, results in {result_file}", file=sys.stderr)
        return read_seed_results(result_file)
    launch(run_seed, spec, (payload,))
    if spec.machine_rank != 0:
        return None
    return read_seed_results(result_file)


def read_seed_results(path: Path) -> dict[str, Any]:
    """A seed's ``results.json``; a damaged one is one line (it is never guessed at)."""
    data = read_json_object(path, "seed results", FORCE_HINT, required=("metrics",))
    if not isinstance(data["metrics"], dict):
        raise UserError(f"{path}: damaged seed results ('metrics' is not an object); {FORCE_HINT}")
    return data
