"""The hosted models as the front end sees them: their workers, tokenizers and preprocessing."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable

from open_clip.transform import PreprocessCfg, image_transform_v2

from .loading import ModelLoadError
from .model_spec import ModelSpec
from .tokenizers import CaptionTokenizer, spec_tokenizer
from .worker.protocol import ModelDescription
from .worker_pool import ModelWorkers


@dataclass
class ServedModel:
    """One hosted model: its spec, its workers, and once they started, what the front end needs to prepare inputs."""

    spec: ModelSpec
    workers: ModelWorkers
    description: ModelDescription | None = None
    tokenizer: CaptionTokenizer | None = None
    preprocess_cfg: PreprocessCfg | None = None
    transform: Callable | None = field(default=None, repr=False)

    def describe(self, description: ModelDescription) -> None:
        """Take the first ready worker's description and build the tokenizer and preprocessing from it."""
        self.description = description
        self.tokenizer = spec_tokenizer(self.spec, description.context_length)
        self.preprocess_cfg = PreprocessCfg(**description.preprocess_cfg)
        self.transform = image_transform_v2(self.preprocess_cfg, is_train=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def default_text_layer(self) -> int:
        return self.description.default_text_layer

    @property
    def default_image_layer(self) -> int:
        return self.description.default_image_layer

    @property
    def default_method(self) -> str:
        return self.spec.method

    @property
    def default_n_steps(self) -> int:
        return self.spec.n_steps


class ModelRegistry:
    """Hosted models by name. Not ``ready`` until every model has a worker that takes jobs."""

    def __init__(self, models: list[ServedModel], default_model: str):
        """Record what to host (unique names, ``default_model`` among them); nothing starts until :meth:`start`."""
        self.models = {m.name: m for m in models}
        self.default_model = default_model
        self.started = False

    @property
    def specs(self) -> list[ModelSpec]:
        return [m.spec for m in self.models.values()]

    @property
    def ready(self) -> bool:
        """Every model has started and has a worker taking jobs now."""
        return self.started and all(m.workers.ready for m in self.models.values())

    async def start(self) -> None:
        """Start every worker and wait until each has loaded and warmed up its model (on the event loop).

        Raises:
            ModelLoadError: a worker could not load its model; the message names it.
        """
        instances = [instance for m in self.models.values() for instance in m.workers.instances]
        for instance in instances:
            instance.start()
        await asyncio.gather(*(instance.started() for instance in instances))
        for m in self.models.values():
            for instance in m.workers.instances:
                if instance.failure is not None:
                    raise ModelLoadError(f"model {m.name!r} worker {instance.index}: {instance.failure}")
            m.describe(m.workers.instances[0].description)
        self.started = True

    def get(self, name: str) -> ServedModel | None:
        """The model called ``name`` (empty = the default), or None."""
        return self.models.get(name or self.default_model)

    def stop(self, timeout: float) -> None:
        """Stop every worker after its queued jobs, killing those that take longer than ``timeout`` seconds. Blocking."""
        instances = [instance for m in self.models.values() for instance in m.workers.instances]
        for instance in instances:
            instance.request_stop()
        deadline = time.monotonic() + timeout
        for instance in instances:
            instance.wait_stopped(max(0.0, deadline - time.monotonic()))
