"""Aggregating grounding results: overall and per-class figures, as JSON and as a Markdown table."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

from explain_client.evaluation.runner import PairResult, PhraseResult

__all__ = ["markdown_table", "summarise"]


def _figures(phrases: Sequence[PhraseResult]) -> dict:
    boxes = [hit for p in phrases for hit in p.score.box_hits]
    return {
        "phrases": len(phrases),
        "pointing_accuracy": sum(p.score.pointing_hit for p in phrases) / len(phrases) if phrases else math.nan,
        "relevance_mass": sum(p.score.relevance_mass for p in phrases) / len(phrases) if phrases else math.nan,
        "boxes": len(boxes),
        "box_to_text_accuracy": sum(boxes) / len(boxes) if boxes else math.nan,
    }


def summarise(results: Iterable[PairResult]) -> dict:
    """The report: overall and per-class figures, plus every pair's details.

    Figures (each a mean, NaN when there is nothing to average): ``pointing_accuracy`` over
    phrases, ``relevance_mass`` over phrases, ``box_to_text_accuracy`` over boxes.

    Returns:
        A JSON-serialisable dict with ``pairs`` (scored), ``skipped`` (with reasons),
        ``mean_abs_convergence_delta`` (over scored pairs, cosine units), ``overall``,
        ``per_class`` (sorted by class) and ``details`` (one entry per pair).
    """
    results = list(results)
    scored = [r for r in results if r.error is None]
    by_class: dict[str, list[PhraseResult]] = defaultdict(list)
    for result in scored:
        for phrase in result.phrases:
            by_class[phrase.label].append(phrase)
    return {
        "pairs": len(scored),
        "skipped": [
            {"index": r.index, "image_id": r.image_id, "reason": r.error} for r in results if r.error is not None
        ],
        "mean_abs_convergence_delta": (
            sum(abs(r.convergence_delta) for r in scored) / len(scored) if scored else math.nan
        ),
        "overall": _figures([p for r in scored for p in r.phrases]),
        "per_class": {label: _figures(by_class[label]) for label in sorted(by_class)},
        "details": [
            {
                "index": r.index,
                "image_id": r.image_id,
                "caption": r.caption,
                "similarity": r.similarity,
                "convergence_delta": r.convergence_delta,
                "phrases": [
                    {
                        "text": p.text,
                        "class": p.label,
                        "rows": list(p.score.rows),
                        "peak": list(p.score.peak),
                        "pointing_hit": p.score.pointing_hit,
                        "relevance_mass": p.score.relevance_mass,
                        "box_hits": list(p.score.box_hits),
                    }
                    for p in r.phrases
                ],
            }
            for r in scored
        ],
    }


def _percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.1f}%"


def markdown_table(report: dict) -> str:
    """The report's overall and per-class figures as a Markdown table (percentages)."""
    lines = [
        "| class | phrases | pointing game | relevance mass | boxes | box to text |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    rows = [("**all**", report["overall"])] + list(report["per_class"].items())
    for label, f in rows:
        lines.append(
            f"| {label} | {f['phrases']} | {_percent(f['pointing_accuracy'])} | {_percent(f['relevance_mass'])} "
            f"| {f['boxes']} | {_percent(f['box_to_text_accuracy'])} |"
        )
    return "\n".join(lines)
