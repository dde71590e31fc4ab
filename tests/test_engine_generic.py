"""The generic engine path (engine/generic.py) equals the fast path where both apply, in any batch."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from conftest import TINY, seeded_model
from hypothesis import given, settings
from hypothesis import strategies as st
from scaled_models import add_scaled_architecture

from explain_server.engine import generic
from explain_server.engine.attribution import FACTORS, ChunkBudget, PathIntegral
from explain_server.engine.explainer import Explainer, Side
from explain_server.engine.families import split_towers
from explain_server.engine.quadrature import METHODS, nodes_and_weights
from explain_server.engine.split import PoolSplit

pytestmark = pytest.mark.unit

AMPLE = 1 << 30


@pytest.fixture(scope="module")
def tiny64():
    return seeded_model(TINY).double().requires_grad_(False)


def explainer(model, fast: bool, memory: int = AMPLE) -> Explainer:
    tok = open_clip.get_tokenizer(TINY)
    return Explainer.for_clip(
        model, sot_token_id=tok.sot_token_id, eot_token_id=tok.eot_token_id, budget=ChunkBudget(memory), fast=fast
    )


def caption(length: int, seed: int) -> torch.Tensor:
    """A caption of ``length`` ids, start and end tokens included."""
    words = torch.randint(1, 49000, (length - 2,), generator=torch.Generator().manual_seed(seed))
    return torch.cat([torch.tensor([49406]), words, torch.tensor([49407])])


def pixels(seed: int) -> torch.Tensor:
    return torch.randn((3, 64, 64), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def integrals(explainer: Explainer, tower_name: str, inputs: list[torch.Tensor], layer: int, method: str, n_steps: int):
    tower = getattr(explainer, tower_name)
    hidden, lengths = explainer._lower(tower, inputs, layer)
    reference = explainer._reference(tower, layer)[: hidden.shape[1]]
    alphas, weights = nodes_and_weights(method, n_steps)
    own = tower.own_rows(lengths, hidden.shape[1])
    return [
        PathIntegral(h, reference, alphas, weights, length=int(n), content_length=int(c))
        for h, n, c in zip(hidden, own, lengths)
    ]


@settings(max_examples=20, deadline=None)
@given(
    tower_name=st.sampled_from(["text", "image"]),
    lengths=st.lists(st.integers(3, 16), min_size=1, max_size=4),
    layer=st.integers(0, 1),
    method=st.sampled_from(METHODS),
    n_steps=st.integers(2, 5),
    memory=st.sampled_from([1 << 14, 1 << 18, AMPLE]),
    mode=st.sampled_from(["forward", "reverse"]),
)
def test_generic_equals_fast_path(tiny64, tower_name, lengths, layer, method, n_steps, memory, mode):
    """Each side's factor from the generic path, batched with others under any memory budget and
    in either mode, equals the fast path's for it alone."""
    slow, fast = explainer(tiny64, fast=False, memory=memory), explainer(tiny64, fast=True)
    tower = getattr(slow, tower_name)
    inputs = (
        [caption(n, i) for i, n in enumerate(lengths)]
        if tower_name == "text"
        else [pixels(i) for i in range(len(lengths))]
    )
    with torch.no_grad():
        got = (generic._forward if mode == "forward" else generic._reverse)(
            tower, layer, integrals(slow, tower_name, inputs, layer, method, n_steps), slow.budget
        )
        for one, factor in zip(inputs, got):
            alone = integrals(fast, tower_name, [one], layer, method, n_steps)
            want = FACTORS["forward"](getattr(fast, tower_name), layer, alone, fast.budget)[0]
            torch.testing.assert_close(factor, want, rtol=1e-9, atol=1e-12)


def test_explainer_generic_equals_fast_and_completes(tiny64):
    """Through :meth:`Explainer.explain`: the same attribution either way, and the completeness
    identity holds with a delta that shrinks as n_steps grows."""
    ids, image = caption(7, 0), pixels(0)
    deltas = []
    for n_steps in (2, 8, 32):
        got = explainer(tiny64, fast=False).explain(
            ids, image, text_layer=0, image_layer=1, method="riemann_left", n_steps=n_steps
        )
        want = explainer(tiny64, fast=True).explain(
            ids, image, text_layer=0, image_layer=1, method="riemann_left", n_steps=n_steps
        )
        np.testing.assert_allclose(got.interactions, want.interactions, rtol=1e-9, atol=1e-12)
        total = got.interactions.sum() + got.text_reference + got.image_reference - got.both_references
        assert got.score == pytest.approx(total + got.convergence_delta, abs=1e-12)
        deltas.append(abs(got.convergence_delta))
    assert deltas[0] > deltas[1] > deltas[2]


def test_generic_stops_and_batches_like_alone(tiny64):
    """A side whose stop check fires is None; the others equal their solo computation."""
    slow = explainer(tiny64, fast=False, memory=1 << 14)
    calls = {"n": 0}

    def stop_after_two() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    sides = [
        Side(caption(9, 1), 1, "gausslegendre", 3),
        Side(caption(5, 2), 1, "gausslegendre", 3, stop_after_two),
        Side(caption(12, 3), 1, "gausslegendre", 3),
    ]
    got = slow.factors(slow.text, sides)
    assert got[1] is None
    for side, factor in zip(sides, got):
        if factor is not None:
            alone = slow.factors(slow.text, [Side(side.inputs, 1, "gausslegendre", 3)])[0]
            torch.testing.assert_close(factor.matrix, alone.matrix, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(factor.endpoints, alone.endpoints, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("architecture", ["ViT-B-16-SigLIP", "PE-Core-B-16"])
def test_a_pool_split_changes_the_cost_not_the_factors(tmp_path, architecture):
    """At a MAP head, f_hi = tail(attention of fixed queries over row-wise keys and values); its
    closed-form attention tangent gives the factors of the whole f_hi."""
    name = add_scaled_architecture(architecture, tmp_path)
    model = seeded_model(name).double().requires_grad_(False)
    image = split_towers(model)[1]
    layer = len(image.layers) - 1
    split = image.row_split(layer)
    size = model.visual.preprocess_cfg["size"]
    pixels_ = torch.randn(
        (2, 3, *((size, size) if isinstance(size, int) else size)),
        generator=torch.Generator().manual_seed(0),
        dtype=torch.float64,
    )
    with torch.no_grad():
        hidden = image.lower(pixels_, layer, None)
        reference = image.lower(torch.zeros_like(pixels_[:1]), layer, None)[0]
        assert isinstance(split, PoolSplit)
        torch.testing.assert_close(split.upper(hidden, None), image.upper(hidden, layer, None))
        alphas, weights = nodes_and_weights("gausslegendre", 3)
        paths = [PathIntegral(h, reference, alphas, weights) for h in hidden]
        got = generic._forward(image, layer, paths, ChunkBudget(1 << 16))
        image.row_split = lambda layer: None  # the same tower without the split
        want = generic._forward(image, layer, paths, ChunkBudget(AMPLE))
    for factor, expected in zip(got, want):
        torch.testing.assert_close(factor, expected, rtol=1e-9, atol=1e-12)
