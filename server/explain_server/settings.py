"""The server's settings as frozen data: request and image limits, batching, dtypes, auth exemptions.

The configuration (:mod:`.config`) builds these and the serving parts take them. This module
imports only the standard library, so that reading a configuration loads neither grpc nor torch.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("float32", "float16", "bfloat16")
"""The dtypes models may run in (weights and activations), by torch's names."""

# Kubernetes' gRPC probes and load balancers cannot send tokens.
DEFAULT_AUTH_EXEMPT = ("grpc.health.v1.Health",)
"""Services callable without a bearer token unless configured otherwise."""


@dataclass(frozen=True)
class ImageLimits:
    """Accepted image sizes, checked from the header before any pixel is decoded.

    Attributes:
        max_pixels: the largest width * height.
        max_side: the largest width or height, pixels.
    """

    max_pixels: int = 50_000_000
    max_side: int = 20_000


@dataclass(frozen=True)
class Limits:
    """Request limits, all reported in ListModels.

    Attributes:
        max_n_steps: the largest ``n_steps`` accepted.
        image: image size limits.
        max_message_bytes: the largest request or response message, bytes.
        max_explanations_per_call: the most explanations one ExplainMany call may ask for.
        max_pixels_per_call: the most pixels (width * height, summed over its images) one call
            may send, so that one call cannot hold the decoding threads for long; the default
            admits 64 photos of 12.5 megapixels.
    """

    max_n_steps: int = 512
    image: ImageLimits = ImageLimits()
    max_message_bytes: int = 64 << 20
    max_explanations_per_call: int = 64
    max_pixels_per_call: int = 800_000_000


@dataclass(frozen=True)
class BatchingConfig:
    """Triton's dynamic batcher settings.

    Attributes:
        max_batch_size: most requests run together; 1 turns batching off.
        max_queue_delay_seconds: longest the oldest queued request waits for its batch to fill.
        max_queue_size: most requests waiting; beyond it submissions fail at once.
    """

    max_batch_size: int = 16
    # Triton's default: no waiting when the model is idle; under load a batch forms from what
    # queued while the previous one computed
    max_queue_delay_seconds: float = 0.0
    max_queue_size: int = 256
