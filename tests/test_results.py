"""The results store: one atomically written file per record identity; legacy JSONL still read."""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import multiprocessing as mp
import os
import sys

import pytest

from ringbench.fileio import atomic_write_text
from ringbench.records import config_hash, make_record, record_headline
from ringbench.store import export_jsonl, find_record, load_records, record_path, write_record

SHA = "a" * 64


def _record(task="fewshot_digits", sha=SHA, config=None, acc=0.5, **extra):
    return make_record(
        backbone="ring_moco",
        backbone_sha256=sha,
        task=task,
        metrics={"acc": acc},
        config=config or {"episodes": 600, "probe": "logreg"},
        ci95={"acc": 0.01},
        seeds=[0],
        engine_versions={"torch": "x"},
        wall_s=1.23456,
        **extra,
    )


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_config_hash_ignores_key_order_and_sees_values():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_write_and_read_back(tmp_path):
    rec = _record(extra={"episode_accuracies": [0.5, 0.25]})
    path = write_record(tmp_path, rec)
    assert path == tmp_path / "fewshot_digits" / f"{SHA}-{rec['config_hash']}.json"
    assert path == record_path(tmp_path, SHA, "fewshot_digits", rec["config_hash"])
    assert _files(tmp_path) == [f"fewshot_digits/{SHA}-{rec['config_hash']}.json"]  # no temporary file left
    assert json.loads(path.read_bytes()) == rec
    assert load_records(tmp_path) == [rec] == load_records(path)


def test_one_file_per_identity_and_lookup(tmp_path):
    write_record(tmp_path, _record(acc=0.4))
    newer = _record(acc=0.6)
    write_record(tmp_path, newer)  # same identity: replaces the first
    write_record(tmp_path, _record(task="syn_det"))
    write_record(tmp_path, _record(sha="b" * 64))
    assert len(_files(tmp_path)) == 3 and len(load_records(tmp_path)) == 3
    h = newer["config_hash"]
    assert find_record(tmp_path, SHA, "fewshot_digits", h) == newer
    assert find_record(tmp_path, "c" * 64, "fewshot_digits", h) is None
    assert find_record(tmp_path, SHA, "fewshot_digits", config_hash({"episodes": 100})) is None
    assert find_record(tmp_path / "nowhere", SHA, "fewshot_digits", h) is None
    # a lookup opens one file: a damaged record of another identity is not even read
    (tmp_path / "syn_kp").mkdir()
    (tmp_path / "syn_kp" / "junk.json").write_text("{")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_record(tmp_path, SHA, "fewshot_digits", h) == newer


def test_identity_must_be_path_safe(tmp_path):
    with pytest.raises(ValueError, match="task"):
        write_record(tmp_path, _record(task="../escape"))
    with pytest.raises(ValueError, match="backbone_sha256"):
        write_record(tmp_path, _record(sha="ab/cd"))
    bad = {**_record(), "config_hash": "0" * 16}
    with pytest.raises(ValueError, match="not the hash"):
        write_record(tmp_path, bad)
    assert _files(tmp_path) == []


def test_legacy_jsonl_is_still_read_and_bad_lines_are_skipped_with_a_warning(tmp_path):
    old = _record(created="2020-01-01T00:00:00+00:00")
    lines = [json.dumps(old), '{"backbone": "half-writ', json.dumps(_record(task="syn_kp"))]
    (tmp_path / "records.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match=r"records\.jsonl:2"):
        records = load_records(tmp_path)
    assert [r["task"] for r in records] == ["fewshot_digits", "syn_kp"]
    with pytest.warns(UserWarning, match=r"records\.jsonl:2"):
        assert find_record(tmp_path, SHA, "fewshot_digits", old["config_hash"]) == old  # the fallback scan
    # the same identity in both: the newest wins, wherever it is
    new = _record(acc=0.9)
    write_record(tmp_path, new)
    with pytest.warns(UserWarning):
        assert find_record(tmp_path, SHA, "fewshot_digits", old["config_hash"]) == new
        assert [r["metrics"]["acc"] for r in load_records(tmp_path) if r["task"] == "fewshot_digits"] == [0.9]
    # (newer, and not in the future: a legacy line claiming a time to come counts as the oldest, test_guarantees)
    soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=1)
    newest = _record(acc=0.1, created=soon.isoformat(timespec="seconds"))
    with open(tmp_path / "records.jsonl", "a") as handle:
        handle.write(json.dumps(newest) + "\n")
    with pytest.warns(UserWarning):
        assert find_record(tmp_path, SHA, "fewshot_digits", old["config_hash"]) == newest


@pytest.mark.parametrize(
    "content, why",
    [(b'{"backbone": "ring', "not JSON"), (b'{"task": "\xff\xfe"}', "not UTF-8"), (b"[1, 2]", "not a result record")],
)
def test_a_corrupt_record_file_is_skipped_with_a_warning(tmp_path, content, why):
    good = write_record(tmp_path, _record())
    bad = record_path(tmp_path, "b" * 64, "fewshot_digits", good.stem.split("-")[1])
    bad.write_bytes(content)
    with pytest.warns(UserWarning, match=f"{bad.name}: .*{why}"):
        records = load_records(tmp_path)
    assert [r["backbone_sha256"] for r in records] == [SHA]
    with pytest.warns(UserWarning, match=bad.name):
        assert find_record(tmp_path, "b" * 64, "fewshot_digits", good.stem.split("-")[1]) is None


def test_a_record_names_its_headline_metrics_and_an_older_one_shows_all(tmp_path):
    """Records describe themselves: ``headline`` is what a table shows by default (no task registry
    needed to read a store); a record from before the field existed shows every metric."""
    two = {"acc": 50.0, "acc_digits": 50.0}
    assert make_record(**_fields(metrics=two), headline=("acc",))["headline"] == ["acc"]
    assert make_record(**_fields(metrics=two))["headline"] == ["acc", "acc_digits"]  # the task names none
    assert record_headline({"metrics": two, "headline": ["acc", "gone"]}) == ["acc"]
    assert record_headline({"metrics": two}) == ["acc", "acc_digits"]
    write_record(tmp_path, _record(headline=["acc"]))
    bad = _record(sha="b" * 64)
    bad["headline"] = ["acc", 3]
    write_path = record_path(tmp_path, "b" * 64, bad["task"], bad["config_hash"])
    write_path.write_text(json.dumps(bad))
    with pytest.warns(UserWarning, match="headline"):
        assert [r["backbone_sha256"] for r in load_records(tmp_path)] == [SHA]


def _fields(**changes):
    rec = _record()
    keep = ("backbone", "backbone_sha256", "task", "metrics", "config")
    return {**{k: rec[k] for k in keep}, **changes}


def test_temporary_files_of_killed_writers_are_ignored(tmp_path):
    path = write_record(tmp_path, _record())
    (path.parent / f".{path.name}.x1y2.tmp").write_text('{"backbone": "half')
    assert len(load_records(tmp_path)) == 1


def _fail_fsync(fd):
    raise OSError(errno.ENOSPC, "No space left on device")


class _ShortWriter:
    """A file handle on a disk that fills up after half of the first write."""

    def __init__(self, handle):
        self._handle = handle

    def write(self, data):
        self._handle.write(data[: len(data) // 2])
        self._handle.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)


@pytest.mark.parametrize("failure", ["fsync", "short write"])
def test_a_failed_write_raises_and_leaves_no_file(tmp_path, monkeypatch, failure):
    import ringbench.fileio as fileio

    first = _record(acc=0.1)
    path = write_record(tmp_path, first)
    if failure == "fsync":
        monkeypatch.setattr(fileio.os, "fsync", _fail_fsync)
    else:
        real_fdopen = os.fdopen
        monkeypatch.setattr(fileio.os, "fdopen", lambda *a, **k: _ShortWriter(real_fdopen(*a, **k)))
    with pytest.raises(OSError, match="No space left"):
        write_record(tmp_path, _record(acc=0.2))  # replacing a record: the old one stays whole
    with pytest.raises(OSError, match="No space left"):
        write_record(tmp_path, _record(task="syn_det"))  # a new record: no file at all
    monkeypatch.undo()
    assert _files(tmp_path) == [path.relative_to(tmp_path).as_posix()]
    assert json.loads(path.read_bytes()) == first


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_permissions_from_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = write_record(tmp_path, _record())
        atomic_write_text(tmp_path / "table.md", "x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode
    assert (tmp_path / "table.md").stat().st_mode & 0o777 == mode


def test_export_jsonl_round_trips(tmp_path):
    store = tmp_path / "store"
    for task in ("a", "b", "c"):
        write_record(store, _record(task=task))
    out = tmp_path / "shared" / "all.jsonl"
    assert export_jsonl(load_records(store), out) == 3
    assert load_records(out) == load_records(store)
    assert [p.name for p in out.parent.iterdir()] == ["all.jsonl"]


def test_leaderboard_exports_jsonl(tmp_path, capsys):
    from leaderboard.cli import main

    write_record(tmp_path / "res", _record())
    write_record(tmp_path / "res", _record(sha="b" * 64, acc=0.7))
    out = tmp_path / "all.jsonl"
    assert main(["--results", str(tmp_path / "res"), "--export-jsonl", str(out)]) == 0
    assert "ring_moco" in capsys.readouterr().out  # the table is still printed
    assert sorted(r["metrics"]["acc"] for r in load_records(out)) == [0.5, 0.7]


# Concurrency: writers in separate processes (as on separate machines) into one store.

N_SHARED = 5  # identities every writer writes (its own version of), to race on one file name


def _versions(worker, n):
    """What ``worker`` writes: n records of its own identities (every 25th over 64 KiB) and, every
    10th step, its version of one of the shared identities. Plain dicts: no torch in the child."""
    out = []
    for i in range(n):
        if i % 10 == 5:
            key, version = f"shared{i // 10 % N_SHARED}", f"w{worker}-{i}"
        else:
            key, version = f"w{worker}-{i}", "only"
        config = {"key": key, "seeds": [0, 1]}
        out.append(
            {
                "backbone": "b",
                "backbone_sha256": hashlib.sha256(key.encode()).hexdigest(),
                "task": f"task{i % 3}",
                "metrics": {"acc": i / n},
                "config": config,
                "config_hash": config_hash(config),
                "created": "2024-01-01T00:00:00+00:00",
                "version": version,
                "extra": {"blob": "x" * (70_000 if i % 25 == 0 else 10)},
            }
        )
    # the shared identities share their task too
    for rec in out:
        if rec["config"]["key"].startswith("shared"):
            rec["task"] = "shared"
    return out


def _writer(store, worker, n):
    for rec in _versions(worker, n):
        write_record(store, rec)


def _check_concurrent_writes(store, workers, n):
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    procs = [ctx.Process(target=_writer, args=(store, w, n)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * workers
    allowed: dict[str, list] = {}
    for w in range(workers):
        for rec in _versions(w, n):
            name = record_path(store, rec["backbone_sha256"], rec["task"], rec["config_hash"])
            allowed.setdefault(str(name), []).append(rec)
    files = sorted(str(p) for p in store.rglob("*") if p.is_file())
    assert files == sorted(allowed)  # none lost, one file per identity, no temporary file left
    for name in files:
        with open(name, "rb") as handle:
            assert json.load(handle) in allowed[name]  # whole, and one of the versions written
    records = load_records(store)
    assert len(records) == len(allowed) == workers * (n - n // 10) + min(N_SHARED, n // 10)
    big = [r for r in records if len(r["extra"]["blob"]) > 65_536]
    assert len(big) > workers * (n // 50) and any(r["task"] == "shared" for r in big)


def test_concurrent_writers_lose_nothing_and_mix_nothing(tmp_path):
    _check_concurrent_writes(tmp_path / "store", workers=4, n=150)


@pytest.mark.slow
def test_concurrent_writers_8x1000(tmp_path):
    _check_concurrent_writes(tmp_path / "store", workers=8, n=1000)
