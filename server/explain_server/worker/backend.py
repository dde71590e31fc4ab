"""The worker's backend: ``execute(jobs) -> one outcome per job``, after Triton's backend contract.

A batch's jobs share every pass of the engine. Sides (caption or image) already in the
factor cache, or needed by several jobs of the batch, are computed once.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..engine.explainer import Explainer, Factor, NonFiniteError, Side
from .factor_cache import FactorCache
from .protocol import BatchReport, Dropped, Explained, Failed, JobSpec, Outcome, SideKey, Tower


@dataclass
class QueuedJob:
    """A job as the worker holds it: its spec, and what stops it.

    Attributes:
        spec: what to compute.
        cancelled: set when the front end no longer awaits the job.
        enqueued: ``time.perf_counter()`` when the worker queued it.
    """

    spec: JobSpec
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)

    def should_stop(self) -> bool:
        """Cancelled, or past its deadline."""
        deadline = self.spec.deadline
        return self.cancelled.is_set() or (deadline is not None and time.monotonic() > deadline)

    def queue_seconds(self, batch_started: float) -> float:
        """Seconds waited before the batch that started at ``batch_started``, the front end's wait included."""
        return self.spec.waited + batch_started - self.enqueued


def _all_stop(jobs: list[QueuedJob]) -> Callable[[], bool]:
    # a side shared by several jobs is dropped only when none of them wants it any more
    return lambda: all(job.should_stop() for job in jobs)


class ExplainBackend:
    """Runs batches of jobs on one model's explainer, with the model's factor cache."""

    def __init__(self, explainer: Explainer, cache: FactorCache, report: Callable[[BatchReport], None]):
        """Compute with ``explainer``, keep factors in ``cache``, and hand each batch's :class:`BatchReport` to ``report``."""
        self.explainer = explainer
        self.cache = cache
        self._report = report

    def execute(self, jobs: list[QueuedJob]) -> list[Outcome]:
        """One batch: one outcome per job, in order.

        A job's own failure (a non-finite result, a stop) is its outcome; the others go on.
        An exception escaping this method is a bug (the batcher then runs each job alone).
        """
        started = time.perf_counter()
        hits = dict.fromkeys(Tower, 0)
        misses = dict.fromkeys(Tower, 0)
        try:
            outcomes: list[Outcome | None] = [None] * len(jobs)
            need: dict[Tower, dict[SideKey, list[QueuedJob]]] = {tower: {} for tower in Tower}
            inputs: dict[SideKey, torch.Tensor] = {}
            factors: dict[SideKey, Factor] = {}
            live: list[int] = []
            for index, job in enumerate(jobs):
                if job.should_stop():  # cancelled or expired while queued: no work at all
                    outcomes[index] = Dropped()
                    continue
                live.append(index)
                for side in (job.spec.text, job.spec.image):
                    key = side.key
                    factor = factors.get(key) or self.cache.get(key)
                    if factor is not None or key in need[key.tower]:
                        hits[key.tower] += 1
                    else:
                        misses[key.tower] += 1
                    if factor is not None:
                        factors[key] = factor
                    elif key not in inputs:
                        inputs[key] = torch.from_numpy(side.inputs)
                    need[key.tower].setdefault(key, []).append(job)
            for tower in Tower:
                todo = [key for key in need[tower] if key not in factors]
                if not todo:
                    continue
                sides = [Side(inputs[k], k.layer, k.method, k.n_steps, _all_stop(need[tower][k])) for k in todo]
                engine_tower = self.explainer.text if tower is Tower.TEXT else self.explainer.image
                for key, factor in zip(todo, self.explainer.factors(engine_tower, sides)):
                    if factor is not None:
                        factors[key] = factor
                        self.cache.put(key, factor)
            finished = time.perf_counter()
            for index in live:
                job = jobs[index]
                text_key, image_key = job.spec.text.key, job.spec.image.key
                if job.should_stop() or text_key not in factors or image_key not in factors:
                    outcomes[index] = Dropped()
                    continue
                try:
                    attribution = self.explainer.combine(factors[text_key], factors[image_key])
                except NonFiniteError as err:
                    outcomes[index] = Failed("non_finite", str(err))
                    continue
                outcomes[index] = Explained(attribution, job.queue_seconds(started), finished - started)
            return outcomes
        finally:
            # a batch that raises is reported too: its jobs are run again alone, as batches of their own
            self._report(BatchReport(len(jobs), hits, misses, self.cache.nbytes))
