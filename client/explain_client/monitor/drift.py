"""Drift statistics of the scalar signals: population stability index and two-sample KS, overall
and per segment, judged by :class:`thresholds.Thresholds`."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pyarrow as pa
from scipy import stats

from explain_client.monitor.schema import SCALARS
from explain_client.monitor.thresholds import Thresholds

__all__ = ["PSI_EPSILON", "psi", "psi_bin_edges", "psi_null_critical", "scalar_drift"]

PSI_EPSILON = 1e-4
"""The share an empty bin counts as in :func:`psi` (``ln(0)`` is undefined)."""

SCALAR_UNITS = {
    "score": "cosine similarity",
    "interaction_share": "interactions / (score - delta)",
    "positive_interaction": "cosine units",
    "negative_interaction": "cosine units",
    "mean_concentration": "share of |mass| in top 10% cells",
    "convergence_delta_abs": "cosine units",
}
"""The x-axis label of each scalar signal (explain.proto defines each)."""


MIN_RECORDS_PER_BIN = 10
"""Average records per PSI bin below which :func:`psi_bin_edges` uses fewer bins: with fewer, an
empty bin (worth ``share x ln(share / PSI_EPSILON)``) becomes likely by chance."""


def psi_bin_edges(baseline: np.ndarray, bins: int) -> np.ndarray:
    """Interior bin edges on the baseline's quantiles: ``quantile(baseline, k / bins)`` for
    k = 1..bins-1, duplicates dropped (ties); the outer bins are open, so every value has a bin.

    Args:
        baseline: finite values, at least one.
        bins: the number of bins wanted, >= 2.

    Returns:
        Ascending unique edges; value v falls in bin ``searchsorted(edges, v, side="right")``.
    """
    return np.unique(np.quantile(baseline, np.arange(1, bins) / bins))


def psi(baseline: np.ndarray, current: np.ndarray, *, bins: int = 10) -> tuple[float, int]:
    """Population stability index of ``current`` against ``baseline``.

    ``PSI = sum_i (q_i - p_i) * ln(q_i / p_i)`` over the bins of :func:`psi_bin_edges`, with p_i and
    q_i the baseline's and current's shares of records in bin i, an empty bin's share counted as
    :data:`PSI_EPSILON`. It is the symmetric (Jeffreys) KL divergence of the binned distributions:
    0 for equal shares, growing with a shift.

    Args:
        baseline, current: finite values, at least one each.
        bins: bins wanted (fewer when the baseline quantiles tie).

    Returns:
        (psi, the number of bins used).
    """
    edges = psi_bin_edges(baseline, bins)
    n_bins = len(edges) + 1
    p = np.bincount(np.searchsorted(edges, baseline, side="right"), minlength=n_bins) / len(baseline)
    q = np.bincount(np.searchsorted(edges, current, side="right"), minlength=n_bins) / len(current)
    p = np.maximum(p, PSI_EPSILON)
    q = np.maximum(q, PSI_EPSILON)
    return float(np.sum((q - p) * np.log(q / p))), n_bins


_PSI_NULL_SEED = 23
"""Seed of :func:`psi_null_critical`'s draws: one comparison always gets the same critical values."""

_PSI_NULL_CHUNK = 50_000
"""Null PSIs drawn per vectorised batch (bounds the memory: a few arrays of ``chunk x bins``)."""

_PSI_NULL_TAIL_DRAWS = 100
"""Draws wanted at or beyond the critical value, so that its estimate rests on enough of the tail..."""

_PSI_NULL_DRAWS = (100_000, 1_000_000)
"""...within these bounds on the number of draws (time: ~2 s per million at 10 bins)."""


@functools.lru_cache(maxsize=256)
def psi_null_critical(n_baseline: int, n_current: int, n_bins: int, level: float) -> float:
    """The PSI that two samples of one continuous distribution reach with probability <= ~``level``.

    :func:`psi` bins on the baseline's quantiles, so for continuous data its null distribution
    depends only on the sample sizes and the bins, not on the distribution: this draws it by seeded
    Monte Carlo (uniform samples, binned as :func:`psi` bins them, empty bins counted as
    :data:`PSI_EPSILON`) and returns the smallest drawn PSI that at most a ``level`` share of the
    draws reach (the ``1 - level`` quantile, moved above a tie so that ``PSI >= critical`` keeps
    the level). The chi-squared approximation (``PSI * n m / (n + m) ~ chi2(n_bins - 1)``) is far
    too low in the tail at the sizes a comparison meets (tens to hundreds of records, ~10 per
    bin): a critical value meant for 0.042% was exceeded 0.7% of the time at 100 records.

    ``max(_PSI_NULL_DRAWS[0], _PSI_NULL_TAIL_DRAWS / level)`` draws, at most ``_PSI_NULL_DRAWS[1]``
    (below ``level`` = 1e-4 the estimate rests on fewer tail draws). Deterministic (fixed seed)
    and cached: a comparison asks for the same sizes many times.

    Args:
        n_baseline, n_current: the sample sizes, >= 1 each.
        n_bins: the bins :func:`psi` used (``psi(...)[1]``), >= 2.
        level: the false-alarm probability wanted, in (0, 1).
    """
    draws = int(min(max(_PSI_NULL_DRAWS[0], np.ceil(_PSI_NULL_TAIL_DRAWS / level)), _PSI_NULL_DRAWS[1]))
    values = np.sort(_psi_null_draws(n_baseline, n_current, n_bins, draws))
    allowed = int(level * draws)  # draws that may reach the critical value
    first = draws - allowed
    if first < draws and values[first - 1] == values[first]:
        # draws tied with values[first] would reach it too: start above the tie
        first = int(np.searchsorted(values, values[first], side="right"))
    return float(values[first] if first < draws else np.nextafter(values[-1], np.inf))


def _psi_null_draws(n_baseline: int, n_current: int, n_bins: int, draws: int) -> np.ndarray:
    """``draws`` PSIs of two i.i.d. uniform samples of the given sizes, as :func:`psi` computes them.

    Exact in distribution, at a cost that does not grow with the sample sizes: the baseline's bin
    counts depend only on ranks (so :func:`psi_bin_edges` on the ranks gives them); each edge is a
    linear interpolation of two uniform order statistics, drawn jointly as normalised partial sums
    of exponential spacings (Gamma increments); and the current's counts are multinomial in the
    bins' widths.
    """
    ranks = np.arange(n_baseline, dtype=np.float64)
    rank_edges = psi_bin_edges(ranks, n_bins)
    bins = len(rank_edges) + 1
    p = np.bincount(np.searchsorted(rank_edges, ranks, side="right"), minlength=bins) / n_baseline
    p = np.maximum(p, PSI_EPSILON)
    # rank_edges[k] = lo + frac: the edge lies between the order statistics lo and lo + 1 (0-based)
    lo = np.floor(rank_edges).astype(np.int64)
    frac = rank_edges - lo
    hi = np.minimum(lo + 1, n_baseline - 1)
    needed = np.unique(np.concatenate([lo, hi]))  # 0-based ranks whose values are drawn
    spacing = np.diff(np.concatenate([[0], needed + 1, [n_baseline + 1]]))
    rng = np.random.default_rng(_PSI_NULL_SEED)
    out = np.empty(draws)
    for start in range(0, draws, _PSI_NULL_CHUNK):
        rows = min(_PSI_NULL_CHUNK, draws - start)
        sums = np.cumsum(rng.standard_gamma(spacing, size=(rows, len(spacing))), axis=1)
        order = sums[:, :-1] / sums[:, -1:]  # the uniform order statistics at ``needed``
        below, above = order[:, np.searchsorted(needed, lo)], order[:, np.searchsorted(needed, hi)]
        edges = below + (above - below) * frac
        widths = np.diff(edges, prepend=0.0, append=1.0, axis=1)
        q = np.maximum(rng.multinomial(n_current, widths) / n_current, PSI_EPSILON)
        out[start : start + rows] = np.sum((q - p) * np.log(q / p), axis=1)
    return out


def _values(table: pa.Table, signal: str, mask: np.ndarray | None) -> tuple[np.ndarray, int]:
    """The finite values of ``signal`` (in the rows of ``mask``) and how many were NaN or null."""
    values = table.column(signal).to_numpy(zero_copy_only=False).astype(np.float64)
    if mask is not None:
        values = values[mask]
    finite = values[np.isfinite(values)]
    return finite, len(values) - len(finite)


def _segments(table: pa.Table) -> np.ndarray:
    return np.asarray(table.column("segment").to_pylist(), dtype=object)


def _test(baseline: np.ndarray, current: np.ndarray, thresholds: Thresholds) -> dict[str, Any]:
    bins = max(2, min(thresholds.psi_bins, min(len(baseline), len(current)) // MIN_RECORDS_PER_BIN))
    value, n_bins = psi(baseline, current, bins=bins)
    ks = stats.ks_2samp(baseline, current)
    return {
        "status": "tested",
        "psi": value,
        "psi_bins": n_bins,
        "ks_statistic": float(ks.statistic),
        "ks_pvalue": float(ks.pvalue),
        "baseline_mean": float(np.mean(baseline)),
        "current_mean": float(np.mean(current)),
        "baseline_median": float(np.median(baseline)),
        "current_median": float(np.median(current)),
    }


def scalar_drift(baseline: pa.Table, current: pa.Table, thresholds: Thresholds) -> dict[str, Any]:
    """PSI and KS of every :data:`schema.SCALARS` signal, overall and per segment.

    NaN and null values are left out (and counted). A group (overall, or one segment) is tested
    when both tables have at least ``thresholds.min_segment_records`` values of the signal in it,
    else reported with ``status: "too_small"``. Records without a segment count only overall;
    per-segment results exist when either table has segments.

    Returns:
        ``{"overall": {signal: result}, "segments": {segment: {signal: result}}, "tests": m,
        "ks_level": alpha / m}``, where a tested result has ``psi, psi_bins, psi_critical,
        ks_statistic, ks_pvalue, baseline_n, current_n, baseline_nan, current_nan, *_mean,
        *_median, drift, reasons`` and an untested one ``status, baseline_n, current_n, drift:
        false``.
    """
    groups: dict[str | None, tuple[np.ndarray | None, np.ndarray | None]] = {None: (None, None)}
    base_seg, cur_seg = _segments(baseline), _segments(current)
    names = sorted({s for s in base_seg if s is not None} | {s for s in cur_seg if s is not None})
    for name in names:
        groups[name] = (base_seg == name, cur_seg == name)

    results: dict[str | None, dict[str, dict[str, Any]]] = {}
    for group, (base_mask, cur_mask) in groups.items():
        results[group] = {}
        for signal in SCALARS:
            b, b_nan = _values(baseline, signal, base_mask)
            c, c_nan = _values(current, signal, cur_mask)
            counts = {"baseline_n": len(b), "current_n": len(c), "baseline_nan": b_nan, "current_nan": c_nan}
            if min(len(b), len(c)) < max(1, thresholds.min_segment_records):
                results[group][signal] = {"status": "too_small", **counts, "drift": False, "reasons": []}
            else:
                results[group][signal] = {**_test(b, c, thresholds), **counts}

    tested = [r for by_signal in results.values() for r in by_signal.values() if r["status"] == "tested"]
    level = thresholds.alpha / max(1, len(tested))
    for result in tested:
        critical = psi_null_critical(result["baseline_n"], result["current_n"], result["psi_bins"], level)
        result["psi_critical"] = max(thresholds.psi, critical)
        reasons = []
        if result["psi"] >= result["psi_critical"]:
            reasons.append(f"PSI {result['psi']:.3f} >= {result['psi_critical']:.3f}")
        if result["ks_statistic"] >= thresholds.ks_min_statistic and result["ks_pvalue"] < level:
            reasons.append(f"KS D={result['ks_statistic']:.3f} (p={result['ks_pvalue']:.2g} < {level:.2g})")
        result["drift"] = bool(reasons)
        result["reasons"] = reasons
    return {
        "overall": results.pop(None),
        "segments": results,
        "tests": len(tested),
        "ks_level": level,
    }
