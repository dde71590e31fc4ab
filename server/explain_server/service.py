"""The ``explain.v1.Explain`` gRPC service."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import grpc
import numpy as np
import torch
from explain_api import explain_pb2, explain_pb2_grpc

from .batching import DynamicBatcher, QueueFullError
from .cache import FactorCache, ImageEntry, TextEntry, digest
from .engine.attribution import Attribution, ExplanationCancelled
from .engine.explainer import NonFiniteError, Side
from .engine.quadrature import METHODS, min_n_steps
from .inputs import (
    CONVERSION_RULES, Caption, InputError, check_resize, crop_box, load_image, open_image, tokenize,
)
from .metrics import Metrics, abort_internal, cancellation_code
from .models import LoadedModel
from .registry import ModelRegistry
from .settings import BatchingConfig, Limits

log = logging.getLogger(__name__)

_MAX_REQUEST_ID = 128
# Preparing a request (tokenising, converting pixels) holds the GIL for most of its work, so
# more threads than this only take it from the models' batch threads; two let Pillow's
# GIL-free decoding of one image overlap the rest of another request.
_PREPARE_THREADS = 2


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
    minimum = min_n_steps(method)
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


@dataclass(frozen=True)
class _Prepared:
    """One side (caption or image) of a request, checked and ready for the model.

    Attributes:
        key: the factor cache key: side, layer, method, n_steps and a SHA-256 of the content.
        entry: the cached factor found while preparing, or None.
        inputs: token ids (S_t,) or normalised pixels (3, H, W); None when ``entry`` was found.
        extra: the caption (text) or the image size after EXIF orientation (image).
    """

    key: tuple
    entry: TextEntry | ImageEntry | None
    inputs: torch.Tensor | None
    extra: Caption | tuple[int, int]


class _Stop:
    """When work for a call should stop, shared by its handler and the thread doing the work."""

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


class _Job(_Stop):
    """One accepted explanation: its prepared sides and stop conditions, shared by its handler and the batch thread."""

    def __init__(
        self, loaded: LoadedModel, request_id: str, text: _Prepared, image: _Prepared, time_remaining: float | None,
        waited: float,
    ):
        super().__init__(time_remaining)
        self.loaded = loaded
        self.request_id = request_id  # the explanation's, as its response carries it
        self.text = text
        self.image = image
        self.waited = waited  # for a thread to prepare its call, seconds: part of its queue time
        self.enqueued = time.perf_counter()

    def queue_seconds(self, batch_started: float) -> float:
        """Seconds waited before the batch that started at ``batch_started``: for a thread, then in the queue."""
        return self.waited + batch_started - self.enqueued


@dataclass(frozen=True)
class _Result:
    image_size: tuple[int, int]
    caption: Caption
    attribution: Attribution
    queue_seconds: float
    compute_seconds: float


def _response(loaded: LoadedModel, request_id: str, options: Options, result: _Result) -> explain_pb2.ExplainResponse:
    caption, attribution = result.caption, result.attribution
    grid_h, grid_w = loaded.grid_size
    seq = len(caption.labels)
    grid = np.ascontiguousarray(attribution.interactions[:, 1:].reshape(seq, grid_h, grid_w), dtype="<f4")
    width, height = result.image_size
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
        timings=explain_pb2.Timings(queue_seconds=result.queue_seconds, compute_seconds=result.compute_seconds),
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


def _all_stop(jobs: list[_Job]) -> Callable[[], bool]:
    # a side shared by several requests is dropped only when none of them wants it any more
    return lambda: all(job.should_stop() for job in jobs)


class ExplainService(explain_pb2_grpc.ExplainServicer):
    """Serves explanations from the registry's models, each behind its own :class:`DynamicBatcher`.

    A batch's requests share every pass of the engine, and sides (caption or image) already in
    the model's factor cache, or needed by several requests of the batch, are computed once.
    """

    def __init__(self, registry: ModelRegistry, limits: Limits, batching: BatchingConfig, cache_bytes: int, metrics: Metrics):
        """Serve ``registry``'s models (loaded later) under ``limits``.

        Args:
            registry: the models.
            limits: request limits.
            batching: each model's dynamic batcher settings.
            cache_bytes: each model's factor cache size, bytes (0 disables caching).
            metrics: where to record.
        """
        self.registry = registry
        self.limits = limits
        self.metrics = metrics
        for spec in registry.specs:
            metrics.add_model(spec.name)
        self._caches = {spec.name: FactorCache(cache_bytes) for spec in registry.specs}
        self._preparing = ThreadPoolExecutor(_PREPARE_THREADS, thread_name_prefix="prepare")
        self._batchers = {
            spec.name: DynamicBatcher(spec.name, self._run_batch, batching, metrics.queue_depth.labels(spec.name).set)
            for spec in registry.specs
        }
        self.shutting_down = False
        self.grace_seconds = 0.0
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._grace_over = asyncio.Event()

    async def Explain(self, request: explain_pb2.ExplainRequest, context: grpc.aio.ServicerContext):
        """See proto/explain/v1/explain.proto."""

        async def explain(loaded: LoadedModel) -> explain_pb2.ExplainResponse:
            options, request_id = await self._options(request, loaded, context)
            (text,), (image,), waited = await self._prepare(
                loaded, options, [request.caption], [request.image], context, request_id, many=False
            )
            job = _Job(loaded, request_id, text, image, context.time_remaining(), waited)
            (result,) = await self._run(loaded, [job], context, request_id)
            return _response(loaded, request_id, options, result)

        return await self._observed("Explain", request.model, context, explain)

    async def ExplainMany(self, request: explain_pb2.ExplainManyRequest, context: grpc.aio.ServicerContext):
        """See proto/explain/v1/explain.proto."""

        async def explain_many(loaded: LoadedModel) -> explain_pb2.ExplainManyResponse:
            options, request_id = await self._options(request, loaded, context)
            images, captions = list(request.images), list(request.captions)
            count = max(len(images), len(captions))
            if not images or not captions or min(len(images), len(captions)) != 1:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"images, captions: send one image and several captions, or one caption and several images; "
                    f"got {len(images)} image(s) and {len(captions)} caption(s)",
                )
            if count > self.limits.max_explanations_per_call:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{'captions' if len(captions) > 1 else 'images'}: at most {self.limits.max_explanations_per_call} "
                    f"explanations per call; got {count}",
                )
            texts, pixels, waited = await self._prepare(loaded, options, captions, images, context, request_id, many=True)
            remaining = context.time_remaining()
            jobs = [
                _Job(
                    loaded, f"{request_id}/{i}", texts[0 if len(texts) == 1 else i],
                    pixels[0 if len(pixels) == 1 else i], remaining, waited,
                )
                for i in range(count)
            ]
            results = await self._run(loaded, jobs, context, request_id)
            return explain_pb2.ExplainManyResponse(
                explanations=[_response(loaded, job.request_id, options, r) for job, r in zip(jobs, results)]
            )

        return await self._observed("ExplainMany", request.model, context, explain_many)

    async def _observed(
        self, method: str, model: str, context: grpc.aio.ServicerContext, body: Callable[[LoadedModel], Awaitable[Any]]
    ):
        """Check the server can serve, resolve the model, run ``body``; count the call by its final code.

        An unexpected exception ends the call INTERNAL (:func:`abort_internal`), never UNKNOWN.
        """
        start = time.perf_counter()
        name = ""  # unknown models are not labels: callers choose those names
        code = grpc.StatusCode.OK
        try:
            await self._check_serving(context)
            loaded = self.registry.get(model)
            if loaded is None:
                await context.abort(
                    grpc.StatusCode.NOT_FOUND, f"model: no model named {model!r}; hosted: {', '.join(self.registry.models)}"
                )
            name = loaded.spec.name
            self._inflight += 1  # accepted: shutdown waits for it from here on
            self._idle.clear()
            try:
                return await body(loaded)
            finally:
                self._inflight -= 1
                if not self._inflight:
                    self._idle.set()
        except asyncio.CancelledError:  # the caller went away or its deadline passed
            code = cancellation_code(context)
            raise
        except grpc.aio.AbortError:  # the code the call was ended with
            code = context.code()
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            await abort_internal(context, self.metrics, name, method)
        finally:
            self.metrics.requests.labels(name, code.name).inc()
            if name:
                self.metrics.request_duration_seconds.labels(name).observe(time.perf_counter() - start)

    async def _options(self, request, loaded: LoadedModel, context: grpc.aio.ServicerContext) -> tuple[Options, str]:
        try:
            return resolve_options(request, loaded, self.limits), _request_id(request.request_id)
        except InputError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))

    async def _check_serving(self, context: grpc.aio.ServicerContext) -> None:
        if self.shutting_down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another replica")
        if not self.registry.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "models are loading; retry when health is SERVING")

    async def _run(self, loaded: LoadedModel, jobs: list[_Job], context: grpc.aio.ServicerContext, request_id: str) -> list[_Result]:
        """Queue ``jobs`` on the model's batcher and await them all; failures become gRPC statuses."""
        name = loaded.spec.name
        try:
            futures = self._batchers[name].submit(jobs)
        except QueueFullError as err:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"model {name}: {err}")
        inflight = self.metrics.inflight_requests.labels(name)
        inflight.inc(len(jobs))
        try:
            grace_over = asyncio.ensure_future(self._grace_over.wait())
            # every outcome is collected, so that no failure goes unretrieved
            gathered = asyncio.gather(*futures, return_exceptions=True)
            try:
                done, _ = await asyncio.wait({gathered, grace_over}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                grace_over.cancel()
            if gathered not in done:
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the server shut down before this request finished (grace period {self.grace_seconds:g} s); "
                    "retry on another replica",
                )
            results = gathered.result()
            failure = next((r for r in results if isinstance(r, Exception)), None)
            if failure is not None:
                raise failure
        except NonFiniteError as err:
            # The served dtype cannot represent this computation: a server configuration limit,
            # not a malformed request and not a broken invariant.
            log.error("request %s: %s (model %s)", request_id, err, name)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"model {name}: {err}")
        except ExplanationCancelled:
            if any(job.expired for job in jobs):
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the explanation finished")
            await context.abort(grpc.StatusCode.CANCELLED, "the request was cancelled")
        except asyncio.CancelledError:
            code = cancellation_code(context)
            for job in jobs:
                job.stop_code = code
            raise
        finally:
            for job in jobs:
                job.cancelled.set()  # a caller that went away stops its work at the next chunk
            inflight.dec(len(jobs))
        for job, result in zip(jobs, results):
            log.info(
                "request %s model=%s tokens=%d queue=%.3fs compute=%.3fs",
                job.request_id, name, len(result.caption.labels), result.queue_seconds, result.compute_seconds,
            )
        return results

    def _drop(self, job: _Job) -> ExplanationCancelled:
        self.metrics.requests_dropped.labels(job.loaded.spec.name, job.code().name).inc()
        return ExplanationCancelled()

    async def _prepare(
        self, loaded: LoadedModel, options: Options, captions: list[str], images: list[bytes],
        context: grpc.aio.ServicerContext, request_id: str, many: bool,
    ) -> tuple[list[_Prepared], list[_Prepared], float]:
        """Tokenise the captions and decode the images not already in the cache, on a worker thread.

        Decoding runs beside the model's batch thread (Pillow releases the GIL), on a small
        pool of its own, so a batch's compute never waits for its requests' decoding. A call
        that ends (deadline passed, or cancelled) stops decoding at its next image, so that it
        does not keep a thread from the calls waiting for one.

        Returns:
            The prepared captions and images, and the seconds the call waited for a thread.

        Aborts with INVALID_ARGUMENT naming the field (``caption``, or ``captions[i]`` /
        ``images[i]`` for ExplainMany; ``images`` or ``image`` for the per-call pixel limit),
        or DEADLINE_EXCEEDED once the deadline passed.
        """
        cache = self._caches[loaded.spec.name]
        stop = _Stop(context.time_remaining())
        submitted = time.perf_counter()

        def prepare() -> tuple[list[_Prepared], list[_Prepared], float]:
            waited = time.perf_counter() - submitted
            texts = []
            for index, caption in enumerate(captions):
                try:
                    texts.append(self._prepare_text(loaded, options, caption, cache))
                except InputError as err:
                    raise err.renamed({"caption": f"captions[{index}]"} if many else {})
            return texts, self._prepare_images(loaded, options, images, cache, stop, request_id, many), waited

        work = self._preparing.submit(prepare)
        try:
            return await asyncio.wrap_future(work)
        except InputError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except ExplanationCancelled:  # the server's clock ran out first; a cancelled handler is gone
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed while its images were being decoded")
        except asyncio.CancelledError:
            stop.stop_code = cancellation_code(context)
            stop.cancelled.set()
            if work.cancel():  # it never got a thread; once running, it stops at its next image
                self._skip_images(loaded, request_id, stop, len(images), len(images))
            raise

    @staticmethod
    def _prepare_text(loaded: LoadedModel, o: Options, text: str, cache: FactorCache) -> _Prepared:
        caption = tokenize(loaded.tokenizer, text)
        key = ("text", o.text_layer, o.method, o.n_steps, digest(caption.token_ids.numpy().tobytes()))
        entry = cache.get(key)
        return _Prepared(key, entry, caption.token_ids if entry is None else None, caption)

    def _prepare_images(
        self, loaded: LoadedModel, o: Options, images: list[bytes], cache: FactorCache, stop: _Stop, request_id: str,
        many: bool,
    ) -> list[_Prepared]:
        """A call's images, on a prepare thread: sizes checked from the headers, then decoded one by one.

        Raises:
            InputError: an image breaks a rule (``image`` / ``images[i]``), or all together
                have more than ``max_pixels_per_call`` pixels (``image`` / ``images``).
            ExplanationCancelled: ``stop`` turned true before every image was decoded.
        """
        keys = [("image", o.image_layer, o.method, o.n_steps, digest(data)) for data in images]
        entries = [cache.get(key) for key in keys]
        opened, pixels = [], 0
        for index, (data, entry) in enumerate(zip(images, entries)):
            try:
                # a cached entry's bytes were decoded and checked when it was made
                image = None if entry is not None else open_image(data, self.limits.image)
            except InputError as err:
                raise err.renamed({"image": f"images[{index}]"} if many else {})
            opened.append(image)
            width, height = entry.image_size if image is None else image.size
            pixels += width * height
        if pixels > self.limits.max_pixels_per_call:
            raise InputError(
                "images" if many else "image",
                f"{len(images)} image(s) of {pixels} pixels in all; the limit is {self.limits.max_pixels_per_call} "
                "pixels per call (send fewer or smaller images per call)",
            )
        prepared = []
        for index, (data, key, entry, image) in enumerate(zip(images, keys, entries, opened)):
            if entry is not None:
                prepared.append(_Prepared(key, entry, None, entry.image_size))
                continue
            if stop.should_stop():
                self._skip_images(loaded, request_id, stop, len(images) - index, len(images))
                raise ExplanationCancelled()
            try:
                decoded = load_image(image, data)
                check_resize(*decoded.size, loaded.preprocess_cfg, self.limits.image)
            except InputError as err:
                raise err.renamed({"image": f"images[{index}]"} if many else {})
            prepared.append(_Prepared(key, None, loaded.transform(decoded), decoded.size))
        return prepared

    def _skip_images(self, loaded: LoadedModel, request_id: str, stop: _Stop, skipped: int, total: int) -> None:
        code = stop.code()
        self.metrics.images_skipped.labels(loaded.spec.name, code.name).inc(skipped)
        log.info(
            "request %s model=%s: ended (%s) with %d of its %d image(s) not decoded; skipped them",
            request_id, loaded.spec.name, code.name, skipped, total,
        )

    def _run_batch(self, jobs: list[_Job]) -> list:
        """One batch on the model's batcher thread: one outcome per job, a :class:`_Result` or an exception.

        A job's failure (bad input, non-finite result, stop) is its own; the others go on.
        """
        started = time.perf_counter()
        loaded = jobs[0].loaded  # a batcher serves one model
        name, m, cache = loaded.spec.name, self.metrics, self._caches[loaded.spec.name]
        m.batch_size.labels(name).observe(len(jobs))
        outcomes: list = [None] * len(jobs)
        need: dict[str, dict[tuple, list[_Job]]] = {"text": {}, "image": {}}
        inputs: dict[tuple, _Prepared] = {}  # side key -> a prepared side to compute
        entries: dict[tuple, TextEntry | ImageEntry] = {}  # side key -> computed or cached side
        live: list[int] = []
        for index, job in enumerate(jobs):
            if job.should_stop():  # cancelled or expired while queued: no work at all
                outcomes[index] = self._drop(job)
                continue
            live.append(index)
            for tower, side in (("text", job.text), ("image", job.image)):
                # the cache may have gained the side since the request was prepared
                entry = entries.get(side.key) or side.entry or cache.get(side.key)
                outcome = "hits" if entry is not None or side.key in need[tower] else "misses"
                getattr(m, f"{tower}_factor_cache_{outcome}").labels(name).inc()
                if entry is not None:
                    entries[side.key] = entry
                elif side.key not in inputs:
                    inputs[side.key] = side
                need[tower].setdefault(side.key, []).append(job)
        for tower, entry_type in (("text", TextEntry), ("image", ImageEntry)):
            todo = [key for key in need[tower] if key not in entries]
            sides = [Side(inputs[key].inputs, key[1], key[2], key[3], _all_stop(need[tower][key])) for key in todo]
            for key, factor in zip(todo, loaded.explainer.factors(tower, sides) if todo else []):
                if factor is not None:
                    entries[key] = entry_type(factor, inputs[key].extra)
                    cache.put(key, entries[key])
        m.factor_cache_bytes.labels(name).set(cache.nbytes)
        finished = time.perf_counter()
        for index in live:
            job = jobs[index]
            # observed here, once the batch has not raised: a batch that raises is run again
            m.queue_wait_seconds.labels(name).observe(job.queue_seconds(started))
            text_key, image_key = job.text.key, job.image.key
            if job.should_stop() or text_key not in entries or image_key not in entries:
                outcomes[index] = self._drop(job)
                continue
            try:
                attribution = loaded.explainer.combine(entries[text_key].factor, entries[image_key].factor)
            except NonFiniteError as err:
                outcomes[index] = err
                continue
            m.compute_seconds.labels(name).observe(finished - started)
            m.similarity_score.labels(name).observe(attribution.score)
            m.convergence_delta_abs.labels(name).observe(abs(attribution.convergence_delta))
            outcomes[index] = _Result(
                entries[image_key].image_size, entries[text_key].caption, attribution,
                job.queue_seconds(started), finished - started,
            )
        return outcomes

    async def ListModels(self, request: explain_pb2.ListModelsRequest, context: grpc.aio.ServicerContext):
        """See proto/explain/v1/explain.proto. A bug here is answered INTERNAL by :class:`GrpcMetricsInterceptor`."""
        await self._check_serving(context)
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
        """Stop the batchers after their queued work; abandoned work ends at its next chunk or with the process."""
        for batcher in self._batchers.values():
            batcher.close()
        self._preparing.shutdown(wait=False)
