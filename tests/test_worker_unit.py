"""The worker in-process against a fake explainer: its backend, its message loop, and the front end's view of it."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from multiprocessing import Pipe

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from inprocess import ThreadWorker

from explain_server.engine.attribution import Attribution
from explain_server.engine.explainer import Factor, NonFiniteError
from explain_server.engine.layers import Layer
from explain_server.metrics import Metrics
from explain_server.settings import BatchingConfig
from explain_server.worker.backend import ExplainBackend, QueuedJob
from explain_server.worker.factor_cache import FactorCache
from explain_server.worker.protocol import (
    Cancel,
    Dropped,
    Explained,
    Failed,
    Finished,
    JobSpec,
    ModelDescription,
    Ready,
    SideInput,
    SideKey,
    Stop,
    Submit,
    Tower,
)
from explain_server.worker.serve import serve
from explain_server.worker_pool import Backoff, WorkerInstance, WorkerLost

pytestmark = pytest.mark.unit

NON_FINITE = 13.0  # a text input holding this value makes combine() fail as float16 overflow would


class FakeExplainer:
    """Factors that are functions of a side's inputs and options alone; counts what it computes."""

    def __init__(self):
        self.text, self.image = object(), object()
        self.computed: list[tuple[str, float]] = []
        self.fail_on: float | None = None

    def factors(self, tower, sides):
        name = "text" if tower is self.text else "image"
        out = []
        for side in sides:
            if side.should_stop():
                out.append(None)
                continue
            value = float(side.inputs.double().sum()) + 10 * side.layer + side.n_steps
            if value == self.fail_on:
                raise RuntimeError("injected bug")
            self.computed.append((name, value))
            out.append(Factor(torch.full((2, 3), value), torch.ones(2, 2)))
        return out

    def combine(self, text: Factor, image: Factor) -> Attribution:
        t, v = float(text.matrix[0, 0]), float(image.matrix[0, 0])
        if t == NON_FINITE:
            raise NonFiniteError("overflow")
        return Attribution(np.full((2, 2), t * v), t * v, t, v, 1.0, 0.0)


def side(tower: Tower, value: float, layer: int = 0) -> SideInput:
    inputs = np.array([value], dtype=np.float64)
    return SideInput(SideKey(tower, layer, "gausslegendre", 3, f"{tower.value}-{value}-{layer}"), inputs)


def job(job_id: int, text: float, image: float, deadline: float | None = None) -> QueuedJob:
    return QueuedJob(JobSpec(job_id, side(Tower.TEXT, text), side(Tower.IMAGE, image), deadline, 0.0))


def backend(cache_bytes: int = 1 << 20) -> tuple[ExplainBackend, FakeExplainer, list]:
    reports: list = []
    explainer = FakeExplainer()
    return ExplainBackend(explainer, FactorCache(cache_bytes), reports.append), explainer, reports


def test_shared_and_cached_sides_are_computed_once_and_counted():
    run, explainer, reports = backend()
    outcomes = run.execute([job(0, 1, 5), job(1, 1, 6), job(2, 2, 5)])
    assert [o.attribution.score for o in outcomes] == [(1 + 3) * (5 + 3), (1 + 3) * (6 + 3), (2 + 3) * (5 + 3)]
    assert sorted(explainer.computed) == [("image", 8.0), ("image", 9.0), ("text", 4.0), ("text", 5.0)]
    (report,) = reports
    assert (report.size, report.cache_hits, report.cache_misses) == (
        3,
        {Tower.TEXT: 1, Tower.IMAGE: 1},
        {Tower.TEXT: 2, Tower.IMAGE: 2},
    )
    run.execute([job(3, 2, 6)])
    assert len(explainer.computed) == 4 and reports[1].cache_hits == {Tower.TEXT: 1, Tower.IMAGE: 1}


def test_stopped_jobs_are_dropped_and_a_non_finite_result_fails_only_its_job():
    run, explainer, _ = backend(cache_bytes=0)
    cancelled = job(1, 2, 6)
    cancelled.cancelled.set()
    outcomes = run.execute(
        [job(0, 1, 5, deadline=time.monotonic() - 1), cancelled, job(2, NON_FINITE - 3, 7), job(3, 4, 8)]
    )
    assert isinstance(outcomes[0], Dropped) and isinstance(outcomes[1], Dropped)
    assert isinstance(outcomes[2], Failed) and outcomes[2].kind == "non_finite"
    assert isinstance(outcomes[3], Explained) and outcomes[3].attribution.score == (4 + 3) * (8 + 3)
    assert ("text", 4.0) not in explainer.computed  # the stopped jobs' sides were never computed


@settings(max_examples=40, deadline=None)
@given(
    pairs=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4), st.booleans()), min_size=1, max_size=12),
    cache=st.booleans(),
)
def test_a_batch_answers_each_job_as_it_would_be_answered_alone(pairs, cache):
    """Drawn batches with repeated sides and stopped jobs: each outcome equals the job's solo outcome."""
    batch_run, _, _ = backend(cache_bytes=(1 << 20) if cache else 0)

    def make(i, t, v, stopped):
        queued = job(i, t, v)
        if stopped:
            queued.cancelled.set()
        return queued

    together = batch_run.execute([make(i, *p) for i, p in enumerate(pairs)])
    for i, (p, outcome) in enumerate(zip(pairs, together)):
        solo_run, _, _ = backend(cache_bytes=0)
        (alone,) = solo_run.execute([make(i, *p)])
        assert type(outcome) is type(alone)
        if isinstance(alone, Explained):
            assert outcome.attribution.score == alone.attribution.score


def serving_thread(explainer: FakeExplainer, batching: BatchingConfig):
    ours, theirs = Pipe()
    thread = threading.Thread(
        target=serve, args=(theirs, "fake", explainer, FactorCache(1 << 20), batching), daemon=True
    )
    thread.start()
    return ours, thread


def received(connection, count: int) -> dict[int, object]:
    """The next ``count`` job outcomes, by job id (other messages skipped)."""
    outcomes = {}
    while len(outcomes) < count:
        assert connection.poll(30), "no message from the worker"
        message = connection.recv()
        if isinstance(message, Finished):
            outcomes[message.job_id] = message.outcome
    return outcomes


def test_the_loop_answers_cancels_refuses_when_full_and_turns_bugs_into_internal(caplog):
    caplog.set_level(logging.INFO, logger="explain_server")
    explainer = FakeExplainer()
    explainer.fail_on = 9.0 + 3  # text value 9: its side raises inside the engine
    # a batch waits up to 300 s to fill to 4: the test decides when batches run
    connection, thread = serving_thread(
        explainer, BatchingConfig(max_batch_size=4, max_queue_delay_seconds=300, max_queue_size=4)
    )
    connection.send(Submit([job(0, 1, 5).spec, job(1, 9, 5).spec]))
    connection.send(Cancel([0]))
    connection.send(Submit([job(2, 2, 5).spec, job(3, 3, 5).spec, job(4, 4, 5).spec]))  # 5 > max_queue_size
    connection.send(Submit([job(5, 5, 5).spec, job(6, 6, 5).spec]))  # fills the batch of 4: it runs
    outcomes = received(connection, 7)
    assert isinstance(outcomes[0], Dropped)
    bug = outcomes[1]
    assert isinstance(bug, Failed) and bug.kind == "internal" and bug.error_id in bug.message
    assert [r for r in caplog.records if bug.error_id in r.getMessage() and r.exc_info]
    assert all(isinstance(outcomes[i], Failed) and outcomes[i].kind == "queue_full" for i in (2, 3, 4))
    assert [outcomes[i].attribution.score for i in (5, 6)] == [(5 + 3) * 8, (6 + 3) * 8]
    connection.send(Stop())
    thread.join(10)
    assert not thread.is_alive()


def dying_then_serving(explainer: FakeExplainer):
    """A launch whose first worker takes a job and ends without answering, as a killed process
    would; the workers after it serve."""
    launched = []

    def launch(connection):
        first = not launched
        launched.append(connection)

        def run():
            text = tuple(Layer(f"block {i}") for i in range(2))
            image = tuple(Layer(f"block {i}", (4, 4), ("cls",)) for i in range(2))
            description = ModelDescription(
                (64, 64), (16, 16), 8, 1.0, 77, text, image, 1, 1, False, 0, "<pad>", {}, "cpu", "float32", 0.0
            )
            connection.send(Ready(description))
            if first:
                assert connection.poll(30)
                connection.recv()
            else:
                serve(connection, "fake", explainer, FactorCache(1 << 20), BatchingConfig())
            connection.close()

        return ThreadWorker(run, exitcode_when_done=-9)

    return launch


def test_a_dead_worker_fails_its_jobs_with_worker_lost_and_restarts():
    metrics = Metrics()
    explainer = FakeExplainer()
    changes: list[bool] = []

    async def scenario():
        instance = WorkerInstance(
            "fake",
            0,
            dying_then_serving(explainer),
            metrics,
            on_change=lambda: changes.append(instance.ready),
            backoff=Backoff(initial=0.01),
        )
        instance.start()
        await instance.started()
        (lost,) = instance.submit([job(instance.next_job_id(), 1, 5).spec])
        with pytest.raises(WorkerLost):
            await lost
        for _ in range(3000):
            if instance.ready:
                break
            await asyncio.sleep(0.01)
        (answered,) = instance.submit([job(instance.next_job_id(), 2, 5).spec])
        outcome = await answered
        instance.request_stop()
        await asyncio.get_running_loop().run_in_executor(None, instance.wait_stopped, 10)
        return outcome, instance.ready

    outcome, ready_after_stop = asyncio.run(scenario())
    assert isinstance(outcome, Explained) and outcome.attribution.score == (2 + 3) * (5 + 3)
    assert metrics.registry.get_sample_value("explain_worker_restarts_total", {"model": "fake"}) == 1
    assert changes[0] is True and False in changes and not ready_after_stop  # not ready while down, nor after the stop
