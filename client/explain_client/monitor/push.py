"""Pushing the drift statistics of one comparison to a Prometheus Pushgateway, as gauges in a
fresh registry (``prometheus_client.push_to_gateway``), for a batch job's alerting."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

__all__ = ["MAX_SEGMENT_LABELS", "build_registry", "push"]

MAX_SEGMENT_LABELS = 20
"""Per-segment series are pushed only when the comparison tested at most this many segments, to
keep the ``segment`` label bounded; otherwise only ``segment="all"``."""


def build_registry(comparison: Mapping[str, Any], *, max_segments: int = MAX_SEGMENT_LABELS) -> CollectorRegistry:
    """The gauges of ``comparison`` (:func:`comparison.compare_tables`'s dict) in a new registry.

    Gauges (labels ``signal`` in schema.SCALARS, ``segment`` = "all" or a tested segment,
    ``sample`` in baseline/current):

    - ``explain_monitor_population_stability_index{signal,segment}``
    - ``explain_monitor_ks_statistic{signal,segment}``, ``explain_monitor_ks_p_value{signal,segment}``
    - ``explain_monitor_signal_drift{signal,segment}``: 1 when the signal crossed a threshold
    - ``explain_monitor_word_ranking_ndcg_ratio``
    - ``explain_monitor_ungrounded_word_ratio{sample}``, ``explain_monitor_ungrounded_word_p_value``
    - ``explain_monitor_weakly_grounded_word_ratio{sample}``,
      ``explain_monitor_weakly_grounded_word_p_value`` (coverage)
    - ``explain_monitor_records{sample}``
    - ``explain_monitor_drift``: 1 when any threshold was crossed (the exit code's verdict)
    - ``explain_monitor_last_run_timestamp_seconds``: when the comparison was pushed

    Untested groups (too few records) have no series.
    """
    registry = CollectorRegistry()
    labels = ("signal", "segment")
    psi = Gauge(
        "explain_monitor_population_stability_index",
        "PSI of the signal, current vs baseline",
        labels,
        registry=registry,
    )
    ks = Gauge("explain_monitor_ks_statistic", "Two-sample KS statistic D of the signal", labels, registry=registry)
    ks_p = Gauge("explain_monitor_ks_p_value", "Two-sample KS p-value of the signal", labels, registry=registry)
    signal_drift = Gauge(
        "explain_monitor_signal_drift", "1 when the signal crossed its PSI or KS threshold", labels, registry=registry
    )
    groups = [("all", comparison["scalars"]["overall"])]
    segments = comparison["scalars"]["segments"]
    if len(segments) <= max_segments:
        groups += list(segments.items())
    for segment, by_signal in groups:
        for signal, result in by_signal.items():
            if result["status"] != "tested":
                continue
            psi.labels(signal, segment).set(result["psi"])
            ks.labels(signal, segment).set(result["ks_statistic"])
            ks_p.labels(signal, segment).set(result["ks_pvalue"])
            signal_drift.labels(signal, segment).set(int(result["drift"]))

    Gauge(
        "explain_monitor_word_ranking_ndcg_ratio",
        "nDCG of the global word-relevance ranking vs baseline",
        registry=registry,
    ).set(comparison["ranking"]["ndcg"])
    records = Gauge("explain_monitor_records", "Records in the summary table", ["sample"], registry=registry)
    for sample in ("baseline", "current"):
        records.labels(sample).set(comparison[sample]["records"])
    for key, name, what in (
        ("ungrounded", "ungrounded", "ungrounded"),
        ("coverage", "weakly_grounded", "weakly grounded (coverage)"),
    ):
        share = Gauge(
            f"explain_monitor_{name}_word_ratio",
            f"Share of object-word occurrences that are {what}",
            ["sample"],
            registry=registry,
        )
        for sample in ("baseline", "current"):
            share.labels(sample).set(comparison[key][sample]["share"])
        Gauge(
            f"explain_monitor_{name}_word_p_value",
            f"One-sided Mann-Whitney U p-value of the records behind the {what} share's increase",
            registry=registry,
        ).set(comparison[key]["pvalue"])
    Gauge("explain_monitor_drift", "1 when any drift threshold was crossed", registry=registry).set(
        int(comparison["drift"])
    )
    Gauge(
        "explain_monitor_last_run_timestamp_seconds",
        "When explain-monitor compare pushed these gauges",
        registry=registry,
    ).set_to_current_time()
    return registry


def push(
    comparison: Mapping[str, Any],
    gateway: str,
    *,
    job: str,
    grouping_key: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> None:
    """Push :func:`build_registry`'s gauges to ``gateway`` (``push_to_gateway``: PUT, replacing the
    group's previous metrics).

    Raises:
        OSError: the gateway cannot be reached or refused the push (urllib's errors).
    """
    push_to_gateway(
        gateway, job=job, registry=build_registry(comparison), grouping_key=dict(grouping_key or {}), timeout=timeout
    )
