"""The console commands in process: parsing, exit codes, versions and warnings (no server)."""

from __future__ import annotations

import pathlib

from explain_client import errors
from explain_client.evaluation import runner
from explain_client.evaluation.dataset import load_dataset

ROOT = pathlib.Path(__file__).resolve().parent.parent
HELDOUT = ROOT / "benchmarks" / "data" / "shapes-heldout" / "dataset.json"


class DownClient:
    """An ExplainClient stand-in whose every call fails as an unreachable server's would."""

    def explain(self, *args, **kwargs):
        raise errors.UnavailableError("connection refused")


def test_evaluate_runs_without_tqdm(monkeypatch, capsys):
    monkeypatch.setattr(runner, "tqdm", None)  # the thin client, without the eval extra
    results = runner.evaluate(DownClient(), load_dataset(HELDOUT), limit=3, progress=True)
    assert [result.error for result in results] == ["UnavailableError: UNAVAILABLE: connection refused"] * 3
    assert capsys.readouterr().err == ""
