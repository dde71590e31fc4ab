"""Explaining every (image, caption) pair of a dataset through a running service, concurrently."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

try:
    from tqdm import tqdm
except ImportError:  # the eval extra's; the thin client evaluates without a progress bar
    tqdm = None

from explain_api.grounding import CaptionEntry, Dataset
from explain_client.client import ExplainClient
from explain_client.errors import ExplainError
from explain_client.evaluation.scoring import AlignmentError, PhraseScore, phrase_rows, score_phrase
from explain_client.explanation import Explanation

__all__ = ["PairResult", "PhraseResult", "evaluate"]


@dataclass(frozen=True)
class PhraseResult:
    """One phrase of one caption, scored."""

    label: str
    text: str
    score: PhraseScore


@dataclass(frozen=True)
class PairResult:
    """One (image, caption) pair: its phrases' results, or why it could not be scored.

    Attributes:
        index: the caption's position in the dataset.
        image_id: the image's id.
        caption: the caption text.
        similarity: the model's cosine score of the pair (NaN when the call failed).
        convergence_delta: the explanation's quadrature error, cosine units (NaN when the call
            failed): how much of the score the attributions do not account for.
        phrases: one result per phrase (empty when ``error`` is set).
        error: None, or the reason the pair was skipped (a failed call, tokens that do not
            spell out the caption).
    """

    index: int
    image_id: str
    caption: str
    similarity: float
    convergence_delta: float
    phrases: tuple[PhraseResult, ...]
    error: str | None = None


def score_caption(explanation: Explanation, entry: CaptionEntry) -> tuple[PhraseResult, ...]:
    """Score every phrase of ``entry`` in its explanation.

    Raises:
        AlignmentError: the tokens do not spell out the caption.
    """
    results = []
    for phrase in entry.phrases:
        rows = phrase_rows(explanation, entry.text, phrase.start, phrase.end)
        results.append(
            PhraseResult(
                phrase.label, entry.text[phrase.start : phrase.end], score_phrase(explanation, rows, phrase.boxes)
            )
        )
    return tuple(results)


def evaluate(
    client: ExplainClient,
    dataset: Dataset,
    *,
    workers: int = 4,
    limit: int | None = None,
    progress: bool = True,
    explain_options: dict | None = None,
    on_result: Callable[[PairResult], None] | None = None,
) -> list[PairResult]:
    """Explain and score every caption of ``dataset`` (the first ``limit`` if given).

    Args:
        client: a connected client; its calls run from ``workers`` threads at once.
        dataset: the dataset (see :mod:`explain_api.grounding`).
        workers: requests in flight at once.
        limit: only the first ``limit`` captions.
        progress: show a tqdm progress bar on stderr; ignored without tqdm (the eval extra).
        explain_options: passed to :meth:`ExplainClient.explain` (``model``, ``n_steps``, ...).
        on_result: called with each result as it completes (in completion order).

    Returns:
        One :class:`PairResult` per caption, in dataset order. A failed call or a caption whose
        tokens cannot be aligned is recorded with ``error`` set, not raised.

    Raises:
        ValueError: ``workers`` < 1.
        OSError: an image file cannot be read.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1; got {workers}")
    captions = dataset.captions[:limit] if limit is not None else dataset.captions
    options = dict(explain_options or {})

    def explain_and_score(index: int, entry: CaptionEntry) -> PairResult:
        image = dataset.images[entry.image_id].path.read_bytes()
        try:
            explanation = client.explain(image, entry.text, **options)
        except ExplainError as err:
            return PairResult(index, entry.image_id, entry.text, math.nan, math.nan, (), f"{type(err).__name__}: {err}")
        try:
            phrases = score_caption(explanation, entry)
        except AlignmentError as err:
            return PairResult(
                index,
                entry.image_id,
                entry.text,
                explanation.score,
                explanation.convergence_delta,
                (),
                f"AlignmentError: {err}",
            )
        return PairResult(index, entry.image_id, entry.text, explanation.score, explanation.convergence_delta, phrases)

    results: list[PairResult | None] = [None] * len(captions)
    show = progress and tqdm is not None
    bar = tqdm(total=len(captions), desc="explain-eval", unit="pair") if show else contextlib.nullcontext()
    with ThreadPoolExecutor(max_workers=workers) as pool, bar:
        futures = [pool.submit(explain_and_score, i, entry) for i, entry in enumerate(captions)]
        for future in as_completed(futures):
            result = future.result()
            results[result.index] = result
            if on_result is not None:
                on_result(result)
            if show:
                bar.update(1)
    return results
