"""The zoo of published checkpoints (``configs/zoo.yaml``): ``ringbench-zoo list`` and ``ringbench-zoo fetch NAME...``.

``fetch`` downloads an entry's URL into the cache folder (``--cache-dir``, else ``$RINGBENCH_ZOO_CACHE``, else
``~/.cache/ringbench/zoo``) as ``<cache>/<name>/<file>``, with a progress bar on stderr. A broken download is kept as
``<file>.part`` and resumed with an HTTP ``Range`` request. The finished file is checked before it takes its name:

- an entry whose zoo line states a SHA-256 is checked against it (and against any stated md5 or SHA-256 prefix);
- an entry without one is trusted on first use: its SHA-256 is recorded in ``<cache>/zoo.lock.json``, and every
  later fetch and every use (``--backbone zoo:NAME``) is checked against that record.

A mismatch is refused and nothing is kept (the partial file is removed too). ``fetch NAME --file PATH`` takes a local
file instead (entries with no downloadable PyTorch file, such as SimCLR's, say how to make one), with the same checks.
Nothing here runs unless asked: the suite downloads nothing by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ringbench.cli import add_common_flags, run_main
from ringbench.errors import UserError
from ringbench.fileio import atomic_write, atomic_write_text, folder_lock, path_component, sha256_file

LOCK_NAME = "zoo.lock.json"
NORMALISATIONS = {"imagenet": None, "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))}
_HEX = re.compile(r"^[0-9a-f]+$")
_FIELDS = ("method", "paper", "arch", "epochs", "url", "sha256", "format", "normalisation", "top1", "top1_source")
_OPTIONAL = ("md5_prefix", "sha256_prefix", "manual")


@dataclass(frozen=True)
class ZooEntry:
    name: str
    method: str
    paper: str
    arch: str
    epochs: int | None
    url: str | None
    sha256: str | None
    format: str
    normalisation: str
    top1: float | None
    top1_source: str
    md5_prefix: str | None = None
    sha256_prefix: str | None = None
    manual: str | None = None

    @property
    def file_name(self) -> str:
        if self.url:
            tail = self.url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
            if tail:
                return path_component(tail, f"zoo entry {self.name}: the URL's file name")
        return f"{self.name}.pth"


def default_zoo() -> Path:
    from ringbench.config import config_root

    return Path(os.environ.get("RINGBENCH_ZOO") or config_root() / "zoo.yaml")


def default_cache() -> Path:
    return Path(os.environ.get("RINGBENCH_ZOO_CACHE") or Path.home() / ".cache" / "ringbench" / "zoo").expanduser()


def read_zoo(path: str | os.PathLike | None = None) -> dict[str, ZooEntry]:
    """The zoo's entries by name, each checked (a bad entry is one error naming it and the field)."""
    import yaml

    path = Path(path) if path else default_zoo()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: cannot read the zoo file ({' '.join(str(exc).split())[:160]})") from exc
    entries = data.get("entries") if isinstance(data, Mapping) else None
    if not isinstance(entries, Mapping) or not entries:
        raise UserError(f"{path}: the zoo file needs a non-empty 'entries' mapping")
    return {str(name): _entry(path, str(name), value) for name, value in entries.items()}


def _entry(path: Path, name: str, value: Any) -> ZooEntry:
    # The format is a transfer.checkpoints.SOURCE_FORMATS name; that module reads zoo:NAME through this one, so the
    # name is checked when the file is loaded (and for the shipped zoo by tests/test_zoo.py), not imported here.
    where = f"{path}: zoo entry {name!r}"
    path_component(name, where)
    if not isinstance(value, Mapping):
        raise UserError(f"{where} is not a mapping")
    missing = [k for k in _FIELDS if k not in value]
    unknown = sorted(set(value) - set(_FIELDS) - set(_OPTIONAL))
    if missing or unknown:
        raise UserError(f"{where}: missing fields {missing}, unknown fields {unknown}")
    if not isinstance(value["format"], str) or not value["format"]:
        raise UserError(f"{where}: format must be a checkpoint format name (docs/formats.md)")
    if value["normalisation"] not in NORMALISATIONS:
        raise UserError(f"{where}: normalisation {value['normalisation']!r} is not one of {list(NORMALISATIONS)}")
    for key, length in (("sha256", 64), ("md5_prefix", None), ("sha256_prefix", None)):
        digest = value.get(key)
        if digest is not None and (
            not isinstance(digest, str) or not _HEX.match(digest) or (length and len(digest) != length)
        ):
            raise UserError(f"{where}: {key} must be lower-case hex{f' of {length} digits' if length else ''}")
    url = value["url"]
    if url is None and not value.get("manual"):
        raise UserError(f"{where}: an entry without a url needs 'manual' (how to make the file)")
    if url is not None and not (isinstance(url, str) and url.startswith(("https://", "http://"))):
        raise UserError(f"{where}: url must be an http(s) URL or null")
    fields: dict[str, Any] = {k: value.get(k) for k in (*_FIELDS, *_OPTIONAL)}
    return ZooEntry(name=name, **fields)


def get_entry(name: str, zoo: str | os.PathLike | None = None) -> ZooEntry:
    entries = read_zoo(zoo)
    if name not in entries:
        raise UserError(f"zoo:{name}: no such zoo entry; known: {', '.join(entries)} (ringbench-zoo list)")
    return entries[name]


def cached_path(entry: ZooEntry, cache: Path) -> Path:
    return cache / entry.name / entry.file_name


# --- the lock file: trust on first use --------------------------------------------------------------------------


def read_lock(cache: Path) -> dict[str, Any]:
    path = cache / LOCK_NAME
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: damaged zoo lock file ({exc}); move it away to record the checksums again") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path}: damaged zoo lock file (not a JSON object)")
    return data


def _record(cache: Path, entry: ZooEntry, sha: str, size: int) -> None:
    lock = read_lock(cache)
    lock[entry.name] = {
        "sha256": sha,
        "size": size,
        "url": entry.url,
        "recorded": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_text(cache / LOCK_NAME, json.dumps(lock, indent=1, sort_keys=True) + "\n")


def expected_sha256(entry: ZooEntry, cache: Path) -> tuple[str | None, str]:
    """(the SHA-256 a file of this entry must have, where that comes from); None before a first fetch."""
    if entry.sha256:
        return entry.sha256, "the zoo file"
    recorded = read_lock(cache).get(entry.name)
    if isinstance(recorded, Mapping) and isinstance(recorded.get("sha256"), str):
        return recorded["sha256"], f"{cache / LOCK_NAME} (recorded on first fetch)"
    return None, ""


def _check(entry: ZooEntry, cache: Path, sha: str, md5: str) -> None:
    want, source = expected_sha256(entry, cache)
    problems = []
    if want is not None and sha != want:
        problems.append(f"SHA-256 {sha} is not {want} from {source}")
    if entry.sha256_prefix and not sha.startswith(entry.sha256_prefix):
        problems.append(f"SHA-256 {sha} does not start with {entry.sha256_prefix} as the zoo file says")
    if entry.md5_prefix and not md5.startswith(entry.md5_prefix):
        problems.append(f"md5 {md5} does not start with {entry.md5_prefix} as the zoo file says")
    if problems:
        raise UserError(f"zoo:{entry.name}: checksum mismatch, nothing kept: {'; '.join(problems)}")


# --- fetching -----------------------------------------------------------------------------------------------------


def fetch(
    entry: ZooEntry,
    cache: Path,
    local_file: Path | None = None,
    progress: IO[str] | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download (or copy ``local_file``) into the cache, checked; return the file. A fetched file is re-checked."""
    target = cached_path(entry, cache)
    with folder_lock(cache, "zoo cache"):
        if target.exists() and local_file is None:
            verify_cached(entry, cache)
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".part")
        try:
            if local_file is not None:
                _copy(local_file, part)
            else:
                if not entry.url:
                    raise UserError(f"zoo:{entry.name}: no downloadable file; {entry.manual}")
                _download(entry.url, part, progress if progress is not None else sys.stderr, timeout)
            sha, md5 = _digests(part)
            _check(entry, cache, sha, md5)
        except UserError as exc:
            if "checksum mismatch" in str(exc) or local_file is not None:
                part.unlink(missing_ok=True)
            raise
        first_use = expected_sha256(entry, cache)[0] is None
        os.replace(part, target)
        if first_use:
            _record(cache, entry, sha, target.stat().st_size)
            print(
                f"zoo:{entry.name}: no published SHA-256; recorded {sha} in {cache / LOCK_NAME} "
                f"(trust on first use: later fetches and uses are checked against it)",
                file=progress if progress is not None else sys.stderr,
            )
    return target


def verify_cached(entry: ZooEntry, cache: Path) -> Path:
    """The cached file of ``entry``, checked against the zoo's or the lock file's SHA-256."""
    target = cached_path(entry, cache)
    if not target.is_file():
        how = f"ringbench-zoo fetch {entry.name}" + (f" --file FILE ({entry.manual})" if not entry.url else "")
        raise UserError(f"zoo:{entry.name} is not fetched into {cache}; run: {how}")
    want, source = expected_sha256(entry, cache)
    if want is None:
        raise UserError(
            f"zoo:{entry.name}: {target} has no checksum on record in {cache / LOCK_NAME}; "
            f"remove it and run: ringbench-zoo fetch {entry.name}"
        )
    sha = sha256_file(target)
    if sha != want:
        raise UserError(f"zoo:{entry.name}: {target} has SHA-256 {sha}, not {want} from {source}; remove it and fetch")
    return target


def zoo_backbone_args(name: str) -> tuple[Path, dict[str, Any]]:
    """For ``--backbone zoo:NAME``: the checked cached file and ``load_backbone``'s arguments for it."""
    entry = get_entry(name)
    path = verify_cached(entry, default_cache())
    meta: dict[str, Any] = {"method": entry.method, "zoo": entry.name, "epochs": entry.epochs, "dataset": "imagenet"}
    meta.update({"paper": entry.paper, "image_size": 224, "published_top1": entry.top1})
    norm = NORMALISATIONS[entry.normalisation]
    if norm is not None:
        meta["mean"], meta["std"] = list(norm[0]), list(norm[1])
    else:
        from ringbench.card import IMAGENET_MEAN, IMAGENET_STD

        meta["mean"], meta["std"] = list(IMAGENET_MEAN), list(IMAGENET_STD)
    return path, {"source_format": entry.format, "meta": meta}


def _digests(path: Path) -> tuple[str, str]:
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
            md5.update(block)
    return sha.hexdigest(), md5.hexdigest()


def _copy(source: Path, part: Path) -> None:
    if not source.is_file():
        raise UserError(f"{source}: no such file")
    with open(source, "rb") as src, atomic_write(part, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def _download(url: str, part: Path, progress: IO[str], timeout: float) -> None:
    """Fetch ``url`` into ``part``, resuming what ``part`` already holds (HTTP Range)."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "ringbench-zoo"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        with contextlib.closing(urllib.request.urlopen(request, timeout=timeout)) as response:
            status = response.status
            if have and status != 206:  # the server ignored the range: start again
                have = 0
            length = response.headers.get("Content-Length")
            total = have + int(length) if length and length.isdigit() else None
            with open(part, "ab" if have else "wb") as out, _Progress(part.name, total, have, progress) as bar:
                for block in iter(lambda: response.read(1 << 16), b""):
                    out.write(block)
                    bar.update(len(block))
                out.flush()
                os.fsync(out.fileno())
            if total is not None and part.stat().st_size != total:
                raise UserError(
                    f"{url}: download ended early ({part.stat().st_size} of {total} bytes); fetch again to resume"
                )
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the part is already whole
            return
        raise UserError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"{url}: download failed ({reason}); the partial file is kept: fetch again to resume") from exc


class _Progress:
    """A one-line progress bar on a terminal; on other streams a line at each tenth."""

    def __init__(self, name: str, total: int | None, done: int, stream: IO[str]) -> None:
        self.name, self.total, self.done, self.stream = name, total, done, stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.last_shown, self.last_tenth, self.start = 0.0, -1, time.monotonic()

    def __enter__(self) -> _Progress:
        if self.done:
            print(f"{self.name}: resuming at {_size(self.done)}", file=self.stream)
        self._show(force=True)
        return self

    def update(self, n: int) -> None:
        self.done += n
        self._show()

    def _show(self, force: bool = False) -> None:
        if self.total:
            fraction = min(1.0, self.done / self.total)
            text = f"{self.name}: [{'#' * int(30 * fraction):<30}] {100 * fraction:5.1f}% of {_size(self.total)}"
        else:
            text = f"{self.name}: {_size(self.done)}"
        if self.tty:
            now = time.monotonic()
            if force or now - self.last_shown > 0.2:
                self.stream.write("\r" + text)
                self.stream.flush()
                self.last_shown = now
            return
        tenth = int(10 * self.done / self.total) if self.total else -1
        if force or tenth > self.last_tenth:
            print(text, file=self.stream)
            self.last_tenth = tenth

    def __exit__(self, *exc: object) -> None:
        if self.tty:
            self._show(force=True)
            self.stream.write("\n")
        elif self.total is None or self.last_tenth < 10:
            print(f"{self.name}: {_size(self.done)} in {time.monotonic() - self.start:.1f} s", file=self.stream)


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} B"


# --- CLI ----------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ringbench-zoo",
        description="Published self-supervised ResNets (configs/zoo.yaml): list them, fetch them into a cache "
        "(resumed, checksum-checked). Use a fetched one with --backbone zoo:NAME or ringbench-convert zoo:NAME.",
    )
    parser.add_argument("--zoo", type=Path, help="zoo file (default: the shipped configs/zoo.yaml, or $RINGBENCH_ZOO)")
    parser.add_argument(
        "--cache-dir", type=Path, help="cache folder (default: $RINGBENCH_ZOO_CACHE, else ~/.cache/ringbench/zoo)"
    )
    add_common_flags(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="print the zoo: name, method, epochs, format, published top-1, fetched or not")
    fetch_cmd = commands.add_parser("fetch", help="download entries into the cache, checked")
    fetch_cmd.add_argument("names", nargs="+", metavar="NAME")
    fetch_cmd.add_argument("--file", type=Path, help="take this local file for the (one) entry instead of its URL")
    fetch_cmd.add_argument("--timeout", type=float, default=60.0, help="seconds without data before giving up")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cache = (args.cache_dir or default_cache()).expanduser()
    entries = read_zoo(args.zoo)
    if args.command == "list":
        for line in list_lines(entries, cache):
            print(line)
        return 0
    unknown = [n for n in args.names if n not in entries]
    if unknown:
        raise UserError(f"no such zoo entries {unknown}; known: {', '.join(entries)}")
    if args.file is not None and len(args.names) != 1:
        raise UserError("--file takes one entry name")
    for name in args.names:
        path = fetch(entries[name], cache, local_file=args.file, timeout=args.timeout)
        print(f"zoo:{name}: {path}")
    return 0


def list_lines(entries: Mapping[str, ZooEntry], cache: Path) -> Iterator[str]:
    rows = [("name", "method", "arch", "epochs", "format", "top-1", "fetched")]
    for entry in entries.values():
        fetched = "yes" if cached_path(entry, cache).is_file() else ("manual" if not entry.url else "no")
        top1 = "-" if entry.top1 is None else str(entry.top1)
        epochs = "-" if entry.epochs is None else str(entry.epochs)
        rows.append((entry.name, entry.method, entry.arch, epochs, entry.format, top1, fetched))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        yield "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
    yield f"cache: {cache}; published top-1 sources: the zoo file's top1_source"


def cli() -> None:
    """Console-script entry point (``ringbench-zoo``)."""
    sys.exit(run_main(main))


if __name__ == "__main__":
    cli()
