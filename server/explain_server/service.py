"""The ``explain.v1.Explain`` gRPC service."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from dataclasses import dataclass

import grpc
import numpy as np
from explain_client._proto import explain_pb2, explain_pb2_grpc

from .engine.attribution import Attribution, ExplanationCancelled
from .engine.explainer import NonFiniteError
from .engine.quadrature import METHODS
from .inputs import CONVERSION_RULES, Caption, ImageLimits, InputError, check_resize, crop_box, decode_image, tokenize
from .models import LoadedModel
from .registry import ModelRegistry
from .worker import ModelWorker

log = logging.getLogger(__name__)

_MAX_REQUEST_ID = 128


@dataclass(frozen=True)
class Limits:
    """Request limits, all reported in ListModels.

    Attributes:
        max_n_steps: the largest ``n_steps`` accepted.
        image: image size limits.
        max_message_bytes: the largest request or response message, bytes.
    """

    max_n_steps: int = 512
    image: ImageLimits = ImageLimits()
    max_message_bytes: int = 64 << 20


@dataclass(frozen=True)
class Options:
    """Resolved, validated explanation options (non-negative layer indices)."""

    text_layer: int
    image_layer: int
    n_steps: int
    method: str


def _layer(request: explain_pb2.ExplainRequest, field: str, n_layers: int, default: int) -> int:
    if not request.HasField(field):
        return default
    value = getattr(request, field)
    if not -n_layers <= value < n_layers:
        raise InputError(field, f"must be in [{-n_layers}, {n_layers - 1}] for this model ({n_layers} blocks); got {value}")
    return value % n_layers


def resolve_options(request: explain_pb2.ExplainRequest, loaded: LoadedModel, limits: Limits) -> Options:
    """Apply defaults and check ranges.

    Raises:
        InputError: a layer, n_steps or method out of range; the message names the field.
    """
    n_steps = request.n_steps if request.HasField("n_steps") else loaded.default_n_steps
    method = request.method or loaded.default_method
    if method not in METHODS:
        raise InputError("method", f"must be one of {', '.join(METHODS)}; got {method!r}")
    minimum = 2 if method == "riemann_trapezoid" else 1
    if not minimum <= n_steps <= limits.max_n_steps:
        raise InputError("n_steps", f"must be in [{minimum}, {limits.max_n_steps}] for method {method}; got {n_steps}")
    return Options(
        text_layer=_layer(request, "text_layer", loaded.explainer.text.n_layers, loaded.default_text_layer),
        image_layer=_layer(request, "image_layer", loaded.explainer.image.n_layers, loaded.default_image_layer),
        n_steps=n_steps,
        method=method,
    )


def _request_id(value: str) -> str:
    if not value:
        return str(uuid.uuid4())
    if len(value) > _MAX_REQUEST_ID or not (value.isascii() and value.isprintable()):
        raise InputError("request_id", f"must be at most {_MAX_REQUEST_ID} printable ASCII characters")
    return value


def _compute(loaded: LoadedModel, request: explain_pb2.ExplainRequest, options: Options, limits: Limits, job: "_Job"):
    if job.should_stop():  # cancelled or expired while queued: skip the work entirely
        raise ExplanationCancelled()
    caption = tokenize(loaded.tokenizer, request.caption)
    image = decode_image(request.image, limits.image)
    check_resize(*image.size, loaded.preprocess_cfg, limits.image)
    pixels = loaded.transform(image)
    attribution = loaded.explainer.explain(
        caption.token_ids,
        pixels,
        text_layer=options.text_layer,
        image_layer=options.image_layer,
        method=options.method,
        n_steps=options.n_steps,
        should_stop=job.should_stop,
    )
    return image.size, caption, attribution


class _Job:
    """One accepted request's stop conditions, shared between its handler and its worker thread."""

    def __init__(self, time_remaining: float | None):
        self.deadline = None if time_remaining is None else time.monotonic() + time_remaining
        self.cancelled = threading.Event()

    @property
    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def should_stop(self) -> bool:
        return self.cancelled.is_set() or self.expired


def _response(
    loaded: LoadedModel,
    request_id: str,
    options: Options,
    image_size: tuple[int, int],
    caption: Caption,
    attribution: Attribution,
    queue_seconds: float,
    compute_seconds: float,
) -> explain_pb2.ExplainResponse:
    grid_h, grid_w = loaded.grid_size
    seq = len(caption.labels)
    grid = np.ascontiguousarray(attribution.interactions[:, 1:].reshape(seq, grid_h, grid_w), dtype="<f4")
    width, height = image_size
    x0, y0, x1, y1 = crop_box(width, height, loaded.preprocess_cfg)
    return explain_pb2.ExplainResponse(
        request_id=request_id,
        model=loaded.spec.name,
        token_ids=caption.token_ids.tolist(),
        tokens=caption.labels,
        attribution=explain_pb2.Float32Tensor(shape=grid.shape, data=grid.tobytes()),
        cls_attribution=attribution.interactions[:, 0].tolist(),
        score=attribution.score,
        logit_scale=loaded.logit_scale,
        reference_terms=explain_pb2.ReferenceTerms(
            text_reference=attribution.text_reference,
            image_reference=attribution.image_reference,
            both_references=attribution.both_references,
        ),
        convergence_delta=attribution.convergence_delta,
        crop_box=explain_pb2.Box(x0=x0, y0=y0, x1=x1, y1=y1),
        image_size=explain_pb2.ImageSize(width=width, height=height),
        timings=explain_pb2.Timings(queue_seconds=queue_seconds, compute_seconds=compute_seconds),
        options=explain_pb2.ResolvedOptions(
            text_layer=options.text_layer, image_layer=options.image_layer, n_steps=options.n_steps, method=options.method
        ),
    )


def _model_info(loaded: LoadedModel, limits: Limits) -> explain_pb2.ModelInfo:
    cfg = loaded.preprocess_cfg
    (image_h, image_w), (patch_h, patch_w), (grid_h, grid_w) = loaded.image_size, loaded.patch_size, loaded.grid_size
    return explain_pb2.ModelInfo(
        name=loaded.spec.name,
        architecture=loaded.spec.architecture,
        pretrained=loaded.spec.pretrained,
        embed_dim=loaded.embed_dim,
        image_size=explain_pb2.ImageSize(width=image_w, height=image_h),
        patch_size=explain_pb2.ImageSize(width=patch_w, height=patch_h),
        grid_height=grid_h,
        grid_width=grid_w,
        context_length=loaded.model.context_length,
        text_layers=loaded.explainer.text.n_layers,
        image_layers=loaded.explainer.image.n_layers,
        default_text_layer=loaded.default_text_layer,
        default_image_layer=loaded.default_image_layer,
        default_n_steps=loaded.default_n_steps,
        default_method=loaded.default_method,
        methods=METHODS,
        max_n_steps=limits.max_n_steps,
        preprocessing=explain_pb2.Preprocessing(
            mean=cfg.mean,
            std=cfg.std,
            resize_mode=cfg.resize_mode,
            interpolation=cfg.interpolation,
            fill_color=cfg.fill_color,
            conversion=CONVERSION_RULES,
        ),
        device=str(loaded.device),
        dtype=loaded.dtype_name,
    )


class ExplainService(explain_pb2_grpc.ExplainServicer):
    """Serves explanations from the registry's models, each on its own :class:`ModelWorker`."""

    def __init__(self, registry: ModelRegistry, limits: Limits):
        """Serve ``registry``'s models (loaded later) under ``limits``."""
        self.registry = registry
        self.limits = limits
        self._workers = {spec.name: ModelWorker(spec.name) for spec in registry.specs}
        self.shutting_down = False
        self.grace_seconds = 0.0
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._grace_over = asyncio.Event()

    async def _check_serving(self, context: grpc.aio.ServicerContext) -> None:
        if self.shutting_down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another replica")
        if not self.registry.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "models are loading; retry when health is SERVING")

    async def Explain(self, request: explain_pb2.ExplainRequest, context: grpc.aio.ServicerContext):
        """See proto/explain/v1/explain.proto."""
        await self._check_serving(context)
        loaded = self.registry.get(request.model)
        if loaded is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"model: no model named {request.model!r}; hosted: {', '.join(self.registry.models)}",
            )
        try:
            options = resolve_options(request, loaded, self.limits)
            request_id = _request_id(request.request_id)
        except InputError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        enqueued = time.perf_counter()
        job = _Job(context.time_remaining())

        def work():
            started = time.perf_counter()
            return started, _compute(loaded, request, options, self.limits, job), time.perf_counter() - started

        self._inflight += 1
        self._idle.clear()
        try:
            future = self._workers[loaded.spec.name].submit(work)
            grace_over = asyncio.ensure_future(self._grace_over.wait())
            try:
                done, _ = await asyncio.wait({future, grace_over}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                grace_over.cancel()
            if future not in done:
                job.cancelled.set()
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the server shut down before this request finished (grace period {self.grace_seconds:g} s); "
                    "retry on another replica",
                )
            started, (image_size, caption, attribution), compute_seconds = future.result()
        except InputError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except NonFiniteError as err:
            # The served dtype cannot represent this computation: a server configuration limit,
            # not a malformed request and not a broken invariant.
            log.error("request %s: %s (model %s)", request_id, err, loaded.spec.name)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"model {loaded.spec.name}: {err}")
        except ExplanationCancelled:
            if job.expired:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the explanation finished")
            await context.abort(grpc.StatusCode.CANCELLED, "the request was cancelled")
        finally:
            job.cancelled.set()  # a caller that went away stops its work at the next chunk
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()
        log.info(
            "request %s model=%s tokens=%d queue=%.3fs compute=%.3fs",
            request_id, loaded.spec.name, len(caption.labels), started - enqueued, compute_seconds,
        )
        return _response(loaded, request_id, options, image_size, caption, attribution, started - enqueued, compute_seconds)

    async def ListModels(self, request: explain_pb2.ListModelsRequest, context: grpc.aio.ServicerContext):
        """See proto/explain/v1/explain.proto."""
        await self._check_serving(context)
        return explain_pb2.ListModelsResponse(
            models=[_model_info(m, self.limits) for m in self.registry.models.values()],
            default_model=self.registry.default_model,
            limits=explain_pb2.ServerLimits(
                max_message_bytes=self.limits.max_message_bytes,
                max_image_pixels=self.limits.image.max_pixels,
                max_image_side=self.limits.image.max_side,
            ),
        )

    async def drain(self, grace_seconds: float) -> None:
        """Refuse new calls, let accepted ones finish for up to ``grace_seconds``, then end the rest.

        Calls still unfinished when the grace period ends get UNAVAILABLE with a shutdown
        message, and their work stops at its next chunk.
        """
        self.shutting_down = True
        self.grace_seconds = grace_seconds
        try:
            await asyncio.wait_for(self._idle.wait(), grace_seconds)
        except TimeoutError:
            log.warning("grace period over with %d request(s) unfinished; ending them", self._inflight)
            self._grace_over.set()
            await self._idle.wait()

    def close(self) -> None:
        """Stop the model workers; abandoned work ends at its next chunk or with the process."""
        for worker in self._workers.values():
            worker.close()
