"""The thin client on explanations of any model family: prefix tokens other than one class
token, grids of any shape, padding rows, token spans and named layers; no server needed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from explain_api import explain_pb2
from explain_client import Explanation, LayerInfo, ModelInfo
from explain_client.cli import _format_report, build_parser
from explain_client.client import explain_request
from explain_client.evaluation.scoring import phrase_rows, score_phrase

pytestmark = pytest.mark.unit

CAPTION = "red circle"
# SigLIP-like: no start token, an end token, then padding up to the context length
TOKENS = ["▁red", "▁circle", "</s>", "<pad>", "<pad>", "<pad>"]
SPANS = [(0, 3), (4, 10), (10, 10), (10, 10), (10, 10), (10, 10)]
PADDING = [False, False, False, True, True, True]
GRID = (3, 5)
PREFIX = ["cls", "reg0", "reg1", "reg2", "reg3"]


def tensor(array: np.ndarray) -> explain_pb2.Float32Tensor:
    return explain_pb2.Float32Tensor(shape=array.shape, data=np.asarray(array, dtype="<f4").tobytes())


def response(
    prefix: list[str] | None = PREFIX, padding: bool = True, spans: bool = True
) -> explain_pb2.ExplainResponse:
    """A response with ``prefix`` (None: a server that predates the prefix fields)."""
    rows = len(TOKENS)
    rng = np.random.default_rng(0)
    grid = rng.normal(size=(rows, *GRID)).astype(np.float32)
    grid[3:] = 0.0
    grid[1, 2, 4] = 9.0  # "circle" peaks at cell (2, 4)
    grid[4, 0, 0] = -20.0  # a padding row's value never ranks among content interactions
    msg = explain_pb2.ExplainResponse(
        request_id="r",
        model="siglip",
        token_ids=[10, 11, 1, 0, 0, 0],
        tokens=TOKENS,
        attribution=tensor(grid),
        score=0.1,
        logit_scale=10.0,
        crop_box=explain_pb2.Box(x0=10, y0=20, x1=160, y1=110),
        image_size=explain_pb2.ImageSize(width=200, height=120),
        options=explain_pb2.ResolvedOptions(
            text_layer=3,
            image_layer=2,
            n_steps=8,
            method="gausslegendre",
            text_layer_name="block 3",
            image_layer_name="head",
        ),
    )
    if prefix is None:
        msg.cls_attribution.extend(np.linspace(-1, 1, rows).tolist())
    else:
        msg.image_prefix.extend(prefix)
        values = rng.normal(size=(rows, len(prefix))).astype(np.float32)
        msg.prefix_attribution.CopyFrom(tensor(values))
        if "cls" in prefix:
            msg.cls_attribution.extend(values[:, prefix.index("cls")].tolist())
    if padding:
        msg.padding.extend(PADDING)
    if spans:
        msg.token_spans.extend(explain_pb2.TextSpan(start=a, end=b) for a, b in SPANS)
    return msg


@pytest.mark.parametrize("prefix", [[], ["cls"], PREFIX])
def test_prefix_tokens_parse_with_their_labels(prefix):
    exp = Explanation.from_proto(response(prefix))
    assert exp.image_prefix == tuple(prefix)
    assert exp.prefix_attribution.shape == (len(TOKENS), len(prefix))
    assert exp.prefix_attribution.dtype == np.float32 and not exp.prefix_attribution.flags.writeable
    if prefix:
        np.testing.assert_array_equal(exp.cls_attribution, exp.prefix_attribution[:, 0])
    else:
        assert exp.cls_attribution.shape == (0,)
    assert exp.grid == GRID
    assert (exp.options.text_layer_name, exp.options.image_layer_name) == ("block 3", "head")
    back = json.loads(json.dumps(exp.to_dict()))
    assert back["image_prefix"] == prefix and np.shape(back["prefix_attribution"]) == (len(TOKENS), len(prefix))
    assert back["padding"] == PADDING and back["token_spans"] == [list(s) for s in SPANS]


def test_a_response_from_an_older_server_reads_its_cls_attribution_as_the_prefix():
    exp = Explanation.from_proto(response(prefix=None, padding=False, spans=False))
    assert exp.image_prefix == ("cls",)
    np.testing.assert_array_equal(exp.prefix_attribution[:, 0], exp.cls_attribution)
    assert exp.padding == (False,) * len(TOKENS) and exp.token_spans == ()
    msg = response(prefix=None, padding=False, spans=False)
    msg.options.ClearField("image_layer_name")
    assert Explanation.from_proto(msg).options.image_layer_name == ""
    assert exp.content_rows == list(range(1, len(TOKENS) - 1))  # CLIP's start and end tokens


def test_content_rows_come_from_the_spans_and_leave_padding_out():
    exp = Explanation.from_proto(response())
    assert exp.padding_rows == [3, 4, 5]
    assert exp.content_rows == [0, 1]  # no start token: the first row is a word
    assert exp.rows("red") == [0] and exp.rows("circle") == [1]
    assert [row for row, *_ in exp.top_interactions(100)] and all(
        row in (0, 1) for row, *_ in exp.top_interactions(100)
    )
    assert exp.top_interactions(1)[0][:4] == (1, "▁circle", 2, 4)
    with pytest.raises(ValueError, match="not found in the caption tokens"):
        exp.rows("pad")


def test_without_spans_padding_rows_still_never_count_as_content():
    exp = Explanation.from_proto(response(spans=False))
    assert exp.content_rows == [1]  # rows 0..2 are the caption's; first and last read as special


def test_inconsistent_prefix_fields_are_refused():
    good = Explanation.from_proto(response())
    fields = {name: getattr(good, name) for name in good.__dataclass_fields__}
    with pytest.raises(ValueError, match=r"prefix_attribution has shape \(6, 5\); expected \(6, 2\)"):
        Explanation(**{**fields, "image_prefix": ("cls", "reg0")})
    with pytest.raises(ValueError, match="has no cls"):
        Explanation(**{**fields, "image_prefix": (), "prefix_attribution": np.zeros((6, 0))})
    with pytest.raises(ValueError, match="padding flags"):
        Explanation(**{**fields, "padding": (True,)})


def test_phrases_map_to_rows_through_the_servers_spans_whatever_the_labels():
    # byte-level labels that do not spell the caption: the spans still place each token
    msg = response()
    msg.tokens[:] = ["\ufffd", "\ufffd", "</s>", "<pad>", "<pad>", "<pad>"]
    exp = Explanation.from_proto(msg)
    assert phrase_rows(exp, CAPTION, 4, 10) == [1]
    score = score_phrase(exp, [1], [(130.0, 80.0, 160.0, 110.0)])  # cell (2, 4) of the 3x5 grid
    assert score.peak == (2, 4) and score.pointing_hit and score.box_hits == (True,)


def test_report_hides_padding_rows_unless_asked_and_says_so():
    exp = Explanation.from_proto(response())
    report = _format_report(exp, top=3)
    assert "[2]</s>  (+3 padding rows '<pad>' not shown; --show-padding lists them)" in report
    assert "[3]<pad>" not in report
    assert "layers:            text block 3; image head (3x5 grid)" in report
    assert "image prefix:      cls " in report and "reg3 " in report
    shown = _format_report(exp, top=3, show_padding=True)
    assert "[5]<pad>" in shown and "not shown" not in shown
    assert build_parser().parse_args(["a.png", "c", "--image-layer", "block 11", "--text-layer", "-1"]).image_layer == (
        "block 11"
    )


def test_a_layer_given_by_name_is_sent_as_its_name_field():
    request = explain_request(b"x", "c", text_layer="block 3", image_layer=-1)
    assert request.text_layer_name == "block 3" and not request.HasField("text_layer")
    assert request.image_layer == -1 and not request.HasField("image_layer_name")


def test_model_info_lists_each_towers_layers():
    info = explain_pb2.ModelInfo(
        name="rn50",
        grid_height=7,
        grid_width=7,
        text_layer_list=[explain_pb2.LayerInfo(index=0, name="block 0")],
        image_layer_list=[
            explain_pb2.LayerInfo(index=0, name="layer3", grid_height=14, grid_width=14),
            explain_pb2.LayerInfo(index=1, name="attnpool", grid_height=7, grid_width=7, prefix=["cls"]),
        ],
        default_image_layer_name="attnpool",
        text_sees_padding=True,
        pad_token="<pad>",
    )
    model = ModelInfo.from_proto(info, is_default=True)
    assert model.text_layer_list == (LayerInfo(0, "block 0", None, ()),)
    assert model.image_layer_list[0] == LayerInfo(0, "layer3", (14, 14), ())
    assert model.image_layer_list[1].prefix == ("cls",)
    assert (model.default_image_layer_name, model.text_sees_padding, model.pad_token) == ("attnpool", True, "<pad>")


def test_the_logit_adds_siglips_bias_where_the_server_reports_one():
    """logit = score x logit_scale (+ logit_bias): absent for CLIP, added for SigLIP."""
    clip = Explanation.from_proto(response())
    assert clip.logit_bias is None and clip.logit == pytest.approx(0.1 * 10.0)
    with_bias = response()
    with_bias.logit_bias = -10.0
    siglip = Explanation.from_proto(with_bias)
    assert siglip.logit_bias == -10.0 and siglip.logit == pytest.approx(0.1 * 10.0 - 10.0)
    assert siglip.to_dict()["logit_bias"] == -10.0
    assert "logit -9.0000" in _format_report(siglip, top=3)
