"""One comparison of two summary tables: every statistic, its threshold and the verdict, as the
JSON-ready dict that ``explain-monitor compare`` writes with ``--json`` and renders with ``--html``."""

from __future__ import annotations

import datetime
import os
from typing import Any

import pyarrow as pa

from explain_client.monitor.drift import scalar_drift
from explain_client.monitor.tables import word_occurrences
from explain_client.monitor.thresholds import Thresholds
from explain_client.monitor.words import (
    changed_records,
    coverage,
    top_movers,
    ungrounded,
    word_ranking,
    word_stats,
)

__all__ = ["REPORT_VERSION", "compare_tables"]

REPORT_VERSION = 1
"""The layout version of the comparison dict (``"version"``); bumped when a key changes meaning."""


def compare_tables(
    baseline: pa.Table,
    current: pa.Table,
    thresholds: Thresholds,
    *,
    object_words: frozenset[str] | None = None,
    baseline_path: str | os.PathLike = "",
    current_path: str | os.PathLike = "",
    movers: int = 10,
    records: int = 6,
) -> dict[str, Any]:
    """Compare two summary tables (as :func:`tables.read_summaries` returns them).

    Returns:
        A dict of plain JSON types::

            {"version": 1, "created": ISO time, "drift": bool, "alerts": [str, ...],
             "warnings": [str, ...],                    # e.g. tables of different models
             "baseline": {"path", "records", "models"}, "current": {...},
             "thresholds": Thresholds.as_dict(),
             "scalars": drift.scalar_drift(...),        # overall and per segment, PSI + KS
             "ranking": words.word_ranking(...),        # nDCG
             "ungrounded": words.ungrounded(...),       # absolute grounding rules
             "coverage": words.coverage(...),           # grounding against the baseline's
             "top_movers": words.top_movers(...),
             "changed_records": words.changed_records(...)}

        ``drift`` is true when any statistic crossed its threshold; ``alerts`` says which, one
        line each (a scalar's line names its signal and segment).
    """
    base_models, cur_models = _models(baseline), _models(current)
    warnings = []
    if base_models != cur_models:
        warnings.append(
            f"the tables come from different models (baseline {', '.join(base_models) or 'unnamed'}, current "
            f"{', '.join(cur_models) or 'unnamed'}): drift then says the models differ, not that the traffic moved"
        )
    base_words, cur_words = word_occurrences(baseline), word_occurrences(current)
    base_stats, cur_stats = word_stats(base_words), word_stats(cur_words)
    scalars = scalar_drift(baseline, current, thresholds)
    ranking = word_ranking(base_stats, cur_stats, thresholds)
    grounding = ungrounded(base_words, cur_words, thresholds, object_words)
    weak = coverage(base_words, cur_words, thresholds, object_words)

    alerts = []
    groups = [("overall", scalars["overall"])] + [(f"segment {s!r}", r) for s, r in scalars["segments"].items()]
    for where, by_signal in groups:
        for signal, result in by_signal.items():
            alerts += [f"{signal} ({where}): {reason}" for reason in result["reasons"]]
    if ranking["drift"]:
        alerts.append(f"word ranking: nDCG {ranking['ndcg']:.3f} < {thresholds.ndcg}")
    alerts += grounding["reasons"] + weak["reasons"]
    return {
        "version": REPORT_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "drift": bool(alerts),
        "alerts": alerts,
        "warnings": warnings,
        "baseline": {"path": os.fspath(baseline_path), "records": baseline.num_rows, "models": base_models},
        "current": {"path": os.fspath(current_path), "records": current.num_rows, "models": cur_models},
        "thresholds": thresholds.as_dict(),
        "scalars": scalars,
        "ranking": ranking,
        "ungrounded": grounding,
        "coverage": weak,
        "top_movers": top_movers(base_stats, cur_stats, thresholds, object_words, top=movers),
        "changed_records": changed_records(current, cur_words, base_stats, thresholds, object_words, top=records),
    }


def _models(table: pa.Table) -> list[str]:
    """The distinct names in ``table``'s ``model`` column (none when it has no such column)."""
    if "model" not in table.column_names:
        return []
    return sorted({name for name in table.column("model").to_pylist() if name})
