"""The guarantees (docs/guarantees.md): untrusted files never run code, writes are whole or an error (full disk,
read-only, short writes), bad input is refused in one line before work, names stay inside their
folders, and a killed or concurrent run leaves consistent files."""

from __future__ import annotations

import contextlib
import datetime
import errno
import io
import json
import os
import pickle
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ringbench import fileio
from ringbench.card import load_card, load_checkpoint_file
from ringbench.cli import run_main
from ringbench.errors import UserError
from ringbench.records import make_record
from ringbench.store import load_records, write_record
from tests.helpers import REPO, resnet_state, write_card


# --- untrusted files ------------------------------------------------------------------------------
class _Payload:
    """Unpickling it calls ``open(marker, "w")``: a file appears if a reader runs code from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    path = tmp_path / "code-ran"
    yield path
    assert not path.exists(), "a file's pickle ran code"


def _evil_torch(path: Path, marker: Path, wrap=lambda p: {"state_dict": {"conv1.weight": torch.zeros(1)}, "x": p}):
    torch.save(wrap(_Payload(marker)), path)
    return path


def _evil_pickle(path: Path, marker: Path, wrap=lambda p: {"model": {"conv1.weight": p}}):
    with open(path, "wb") as handle:
        pickle.dump(wrap(_Payload(marker)), handle, protocol=2)
    return path


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and text
    return text


def test_the_payload_would_run_code_if_unpickled(tmp_path, marker):
    """The test's premise: plain unpickling of these files does create the marker."""
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()
    marker.unlink()


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_checkpoint_readers_refuse_code(tmp_path, marker, suffix):
    from transfer.checkpoints import load_backbone
    from transfer.d2.weights import read_model_file

    path = (_evil_torch if suffix == ".pth" else _evil_pickle)(tmp_path / f"evil{suffix}", marker)
    readers = [load_checkpoint_file, load_card, load_backbone, read_model_file]
    for read in readers:
        with pytest.raises(UserError) as info:
            read(path)
        assert str(path) in _one_line(info.value)
    if suffix == ".pth":
        assert "holds Python objects" in str(info.value) and "GLOBAL" in str(info.value).upper()


def test_resume_checkpoint_refuses_code(tmp_path, marker):
    from pretrain.config import load_config
    from pretrain.train import load_resume_state

    _evil_torch(tmp_path / "checkpoint.pth", marker, wrap=lambda p: {"format": "x", "config": {}, "history": p})
    with pytest.raises(UserError, match="holds Python objects"):
        load_resume_state(tmp_path / "checkpoint.pth", load_config(None))


def test_cifar_batches_refuse_code(tmp_path, marker):
    from ringbench.readers import cifar

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
        _evil_pickle(folder / name, marker, wrap=lambda p: {"data": p, "labels": [0]})
    with pytest.raises(UserError, match="not a CIFAR python batch"):
        cifar(tmp_path, "train", 10)


def test_feature_cache_with_a_pickled_array_is_rebuilt_not_run(tmp_path, marker):
    from metadataset.features import load_cached

    folder = tmp_path / "entry"
    folder.mkdir()
    key = {"k": 1}
    (folder / "index.json").write_text(json.dumps({"key": key, "shape": [1, 1], "class_names": ["a"]}))
    np.save(folder / "features.npy", np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    np.save(folder / "labels.npy", np.zeros(1, dtype=np.int64))
    assert load_cached(folder, key) is None


def test_detectron2_eval_weights_are_read_by_the_safe_loader(tmp_path, marker):
    """``--eval-only --weights x.pkl`` goes through ``read_model_file`` (the checkpointer's file
    reader is replaced), for Detectron2 model-zoo and Caffe2 layouts alike."""
    from transfer.d2.weights import read_model_file

    weights = {"conv1.weight": np.ones((2, 3), dtype=np.float32), "res2_momentum": np.zeros(1)}
    zoo = tmp_path / "zoo.pkl"
    with open(zoo, "wb") as handle:
        pickle.dump({"model": weights, "__author__": "Detectron2 Model Zoo"}, handle)
    caffe = tmp_path / "caffe.pkl"
    with open(caffe, "wb") as handle:
        pickle.dump({"blobs": weights}, handle)
    assert read_model_file(str(zoo))["__author__"] == "Detectron2 Model Zoo"
    loaded = read_model_file(str(caffe))
    assert loaded["matching_heuristics"] and list(loaded["model"]) == ["conv1.weight"]
    np.testing.assert_array_equal(loaded["model"]["conv1.weight"], weights["conv1.weight"])
    torch.save({"model": {"a": torch.ones(2)}, "iteration": 3}, tmp_path / "model_final.pth")
    assert torch.equal(read_model_file(str(tmp_path / "model_final.pth"))["model"]["a"], torch.ones(2))
    pytest.importorskip("detectron2")
    from transfer.d2.weights import safe_checkpointer

    checkpointer = safe_checkpointer(torch.nn.Linear(2, 2))
    with pytest.raises(UserError, match="not allowed"):
        checkpointer.load(str(_evil_pickle(tmp_path / "evil.pkl", marker)))


def test_transfer_cli_refuses_a_malicious_backbone_in_one_line(tmp_path, marker, capsys):
    from transfer.run import main

    path = _evil_torch(tmp_path / "evil.pth", marker)
    argv = ["--backbone", str(path), "--task", "fewshot_digits", "--results", str(tmp_path / "r")]
    assert run_main(main, [*argv, "--output-dir", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds Python objects" in err


def test_eval_only_weights_are_refused_before_any_work(tmp_path, marker, card_path, capsys):
    pytest.importorskip("fvcore")
    from transfer.run import main

    evil = _evil_pickle(tmp_path / "model.pkl", marker)
    argv = ["--backbone", str(card_path), "--task", "syn_det", "--eval-only", "--weights", str(evil)]
    argv += ["--results", str(tmp_path / "r"), "--output-dir", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")]
    assert run_main(main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "global io.open is not allowed" in err
    assert not (tmp_path / "c").exists()  # no synthetic data set was built


# --- cards: shapes and values ---------------------------------------------------------------------
def test_card_tensors_are_checked_for_shape_and_finiteness(tmp_path):
    from ringbench.card import BackboneCard, make_meta
    from transfer.checkpoints import load_backbone

    meta = make_meta(method="m", loss="l", dataset="d", image_size=32, mean=[0.5] * 3, std=[0.2] * 3)
    state = resnet_state("resnet18", "cifar")
    bad = dict(state, **{"layer2.0.conv1.weight": torch.zeros(128, 64, 1, 1)})
    torch.save(BackboneCard("resnet18", bad, "cifar", meta).to_dict(), tmp_path / "shape.pth")
    with pytest.raises(UserError, match=r"1 tensors have the wrong shape.*layer2.0.conv1.weight \(128, 64, 1, 1\)"):
        load_backbone(tmp_path / "shape.pth")
    nan = dict(state, **{"bn1.weight": torch.full((64,), float("nan"))})
    torch.save(BackboneCard("resnet18", nan, "cifar", meta).to_dict(), tmp_path / "nan.pth")
    for read in (load_card, load_backbone):
        with pytest.raises(UserError, match=r"NaN or infinite values: \['bn1.weight'\]"):
            read(tmp_path / "nan.pth")
    torch.save(dict(state, **{"conv1.weight": torch.full((64, 3, 3, 3), float("inf"))}), tmp_path / "tv.pth")
    with pytest.raises(UserError, match="NaN or infinite"):
        load_backbone(tmp_path / "tv.pth")  # foreign formats too


# --- checked writes -------------------------------------------------------------------------------
@pytest.fixture
def tiny_fs(tmp_path):
    """A 64 KiB tmpfs (needs root); skipped where it cannot be mounted."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root); the simulated short writes cover this")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _record(**extra) -> dict:
    return make_record(
        backbone="b", backbone_sha256="ab" * 32, task="fewshot_digits", metrics={"acc": 1.0}, config={}, **extra
    )


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file() and p.name.startswith("."))


def test_full_disk_leaves_no_partial_file_and_one_line(tiny_fs, capsys):
    first = write_record(tiny_fs, _record())
    with pytest.raises(fileio.WriteError, match="No space left on device") as info:
        write_record(tiny_fs, _record(extra={"blob": "x" * 200_000}))
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert json.loads(first.read_text())["metrics"] == {"acc": 1.0} and _leftovers(tiny_fs) == []
    with pytest.raises(fileio.WriteError):
        fileio.atomic_save({"w": torch.zeros(100_000)}, tiny_fs / "checkpoint.pth")
    assert not (tiny_fs / "checkpoint.pth").exists() and _leftovers(tiny_fs) == []
    log = tiny_fs / "log.jsonl"
    fileio.append_line(log, '{"step": 1}')
    with pytest.raises(fileio.WriteError):
        fileio.append_line(log, json.dumps({"step": 2, "pad": "y" * 200_000}))
    assert log.read_text() == '{"step": 1}\n'  # the partial line was cut back
    assert run_main(lambda argv: write_record(tiny_fs, _record(extra={"blob": "x" * 200_000})), []) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err
    with open(tiny_fs / "fill", "wb") as fill, contextlib.suppress(OSError):
        fill.write(b"x" * 100_000)  # the rest of the disk
    with pytest.raises(UserError, match="no space left on its file system"):
        fileio.check_writable_dir(tiny_fs / "results", "--results")  # refused before a run starts


class _ShortRaw(io.RawIOBase):
    """A raw file that accepts at most ``chunk`` bytes per write, and fails with ENOSPC after ``limit``."""

    def __init__(self, fd: int, chunk: int, limit: float) -> None:
        self.fd, self.chunk, self.limit, self.written = fd, chunk, limit, 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if self.written >= self.limit:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = os.write(self.fd, bytes(data[: self.chunk]))
        self.written += n
        return n

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if not self.closed:
            os.close(self.fd)
        super().close()


@pytest.mark.parametrize("limit", [float("inf"), 100])
def test_short_writes_are_retried_or_fail_whole(tmp_path, monkeypatch, limit):
    def fdopen(fd, mode="r", encoding=None):
        raw = io.BufferedWriter(_ShortRaw(fd, chunk=7, limit=limit), buffer_size=64)
        return raw if "b" in mode else io.TextIOWrapper(raw, encoding=encoding)

    monkeypatch.setattr(fileio.os, "fdopen", fdopen)
    text = "".join(f"line {i}\n" for i in range(100))
    if limit == float("inf"):
        fileio.atomic_write_text(tmp_path / "table.md", text)
        assert (tmp_path / "table.md").read_text() == text  # every short write was continued
    else:
        with pytest.raises(fileio.WriteError, match="No space left"):
            fileio.atomic_write_text(tmp_path / "table.md", text)
        assert list(tmp_path.iterdir()) == []


def test_unwritable_folders_are_refused_before_work(tmp_path, capsys):
    from transfer.run import main

    ro = tmp_path / "ro"
    ro.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(ro)], capture_output=True)
    (tmp_path / "file").write_text("x")
    card = write_card(tmp_path / "card.pth")
    base = ["--backbone", str(card), "--task", "fewshot_digits", "--cache-dir", str(tmp_path / "c")]
    cases = [["--results", str(tmp_path / "file")], ["--output-dir", str(tmp_path / "file" / "sub")]]
    if done.returncode == 0:
        cases.append(["--results", str(ro / "results")])
    try:
        for extra in cases:
            started = time.perf_counter()
            assert run_main(main, [*base, "--output-dir", str(tmp_path / "o"), *extra]) == 2
            assert time.perf_counter() - started < 10  # before any feature is computed
        err = capsys.readouterr().err.splitlines()
        assert "file: is a file, not a folder" in err[0] and "sub: " in err[1] and "is a file, not" in err[1]
        if done.returncode == 0:
            assert "Read-only file system" in err[2]
    finally:
        if done.returncode == 0:
            subprocess.run(["umount", "-l", str(ro)], check=False)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.json"))


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_every_writer_gives_the_umask_mode(tmp_path, umask, mode):
    from transfer.d2.synthetic_coco import write_synthetic_coco

    old = os.umask(umask)
    try:
        fileio.atomic_save({"a": torch.zeros(1)}, tmp_path / "a.pth")
        fileio.append_line(tmp_path / "log.jsonl", "{}")
        with fileio.atomic_write(tmp_path / "b.npy") as handle:
            np.save(handle, np.zeros(2))
        write_synthetic_coco(tmp_path / "coco", num_train=1, num_val=1)
    finally:
        os.umask(old)
    for name in ("a.pth", "log.jsonl", "b.npy"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name
    assert (tmp_path / "coco").stat().st_mode & 0o777 == 0o777 & ~umask  # a folder, not mkdtemp's 0700


def test_stale_temporary_files_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = fileio.temp_prefix("checkpoint.pth") + "abc.tmp"  # this process: still writing
    killed = live.replace(f"-{os.getpid()}.", f"-{dead.pid}.")
    other_host = ".checkpoint.pth.elsewhere-1.abc.tmp"
    old = ".features.xyz.raw"
    for name in (live, killed, other_host, old, "record.json"):
        (tmp_path / name).write_text("x")
    os.utime(tmp_path / old, (0, 0))
    (tmp_path / "seed0").mkdir()
    (tmp_path / "seed0" / killed).write_text("x")
    assert fileio.remove_stale_temps(tmp_path / "seed0", max_age_s=float("inf")) == [tmp_path / "seed0" / killed]
    (tmp_path / "seed0" / killed).write_text("x")
    removed = fileio.remove_stale_temps(tmp_path)  # not recursive: seed0/ is left alone
    assert sorted(p.name for p in removed) == sorted([killed, old])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live, other_host, "record.json", "seed0"])
    assert fileio.remove_stale_temps(tmp_path, recursive=True) == [tmp_path / "seed0" / killed]


def test_a_workdir_takes_one_process_at_a_time(tmp_path):
    from pretrain.config import load_config
    from pretrain.train import train

    with fileio.folder_lock(tmp_path / "w", "--workdir"):
        with pytest.raises(UserError, match=rf"--workdir {tmp_path / 'w'} is in use by pid {os.getpid()}"):
            train(load_config(None, ["train.epochs=1"]), None, tmp_path / "w", progress=False)
    with fileio.folder_lock(tmp_path / "w"):  # released when the holder ends
        pass


# --- names ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../x", "/abs", "a/b", "..", ".", "", ".hidden", "a\x00b", "x" * 300])
def test_names_are_one_path_component(tmp_path, name):
    with pytest.raises(UserError, match="must be one folder name"):
        fileio.path_component(name, "--name")


def test_a_backbone_name_cannot_leave_the_output_folder(tmp_path, card_path, capsys):
    from transfer.run import main

    argv = ["--backbone", str(card_path), "--task", "fewshot_digits", "--name", "../../escape"]
    argv += ["--results", str(tmp_path / "r"), "--output-dir", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")]
    assert run_main(main, argv) == 2
    assert "must be one folder name" in capsys.readouterr().err
    assert not (tmp_path.parent / "escape").exists()


# --- validation before work -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, message",
    [
        ("data.workers=-1", "data.workers must be at least 0, got -1"),
        ("optim.momentum=-0.5", r"optim.momentum must be in \[0, 1\), got -0.5"),
        ("data.image_size=0", "data.image_size must be > 0, got 0"),
        ("train.max_steps_per_epoch=0", "train.max_steps_per_epoch must be"),
        ("knn.every=0", "knn.every must be"),
        ("knn.max_train=0", "knn.max_train must be"),
        ("optim.weight_decay=nan", "optim.weight_decay must be finite"),
        ("train.epochs=null", "'train.epochs' must be an int"),
    ],
)
def test_pretraining_config_values_are_checked(override, message):
    from pretrain.config import load_config

    with pytest.raises(UserError, match=message):
        load_config(None, [override])


def test_yaml_that_is_not_utf8_is_one_line(tmp_path):
    from pretrain.config import load_config

    (tmp_path / "bad.yaml").write_bytes(b"train:\n  epochs: 2 # \xff\xfe\n")
    with pytest.raises(UserError, match="not UTF-8"):
        load_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--episode-seed", "-1"], "--episode-seed must be at least 0, got -1"),
        (["--weight-decay", "nan"], "--weight-decay must be a positive number"),
        (["--image-size", "0"], "--image-size must be at least 1, got 0"),
        (["--episodes", "100000000"], r"--episodes must be in \[1, 100000\], got 100000000"),
        (["--seeds", "0"], "--seeds: not used by task fewshot_digits"),
        (["--linear-max-iter", "5"], "--linear-max-iter: not used by task fewshot_digits"),
        (["--synthetic-classes", "4"], "--synthetic-classes: not used by task fewshot_digits"),
        (["--shots", "500"], "500-shot 15-query episodes need 5 classes of at least 515 images"),
        (["--device", "bogus"], "--device 'bogus': not a device"),
        (["--episode-mode", "sideways"], "--episode-mode must be 'variable' or 'fixed'"),
    ],
)
def test_transfer_flags_are_checked_before_work(tmp_path, card_path, capsys, flags, message):
    from transfer.run import main

    argv = ["--backbone", str(card_path), "--task", "fewshot_digits", *flags]
    argv += ["--results", str(tmp_path / "r"), "--output-dir", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")]
    assert run_main(main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and __import__("re").search(message, err), err
    assert not (tmp_path / "c" / "features").exists()  # refused before any feature was computed


def test_linear_iterations_are_checked(tmp_path, card_path, capsys):
    from transfer.run import main

    argv = ["--backbone", str(card_path), "--task", "linear_synthetic", "--linear-max-iter", "0"]
    assert run_main(main, [*argv, "--results", str(tmp_path / "r"), "--output-dir", str(tmp_path / "o")]) == 2
    assert "--linear-max-iter must be at least 1, got 0" in capsys.readouterr().err


def test_records_with_wrong_value_types_are_skipped_with_file_and_line(tmp_path):
    good = write_record(tmp_path, _record())
    bad_file = tmp_path / "fewshot_digits" / ("cd" * 32 + "-0123456789abcdef.json")
    bad_file.write_text(json.dumps({**_record(), "backbone_sha256": "cd" * 32, "metrics": {"acc": "high"}}))
    (tmp_path / "old.jsonl").write_bytes(
        json.dumps({**_record(), "backbone_sha256": "ef" * 32, "ci95": [1]}).encode()
        + b'\n{"backbone": "\xff"}\n'
        + json.dumps({**_record(), "backbone_sha256": "12" * 32}).encode()
        + b"\n"
    )
    with pytest.warns(UserWarning) as caught:
        records = load_records(tmp_path)
    messages = [str(w.message) for w in caught]
    assert any(f"{bad_file}: skipping a record with metrics['acc'] = 'high'" in m for m in messages)
    assert any(f"{tmp_path / 'old.jsonl'}:1: skipping a record with 'ci95' of type list" in m for m in messages)
    assert any(f"{tmp_path / 'old.jsonl'}:2: skipping a line that is not UTF-8" in m for m in messages)
    assert sorted(r["backbone_sha256"] for r in records) == sorted(["ab" * 32, "12" * 32])
    assert json.loads(good.read_text())["metrics"] == {"acc": 1.0}
    with pytest.raises(ValueError, match="not a number"):
        write_record(tmp_path, {**_record(), "metrics": {"acc": "high"}})  # never written either


# --- crash semantics ------------------------------------------------------------------------------
@pytest.mark.heavy
def test_monitor_failure_keeps_the_epoch_and_resume_repeats_no_log_line(tmp_path, monkeypatch):
    import pretrain.train as trainer
    from tests.test_pretrain_train import tiny_cfg

    cfg = tiny_cfg("train.epochs=1")
    real_knn = trainer.evaluate_knn

    def broken_monitor(*args, **kwargs):
        raise RuntimeError("monitor failed")

    monkeypatch.setattr(trainer, "evaluate_knn", broken_monitor)
    with pytest.raises(RuntimeError, match="monitor failed"):
        trainer.train(cfg, None, tmp_path / "b", progress=False)
    saved = load_checkpoint_file(tmp_path / "b" / "checkpoint.pth")
    assert saved["epoch"] == 1 and "knn_top1" not in saved["history"][-1]  # the epoch was not lost
    monkeypatch.setattr(trainer, "evaluate_knn", real_knn)
    resumed = trainer.train(cfg, None, tmp_path / "b", progress=False)
    assert [h["epoch"] for h in resumed.history] == [1]
    assert 0 <= resumed.history[0]["knn_top1"] <= 100  # the pending monitor ran on resume
    lines = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [(line["epoch"], line.get("step")) for line in lines] == [(1, 1), (1, 2), (1, None)]
    assert lines[-1] == resumed.history[0]


@pytest.mark.heavy
def test_killed_mid_epoch_resumes_without_repeating_its_steps(tmp_path, monkeypatch):
    import pretrain.train as trainer
    from pretrain.methods.moco import MoCo
    from tests.test_pretrain_train import tiny_cfg

    real_step = MoCo.training_step

    def dies_at_epoch_2_step_2(self, views, index):
        if self.epoch == 1 and getattr(self, "_steps", 0) == 1:
            raise KeyboardInterrupt
        self._steps = getattr(self, "_steps", 0) + (self.epoch == 1)
        return real_step(self, views, index)

    monkeypatch.setattr(MoCo, "training_step", dies_at_epoch_2_step_2)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(tiny_cfg("knn.enabled=false"), None, tmp_path, progress=False)
    before = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert (2, 1) in [(line["epoch"], line.get("step")) for line in before]  # the killed epoch's line
    monkeypatch.setattr(MoCo, "training_step", real_step)
    trainer.train(tiny_cfg("knn.enabled=false"), None, tmp_path, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(line["epoch"], line.get("step")) for line in lines] == [
        (1, 1),
        (1, 2),
        (1, None),
        (2, 1),
        (2, 2),
        (2, None),
    ]


def test_episodes_are_drawn_lazily():
    from metadataset.sampling import FixedEpisodes, iter_episodes, sample_episodes

    labels = np.repeat(np.arange(6), 30)
    drawn = iter_episodes(0, labels, 6, 10**9, FixedEpisodes(5, 1, 2))  # a billion: nothing is built up front
    first = [next(drawn) for _ in range(3)]
    listed = sample_episodes(0, labels, 6, 3, FixedEpisodes(5, 1, 2))
    assert all(np.array_equal(a.support, b.support) and np.array_equal(a.query, b.query) for a, b in zip(first, listed))


def test_print_config_into_a_closed_pipe_is_quiet():
    code = (
        "from ringbench.cli import run_main; import sys; "
        "sys.exit(run_main(lambda a: sum(print(i) or 0 for i in range(10**5))))"
    )
    done = subprocess.run(
        f"{sys.executable} -c '{code}' | head -1", shell=True, capture_output=True, text=True, cwd=REPO
    )
    assert done.stdout == "0\n" and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


def test_declared_ranges_are_on_numbers_and_hold_for_the_defaults():
    import dataclasses
    import typing

    from pretrain.config import RANGES, PretrainConfig
    from ringbench.config import _scalar_type, check_range, compose
    from transfer.d2.tasks import Detectron2Settings
    from transfer.fewshot import FewShotSettings
    from transfer.linear import LinearSettings

    for schema in (FewShotSettings, LinearSettings, Detectron2Settings):
        hints = typing.get_type_hints(schema)
        ranged = [f for f in dataclasses.fields(schema) if "range" in f.metadata]
        assert ranged, schema
        for f in ranged:
            assert _scalar_type(hints[f.name]) in (int, float), (schema.__name__, f.name)
        compose(schema)  # the defaults are within their ranges
    defaults = compose(PretrainConfig)
    for name, (low, high) in RANGES.items():
        section, key = name.split(".")
        if defaults[section][key] is not None:
            check_range(name, defaults[section][key], low, high)


# --- bounded YAML, data folders without cycles, checked card meta and resume files -----------------------------
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi")
)


def test_a_yaml_alias_bomb_is_refused_within_a_second(tmp_path):
    from ringbench.config import load_yaml, parse_override, read_yaml_mapping

    assert load_yaml("a: &x [1, 2]\nb: *x\n", "small") == {"a": [1, 2], "b": [1, 2]}  # aliases as such are fine
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)  # 9**9 values once expanded
    start = time.perf_counter()
    with pytest.raises(UserError, match="expands to more than") as exc:
        read_yaml_mapping(path, "plan")
    assert time.perf_counter() - start < 1.0 and str(path) in _one_line(exc.value)
    with pytest.raises(UserError, match="expands to more than"):
        load_yaml("a: &a [*a]\n", "loop")
    flow = "{" + ALIAS_BOMB.strip().replace("\n", ", ") + "}"
    with pytest.raises(UserError, match="expands to more than"):
        parse_override(f"train.epochs={flow}")


@pytest.mark.parametrize("value", ["[1,2", '"x', "{b:", "*undefined"])
def test_a_yaml_error_inside_an_override_is_one_line(capsys, value):
    from pretrain.run import main

    assert run_main(main, ["--config", "moco", "--print-config", f"train.epochs={value}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: override") and "\n" not in err and "Traceback" not in err


def _image_tree(root: Path, classes=("c0", "c1"), per_class=3) -> Path:
    from PIL import Image

    for name in classes:
        (root / "train" / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(root / "train" / name / f"{i}.png")
    return root


def test_a_symlink_cycle_in_an_image_folder_is_refused_not_read_twice(tmp_path):
    from ringbench.readers import image_folder

    root = _image_tree(tmp_path / "data")
    assert len(image_folder(root, "train")) == 6
    (root / "train" / "c0" / "loop").symlink_to("..")
    with pytest.raises(UserError, match="symlink cycle") as exc:
        image_folder(root, "train")
    assert "c0/loop" in _one_line(exc.value)
    (root / "train" / "c0" / "loop").unlink()
    (root / "train" / "c0" / "more").symlink_to(root / "train" / "c1")  # one folder under two classes
    with pytest.raises(UserError, match="second link"):
        image_folder(root, "train")
    (root / "train" / "c0" / "more").unlink()
    (root / "train" / "c0" / "self").symlink_to("self")
    with pytest.raises(UserError, match="cannot follow"):
        image_folder(root, "train")


def test_a_self_looping_md_root_is_one_line(tmp_path, card_path, capsys):
    from transfer.run import main

    loop = tmp_path / "loop"
    loop.symlink_to("loop")
    argv = ["--backbone", str(card_path), "--task", "md_cub", "--md-root", str(loop), "--results", str(tmp_path)]
    assert run_main(main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert "symlink loop" in err and "\n" not in err


def _spec(folder: Path, **changes) -> Path:
    spec = {
        "__class__": "DatasetSpecification",
        "classes_per_split": {"TRAIN": 0, "VALID": 0, "TEST": 2},
        "images_per_class": {"0": 2, "1": 2},
        "class_names": {"0": "a", "1": "b"},
        "file_pattern": "{}.tfrecords",
        **changes,
    }
    folder.mkdir(exist_ok=True)
    (folder / "dataset_spec.json").write_text(json.dumps(spec))
    return folder


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"classes_per_split": {"TRAIN": 0, "VALID": 0, "TEST": 10**9}}, "count 1,000,000,000 classes"),
        ({"classes_per_split": {"TRAIN": 0, "VALID": 0, "TEST": 1.5}}, "non-negative integer"),
        ({"images_per_class": {"0": 2.5, "1": 2}}, "non-negative integer"),
        ({"images_per_class": {"0": -1, "1": 2}}, "non-negative integer"),
        ({"images_per_class": {"0": 10**9, "1": 2}}, "can hold at most"),
    ],
)
def test_a_meta_dataset_spec_with_absurd_counts_is_refused(tmp_path, changes, message):
    from metadataset.sources import records_source

    folder = _spec(tmp_path / "src", **changes)
    for class_id in (0, 1):
        (folder / f"{class_id}.tfrecords").write_bytes(b"\0" * 64)  # room for at most four records
    with pytest.raises(UserError, match=message):
        records_source("cub", folder, "test")


def test_an_image_folder_source_with_one_folder_under_two_classes_is_refused(tmp_path):
    from metadataset.sources import folder_source

    root = _image_tree(tmp_path / "src")
    (root / "train" / "c2").symlink_to(root / "train" / "c0")
    (root / "train" / "splits.json").write_text(json.dumps({"train": [], "valid": [], "test": ["c0", "c1", "c2"]}))
    with pytest.raises(UserError, match="are one folder"):
        folder_source("cub", root / "train", "test")


@pytest.mark.parametrize(
    "meta, message",
    [
        ({"mean": [0.5, float("nan"), 0.5]}, "3 finite numbers"),
        ({"std": [0.2, 0.2, float("inf")]}, "3 finite numbers"),
        ({"std": [0.2, 0.0, 0.2]}, "must be positive"),
        ({"mean": ["a", 0.1, 0.1]}, "3 finite numbers"),
        ({"image_size": 0}, "positive integer"),
        ({"image_size": 22.4}, "positive integer"),
    ],
)
def test_card_metadata_is_validated_like_its_weights(tmp_path, meta, message):
    path = write_card(tmp_path / "card.pth")
    data = torch.load(path, weights_only=True)
    data["meta"].update(meta)  # as another tool (or a hand edit) might have written it
    torch.save(data, path)
    with pytest.raises(UserError, match=message):
        load_card(path)


def test_a_detectron2_resume_checkpoint_must_be_this_models(tmp_path):
    from transfer.d2.weights import checkpointer_class

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    checkpointer = checkpointer_class()(model, str(tmp_path))
    checkpointer.save("model_0000009")
    resumed = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    checkpointer_class()(resumed, str(tmp_path)).resume_or_load("", resume=True)
    assert torch.equal(resumed[0].weight, model[0].weight)  # the same model resumes

    wider = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    with pytest.raises(UserError, match=r"wrong shapes.*--force"):
        checkpointer_class()(wider, str(tmp_path)).resume_or_load("", resume=True)
    deeper = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1), torch.nn.Linear(1, 1))
    with pytest.raises(UserError, match=r"missing \['2.bias'.*--force"):
        checkpointer_class()(deeper, str(tmp_path)).resume_or_load("", resume=True)

    (tmp_path / "model_0000009.pth").unlink()  # deleted under a kept last_checkpoint
    with pytest.raises(UserError, match="not a checkpoint file there"):
        checkpointer_class()(resumed, str(tmp_path)).resume_or_load("", resume=True)
    (tmp_path / "last_checkpoint").write_bytes(b"\xff\xfe model")
    with pytest.raises(UserError, match="last_checkpoint: unreadable"):
        checkpointer_class()(resumed, str(tmp_path)).resume_or_load("", resume=True)


def test_a_damaged_seed_results_file_is_one_line(tmp_path):
    from transfer.d2.train import read_seed_results

    path = tmp_path / "results.json"
    for text in ('{"metrics": {"bbox/AP": 1.0}', "[1, 2]", "\udcff"):
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
        with pytest.raises(UserError, match=r"damaged seed results.*--force"):
            read_seed_results(path)


def test_the_page_stays_readable_with_hostile_names():
    from leaderboard.build import build_table
    from leaderboard.page import STYLE, render_page
    from leaderboard.text import short, visible
    from tests.test_leaderboard import _fewshot, _meta

    rng = np.random.default_rng(0)
    hostile = "ring\u202egnp.exe\u0007" + "x" * 200  # a right-to-left override, a bell, a very long name
    records = [
        _fewshot(hostile, rng.uniform(0.2, 0.3, 50), meta=_meta(loss="ring")),
        _fewshot("plain", rng.uniform(0.2, 0.3, 50), meta=_meta(loss="nce")),
    ]
    page = render_page(build_table(records))
    assert "\u202e" not in page and "\u0007" not in page
    assert "ring\\u202egnp.exe\\u0007" in page  # shown as escapes, in full, in the table
    assert "overflow-wrap: anywhere" in STYLE and "td" in STYLE.split("overflow-wrap: anywhere")[0].splitlines()[-1]
    assert visible("a\u2066b\u2069c") == "a\\u2066b\\u2069c" and visible("Ünïcode names stay") == "Ünïcode names stay"
    label = short(hostile)
    assert len(label) == 28 and label.endswith("…") and "\u202e" not in label  # what the figures show


# --- the store and the tables never hang or mislead ---------------------------------------------------------------
def _returns_quickly(fn, seconds: float = 20.0):
    """``fn()``'s value, run in a thread so that a blocking open (a FIFO) fails the test instead of hanging it."""
    import threading

    out: dict = {}

    def target():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out["value"] = fn()
        out["warnings"] = [str(w.message) for w in caught]

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the store blocked (a FIFO or a device was opened for reading)"
    return out["value"], out["warnings"]


def _named(folder: Path, sha: str, rec: dict) -> Path:
    return folder / rec["task"] / f"{sha}-{rec['config_hash']}.json"


def test_only_regular_files_are_read_from_the_store(tmp_path):
    """A FIFO (alone, or behind a symlink), a device and a folder named like record files, and a FIFO named
    like a legacy ``.jsonl``, are skipped with a warning naming each: reading a FIFO would block forever."""
    from ringbench.store import find_record

    good = _record()
    write_record(tmp_path, good)
    fifo = _named(tmp_path, "cd" * 32, good)
    os.mkfifo(fifo)
    os.mkfifo(tmp_path / "pipe")
    via_link = _named(tmp_path, "ef" * 32, good)
    via_link.symlink_to(tmp_path / "pipe")
    device = _named(tmp_path, "12" * 32, good)
    device.symlink_to("/dev/zero")
    folder = _named(tmp_path, "34" * 32, good)
    folder.mkdir()
    os.mkfifo(tmp_path / "old.jsonl")
    records, caught = _returns_quickly(lambda: load_records(tmp_path))
    assert records == [good]
    for path, what in ((fifo, "a FIFO"), (via_link, "a FIFO (a symlink"), (device, "a device"), (folder, "a folder")):
        assert any(f"{path}: skipping a store entry that is {what}" in m for m in caught), (path, caught)
    assert any(f"{tmp_path / 'old.jsonl'}: skipping a store entry that is a FIFO" in m for m in caught)
    for sha in ("cd" * 32, "12" * 32, "34" * 32):  # the lookup transfer/run.py makes before it runs
        found, caught = _returns_quickly(lambda s=sha: find_record(tmp_path, s, good["task"], good["config_hash"]))
        assert found is None and any("not a regular file" in m for m in caught), caught
    assert _returns_quickly(lambda: load_records([fifo, tmp_path / "old.jsonl"]))[0] == []  # named on the command line


def test_transfer_run_is_not_hung_or_broken_by_a_fifo_or_folder_at_its_record(tmp_path, card_path, capsys):
    """run.py checks for an existing record before running: a FIFO there (and one named like a legacy store)
    is skipped with a warning and the legacy record still found; a folder there, which the record could not
    replace at the end, is refused in one line before any work."""
    from ringbench.fileio import sha256_file
    from ringbench.records import config_hash
    from transfer.run import build_parser, main
    from transfer.tasks import get_task

    results = tmp_path / "r"
    argv = ["--backbone", str(card_path), "--task", "fewshot_digits", "--results", str(results)]
    argv += ["--output-dir", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")]
    config = get_task("fewshot_digits").make_config(build_parser().parse_args(argv))
    sha, cfg = sha256_file(card_path), config_hash(config)
    rec = {**_record(), "backbone_sha256": sha, "config": config, "config_hash": cfg}
    (results / "fewshot_digits").mkdir(parents=True)
    os.mkfifo(results / "fewshot_digits" / f"{sha}-{cfg}.json")
    os.mkfifo(results / "stale.jsonl")
    (results / "records.jsonl").write_text(json.dumps(rec) + "\n")
    code, caught = _returns_quickly(lambda: run_main(main, argv), seconds=60)
    assert code == 0 and "skipped: " in capsys.readouterr().out
    assert any("is a FIFO, not a regular file" in m for m in caught), caught
    (results / "fewshot_digits" / f"{sha}-{cfg}.json").unlink()
    (results / "fewshot_digits" / f"{sha}-{cfg}.json").mkdir()
    (results / "records.jsonl").unlink()
    started = time.perf_counter()
    code, _ = _returns_quickly(lambda: run_main(main, argv), seconds=60)
    assert code == 2 and time.perf_counter() - started < 30
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a folder is where this run's record file goes" in err[0]


def test_a_record_file_not_where_its_identity_puts_it_is_skipped(tmp_path):
    """A record copied into another task's folder, or renamed as another card's (or config's) file, would show
    as that task's or be found for that card: skipped with a warning naming the file."""
    good = _record()
    path = write_record(tmp_path, good)
    other_task = tmp_path / "syn_det" / path.name
    other_task.parent.mkdir()
    other_task.write_bytes(path.read_bytes())
    other_card = _named(tmp_path, "cd" * 32, good)
    other_card.write_bytes(path.read_bytes())
    other_config = path.with_name(f"{good['backbone_sha256']}-{'0' * 16}.json")
    other_config.write_bytes(path.read_bytes())
    with pytest.warns(UserWarning) as caught:
        records = load_records(tmp_path)
    assert records == [good]
    messages = [str(w.message) for w in caught]
    assert any(
        f"{other_task}: skipping a record file with 'task' 'fewshot_digits' that is not its folder" in m
        for m in messages
    )
    for bad in (other_card, other_config):
        assert any(f"{bad}: skipping a record file with a file name that is not its identity" in m for m in messages)


def _table_text(table) -> tuple[str, str, str]:
    from leaderboard.cli import render_csv, render_markdown
    from leaderboard.page import render_page

    return render_markdown(table), render_page(table), render_csv(table)


def test_a_nan_metric_is_shown_marked_and_never_displaces_a_real_card(tmp_path):
    """A NaN (or infinite) value is a failed run, not a missing one: shown as ``nan!`` in every format, with a
    warning and a legend line, never as ``—``; it is out of bests, ranks and Δs, and a NaN record never wins
    over a finite one of its identity (store or table) nor a NaN-only card over a real one under ``--latest``."""
    from leaderboard.build import build_table
    from leaderboard.text import MISSING
    from tests.test_leaderboard import _fewshot, _meta

    rng = np.random.default_rng(0)
    ring = _fewshot("ring", rng.uniform(0.2, 0.3, 50), meta=_meta(loss="ring"))
    plain = _fewshot("plain", rng.uniform(0.2, 0.3, 50), meta=_meta(loss="nce"))
    soon = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=1)).isoformat()
    failed = {**ring, "metrics": {"acc": float("nan")}, "created": soon}  # newer, and not in the future
    table = build_table([plain, failed])
    text, page, csv_text = _table_text(table)
    col = table.columns[0]
    [ring_row] = [r for r in table.rows if r.name == "ring"]
    assert table.nonfinite == {(ring_row.key, col): ["nan"]} and (ring_row.key, col) not in table.cells
    [ring_line] = [line for line in text.splitlines() if line.startswith("| ring")]
    assert "nan!" in ring_line and MISSING not in ring_line.split("|")[2]
    assert "nan! / inf!: the record's value is NaN or infinite" in text and "ring fewshot_digits acc = nan" in text
    assert "nan!" in page and "ring,card," in csv_text and ",nan,nonfinite," in csv_text
    assert table.best(col) == table.cells[(table.row_by_name("plain").key, col)].mean
    assert (ring_row.key, col) not in table.tied and table.ranks[ring_row.key][0] is None
    assert all(not d.cells for d in table.deltas)  # no Δ against a NaN
    # the same identity, finite and NaN: the finite one counts, whichever is newer, in the table and the store
    assert build_table([ring, failed]).cells[(ring_row.key, col)].mean == ring["metrics"]["acc"]
    write_record(tmp_path, ring)
    (tmp_path / "records.jsonl").write_text(json.dumps(failed) + "\n")
    with pytest.warns(UserWarning, match="NaN or infinite metric; the record of its identity with finite"):
        assert load_records(tmp_path) == [ring]
    # --latest: a newer card of the same name with only NaNs does not displace the real one
    rerun = {**failed, "backbone_sha256": "ee" * 32, "backbone_meta": {**ring["backbone_meta"], "created": soon}}
    latest = build_table([ring, rerun], view="cards", latest=True)
    assert [r.sha256 for r in latest.rows] == [ring["backbone_sha256"]] and not latest.nonfinite
    infinite = build_table([{**failed, "metrics": {"acc": float("-inf")}}, plain])
    assert "-inf!" in _table_text(infinite)[0]


def test_a_legacy_line_claiming_a_future_time_does_not_replace_a_record(tmp_path):
    """``created`` picks the newest record of an identity; a legacy line dated in the future (past the clock
    skew allowed) counts as the oldest, with a warning, so it cannot take a newer record's place."""
    from ringbench.store import find_record

    rec = _record()
    write_record(tmp_path, rec)
    forged = {**rec, "metrics": {"acc": 99.0}, "created": "2999-01-01T00:00:00+00:00"}
    (tmp_path / "records.jsonl").write_text(json.dumps(forged) + "\n")
    with pytest.warns(UserWarning, match="'created' '2999-01-01T00:00:00\\+00:00' is not a past time"):
        assert load_records(tmp_path) == [rec]
    with pytest.warns(UserWarning, match="not a past time"):
        assert find_record(tmp_path, rec["backbone_sha256"], rec["task"], rec["config_hash"]) == rec
    not_a_time = {**forged, "created": "zzzz"}  # compared as text, it sorted after every date
    (tmp_path / "records.jsonl").write_text(json.dumps(not_a_time) + "\n")
    with pytest.warns(UserWarning, match="'zzzz' is not a past time"):
        assert load_records(tmp_path) == [rec]


def test_a_delta_outside_its_own_interval_is_refused(tmp_path):
    """A Δ's estimate comes from the records' metrics, its interval from their per-episode samples: a metric that
    disagrees with its samples puts the estimate outside the interval, and the Δ is refused (shown as
    ``refused``, never significant, with a warning) rather than shown with a confident but wrong interval."""
    from leaderboard.build import build_table
    from leaderboard.deltas import compare
    from leaderboard.model import Estimate
    from tests.test_leaderboard import _fewshot, _meta

    rng = np.random.default_rng(0)
    episodes = rng.uniform(0.2, 0.3, 50)
    plain = _fewshot("plain", episodes, meta=_meta(loss="nce"))
    ring = _fewshot("ring", episodes + 0.01, meta=_meta(loss="ring"))
    honest = build_table([plain, ring])
    [cell] = honest.deltas[0].cells.values()
    assert not cell.refused and cell.significant  # the same records, untouched: a Δ with its interval
    tampered = {**ring, "metrics": {"acc": 90.0}}
    table = build_table([plain, tampered])
    [cell] = table.deltas[0].cells.values()
    assert cell.refused and not cell.significant and cell.lo is None
    assert any("refused: the estimate +" in w and "outside its own 95% interval" in w for w in table.warnings)
    text, page, csv_text = _table_text(table)
    [delta_line] = [line for line in text.splitlines() if line.startswith("| Δ ring")]
    assert "refused" in delta_line and "*" not in delta_line and "refused: a Δ whose estimate" in text
    assert "refused" in page and ",refused," in csv_text
    nan_samples = Estimate(1.0, samples=[float("nan"), 1.0], over="episodes")
    assert compare(Estimate(0.0, samples=[0.0, 0.0], over="episodes"), nan_samples).refused


def test_implausible_percentages_are_flagged(tmp_path):
    """A percentage outside [−100, 100] (a fraction scaled twice, a wrong unit) is shown as recorded, with a
    ``?`` mark in every format, a legend line and a warning; values in range and other units are not marked."""
    from leaderboard.build import build_table
    from tests.test_leaderboard import _fewshot, _meta

    rng = np.random.default_rng(0)
    high = {**_fewshot("high", rng.uniform(0.2, 0.3, 50), meta=_meta()), "metrics": {"acc": 150.0}}
    low = {**_fewshot("low", rng.uniform(0.2, 0.3, 50), meta=_meta(seed=1, epochs=9)), "metrics": {"acc": -120.0}}
    fine = _fewshot("fine", rng.uniform(0.2, 0.3, 50), meta=_meta(epochs=7))
    worse = _fewshot("worse", rng.uniform(0.1, 0.15, 50), meta=_meta(epochs=8))
    table = build_table([high, low, fine, worse])
    col = table.columns[0]
    keys = {r.name: r.key for r in table.rows}
    assert table.implausible == {(keys["high"], col), (keys["low"], col)}
    text, page, csv_text = _table_text(table)
    lines = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "?" in lines["high"] and "?" in lines["low"] and "?" not in lines["fine"]
    assert "?: implausible, a percentage outside [−100, 100]" in text
    assert "high fewshot_digits acc = 150: implausible for a percentage" in text
    assert "150.00" in page and ",implausible," in csv_text
    # it is neither the best nor marked nor ranked: the real entry keeps the column's mark and first rank
    assert (
        table.best(col) == fine["metrics"]["acc"]
        and (keys["high"], col) not in table.tied
        and (keys["fine"], col) in table.tied
    )
    assert table.ranks[keys["high"]][0] is None and table.ranks[keys["fine"]][0] == 1.0
    other_unit = {**high, "units": {"acc": "mAP points"}}  # not a percentage: not judged
    assert not build_table([other_unit, fine]).implausible


# --- sweeps: their own files only, stopped with their jobs, plans checked before submission ------------------------
@pytest.fixture(scope="module")
def _shared_card(tmp_path_factory) -> Path:
    return write_card(tmp_path_factory.mktemp("card") / "c.pth")


@pytest.fixture
def _sweep_plan(_shared_card):
    """``make(tmp_path, tasks, backbones)``: a workdir with one card (cards/c.pth) and a plan of one tiny few-shot
    job; the sweep's arguments (local executor)."""
    return lambda tmp_path, *args: _sweep_argv(tmp_path, _shared_card, *args)


def _sweep_argv(tmp_path: Path, card: Path, tasks: str = "", backbones: str = "[{path: 'cards/*.pth'}]") -> list[str]:
    from tests.test_sweep import TINY_FEWSHOT

    (tmp_path / "cards").mkdir()
    (tmp_path / "cards" / "c.pth").symlink_to(card)
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"backbones: {backbones}\ntasks:\n" + (tasks or TINY_FEWSHOT))
    return ["--plan", str(plan), "--workdir", str(tmp_path), "--executor", "local", "--no-table"]


def _sweep_layout(tmp_path: Path):
    from sweep.plan import Layout

    return Layout(tmp_path, tmp_path / "results", tmp_path / "sweeps" / "plan")


def test_a_crafted_result_pickle_in_a_sweep_folder_never_runs(tmp_path, marker, monkeypatch):
    """A job's outcome is read from its JSON state file: the result pickle submitit reads in ``exception()`` and
    ``result()`` (which anyone able to write the folder could replace) is never opened; a job returns nothing."""
    from submitit.local.local import LocalJob

    from sweep.expand import Job
    from sweep.jobs import StageJob, status_file, write_status
    from sweep.plan import Resources
    from sweep.schedule import Sweep

    layout = _sweep_layout(tmp_path)
    layout.status_dir.mkdir(parents=True)
    folder = layout.sweep_dir / "submitit" / "1"
    folder.mkdir(parents=True)

    def submit(self, job):  # a finished local job whose folder holds a crafted result pickle
        process = subprocess.Popen([sys.executable, "-c", "pass"])
        handle = LocalJob(folder, str(process.pid), process=process)
        _evil_pickle(handle.paths.result_pickle, marker, wrap=lambda p: ("success", p))
        write_status(status_file(layout, job.key), "failed", key=job.key, error="exit 2: error: a bad card")
        self.handles[job.key] = handle
        return handle

    monkeypatch.setattr(Sweep, "submit", submit)
    sweep = Sweep([Job("t/c", "transfer", [], str(tmp_path / "c.pth"), Resources())], layout, {}, "local", "plan")
    sweep.run_local(progress=False)
    assert sweep.states == {"t/c": "failed"} and "1 job(s) failed: t/c (exit 2: error: a bad card)" in sweep.failures()
    assert not marker.exists()
    with contextlib.suppress(Exception):  # the premise: submitit's own reader would have run it
        sweep.handles["t/c"].exception()
    assert marker.exists()
    marker.unlink()
    path = status_file(layout, "x/y")
    assert StageJob("x/y", "transfer", ["--list-tasks"], str(path))() is None  # nothing to pickle back
    assert json.loads(path.read_text())["state"] == "done"


def test_sweep_folders_are_owner_only_and_shared_ones_are_refused(tmp_path, capsys, _sweep_plan):
    """Sweep, submitit and status folders are made 0o700 whatever the umask; one that group or others can write
    is refused in one line naming it, before anything is submitted."""
    from sweep import cli
    from sweep.folders import prepare_sweep_folders

    layout = _sweep_layout(tmp_path / "w")
    old = os.umask(0o002)
    try:
        prepare_sweep_folders(layout)
    finally:
        os.umask(old)
    for folder in (layout.sweep_dir.parent, layout.sweep_dir, layout.sweep_dir / "submitit", layout.status_dir):
        assert folder.stat().st_mode & 0o777 == 0o700, folder
    argv = _sweep_plan(tmp_path)
    shared = tmp_path / "sweeps" / "plan" / "submitit"
    shared.mkdir(parents=True)
    shared.chmod(0o775)
    assert run_main(cli.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: sweep folder {shared} can be written by others (mode 775); what it holds runs as code " + (
        f"(submitit's pickles): chmod go-w {shared}, or use a workdir of your own"
    )
    assert not (tmp_path / "sweeps" / "plan" / "jobs.json").exists() and not any(shared.iterdir())


def test_a_sweep_folder_takes_one_controller_and_finds_orphaned_jobs(tmp_path, capsys, _sweep_plan):
    """A second controller on the same plan is refused (the folder's lock); a job an earlier, killed controller
    left running (its state file says running, its process lives) is reported and not submitted again."""
    from sweep import cli
    from sweep.jobs import status_file, write_status
    from sweep.status import orphans

    argv = _sweep_plan(tmp_path)
    layout = _sweep_layout(tmp_path)
    with fileio.folder_lock(layout.sweep_dir, "sweep folder"):
        assert run_main(cli.main, argv) == 2
    assert f"sweep folder {layout.sweep_dir} is in use by pid {os.getpid()}" in capsys.readouterr().err
    # a job process of this sweep, still running (its command line names the sweep's folder, as submitit's does)
    job = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(layout.sweep_dir / "submitit")])
    try:
        path = status_file(layout, "fewshot_digits/c")
        write_status(path, "running", key="fewshot_digits/c", pid=job.pid, host=os.uname().nodename)
        assert run_main(cli.main, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            f"error: 1 job(s) of an earlier run of this sweep still run: fewshot_digits/c (pid {job.pid}); wait "
            "for them (--status) or stop them (kill PID, scancel ID), then run again"
        ]
        assert json.loads(path.read_text())["state"] == "running"  # not submitted again
    finally:
        job.kill()
        job.wait()
    assert orphans(layout) == []  # its process is gone: a next run submits it


@pytest.mark.heavy
def test_a_backgrounded_sweep_stopped_by_sigterm_stops_its_jobs(tmp_path):
    """A sweep started in a non-interactive shell's background (SIGINT ignored, by the sweep and its jobs) and
    stopped by ``kill`` stops its job (SIGTERM), which ends as cancelled; no traceback; the last line names it."""
    import signal

    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "pretrain_args: [--data, synthetic, --profile, demo]\n"
        "backbones: [{name: long, config: moco, seeds: [0], args: [--epochs, '200']}]\n"
        "tasks: {fewshot_digits: {episodes: 6}}\n"
    )
    sweep = f"{sys.executable} -m sweep --plan {plan} --workdir {tmp_path} --executor local"
    shell = subprocess.Popen(
        ["bash", "-c", f"{sweep} 2>{tmp_path / 'err'} & echo $!; wait $!; echo $?"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    status_path = tmp_path / "sweeps" / "plan" / "status" / "pretrain__long_s0.json"
    try:
        sweep_pid = int(shell.stdout.readline())
        deadline = time.monotonic() + 120
        pid = None
        while pid is None and time.monotonic() < deadline and shell.poll() is None:
            time.sleep(0.2)
            if status_path.is_file():
                pid = json.loads(status_path.read_text() or "{}").get("pid")
        assert pid is not None, "the pretraining job never started"
        for process in (sweep_pid, pid):  # the premise: SIGINT (submitit's cancel) would be ignored
            ignored = int(Path(f"/proc/{process}/status").read_text().split("SigIgn:")[1].split()[0], 16)
            assert ignored & (1 << (signal.SIGINT - 1)), process
        time.sleep(1)  # inside the stage's own code
        os.kill(sweep_pid, signal.SIGTERM)
        out, _ = shell.communicate(timeout=60)
        assert out.split()[-1] == "130"
        for _ in range(50):  # the job's process is gone
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"job process {pid} still runs after its sweep was stopped")
        err = (tmp_path / "err").read_text()
        assert "Traceback" not in err and "pretrain/long_s0: cancelled (the sweep was interrupted)" in err
        assert err.strip().splitlines()[-1] == (
            "stopped; 1 job(s) failed: pretrain/long_s0 (the sweep was interrupted); see --status for their logs"
        )
        assert json.loads(status_path.read_text())["state"] == "cancelled"
        assert not (tmp_path / "cards" / "long_s0.pth").exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGKILL)
        shell.wait()


@pytest.mark.parametrize(
    "tasks, backbones, message",
    [
        (
            "  fewshot_digits: {results: /elsewhere}\n",
            None,
            r"tasks.fewshot_digits.results: --results is set by the sweep .*; leave it out of the plan",
        ),
        ("  fewshot_digits: {output-dir: /x}\n", None, r"--output-dir is set by the sweep"),
        ("  fewshot_digits: {device: cuda}\n", None, r"--device is set by the sweep"),
        ("  fewshot_digits: {print_config: true}\n", None, r"--print-config is set by the sweep"),
        ("  fewshot_digits: {backbone: x.pth, name: y}\n", None, r"--backbone is set by the sweep"),
        ("  fewshot_digits: {episodes: [300]}\n", None, r"tasks.fewshot_digits.episodes: expected one value, got list"),
        ("  fewshot_digits: {no_tensorboard: 'yes'}\n", None, r"expected true or false, got str 'yes'"),
        ("  fewshot_digits: [1]\n", None, r"tasks.fewshot_digits: expected a mapping of flags, got list"),
        ("  fewshot_digits: {resources: 4}\n", None, r"resources: expected a mapping .*got 4"),
        ("  fewshot_digits: {resources: {gpus: two}}\n", None, r"'gpus' must be an int, got 'two'"),
        (None, "[{path: 'cards/*'}]", r"'cards/\*' matches files that are not cards: notes.txt"),
        (None, "[{name: r, config: moco, seeds: [0, -1]}]", r"pretraining seeds must be >= 0, got \[-1\]"),
        (None, "[{name: r, config: moco, args: [--out, x.pth]}]", r"--out is set by the sweep"),
    ],
)
def test_a_plan_is_checked_for_what_its_jobs_would_hit(tmp_path, capsys, _sweep_plan, tasks, backbones, message):
    """Flags the sweep owns, wrong types, negative seeds and globs matching non-cards are one line, exit 2,
    before anything is submitted."""
    import re

    from sweep import cli

    argv = _sweep_plan(tmp_path, tasks or "", backbones or "[{path: 'cards/*.pth'}]")
    (tmp_path / "cards" / "notes.txt").write_text("not a card")
    assert run_main(cli.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
    assert not (tmp_path / "sweeps").exists()


def test_an_unwritable_results_folder_and_a_damaged_jobs_file_are_one_line(tmp_path, capsys, _sweep_plan):
    from sweep import cli

    argv = _sweep_plan(tmp_path)
    (tmp_path / "file").write_text("x")
    assert run_main(cli.main, [*argv, "--results", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --results {tmp_path / 'file'}: is a file, not a folder"
    assert not (tmp_path / "sweeps").exists()
    jobs = tmp_path / "sweeps" / "plan" / "jobs.json"
    jobs.parent.mkdir(parents=True, mode=0o700)
    for text in ('{"jobs": [', '{"jobs": [{"key": 3}]}', "[]"):
        jobs.write_text(text)
        for extra in ("--status", "--retry-failed"):
            assert run_main(cli.main, [*argv, extra]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith(f"error: {jobs}: damaged") and "remove it" in err[0], err
