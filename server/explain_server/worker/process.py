"""A model worker process: load and warm up one model, then serve jobs until told to stop.

Started by the front end with the ``spawn`` method (a fresh interpreter: forking a process
that runs gRPC's threads is unsafe). The worker ignores SIGINT and SIGTERM: the front end
decides when it stops (:class:`Stop` after draining), and a worker whose front end died sees
its connection close and exits.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection

import open_clip
import torch
from PIL import Image

from ..engine.explainer import NonFiniteError
from ..inputs import tokenize
from ..loading import LoadedModel, ModelLoadError, load_model
from ..model_spec import ModelSpec
from ..settings import BatchingConfig
from ..shapes import model as shapes_model
from ..tokenizers import CaptionTokenizer, ClipTokenizer
from .factor_cache import FactorCache
from .protocol import LoadFailed, ModelDescription, Ready
from .serve import serve

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSettings:
    """Everything one worker process needs (picklable: it crosses to the new process).

    Attributes:
        spec: the model.
        model_configs: open_clip config files to register before loading (``--model-config``).
        device: ``cpu`` or ``cuda:i``.
        dtype: the model's dtype name.
        memory_bytes, chunk_seconds: the engine's chunk budget (see ``ChunkBudget``).
        cache_bytes: the factor cache's size (0 disables it).
        batching: the dynamic batcher's settings.
        threads: torch intra-op threads.
        log_level: the ``explain_server`` logger's level.
    """

    spec: ModelSpec
    model_configs: tuple[str, ...]
    device: str
    dtype: str
    memory_bytes: int
    chunk_seconds: float | None
    cache_bytes: int
    batching: BatchingConfig
    threads: int
    log_level: str


def pad_label(tokenizer: CaptionTokenizer) -> str:
    """The label of padding rows: the tokenizer's own pad token, else ``<pad>`` (open_clip's CLIP
    tokenizer pads with id 0, whose text "!" would read as a word)."""
    if isinstance(tokenizer, ClipTokenizer):
        return "<pad>"
    return tokenizer.special_label(tokenizer.pad_id) or "<pad>"


def describe(loaded: LoadedModel) -> ModelDescription:
    """What the front end needs to know of ``loaded``: its towers' layers and padding come
    from the explainer's ``text`` and ``image`` towers."""
    text, image = loaded.explainer.text, loaded.explainer.image
    return ModelDescription(
        image_size=loaded.image_size,
        patch_size=loaded.patch_size,
        embed_dim=loaded.embed_dim,
        logit_scale=loaded.logit_scale,
        logit_bias=loaded.logit_bias,
        context_length=text.context_length,
        text_layer_list=tuple(text.layers),
        image_layer_list=tuple(image.layers),
        default_text_layer=loaded.default_text_layer,
        default_image_layer=loaded.default_image_layer,
        text_sees_padding=bool(text.sees_padding),
        pad_id=int(loaded.explainer.pad_id),
        pad_label=pad_label(loaded.tokenizer),
        preprocess_cfg=dataclasses.asdict(loaded.preprocess_cfg),
        device=str(loaded.device),
        dtype=loaded.dtype_name,
        load_seconds=loaded.load_seconds,
        default_method=loaded.default_method,
        default_n_steps=loaded.default_n_steps,
    )


def warm_up(loaded: LoadedModel) -> None:
    """One explanation at the default options: first-call allocations, the cached reference
    hidden states and the chunk budget's first timings are paid here, not by the first caller.

    Raises:
        ModelLoadError: the explanation is not finite in the model's dtype.
    """
    height, width = loaded.image_size
    pixels = loaded.transform(Image.new("RGB", (width, height), (128, 128, 128)))
    try:
        loaded.explainer.explain(
            tokenize(loaded.tokenizer, "a photo").token_ids,
            pixels,
            text_layer=loaded.default_text_layer,
            image_layer=loaded.default_image_layer,
            method=loaded.default_method,
            n_steps=loaded.default_n_steps,
        )
    except NonFiniteError as err:
        raise ModelLoadError(f"model {loaded.spec.name!r}: warm-up explanation failed: {err}") from err


def main(connection: Connection, settings: WorkerSettings) -> None:
    """The worker process's entry point; exits the process (1 when the model fails to load)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("explain_server").setLevel(settings.log_level.upper())
    torch.set_num_threads(settings.threads)
    code = 0
    try:
        for path in (shapes_model.CONFIG, *settings.model_configs):
            open_clip.add_model_config(path)
        loaded = load_model(
            settings.spec,
            device=torch.device(settings.device),
            dtype=settings.dtype,
            memory_bytes=settings.memory_bytes,
            chunk_seconds=settings.chunk_seconds,
        )
        warm_up(loaded)
        log.info(
            "warmed up model %s on %s (pid %d, %d thread(s))",
            settings.spec.name,
            settings.device,
            os.getpid(),
            settings.threads,
        )
        connection.send(Ready(describe(loaded)))
        serve(connection, settings.spec.name, loaded.explainer, FactorCache(settings.cache_bytes), settings.batching)
    except ModelLoadError as err:
        connection.send(LoadFailed(str(err)))
        code = 1
    except Exception as err:  # a bug while loading: the traceback goes to the log
        log.exception("worker for model %s failed", settings.spec.name)
        connection.send(LoadFailed(f"model {settings.spec.name!r}: the worker failed: {err!r}"))
        code = 1
    finally:
        logging.shutdown()
        sys.stderr.flush()
        # a batch thread may still be inside torch; interpreter finalization around a running
        # native thread aborts, so leave without it
        os._exit(code)
