"""One summary row (:data:`~explain_client.monitor.schema.SCHEMA`) from a record and its response."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from explain_api import explain_pb2
from explain_client.monitor.sample import Record
from explain_client.monitor.schema import word_key

__all__ = ["summary_row"]


def summary_row(record: Record, response: explain_pb2.ExplainResponse, explained_at: dt.datetime) -> dict[str, Any]:
    """The summary table's row of ``record``, explained as ``response`` at ``explained_at`` (UTC).

    ``mean_concentration`` is the mean of the words' grounding concentration (NaN without
    words); ``convergence_delta_abs`` is |convergence_delta|; ``logit`` is
    score * logit_scale (+ logit_bias for models that have one).
    """
    summary = response.summary
    words = [
        {
            "text": word.text,
            "key": word_key(word.text),
            "start": word.start,
            "end": word.end,
            "relevance": word.relevance,
            "concentration": word.concentration,
            "peak_row": word.peak_row,
            "peak_column": word.peak_column,
            "peak_value": word.peak_value,
        }
        for word in summary.words
    ]
    concentrations = [word["concentration"] for word in words]
    logit = response.score * response.logit_scale
    if response.HasField("logit_bias"):
        logit += response.logit_bias
    return {
        "record_id": record.record_id,
        "timestamp": record.timestamp,
        "segment": record.segment,
        "caption": record.caption,
        "image": record.image_path,
        "model": response.model,
        "request_id": response.request_id,
        "explained_at": explained_at,
        "score": response.score,
        "logit": logit,
        "convergence_delta_abs": abs(response.convergence_delta),
        "interaction_total": summary.interaction_total,
        "interaction_share": summary.interaction_share,
        "positive_interaction": summary.positive_interaction,
        "negative_interaction": summary.negative_interaction,
        "mean_concentration": math.fsum(concentrations) / len(concentrations) if concentrations else math.nan,
        "grid_height": summary.grid_height,
        "grid_width": summary.grid_width,
        "words": words,
        "top_interactions": [
            {"word": cell.word, "row": cell.row, "column": cell.column, "value": cell.value}
            for cell in summary.top_interactions
        ],
    }
