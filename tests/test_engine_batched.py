"""Randomised tests of the batched engine: every side of a drawn batch equals its solo computation.

Hypothesis draws batches of 1 to 12 sides on either tower, with captions of any length the
context allows, any layer, quadrature rule and node count, stop checks that fire before the
work or after any number of polls, and memory budgets small enough to split the batch into
many groups and chunks. Each side's factor must equal the side computed alone (unpadded, with
an ample budget): within 1e-9 relative in float64 and 1e-5 in float32. A side comes back None
exactly when its stop check returned true.

The CI profile draws few examples; ``pytest --hypothesis-profile thorough`` draws many more.
``EXPLAIN_TEST_DEVICE=cuda`` runs them on a GPU (benchmarks/gpu/run.sh).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
from conftest import TINY, seeded_model
from hypothesis import given
from hypothesis import strategies as st

from explain_server.engine.attribution import ChunkBudget, PathIntegral, forward_costs, forward_factors, reverse_factors
from explain_server.engine.explainer import Explainer, Side
from explain_server.engine.quadrature import METHODS, min_n_steps, nodes_and_weights

CONTEXT = 77  # the tiny model's text context: start and end token included
LAYERS = 2  # blocks per tower of the tiny model
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5}
AMPLE = 1 << 40
DEVICE = torch.device(os.environ.get("EXPLAIN_TEST_DEVICE", "cpu"))


@pytest.fixture(scope="module", params=[torch.float64, torch.float32], ids=["float64", "float32"])
def explainer(request) -> Explainer:
    model = seeded_model(TINY).to(DEVICE, request.param).requires_grad_(False)
    # ids of the tiny model's tokenizer (open_clip's CLIP BPE)
    return Explainer.for_clip(model, sot_token_id=49406, eot_token_id=49407, budget=ChunkBudget(AMPLE))


class StopAfter:
    """A stop check that returns true from its ``polls``-th call on (0: at once); None never stops."""

    def __init__(self, polls: int | None):
        self.polls = polls
        self.calls = 0
        self.fired = False

    def __call__(self) -> bool:
        self.calls += 1
        if self.polls is not None and self.calls > self.polls:
            self.fired = True
        return self.fired


@dataclass
class DrawnSide:
    tower: str
    seed: int
    length: int  # tokens with start and end (text); unused for images
    layer: int
    method: str
    n_steps: int
    stop_after: int | None

    def inputs(self, explainer: Explainer) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        if self.tower == "text":
            # ids below the merges' start are single bytes: any sequence of them is a caption
            body = torch.randint(1, 256, (self.length - 2,), generator=generator)
            return torch.cat([torch.tensor([49406]), body, torch.tensor([49407])]).to(DEVICE)
        height, width = explainer.image.visual.image_size
        return torch.randn((3, height, width), generator=generator, dtype=explainer.dtype).to(DEVICE)


@st.composite
def sides(draw, tower: str | None = None, layer: int | None = None) -> DrawnSide:
    method = draw(st.sampled_from(METHODS))
    return DrawnSide(
        tower=tower or draw(st.sampled_from(["text", "image"])),
        seed=draw(st.integers(0, 2**16)),
        length=draw(st.integers(3, CONTEXT)),
        layer=draw(st.integers(0, LAYERS - 1)) if layer is None else layer,
        method=method,
        n_steps=draw(st.integers(min_n_steps(method), 4)),
        stop_after=draw(st.one_of(st.none(), st.none(), st.integers(0, 12))),
    )


def assert_equal_to_solo(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == want.shape
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance * float(want.abs().max()))


def check_stops(drawn: list[DrawnSide], stops: list[StopAfter], results: list) -> list[int]:
    """A side is None exactly when its stop check fired; returns the indices that must equal solo."""
    for side, stop, result in zip(drawn, stops, results):
        assert (result is None) == stop.fired, (side, stop.calls)
        if side.stop_after == 0:
            assert result is None
    return [i for i, result in enumerate(results) if result is not None]


def batches(tower: str | None = None, layer: int | None = None):
    """1 to 12 sides, the count drawn uniformly (a bare list strategy favours short lists)."""
    return st.integers(1, 12).flatmap(lambda n: st.lists(sides(tower, layer), min_size=n, max_size=n))


# Memory budgets in dense rows (one (S, d) activation per row): from a single row, which
# splits every pass into single columns and nodes, to enough for most batches in one pass.
ROWS = st.integers(0, 14).map(lambda bits: 1 << bits)


@pytest.mark.slow
@given(
    tower=st.sampled_from(["text", "image"]),
    layer=st.integers(0, LAYERS - 1),
    mode=st.sampled_from([forward_factors, reverse_factors]),
    data=st.data(),
    rows=ROWS,
)
def test_factor_passes_equal_each_integral_alone(explainer, tower, layer, mode, data, rows):
    """forward_factors and reverse_factors on one padded batch of path integrals."""
    drawn = data.draw(batches(tower, layer), label="sides")
    tower_ = getattr(explainer, tower)
    inputs = [side.inputs(explainer) for side in drawn]
    with torch.no_grad():
        if tower == "text":
            hidden = tower_.lower(torch.nn.utils.rnn.pad_sequence(inputs, batch_first=True), layer)
        else:
            hidden = tower_.lower(torch.stack(inputs), layer)
        reference = explainer._reference(tower_, layer)
        seq, width = hidden.shape[1:]
        stops = [StopAfter(side.stop_after) for side in drawn]
        lengths = [len(x) if tower == "text" else seq for x in inputs]
        integrals = [
            PathIntegral(h, reference[:seq], *nodes_and_weights(side.method, side.n_steps), stop, length)
            for h, side, stop, length in zip(hidden, drawn, stops, lengths)
        ]
        results = mode(tower_, layer, integrals, ChunkBudget(rows * seq * width * hidden.element_size()))
        for i in check_stops(drawn, stops, results):
            own = hidden[i : i + 1, : lengths[i]] if tower == "text" else hidden[i : i + 1]
            alone = PathIntegral(
                own[0], reference[: own.shape[1]], *nodes_and_weights(drawn[i].method, drawn[i].n_steps)
            )
            (want,) = mode(tower_, layer, [alone], ChunkBudget(AMPLE))
            assert_equal_to_solo(results[i], want, explainer.dtype)


@pytest.mark.slow
@given(drawn=batches(), rows=ROWS)
def test_explainer_batches_equal_each_side_alone(explainer, drawn, rows):
    """Explainer.factors on a mixed batch (layers, rules, lengths, stops): factors and endpoints."""
    budget = explainer.budget
    explainer.budget = ChunkBudget(rows * CONTEXT * explainer.text.blocks[0].attn.embed_dim * explainer.dtype.itemsize)
    try:
        for tower in ("text", "image"):
            mine = [side for side in drawn if side.tower == tower]
            stops = [StopAfter(side.stop_after) for side in mine]
            batch = [
                Side(side.inputs(explainer), side.layer, side.method, side.n_steps, stop)
                for side, stop in zip(mine, stops)
            ]
            results = explainer.factors(getattr(explainer, tower), batch)
            explainer.budget, saved = ChunkBudget(AMPLE), explainer.budget
            for i in check_stops(mine, stops, results):
                (want,) = explainer.factors(
                    getattr(explainer, tower), [Side(batch[i].inputs, mine[i].layer, mine[i].method, mine[i].n_steps)]
                )
                assert_equal_to_solo(results[i].matrix, want.matrix, explainer.dtype)
                assert_equal_to_solo(results[i].endpoints, want.endpoints, explainer.dtype)
            explainer.budget = saved
    finally:
        explainer.budget = budget


@pytest.mark.unit
@pytest.mark.parametrize("lengths", [(3, 4, 5), (3, 5, 4)])
def test_captions_leaving_a_pass_one_after_another(explainer, lengths):
    """What hypothesis shrank the first failures to: three captions of 1-3 words leave a
    forward pass at three different columns. The second departure used to pick the weights of
    the wrong rows: an IndexError for (3, 4, 5), silently wrong factors for (3, 5, 4)."""
    drawn = [DrawnSide("text", 0, length, 1, "riemann_right", 1, None) for length in lengths]
    inputs = [side.inputs(explainer) for side in drawn]
    alphas, weights = nodes_and_weights("riemann_right", 1)
    with torch.no_grad():
        hidden = explainer.text.lower(torch.nn.utils.rnn.pad_sequence(inputs, batch_first=True), 1)
        reference = explainer._reference(explainer.text, 1)
        seq, width = hidden.shape[1:]
        integrals = [PathIntegral(h, reference[:seq], alphas, weights, length=n) for h, n in zip(hidden, lengths)]
        results = forward_factors(explainer.text, 1, integrals, ChunkBudget(64 * seq * width * hidden.element_size()))
        for got, ids in zip(results, inputs):
            alone = PathIntegral(explainer.text.lower(ids[None], 1)[0], reference[: len(ids)], alphas, weights)
            assert_equal_to_solo(
                got, forward_factors(explainer.text, 1, [alone], ChunkBudget(AMPLE))[0], explainer.dtype
            )


class LoggedBudget(ChunkBudget):
    """A time budget of a fixed number of multiply-adds (so that plans do not depend on this
    machine's speed) that logs every chunk's multiply-adds beside every poll of the stop checks."""

    def __init__(self, memory_bytes: int, max_flops: float, events: list):
        super().__init__(memory_bytes, seconds=1.0)
        self.fixed = max_flops
        self.events = events

    def max_flops(self) -> float:
        return self.fixed

    def record(self, flops: float, seconds: float) -> None:
        self.events.append(("pass", flops))


@pytest.mark.unit
@pytest.mark.parametrize("overhead, seconds", [(0.0, 0.25), (0.01, 0.25), (0.1, 0.5), (2.0, 10.0)])
def test_the_time_budget_fits_overhead_and_rate(overhead, seconds):
    """Chunks timed at ``overhead + 1e-9 s per multiply-add``: a 0.25 s budget leaves room for
    the overhead, but a chunk never shrinks until the overhead takes more than a fifth of it:
    the next chunk is planned to take ``seconds``."""
    budget = ChunkBudget(AMPLE, seconds=0.25)
    assert budget.max_flops() == 0.0  # nothing timed yet: the smallest chunk
    for flops in (1e6, 4e6, 3e7, 2e8, 1e8, 5e7):
        budget.record(flops, overhead + 1e-9 * flops)
    assert overhead + 1e-9 * budget.max_flops() == pytest.approx(seconds, rel=1e-6)
    assert ChunkBudget(AMPLE).max_flops() == float("inf")  # no time budget


@pytest.mark.unit
@pytest.mark.parametrize("mode", [forward_factors, reverse_factors])
@pytest.mark.parametrize("tower", ["text", "image"])
def test_a_time_budget_bounds_every_pass_and_stopped_work_ends_at_the_next_poll(explainer, mode, tower):
    """With a time budget no pass exceeds it (beyond the smallest pass there is: one node and
    one column, or one pullback), and once every integral's stop check has fired no further
    pass runs: a cancelled request keeps the model busy for at most one pass."""
    events: list = []

    def stops_at_poll(n: int, who: int):
        polls = {"n": 0}

        def check() -> bool:
            polls["n"] += 1
            events.append(("poll", who, polls["n"] >= n))
            return polls["n"] >= n

        return check

    tower_ = getattr(explainer, tower)
    inputs = [DrawnSide(tower, seed, 40, 0, "gausslegendre", 4, None).inputs(explainer) for seed in range(3)]
    with torch.no_grad():
        batch = torch.stack(inputs) if tower == "image" else torch.nn.utils.rnn.pad_sequence(inputs, batch_first=True)
        hidden = tower_.lower(batch, 0)
        reference = explainer._reference(tower_, 0)[: hidden.shape[1]]
        alphas, weights = nodes_and_weights("gausslegendre", 4)
        integrals = [
            PathIntegral(h, reference, alphas, weights, stops_at_poll(4 + 2 * i, i)) for i, h in enumerate(hidden)
        ]
        primal, column = forward_costs(tower_, 0, hidden.shape[1])
        smallest, max_flops = (
            (primal + column, 2 * (primal + 5 * column)) if mode is forward_factors else (2 * primal, 12 * primal)
        )
        results = mode(tower_, 0, integrals, LoggedBudget(AMPLE, max_flops, events))
    assert results == [None, None, None]
    passes = [event[1] for event in events if event[0] == "pass"]
    assert len(passes) > 3 and all(flops <= max(max_flops, smallest) for flops in passes)
    last_fired = max(next(i for i, e in enumerate(events) if e == ("poll", who, True)) for who in range(3))
    assert all(event[0] == "poll" for event in events[last_fired:])
