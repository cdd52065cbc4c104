"""The results store: append-only JSONL, identity by (backbone hash, task, config hash)."""

from __future__ import annotations

import json
import multiprocessing as mp

import pytest

from transfer.results import append_record, config_hash, find_record, load_records, make_record, records_path


def _record(task="fewshot_digits", sha="a" * 64, config=None, acc=0.5):
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
    )


def test_config_hash_ignores_key_order_and_sees_values():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_append_and_find(tmp_path):
    append_record(tmp_path, _record(acc=0.4))
    append_record(tmp_path, _record(acc=0.6))
    append_record(tmp_path, _record(task="syn_det"))
    lines = records_path(tmp_path).read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["backbone"] == "ring_moco" for line in lines)
    rec = _record()
    found = find_record(tmp_path, "a" * 64, "fewshot_digits", rec["config_hash"])
    assert found["metrics"]["acc"] == 0.6  # the newest
    assert find_record(tmp_path, "b" * 64, "fewshot_digits", rec["config_hash"]) is None
    assert find_record(tmp_path, "a" * 64, "fewshot_digits", config_hash({"episodes": 100})) is None


def test_reader_skips_damaged_lines_with_a_warning(tmp_path):
    append_record(tmp_path, _record())
    with open(records_path(tmp_path), "a") as f:
        f.write('{"backbone": "half-writ\n')
    append_record(tmp_path, _record(task="syn_kp"))
    with pytest.warns(UserWarning, match="records.jsonl:2"):
        records = load_records(tmp_path)
    assert [r["task"] for r in records] == ["fewshot_digits", "syn_kp"]


def _writer(path, n, worker):
    for i in range(n):
        append_record(path, _record(task=f"t{worker}", acc=i / n))


def test_concurrent_appends_never_interleave(tmp_path):
    procs = [mp.get_context("spawn").Process(target=_writer, args=(tmp_path, 40, w)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    records = load_records(tmp_path)
    assert len(records) == 120 and {r["task"] for r in records} == {"t0", "t1", "t2"}
