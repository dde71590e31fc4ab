"""Grounding through a real server on the shipped shapes model: explanations point at the named objects.

A random model cannot tell a transposed, mirrored or shifted grid from the right one; the
trained shapes model can, because every phrase has a known box.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import open_clip
import pytest
from PIL import Image, ImageOps

from explain_api.grounding import load_dataset
from explain_client import ExplainClient
from explain_client.evaluation import cli
from explain_client.evaluation.scoring import phrase_rows, score_phrase
from explain_server.launcher import ServerProcess
from explain_server.shapes import model as shapes_model

pytestmark = pytest.mark.slow

HELDOUT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "shapes-heldout" / "dataset.json"


@pytest.fixture(scope="module")
def shapes_server(tmp_path_factory):
    """A real server on loopback hosting the shipped shapes model (the default) and the same
    architecture with seeded random weights (``shapes-random``)."""
    proc = ServerProcess(
        [*shapes_model.server_args(), "--model", shapes_model.spec("shapes-random", "random:0"), "--device", "cpu"],
        tmp_path_factory.mktemp("logs") / "shapes-server.log",
    ).wait_serving()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def shapes_client(shapes_server):
    with ExplainClient(shapes_server.target, timeout=300) as client:
        yield client


def _explain_eval(server, tmp_path, model: str) -> tuple[dict, str]:
    report_path, table_path = tmp_path / f"{model}.json", tmp_path / f"{model}.md"
    code = cli.main(
        [
            str(HELDOUT),
            "--target",
            server.target,
            "--model",
            model,
            "--limit",
            "50",
            "--workers",
            "2",
            "--no-progress",
            "--json",
            str(report_path),
            "--markdown",
            str(table_path),
        ]
    )
    assert code == 0
    return json.loads(report_path.read_text()), table_path.read_text()


@pytest.fixture(scope="module")
def eval_reports(shapes_server, tmp_path_factory):
    """explain-eval's reports on the first 50 held-out scenes, trained and random weights."""
    tmp = tmp_path_factory.mktemp("eval")
    return {model: _explain_eval(shapes_server, tmp, model) for model in ("shapes", "shapes-random")}


def test_explain_eval_reports_every_phrase_of_50_heldout_scenes(eval_reports):
    report, table = eval_reports["shapes"]
    assert report["pairs"] == 50 and report["skipped"] == [] and report["model"] == "shapes"
    overall = report["overall"]
    assert overall["phrases"] == sum(len(d["phrases"]) for d in report["details"]) >= 100
    assert overall["boxes"] == overall["phrases"]  # one box per generated object
    assert 0.0 < overall["relevance_mass"] <= 1.0
    assert set(report["per_class"]) <= {"circle", "square", "triangle", "cross", "diamond"}
    assert sum(c["phrases"] for c in report["per_class"].values()) == overall["phrases"]
    hits = [p["pointing_hit"] for d in report["details"] for p in d["phrases"]]
    assert overall["pointing_accuracy"] == pytest.approx(np.mean(hits))
    assert "| **all** | " in table


def test_trained_weights_point_far_more_often_than_random_weights(eval_reports):
    trained = eval_reports["shapes"][0]["overall"]
    random = eval_reports["shapes-random"][0]["overall"]
    assert trained["pointing_accuracy"] >= random["pointing_accuracy"] + 0.15, (trained, random)
    assert trained["relevance_mass"] >= random["relevance_mass"] + 0.08, (trained, random)


def test_explain_eval_on_50_heldout_scenes_reaches_80_percent_pointing(eval_reports):
    assert eval_reports["shapes"][0]["overall"]["pointing_accuracy"] >= 0.80


def test_each_phrase_heatmap_is_the_sum_of_exactly_its_own_token_rows(shapes_client):
    dataset = load_dataset(HELDOUT)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")  # the same CLIP BPE the shapes model uses
    for caption in dataset.captions[:5]:
        explanation = shapes_client.explain(dataset.images[caption.image_id].path, caption.text)
        for phrase in caption.phrases:
            rows = phrase_rows(explanation, caption.text, phrase.start, phrase.end)
            before = len(tokenizer.encode(caption.text[: phrase.start]))
            assert rows == list(range(1 + before, 1 + len(tokenizer.encode(caption.text[: phrase.end]))))
            assert "".join(explanation.tokens[r] for r in rows) == caption.text[phrase.start : phrase.end].replace(
                " ", ""
            )
            heat = explanation.attribution[rows].sum(axis=0)
            peak = divmod(int(np.argmax(heat)), heat.shape[1])
            assert score_phrase(explanation, rows, phrase.boxes).peak == peak


def _peaks(client, image: Image.Image, caption, boxes_of) -> list[tuple[tuple[int, int], bool]]:
    """Per phrase: (peak cell, peak inside the phrase's box as mapped by ``boxes_of``)."""
    explanation = client.explain(image, caption.text)
    out = []
    for phrase in caption.phrases:
        rows = phrase_rows(explanation, caption.text, phrase.start, phrase.end)
        result = score_phrase(explanation, rows, [boxes_of(box) for box in phrase.boxes])
        out.append((result.peak, result.pointing_hit))
    return out


def _heatmaps(client, image: Image.Image, caption) -> list[np.ndarray]:
    """Per phrase of ``caption``: its heatmap over the grid, (Gh, Gw) float32."""
    explanation = client.explain(image, caption.text)
    rows = [phrase_rows(explanation, caption.text, p.start, p.end) for p in caption.phrases]
    return [explanation.heatmap((r[0], r[-1] + 1)) for r in rows]


@pytest.fixture(scope="module")
def transformed_heatmaps(shapes_client) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per phrase of the first 20 held-out captions: the heatmap of the scene, of its left-right
    mirror and of its 90-degree counter-clockwise rotation (PIL's ``rotate(90)``)."""
    dataset = load_dataset(HELDOUT)
    out = []
    for caption in dataset.captions[:20]:
        image = Image.open(dataset.images[caption.image_id].path).convert("RGB")
        out += zip(
            _heatmaps(shapes_client, image, caption),
            _heatmaps(shapes_client, ImageOps.mirror(image), caption),
            _heatmaps(shapes_client, image.rotate(90), caption),
        )
    return out


def test_mirroring_and_rotating_the_image_mirror_and_rotate_each_heatmap(transformed_heatmaps):
    # The shipped image tower commutes with mirrors and quarter turns (explain_server.shapes.symmetry),
    # so a right grid mapping moves every heatmap exactly as the image, up to float rounding; a
    # transposed, unmirrored or shifted grid does not.
    for original, mirrored, rotated in transformed_heatmaps:
        scale = np.abs(original).max()
        assert scale > 0
        np.testing.assert_allclose(mirrored, np.fliplr(original), rtol=0, atol=1e-4 * scale)
        np.testing.assert_allclose(rotated, np.rot90(original), rtol=0, atol=1e-4 * scale)


def test_mirroring_and_rotating_move_each_peak_accordingly(transformed_heatmaps):
    # cell (i, j) -> (i, g - 1 - j) under the mirror, (g - 1 - j, i) under the rotation; where a
    # symmetric scene gives two cells the same heat, the argmax may pick either of them.
    for original, mirrored, rotated in transformed_heatmaps:
        g = original.shape[1]
        i, j = np.unravel_index(np.argmax(original), original.shape)
        scale = np.abs(original).max()
        assert mirrored[i, g - 1 - j] >= mirrored.max() - 1e-4 * scale
        assert rotated[g - 1 - j, i] >= rotated.max() - 1e-4 * scale


def test_peaks_map_through_the_crop_box_of_a_padded_image(shapes_client):
    """32 px of background on each side: the server's centre crop is the scene again, pixel for pixel."""
    dataset = load_dataset(HELDOUT)
    for caption in dataset.captions[:6]:
        image = Image.open(dataset.images[caption.image_id].path).convert("RGB")
        padded = Image.new("RGB", (image.width + 64, image.height), tuple(int(v) for v in np.asarray(image)[0, 0]))
        padded.paste(image, (32, 0))
        original = _peaks(shapes_client, image, caption, lambda b: b)
        shifted = _peaks(shapes_client, padded, caption, lambda b: (b[0] + 32, b[1], b[2] + 32, b[3]))
        assert shifted == original
