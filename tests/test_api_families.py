"""The API's family-neutral fields: image prefix tokens, per-layer grids, padding rows, token
spans and layers by name; from the attribution matrix to the response and back in the client."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from inprocess import serving, tiny_model
from test_batching import noise_png

from explain_api import explain_pb2
from explain_client import Explanation
from explain_server.engine.layers import Layer
from explain_server.inputs import Caption, InputError
from explain_server.model_spec import ModelSpec
from explain_server.positions import image_columns, token_rows
from explain_server.registry import ServedModel
from explain_server.service import resolve_options
from explain_server.settings import Limits
from explain_server.worker.protocol import ModelDescription

pytestmark = pytest.mark.unit

CAPTION = "a red circle"
PREFIXES = [(), ("cls",), ("cls", "reg0", "reg1", "reg2", "reg3")]


def caption(count: int, spans: bool = True) -> Caption:
    """A caption of ``count`` tokens (ids 10, 11, ...), each spelling two characters when ``spans``."""
    return Caption(
        token_ids=torch.arange(10, 10 + count),
        labels=tuple(f"t{i}" for i in range(count)),
        spans=tuple((2 * i, 2 * i + 2) for i in range(count)) if spans else (),
    )


@given(
    prefix=st.sampled_from(PREFIXES),
    grid=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    tokens=st.integers(1, 6),
    padding=st.integers(0, 4),
)
def test_columns_split_into_the_layers_prefix_and_row_major_grid(prefix, grid, tokens, padding):
    rows = tokens + padding
    layer = Layer("stages.2", grid, prefix)
    interactions = np.random.default_rng(0).normal(size=(rows, layer.positions))
    columns = image_columns(interactions, layer)
    assert columns.prefix == prefix
    np.testing.assert_array_equal(columns.prefix_attribution, interactions[:, : len(prefix)].astype("<f4"))
    assert columns.grid.shape == (rows, *grid) and columns.grid.flags.c_contiguous
    # cell (i, j) is column len(prefix) + i * Gw + j
    i, j = grid[0] - 1, grid[1] - 1
    np.testing.assert_array_equal(columns.grid[:, i, j], interactions[:, len(prefix) + i * grid[1] + j].astype("<f4"))
    if "cls" in prefix:
        np.testing.assert_array_equal(columns.cls, interactions[:, 0].astype("<f4"))
    else:
        assert columns.cls.shape == (0,)
    # every value lands exactly once: the completeness identity's sum is kept
    total = columns.grid.sum(dtype=np.float64) + columns.prefix_attribution.sum(dtype=np.float64)
    assert total == pytest.approx(interactions.astype("<f4").sum(dtype=np.float64), rel=1e-6, abs=1e-6)


def test_columns_that_do_not_match_the_layer_are_a_bug():
    with pytest.raises(ValueError, match="1 prefix position.*4x4 grid"):
        image_columns(np.zeros((3, 16)), Layer("block 1", (4, 4), ("cls",)))


@given(tokens=st.integers(1, 6), padding=st.integers(0, 5), spans=st.booleans())
def test_rows_after_the_captions_tokens_are_labelled_padding(tokens, padding, spans):
    rows = token_rows(caption(tokens, spans), tokens + padding, pad_id=0, pad_label="<pad>")
    assert rows.token_ids == tuple(range(10, 10 + tokens)) + (0,) * padding
    assert rows.labels == tuple(f"t{i}" for i in range(tokens)) + ("<pad>",) * padding
    assert rows.padding == (False,) * tokens + (True,) * padding
    if spans:
        end = 2 * tokens
        assert rows.spans == tuple((2 * i, 2 * i + 2) for i in range(tokens)) + ((end, end),) * padding
    else:
        assert rows.spans == ()


def test_fewer_rows_than_tokens_is_a_bug():
    with pytest.raises(ValueError, match="3 attributed text rows for a caption of 4 tokens"):
        token_rows(caption(4), 3, 0, "<pad>")


def served_model(text_layers: int = 3, image: tuple[Layer, ...] | None = None) -> ServedModel:
    image = image or (Layer("layer1", (8, 8)), Layer("layer2", (4, 4)), Layer("attnpool", (2, 2), ("cls",)))
    text = tuple(Layer(f"block {i}") for i in range(text_layers))
    description = ModelDescription(
        (64, 64),
        (0, 0),
        8,
        1.0,
        64,
        text,
        image,
        text_layers - 1,
        len(image) - 2,
        True,
        1,
        "<pad>",
        {},
        "cpu",
        "f32",
        0,
    )
    return ServedModel(ModelSpec.parse("m=RN50:random:0"), workers=None, description=description)


def test_layers_resolve_by_index_or_by_name():
    model = served_model()
    options = resolve_options(explain_pb2.ExplainRequest(), model, Limits())
    assert (options.text_layer, options.image_layer) == (2, 1)  # the defaults
    request = explain_pb2.ExplainRequest(text_layer=-3, image_layer_name="attnpool")
    options = resolve_options(request, model, Limits())
    assert (options.text_layer, options.image_layer) == (0, 2)
    many = explain_pb2.ExplainManyRequest(text_layer_name="block 1", image_layer=0)
    options = resolve_options(many, model, Limits())
    assert (options.text_layer, options.image_layer) == (1, 0)


@pytest.mark.parametrize(
    "request_fields, field, message",
    [
        ({"image_layer_name": "layer4"}, "image_layer_name", "layers are: layer1, layer2, attnpool"),
        ({"text_layer_name": "block 3"}, "text_layer_name", "layers are: block 0, block 1, block 2"),
        ({"text_layer_name": ""}, "text_layer_name", "no text layer named ''"),
        ({"image_layer": 3}, "image_layer", r"\[-3, 2\] for this model \(3 image layers\); got 3"),
        ({"text_layer": 1, "text_layer_name": "block 1"}, "text_layer_name", "not both"),
    ],
)
def test_a_bad_layer_is_refused_naming_the_field(request_fields, field, message):
    with pytest.raises(InputError, match=message) as caught:
        resolve_options(explain_pb2.ExplainRequest(**request_fields), served_model(), Limits())
    assert caught.value.field == field


@pytest.fixture(scope="module")
def loaded():
    return tiny_model()


def test_a_served_vit_reports_its_layers_prefix_and_grid(loaded):
    async def scenario():
        async with serving(loaded) as served:
            listed = await served.stub.ListModels(explain_pb2.ListModelsRequest())
            by_name = await served.stub.Explain(
                explain_pb2.ExplainRequest(
                    image=noise_png(0, 80, 60), caption=CAPTION, text_layer_name="block 0", image_layer_name="block 0"
                )
            )
            default = await served.stub.Explain(explain_pb2.ExplainRequest(image=noise_png(0, 80, 60), caption=CAPTION))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await served.stub.Explain(
                    explain_pb2.ExplainRequest(image=noise_png(0, 80, 60), caption=CAPTION, image_layer_name="layer4")
                )
            return listed.models[0], by_name, default, refused.value

    info, by_name, default, refused = asyncio.run(scenario())
    assert [(layer.index, layer.name) for layer in info.text_layer_list] == [(0, "block 0"), (1, "block 1")]
    assert [
        (layer.name, layer.grid_height, layer.grid_width, list(layer.prefix)) for layer in info.image_layer_list
    ] == [
        ("block 0", 4, 4, ["cls"]),
        ("block 1", 4, 4, ["cls"]),
    ]
    assert (info.default_text_layer_name, info.default_image_layer_name) == ("block 1", "block 1")
    assert (info.text_layers, info.image_layers, info.grid_height, info.grid_width) == (2, 2, 4, 4)
    assert not info.text_sees_padding and info.pad_token == "<pad>"

    assert (by_name.options.text_layer, by_name.options.image_layer) == (0, 0)
    assert (by_name.options.text_layer_name, by_name.options.image_layer_name) == ("block 0", "block 0")
    assert default.options.image_layer_name == "block 1"
    exp = Explanation.from_proto(default)
    rows = len(exp.tokens)
    assert exp.image_prefix == ("cls",) and exp.prefix_attribution.shape == (rows, 1)
    np.testing.assert_array_equal(exp.prefix_attribution[:, 0], exp.cls_attribution)
    assert exp.padding == (False,) * rows and exp.padding_rows == []
    assert exp.content_rows == list(range(1, rows - 1))
    total = (
        exp.attribution.sum(dtype=np.float64)
        + exp.prefix_attribution.sum(dtype=np.float64)
        + exp.reference_terms.text_reference
        + exp.reference_terms.image_reference
        - exp.reference_terms.both_references
        + exp.convergence_delta
    )
    assert total == pytest.approx(exp.score, abs=1e-5)
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.details() == (
        "image_layer_name: no image layer named 'layer4' in this model; its layers are: block 0, block 1"
    )


def test_a_text_tower_that_sees_padding_gets_padded_rows(monkeypatch):
    # the tiny ViT's causal tower read as one that sees its padding: the front end pads the
    # ids to the context length and labels the rows after the caption's as padding
    loaded = tiny_model()
    monkeypatch.setattr(loaded.explainer.text, "sees_padding", True)

    async def scenario():
        async with serving(loaded) as served:
            listed = await served.stub.ListModels(explain_pb2.ListModelsRequest())
            response = await served.stub.Explain(explain_pb2.ExplainRequest(image=noise_png(0), caption=CAPTION))
            return listed.models[0], response

    info, response = asyncio.run(scenario())
    assert info.text_sees_padding
    exp = Explanation.from_proto(response)
    context = info.context_length
    assert len(exp.tokens) == context and exp.attribution.shape == (context, 4, 4)
    real = 5  # start, a, red, circle, end
    assert exp.padding == (False,) * real + (True,) * (context - real)
    assert exp.tokens[real:] == ("<pad>",) * (context - real) and exp.token_ids[real:] == (0,) * (context - real)
    assert exp.padding_rows == list(range(real, context))
    assert exp.content_rows == [1, 2, 3]
    assert exp.rows("red circle") == [2, 3]
    assert all(row in exp.content_rows for row, *_ in exp.top_interactions(10))
