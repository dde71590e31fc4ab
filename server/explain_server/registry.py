"""The set of hosted models: loading and warm-up at start, lookup by name."""

from __future__ import annotations

import logging

import torch
from PIL import Image

from .engine.explainer import NonFiniteError
from .inputs import tokenize
from .model_spec import ModelSpec
from .models import LoadedModel, ModelLoadError, load_model

log = logging.getLogger(__name__)


class ModelRegistry:
    """Hosted models by name. Not ``ready`` until every configured model is loaded and warmed up."""

    def __init__(
        self, specs: list[ModelSpec], default_model: str, *, device: torch.device, dtype: str, memory_bytes: int,
        chunk_seconds: float | None = None,
    ):
        """Record what to host; nothing is loaded until :meth:`load_all`.

        Raises:
            ValueError: no models, duplicate names, or ``default_model`` not among them.
        """
        names = [s.name for s in specs]
        if not specs:
            raise ValueError("at least one --model is required")
        if len(set(names)) != len(names):
            raise ValueError(f"--model names must be unique; got {names}")
        if default_model not in names:
            raise ValueError(f"--default-model {default_model!r} is not one of the configured models {names}")
        self.specs = specs
        self.default_model = default_model
        self.device, self.dtype = device, dtype
        self.memory_bytes, self.chunk_seconds = memory_bytes, chunk_seconds
        self.models: dict[str, LoadedModel] = {}
        self.ready = False

    def load_all(self) -> None:
        """Load and warm up every model (blocking; run it off the event loop).

        Raises:
            ModelLoadError: a model failed to load or to explain a warm-up pair; the message names it.
        """
        for spec in self.specs:
            loaded = load_model(
                spec, device=self.device, dtype=self.dtype, memory_bytes=self.memory_bytes, chunk_seconds=self.chunk_seconds
            )
            try:
                _warm_up(loaded)
            except NonFiniteError as err:
                raise ModelLoadError(f"model {spec.name!r}: warm-up explanation failed: {err}") from err
            self.models[spec.name] = loaded
        self.ready = True

    def get(self, name: str) -> LoadedModel | None:
        """The model called ``name`` (empty = the default), or None."""
        return self.models.get(name or self.default_model)


def _warm_up(loaded: LoadedModel) -> None:
    """One explanation at the default options: first-call allocations, the cached reference
    hidden states and the chunk budget's first timings are paid here, not by the first caller."""
    height, width = loaded.image_size
    pixels = loaded.transform(Image.new("RGB", (width, height), (128, 128, 128)))
    loaded.explainer.explain(
        tokenize(loaded.tokenizer, "a photo").token_ids,
        pixels,
        text_layer=loaded.default_text_layer,
        image_layer=loaded.default_image_layer,
        method=loaded.default_method,
        n_steps=loaded.default_n_steps,
    )
    log.info("warmed up model %s", loaded.spec.name)
