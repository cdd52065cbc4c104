"""Benchmark: loading 100,000 result records from the per-record store vs one legacy JSONL file.

The leaderboard's load (``ringbench.store.load_records``) of N tiny records (default 100,000,
spread over 10 tasks): from N record files (``<store>/<task>/<sha256>-<config_hash>.json``) and
from the same records as lines of one ``records.jsonl``. Prints the best time of each over
``--repeats`` (warm page cache) and their ratio; the seconds are for information only.
Run: ``python bench/results_store.py [--records 100000 --repeats 3 --dir /some/nfs/folder]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run by path: make the repository importable without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ringbench.cli import add_common_flags, run_main
from ringbench.records import config_hash
from ringbench.store import load_records, record_path


def tiny_records(n: int, tasks: int) -> list[dict]:
    """N distinct small records, as ``make_record`` shapes them (without importing torch)."""
    out = []
    for i in range(n):
        config = {"episodes": 600, "probe": "logreg", "seeds": [0], "i": i // tasks}
        out.append(
            {
                "backbone": f"b{i % 97}",
                "backbone_sha256": hashlib.sha256(str(i % 97).encode()).hexdigest(),
                "task": f"task{i % tasks}",
                "metrics": {"acc": (i % 1000) / 1000},
                "ci95": {"acc": 0.01},
                "seeds": [0],
                "config": config,
                "config_hash": config_hash(config),
                "engine_versions": {"torch": "2"},
                "wall_s": 1.0,
                "created": "2024-01-01T00:00:00+00:00",
            }
        )
    return out


def _best(fn, repeats: int) -> tuple[float, int]:
    best, count = float("inf"), 0
    for _ in range(repeats):
        start = time.perf_counter()
        count = len(fn())
        best = min(best, time.perf_counter() - start)
    return best, count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--tasks", type=int, default=10, help="task folders the records spread over")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, help="where to build the stores (default: a temporary folder)")
    add_common_flags(parser)
    args = parser.parse_args(argv)
    records = tiny_records(args.records, args.tasks)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="ringbench-bench-") as tmp:
        store, legacy = Path(tmp) / "store", Path(tmp) / "legacy"
        start = time.perf_counter()
        # the files write_record makes, without its per-file fsync (this times reading, not writing)
        for rec in records:
            path = record_path(store, rec["backbone_sha256"], rec["task"], rec["config_hash"])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(json.dumps(rec).encode() + b"\n")
        legacy.mkdir()
        (legacy / "records.jsonl").write_text("".join(json.dumps(rec) + "\n" for rec in records))
        build = time.perf_counter() - start
        t_files, n_files = _best(lambda: load_records(store), args.repeats)
        t_jsonl, n_jsonl = _best(lambda: load_records(legacy), args.repeats)
    assert n_files == n_jsonl == args.records, (n_files, n_jsonl)
    print(f"{args.records:,} records over {args.tasks} task folders (stores built in {build:.1f} s)")
    print(f"per-record files  {t_files:7.2f} s   ({t_files / args.records * 1e6:.1f} µs/record)")
    print(f"one legacy JSONL  {t_jsonl:7.2f} s   ({t_jsonl / args.records * 1e6:.1f} µs/record)")
    print(f"files / jsonl:    {t_files / t_jsonl:.2f}x (the price of one file per record; target: a few seconds)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
