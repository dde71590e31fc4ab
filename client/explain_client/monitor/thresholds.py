"""What counts as drift in ``explain-monitor compare``: one threshold per statistic.

Defaults are chosen so that two samples of a few hundred records from the same generator do not
alert: each alert needs both a practical effect (PSI, KS statistic, nDCG, share increase) and
statistical significance at a family-wise level (Bonferroni over the tests one comparison makes).
This module needs nothing beyond the standard library, so ``explain-monitor --help`` runs on the
thin client without the monitor extra.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Thresholds"]


@dataclass(frozen=True)
class Thresholds:
    """What counts as drift. Every field has an ``explain-monitor compare`` flag of the same name.

    Attributes:
        psi: a scalar drifts when its PSI is at least this (0.25: the usual "significant shift")
            and at least ``drift.psi_null_critical`` (so small samples' noise does not alert).
        ks_min_statistic: a scalar drifts when its KS statistic is at least this...
        alpha: ...and its KS p-value below ``alpha / (number of KS tests in the comparison)``; the
            same family-wise level sets PSI's null critical value and the word-share tests.
        psi_bins: at most this many PSI bins (fewer for small samples: at least
            ``drift.MIN_RECORDS_PER_BIN`` baseline and current records per bin on average).
        min_segment_records: segments with fewer records (non-NaN values of the signal) than this
            in either table are reported as too small, not tested.
        ndcg: the word ranking drifts when its nDCG is below this (Clarify's 0.9).
        min_word_count: words seen fewer times in a table count as absent from it (ranking, top
            movers, changed records).
        ungrounded_relevance: an object word is ungrounded when its relevance is below this...
        ungrounded_concentration: ...or its grounding concentration below this (0.1 = uniform).
        ungrounded_min_increase: the ungrounded share drifts when current - baseline is at least
            this and a one-sided Mann-Whitney U test of the records' ungrounded fractions gives p
            below ``alpha`` (records, not words, are the independent units).
        coverage_quantile: an object word is weakly grounded when its grounding concentration is
            below this quantile of the baseline's object-word concentrations (so about this share
            of the baseline's object words are weakly grounded)...
        coverage_min_increase: ...and the weakly grounded share (coverage) drifts when current -
            baseline is at least this and a one-sided Mann-Whitney U test finds the records' mean
            object-word concentrations lower, p below ``alpha``.
    """

    psi: float = 0.25
    ks_min_statistic: float = 0.1
    alpha: float = 0.01
    psi_bins: int = 10
    min_segment_records: int = 30
    ndcg: float = 0.9
    min_word_count: int = 5
    ungrounded_relevance: float = 0.0
    ungrounded_concentration: float = 0.2
    ungrounded_min_increase: float = 0.05
    coverage_quantile: float = 0.2
    coverage_min_increase: float = 0.03

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
