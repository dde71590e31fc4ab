"""Word-level drift: the global word-relevance ranking (nDCG), ungrounded and weakly grounded
(coverage) object words, the words whose relevance moved most, and the records of CURRENT that
deviate most from the baseline."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy import stats

from explain_client.monitor.schema import word_key
from explain_client.monitor.tables import WordOccurrences
from explain_client.monitor.thresholds import Thresholds

__all__ = [
    "STOP_WORDS",
    "WordStats",
    "changed_records",
    "coverage",
    "ndcg",
    "read_object_words",
    "top_movers",
    "ungrounded",
    "word_ranking",
    "word_stats",
]

STOP_WORDS = frozenset(
    "a an the and or but of on in at to with without next beside near by for from as is are be this that these "
    "those there here it its shows showing picture image photo drawing of".split()
)
"""Word keys that are never object words: articles, conjunctions, prepositions and caption framing
("a picture of", "there is", "this shows"). Every other word key is an object word unless
``--object-words`` gives the list."""


@dataclass(frozen=True)
class WordStats:
    """Per word key, over one table's occurrences with a finite relevance: count, mean relevance,
    its standard deviation (ddof=1; 0 for one occurrence), and mean |relevance| (Clarify's
    ``mean_abs`` global attribution)."""

    count: dict[str, int]
    mean: dict[str, float]
    std: dict[str, float]
    mean_abs: dict[str, float]


def word_stats(words: WordOccurrences) -> WordStats:
    """Per-key statistics of ``words`` (occurrences with NaN relevance or an empty key left out)."""
    keep = np.isfinite(words.relevance) & (words.key != "")
    table = pa.table({"key": words.key[keep].tolist(), "r": words.relevance[keep], "a": np.abs(words.relevance[keep])})
    grouped = table.group_by("key").aggregate(
        [("r", "count"), ("r", "mean"), ("r", "stddev", pc.VarianceOptions(ddof=1)), ("a", "mean")]
    )
    keys = grouped.column("key").to_pylist()

    def column(name: str, fill: float = 0.0) -> dict[str, float]:
        return {k: (fill if v is None else v) for k, v in zip(keys, grouped.column(name).to_pylist())}

    return WordStats(
        count={k: int(v) for k, v in column("r_count").items()},
        mean=column("r_mean"),
        std=column("r_stddev"),
        mean_abs=column("a_mean"),
    )


def ndcg(baseline: dict[str, float], current: dict[str, float]) -> float:
    """Clarify's feature-attribution-drift nDCG of two global attributions over the same keys.

    With the keys sorted by decreasing ``current`` attribution (ties by key), f'_1..f'_n, and
    by decreasing ``baseline`` attribution, f_1..f_n, and a(f) the baseline attribution of f:

        DCG  = sum_i a(f'_i) / log2(i + 1)
        iDCG = sum_i a(f_i)  / log2(i + 1)
        nDCG = DCG / iDCG

    so 1 means current ranks the words as the baseline does, and swapping words of similar
    baseline attribution costs little. Keys missing from ``current`` rank last (attribution 0).

    Args:
        baseline, current: key -> attribution >= 0 (mean |relevance|).

    Returns:
        nDCG in [0, 1]; 1.0 when the baseline has no positive attribution (nothing to rank).
    """
    keys = sorted(baseline)
    relevance = np.array([baseline[k] for k in keys], dtype=np.float64)
    discount = 1.0 / np.log2(np.arange(2, len(keys) + 2))
    ideal = float(np.sum(np.sort(relevance)[::-1] * discount))
    if ideal <= 0.0:
        return 1.0
    order = sorted(range(len(keys)), key=lambda i: (-current.get(keys[i], 0.0), keys[i]))
    return float(np.sum(relevance[order] * discount) / ideal)


def word_ranking(base: WordStats, cur: WordStats, thresholds: Thresholds, *, top: int = 15) -> dict[str, Any]:
    """nDCG of the global word-relevance ranking (:func:`ndcg`) over the words seen at least
    ``thresholds.min_word_count`` times in either table; a word rarer than that in one table
    counts as attribution 0 there (a word that appears or vanishes moves the ranking).

    Returns:
        ``{"ndcg", "threshold", "words", "drift", "baseline_top", "current_top"}``; the top lists
        are ``[key, mean |relevance|]`` pairs, best first.
    """
    minimum = thresholds.min_word_count
    keys = {k for k, n in base.count.items() if n >= minimum} | {k for k, n in cur.count.items() if n >= minimum}

    def attribution(s: WordStats) -> dict[str, float]:
        return {k: (s.mean_abs[k] if s.count.get(k, 0) >= minimum else 0.0) for k in keys}

    a, c = attribution(base), attribution(cur)
    value = ndcg(a, c) if keys else 1.0

    def ranked(attr: dict[str, float]) -> list[list[Any]]:
        return [[k, v] for k, v in sorted(attr.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]

    return {
        "ndcg": value,
        "threshold": thresholds.ndcg,
        "words": len(keys),
        "drift": bool(keys) and value < thresholds.ndcg,
        "baseline_top": ranked(a),
        "current_top": ranked(c),
    }


def read_object_words(path: str | os.PathLike) -> frozenset[str]:
    """The object words of an ``--object-words`` file: one word a line, ``#`` starts a comment.

    Raises:
        OSError: the file cannot be read.
        ValueError: the file names no word.
    """
    with open(path, encoding="utf-8") as handle:
        keys = {word_key(line.split("#", 1)[0].strip()) for line in handle}
    keys.discard("")
    if not keys:
        raise ValueError(f"--object-words file {os.fspath(path)!r} names no word")
    return frozenset(keys)


def _is_object(key: str, object_words: frozenset[str] | None) -> bool:
    if object_words is None:
        return key != "" and key not in STOP_WORDS and not key.isdigit()
    return key in object_words


def _object_mask(words: WordOccurrences, object_words: frozenset[str] | None) -> np.ndarray:
    return np.array([_is_object(k, object_words) for k in words.key], dtype=bool)


def _object_occurrences(words: WordOccurrences, object_words: frozenset[str] | None) -> np.ndarray:
    return _object_mask(words, object_words) & np.isfinite(words.relevance)


def _record_means(records: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The mean of ``values`` per record (records without a finite value left out)."""
    finite = np.isfinite(values)
    ids, index = np.unique(records[finite], return_inverse=True)
    return np.bincount(index, weights=values[finite], minlength=len(ids)) / np.bincount(index, minlength=len(ids))


def _records_test(baseline: np.ndarray, current: np.ndarray, alternative: str) -> float:
    """One-sided Mann-Whitney U p-value of per-record values, current ``alternative`` than
    baseline: records are the independent units (a record's words are not; a test over word
    occurrences would alert too often)."""
    if not (len(baseline) and len(current)):
        return 1.0
    return float(stats.mannwhitneyu(current, baseline, alternative=alternative).pvalue)


def _share_counts(keys: np.ndarray, flags: np.ndarray, what: str) -> dict[str, Any]:
    total, count = len(flags), int(flags.sum())
    per_word: dict[str, list[int]] = {}
    for key, flag in zip(keys, flags):
        entry = per_word.setdefault(key, [0, 0])
        entry[0] += 1
        entry[1] += int(flag)
    return {"object_words": total, what: count, "share": count / total if total else 0.0, "per_word": per_word}


def _share_drift(
    base_keys: np.ndarray,
    base_flags: np.ndarray,
    cur_keys: np.ndarray,
    cur_flags: np.ndarray,
    *,
    pvalue: float,
    what: str,
    label: str,
    min_increase: float,
    thresholds: Thresholds,
) -> dict[str, Any]:
    """Whether the share of flagged object-word occurrences rose from baseline to current by at
    least ``min_increase`` with the records' test ``pvalue < alpha`` (the layout of
    :func:`ungrounded`'s result, the count key named ``what``; ``label`` names the share in the
    alert)."""
    b, c = _share_counts(base_keys, base_flags, what), _share_counts(cur_keys, cur_flags, what)
    increase = c["share"] - b["share"]
    reasons = []
    if increase >= min_increase and pvalue < thresholds.alpha:
        reasons.append(
            f"{label} object-word share {b['share']:.3f} -> {c['share']:.3f} "
            f"(+{increase:.3f} >= {min_increase}, records' p={pvalue:.2g} < {thresholds.alpha})"
        )
    per_word = []
    for key in sorted(set(b["per_word"]) & set(c["per_word"])):
        (bn, bf), (cn, cf) = b["per_word"][key], c["per_word"][key]
        if min(bn, cn) >= thresholds.min_word_count:
            per_word.append(
                {"word": key, "baseline_share": bf / bn, "current_share": cf / cn, "baseline_n": bn, "current_n": cn}
            )
    per_word.sort(key=lambda w: (-(w["current_share"] - w["baseline_share"]), w["word"]))
    for counts in (b, c):
        del counts["per_word"]
    return {
        "baseline": b,
        "current": c,
        "increase": increase,
        "pvalue": pvalue,
        "drift": bool(reasons),
        "reasons": reasons,
        "words": per_word,
    }


def ungrounded(
    base: WordOccurrences, cur: WordOccurrences, thresholds: Thresholds, object_words: frozenset[str] | None = None
) -> dict[str, Any]:
    """The share of object-word occurrences that are ungrounded (captions naming what the image
    does not show), in both tables, and whether it rose.

    An occurrence is ungrounded when its relevance is below ``thresholds.ungrounded_relevance``
    or its grounding concentration is below ``thresholds.ungrounded_concentration`` (or NaN).
    Object words: ``object_words`` when given, else every key outside :data:`STOP_WORDS` that is
    not a number. Drift: ``current_share - baseline_share >= ungrounded_min_increase`` and the
    one-sided Mann-Whitney U test of the records' ungrounded fractions (current greater) gives
    ``p < alpha``.

    Returns:
        ``{"baseline": counts, "current": counts, "increase", "pvalue", "drift", "reasons",
        "words": [{"word", "baseline_share", "current_share", "baseline_n", "current_n"}]}``;
        counts are ``{"object_words", "ungrounded", "share"}``; ``words`` lists the object words
        seen ``min_word_count`` times in both tables, largest share increase first.
    """

    def flags(words: WordOccurrences) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        mask = _object_occurrences(words, object_words)
        # a NaN concentration (no mass at all) is not evidence of grounding
        low = ~(words.concentration[mask] >= thresholds.ungrounded_concentration)
        flagged = (words.relevance[mask] < thresholds.ungrounded_relevance) | low
        return words.key[mask], flagged, _record_means(words.record[mask], flagged.astype(float))

    base_keys, base_flags, base_records = flags(base)
    cur_keys, cur_flags, cur_records = flags(cur)
    return _share_drift(
        base_keys,
        base_flags,
        cur_keys,
        cur_flags,
        pvalue=_records_test(base_records, cur_records, "greater"),
        what="ungrounded",
        label="ungrounded",
        min_increase=thresholds.ungrounded_min_increase,
        thresholds=thresholds,
    )


def coverage(
    base: WordOccurrences, cur: WordOccurrences, thresholds: Thresholds, object_words: frozenset[str] | None = None
) -> dict[str, Any]:
    """The share of object-word occurrences grounded less sharply than the baseline usually
    grounds them, in both tables, and whether it rose: the coverage failure of objects the image
    holds but the caption does not name, which spread the named words' grounding without making
    them ungrounded by :func:`ungrounded`'s absolute rules.

    An occurrence is weakly grounded when its grounding concentration is below ``c``, the
    ``thresholds.coverage_quantile`` quantile of the baseline's object-word concentrations (NaN:
    weakly grounded), so the baseline's share is about that quantile. Drift: ``current_share -
    baseline_share >= coverage_min_increase`` and the one-sided Mann-Whitney U test of the
    records' mean object-word concentrations (current less) gives ``p < alpha``.

    Returns:
        As :func:`ungrounded`, the counts' key ``"weak"`` instead of ``"ungrounded"``, plus
        ``"concentration_threshold"`` (``c``; None when the baseline has no object word).
    """
    base_mask, cur_mask = _object_occurrences(base, object_words), _object_occurrences(cur, object_words)
    base_concentration, cur_concentration = base.concentration[base_mask], cur.concentration[cur_mask]
    finite = base_concentration[np.isfinite(base_concentration)]
    threshold = float(np.quantile(finite, thresholds.coverage_quantile)) if finite.size else math.nan
    result = _share_drift(
        base.key[base_mask],
        ~(base_concentration >= threshold),
        cur.key[cur_mask],
        ~(cur_concentration >= threshold),
        pvalue=_records_test(
            _record_means(base.record[base_mask], base_concentration),
            _record_means(cur.record[cur_mask], cur_concentration),
            "less",
        ),
        what="weak",
        label="weakly grounded",
        min_increase=thresholds.coverage_min_increase,
        thresholds=thresholds,
    )
    return {**result, "concentration_threshold": _number(threshold)}


def top_movers(
    base: WordStats,
    cur: WordStats,
    thresholds: Thresholds,
    object_words: frozenset[str] | None = None,
    *,
    top: int = 10,
) -> list[dict[str, Any]]:
    """The object words whose mean relevance moved most between the tables (object words as in
    :func:`ungrounded`: an article's relevance moves with its neighbours, telling nothing).

    Among the object words seen at least ``min_word_count`` times in both tables, sorted by
    ``|current_mean - baseline_mean|`` (cosine units), largest first; ``pvalue`` is Welch's t-test
    (``scipy.stats.ttest_ind_from_stats``, unequal variances) of the two means, for reading, not
    alerting.

    Returns:
        Up to ``top`` dicts ``{"word", "baseline_count", "current_count", "baseline_mean",
        "current_mean", "change", "pvalue"}``.
    """
    minimum = thresholds.min_word_count
    movers = []
    for key in set(base.count) & set(cur.count):
        bn, cn = base.count[key], cur.count[key]
        if min(bn, cn) < minimum or not _is_object(key, object_words):
            continue
        bm, cm = base.mean[key], cur.mean[key]
        test = stats.ttest_ind_from_stats(bm, base.std[key], bn, cm, cur.std[key], cn, equal_var=False)
        pvalue = float(test.pvalue)
        movers.append(
            {
                "word": key,
                "baseline_count": bn,
                "current_count": cn,
                "baseline_mean": bm,
                "current_mean": cm,
                "change": cm - bm,
                # equal means with zero spread in both: no evidence of a move
                "pvalue": pvalue if math.isfinite(pvalue) else 1.0,
            }
        )
    movers.sort(key=lambda m: (-abs(m["change"]), m["word"]))
    return movers[:top]


def changed_records(
    current: pa.Table,
    cur_words: WordOccurrences,
    base: WordStats,
    thresholds: Thresholds,
    object_words: frozenset[str] | None = None,
    *,
    top: int = 6,
) -> list[dict[str, Any]]:
    """The records of CURRENT whose words' relevances deviate most from the baseline.

    A word's deviation is ``|relevance - baseline mean of its key| / spread``, spread being the
    baseline std of its key floored at the median std of all counted keys (and at 1e-9): a key
    with a near-constant baseline (an article) then does not make every small difference huge.
    Only object words count (as in :func:`ungrounded`; an article's relevance is noise, not
    evidence), and only those whose key the baseline saw ``min_word_count`` times; the others'
    deviation is None. A record's deviation is its largest word deviation.

    Returns:
        Up to ``top`` dicts, largest deviation first: ``{"row", "record_id", "caption", "image",
        "segment", "deviation", "word", "words": [{"text", "key", "start", "end", "relevance",
        "baseline_mean", "deviation", "concentration", "peak_row", "peak_column"}]}``, ``word``
        being the index in ``words`` of the most deviating one.
    """
    objects = _object_mask(cur_words, object_words)
    counted = [k for k, n in base.count.items() if n >= thresholds.min_word_count]
    floor = max(float(np.median([base.std[k] for k in counted])) if counted else 0.0, 1e-9)
    scores = np.full(len(cur_words), np.nan)
    for i, (key, relevance) in enumerate(zip(cur_words.key, cur_words.relevance)):
        if objects[i] and base.count.get(key, 0) >= thresholds.min_word_count and math.isfinite(relevance):
            scores[i] = abs(relevance - base.mean[key]) / max(base.std[key], floor)
    by_record: dict[int, float] = {}
    for record, score in zip(cur_words.record, scores):
        if math.isfinite(score):
            by_record[int(record)] = max(by_record.get(int(record), 0.0), float(score))
    chosen = sorted(by_record, key=lambda r: (-by_record[r], r))[:top]
    columns = {name: current.column(name) for name in ("record_id", "caption", "image", "segment")}
    out = []
    for row in chosen:
        index = np.flatnonzero(cur_words.record == row)
        words = [
            {
                "text": str(cur_words.text[i]),
                "key": str(cur_words.key[i]),
                "start": int(cur_words.start[i]),
                "end": int(cur_words.end[i]),
                "relevance": _number(cur_words.relevance[i]),
                "baseline_mean": base.mean.get(cur_words.key[i]),
                "deviation": _number(scores[i]),
                "concentration": _number(cur_words.concentration[i]),
                "peak_row": int(cur_words.peak_row[i]),
                "peak_column": int(cur_words.peak_column[i]),
            }
            for i in index
        ]
        deviations = [w["deviation"] if w["deviation"] is not None else -1.0 for w in words]
        out.append(
            {
                "row": row,
                **{name: column[row].as_py() for name, column in columns.items()},
                "deviation": by_record[row],
                "word": int(np.argmax(deviations)),
                "words": words,
            }
        )
    return out


def _number(value: float) -> float | None:
    """A float for JSON: None for NaN (JSON has no NaN)."""
    value = float(value)
    return value if math.isfinite(value) else None
