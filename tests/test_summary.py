"""ExplanationSummary on the shipped model, served by a real ``explain-server`` at its defaults.

The summary is computed once, on the server, from the tensors the response carries: these tests
recompute it here from the full tensors with the proto's formulas in plain numpy, and check that
``detail=DETAIL_SUMMARY`` gives the same summary without the tensors, that bad ``detail`` and
``summary_top_k`` values are refused by name, that the two histograms count what was answered,
and that ``explain-client`` prints the summary.
"""

from __future__ import annotations

import io
import json
import math
import pathlib
import urllib.request

import grpc
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from explain_api import explain_pb2, explain_pb2_grpc
from explain_client import ExplainClient, Explanation, SummaryResult, cli
from explain_client.client import explain_request
from explain_server.launcher import ServerProcess
from explain_server.shapes import scenes

pytestmark = pytest.mark.integration

ASSETS = pathlib.Path(__file__).resolve().parents[1] / "client" / "explain_client" / "assets"
RTOL = 1e-12

# captions of varied length: one word, scene captions, punctuation, hyphens, capitals, digits,
# accents, CJK (split over byte-level tokens), an emoji, a caption without a word
FIXED_CAPTIONS = [
    "circle",
    "A RED circle, left of 2 small-ish blue squares!",
    "Café naïve: 日本語 の 三角形 🙂 state-of-the-art (green) triangle.",
    "a photo of a cat",
    "an old portrait of a woman in uniform; sepia-toned, grainy & dark",
    "?!",
]


def _encode(picture: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {}))
    return buffer.getvalue()


def _inputs() -> list[tuple[bytes, str]]:
    """Distinct (image, caption) pairs: scenes of several sizes in PNG, JPEG and WebP with their
    own captions and the fixed ones, and the two photos."""
    rng = np.random.default_rng(23)
    pairs = []
    sizes = [(96, 96), (160, 120), (64, 200), (333, 251), (96, 96), (500, 300)]
    for n, ((width, height), fmt) in enumerate(zip(sizes, ["PNG", "JPEG", "WEBP"] * 2)):
        scene = scenes.generate_scene(rng, width=width, height=height)
        caption = scenes.describe(scene, scenes.random_style(scene, rng, subset=n % 2 == 1)).text
        pairs.append((_encode(scenes.render(scene), fmt), caption))
        pairs.append((_encode(scenes.render(scene), fmt), FIXED_CAPTIONS[n]))
    for photo, caption in (("chelsea.jpg", "a tabby cat"), ("grace_hopper.jpg", FIXED_CAPTIONS[4])):
        data = (ASSETS / photo).read_bytes()
        pairs.append((data, caption))
        with Image.open(io.BytesIO(data)) as picture:
            pairs.append((_encode(picture.convert("RGB").resize((120, 90)), "WEBP"), FIXED_CAPTIONS[2]))
    return pairs


INPUTS = _inputs()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``explain-server`` with no flags: the shipped ``shapes`` model, metrics on."""
    proc = ServerProcess([], tmp_path_factory.mktemp("logs") / "server.log").wait_serving()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield explain_pb2_grpc.ExplainStub(channel)


def _tensor(message: explain_pb2.Float32Tensor) -> np.ndarray:
    return np.frombuffer(message.data, dtype="<f4").reshape(tuple(message.shape))


def _expected_words(response: explain_pb2.ExplainResponse, caption: str) -> list[tuple[int, int, int, int]]:
    """(start, end, first_token, end_token) per the WordSummary comment: maximal runs of rows
    whose spans touch or overlap, split at rows that spell no letter or digit; padding rows and
    rows that spell nothing belong to no word."""
    spans = [(span.start, span.end) for span in response.token_spans]
    found: list[list[int]] = []
    previous_in_word = False
    for row, ((start, end), pad) in enumerate(zip(spans, response.padding)):
        in_word = not pad and end > start and any(char.isalnum() for char in caption[start:end])
        if in_word and previous_in_word and start <= found[-1][1]:
            found[-1][1], found[-1][3] = max(found[-1][1], end), row + 1
        elif in_word:
            found.append([start, end, row, row + 1])
        previous_in_word = in_word
    return [tuple(word) for word in found]


def _assert_close(actual: float, expected: float, what: str) -> None:
    assert math.isclose(actual, expected, rel_tol=RTOL, abs_tol=1e-300), f"{what}: {actual!r} != {expected!r}"


def _check_recomputed(response: explain_pb2.ExplainResponse, caption: str, top_k: int) -> None:
    """The response's summary equals the one the proto's formulas give from its own tensors."""
    grid = _tensor(response.attribution).astype(np.float64)
    prefix = _tensor(response.prefix_attribution).astype(np.float64)
    summary = response.summary
    rows, gh, gw = grid.shape
    assert (summary.grid_height, summary.grid_width) == (gh, gw)

    entries = np.concatenate([grid.ravel(), prefix.ravel()])
    positive, negative = entries[entries > 0].sum(), entries[entries < 0].sum()
    _assert_close(summary.positive_interaction, positive, "positive_interaction")
    _assert_close(summary.negative_interaction, negative, "negative_interaction")
    _assert_close(summary.interaction_total, positive + negative, "interaction_total")
    # I = sum(attribution) + sum(prefix_attribution): the same sum in another order, which
    # rounds differently where positive and negative mass cancel
    assert abs(summary.interaction_total - (grid.sum() + prefix.sum())) <= RTOL * np.abs(entries).sum()
    share = summary.interaction_total / (response.score - response.convergence_delta)
    _assert_close(summary.interaction_share, share, "interaction_share")

    expected_words = _expected_words(response, caption)
    assert [(w.start, w.end, w.first_token, w.end_token) for w in summary.words] == expected_words
    cells = gh * gw
    k = math.ceil(cells / 10)
    maps = []
    for word, (start, end, first, end_token) in zip(summary.words, expected_words):
        assert word.text == caption[start:end]
        m = grid[first:end_token].sum(axis=0)
        maps.append(m)
        _assert_close(word.relevance, m.sum(), f"relevance of {word.text!r}")
        peak = np.unravel_index(np.argmax(m), m.shape)
        assert (word.peak_row, word.peak_column) == peak, word.text
        assert word.peak_value == m[peak]
        magnitude = np.abs(m)
        expected = np.sort(magnitude.ravel())[::-1][:k].sum() / magnitude.sum()
        _assert_close(word.concentration, expected, f"concentration of {word.text!r}")
        assert k / cells <= word.concentration <= 1.0

    pairs = sorted(
        ((-abs(m[i, j]), i, j, w) for w, m in enumerate(maps) for i in range(gh) for j in range(gw)),
    )[:top_k]
    assert [(c.word, c.row, c.column) for c in summary.top_interactions] == [(w, i, j) for _, i, j, w in pairs]
    for cell in summary.top_interactions:
        assert cell.value == maps[cell.word][cell.row, cell.column]


@pytest.mark.parametrize("index", range(len(INPUTS)))
def test_the_summary_is_the_one_the_full_tensors_give(stub, index):
    image, caption = INPUTS[index]
    response = stub.Explain(explain_request(image, caption), timeout=120)
    assert response.model == "shapes" and response.HasField("attribution")
    _check_recomputed(response, caption, top_k=10)
    assert len(response.summary.top_interactions) == min(10, len(response.summary.words) * 64)


def test_inputs_cover_words_of_several_tokens_and_captions_without_words(stub):
    """The inputs exercise what the word rules are about, not only one-token words."""
    responses = [stub.Explain(explain_request(*INPUTS[i]), timeout=120) for i in (5, 9)]
    words = [w for r in responses for w in r.summary.words]
    assert any(w.end_token - w.first_token > 1 for w in words)  # "naïve", "日本語"
    assert {"state", "of", "the", "art", "日本語", "naïve", "Café"} <= {w.text for w in words}
    assert not stub.Explain(explain_request(INPUTS[11][0], "?!"), timeout=120).summary.words


@pytest.mark.parametrize("top_k", [0, 1, 37, 100])
def test_summary_top_k_bounds_the_pairs(stub, top_k):
    image, caption = INPUTS[3]
    response = stub.Explain(explain_request(image, caption, summary_top_k=top_k), timeout=120)
    _check_recomputed(response, caption, top_k=top_k)
    assert len(response.summary.top_interactions) == min(top_k, len(response.summary.words) * 64)


def test_detail_summary_is_the_full_summary_without_the_tensors(stub):
    for image, caption in INPUTS[::3]:
        full = stub.Explain(explain_request(image, caption, summary_top_k=25), timeout=120)
        brief = stub.Explain(explain_request(image, caption, detail="summary", summary_top_k=25), timeout=120)
        assert brief.summary == full.summary
        assert not brief.HasField("attribution") and not brief.HasField("prefix_attribution")
        assert list(brief.cls_attribution) == []
        assert (brief.score, list(brief.tokens), list(brief.image_prefix)) == (
            full.score,
            list(full.tokens),
            list(full.image_prefix),
        )
        assert brief.ByteSize() < full.ByteSize() - len(full.attribution.data) - len(full.prefix_attribution.data)


def test_explain_many_summaries_match_full_and_single_calls(stub):
    image = INPUTS[2][0]
    captions = [caption for _, caption in INPUTS[:6]]
    request = explain_pb2.ExplainManyRequest(images=[image], captions=captions)
    full = stub.ExplainMany(request, timeout=120).explanations
    request.detail = explain_pb2.DETAIL_SUMMARY
    brief = stub.ExplainMany(request, timeout=120).explanations
    assert len(full) == len(brief) == len(captions)
    for caption, f, b in zip(captions, full, brief):
        _check_recomputed(f, caption, top_k=10)
        assert b.summary == f.summary and not b.HasField("attribution")


def test_the_client_returns_summaries(server):
    image, caption = INPUTS[1]
    with ExplainClient(server.target, timeout=120) as client:
        explanation = client.explain(image, caption)
        result = client.explain(image, caption, detail="summary", summary_top_k=3)
        many = client.explain_many([image, INPUTS[0][0]], [caption], detail="summary")
        full_many = client.explain_many([image], [caption, "a blue square"])
    assert isinstance(explanation, Explanation) and isinstance(result, SummaryResult)
    assert explanation.summary.words == result.summary.words
    assert result.summary.top_interactions == explanation.summary.top_interactions[:3]
    assert result.score == explanation.score and result.tokens == explanation.tokens
    assert [type(item) for item in many] == [SummaryResult, SummaryResult]
    assert many[0].summary == explanation.summary
    assert all(item.summary is not None for item in full_many)
    word = explanation.summary.words[0]
    assert explanation.heatmap((word.first_token, word.end_token)).sum() == pytest.approx(
        word.relevance, rel=1e-5, abs=1e-7
    )
    assert json.loads(json.dumps(result.to_dict()))["summary"]["words"][0]["text"] == word.text


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"detail": 7}, "detail"),
        ({"detail": -1}, "detail"),
        ({"summary_top_k": 101}, "summary_top_k"),
        ({"summary_top_k": -1}, "summary_top_k"),
    ],
)
def test_bad_detail_and_top_k_are_invalid_argument_naming_the_field(stub, fields, field):
    image, caption = INPUTS[0]
    calls = [
        (stub.Explain, explain_pb2.ExplainRequest(image=image, caption=caption, **fields)),
        (stub.ExplainMany, explain_pb2.ExplainManyRequest(images=[image], captions=[caption], **fields)),
    ]
    for call, request in calls:
        with pytest.raises(grpc.RpcError) as caught:
            call(request, timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith(f"{field}:") or field in caught.value.details()


def _histograms(url: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(url, timeout=10) as page:
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(page.read().decode())
            if family.name in ("explain_interaction_share", "explain_word_grounding_concentration")
            for sample in family.samples
        }


def test_the_histograms_count_every_answered_summary(server, stub):
    before = _histograms(server.metrics_url)
    share, concentration = "explain_interaction_share", "explain_word_grounding_concentration"
    model = (("model", "shapes"),)
    assert (f"{share}_count", model) in before and (f"{concentration}_count", model) in before
    assert (f"{share}_bucket", (("le", "0.5"), ("model", "shapes"))) in before
    responses = [stub.Explain(explain_request(*INPUTS[i], detail="summary"), timeout=120) for i in (0, 2, 5)]
    many = stub.ExplainMany(
        explain_pb2.ExplainManyRequest(images=[INPUTS[4][0]], captions=["a red circle", "circle"]), timeout=120
    ).explanations
    summaries = [r.summary for r in [*responses, *many]]
    after = _histograms(server.metrics_url)

    def grew(name: str, labels: tuple = model) -> float:
        return after[(name, labels)] - before[(name, labels)]

    shares = [s.interaction_share for s in summaries]
    concentrations = [w.concentration for s in summaries for w in s.words]
    assert grew(f"{share}_count") == sum(not math.isnan(value) for value in shares) == 5
    assert grew(f"{concentration}_count") == len(concentrations) > 5
    # every bucket counts the observations at or below its bound (no _sum for the share: its
    # buckets go below zero, and prometheus_client then leaves the sum out)
    for name, values in ((share, shares), (concentration, concentrations)):
        bounds = [labels[0][1] for key, labels in after if key == f"{name}_bucket"]
        assert len(bounds) > 10
        for bound in bounds:
            expected = sum(value <= float(bound) for value in values)
            assert grew(f"{name}_bucket", (("le", bound), ("model", "shapes"))) == expected, (name, bound)
    assert grew(f"{concentration}_sum") == pytest.approx(sum(concentrations))


def test_cli_prints_the_summary_and_puts_it_in_json(server, tmp_path, capsys):
    path = tmp_path / "scene.webp"
    path.write_bytes(INPUTS[2][0])
    caption = INPUTS[2][1]
    assert cli.main([str(path), caption, "--target", server.target]) == 0
    printed = capsys.readouterr().out
    assert "interaction share: " in printed and "-0.000000" not in printed
    assert cli.main([str(path), caption, "--target", server.target, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    summary = data["summary"]
    lines = printed.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("words (relevance"))
    table = lines[header + 2 : header + 2 + len(summary["words"])]
    for word, line in zip(summary["words"], table, strict=True):
        assert line.split()[0] == word["text"].split()[0]
        assert f"({word['peak_row']}, {word['peak_column']})" in line
        assert f"{word['concentration']:.3f}" in line
    assert summary["grid_height"] == 8 and len(summary["top_interactions"]) == 10


def test_cli_detail_summary_prints_the_same_summary_without_the_tensors(server, tmp_path, capsys):
    path = tmp_path / "scene.webp"
    path.write_bytes(INPUTS[2][0])
    caption, target = INPUTS[2][1], ["--target", server.target]
    assert cli.main([str(path), caption, *target, "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert cli.main([str(path), caption, *target, "--json", "--detail", "summary"]) == 0
    brief = json.loads(capsys.readouterr().out)
    assert "attribution" not in brief and brief["summary"] == full["summary"]
    assert cli.main([str(path), caption, *target, "--detail", "summary"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("model:             shapes\n") and "interaction share: " in printed
    assert "token-region interactions" not in printed
    for flag in (["--out", str(tmp_path / "o.png")], ["--span", "0:2"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main([str(path), caption, *target, "--detail", "summary", *flag])
        assert exit_.value.code == cli.EXIT_LOCAL_ERROR
        assert f"{flag[0]} needs the attribution" in capsys.readouterr().err
