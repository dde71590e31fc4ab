"""The HTML report's figures, drawn with matplotlib's object API on the Agg canvas (no pyplot
state) and returned as ``data:image/png;base64`` URIs to embed in the one-file report."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from explain_client.monitor.drift import SCALAR_UNITS

__all__ = ["movers_chart", "scalar_panels", "share_chart"]

BASELINE_COLOUR = "#4c72b0"
CURRENT_COLOUR = "#dd8452"
DRIFT_COLOUR = "#c0392b"


def _data_uri(figure: Figure) -> str:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def scalar_panels(
    baseline: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray], results: Mapping[str, Mapping[str, Any]]
) -> str:
    """One panel per scalar signal: the baseline's and current's histograms overlaid (share of
    records per bin, shared bins), PSI and KS in the panel title, red when the signal drifted.

    Args:
        baseline, current: signal -> its finite values.
        results: signal -> its overall result from :func:`drift.scalar_drift`.
    """
    signals = list(results)
    columns = 2
    rows = (len(signals) + columns - 1) // columns
    figure = Figure(figsize=(12, 3.4 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, signal in zip(axes, signals):
        b, c, result = baseline[signal], current[signal], results[signal]
        both = np.concatenate([b, c])
        clipped = False
        if both.size:
            # a few outliers would squeeze the bulk into one bin: values beyond Tukey's far fences
            # (3 IQR past the quartiles) go into the edge bins instead, at any sample size
            q1, q3 = (float(v) for v in np.percentile(both, [25, 75]))
            lo, hi = max(float(np.min(both)), q1 - 3 * (q3 - q1)), min(float(np.max(both)), q3 + 3 * (q3 - q1))
            if hi <= lo:  # half the values or more tie: the fences collapse
                lo, hi = float(np.min(both)), float(np.max(both))
            clipped = bool(np.min(both) < lo or np.max(both) > hi)
            edges = np.linspace(lo, hi if hi > lo else lo + 1e-9, 31)
            for values, label, colour in ((b, "baseline", BASELINE_COLOUR), (c, "current", CURRENT_COLOUR)):
                if values.size:
                    values = np.clip(values, edges[0], edges[-1])
                    weights = np.full(values.size, 1.0 / values.size)
                    ax.hist(values, bins=edges, weights=weights, histtype="stepfilled", alpha=0.35, color=colour)
                    ax.hist(
                        values,
                        bins=edges,
                        weights=weights,
                        histtype="step",
                        linewidth=1.8,
                        color=colour,
                        label=f"{label} (n={values.size})",
                    )
        if result["status"] == "tested":
            title = (
                f"{signal}\nPSI {result['psi']:.3f} (alert at {result['psi_critical']:.2f})   "
                f"KS D={result['ks_statistic']:.3f}, p={result['ks_pvalue']:.2g}"
            )
        else:
            title = f"{signal}\nnot tested: too few records"
        ax.set_title(title, fontsize=11, color=DRIFT_COLOUR if result["drift"] else "black")
        note = "; outliers in the edge bins" if clipped else ""
        ax.set_xlabel(f"{signal} ({SCALAR_UNITS[signal]}{note})")
        ax.set_ylabel("share of records per bin")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    for ax in axes[len(signals) :]:
        ax.set_visible(False)
    return _data_uri(figure)


def movers_chart(movers: Sequence[Mapping[str, Any]]) -> str:
    """Horizontal bars: each top mover's baseline and current mean relevance, largest move on top."""
    words = [m["word"] for m in movers][::-1]
    base = [m["baseline_mean"] for m in movers][::-1]
    cur = [m["current_mean"] for m in movers][::-1]
    figure = Figure(figsize=(10, 1.2 + 0.55 * max(1, len(words))), layout="constrained")
    ax = figure.subplots()
    y = np.arange(len(words))
    ax.barh(y + 0.2, base, height=0.4, color=BASELINE_COLOUR, label="baseline mean")
    ax.barh(y - 0.2, cur, height=0.4, color=CURRENT_COLOUR, label="current mean")
    ax.set_yticks(y, [f"{w}  (n={m['baseline_count']}/{m['current_count']})" for w, m in zip(words, movers[::-1])])
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("mean word relevance (cosine units; sum of the word's interactions over the grid)")
    ax.set_title("Words whose mean relevance moved most (n = baseline/current occurrences)", fontsize=12)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    return _data_uri(figure)


def share_chart(coverage: Mapping[str, Any], *, title: str, xlabel: str, top: int = 12) -> str:
    """Bars of a flagged object-word share (``words.ungrounded`` or ``words.coverage``): overall,
    then per word (largest increase first)."""
    b, c = coverage["baseline"], coverage["current"]
    labels = [f"all object words (n={b['object_words']}/{c['object_words']})"] + [
        f"{w['word']} (n={w['baseline_n']}/{w['current_n']})" for w in coverage["words"][:top]
    ]
    base = [coverage["baseline"]["share"]] + [w["baseline_share"] for w in coverage["words"][:top]]
    cur = [coverage["current"]["share"]] + [w["current_share"] for w in coverage["words"][:top]]
    figure = Figure(figsize=(10, 1.2 + 0.5 * len(labels)), layout="constrained")
    ax = figure.subplots()
    y = np.arange(len(labels))[::-1]
    for offset, shares, colour, label in (
        (0.2, base, BASELINE_COLOUR, "baseline"),
        (-0.2, cur, CURRENT_COLOUR, "current"),
    ):
        bars = ax.barh(y + offset, shares, height=0.4, color=colour, label=label)
        ax.bar_label(bars, fmt="%.3f", padding=3, fontsize=8)
    ax.set_yticks(y, labels)
    ax.set_xlim(0, max(0.05, *base, *cur) * 1.2)
    ax.set_xlabel(xlabel)
    ax.set_title(
        f"{title} (n = baseline/current occurrences)",
        fontsize=12,
        color=DRIFT_COLOUR if coverage["drift"] else "black",
    )
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    return _data_uri(figure)
