"""Each family's default layer and quadrature, and how a model's configuration completes them."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scaled_models import add_scaled_architecture

from explain_server.engine.quadrature import METHODS
from explain_server.engine.split import SplitTower, default_quadrature
from explain_server.loading import load_model
from explain_server.model_spec import DEFAULT_N_STEPS, ModelSpec
from explain_server.worker.process import describe

pytestmark = pytest.mark.unit


def tower(method: str | None, n_steps: int | None) -> SplitTower:
    one = SplitTower()
    one.default_method, one.default_n_steps = method, n_steps
    return one


rules = st.one_of(st.none(), st.tuples(st.sampled_from(METHODS), st.integers(2, 9)))


@given(rules, rules)
def test_both_sides_share_the_rule_their_towers_name_with_the_more_nodes(text, image):
    got = default_quadrature(tower(*(text or (None, None))), tower(*(image or (None, None))))
    named = [rule for rule in (text, image) if rule is not None]
    if not named or len({method for method, _ in named}) > 1:
        assert got == (None, None)
    else:
        assert got == (named[0][0], max(n for _, n in named))


@pytest.fixture(scope="module")
def convnext(tmp_path_factory):
    return add_scaled_architecture("convnext_base_w", tmp_path_factory.mktemp("configs"))


def load(architecture: str, **options):
    spec = ModelSpec("m", architecture, "random:0", **options)
    return load_model(spec, device=torch.device("cpu"), dtype="float32", memory_bytes=64 << 20)


def test_an_average_pooled_tower_defaults_to_its_heads_input_and_its_familys_rule(convnext):
    loaded = load(convnext)
    image, text = loaded.explainer.image, loaded.explainer.text
    assert image.layers[loaded.default_image_layer].name == "head"
    # end-token pooling reads one row: no head layer, the last block
    assert loaded.default_text_layer == len(text.layers) - 1 and text.layers[-1].name.startswith("block")
    method, n_steps = default_quadrature(text, image)
    assert method is not None
    assert (loaded.default_method, loaded.default_n_steps) == (method, n_steps)
    description = describe(loaded)
    assert (description.default_method, description.default_n_steps) == (method, n_steps)
    assert description.default_image_layer == len(image.layers) - 1


def test_a_configured_rule_or_node_count_overrides_the_familys(convnext):
    family = load(convnext)
    method, n_steps = family.default_method, family.default_n_steps
    other = next(m for m in METHODS if m not in (method, "riemann_trapezoid"))
    chosen = load(convnext, method=other)
    assert (chosen.default_method, chosen.default_n_steps) == (other, DEFAULT_N_STEPS)
    counted = load(convnext, n_steps=n_steps + 4)
    assert (counted.default_method, counted.default_n_steps) == (method, n_steps + 4)
    both = load(convnext, method=other, n_steps=5)
    assert (both.default_method, both.default_n_steps) == (other, 5)
