"""``explain-monitor compare`` against the services it talks to: a real Prometheus Pushgateway
(Debian's ``prometheus-pushgateway``) for ``--pushgateway``, and a real ``explain-server`` on the
shipped shapes model for the report's overlays (``--target``)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
import urllib.request

import pyarrow.parquet as pq
import pytest
from monitor_tables import explained_table, synthetic_table
from prometheus_client.parser import text_string_to_metric_families

from explain_client import ExplainClient
from explain_server.launcher import HOST, ServerProcess, free_port

pytestmark = pytest.mark.integration

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("api", "server", "client"))}
PUSHGATEWAY = "/usr/bin/prometheus-pushgateway"  # Debian's prometheus-pushgateway package


def _compare(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "explain_client.monitor", "compare", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )


@pytest.fixture
def pushgateway(tmp_path):
    """A Pushgateway on a free loopback port; its URL."""
    binary = shutil.which("prometheus-pushgateway") or PUSHGATEWAY
    if not os.access(binary, os.X_OK):
        reason = f"no Pushgateway binary ({PUSHGATEWAY}): apt-get install prometheus-pushgateway"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI is set: the test must run there)")
        pytest.skip(reason)
    port = free_port()
    url = f"http://{HOST}:{port}"
    with open(tmp_path / "pushgateway.log", "wb") as log:
        proc = subprocess.Popen([binary, f"--web.listen-address={HOST}:{port}"], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the Pushgateway did not start: {(tmp_path / 'pushgateway.log').read_text()}")
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _metrics(url: str) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_pushgateway_receives_the_drift_gauges(pushgateway, tmp_path):
    pq.write_table(synthetic_table(300, 0, segments=("a", "b")), tmp_path / "baseline.parquet")
    pq.write_table(synthetic_table(300, 1, score_shift=0.05, segments=("a", "b")), tmp_path / "current.parquet")
    result = _compare(
        tmp_path / "baseline.parquet",
        tmp_path / "current.parquet",
        "--json",
        tmp_path / "r.json",
        "--pushgateway",
        pushgateway,
        "--job",
        "nightly-monitor",
        "--grouping-label",
        "model=shapes",
    )
    assert result.returncode == 1, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    metrics = _metrics(pushgateway)
    group = {"job": "nightly-monitor", "model": "shapes", "instance": ""}

    def value(name: str, **labels: str) -> float:
        return metrics[(name, frozenset({**group, **labels}.items()))]

    assert value("explain_monitor_drift") == 1
    score = report["scalars"]["overall"]["score"]
    assert value("explain_monitor_population_stability_index", signal="score", segment="all") == pytest.approx(
        score["psi"]
    )
    assert value("explain_monitor_ks_statistic", signal="score", segment="all") == pytest.approx(score["ks_statistic"])
    assert value("explain_monitor_ks_p_value", signal="score", segment="all") == pytest.approx(score["ks_pvalue"])
    assert value("explain_monitor_signal_drift", signal="score", segment="a") == 1
    assert value("explain_monitor_signal_drift", signal="interaction_share", segment="all") == 0
    assert value("explain_monitor_word_ranking_ndcg_ratio") == pytest.approx(report["ranking"]["ndcg"])
    for sample in ("baseline", "current"):
        assert value("explain_monitor_ungrounded_word_ratio", sample=sample) == pytest.approx(
            report["ungrounded"][sample]["share"]
        )
        assert value("explain_monitor_weakly_grounded_word_ratio", sample=sample) == pytest.approx(
            report["coverage"][sample]["share"]
        )
        assert value("explain_monitor_records", sample=sample) == 300
    assert value("explain_monitor_weakly_grounded_word_p_value") == pytest.approx(report["coverage"]["pvalue"])
    assert abs(value("explain_monitor_last_run_timestamp_seconds") - time.time()) < 600


def test_an_unreachable_pushgateway_exits_2(tmp_path):
    pq.write_table(synthetic_table(100, 0), tmp_path / "t.parquet")
    result = _compare(tmp_path / "t.parquet", tmp_path / "t.parquet", "--pushgateway", f"http://{HOST}:{free_port()}")
    assert result.returncode == 2
    assert result.stderr.startswith("explain-monitor compare: --pushgateway http://")
    assert "Connection refused" in result.stderr


@pytest.fixture(scope="module")
def shapes_server(tmp_path_factory):
    """``explain-server`` as a user starts it: no flags, the shipped shapes model."""
    proc = ServerProcess([], tmp_path_factory.mktemp("logs") / "server.log").wait_serving()
    yield proc
    proc.stop()


def test_the_report_overlays_the_most_changed_records(shapes_server, tmp_path):
    with ExplainClient(shapes_server.target, timeout=120) as client:
        baseline = explained_table(client, tmp_path / "baseline", 1, 40)
        current = explained_table(client, tmp_path / "current", 2, 40, wrong_colour=0.5)
    pq.write_table(baseline, tmp_path / "baseline" / "summaries.parquet")
    pq.write_table(current, tmp_path / "current" / "summaries.parquet")
    # images resolve next to CURRENT by default; one record points at a missing image
    (tmp_path / "current" / current.column("image")[0].as_py()).unlink()
    result = _compare(
        tmp_path / "baseline" / "summaries.parquet",
        tmp_path / "current" / "summaries.parquet",
        "--target",
        shapes_server.target,
        "--min-word-count",
        "2",
        "--changed-records",
        "40",
        "--html",
        tmp_path / "r.html",
        "--json",
        tmp_path / "r.json",
    )
    assert result.returncode in (0, 1), result.stderr
    html = (tmp_path / "r.html").read_text()
    report = json.loads((tmp_path / "r.json").read_text())
    shown = len(report["changed_records"])
    assert shown > 10
    overlays = html.count('<img alt="heatmap of')
    missing = 0 in {r["row"] for r in report["changed_records"]}
    assert overlays == shown - (1 if missing else 0)
    if missing:
        assert "no overlay: FileNotFoundError" in html and "no overlay of record 2-0" in result.stderr
    assert "Overlays need --target" not in html
