"""The result of an Explain call with ``detail="summary"``: the summary and the scalars, no tensors.

A monitoring job wants the server's :class:`~explain_api.summary.Summary` of each explanation
(interaction share, per-word relevance, peak cell, grounding concentration, top (word, cell)
pairs), not the T x Gh x Gw attribution; asking for the summary only keeps the tensors off the
wire. The summary is the one a full :class:`~explain_client.explanation.Explanation` carries.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from explain_api import explain_pb2
from explain_api.summary import Summary
from explain_api.summary import from_proto as summary_from_proto
from explain_client.explanation import ReferenceTerms, ResolvedOptions

__all__ = ["SummaryResult"]


@dataclass(frozen=True)
class SummaryResult:
    """One explanation without its tensors: what :meth:`ExplainClient.explain` returns with
    ``detail="summary"``. Fields mean what :class:`~explain_client.explanation.Explanation`'s
    of the same name mean."""

    summary: Summary
    """The monitoring summary (``ExplanationSummary`` in explain.proto)."""
    score: float
    """Cosine similarity of the caption and image embeddings."""
    logit_scale: float
    logit_bias: float | None
    convergence_delta: float
    reference_terms: ReferenceTerms
    tokens: tuple[str, ...]
    """Decoded label of each token row; ``summary.words`` index these rows."""
    token_ids: tuple[int, ...]
    padding: tuple[bool, ...]
    token_spans: tuple[tuple[int, int], ...]
    image_prefix: tuple[str, ...]
    crop_box: tuple[float, float, float, float]
    image_size: tuple[int, int]
    request_id: str
    model: str
    options: ResolvedOptions
    queue_seconds: float
    compute_seconds: float

    @classmethod
    def from_proto(cls, resp: explain_pb2.ExplainResponse) -> SummaryResult:
        """Decode an ``ExplainResponse`` asked for with ``DETAIL_SUMMARY``.

        Raises:
            ValueError: the response carries no summary (a server that predates summaries,
                which also ignored ``detail`` and sent the tensors).
        """
        if not resp.HasField("summary"):
            raise ValueError(
                f"the response of model {resp.model!r} carries no summary: the server predates "
                "ExplanationSummary; upgrade it, or call explain() with detail='full'"
            )
        box = resp.crop_box
        return cls(
            summary=summary_from_proto(resp.summary),
            score=resp.score,
            logit_scale=resp.logit_scale,
            logit_bias=resp.logit_bias if resp.HasField("logit_bias") else None,
            convergence_delta=resp.convergence_delta,
            reference_terms=ReferenceTerms.from_proto(resp.reference_terms),
            tokens=tuple(resp.tokens),
            token_ids=tuple(resp.token_ids),
            padding=tuple(resp.padding),
            token_spans=tuple((span.start, span.end) for span in resp.token_spans),
            image_prefix=tuple(resp.image_prefix),
            crop_box=(box.x0, box.y0, box.x1, box.y1),
            image_size=(resp.image_size.width, resp.image_size.height),
            request_id=resp.request_id,
            model=resp.model,
            options=ResolvedOptions.from_proto(resp.options),
            queue_seconds=resp.timings.queue_seconds,
            compute_seconds=resp.timings.compute_seconds,
        )

    @property
    def logit(self) -> float:
        """The model's logit for the pair: score x logit_scale (+ logit_bias where the model has one)."""
        return self.score * self.logit_scale + (self.logit_bias or 0.0)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of all fields (``summary``, ``reference_terms`` and ``options`` as dicts)."""
        return dataclasses.asdict(self)
