"""``explain-monitor compare`` on synthetic summary tables: the drift statistics, the verdict, the
exit codes and messages of the command, and its JSON and HTML reports."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from monitor_tables import synthetic_table

from explain_client.monitor import cli
from explain_client.monitor.comparison import compare_tables
from explain_client.monitor.drift import PSI_EPSILON, psi, psi_null_critical, scalar_drift
from explain_client.monitor.push import build_registry
from explain_client.monitor.report import render_html, to_json
from explain_client.monitor.schema import SCALARS
from explain_client.monitor.store import SummaryWriter, write_failures
from explain_client.monitor.tables import TableError, read_summaries, word_occurrences
from explain_client.monitor.thresholds import Thresholds
from explain_client.monitor.words import STOP_WORDS, ndcg, read_object_words, ungrounded

pytestmark = pytest.mark.unit

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("api", "server", "client")),
    "MPLBACKEND": "Agg",
}


def _write(table: pa.Table, path: pathlib.Path) -> pathlib.Path:
    pq.write_table(table, path)
    return path


def _compare(*args: str) -> subprocess.CompletedProcess:
    """``explain-monitor compare ARGS`` as a user runs it (``python -m`` of this checkout)."""
    return subprocess.run(
        [sys.executable, "-m", "explain_client.monitor", "compare", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )


# ---------------------------------------------------------------- statistics


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(20, 400))
def test_psi_of_identical_samples_is_zero(seed, n):
    values = np.random.default_rng(seed).normal(size=n)
    value, bins = psi(values, values.copy())
    assert value == pytest.approx(0.0, abs=1e-12)
    assert 2 <= bins <= 10


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0.25, 1.0), st.floats(1.5, 3.0))
def test_psi_grows_with_the_shift_and_is_roughly_symmetric(seed, shift, factor):
    rng = np.random.default_rng(seed)
    baseline, noise = rng.normal(size=2000), rng.normal(size=2000)
    small, large = psi(baseline, noise + shift)[0], psi(baseline, noise + shift * factor)[0]
    assert large > small > 0
    # the reverse comparison bins on the other sample's quantiles: close, not equal
    backward = psi(noise + shift, baseline)[0]
    assert backward == pytest.approx(small, rel=0.5, abs=0.05)


def test_psi_counts_an_empty_bin_as_epsilon():
    baseline = np.arange(100.0)  # deciles: 10 records per bin
    current = np.full(50, 5.0)  # every record in the first bin
    p = np.full(10, 0.1)
    q = np.array([1.0] + [PSI_EPSILON] * 9)
    assert psi(baseline, current)[0] == pytest.approx(float(np.sum((q - p) * np.log(q / p))))


def test_psi_of_a_constant_baseline_uses_two_bins():
    value, bins = psi(np.zeros(100), np.zeros(100))
    assert (value, bins) == (0.0, 2)


@pytest.mark.parametrize("n", [65, 300])
@pytest.mark.parametrize("draw", ["normal", "lognormal"])
def test_psi_null_critical_keeps_its_level_for_any_continuous_distribution(n, draw):
    # 10 records per bin, as compare bins them: 6 bins at 65 records, 10 at 300
    bins, level, trials = min(10, n // 10), 0.05, 2000
    critical = psi_null_critical(n, n, bins, level)
    rng = np.random.default_rng(n)
    sample = getattr(rng, draw)
    values = np.array([psi(sample(size=n), sample(size=n), bins=bins)[0] for _ in range(trials)])
    assert np.all(values > 0)  # psi(...)[1] == bins: no ties in continuous draws
    # the rejection rate is binomial(trials, level): 4 standard deviations either side
    assert abs(np.mean(values >= critical) - level) <= 4 * np.sqrt(level * (1 - level) / trials)


def test_psi_null_critical_falls_as_the_samples_grow_and_is_deterministic():
    level = 0.01 / 24  # alpha / tests of a comparison with three segments
    criticals = [psi_null_critical(n, n, 10, level) for n in (100, 200, 400, 800)]
    assert criticals == sorted(criticals, reverse=True)
    assert criticals[-1] < criticals[0] / 4  # ~1/n: PSI is a chi-squared-like distance
    psi_null_critical.cache_clear()
    assert psi_null_critical(100, 100, 10, level) == criticals[0]


@settings(max_examples=50, deadline=None)
@given(
    st.dictionaries(st.text(min_size=1, max_size=6), st.floats(0.001, 10.0), min_size=1, max_size=30),
    st.floats(0.1, 10),
)
def test_ndcg_is_one_for_the_same_ranking(attributions, scale):
    assert ndcg(attributions, {k: v * scale for k, v in attributions.items()}) == pytest.approx(1.0)


def test_ndcg_follows_clarify_formula():
    baseline = {"a": 3.0, "b": 2.0, "c": 1.0}
    current = {"a": 1.0, "b": 2.0, "c": 3.0}  # reversed
    discount = 1 / np.log2([2, 3, 4])
    expected = float(np.dot([1.0, 2.0, 3.0], discount) / np.dot([3.0, 2.0, 1.0], discount))
    assert ndcg(baseline, current) == pytest.approx(expected)
    assert ndcg(baseline, {"a": 3.0}) == pytest.approx(1.0)  # missing keys rank last, here in order
    assert ndcg({"a": 0.0}, {"a": 1.0}) == 1.0  # nothing to rank


def test_segments_too_small_are_reported_not_tested():
    baseline = synthetic_table(300, 0, segments=("big", "big", "big", "big", "big", "tiny"))
    current = synthetic_table(300, 1, segments=("big", "big", "big", "big", "big", "tiny", "other"))
    result = scalar_drift(baseline, current, Thresholds(min_segment_records=60))
    assert set(result["segments"]) == {"big", "tiny", "other"}
    for signal in SCALARS:
        assert result["segments"]["big"][signal]["status"] == "tested"
        assert result["segments"]["tiny"][signal]["status"] == "too_small"  # 50 and 42 records
        other = result["segments"]["other"][signal]
        assert (other["status"], other["baseline_n"], other["current_n"]) == ("too_small", 0, 42)
        assert not result["segments"]["tiny"][signal]["drift"]
    # 6 signals overall and in "big": the Bonferroni level divides by the tests actually run
    assert result["tests"] == 12
    assert result["ks_level"] == pytest.approx(0.01 / 12)


def test_nan_values_are_left_out_and_counted():
    baseline = synthetic_table(300, 0, nan_share=0.2)
    current = synthetic_table(300, 1, nan_share=0.5)
    result = scalar_drift(baseline, current, Thresholds())["overall"]["mean_concentration"]
    assert result["baseline_nan"] + result["baseline_n"] == 300
    assert result["current_nan"] > result["baseline_nan"] > 0
    assert np.isfinite(result["psi"]) and np.isfinite(result["ks_pvalue"])
    assert not result["drift"]  # NaNs are missing values, not a shifted distribution


@pytest.mark.parametrize("seeds", [(0, 1), (2, 3), (4, 5), (6, 7)])
def test_two_samples_of_one_generator_do_not_drift(seeds):
    baseline = synthetic_table(300, seeds[0], segments=("a", "b", None))
    current = synthetic_table(250, seeds[1], segments=("a", "b", None))
    result = compare_tables(baseline, current, Thresholds())
    assert result["drift"] is False, result["alerts"]
    assert result["ranking"]["ndcg"] > 0.99
    assert result["ungrounded"]["drift"] is False
    assert result["coverage"]["drift"] is False
    assert result["coverage"]["baseline"]["share"] == pytest.approx(0.2, abs=0.01)


def test_diffuse_grounding_raises_the_weakly_grounded_share_not_the_ungrounded_one():
    baseline = synthetic_table(300, 0)
    current = synthetic_table(300, 1, diffuse=0.3)
    result = compare_tables(baseline, current, Thresholds())
    coverage = result["coverage"]
    base_concentrations = [
        w["concentration"] for ws in baseline.column("words").to_pylist() for w in ws if w["key"] != "a"
    ]
    assert coverage["concentration_threshold"] == pytest.approx(np.quantile(base_concentrations, 0.2))
    assert coverage["drift"] and coverage["increase"] >= 0.03 and coverage["pvalue"] < 0.01
    assert coverage["words"][0]["word"] in ("circle", "square", "triangle")
    assert any(alert.startswith("weakly grounded object-word share") for alert in result["alerts"])
    assert result["ungrounded"]["drift"] is False
    assert compare_tables(baseline, current, Thresholds(coverage_min_increase=0.5))["coverage"]["drift"] is False


def test_a_score_shift_drifts_overall_and_per_segment():
    baseline = synthetic_table(300, 0, segments=("a", "b"))
    current = synthetic_table(300, 1, score_shift=0.05, segments=("a", "b"))
    result = compare_tables(baseline, current, Thresholds())
    assert result["drift"] is True
    assert result["scalars"]["overall"]["score"]["drift"]
    assert all(result["scalars"]["segments"][s]["score"]["drift"] for s in ("a", "b"))
    assert not result["scalars"]["overall"]["interaction_share"]["drift"]
    assert "score (overall): PSI" in result["alerts"][0]
    # the same shift passes when the thresholds are raised
    lenient = Thresholds(psi=10.0, ks_min_statistic=1.0)
    assert compare_tables(baseline, current, lenient)["drift"] is False


def test_wrong_colours_name_the_colour_words_and_raise_the_ungrounded_share():
    baseline = synthetic_table(300, 0)
    current = synthetic_table(300, 1, wrong_colour=0.3)
    result = compare_tables(baseline, current, Thresholds())
    assert "a" not in {m["word"] for m in result["top_movers"]}  # a stop word, never a mover
    movers = [m["word"] for m in result["top_movers"][:4]]
    assert sorted(movers) == sorted(["red", "green", "blue", "yellow"])
    assert all(m["current_mean"] < m["baseline_mean"] for m in result["top_movers"][:4])
    coverage = result["ungrounded"]
    assert coverage["drift"] and coverage["increase"] > 0.1 and coverage["pvalue"] < 1e-6
    assert coverage["words"][0]["word"] in ("red", "green", "blue", "yellow")
    changed = result["changed_records"][0]
    assert changed["words"][changed["word"]]["key"] in ("red", "green", "blue", "yellow")
    assert changed["words"][changed["word"]]["relevance"] < 0


def test_object_words_and_stop_words(tmp_path):
    path = tmp_path / "objects.txt"
    path.write_text("# shapes only\nCircle\nsquare,\n\ntriangle  # three\n")
    assert read_object_words(path) == {"circle", "square", "triangle"}
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="names no word"):
        read_object_words(tmp_path / "empty.txt")
    baseline, current = synthetic_table(300, 0), synthetic_table(300, 1, wrong_colour=0.3)
    # the colours are not object words here: the wrong colours do not count
    only_shapes = ungrounded(
        word_occurrences(baseline), word_occurrences(current), Thresholds(), read_object_words(path)
    )
    assert only_shapes["current"]["object_words"] == 300 and not only_shapes["drift"]
    assert "a" in STOP_WORDS and "red" not in STOP_WORDS


# ---------------------------------------------------------------- tables


def test_a_directory_of_parts_reads_as_one_table(tmp_path):
    table = synthetic_table(100, 0)
    (tmp_path / "parts").mkdir()
    _write(table.slice(0, 40), tmp_path / "parts" / "part-0.parquet")
    _write(table.slice(40), tmp_path / "parts" / "part-1.parquet")
    read = read_summaries(tmp_path / "parts", role="current")
    assert read.num_rows == 100
    assert sorted(read.column("record_id").to_pylist()) == sorted(table.column("record_id").to_pylist())


def test_an_explain_output_directory_reads_without_its_failures_table(tmp_path):
    """`explain-monitor explain` writes failures.parquet beside its parts, with or without failures."""
    table = synthetic_table(50, 0)
    writer = SummaryWriter(tmp_path / "run", flush_rows=20)
    for row in table.to_pylist():
        writer.add(row)
    writer.flush()
    for failures in ([], [{"record_id": "x", "row": 50, "code": "INVALID_ARGUMENT", "message": "bad", "attempts": 1}]):
        write_failures(tmp_path / "run", failures)
        read = read_summaries(tmp_path / "run", role="baseline")
        assert sorted(read.column("record_id").to_pylist()) == sorted(table.column("record_id").to_pylist())


def test_bad_tables_raise_errors_naming_the_problem(tmp_path):
    with pytest.raises(TableError, match="baseline table .*does not exist"):
        read_summaries(tmp_path / "missing.parquet", role="baseline")
    _write(synthetic_table(10, 0).drop_columns(["score", "words"]), tmp_path / "partial.parquet")
    with pytest.raises(TableError, match="lacks the summary schema's column.*score, words"):
        read_summaries(tmp_path / "partial.parquet", role="current")
    _write(synthetic_table(10, 0).slice(0, 0), tmp_path / "empty.parquet")
    with pytest.raises(TableError, match="has no rows"):
        read_summaries(tmp_path / "empty.parquet", role="current")
    (tmp_path / "text.parquet").write_text("record_id,score\n1,0.3\n")
    with pytest.raises(TableError, match="not readable as Parquet"):
        read_summaries(tmp_path / "text.parquet", role="baseline")


# ---------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> dict[str, pathlib.Path]:
    folder = tmp_path_factory.mktemp("tables")
    return {
        "baseline": _write(synthetic_table(300, 0, segments=("a", "b")), folder / "baseline.parquet"),
        "same": _write(synthetic_table(300, 1, segments=("a", "b")), folder / "same.parquet"),
        "wrong": _write(synthetic_table(300, 2, wrong_colour=0.3, segments=("a", "b")), folder / "wrong.parquet"),
    }


@pytest.fixture(scope="module")
def wrong_run(tables, tmp_path_factory) -> tuple[subprocess.CompletedProcess, pathlib.Path]:
    """``compare BASELINE WRONG --json --html`` run once as a subprocess; its result and folder."""
    folder = tmp_path_factory.mktemp("wrong")
    result = _compare(tables["baseline"], tables["wrong"], "--json", folder / "r.json", "--html", folder / "r.html")
    return result, folder


def test_exit_0_without_drift(tables):
    same = _compare(tables["baseline"], tables["same"])
    assert same.returncode == 0, same.stderr
    assert same.stdout.startswith("no drift") and same.stderr == ""


def test_exit_1_with_drift_and_the_alerts_printed(wrong_run):
    result, folder = wrong_run
    assert result.returncode == 1, result.stderr
    assert result.stdout.startswith("DRIFT") and "ungrounded object-word share" in result.stdout
    report = json.loads((folder / "r.json").read_text())
    assert report["drift"] is True
    assert report["alerts"] == [line.strip() for line in result.stdout.splitlines()[1:]]


def test_bad_tables_exit_2_with_a_message(tables, tmp_path):
    cases = [
        ([tmp_path / "nope.parquet", tables["same"]], "baseline table .*nope.parquet' does not exist"),
        ([tables["baseline"], _write(pa.table({"score": [0.1]}), tmp_path / "x.parquet")], "lacks the summary"),
        ([tables["baseline"], _write(synthetic_table(5, 0).slice(0, 0), tmp_path / "e.parquet")], "has no rows"),
    ]
    for args, message in cases:
        result = _compare(*args)
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr.startswith("explain-monitor compare: ")
        assert re.search(message, result.stderr), result.stderr


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda t, d: [t["baseline"], d / "nope"], "current table .*nope' does not exist"),
        (lambda t, d: [t["baseline"], t["same"], "--alpha", "1.5"], r"--alpha must be in \(0, 1\); got 1.5"),
        (lambda t, d: [t["baseline"], t["same"], "--psi-bins", "1"], r"--psi-bins must be >= 2; got 1"),
        (lambda t, d: [t["baseline"], t["same"], "--timeout", "0"], r"--timeout must be > 0 seconds; got 0.0"),
        (
            lambda t, d: [t["baseline"], t["same"], "--object-words", d / "none.txt"],
            "--object-words .*none.txt: No such",
        ),
        (lambda t, d: [t["baseline"], t["same"], "--grouping-label", "novalue"], "--grouping-label must be KEY=VALUE"),
        (lambda t, d: [t["baseline"], t["same"], "--html", d], "--html .* is a folder; give a file name"),
        (lambda t, d: [t["baseline"], t["same"], "--json", t["same"] / "r.json"], "--json .*: cannot make its folder"),
    ],
)
def test_bad_input_returns_2_with_a_message(tables, tmp_path, capsys, make_args, message):
    assert cli.main(["compare", *map(str, make_args(tables, tmp_path))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("explain-monitor compare: ") and re.search(message, err), err


def test_report_folders_are_made_and_a_table_without_rows_says_so(tables, tmp_path, capsys):
    report = tmp_path / "reports" / "night" / "r.json"
    assert cli.main(["compare", str(tables["baseline"]), str(tables["same"]), "--json", str(report)]) in (0, 1)
    assert json.loads(report.read_text())["baseline"]["records"] == 300
    (tmp_path / "run").mkdir()
    pq.write_table(pa.table({"record_id": ["a"], "code": ["UNAVAILABLE"]}), tmp_path / "run" / "failures.parquet")
    assert cli.main(["compare", str(tables["baseline"]), str(tmp_path / "run")]) == 2
    assert "has no rows (an explain-monitor explain output whose records all failed" in capsys.readouterr().err


def test_tables_of_different_models_are_compared_with_a_warning(tables, tmp_path, capsys):
    other = pq.read_table(tables["same"])
    other = other.set_column(other.schema.get_field_index("model"), "model", pa.array(["rnd"] * other.num_rows))
    pq.write_table(other, tmp_path / "rnd.parquet")
    cli.main(["compare", str(tables["baseline"]), str(tmp_path / "rnd.parquet"), "--json", str(tmp_path / "r.json")])
    assert "warning: the tables come from different models (baseline shapes, current rnd)" in capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["baseline"]["models"], report["current"]["models"]) == (["shapes"], ["rnd"])
    assert report["warnings"]
    cli.main(["compare", str(tables["baseline"]), str(tables["same"]), "--json", str(tmp_path / "same.json")])
    assert json.loads((tmp_path / "same.json").read_text())["warnings"] == []


def test_threshold_flags_change_the_verdict(tables, tmp_path, capsys):
    code = cli.main(
        ["compare", str(tables["baseline"]), str(tables["wrong"]), "--ungrounded-min-increase", "0.9"]
        + ["--json", str(tmp_path / "r.json")]
    )
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["thresholds"]["ungrounded_min_increase"] == 0.9
    assert report["ungrounded"]["drift"] is False
    assert code == (1 if report["alerts"] else 0)
    assert capsys.readouterr().out.startswith("DRIFT" if code else "no drift")


def test_help_documents_the_exit_codes_and_thresholds():
    result = subprocess.run(
        [sys.executable, "-m", "explain_client.monitor", "compare", "--help"], capture_output=True, text=True, env=ENV
    )
    assert result.returncode == 0
    for text in (
        "0  no drift",
        "1  drift",
        "2  bad input",
        "--psi",
        "--ndcg",
        "--ungrounded-concentration",
        "--target",
    ):
        assert text in result.stdout


# ---------------------------------------------------------------- reports


def test_json_round_trips(wrong_run):
    text = (wrong_run[1] / "r.json").read_text()
    report = json.loads(text)
    assert json.loads(json.dumps(report)) == report
    assert report["version"] == 1
    assert set(report) >= {"drift", "alerts", "thresholds", "scalars", "ranking", "ungrounded", "top_movers"}
    assert report["thresholds"] == Thresholds().as_dict()
    for signal in SCALARS:
        assert set(report["scalars"]["overall"][signal]) >= {
            "psi",
            "psi_critical",
            "ks_statistic",
            "ks_pvalue",
            "drift",
        }
    assert report["ranking"]["threshold"] == 0.9
    assert "NaN" not in text


def test_json_has_no_nan_where_statistics_are_undefined():
    table = synthetic_table(50, 0, nan_share=1.0)  # every mean_concentration NaN: nothing to test
    comparison = compare_tables(table, table, Thresholds())
    assert comparison["scalars"]["overall"]["mean_concentration"]["status"] == "too_small"
    assert json.loads(to_json(comparison))["drift"] is False


def test_html_has_every_section(wrong_run):
    html = (wrong_run[1] / "r.html").read_text()
    sections = (
        "verdict",
        "scalars",
        "segments",
        "ranking",
        "movers",
        "ungrounded",
        "coverage",
        "records",
        "thresholds",
    )
    for section in sections:
        assert f'<section id="{section}">' in html
    assert "DRIFT:" in html
    assert html.count("data:image/png;base64,") == 4  # scalars, movers, ungrounded, coverage
    assert "Overlays need --target" in html  # no --target: peak cells, and why there are no overlays
    assert "segment <code>a</code>" in html
    assert "<script" not in html and "http://" not in html and "https://" not in html  # self-contained


def test_html_without_drift_says_so():
    baseline, current = synthetic_table(200, 0), synthetic_table(200, 1)
    comparison = compare_tables(baseline, current, Thresholds())
    html = render_html(comparison, baseline, current, None, overlay_note="no overlays")
    assert "No drift: every statistic is within its threshold" in html
    assert "Neither table has a segment" in html


def test_registry_holds_the_drift_gauges():
    baseline, current = synthetic_table(300, 0, segments=("a", "b")), synthetic_table(300, 1, score_shift=0.05)
    registry = build_registry(compare_tables(baseline, current, Thresholds()))
    psi_score = registry.get_sample_value(
        "explain_monitor_population_stability_index", {"signal": "score", "segment": "all"}
    )
    assert psi_score > 0.25
    assert registry.get_sample_value("explain_monitor_drift") == 1
    assert registry.get_sample_value("explain_monitor_records", {"sample": "current"}) == 300
    # "a" and "b" have no records in current: too small, so no per-segment series
    assert registry.get_sample_value("explain_monitor_ks_statistic", {"signal": "score", "segment": "a"}) is None
