"""Python client of the clip-explain gRPC service.

The service explains a CLIP image-caption similarity with token x image-patch
interaction attributions (Moeller et al., TMLR 2025, arXiv 2408.14153)::

    from explain_client import ExplainClient

    with ExplainClient("localhost:50051", timeout=120) as client:
        exp = client.explain("cat.jpg", "a black cat on a red sofa")
    print(exp.score, exp.top_interactions(3))
    exp.overlay("cat.jpg", "red sofa").save("sofa.png")

With ``detail="summary"`` a call returns a :class:`SummaryResult`: the server's monitoring
summary (interaction share, per-word relevance, peak cell, grounding concentration) without
the tensors; a full :class:`Explanation` carries the same ``summary``.

Errors from the server are raised as :class:`ExplainError` subclasses, one per
gRPC status code (e.g. :class:`NotFoundError` for an unknown model).
"""

from explain_client.client import ExplainClient, PlaintextTokenWarning, tls_credentials
from explain_client.errors import (
    CancelledError,
    DeadlineExceededError,
    ExplainError,
    InternalError,
    InvalidArgumentError,
    MessageTooLargeError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    from_rpc_error,
)
from explain_client.explanation import Explanation, ReferenceTerms, ResolvedOptions
from explain_client.server_info import LayerInfo, ModelInfo, Preprocessing, ServerLimits
from explain_client.summary_result import SummaryResult

__all__ = [
    "CancelledError",
    "DeadlineExceededError",
    "ExplainClient",
    "ExplainError",
    "Explanation",
    "InternalError",
    "InvalidArgumentError",
    "LayerInfo",
    "MessageTooLargeError",
    "ModelInfo",
    "NotFoundError",
    "PermissionDeniedError",
    "PlaintextTokenWarning",
    "Preprocessing",
    "ReferenceTerms",
    "ResolvedOptions",
    "ResourceExhaustedError",
    "ServerLimits",
    "SummaryResult",
    "UnauthenticatedError",
    "UnavailableError",
    "from_rpc_error",
    "tls_credentials",
]
