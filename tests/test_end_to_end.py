"""The real server on loopback, through the thin client, the CLI, health and reflection."""

from __future__ import annotations

import concurrent.futures
import io
import json

import grpc
import numpy as np
import open_clip
import pytest
from conftest import TINY
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image
from test_inputs import with_scanlines

from explain_client import ExplainClient, InvalidArgumentError, NotFoundError, cli
from explain_server.model_spec import DEFAULT_METHOD, DEFAULT_N_STEPS

CAPTION = "a red circle and a blue square"


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def noise_image(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return png(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


@pytest.mark.integration
def test_health_is_serving(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "explain.v1.Explain"):
            status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.integration
def test_reflection_lists_the_explain_service(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(stub.ServerReflectionInfo(iter([request]), timeout=10))
    names = {s.name for s in response.list_services_response.service}
    assert {"explain.v1.Explain", "grpc.health.v1.Health"} <= names


@pytest.mark.integration
def test_list_models_matches_the_loaded_models(client, b32_weights):
    models = {m.name: m for m in client.list_models()}
    assert set(models) == {"tiny", "b32"}
    tiny, b32 = models["tiny"], models["b32"]
    assert tiny.is_default and not b32.is_default
    assert (tiny.architecture, tiny.pretrained) == (TINY, "random:0")
    assert (b32.architecture, b32.pretrained) == ("ViT-B-32", str(b32_weights))
    assert (tiny.image_size, tiny.patch_size, tiny.grid) == ((64, 64), (16, 16), (4, 4))
    assert (b32.image_size, b32.patch_size, b32.grid, b32.embed_dim) == ((224, 224), (32, 32), (7, 7), 512)
    assert (b32.text_layers, b32.image_layers, b32.default_text_layer, b32.default_image_layer) == (12, 12, 11, 11)
    assert (b32.context_length, b32.default_n_steps, b32.default_method) == (77, DEFAULT_N_STEPS, DEFAULT_METHOD)
    assert "gausslegendre" in b32.methods and b32.max_n_steps >= 50
    assert b32.preprocessing.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert (b32.preprocessing.resize_mode, b32.preprocessing.interpolation) == ("shortest", "bicubic")
    assert "transparency" in b32.preprocessing.conversion
    assert (b32.device, b32.dtype) == ("cpu", "float32")


@pytest.mark.integration
@pytest.mark.parametrize("model, grid", [("tiny", (4, 4)), ("b32", (7, 7))])
def test_explanation_shapes_tokens_and_values(client, model, grid):
    exp = client.explain(noise_image(300, 200), CAPTION, model=model, request_id="req-42")
    ids = open_clip.get_tokenizer(TINY)([CAPTION])[0].tolist()
    n_tokens = ids.index(49407) + 1  # up to and including the end token
    assert list(exp.token_ids) == ids[:n_tokens]
    assert exp.tokens == ("<start_of_text>", "a", "red", "circle", "and", "a", "blue", "square", "<end_of_text>")
    assert exp.attribution.shape == (n_tokens, *grid) and exp.attribution.dtype == np.float32
    assert exp.cls_attribution.shape == (n_tokens,)
    assert np.isfinite(exp.attribution).all() and np.isfinite(exp.cls_attribution).all()
    assert (exp.request_id, exp.model, exp.image_size) == ("req-42", model, (300, 200))
    assert -1.0 <= exp.score <= 1.0 and exp.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)
    refs = exp.reference_terms
    total = (
        exp.attribution.sum(dtype=np.float64)
        + exp.cls_attribution.sum(dtype=np.float64)
        + refs.text_reference
        + refs.image_reference
        - refs.both_references
        + exp.convergence_delta
    )
    assert total == pytest.approx(exp.score, abs=1e-5)
    assert exp.queue_seconds >= 0 and exp.compute_seconds > 0


@pytest.mark.integration
def test_default_model_and_options_are_resolved(client):
    exp = client.explain(noise_image(64, 64), "a dog")
    assert exp.model == "tiny"
    assert (exp.options.text_layer, exp.options.image_layer, exp.options.n_steps, exp.options.method) == (
        1,
        1,
        DEFAULT_N_STEPS,
        DEFAULT_METHOD,
    )
    other = client.explain(noise_image(64, 64), "a dog", text_layer=-2, image_layer=0, n_steps=5, method="riemann_left")
    assert (other.options.text_layer, other.options.image_layer, other.options.n_steps, other.options.method) == (
        0,
        0,
        5,
        "riemann_left",
    )
    assert not np.allclose(other.attribution, exp.attribution)


@pytest.mark.integration
def test_request_ids_are_generated_when_empty(client):
    first = client.explain(noise_image(64, 64), "a dog")
    second = client.explain(noise_image(64, 64), "a dog")
    assert len(first.request_id) == 36 and first.request_id != second.request_id


@pytest.mark.integration
def test_completeness_on_vit_b_32(client):
    """|convergence delta| shrinks as n_steps grows; the attribution sum at 5 is within [0.8, 1.25] of 50."""
    image = noise_image(224, 224, seed=3)
    runs = {n: client.explain(image, CAPTION, model="b32", method="riemann_right", n_steps=n) for n in (5, 10, 50)}
    deltas = [abs(runs[n].convergence_delta) for n in (5, 10, 50)]
    assert deltas[0] > deltas[1] > deltas[2]
    total = {n: runs[n].attribution.sum(dtype=np.float64) + runs[n].cls_attribution.sum(dtype=np.float64) for n in runs}
    assert 0.8 <= total[5] / total[50] <= 1.25


@pytest.mark.integration
def test_crop_box_of_a_wide_image(client):
    exp = client.explain(noise_image(448, 224), CAPTION, model="b32")
    assert exp.crop_box == (112.0, 0.0, 336.0, 224.0)
    assert exp.image_size == (448, 224)


@pytest.mark.integration
@pytest.mark.parametrize("cell", [(0, 0), (0, 3), (3, 0), (2, 1)])
def test_grid_rows_run_top_down_and_columns_left_right(client, cell):
    """Paint one cell of the crop of a wide image; at image_layer 0 only that cell's hidden state
    differs much from the reference (the mean image), so it must carry the largest attribution."""
    mean = np.round(255 * np.array(open_clip.OPENAI_DATASET_MEAN)).astype(np.uint8)
    image = np.tile(mean, (64, 128, 1))  # 128 x 64: the crop is x in [32, 96)
    row, col = cell
    image[16 * row : 16 * (row + 1), 32 + 16 * col : 32 + 16 * (col + 1)] = (250, 10, 10)
    exp = client.explain(png(image), CAPTION, image_layer=0)
    assert exp.crop_box == (32.0, 0.0, 96.0, 64.0)
    magnitude = np.abs(exp.attribution).sum(axis=0)
    assert np.unravel_index(magnitude.argmax(), magnitude.shape) == cell


@pytest.mark.integration
def test_exif_orientation_is_applied(client):
    image = Image.fromarray(np.zeros((40, 100, 3), np.uint8))  # 100 wide, 40 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    out = io.BytesIO()
    image.save(out, format="JPEG", exif=exif)
    exp = client.explain(out.getvalue(), CAPTION)
    assert exp.image_size == (40, 100)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"text_layer": 2}, "text_layer"),
        ({"image_layer": -3}, "image_layer"),
        ({"n_steps": 0}, "n_steps"),
        ({"n_steps": 100000}, "n_steps"),
        ({"method": "simpson"}, "method"),
        ({"method": "riemann_trapezoid", "n_steps": 1}, "n_steps"),
        ({"request_id": "x" * 129}, "request_id"),
        ({"caption": "   "}, "caption"),
        ({"caption": ""}, "caption"),
        ({"image": b""}, "image"),
        ({"image": b"<html><body>not an image</body></html>"}, "image"),
    ],
)
@pytest.mark.integration
def test_bad_input_is_invalid_argument_naming_the_field(client, kwargs, field):
    args = {"image": noise_image(64, 64), "caption": CAPTION, **kwargs}
    with pytest.raises(InvalidArgumentError) as info:
        client.explain(args.pop("image"), args.pop("caption"), **args)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details.startswith(f"{field}:")


@pytest.mark.integration
def test_truncated_image_is_refused_not_padded(client):
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(out, format="JPEG")
    with pytest.raises(InvalidArgumentError, match="image: could not be decoded"):
        client.explain(out.getvalue()[: len(out.getvalue()) // 2], CAPTION)


@pytest.mark.integration
def test_png_data_ending_early_is_refused_not_padded_with_black(client):
    """A complete PNG file whose zlib stream holds 30 of its 96 rows: Pillow alone pads the rest."""
    truncated = with_scanlines(noise_image(96, 96), lambda scanlines: scanlines[: 30 * (1 + 96 * 3)])
    with pytest.raises(InvalidArgumentError, match="INVALID_ARGUMENT: image: is truncated: .* 8670 of the 27744 bytes"):
        client.explain(truncated, CAPTION)


@pytest.mark.integration
def test_a_control_character_in_a_caption_reads_as_a_space(client):
    image = noise_image(64, 64)
    got = client.explain(image, "a red\x00circle and\x1ba blue square")
    want = client.explain(image, "a red circle and a blue square")
    assert got.tokens == want.tokens and got.score == want.score
    np.testing.assert_array_equal(got.attribution, want.attribution)


@pytest.mark.integration
def test_unknown_model_is_not_found(client):
    with pytest.raises(NotFoundError, match="model: no model named 'nope'; hosted: tiny, b32"):
        client.explain(noise_image(64, 64), CAPTION, model="nope")


@pytest.mark.integration
def test_client_rejects_none_caption_before_sending(client):
    with pytest.raises(TypeError, match="caption"):
        client.explain(noise_image(64, 64), None)


@pytest.mark.integration
def test_client_names_a_caption_utf8_cannot_encode(client):
    with pytest.raises(ValueError, match=r"^caption must be valid Unicode text; character '\\ud800' at index 2"):
        client.explain(noise_image(64, 64), "a \ud800 cat")
    with pytest.raises(ValueError, match=r"^captions\[1\] must be valid Unicode text"):
        client.explain_many([noise_image(64, 64)], ["a cat", "a \udc00 dog"])


@pytest.mark.unit
def test_client_refuses_an_empty_target():
    with pytest.raises(ValueError, match="target must be a gRPC target such as 'localhost:50051'; got ''"):
        ExplainClient("")


@pytest.mark.integration
@pytest.mark.parametrize("timeout", [0, -1.5])
def test_client_refuses_a_deadline_already_past_before_calling(client, timeout):
    with pytest.raises(ValueError, match=f"timeout must be > 0 seconds, or None for no deadline; got {timeout}"):
        ExplainClient("localhost:50051", timeout=timeout)
    with pytest.raises(ValueError, match="timeout must be > 0 seconds"):
        client.explain(noise_image(64, 64), "a cat", timeout=timeout)
    with pytest.raises(ValueError, match="timeout must be > 0 seconds"):
        client.list_models(timeout=timeout)


@pytest.mark.integration
def test_cli_prints_interactions_and_writes_an_overlay(server, tmp_path, capsys):
    image_path = tmp_path / "photo.png"
    image_path.write_bytes(noise_image(128, 64))
    out = tmp_path / "overlay.png"
    code = cli.main([str(image_path), CAPTION, "--target", server.target, "--span", "blue square", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "model:             tiny" in printed and "cell (row, col)" in printed
    assert f"overlay written to {out}" in printed
    with Image.open(out) as overlay:
        assert overlay.format == "PNG" and max(overlay.size) >= 640  # a readable figure, not 128x64

    assert cli.main([str(image_path), CAPTION, "--target", server.target, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tokens"][2] == "red" and np.asarray(data["attribution"]).shape == (9, 4, 4)


@pytest.mark.unit
@pytest.mark.parametrize(
    "out, message",
    [
        ("missing/overlay.png", "is not a writable directory"),
        ("overlay.xyz", "Pillow cannot write .xyz"),
        ("overlay", "Pillow cannot write files without an extension"),
    ],
)
def test_cli_refuses_an_out_it_cannot_write_before_calling(tmp_path, capsys, out, message):
    image_path = tmp_path / "photo.png"
    image_path.write_bytes(noise_image(64, 64))
    # nothing listens on port 1: had the call been made, it would have failed with exit code 2
    argv = [str(image_path), CAPTION, "--target", "127.0.0.1:1", "--timeout", "2", "--out", str(tmp_path / out)]
    assert cli.main(argv) == cli.EXIT_LOCAL_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: --out: ") and message in err


@pytest.mark.integration
def test_cli_lists_the_hosted_models(server, capsys):
    assert cli.main(["models", "--target", server.target]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["model", "architecture", "weights"]
    tiny, b32 = lines[1:]
    assert tiny.startswith("tiny (default)") and "random:0" in tiny and "4x4" in tiny
    assert b32.split()[:2] == ["b32", "ViT-B-32"] and "7x7" in b32 and "12, 12" in b32
    assert "gausslegendre, 3" in b32

    assert cli.main(["models", "--target", server.target, "--json"]) == 0
    models = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert models["tiny"]["is_default"] and not models["b32"]["is_default"]
    assert models["b32"]["grid"] == [7, 7] and models["b32"]["preprocessing"]["resize_mode"] == "shortest"


@pytest.mark.integration
def test_cli_takes_the_explain_command_and_connection_options_before_a_command(server, tmp_path, capsys):
    image_path = tmp_path / "photo.png"
    image_path.write_bytes(noise_image(64, 64))
    assert cli.main(["--target", server.target, "explain", str(image_path), CAPTION, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "tiny"
    assert cli.main(["--target", server.target, "models", "--json"]) == 0
    assert [model["name"] for model in json.loads(capsys.readouterr().out)] == ["tiny", "b32"]


@pytest.mark.unit
def test_cli_models_reports_an_unreachable_server_with_exit_code_2(capsys):
    assert cli.main(["models", "--target", "127.0.0.1:1", "--timeout", "2"]) == cli.EXIT_SERVER_ERROR
    assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.integration
def test_cli_reports_server_errors_with_exit_code_2(server, tmp_path, capsys):
    image_path = tmp_path / "photo.png"
    image_path.write_bytes(noise_image(64, 64))
    assert cli.main([str(image_path), CAPTION, "--target", server.target, "--model", "nope"]) == 2
    assert capsys.readouterr().err.startswith("error: NOT_FOUND: model: no model named 'nope'")


@pytest.mark.integration
def test_server_stays_serving_after_bad_requests(server, client):
    for bad in (b"", b"\x00" * 100, b"GIF89a"):
        with pytest.raises(InvalidArgumentError):
            client.explain(bad, CAPTION)
    test_health_is_serving(server)
    assert client.explain(noise_image(64, 64), CAPTION).attribution.shape == (9, 4, 4)


@pytest.mark.integration
@pytest.mark.parametrize(
    "caption, rule",
    [
        ("a cat <end_of_text> on a mat", "special token"),
        ("<START_OF_TEXT> a cat", "special token"),
        ("word " * 1000, "characters; the limit is 4096"),
        ("word " * 80, "tokens including the start and end tokens; the model's limit is 77"),
    ],
)
def test_captions_the_model_cannot_read_as_written_are_refused(client, caption, rule):
    with pytest.raises(InvalidArgumentError, match=f"INVALID_ARGUMENT: caption: .*{rule}"):
        client.explain(noise_image(64, 64), caption)


@pytest.mark.integration
def test_extreme_aspect_ratios_are_refused_before_resizing(client):
    out = io.BytesIO()
    Image.new("L", (1, 19_000)).save(out, format="PNG")
    with pytest.raises(InvalidArgumentError, match=r"image: is 1x19000; preprocessing would resize it to 64x1216000"):
        client.explain(out.getvalue(), CAPTION)


@pytest.mark.integration
@pytest.mark.parametrize(
    "payload",
    [
        b"\x1a\x03\xff\xfe\xfd",  # caption (field 3) holding invalid UTF-8
        b"\x0a\xff\xff\xff\xff\x0f",  # model (field 1) whose length runs past the end
        b"\xff\xff\xff",  # not a protobuf message
    ],
)
def test_malformed_messages_are_invalid_argument(server, payload):
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_unary(
            "/explain.v1.Explain/Explain", request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        with pytest.raises(grpc.RpcError) as info:
            call(payload, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("request: not a valid /explain.v1.Explain/Explain message")


@pytest.mark.integration
@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"text_layer": 2**40}, ValueError, "text_layer must fit in a 32-bit integer"),
        ({"n_steps": "10"}, TypeError, "n_steps must be an int"),
        ({"request_id": 123}, TypeError, "request_id must be a str"),
        ({"model": b"tiny"}, TypeError, "model must be a str"),
    ],
)
def test_client_names_the_field_of_a_bad_option(client, kwargs, error, message):
    with pytest.raises(error, match=message):
        client.explain(noise_image(64, 64), CAPTION, **kwargs)


@pytest.mark.integration
def test_cli_reports_where_a_span_points(server, tmp_path, capsys):
    image_path = tmp_path / "photo.png"
    image_path.write_bytes(noise_image(64, 64))
    assert cli.main([str(image_path), CAPTION, "--target", server.target, "--span", "blue square"]) == 0
    assert "span 'blue square' (rows 6-7): peak at cell (" in capsys.readouterr().out


@pytest.mark.integration
def test_bad_payloads_among_concurrent_valid_requests_harm_none(client):
    """Undecodable images queued between valid requests: each valid one equals its solo result."""
    valid = [(noise_image(64, 64, seed=i), f"caption number {i}") for i in range(4)]
    solo = [client.explain(image, caption) for image, caption in valid]
    truncated = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        truncated, format="JPEG"
    )
    bad = [b"", b"<html></html>", np.random.default_rng(2).bytes(512), truncated.getvalue()[:300]]
    jobs = [("ok", i, image, caption) for i, (image, caption) in enumerate(valid)] + [
        ("bad", i, payload, CAPTION) for i, payload in enumerate(bad)
    ]
    order = np.random.default_rng(3).permutation(len(jobs))

    def run(job):
        kind, index, image, caption = job
        try:
            return kind, index, client.explain(image, caption)
        except InvalidArgumentError as err:
            return kind, index, err

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        outcomes = list(pool.map(run, [jobs[i] for i in order]))
    for kind, index, outcome in outcomes:
        if kind == "bad":
            assert isinstance(outcome, InvalidArgumentError) and outcome.details.startswith(
                ("image: could not be decoded", "image: is empty")
            )
        else:
            np.testing.assert_array_equal(outcome.attribution, solo[index].attribution)
    assert client.explain(*valid[0]).score == solo[0].score  # and the next request runs normally
