"""Leaderboard tables from hand-written records: identity by SHA-256, recipes over pretraining
seeds, small-n intervals, Meta-Dataset's ties, ranks, units, power, and every export format."""

from __future__ import annotations

import base64
import csv
import io
import re

import numpy as np
import pytest
from scipy import stats as sps

from leaderboard.build import build_table, find_pairs
from leaderboard.cli import main, render_csv, render_html, render_latex, render_markdown
from leaderboard.model import EPISODES, FT_SEEDS, PT_SEEDS, Row
from ringbench import stats
from ringbench.cli import run_main
from ringbench.records import in_percent, make_record
from ringbench.store import write_record


def _meta(method="moco", loss="nce", seed=0, epochs=5, **extra):
    loss_config = {"name": loss, **extra.get("loss_params", {})}
    config = {"method": method, "loss": loss_config, "train": {"epochs": epochs, "seed": seed}}
    return {
        "method": method,
        "loss": loss,
        "dataset": "synthetic",
        "arch": "resnet18",
        "epochs": epochs,
        "seed": seed,
        "config": config,
        **extra,
    }


# The tasks' headline metrics, as transfer/run.py writes them into each record.
HEADLINE = {"syn_det": ["bbox/AP"], "fewshot_digits": ["acc"]}


def _rec(name, task, metrics, family, sha=None, meta=None, config=None, ci95=None, extra=None, seeds=(0,), **kw):
    return make_record(
        backbone=name,
        backbone_sha256=sha or (name.encode().hex() + "0" * 64)[:64],
        task=task,
        metrics=metrics,
        config=config or {"episodes": 50},
        ci95=ci95,
        seeds=seeds,
        engine_versions={"torch": "t"},
        family=family,
        backbone_meta=meta or _meta(),
        extra=extra or {},
        **kw,
    )


def _fewshot(name, episodes, **kw):
    """A few-shot record as the task writes it: acc in percent, per-episode accuracies as fractions."""
    acc = 100 * float(np.mean(episodes))
    half = 100 * 1.96 * float(np.std(episodes, ddof=1)) / np.sqrt(len(episodes))
    return _rec(
        name,
        "fewshot_digits",
        {"acc": acc},
        "fewshot",
        ci95={"acc": half},
        extra={"episode_accuracies": {"digits": list(map(float, episodes))}},
        headline=HEADLINE["fewshot_digits"],
        **kw,
    )


def _det(name, per_seed, **kw):
    """A detection record as the Detectron2 tasks write it: the mean, and per-seed values."""
    return _rec(
        name,
        "syn_det",
        {"bbox/AP": float(np.mean(per_seed))},
        "detectron2",
        config={"iters": 60},
        seeds=range(len(per_seed)),
        extra={"per_seed": [{"bbox/AP": v} for v in per_seed]},
        headline=HEADLINE["syn_det"],
        **kw,
    )


RING = {"w_outer": 0.1, "w_inner": 0.1}


@pytest.fixture
def records():
    rng = np.random.default_rng(0)
    plain_eps = rng.uniform(0.4, 0.6, 100)
    ring_eps = plain_eps + 0.05 + rng.normal(0, 0.01, 100)  # clearly better, on the same 100 episodes
    return [
        _fewshot("moco", plain_eps),
        _fewshot("ring_moco", ring_eps, meta=_meta(loss="ring", loss_params=RING)),
        _det("moco", [30.0, 30.0, 30.0]),
        _det("ring_moco", [30.1, 32.0, 30.3], meta=_meta(loss="ring", loss_params=RING)),
        # same task, another config: its own column, never merged
        _rec(
            "ring_moco",
            "syn_det",
            {"bbox/AP": 40.0},
            "detectron2",
            config={"iters": 200},
            meta=_meta(loss="ring", loss_params=RING),
        ),
        # simclr has no detection record: a missing cell
        _fewshot("simclr", rng.uniform(0.5, 0.6, 100), meta=_meta(method="simclr")),
    ]


def test_small_n_gets_a_t_interval_and_many_episodes_a_bootstrap(records):
    """The issue's example: 3 fine-tuning seeds whose differences are 0.1, 2.0 and 0.3 get the paired
    t-interval with 2 degrees of freedom (about -1.8 ... +3.4) and no *; a clear difference over 100
    paired episodes keeps its *."""
    table = build_table(records)
    labels = [c.label for c in table.columns]
    assert labels == ["syn_det bbox/AP [iters=200]", "syn_det bbox/AP [iters=60]", "fewshot_digits acc"]
    [delta] = table.deltas
    assert (table.row(delta.plain).name, table.row(delta.variant).name) == ("moco", "ring_moco")
    det = delta.cells[table.columns[1]]
    d = np.array([0.1, 2.0, 0.3])
    half = sps.t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
    assert (det.lo, det.hi) == pytest.approx((d.mean() - half, d.mean() + half))
    assert det.lo == pytest.approx(-1.8, abs=0.05) and det.hi == pytest.approx(3.4, abs=0.05)
    assert not det.significant and (det.n, det.over, det.method) == (3, FT_SEEDS, "t")
    few = delta.cells[table.columns[2]]
    assert few.significant and few.lo > 0 and (few.n, few.over, few.method) == (100, EPISODES, "bootstrap")
    assert table.columns[0] not in delta.cells  # moco has no iters=200 record
    text = render_markdown(table)
    row = next(line for line in text.splitlines() if line.startswith("| Δ ring_moco − moco"))
    assert "+0.80 [-1.79, +3.39] (3 ft)" in row and "]* (100 ep)" in row


def test_one_replicate_gets_no_interval_and_no_star():
    table = build_table([_det("moco", [30.0]), _det("ring_moco", [35.0], meta=_meta(loss="ring"))])
    [delta] = table.deltas
    cell = next(iter(delta.cells.values()))
    assert cell.diff == pytest.approx(5.0) and cell.lo is None and not cell.significant and cell.n == 1
    text = render_markdown(table)
    assert "+5.00 (1 ft)" in text and "*" not in text.split("\n\n")[0].replace("**", "")


def test_same_name_cards_are_two_rows_with_their_own_deltas():
    """Two different cards named ring_moco (say, retrained with another loss setting) are two rows,
    name@sha8, each with its Δ row against its twin; --latest keeps the newer card."""
    rng = np.random.default_rng(1)
    eps = rng.uniform(0.4, 0.6, 60)
    old = _meta(loss="ring", loss_params=RING, created="2026-01-01T00:00:00+00:00")
    new = _meta(loss="ring", loss_params={"w_outer": 0.5, "w_inner": 0.0}, created="2026-02-01T00:00:00+00:00")
    records = [
        _fewshot("moco", eps),
        _fewshot("ring_moco", eps + 0.05, sha="a" * 64, meta=old),
        _fewshot("ring_moco", eps - 0.05, sha="b" * 64, meta=new),
    ]
    for view in ("recipes", "cards"):  # two configs: two recipes as well as two cards
        table = build_table(records, view=view)
        names = sorted(r.name for r in table.rows)
        assert names == ["moco", "ring_moco@aaaaaaaa", "ring_moco@bbbbbbbb"]
    assert any("2 different cards are named 'ring_moco'" in w for w in table.warnings)
    diffs = {table.row(d.variant).name: next(iter(d.cells.values())).diff for d in table.deltas}
    assert diffs == pytest.approx({"ring_moco@aaaaaaaa": 5.0, "ring_moco@bbbbbbbb": -5.0})
    latest = build_table(records, view="cards", latest=True)
    assert sorted(r.name for r in latest.rows) == ["moco", "ring_moco"]
    assert latest.row_by_name("ring_moco").sha256 == "b" * 64 and not latest.warnings


def _recipe_records(seeds=(0, 1, 2), gain=(1.0, 2.0, 3.0), episodes=40):
    """moco and ring_moco recipes, one card per pretraining seed, on the same episodes; the ring's
    gain over its same-seed twin differs by seed."""
    rng = np.random.default_rng(2)
    out = []
    for seed, g in zip(seeds, gain):
        base = rng.uniform(0.4, 0.6, episodes)
        out.append(_fewshot(f"moco_s{seed}", base, meta=_meta(seed=seed)))
        ring = base + g / 100 + rng.normal(0, 0.002, episodes)
        out.append(_fewshot(f"ring_moco_s{seed}", ring, meta=_meta(loss="ring", seed=seed, loss_params=RING)))
    return out


def test_recipes_average_their_cards_and_pair_deltas_by_pretraining_seed():
    records = _recipe_records()
    table = build_table(records)
    assert sorted(r.name for r in table.rows) == ["moco", "ring_moco"]
    col = table.columns[0]
    ring = table.row_by_name("ring_moco")
    cell = table.cells[(ring.key, col)]
    card_means = [in_percent(r)["metrics"]["acc"] for r in records if r["backbone"].startswith("ring")]
    assert cell.mean == pytest.approx(np.mean(card_means)) and cell.sd == pytest.approx(np.std(card_means, ddof=1))
    assert (cell.n, cell.over) == (3, PT_SEEDS)
    [delta] = table.deltas
    d = delta.cells[col]
    plain_means = [in_percent(r)["metrics"]["acc"] for r in records if r["backbone"].startswith("moco")]
    per_seed = np.array(card_means) - np.array(plain_means)
    assert d.diff == pytest.approx(per_seed.mean()) and (d.n, d.over, d.method) == (3, PT_SEEDS, "t")
    assert (d.lo, d.hi) == pytest.approx(stats.t_interval(per_seed))
    text = render_markdown(table)
    assert f"{cell.mean:.2f} sd {cell.sd:.2f} (3 pt)" in text and "standard deviation across a recipe" in text.replace(
        "\n", " "
    )
    cards = build_table(records, view="cards")  # --cards: six rows, each ring card against its same-seed twin
    assert len(cards.rows) == 6 and len(cards.deltas) == 3
    assert all(cards.row(d.plain).meta["seed"] == cards.row(d.variant).meta["seed"] for d in cards.deltas)


def test_many_pretraining_seeds_get_the_two_level_bootstrap():
    seeds = list(range(12))
    records = _recipe_records(seeds, gain=np.linspace(0.5, 1.5, 12))
    table = build_table(records)
    [delta] = table.deltas
    d = next(iter(delta.cells.values()))
    assert (d.n, d.method) == (12, "two-level bootstrap") and d.significant
    assert d.lo < d.diff < d.hi


def test_two_level_bootstrap_carries_both_levels():
    """No variance within seeds: the two-level bootstrap is the bootstrap of the seeds' means. No
    variance between seeds: it keeps the within-seed variance, plus the between-seed variance the
    observed seed means show (about the same again: the scheme errs wide, Davison & Hinkley §3.8)."""
    rng = np.random.default_rng(3)
    means = rng.normal(1.0, 2.0, 15)
    flat = [np.full(50, m) for m in means]
    lo, hi = stats.two_level_bootstrap_ci(flat, 40_000, np.random.default_rng(4))
    lo1, hi1 = stats.paired_bootstrap_ci(means, 40_000, np.random.default_rng(5))
    assert lo == pytest.approx(lo1, abs=0.06) and hi == pytest.approx(hi1, abs=0.06)
    noisy = [rng.normal(0.0, 1.0, 100) for _ in range(20)]
    lo, hi = stats.two_level_bootstrap_ci(noisy, 20_000, np.random.default_rng(6))
    normal_half = 1.96 * 1.0 / np.sqrt(20 * 100)
    assert 1.15 < (hi - lo) / 2 / normal_half < 1.7


def test_intervals_against_scipy():
    rng = np.random.default_rng(7)
    x = rng.normal(0.3, 1.0, 8)
    assert stats.t_interval(x) == pytest.approx(sps.t.interval(0.95, 7, loc=x.mean(), scale=sps.sem(x)), rel=1e-12)
    assert stats.t_interval([1.0]) is None
    a, b = rng.normal(0, 1, 6), rng.normal(1, 2, 9)
    res = sps.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert stats.welch_interval(a, b) == pytest.approx((res.low, res.high))
    d = rng.normal(0.3, 1.0, 400)
    lo, hi = stats.paired_bootstrap_ci(d, 20_000, np.random.default_rng(2))
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    assert lo == pytest.approx(d.mean() - half, abs=0.02) and hi == pytest.approx(d.mean() + half, abs=0.02)


def test_power_matches_published_sample_sizes():
    """Paired t-test, α = 0.05 two-sided, 80% power: d = 1 needs 10 pairs, d = 0.5 needs 34 (Cohen
    1988; G*Power gives the same), d = 0.2 needs 199."""
    assert stats.replicates_needed(1.0, 1.0) == 10
    assert stats.replicates_needed(0.5, 1.0) == 34
    assert stats.replicates_needed(2.0, 10.0) == 199
    assert stats.paired_t_power(1.0, 10) == pytest.approx(0.803, abs=0.002)
    with pytest.raises(ValueError):
        stats.replicates_needed(0.0, 1.0)


def test_power_report_from_the_table(tmp_path, capsys):
    for rec in _recipe_records():
        write_record(tmp_path, rec)
    code = run_main(main, ["--results", str(tmp_path), "--power", "1.0"])
    out = capsys.readouterr().out
    assert code == 0
    lines = {line.split("|")[2].strip(): line for line in out.splitlines() if line.startswith("| fewshot")}
    assert set(lines) == {PT_SEEDS, EPISODES}
    sd = float(lines[PT_SEEDS].split("|")[3])
    per_seed = np.array([1.0, 2.0, 3.0])  # the recipe's gains, to within the episodes' noise
    assert sd == pytest.approx(per_seed.std(ddof=1), abs=0.05)
    assert int(lines[PT_SEEDS].split("|")[5]) == stats.replicates_needed(1.0, sd)


def test_ties_with_the_best_and_average_ranks():
    """Meta-Dataset's rule: the best and every entry not significantly below it are marked."""
    rng = np.random.default_rng(8)
    base = rng.uniform(0.4, 0.6, 200)
    records = [
        _fewshot("a_best", base + 0.10),
        _fewshot("b_close", base + 0.10 + rng.normal(0, 0.05, 200)),  # same on average: tied
        _fewshot("c_worse", base),
        _det("a_best", [20.0, 21.0, 22.0]),
        _det("b_close", [30.0, 31.0, 32.0]),
        _det("c_worse", [10.0, 11.0, 12.0]),
    ]
    table = build_table(records, view="cards")
    few, det = table.columns[1], table.columns[0]
    key = {r.name: r.key for r in table.rows}
    assert {n for n in key if (key[n], few) in table.tied} == {"a_best", "b_close"}
    assert {n for n in key if (key[n], det) in table.tied} == {"b_close"}  # 3 paired seeds, +10 and +20: clear
    ranks = {n: table.ranks[k] for n, k in key.items()}
    few_rank = sps.rankdata([-table.cells[(key[n], few)].mean for n in ("a_best", "b_close", "c_worse")])
    det_rank = [2, 1, 3]
    for i, n in enumerate(("a_best", "b_close", "c_worse")):
        assert ranks[n] == (pytest.approx((few_rank[i] + det_rank[i]) / 2), 2)
    assert "avg rank" in render_markdown(table)


def test_units_are_read_by_one_rule():
    frac = _det("moco", [0.30, 0.31], units={"bbox/AP": "fraction"})
    got = in_percent(frac)
    assert got["metrics"]["bbox/AP"] == pytest.approx(30.5) and got["extra"]["per_seed"][1]["bbox/AP"] == 31.0
    legacy = _det("moco", [30.0, 31.0])
    del legacy["units"]
    assert in_percent(legacy)["metrics"] == legacy["metrics"] and in_percent(legacy)["units_from"] == "legacy rule"
    # a fraction-valued legacy record beside a percent one: read as percent, with a warning
    old = _det("ring_moco", [0.3, 0.31], meta=_meta(loss="ring"))
    del old["units"]
    table = build_table([_det("moco", [30.0, 31.0]), old, frac | {"backbone": "x", "backbone_sha256": "c" * 64}])
    assert any("ring_moco syn_det bbox/AP = 0.305 is read as percent" in w for w in table.warnings)
    x = table.cells[(table.row_by_name("x").key, table.columns[0])]
    assert x.mean == pytest.approx(30.5)  # declared fractions are converted, and not warned about
    assert not any(w.startswith("x ") for w in table.warnings)


def test_variants_pair_with_their_plain_twin_only():
    """Ring, HCL and DCL rows each get a Δ against the NT-Xent row of the same run, never against
    each other, whatever the names' order; another method or epoch count is not a twin."""

    def row(name, loss, method="simclr", epochs=5):
        meta = {"method": method, "loss": loss, "dataset": "synthetic", "arch": "resnet18", "epochs": epochs}
        return Row(name, name, [], meta)

    rows = [
        row("a_dcl", "dcl"),
        row("b_hcl", "hcl"),
        row("c_ntxent", "ntxent"),
        row("d_ring", "ring"),
        row("e_ring_long", "ring", epochs=50),
        row("f_moco", "nce", method="moco"),
    ]
    assert find_pairs(rows) == [("c_ntxent", "a_dcl"), ("c_ntxent", "b_hcl"), ("c_ntxent", "d_ring")]


NASTY = "=HYPERLINK(x)|$a^b{c}~d_e\nf$_{x}^$"


def _nasty_records():
    rng = np.random.default_rng(9)
    eps = rng.uniform(0.4, 0.6, 30)
    return [_fewshot("moco", eps), _fewshot(NASTY, eps + 0.02, meta=_meta(loss="ring", loss_params=RING))]


def test_csv_is_numeric_and_formula_safe(records):
    table = build_table(records + _nasty_records()[1:], view="cards")
    rows = list(csv.DictReader(io.StringIO(render_csv(table))))
    moco = [r for r in rows if r["row"] == "moco" and r["kind"] == "card"]
    det60 = next(r for r in moco if r["task"] == "syn_det")
    assert float(det60["mean"]) == 30.0 and int(det60["n"]) == 3 and det60["unit"] == "percent"
    assert float(det60["lo"]) == pytest.approx(30.0) and det60["config"] == "iters=60"
    delta = next(r for r in rows if r["kind"] == "delta" and r["task"] == "syn_det")
    assert float(delta["lo"]) == pytest.approx(-1.79, abs=0.01) and delta["significant"] == "0"
    assert delta["plain"] == "moco" and delta["variant"] == "ring_moco"
    for r in rows:  # every number parses; no text field starts a formula
        for key in ("mean", "lo", "hi", "sd", "n"):
            assert r[key] == "" or float(r[key]) == float(r[key])
        assert all(not v or v[0] not in "=+-@" for k, v in r.items() if k not in ("mean", "lo", "hi"))
    assert any(r["row"] == "'" + NASTY for r in rows)


def test_markdown_escapes_names():
    text = render_markdown(build_table(_nasty_records(), view="cards"))
    table_lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len({line.replace("\\|", "").count("|") for line in table_lines}) == 1  # no cell split by a name
    assert "HYPERLINK(x)\\|$a^b{c}~d_e f" in text


def test_latex_escapes_names_and_uses_booktabs(records):
    text = render_latex(build_table(records + _nasty_records()[1:], view="cards"))
    assert text.startswith(r"\begin{tabular}") and r"\toprule" in text and r"\bottomrule" in text
    assert r"=HYPERLINK(x)|\$a\textasciicircum{}b\{c\}\textasciitilde{}d\_e f" in text
    assert r"$\pm$" in text and r"\textbf{" in text
    body = [line for line in text.splitlines() if line.endswith(r"\\")]
    assert len({line.count(" & ") for line in body}) == 1  # every row has every column
    tabular = text[: text.index(r"\end{tabular}")]  # the notes below are % comments
    assert not re.search(r"(?<!\\)[_#%&^~]", tabular.replace(" & ", "").replace(r"\\", ""))


def test_html_is_self_contained_and_survives_dollars(records):
    """A ``$`` in a name is text to matplotlib (no mathtext abort) and to the page."""
    page = render_html(build_table(records + _nasty_records()[1:], view="cards"))
    assert page.startswith("<!DOCTYPE html>") and "<table" in page and "<b>" in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 3  # the forest plot and one bar chart per family
    assert all(base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n" for img in images)
    assert "=HYPERLINK(x)|$a^b{c}~d_e" in page


def test_ring_schedule_shows_the_share_the_ring_keeps():
    from leaderboard.plots import schedule_curve

    meta = {"epochs": 4, "loss_params": {"w_outer": 0.5, "w_inner": 0.2}}
    assert schedule_curve(meta) == ([0, 1, 2, 3, 4], pytest.approx([0.4] * 5))


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
        (["--baseline", "moco=nobody"], "no rows named ['nobody']"),
        (["--power", "-1"], "--power -1.0: expected a difference"),
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


def test_a_record_names_what_its_samples_are():
    """kNN keeps one value per test image and the low-shot SVM one per sample: the interval says so
    (``img`` / ``smp``), where per-image values would otherwise read as episodes and samples as seeds."""
    rng = np.random.default_rng(0)
    correct = [100 * int(v) for v in rng.random(200) < 0.7]
    knn = _rec(
        "a",
        "knn_synthetic",
        {"top1_k20": float(np.mean(correct))},
        "knn",
        headline=["top1_k20"],
        extra={"per_episode": {"top1_k20": correct}, "samples_over": "test images"},
    )
    lowshot = _rec(
        "a",
        "svm_synthetic_lowshot",
        {"map_k1": 50.0},
        "svm",
        headline=["map_k1"],
        extra={"per_seed": [{"map_k1": v} for v in (48.0, 50.0, 52.0)], "samples_over": "low-shot samples"},
    )
    unnamed = _rec(
        "b",
        "knn_synthetic",
        {"top1_k20": 70.0},
        "knn",
        headline=["top1_k20"],
        sha="f" * 64,
        extra={"per_episode": {"top1_k20": correct}, "samples_over": "bogus"},
    )
    text = render_markdown(build_table([knn, lowshot, unnamed], view="cards"))
    assert "(200 img)" in text and "(3 smp)" in text and "(200 ep)" in text  # an unknown name: the default
    assert "interval over n test images" in text and "interval over n low-shot samples" in text


def test_a_tasks_columns_follow_its_headline():
    """A battery's record names its mean first, then its data sets: the table keeps that order, not the
    alphabet's; metrics outside the headline (``--all-metrics``) come after it."""
    rec = _rec(
        "a",
        "linear_kornblith",
        {"mean": 50.0, "cars/acc": 40.0, "aircraft/mean_per_class_acc": 60.0, "wall": 1.0},
        "linear",
        headline=["mean", "cars/acc", "aircraft/mean_per_class_acc"],
    )
    metrics = [c.metric for c in build_table([rec], view="cards", all_metrics=True).columns]
    assert metrics == ["mean", "cars/acc", "aircraft/mean_per_class_acc", "wall"]


def test_an_aggregate_is_not_ranked_beside_its_parts():
    """A battery's mean sums up its data sets: ranked beside them it would count each result twice; shown alone
    (its parts not in the table) it is ranked. Rows: a wins cifar10 and loses dtd; b the other way; a's mean is
    higher. Over the two parts they tie (1.5 each); counting the mean too would put a ahead."""
    head = ["mean", "cifar10/acc", "dtd/acc"]

    def battery(name, cifar, dtd, **kw):
        metrics = {"mean": (cifar + dtd) / 2, "cifar10/acc": cifar, "dtd/acc": dtd}
        return _rec(name, "linear_kornblith", metrics, "linear", headline=head, extra=kw)

    for extra in ({"aggregates": {"mean": head[1:]}}, {"mean_over": head[1:]}):  # mean_over: older records
        table = build_table([battery("a", 90.0, 40.0, **extra), battery("b", 80.0, 45.0, **extra)], view="cards")
        assert table.ranked == 2
        assert {r.name: table.ranks[r.key] for r in table.rows} == {"a": (1.5, 2), "b": (1.5, 2)}
        assert "1.5 (2/2)" in render_markdown(table)
    only_mean = [battery("a", 90.0, 40.0, aggregates={"mean": head[1:]}), battery("b", 80.0, 45.0)]
    for rec in only_mean:
        rec["headline"] = ["mean"]
    table = build_table(only_mean, view="cards")
    assert table.ranked == 1 and {r.name: table.ranks[r.key][0] for r in table.rows} == {"a": 1.0, "b": 2.0}
    damaged = battery("a", 90.0, 40.0, aggregates={"mean": "cifar10/acc"})  # not a list: declares nothing
    assert build_table([damaged, battery("b", 80.0, 45.0)], view="cards").ranked == 3
