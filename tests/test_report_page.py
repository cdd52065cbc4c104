"""The HTML leaderboard page and the reference rows: random and supervised cards, published
numbers, --normalise, one table per family with a two-level header, the forest plot, and the page
in a real browser (headless Chromium): it renders, fits 1280 px, and every figure loads."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from leaderboard.build import build_table, with_published
from leaderboard.cli import main
from leaderboard.normalise import GAP_UNIT, normalise
from leaderboard.page import render_page
from ringbench.cli import run_main
from ringbench.errors import UserError
from ringbench.published import Published, published_numbers
from ringbench.store import write_record
from tests.test_leaderboard import RING, _det, _fewshot, _meta


def _records():
    """A random card, a supervised one, and a moco / ring_moco pair with 3 pretraining seeds each, on
    a few-shot task (100 shared episodes) and a detection task (3 fine-tuning seeds), plus a second
    detection config."""
    rng = np.random.default_rng(0)
    out = []
    base = rng.uniform(0.2, 0.3, 100)
    out.append(_fewshot("random", base, meta=_meta(method="random", loss="none")))
    out.append(_det("random", [5.0, 5.5, 6.0], meta=_meta(method="random", loss="none")))
    out.append(_fewshot("supervised", base + 0.5, meta=_meta(method="supervised", loss="ce")))
    out.append(_det("supervised", [40.0, 41.0, 42.0], meta=_meta(method="supervised", loss="ce")))
    for seed in range(3):
        for name, loss, gain in (("moco", "nce", 0.3), ("ring_moco", "ring", 0.33)):
            extra = {"loss_params": RING} if loss == "ring" else {}
            meta = _meta(loss=loss, seed=seed, **extra)
            eps = np.clip(base + gain + rng.normal(0, 0.02, 100), 0, 1)
            out.append(_fewshot(f"{name}_s{seed}", eps, meta=meta))
            ap = 20.0 + 10 * gain + rng.normal(0, 1, 3)
            out.append(_det(f"{name}_s{seed}", list(ap), meta=meta))
            out.append(_rec_det_long(f"{name}_s{seed}", ap, meta))
    return out


def _rec_det_long(name, ap, meta):
    rec = _det(name, list(ap + 5), meta=meta)
    rec["config"] = {"iters": 300}
    from ringbench.records import config_hash

    rec["config_hash"] = config_hash(rec["config"])
    return rec


def test_reference_rows_lead_and_trained_cards_are_marked_above_random():
    table = build_table(_records())
    assert [r.name for r in table.rows][:2] == ["random", "supervised"]
    assert sorted(r.name for r in table.rows[2:]) == ["moco", "ring_moco"]
    moco = table.row_by_name("moco")
    few = next(c for c in table.columns if c.task == "fewshot_digits")
    assert (moco.key, few) in table.above_random  # 3 pretraining seeds, +30 points: clear
    det = next(c for c in table.columns if c.task == "syn_det" and c.config_label == "iters=60")
    # the random row has one card: moco's cards pair with it on none of their seeds but seed 0
    assert (moco.key, det) in table.above_random
    assert (table.row_by_name("random").key, few) not in table.above_random


def test_cards_significantly_below_random_are_marked_too():
    """A trained recipe worse than a random network is marked ‡ (never †), in every format."""
    from leaderboard.cli import render_csv, render_markdown

    rng = np.random.default_rng(1)
    base = rng.uniform(0.5, 0.6, 100)
    records = [_fewshot("random", base + 0.2, meta=_meta(method="random", loss="none"))]
    for seed in range(3):
        eps = np.clip(base + rng.normal(0, 0.02, 100), 0, 1)
        records.append(_fewshot(f"moco_s{seed}", eps, meta=_meta(seed=seed)))
    table = build_table(records)
    moco, few = table.row_by_name("moco"), table.columns[0]
    assert (moco.key, few) in table.below_random and not table.above_random
    text = render_markdown(table)
    assert "‡" in text and "†" not in text.split("Values in")[0] and "‡: significantly below the random" in text
    [line] = [x for x in render_csv(table).splitlines() if x.startswith("moco,")]
    assert line.endswith(",0,0,1,")  # tied_with_best, above_random, below_random, source
    assert "‡" in render_page(table)


def test_normalise_maps_random_to_0_and_supervised_to_100():
    table = build_table(_records())
    norm = normalise(table)
    few = next(c for c in norm.columns if c.task == "fewshot_digits")
    assert few.unit == GAP_UNIT
    value = {r.name: norm.cells[(r.key, few)].mean for r in norm.rows}
    assert value["random"] == pytest.approx(0.0) and value["supervised"] == pytest.approx(100.0)
    raw = next(c for c in table.columns if c.task == "fewshot_digits")
    r, s = (table.cells[(table.row_by_name(n).key, raw)].mean for n in ("random", "supervised"))
    m = table.cells[(table.row_by_name("moco").key, raw)].mean
    assert value["moco"] == pytest.approx(100 * (m - r) / (s - r))
    [delta] = norm.deltas
    raw_delta = table.deltas[0].cells[raw]
    assert delta.cells[few].diff == pytest.approx(100 * raw_delta.diff / (s - r))
    with pytest.raises(ValueError, match="random and a supervised row"):
        normalise(build_table(_records()[4:]))


def test_published_rows_sit_in_their_task_columns_only():
    numbers = [
        Published("syn_det", "bbox/AP", 44.0, "MoCo v2, 800 ep", "a paper, Table 2"),
        Published("voc_det", "bbox/AP", 57.4, "MoCo v2, 800 ep", "a paper, Table 2"),
    ]
    table = with_published(build_table(_records()), numbers)
    row = table.row_by_name("MoCo v2, 800 ep (published)")
    cols = [c for c in table.columns if (row.key, c) in table.cells]
    assert {c.task for c in cols} == {"syn_det"} and len(cols) == 2  # both syn_det configs
    page = render_page(table)
    assert "MoCo v2, 800 ep (published)" in page and "a paper, Table 2" in page


def test_published_numbers_come_from_one_file_and_reach_the_table_without_the_task_registry(tmp_path):
    """configs/published.yaml is the one place of published numbers; the leaderboard places those of the
    tasks it shows (a voc_det record here: MoCo's four VOC rows), with no transfer task imported."""
    from leaderboard.cli import table_from_records
    from tests.test_leaderboard import _rec

    shipped = published_numbers("voc_det")
    assert {n.method for n in shipped} >= {"ImageNet-1M, MoCo v2, 800ep"} and published_numbers("syn_det") == []
    voc = _rec("moco", "voc_det", {"bbox/AP": 50.0, "bbox/AP50": 80.0, "bbox/AP75": 55.0}, "detectron2")
    table = table_from_records([voc, *_records()[:2]], tasks=["voc_det", "syn_det"])
    published = [r for r in table.rows if r.published]
    assert [r.name for r in published] == [f"{n.method} (published)" for n in shipped[::3]]
    v2 = table.row_by_name("ImageNet-1M, MoCo v2, 800ep (published)")
    assert {c.metric: table.cells[(v2.key, c)].mean for c in table.columns if (v2.key, c) in table.cells} == {
        "bbox/AP": 57.4,
        "bbox/AP50": 82.5,
        "bbox/AP75": 64.0,
    }


@pytest.mark.parametrize(
    "entry, message",
    [
        ("{task: t, metric: m, value: 1.0, method: x}", r"missing \['source'\]"),
        ("{task: t, metric: m, value: 1.0, method: x, source: s, year: 2020}", r"unknown \['year'\]"),
        ("{task: t, metric: m, value: '57.4', method: x, source: s}", "value must be a finite number"),
        ("{task: t, metric: m, value: .nan, method: x, source: s}", "value must be a finite number"),
        ("{task: t, metric: '', value: 1, method: x, source: s}", "metric must be non-empty text"),
    ],
)
def test_published_numbers_are_checked_as_read(tmp_path, entry, message):
    path = tmp_path / "published.yaml"
    path.write_text(f"numbers:\n  - {entry}\n")
    with pytest.raises(UserError, match=rf"numbers\[0\]: {message}"):
        published_numbers(path=path)
    path.write_text("numbers:\n  - {task: t, metric: m, value: 1, method: x, source: s}\n")
    assert published_numbers(path=path) == [Published("t", "m", 1.0, "x", "s")]
    path.write_text("numbers:\n" + "  - {task: t, metric: m, value: 1, method: x, source: s}\n" * 2)
    with pytest.raises(UserError, match=r"numbers\[1\]: a second entry"):
        published_numbers(path=path)


def test_page_has_a_table_per_family_with_a_two_level_header_and_footnotes():
    page = render_page(build_table(_records()))
    assert page.count("<table") == 3  # the rows' summary, detectron2, fewshot
    assert '<th class="task" colspan="1">syn_det<sup>a</sup></th>' in page
    assert '<th class="task" colspan="1">syn_det<sup>b</sup></th>' in page
    assert "a: syn_det run with iters=300" in page and "b: syn_det run with iters=60" in page
    assert "[iters=" not in page  # config differences are footnotes, not column names
    assert '<span class="n">3 pt</span>' in page and '<span class="n">100 ep</span>' in page
    images = dict(re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page))
    assert set(images) == {"forest plot of every Δ with its 95% interval", "detectron2 tasks", "fewshot tasks"}
    assert all(base64.b64decode(v)[:8] == b"\x89PNG\r\n\x1a\n" for v in images.values())
    # a constant ring is a sentence, not a flat line
    assert "ring threshold schedule" not in page and "ring_moco keeps 9.0% of the negatives" in page
    assert "<script" not in page and "http://" not in page and "https://" not in page


def test_cli_normalise(tmp_path, capsys):
    for rec in _records():
        write_record(tmp_path, rec)
    assert run_main(main, ["--results", str(tmp_path), "--normalise", "--tasks", "fewshot_digits"]) == 0
    out = capsys.readouterr().out
    assert "(% of the random→supervised gap)" in out and "| random " in out and " 0.00" in out
    assert run_main(main, ["--results", str(tmp_path), "--normalise", "--tasks", "nope"]) == 2


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


PROBE = """<script>
window.addEventListener("load", () => {
  const root = document.documentElement;
  const images = [...document.images];
  const tables = [...document.querySelectorAll("table")];
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({
    scrollWidth: root.scrollWidth, clientWidth: root.clientWidth,
    images: images.length, loaded: images.filter((i) => i.complete && i.naturalWidth > 0).length,
    tables: tables.length, tooWide: tables.filter((t) => t.getBoundingClientRect().right > root.clientWidth).length,
  });
  document.body.appendChild(out);
});
</script>"""


@pytest.mark.heavy
@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (make test-browser installs it)")
def test_page_in_headless_chromium_fits_1280px_and_loads_every_figure(tmp_path):
    """The page as a researcher opens it, at 1280 px: no horizontal overflow, every figure decoded.
    The probe script is added to a copy of the page; the page itself has no script."""
    table = with_published(
        build_table(_records()), [Published("syn_det", "bbox/AP", 44.0, "MoCo v2, 800 ep", "a paper")]
    )
    page = render_page(table)
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    out = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            "--window-size=1280,900",
            "--virtual-time-budget=10000",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            probed.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    found = re.search(r'<pre id="probe">(.*?)</pre>', out.stdout, re.S)
    assert found, f"the page did not render: {out.stderr[-2000:]}"
    probe = json.loads(found.group(1).replace("&quot;", '"'))
    assert probe["clientWidth"] == 1280
    assert probe["scrollWidth"] <= probe["clientWidth"] and probe["tooWide"] == 0, probe
    assert probe["images"] == 3 and probe["loaded"] == 3, probe
    assert probe["tables"] == 3


def test_a_zoo_checkpoints_published_row_sits_beside_its_measured_row():
    """A published number of a zoo entry (``checkpoint``) is placed right after the row of that checkpoint,
    measured here: loaded as ``zoo:NAME`` (the row's name) or converted into a card (``source_name``)."""
    from tests.test_leaderboard import _fewshot, _meta

    rng = np.random.default_rng(0)
    records = [
        _fewshot(name, rng.uniform(0.2, 0.3, 20), meta=_meta(**meta))
        for name, meta in (("a-card", {}), ("moco-v2", {}), ("mine", {"source_name": "dino"}), ("z-card", {}))
    ]
    numbers = [
        Published("fewshot_digits", "acc", 60.0, "MoCo v2 (zoo:moco-v2)", "a README", checkpoint="moco-v2"),
        Published("fewshot_digits", "acc", 70.0, "DINO (zoo:dino)", "a README", checkpoint="dino"),
        Published("fewshot_digits", "acc", 50.0, "elsewhere", "a paper"),
    ]
    names = [r.name for r in with_published(build_table(records, view="cards"), numbers).rows]
    assert names.index("MoCo v2 (zoo:moco-v2) (published)") == names.index("moco-v2") + 1
    assert names.index("DINO (zoo:dino) (published)") == names.index("mine") + 1
    assert names[-1] == "elsewhere (published)"  # no checkpoint: after every card, as before
