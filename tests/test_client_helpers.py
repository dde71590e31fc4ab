"""Tests of the explain_client package that need no server (the end-to-end tests use a real one)."""

from __future__ import annotations

import io
import json
import pathlib
import pickle

import grpc
import numpy as np
import pytest
from PIL import Image

import explain_client
from explain_api import explain_pb2
from explain_client import cli, errors
from explain_client.explanation import Explanation
from explain_client.images import encode_image, load_image
from explain_client.tensors import decode_float32_tensor

pytestmark = pytest.mark.unit

TOKENS = ["<start_of_text>", "a", "red", "circle", "and", "a", "blue", "square", "<end_of_text>"]
GH, GW = 2, 4
IMAGE_SIZE = (448, 224)
CROP_BOX = (112.0, 0.0, 336.0, 224.0)  # cells are 56 x 112 pixels


def make_attribution(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(len(TOKENS), GH, GW)).astype(np.float32)


def make_response(
    attribution: np.ndarray | None = None,
    crop_box: tuple[float, float, float, float] = CROP_BOX,
    tokens: list[str] = TOKENS,
) -> explain_pb2.ExplainResponse:
    attribution = make_attribution() if attribution is None else attribution
    x0, y0, x1, y1 = crop_box
    return explain_pb2.ExplainResponse(
        request_id="req-1",
        model="tiny",
        token_ids=list(range(100, 100 + len(tokens))),
        tokens=tokens,
        attribution=explain_pb2.Float32Tensor(shape=attribution.shape, data=attribution.astype("<f4").tobytes()),
        cls_attribution=np.linspace(-1, 1, len(tokens)).astype(np.float32).tolist(),
        score=0.25,
        logit_scale=100.0,
        reference_terms=explain_pb2.ReferenceTerms(text_reference=0.1, image_reference=0.2, both_references=0.05),
        convergence_delta=1e-4,
        crop_box=explain_pb2.Box(x0=x0, y0=y0, x1=x1, y1=y1),
        image_size=explain_pb2.ImageSize(width=IMAGE_SIZE[0], height=IMAGE_SIZE[1]),
        timings=explain_pb2.Timings(queue_seconds=0.5, compute_seconds=1.5),
        options=explain_pb2.ResolvedOptions(text_layer=11, image_layer=11, n_steps=10, method="riemann_right"),
    )


@pytest.fixture
def explanation() -> Explanation:
    return Explanation.from_proto(make_response())


def uniform_explanation(value: float, crop_box=CROP_BOX) -> Explanation:
    return Explanation.from_proto(make_response(np.full((len(TOKENS), GH, GW), value, np.float32), crop_box))


# --- Float32Tensor and from_proto -------------------------------------------


def test_float32_tensor_round_trips_exactly():
    array = make_attribution(1)
    tensor = explain_pb2.Float32Tensor(shape=array.shape, data=array.astype("<f4").tobytes())
    decoded = decode_float32_tensor(tensor)
    assert decoded.dtype == np.float32
    assert decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)
    assert not decoded.flags.writeable


def test_float32_tensor_wrong_length_raises():
    tensor = explain_pb2.Float32Tensor(shape=[2, 3], data=b"\0" * (4 * 6 - 4))
    with pytest.raises(ValueError, match="20 bytes; shape \\(2, 3\\) needs 24"):
        decode_float32_tensor(tensor)


def test_from_proto_rejects_bad_tensor_length():
    resp = make_response()
    resp.attribution.data = resp.attribution.data[:-1]
    with pytest.raises(ValueError):
        Explanation.from_proto(resp)


def test_from_proto_rejects_inconsistent_token_count():
    resp = make_response()
    del resp.tokens[-1]
    with pytest.raises(ValueError, match="tokens"):
        Explanation.from_proto(resp)


def test_from_proto_decodes_every_field(explanation):
    np.testing.assert_array_equal(explanation.attribution, make_attribution())
    assert explanation.cls_attribution.dtype == np.float32
    assert explanation.cls_attribution.shape == (len(TOKENS),)
    assert explanation.tokens == tuple(TOKENS)
    assert explanation.token_ids == tuple(range(100, 109))
    assert explanation.score == 0.25
    assert explanation.logit_scale == 100.0
    assert explanation.reference_terms == explain_client.ReferenceTerms(0.1, 0.2, 0.05)
    assert explanation.convergence_delta == 1e-4
    assert explanation.crop_box == CROP_BOX
    assert explanation.image_size == IMAGE_SIZE
    assert explanation.request_id == "req-1"
    assert explanation.model == "tiny"
    assert explanation.options == explain_client.ResolvedOptions(11, 11, 10, "riemann_right")
    assert (explanation.queue_seconds, explanation.compute_seconds) == (0.5, 1.5)


def test_repr_is_one_short_line(explanation):
    assert repr(explanation) == (
        "Explanation(model='tiny', score=0.2500, tokens=9, grid=2x4, convergence_delta=1.00e-04, request_id='req-1')"
    )


def test_to_dict_is_json_serialisable(explanation):
    data = json.loads(json.dumps(explanation.to_dict()))
    np.testing.assert_array_equal(np.array(data["attribution"], np.float32), explanation.attribution)
    assert data["tokens"] == TOKENS
    assert data["crop_box"] == list(CROP_BOX)
    assert data["options"]["method"] == "riemann_right"
    assert data["reference_terms"]["both_references"] == 0.05


# --- rows and heatmap ---------------------------------------------------------


def test_rows_by_index_range(explanation):
    assert explanation.rows((1, 4)) == [1, 2, 3]
    assert explanation.rows((0, len(TOKENS))) == list(range(len(TOKENS)))
    assert explanation.rows((np.int64(6), np.int64(8))) == [6, 7]


@pytest.mark.parametrize("span", [(0, 0), (3, 2), (-1, 2), (0, len(TOKENS) + 1)])
def test_rows_rejects_bad_ranges(explanation, span):
    with pytest.raises(ValueError, match="row range"):
        explanation.rows(span)


@pytest.mark.parametrize("span", [(1, 2, 3), (1.0, 2.0), 3, None])
def test_rows_rejects_non_spans(explanation, span):
    with pytest.raises(TypeError):
        explanation.rows(span)


@pytest.mark.parametrize(
    ("substring", "rows"),
    [
        ("Blue Square", [6, 7]),
        ("red circ", [2, 3]),
        ("  RED\tcircle ", [2, 3]),
        ("a", [1]),  # the first occurrence wins
        ("ndab", [4, 5, 6]),  # matches across token boundaries
        ("e squ", [6, 7]),
    ],
)
def test_rows_by_substring(explanation, substring, rows):
    assert explanation.rows(substring) == rows


def test_rows_substring_ignores_label_whitespace_and_case():
    tokens = ["<start_of_text>", "A ", "Red ", "circle", "<end_of_text>"]
    attribution = np.zeros((len(tokens), GH, GW), np.float32)
    exp = Explanation.from_proto(make_response(attribution, tokens=tokens))
    assert exp.rows("a red") == [1, 2]


def test_rows_substring_never_matches_start_or_end_tokens(explanation):
    with pytest.raises(ValueError, match="not found"):
        explanation.rows("start_of_text")


def test_rows_unknown_substring_lists_tokens(explanation):
    with pytest.raises(ValueError, match="not found") as info:
        explanation.rows("green triangle")
    assert "'circle'" in str(info.value)


@pytest.mark.parametrize("substring", ["", "   ", "\n\t"])
def test_rows_empty_substring_raises(explanation, substring):
    with pytest.raises(ValueError, match="empty"):
        explanation.rows(substring)


def test_heatmap_sums_exactly_the_span_rows(explanation):
    heat = explanation.heatmap("blue square")
    assert heat.shape == (GH, GW) and heat.dtype == np.float32
    np.testing.assert_allclose(heat, explanation.attribution[6] + explanation.attribution[7], rtol=1e-6)
    np.testing.assert_allclose(
        explanation.heatmap((1, 8)), explanation.attribution[1:8].sum(axis=0), rtol=1e-5, atol=1e-6
    )


# --- token_scores and top_interactions ----------------------------------------


def test_token_scores_of_one_cell(explanation):
    # Cell (1, 2): x in [112 + 2*56, 112 + 3*56), y in [112, 224).
    scores = explanation.token_scores((224, 112, 280, 224))
    assert scores.shape == (len(TOKENS),) and scores.dtype == np.float32
    np.testing.assert_array_equal(scores, explanation.attribution[:, 1, 2])


def test_token_scores_of_half_a_cell(explanation):
    scores = explanation.token_scores((224, 112, 252, 224))
    np.testing.assert_allclose(scores, 0.5 * explanation.attribution[:, 1, 2], rtol=1e-6)


def test_token_scores_of_the_whole_crop_box(explanation):
    expected = explanation.attribution.sum(axis=(1, 2))
    np.testing.assert_allclose(explanation.token_scores(CROP_BOX), expected, rtol=1e-5, atol=1e-6)
    # Image area outside the crop box was not seen by the model: it adds nothing.
    np.testing.assert_allclose(explanation.token_scores((0, 0, 448, 224)), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(explanation.token_scores((0, 0, 112, 224)), np.zeros(len(TOKENS)))


@pytest.mark.parametrize(
    "box", [(10, 10, 10, 20), (10, 20, 30, 5), (0, 0, float("nan"), 1), (0, 0, 1), (500, 0, 600, 10), (-20, 0, -10, 5)]
)
def test_token_scores_rejects_bad_boxes(explanation, box):
    with pytest.raises(ValueError):
        explanation.token_scores(box)


def test_top_interactions_orders_by_magnitude_and_skips_start_end():
    attribution = np.zeros((len(TOKENS), GH, GW), np.float32)
    attribution[0, 0, 0] = 100.0  # start token: excluded
    attribution[-1, 0, 0] = -100.0  # end token: excluded
    attribution[3, 1, 2] = -5.0
    attribution[6, 0, 3] = 4.0
    attribution[2, 0, 1] = 0.5
    exp = Explanation.from_proto(make_response(attribution))
    assert exp.top_interactions(2) == [(3, "circle", 1, 2, -5.0), (6, "blue", 0, 3, 4.0)]
    assert exp.top_interactions(3)[2] == (2, "red", 0, 1, 0.5)
    assert len(exp.top_interactions(1000)) == (len(TOKENS) - 2) * GH * GW
    assert exp.top_interactions(0) == []
    with pytest.raises(ValueError):
        exp.top_interactions(-1)


# --- overlay -------------------------------------------------------------------


@pytest.fixture
def photo() -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, size=(IMAGE_SIZE[1], IMAGE_SIZE[0], 3), dtype=np.uint8)


def test_overlay_is_a_readable_figure_of_a_path_or_an_array(explanation, photo, tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(photo).save(path)
    from_path = explanation.overlay(path, (1, 8))
    assert from_path.mode == "RGB" and max(from_path.size) >= 640
    np.testing.assert_array_equal(np.asarray(explanation.overlay(photo, (1, 8))), np.asarray(from_path))
    larger = explanation.overlay(photo, "red circle", min_size=900)
    assert max(larger.size) >= 900


def test_overlay_rejects_an_image_of_another_size(explanation):
    with pytest.raises(ValueError, match="448x224"):
        explanation.overlay(np.zeros((100, 100, 3), np.uint8), "red")


def test_overlay_rejects_a_bad_span_or_min_size(explanation, photo):
    with pytest.raises(ValueError, match="not found in the caption tokens"):
        explanation.overlay(photo, "green")
    with pytest.raises(ValueError, match="min_size must be >= 300"):
        explanation.overlay(photo, "red", min_size=8)


# --- encode_image --------------------------------------------------------------


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_encode_image_passes_paths_and_bytes_through(tmp_path, photo):
    data = b"not even an image: bytes are sent unchanged"
    path = tmp_path / "x.bin"
    path.write_bytes(data)
    assert encode_image(str(path)) == data
    assert encode_image(pathlib.Path(path)) == data
    assert encode_image(data) == data
    assert encode_image(bytearray(data)) == data
    assert encode_image(memoryview(data)) == data


def test_encode_image_encodes_pil_and_arrays_losslessly(photo):
    for source in (Image.fromarray(photo), photo):
        data = encode_image(source)
        assert data.startswith(b"\x89PNG")
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), photo)


def test_encode_image_applies_exif_orientation_of_pil_images():
    image = Image.new("RGB", (4, 2))
    image.getexif()[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    decoded = Image.open(io.BytesIO(encode_image(image)))
    assert decoded.size == (2, 4)
    assert load_image(image).size == (2, 4)


@pytest.mark.parametrize("bad", [None, 3, 1.5, ["a.png"], {"path": "a.png"}])
def test_encode_image_rejects_other_types(bad):
    with pytest.raises(TypeError, match="PIL.Image.Image"):
        encode_image(bad)


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((4, 4), np.uint8),
        np.zeros((4, 4, 4), np.uint8),
        np.zeros((4, 4, 3), np.float32),
        np.zeros((0, 4, 3), np.uint8),
    ],
)
def test_encode_image_rejects_bad_arrays(array):
    with pytest.raises(ValueError, match=r"shape .* dtype .*required: shape \(H, W, 3\)"):
        encode_image(array)


def test_load_image_rejects_undecodable_bytes():
    with pytest.raises(ValueError, match="cannot decode"):
        load_image(b"definitely not an image")


# --- errors --------------------------------------------------------------------


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str | None) -> None:
        super().__init__()
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str | None:
        return self._details


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgumentError),
        (grpc.StatusCode.NOT_FOUND, errors.NotFoundError),
        (grpc.StatusCode.UNAVAILABLE, errors.UnavailableError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhaustedError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceededError),
        (grpc.StatusCode.CANCELLED, errors.CancelledError),
        (grpc.StatusCode.UNAUTHENTICATED, errors.UnauthenticatedError),
        (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDeniedError),
        (grpc.StatusCode.INTERNAL, errors.InternalError),
    ],
)
def test_from_rpc_error_maps_codes_to_subclasses(code, cls):
    err = errors.from_rpc_error(FakeRpcError(code, "text_layer out of range"))
    assert type(err) is cls
    assert isinstance(err, errors.ExplainError)
    assert err.code is code
    assert err.details == "text_layer out of range"
    assert str(err) == f"{code.name}: text_layer out of range"


def test_from_rpc_error_falls_back_to_plain_explain_error():
    err = errors.from_rpc_error(FakeRpcError(grpc.StatusCode.ABORTED, None))
    assert type(err) is errors.ExplainError
    assert err.code is grpc.StatusCode.ABORTED
    assert str(err) == "ABORTED: "
    bare = errors.from_rpc_error(grpc.RpcError("boom"))
    assert bare.code is grpc.StatusCode.UNKNOWN and bare.details == "boom"


def test_explain_errors_survive_pickling():
    err = errors.NotFoundError("unknown model 'x'")
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is errors.NotFoundError
    assert str(copy) == "NOT_FOUND: unknown model 'x'"


def test_unreachable_server_raises_unavailable():
    # Port 1 on localhost is reserved and refuses connections.
    with explain_client.ExplainClient("127.0.0.1:1", timeout=5) as client:
        with pytest.raises(errors.UnavailableError):
            client.list_models()


# --- CLI -----------------------------------------------------------------------


def test_cli_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    assert "explain-client" in capsys.readouterr().out


def test_cli_parses_arguments():
    args = cli.build_parser().parse_args(
        [
            "cat.jpg",
            "a cat",
            "--span",
            "2:4",
            "--top",
            "3",
            "--n-steps",
            "20",
            "--text-layer",
            "-2",
            "--timeout",
            "1.5",
            "--json",
        ]
    )
    assert (args.image, args.caption, args.target) == ("cat.jpg", "a cat", "localhost:50051")
    assert args.span == (2, 4)
    assert (args.top, args.n_steps, args.text_layer, args.image_layer) == (3, 20, -2, None)
    assert args.timeout == 1.5 and args.json
    assert cli.build_parser().parse_args(["x", "y", "--span", "red circle"]).span == "red circle"


@pytest.mark.parametrize(
    "bad",
    [
        ["x"],
        ["x", "y", "--top", "-1"],
        ["x", "y", "--timeout", "0"],
        ["health", "--timeout", "0"],
        ["models", "--nope"],
    ],
)
def test_cli_rejects_bad_arguments_as_a_local_error(bad, capsys):
    # 1, as the README documents: 2 means the server call failed, and Docker reserves 2
    with pytest.raises(SystemExit) as info:
        cli.main(bad)
    assert info.value.code == cli.EXIT_LOCAL_ERROR
    assert "error: " in capsys.readouterr().err
