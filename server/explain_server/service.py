"""The ``explain.v1.Explain`` gRPC service: the front end's servicer.

It translates between protobuf and the domain and validates; decoding and tokenising run on
a small thread pool; explanations are computed by the model's workers (worker_pool.py).
Every way a call can fail is a domain exception, and :data:`STATUS_CODES` maps each to its
gRPC status in one place.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import grpc
import numpy as np

from explain_api import explain_pb2, explain_pb2_grpc
from explain_api.summary import DEFAULT_TOP_K, MAX_TOP_K, Summary, summarize
from explain_api.summary import to_proto as summary_to_proto

from .engine.layers import Layer
from .engine.quadrature import METHODS, min_n_steps
from .inputs import CONVERSION_RULES, Caption, InputError, check_resize, crop_box, load_image, open_image, tokenize
from .lifecycle import Lifecycle, ShuttingDown
from .metrics import Metrics, abort_internal, cancellation_code
from .positions import image_columns, token_rows
from .registry import ModelRegistry, ServedModel
from .settings import Limits
from .worker.protocol import Dropped, Explained, Failed, JobSpec, SideInput, SideKey, Tower
from .worker_pool import ModelUnavailable, WorkerLost

log = logging.getLogger(__name__)

_MAX_REQUEST_ID = 128
# Preparing a request (tokenising, converting pixels) holds the GIL for most of its work, so
# more threads than this only take it from the models' batch threads; two let Pillow's
# GIL-free decoding of one image overlap the rest of another request.
_PREPARE_THREADS = 2


@dataclass(frozen=True)
class Options:
    """Resolved, validated explanation options (non-negative layer indices into the towers' layers)."""

    text_layer: int
    image_layer: int
    n_steps: int
    method: str


def _layer(request: explain_pb2.ExplainRequest, tower: str, layers: tuple[Layer, ...], default: int) -> int:
    """The non-negative layer index a request names for ``tower`` (``text`` or ``image``): by
    index (``{tower}_layer``) or by name (``{tower}_layer_name``), else ``default``.

    Raises:
        InputError: both fields set, an index out of range, or an unknown name (the message
            lists the tower's layer names).
    """
    index_field, name_field = f"{tower}_layer", f"{tower}_layer_name"
    count = len(layers)
    if request.HasField(name_field):
        if request.HasField(index_field):
            raise InputError(name_field, f"set {index_field} or {name_field}, not both")
        name = getattr(request, name_field)
        names = [layer.name for layer in layers]
        if name not in names:
            raise InputError(
                name_field, f"no {tower} layer named {name!r} in this model; its layers are: {', '.join(names)}"
            )
        return names.index(name)
    if not request.HasField(index_field):
        return default
    value = getattr(request, index_field)
    if not -count <= value < count:
        raise InputError(
            index_field, f"must be in [{-count}, {count - 1}] for this model ({count} {tower} layers); got {value}"
        )
    return value % count


def resolve_options(request: explain_pb2.ExplainRequest, model: ServedModel, limits: Limits) -> Options:
    """Apply defaults and check ranges.

    Raises:
        InputError: a layer, n_steps or method out of range; the message names the field.
    """
    n_steps = request.n_steps if request.HasField("n_steps") else model.default_n_steps
    method = request.method or model.default_method
    if method not in METHODS:
        raise InputError("method", f"must be one of {', '.join(METHODS)}; got {method!r}")
    minimum = min_n_steps(method)
    if not minimum <= n_steps <= limits.max_n_steps:
        raise InputError("n_steps", f"must be in [{minimum}, {limits.max_n_steps}] for method {method}; got {n_steps}")
    return Options(
        text_layer=_layer(request, "text", model.description.text_layer_list, model.default_text_layer),
        image_layer=_layer(request, "image", model.description.image_layer_list, model.default_image_layer),
        n_steps=n_steps,
        method=method,
    )


@dataclass(frozen=True)
class Output:
    """What a response carries: the tensors or not (``detail``), and the summary's top-k."""

    full: bool
    top_k: int


def resolve_output(request: explain_pb2.ExplainRequest | explain_pb2.ExplainManyRequest) -> Output:
    """Apply the defaults of ``detail`` and ``summary_top_k`` and check them.

    Raises:
        InputError: an unknown detail value, or a top-k outside [0, MAX_TOP_K].
    """
    if request.detail not in (explain_pb2.DETAIL_FULL, explain_pb2.DETAIL_SUMMARY):
        raise InputError("detail", f"must be DETAIL_FULL (0) or DETAIL_SUMMARY (1); got {request.detail}")
    top_k = request.summary_top_k if request.HasField("summary_top_k") else DEFAULT_TOP_K
    if not 0 <= top_k <= MAX_TOP_K:
        raise InputError("summary_top_k", f"must be in [0, {MAX_TOP_K}]; got {top_k}")
    return Output(full=request.detail == explain_pb2.DETAIL_FULL, top_k=top_k)


def _request_id(value: str) -> str:
    if not value:
        return str(uuid.uuid4())
    if len(value) > _MAX_REQUEST_ID or not (value.isascii() and value.isprintable()):
        raise InputError("request_id", f"must be at most {_MAX_REQUEST_ID} printable ASCII characters")
    return value


class ModelNotFound(Exception):
    """The request names a model the server does not host."""


class ModelsLoading(Exception):
    """The server started and its models are still loading."""


class QueueFull(Exception):
    """The worker's queue has no room for the call's explanations."""


class NonFiniteResult(Exception):
    """The served dtype cannot represent this computation: a server configuration limit,
    neither a malformed request nor a broken invariant."""


class DeadlinePassed(Exception):
    """The call's deadline passed before its explanations were computed."""


class CallCancelled(Exception):
    """The caller cancelled the call."""


class WorkerBug(Exception):
    """A bug in a worker: it logged the traceback under the error id this message gives."""


# Every domain failure of a call and the status it ends with. An exception not in the table
# is a bug in the front end: INTERNAL with an error id (abort_internal).
STATUS_CODES: dict[type[Exception], grpc.StatusCode] = {
    InputError: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    ModelsLoading: grpc.StatusCode.UNAVAILABLE,
    ModelUnavailable: grpc.StatusCode.UNAVAILABLE,
    WorkerLost: grpc.StatusCode.UNAVAILABLE,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NonFiniteResult: grpc.StatusCode.FAILED_PRECONDITION,
    DeadlinePassed: grpc.StatusCode.DEADLINE_EXCEEDED,
    CallCancelled: grpc.StatusCode.CANCELLED,
    WorkerBug: grpc.StatusCode.INTERNAL,
}
_FAILURES = {"non_finite": NonFiniteResult, "queue_full": QueueFull, "internal": WorkerBug}


@dataclass(frozen=True)
class _Prepared:
    """One side (caption or image) of a request, checked and ready for the model.

    Attributes:
        side: the side's factor cache key and model inputs.
        extra: the caption (text) or the image size after EXIF orientation (image).
    """

    side: SideInput
    extra: Caption | tuple[int, int]


class _Stop:
    """When work for a call should stop, shared by its handler and the thread decoding its images."""

    def __init__(self, time_remaining: float | None):
        self.deadline = None if time_remaining is None else time.monotonic() + time_remaining
        self.cancelled = threading.Event()
        # why its call ended early, as the call is counted (set before ``cancelled``)
        self.stop_code: grpc.StatusCode | None = None

    @property
    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def should_stop(self) -> bool:
        return self.cancelled.is_set() or self.expired

    def code(self) -> grpc.StatusCode:
        """The code a stopped call is counted under."""
        if self.stop_code is not None:
            return self.stop_code
        # stopped by the server's own clock, or by shutdown
        return grpc.StatusCode.DEADLINE_EXCEEDED if self.expired else grpc.StatusCode.CANCELLED


def _response(
    model: ServedModel,
    request_id: str,
    options: Options,
    output: Output,
    caption: str,
    text: _Prepared,
    image: _Prepared,
    result: Explained,
) -> tuple[explain_pb2.ExplainResponse, Summary]:
    """The response of one explanation, and its summary: rows and columns of the attribution
    labelled by :mod:`.positions` (padding rows, the resolved image layer's prefix and grid);
    the summary is computed from the float32 tensors the FULL response carries."""
    d, attribution = model.description, result.attribution
    interactions = np.asarray(attribution.interactions)
    rows = token_rows(text.extra, interactions.shape[0], d.pad_id, d.pad_label)
    image_layer = d.image_layer_list[options.image_layer]
    columns = image_columns(interactions, image_layer)
    width, height = image.extra
    x0, y0, x1, y1 = crop_box(width, height, model.preprocess_cfg)
    summary = summarize(
        columns.grid,
        columns.prefix_attribution,
        attribution.score,
        attribution.convergence_delta,
        caption,
        rows.spans,
        rows.labels,
        rows.padding,
        output.top_k,
    )
    tensors = (
        {
            "attribution": _tensor(columns.grid),
            "cls_attribution": columns.cls.tolist(),
            "prefix_attribution": _tensor(columns.prefix_attribution),
        }
        if output.full
        else {}
    )
    response = explain_pb2.ExplainResponse(
        request_id=request_id,
        model=model.name,
        token_ids=rows.token_ids,
        tokens=rows.labels,
        padding=rows.padding,
        token_spans=[explain_pb2.TextSpan(start=a, end=b) for a, b in rows.spans],
        image_prefix=columns.prefix,
        score=attribution.score,
        logit_scale=model.description.logit_scale,
        logit_bias=model.description.logit_bias,
        reference_terms=explain_pb2.ReferenceTerms(
            text_reference=attribution.text_reference,
            image_reference=attribution.image_reference,
            both_references=attribution.both_references,
        ),
        convergence_delta=attribution.convergence_delta,
        crop_box=explain_pb2.Box(x0=x0, y0=y0, x1=x1, y1=y1),
        image_size=explain_pb2.ImageSize(width=width, height=height),
        timings=explain_pb2.Timings(queue_seconds=result.queue_seconds, compute_seconds=result.compute_seconds),
        options=explain_pb2.ResolvedOptions(
            text_layer=options.text_layer,
            image_layer=options.image_layer,
            n_steps=options.n_steps,
            method=options.method,
            text_layer_name=d.text_layer_list[options.text_layer].name,
            image_layer_name=image_layer.name,
        ),
        summary=summary_to_proto(summary),
        **tensors,
    )
    return response, summary


def _tensor(array: np.ndarray) -> explain_pb2.Float32Tensor:
    """A little-endian float32, C-contiguous ``array`` as a Float32Tensor."""
    return explain_pb2.Float32Tensor(shape=array.shape, data=array.tobytes())


def _layer_info(index: int, layer: Layer) -> explain_pb2.LayerInfo:
    grid_h, grid_w = layer.grid or (0, 0)
    return explain_pb2.LayerInfo(
        index=index, name=layer.name, grid_height=grid_h, grid_width=grid_w, prefix=layer.prefix
    )


def _model_info(model: ServedModel, limits: Limits) -> explain_pb2.ModelInfo:
    cfg, d = model.preprocess_cfg, model.description
    (image_h, image_w), (patch_h, patch_w), (grid_h, grid_w) = d.image_size, d.patch_size, d.grid_size
    return explain_pb2.ModelInfo(
        name=model.name,
        architecture=model.spec.architecture,
        pretrained=model.spec.pretrained,
        embed_dim=d.embed_dim,
        image_size=explain_pb2.ImageSize(width=image_w, height=image_h),
        patch_size=explain_pb2.ImageSize(width=patch_w, height=patch_h),
        grid_height=grid_h,
        grid_width=grid_w,
        context_length=d.context_length,
        text_layers=d.text_layers,
        image_layers=d.image_layers,
        default_text_layer=model.default_text_layer,
        default_image_layer=model.default_image_layer,
        text_layer_list=[_layer_info(i, layer) for i, layer in enumerate(d.text_layer_list)],
        image_layer_list=[_layer_info(i, layer) for i, layer in enumerate(d.image_layer_list)],
        default_text_layer_name=d.text_layer_list[model.default_text_layer].name,
        default_image_layer_name=d.image_layer_list[model.default_image_layer].name,
        text_sees_padding=d.text_sees_padding,
        pad_token=d.pad_label,
        logit_bias=d.logit_bias,
        default_n_steps=model.default_n_steps,
        default_method=model.default_method,
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
        device=d.device,
        dtype=d.dtype,
    )


class ExplainService(explain_pb2_grpc.ExplainServicer):
    """Serves explanations from the registry's models; each call's explanations go to one worker of its model."""

    def __init__(self, registry: ModelRegistry, limits: Limits, metrics: Metrics, lifecycle: Lifecycle):
        """Serve ``registry``'s models (started later) under ``limits``, recording into ``metrics``."""
        self.registry = registry
        self.limits = limits
        self.metrics = metrics
        self.lifecycle = lifecycle
        for spec in registry.specs:
            metrics.add_model(spec.name)
        self._preparing = ThreadPoolExecutor(_PREPARE_THREADS, thread_name_prefix="prepare")

    async def Explain(self, request: explain_pb2.ExplainRequest, context: grpc.aio.ServicerContext):
        """See proto/explain/v1/explain.proto."""

        async def explain(model: ServedModel) -> explain_pb2.ExplainResponse:
            options, request_id = resolve_options(request, model, self.limits), _request_id(request.request_id)
            output = resolve_output(request)
            stop = _Stop(context.time_remaining())
            (text,), (image,), waited = await self._prepare(
                model, options, [request.caption], [request.image], stop, context, request_id, many=False
            )
            (result,) = await self._compute(model, [(text, image)], waited, stop, context, request_id)
            response, summary = _response(model, request_id, options, output, request.caption, text, image, result)
            self.metrics.observe_summary(model.name, summary)
            return response

        return await self._observed("Explain", request.model, context, explain)

    async def ExplainMany(self, request: explain_pb2.ExplainManyRequest, context: grpc.aio.ServicerContext):
        """See proto/explain/v1/explain.proto."""

        async def explain_many(model: ServedModel) -> explain_pb2.ExplainManyResponse:
            options, request_id = resolve_options(request, model, self.limits), _request_id(request.request_id)
            output = resolve_output(request)
            images, captions = list(request.images), list(request.captions)
            count = max(len(images), len(captions))
            if not images or not captions or min(len(images), len(captions)) != 1:
                raise InputError(
                    "images, captions",
                    f"send one image and several captions, or one caption and several images; "
                    f"got {len(images)} image(s) and {len(captions)} caption(s)",
                )
            if count > self.limits.max_explanations_per_call:
                raise InputError(
                    "captions" if len(captions) > 1 else "images",
                    f"at most {self.limits.max_explanations_per_call} explanations per call; got {count}",
                )
            stop = _Stop(context.time_remaining())
            texts, pixels, waited = await self._prepare(
                model, options, captions, images, stop, context, request_id, many=True
            )
            pairs = [(texts[0 if len(texts) == 1 else i], pixels[0 if len(pixels) == 1 else i]) for i in range(count)]
            results = await self._compute(model, pairs, waited, stop, context, request_id)
            explained = [
                _response(
                    model,
                    f"{request_id}/{i}",
                    options,
                    output,
                    captions[0 if len(captions) == 1 else i],
                    text,
                    image,
                    result,
                )
                for i, ((text, image), result) in enumerate(zip(pairs, results))
            ]
            for _, summary in explained:
                self.metrics.observe_summary(model.name, summary)
            return explain_pb2.ExplainManyResponse(explanations=[response for response, _ in explained])

        return await self._observed("ExplainMany", request.model, context, explain_many)

    async def _observed(
        self,
        method: str,
        model_name: str,
        context: grpc.aio.ServicerContext,
        body: Callable[[ServedModel], Awaitable[Any]],
    ):
        """Check the server can serve, resolve the model, run ``body``; end the call by :data:`STATUS_CODES`
        and count it by its final code.

        An exception outside the table ends the call INTERNAL (:func:`abort_internal`), never UNKNOWN.
        """
        start = time.perf_counter()
        name = ""  # unknown models are not labels: callers choose those names
        code = grpc.StatusCode.OK
        try:
            self._check_serving()
            model = self.registry.get(model_name)
            if model is None:
                raise ModelNotFound(f"model: no model named {model_name!r}; hosted: {', '.join(self.registry.models)}")
            name = model.name
            self.lifecycle.accept()
            try:
                return await body(model)
            finally:
                self.lifecycle.done()
        except asyncio.CancelledError:  # the caller went away or its deadline passed
            code = cancellation_code(context)
            raise
        except tuple(STATUS_CODES) as err:
            code = next(code for kind, code in STATUS_CODES.items() if isinstance(err, kind))
            if isinstance(err, WorkerBug):
                self.metrics.internal_errors.labels(name).inc()
            await _abort(context, code, str(err))
        except Exception:
            code = grpc.StatusCode.INTERNAL
            await abort_internal(context, self.metrics, name, method)
        finally:
            self.metrics.requests.labels(name, code.name).inc()
            if name:
                self.metrics.request_duration_seconds.labels(name).observe(time.perf_counter() - start)

    def _check_serving(self) -> None:
        if self.lifecycle.shutting_down:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        if not self.registry.started:
            raise ModelsLoading("models are loading; retry when health is SERVING")

    async def _compute(
        self,
        model: ServedModel,
        pairs: list[tuple[_Prepared, _Prepared]],
        waited: float,
        stop: _Stop,
        context: grpc.aio.ServicerContext,
        request_id: str,
    ) -> list[Explained]:
        """Send one job per pair to one of the model's workers and await them all.

        Raises:
            the domain exception of the first job that did not succeed.
        """
        instance = model.workers.pick()
        jobs = [JobSpec(instance.next_job_id(), text.side, image.side, stop.deadline, waited) for text, image in pairs]
        futures = instance.submit(jobs)
        for future in futures:
            future.add_done_callback(lambda f: self._record(model.name, stop, f))
        inflight = self.metrics.inflight_requests.labels(model.name)
        inflight.inc(len(jobs))
        try:
            grace_over = asyncio.ensure_future(self.lifecycle.until_grace_over())
            # every outcome is collected, so that no failure goes unretrieved
            gathered = asyncio.gather(*futures, return_exceptions=True)
            try:
                done, _ = await asyncio.wait({gathered, grace_over}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                grace_over.cancel()
            if gathered not in done:
                grace_over.result()  # raises ShuttingDown
            outcomes = gathered.result()
        except asyncio.CancelledError:
            stop.stop_code = cancellation_code(context)
            stop.cancelled.set()
            raise
        finally:
            # a caller that went away stops its jobs at their next chunk
            instance.cancel([job.job_id for job, future in zip(jobs, futures) if not future.done()])
            inflight.dec(len(jobs))
        for outcome in outcomes:
            _raise_failure(outcome, stop)
        for index, ((text, _), result) in enumerate(zip(pairs, outcomes)):
            log.info(
                "request %s model=%s tokens=%d queue=%.3fs compute=%.3fs",
                request_id if len(pairs) == 1 else f"{request_id}/{index}",
                model.name,
                len(text.extra.labels),
                result.queue_seconds,
                result.compute_seconds,
            )
        return outcomes

    def _record(self, name: str, stop: _Stop, future: asyncio.Future) -> None:
        """Count one job's outcome, whether or not its caller still awaits it."""
        if future.cancelled() or future.exception() is not None:
            return
        outcome = future.result()
        m = self.metrics
        if isinstance(outcome, Explained):
            m.queue_wait_seconds.labels(name).observe(outcome.queue_seconds)
            m.compute_seconds.labels(name).observe(outcome.compute_seconds)
            m.similarity_score.labels(name).observe(outcome.attribution.score)
            m.convergence_delta_abs.labels(name).observe(abs(outcome.attribution.convergence_delta))
        elif isinstance(outcome, Dropped):
            m.requests_dropped.labels(name, stop.code().name).inc()

    async def _prepare(
        self,
        model: ServedModel,
        options: Options,
        captions: list[str],
        images: list[bytes],
        stop: _Stop,
        context: grpc.aio.ServicerContext,
        request_id: str,
        many: bool,
    ) -> tuple[list[_Prepared], list[_Prepared], float]:
        """Tokenise the captions and decode the images on a prepare thread.

        Decoding runs on a small pool of its own (Pillow releases the GIL). A call that ends
        (deadline passed, or cancelled) stops decoding at its next image, so that it does not
        keep a thread from the calls waiting for one.

        Returns:
            The prepared captions and images, and the seconds the call waited for a thread.

        Raises:
            InputError: naming the field (``caption``, or ``captions[i]`` / ``images[i]`` for
                ExplainMany; ``images`` or ``image`` for the per-call pixel limit).
            DeadlinePassed: the deadline passed while decoding.
        """
        submitted = time.perf_counter()

        def prepare() -> tuple[list[_Prepared], list[_Prepared], float]:
            waited = time.perf_counter() - submitted
            texts = []
            for index, caption in enumerate(captions):
                try:
                    texts.append(_prepare_text(model, options, caption))
                except InputError as err:
                    raise err.renamed({"caption": f"captions[{index}]"} if many else {})
            return texts, self._prepare_images(model, options, images, stop, request_id, many), waited

        work = self._preparing.submit(prepare)
        try:
            return await asyncio.wrap_future(work)
        except asyncio.CancelledError:
            stop.stop_code = cancellation_code(context)
            stop.cancelled.set()
            if work.cancel():  # it never got a thread; once running, it stops at its next image
                self._skip_images(model, request_id, stop, len(images), len(images))
            raise

    def _prepare_images(
        self, model: ServedModel, o: Options, images: list[bytes], stop: _Stop, request_id: str, many: bool
    ) -> list[_Prepared]:
        """A call's images, on a prepare thread: sizes checked from the headers, then decoded one by one.

        Raises:
            InputError: an image breaks a rule (``image`` / ``images[i]``), or all together
                have more than ``max_pixels_per_call`` pixels (``image`` / ``images``).
            DeadlinePassed: ``stop`` turned true before every image was decoded.
        """
        opened, pixels = [], 0
        for index, data in enumerate(images):
            try:
                image = open_image(data, self.limits.image)
            except InputError as err:
                raise err.renamed({"image": f"images[{index}]"} if many else {})
            opened.append(image)
            width, height = image.size
            pixels += width * height
        if pixels > self.limits.max_pixels_per_call:
            raise InputError(
                "images" if many else "image",
                f"{len(images)} image(s) of {pixels} pixels in all; the limit is {self.limits.max_pixels_per_call} "
                "pixels per call (send fewer or smaller images per call)",
            )
        prepared = []
        for index, (data, image) in enumerate(zip(images, opened)):
            if stop.should_stop():
                self._skip_images(model, request_id, stop, len(images) - index, len(images))
                raise DeadlinePassed("the deadline passed while its images were being decoded")
            try:
                decoded = load_image(image, data)
                check_resize(*decoded.size, model.preprocess_cfg, self.limits.image)
            except InputError as err:
                raise err.renamed({"image": f"images[{index}]"} if many else {})
            key = SideKey(Tower.IMAGE, o.image_layer, o.method, o.n_steps, _digest(data))
            prepared.append(_Prepared(SideInput(key, model.transform(decoded).numpy()), decoded.size))
        return prepared

    def _skip_images(self, model: ServedModel, request_id: str, stop: _Stop, skipped: int, total: int) -> None:
        code = stop.code()
        self.metrics.images_skipped.labels(model.name, code.name).inc(skipped)
        log.info(
            "request %s model=%s: ended (%s) with %d of its %d image(s) not decoded; skipped them",
            request_id,
            model.name,
            code.name,
            skipped,
            total,
        )

    async def ListModels(self, request: explain_pb2.ListModelsRequest, context: grpc.aio.ServicerContext):
        """See proto/explain/v1/explain.proto. A bug here is answered INTERNAL by :class:`GrpcMetricsInterceptor`."""
        try:
            self._check_serving()
        except (ShuttingDown, ModelsLoading) as err:
            await context.abort(STATUS_CODES[type(err)], str(err))
        return explain_pb2.ListModelsResponse(
            models=[_model_info(m, self.limits) for m in self.registry.models.values()],
            default_model=self.registry.default_model,
            limits=explain_pb2.ServerLimits(
                max_message_bytes=self.limits.max_message_bytes,
                max_image_pixels=self.limits.image.max_pixels,
                max_image_side=self.limits.image.max_side,
                max_explanations_per_call=self.limits.max_explanations_per_call,
                max_pixels_per_call=self.limits.max_pixels_per_call,
            ),
        )

    def close(self) -> None:
        """Stop taking decoding work; threads already decoding stop at their call's next image."""
        self._preparing.shutdown(wait=False)


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """End the call with ``code``; a call its deadline has already ended is left to that ending.

    Raises:
        grpc.aio.AbortError: the call ended with ``code`` (how grpc.aio ends a call).
        asyncio.CancelledError: the deadline had passed and gRPC had answered DEADLINE_EXCEEDED
            already, so it refused the abort; the caller has its answer.
    """
    try:
        await context.abort(code, details)
    except grpc.aio.AbortError:
        raise
    except Exception as err:  # grpc's ExecuteBatchError: the transport finished the call
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise asyncio.CancelledError() from err
        raise


def _digest(data: bytes) -> str:
    """SHA-256 hex digest: cache keys never hold user content itself."""
    return hashlib.sha256(data).hexdigest()


def _prepare_text(model: ServedModel, o: Options, text: str) -> _Prepared:
    """Tokenise; for a tower that sees padding, the ids go to the worker padded to its context length."""
    caption = tokenize(model.tokenizer, text)
    ids = caption.token_ids.numpy()
    d = model.description
    if d.text_sees_padding:
        ids = np.pad(ids, (0, d.context_length - len(ids)), constant_values=d.pad_id)
    key = SideKey(Tower.TEXT, o.text_layer, o.method, o.n_steps, _digest(ids.tobytes()))
    return _Prepared(SideInput(key, ids), caption)


def _raise_failure(outcome: Explained | Dropped | Failed | Exception, stop: _Stop) -> None:
    """Raise the domain exception of a job that did not succeed."""
    if isinstance(outcome, Exception):
        raise outcome
    if isinstance(outcome, Dropped):
        if stop.expired:
            raise DeadlinePassed("the deadline passed before the explanation finished")
        raise CallCancelled("the request was cancelled")
    if isinstance(outcome, Failed):
        raise _FAILURES[outcome.kind](outcome.message)
