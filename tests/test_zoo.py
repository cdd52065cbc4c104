"""The zoo: the shipped file's entries, and the fetcher against an HTTP server on 127.0.0.1 (resume with Range,
checksum refusal with nothing kept, trust on first use, progress), and --backbone zoo:NAME."""

from __future__ import annotations

import hashlib
import http.server
import io
import threading
from pathlib import Path

import pytest
import torch
import yaml

from ringbench.errors import UserError
from tests.foreign import build_foreign, random_state
from transfer.checkpoints import SOURCE_FORMATS, load_backbone
from transfer.zoo import LOCK_NAME, fetch, get_entry, main, read_zoo

PAYLOAD = bytes(range(256)) * 1200  # 300 KiB: no checkpoint, the fetcher does not read it


class _Server:
    """Serves ``files`` (path -> bytes) with Range support; ``break_after`` cuts the next response short."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.ranges: list[str | None] = []
        self.break_after: int | None = None
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                header = self.headers.get("Range")
                outer.ranges.append(header)
                start = int(header.split("=")[1].split("-")[0]) if header else 0
                self.send_response(206 if header else 200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                chunk = body[start:]
                if outer.break_after is not None:
                    chunk, outer.break_after = chunk[: outer.break_after], None
                self.wfile.write(chunk)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()


@pytest.fixture
def server():
    srv = _Server()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def _zoo(tmp_path: Path, url: str | None, sha256: str | None, **extra) -> Path:
    entry = {
        "method": "MoCo v2",
        "paper": "test",
        "arch": "resnet18",
        "epochs": 1,
        "url": url,
        "sha256": sha256,
        "format": "moco",
        "normalisation": "imagenet",
        "top1": 1.5,
        "top1_source": "test",
        **extra,
    }
    path = tmp_path / "zoo.yaml"
    path.write_text(yaml.safe_dump({"entries": {"m": entry}}))
    return path


def test_the_shipped_zoo_is_valid_and_has_the_field():
    entries = read_zoo()
    assert len(entries) >= 16 and {"moco-v2", "dino", "byol", "swav", "simclr-v1", "supervised"} <= set(entries)
    for entry in entries.values():
        assert entry.format in SOURCE_FORMATS and entry.top1_source and (entry.url or entry.manual)
    assert entries["moco-v2"].epochs == 800 and entries["moco-v2"].top1 == 71.1


def test_fetch_resumes_a_broken_download_and_checks_the_sha256(tmp_path, server):
    server.files["/m.pth"] = PAYLOAD
    entry = get_entry("m", _zoo(tmp_path, server.url + "/m.pth", hashlib.sha256(PAYLOAD).hexdigest()))
    cache = tmp_path / "cache"
    server.break_after = 100_000
    with pytest.raises(UserError, match=r"ended early.*resume"):
        fetch(entry, cache, progress=io.StringIO())
    assert (cache / "m" / "m.pth.part").stat().st_size == 100_000
    progress = io.StringIO()
    path = fetch(entry, cache, progress=progress)
    assert path.read_bytes() == PAYLOAD and server.ranges == [None, "bytes=100000-"]
    assert "resuming at" in progress.getvalue() and "100.0%" in progress.getvalue()
    assert not (cache / LOCK_NAME).exists(), "a stated SHA-256 needs no lock entry"
    assert fetch(entry, cache, progress=io.StringIO()) == path and len(server.ranges) == 2  # cached: no download


def test_checksum_mismatch_is_refused_and_nothing_kept(tmp_path, server):
    server.files["/m.pth"] = PAYLOAD
    entry = get_entry("m", _zoo(tmp_path, server.url + "/m.pth", "0" * 64))
    with pytest.raises(UserError, match=r"checksum mismatch, nothing kept"):
        fetch(entry, tmp_path / "cache", progress=io.StringIO())
    assert not any(p.is_file() and p.name != ".lock" for p in (tmp_path / "cache").rglob("*"))
    entry = get_entry("m", _zoo(tmp_path, server.url + "/m.pth", None, md5_prefix="ffffffff"))
    with pytest.raises(UserError, match="md5"):
        fetch(entry, tmp_path / "cache", progress=io.StringIO())


def test_trust_on_first_use_then_verified(tmp_path, server, capsys):
    server.files["/m.pth"] = PAYLOAD
    zoo = _zoo(tmp_path, server.url + "/m.pth", None)
    cache = tmp_path / "cache"
    assert main(["--zoo", str(zoo), "--cache-dir", str(cache), "fetch", "m"]) == 0
    err = capsys.readouterr().err
    assert "trust on first use" in err and hashlib.sha256(PAYLOAD).hexdigest() in err
    # the server's file changes: a new fetch is refused against the recorded checksum, nothing kept
    (cache / "m" / "m.pth").unlink()
    server.files["/m.pth"] = PAYLOAD[::-1]
    with pytest.raises(UserError, match=rf"checksum mismatch.*{LOCK_NAME}"):
        fetch(get_entry("m", zoo), cache, progress=io.StringIO())
    assert not (cache / "m" / "m.pth").exists() and not (cache / "m" / "m.pth.part").exists()
    assert main(["--zoo", str(zoo), "--cache-dir", str(cache), "list"]) == 0
    assert "m  " in capsys.readouterr().out


def test_backbone_zoo_name_uses_the_checked_cached_file(tmp_path, monkeypatch):
    obj, _ = build_foreign("pcl", random_state("resnet18"))
    torch.save(obj, tmp_path / "pcl.pth")
    zoo = _zoo(tmp_path, None, None, manual="make it by hand")
    cache = tmp_path / "cache"
    monkeypatch.setenv("RINGBENCH_ZOO", str(zoo))
    monkeypatch.setenv("RINGBENCH_ZOO_CACHE", str(cache))
    with pytest.raises(UserError, match=r"not fetched.*ringbench-zoo fetch m --file FILE \(make it by hand\)"):
        load_backbone("zoo:m")
    assert main(["fetch", "m", "--file", str(tmp_path / "pcl.pth")]) == 0
    backbone = load_backbone("zoo:m")
    assert backbone.name == "m" and backbone.source_format == "moco" and backbone.meta["zoo"] == "m"
    assert backbone.meta["normalisation"] == "source-format" and backbone.meta["published_top1"] == 1.5
    cached = cache / "m" / "m.pth"
    cached.write_bytes(cached.read_bytes()[:-1] + b"x")  # the cached file changed: refused on use
    with pytest.raises(UserError, match="remove it and fetch"):
        load_backbone("zoo:m")


def test_published_rows_match_the_zoo():
    """Every zoo entry's published top-1 is a published linear_imagenet row named by the entry, with its source."""
    from ringbench.published import published_numbers

    rows = {r.method: r for r in published_numbers("linear_imagenet")}
    for entry in read_zoo().values():
        (row,) = [r for m, r in rows.items() if m.endswith(f"(zoo:{entry.name})")]
        assert (row.value, row.source, row.metric) == (entry.top1, entry.top1_source, "acc")
