"""Leaderboard rendering from hand-written records: every format, missing cells, seeds vs
episodes, differing configs, and the paired Δ rows."""

from __future__ import annotations

import base64
import csv
import io
import re
import shutil
import subprocess

import numpy as np
import pytest

from ringbench.cli import run_main
from transfer.compare import build_table, paired_bootstrap_ci
from transfer.leaderboard import main, render_csv, render_html, render_latex, render_markdown
from transfer.results import make_record, write_record

META = {
    "moco": {"method": "moco", "loss": "nce", "dataset": "synthetic", "arch": "resnet18", "epochs": 5},
    "ring_moco": {
        "method": "moco",
        "loss": "ring",
        "dataset": "synthetic",
        "arch": "resnet18",
        "epochs": 5,
        "loss_params": {"w_outer": 0.1, "w_inner": 0.1},
    },
    "simclr": {"method": "simclr", "loss": "nce", "dataset": "synthetic", "arch": "resnet18", "epochs": 5},
}


def _rec(backbone, task, metrics, family, config=None, ci95=None, extra=None, seeds=(0,)):
    return make_record(
        backbone=backbone,
        backbone_sha256=backbone * 4,
        task=task,
        metrics=metrics,
        config=config or {"episodes": 50},
        ci95=ci95,
        seeds=seeds,
        engine_versions={"torch": "t"},
        family=family,
        backbone_meta=META[backbone],
        extra=extra or {},
    )


@pytest.fixture
def records():
    rng = np.random.default_rng(0)
    plain_eps = rng.uniform(0.4, 0.6, 50)
    ring_eps = plain_eps + 0.05 + rng.normal(0, 0.01, 50)  # clearly better, same episodes
    return [
        _rec(
            "moco",
            "fewshot_digits",
            {"acc": plain_eps.mean()},
            "fewshot",
            ci95={"acc": 0.02},
            extra={"per_episode": {"acc": plain_eps.tolist()}},
        ),
        _rec(
            "ring_moco",
            "fewshot_digits",
            {"acc": ring_eps.mean()},
            "fewshot",
            ci95={"acc": 0.02},
            extra={"per_episode": {"acc": ring_eps.tolist()}},
        ),
        _rec(
            "moco",
            "syn_det",
            {"bbox/AP": 30.0, "bbox/AP50": 50.0},
            "detectron2",
            config={"iters": 60},
            seeds=(0, 1, 2),
            extra={"per_seed": [{"bbox/AP": 29.0}, {"bbox/AP": 30.0}, {"bbox/AP": 31.0}]},
        ),
        _rec(
            "ring_moco",
            "syn_det",
            {"bbox/AP": 31.0, "bbox/AP50": 52.0},
            "detectron2",
            config={"iters": 60},
            seeds=(0, 1, 2),
            extra={"per_seed": [{"bbox/AP": 30.5}, {"bbox/AP": 31.0}, {"bbox/AP": 31.5}]},
        ),
        # same task, another config: its own column, never merged
        _rec("ring_moco", "syn_det", {"bbox/AP": 40.0, "bbox/AP50": 60.0}, "detectron2", config={"iters": 200}),
        # simclr has no detection record: a missing cell
        _rec("simclr", "fewshot_digits", {"acc": 0.55}, "fewshot", ci95={"acc": 0.03}),
    ]


def test_table_model(records):
    table = build_table(records, headline={"syn_det": ["bbox/AP"], "fewshot_digits": ["acc"]})
    labels = [c.label for c in table.columns]
    assert labels == ["syn_det bbox/AP [iters=200]", "syn_det bbox/AP [iters=60]", "fewshot_digits acc"]
    assert [r.name for r in table.rows] == ["moco", "ring_moco", "simclr"]
    det60 = table.columns[1]
    moco_det = table.cells[("moco", det60)]
    assert moco_det.err_kind == "std" and moco_det.err == pytest.approx(np.std([29, 30, 31], ddof=1))
    assert ("simclr", det60) not in table.cells
    [delta] = table.deltas  # found from metadata: same method/dataset/arch/epochs, ring vs plain
    assert (delta.plain, delta.variant) == ("moco", "ring_moco")
    few = delta.cells[table.columns[2]]
    assert few.test == "episodes" and few.significant and few.lo > 0
    assert few.diff == pytest.approx(
        table.cells[("ring_moco", table.columns[2])].mean - table.cells[("moco", table.columns[2])].mean
    )
    det = delta.cells[det60]
    assert det.test == "seeds" and det.diff == pytest.approx(1.0)
    assert table.columns[0] not in delta.cells  # moco has no iters=200 record


def test_few_shot_records_pair_by_episode_and_source():
    """The few-shot tasks store per-source episode accuracies as fractions and report percent."""
    from transfer.compare import episode_samples

    extra = {"episode_accuracies": {"omniglot": [0.5, 0.7], "dtd": [0.3, 0.5]}}
    assert episode_samples(extra, "acc_omniglot", 60.0) == pytest.approx([50.0, 70.0])
    assert episode_samples(extra, "acc_avg", 50.0) == pytest.approx([40.0, 60.0])
    assert episode_samples({"episode_accuracies": {"digits": [0.5, 0.7]}}, "acc", 0.6) == pytest.approx([0.5, 0.7])
    assert episode_samples(extra, "acc_cub", 50.0) is None


def test_variants_pair_with_their_plain_twin_only():
    """Ring, HCL and DCL cards each get a Δ against the NT-Xent card of the same run, never against
    each other, whatever the names' order; another method or epoch count is not a twin."""
    from transfer.compare import Row, find_pairs

    def row(name, loss, method="simclr", epochs=5):
        return Row(
            name, name, {"method": method, "loss": loss, "dataset": "synthetic", "arch": "resnet18", "epochs": epochs}
        )

    rows = [
        row("a_dcl", "dcl"),
        row("b_hcl", "hcl"),
        row("c_ntxent", "ntxent"),
        row("d_ring", "ring"),
        row("e_ring_long", "ring", epochs=50),
        row("f_moco", "nce", method="moco"),
    ]
    assert find_pairs(rows) == [("c_ntxent", "a_dcl"), ("c_ntxent", "b_hcl"), ("c_ntxent", "d_ring")]


def test_paired_bootstrap_matches_normal_theory():
    rng = np.random.default_rng(1)
    d = rng.normal(0.3, 1.0, 400)
    lo, hi = paired_bootstrap_ci(d, 20_000, np.random.default_rng(2))
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    assert lo == pytest.approx(d.mean() - half, abs=0.02) and hi == pytest.approx(d.mean() + half, abs=0.02)
    lo0, hi0 = paired_bootstrap_ci(rng.normal(0, 1, 400), 5000, np.random.default_rng(3))
    assert lo0 < 0 < hi0


def test_markdown(records):
    text = render_markdown(build_table(records, headline={"syn_det": ["bbox/AP"], "fewshot_digits": ["acc"]}))
    lines = text.splitlines()
    simclr = next(line for line in lines if line.startswith("| simclr"))
    assert simclr.count("—") == 2 and " 0.00 " not in simclr  # missing cells are not zeros
    assert "**31.00 ± 0.50**" in text  # best per column marked
    assert "40.00" in text and "**40.00**" not in text  # a column with one value has no "best"
    delta = next(line for line in lines if line.startswith("| Δ ring_moco − moco"))
    assert "+1.00 [+0.50, +1.50]*" in delta and "+0.050 [+0.04" in delta
    assert "± is the 95% confidence interval over episodes or the standard deviation over seeds" in text


def test_latex(records):
    text = render_latex(build_table(records))
    assert text.startswith(r"\begin{tabular}") and r"\toprule" in text and r"\bottomrule" in text
    assert r"\textbf{" in text and r"$\pm$" in text and r"syn\_det" in text and "_det" not in text.replace(r"\_det", "")
    body = [line for line in text.splitlines() if line.endswith(r"\\")]
    assert len({line.count("&") for line in body}) == 1  # every row has every column


def test_csv_is_numeric(records):
    table = build_table(records, headline={"syn_det": ["bbox/AP"], "fewshot_digits": ["acc"]})
    rows = list(csv.reader(io.StringIO(render_csv(table))))
    header, body = rows[0], rows[1:]
    assert header[0] == "backbone" and len(header) == 1 + 2 * len(table.columns)
    moco = next(r for r in body if r[0] == "moco")
    assert float(moco[header.index("syn_det bbox/AP [iters=60]")]) == 30.0
    assert moco[header.index("syn_det bbox/AP [iters=200]")] == ""
    assert any(r[0].startswith("delta ring_moco") for r in body)


def test_html_is_self_contained(records):
    page = render_html(build_table(records))
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page and "<b>" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 3  # one bar chart per family, and the ring backbone's schedule
    assert 'alt="ring threshold schedule"' in page
    assert all(base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n" for img in images)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (apt-get install chromium)")
def test_html_renders_in_headless_chromium(records, tmp_path):
    page = tmp_path / "leaderboard.html"
    page.write_text(render_html(build_table(records)))
    out = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    dom = out.stdout
    assert "<table>" in dom and "ring_moco" in dom
    # images decoded by the browser report their natural size through the DOM only with JS; the
    # dumped DOM keeps the embedded PNGs, which are checked for validity above
    assert dom.count("data:image/png;base64,") >= 2


def test_cli_writes_every_format(records, tmp_path, capsys):
    for rec in records:
        write_record(tmp_path / "results", rec)
    for fmt in ("md", "latex", "html", "csv"):
        code = run_main(
            main,
            ["--results", str(tmp_path / "results"), "--format", fmt, "--out", str(tmp_path / f"board.{fmt}")],
        )
        assert code == 0, capsys.readouterr().err
        assert ("ring\\_moco" if fmt == "latex" else "ring_moco") in (tmp_path / f"board.{fmt}").read_text()
    capsys.readouterr()
    code = run_main(
        main, ["--results", str(tmp_path / "results"), "--tasks", "fewshot_digits", "--baseline", "simclr=ring_moco"]
    )
    out = capsys.readouterr().out
    assert code == 0 and "Δ ring_moco − simclr" in out and "syn_det" not in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--results", "/nonexistent/results"], "no such results"),
        (["--baseline", "moco"], "expected PLAIN=VARIANT"),
        (["--baseline", "moco=nobody"], "no records for ['nobody']"),
    ],
)
def test_cli_errors(records, tmp_path, capsys, args, message):
    for rec in records:
        write_record(tmp_path / "results", rec)
    if args[0] != "--results":
        args = ["--results", str(tmp_path / "results"), *args]
    code = run_main(main, args)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
