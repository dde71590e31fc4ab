"""shapes-traffic: generated monitoring samples whose faults are what their truth columns say."""

from __future__ import annotations

import datetime
import hashlib
import json
import re

import numpy as np
import pyarrow.json
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from explain_server.shapes.scenes import COLOURS, SHAPES
from explain_server.shapes.traffic import FORMATS, SIDES, generate_traffic, main, write_traffic

pytestmark = pytest.mark.unit

_PHRASE = re.compile(rf"\b(?:(?:small|large) )?({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b")


def named_pairs(caption: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a generated caption names, in caption order."""
    return [(m.group(1), m.group(2)) for m in _PHRASE.finditer(caption)]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """60 records with both faults at 30%, written by the command as a user runs it."""
    out = tmp_path_factory.mktemp("traffic")
    assert main([str(out), "--count", "60", "--seed", "5", "--wrong-colour", "0.3", "--distractor", "0.3"]) == 0
    rows = [json.loads(line) for line in (out / "sample.jsonl").read_text().splitlines()]
    return out, rows


def test_same_seed_gives_the_same_sample_byte_for_byte(tmp_path):
    first = write_traffic(tmp_path / "a", seed=3, count=12, wrong_colour=0.5, distractor=0.5)
    second = write_traffic(tmp_path / "b", seed=3, count=12, wrong_colour=0.5, distractor=0.5)
    other = write_traffic(tmp_path / "c", seed=4, count=12, wrong_colour=0.5, distractor=0.5)
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes() != other.read_bytes()
    for row in map(json.loads, first.read_text().splitlines()):
        assert (tmp_path / "a" / row["image"]).read_bytes() == (tmp_path / "b" / row["image"]).read_bytes()


def test_every_record_is_a_new_scene(sample):
    out, rows = sample
    pixels = set()
    for row in rows:
        with Image.open(out / row["image"]) as image:
            pixels.add(hashlib.sha256(image.convert("RGB").resize((96, 96)).tobytes()).hexdigest())
    assert len(pixels) == len(rows)
    assert len({row["id"] for row in rows}) == len(rows)
    assert len({row["caption"] for row in rows}) > len(rows) * 0.9


def test_images_vary_in_format_and_size_and_match_their_truth(sample):
    out, rows = sample
    formats, shorter, non_square = set(), [], 0
    for row in rows:
        with Image.open(out / row["image"]) as image:
            assert image.format == row["truth_format"]
            assert list(image.size) == row["truth_size"]
            formats.add(image.format)
            shorter.append(min(image.size))
            non_square += image.width != image.height
    assert formats == set(FORMATS)
    assert SIDES[0] <= min(shorter) and max(shorter) <= SIDES[1]
    assert max(shorter) - min(shorter) > 150
    assert 5 <= non_square <= 40


def test_the_model_s_centre_crop_holds_every_object(sample):
    """A padded frame is centred, so the model's centre crop (shorter side, open_clip's default) is the scene."""
    _, rows = sample
    for row in rows:
        width, height = row["truth_size"]
        side = min(width, height)
        x0, y0 = (width - side) / 2, (height - side) / 2
        for bx0, by0, bx1, by1 in row["truth_boxes"]:
            assert x0 - 1 <= bx0 < bx1 <= x0 + side + 1
            assert y0 - 1 <= by0 < by1 <= y0 + side + 1


def test_jsonl_reads_with_pyarrow_with_its_documented_columns(sample):
    out, rows = sample
    table = pyarrow.json.read_json(out / "sample.jsonl")
    assert table.num_rows == len(rows) == 60
    for column in ("id", "image", "caption", "timestamp", "segment", "truth_wrong_colour", "truth_distractor"):
        assert column in table.column_names
    assert str(table.schema.field("caption").type) == "string"
    segments = table.column("segment").to_pylist()
    assert set(segments) == {"web", "mobile", "partner"}
    stamps = [datetime.datetime.fromisoformat(row["timestamp"]) for row in rows]
    assert stamps == sorted(stamps) and all(s.tzinfo is not None for s in stamps)
    assert datetime.timedelta(hours=12) < stamps[-1] - stamps[0] < datetime.timedelta(days=1)
    wrong = [value for value in table.column("truth_wrong_colour").to_pylist() if value is not None]
    distractors = [value for value in table.column("truth_distractor").to_pylist() if value is not None]
    assert 8 <= len(wrong) <= 30 and 8 <= len(distractors) <= 30


def test_captions_vary_in_length(sample):
    _, rows = sample
    lengths = [len(row["caption"].split()) for row in rows]
    assert max(lengths) - min(lengths) >= 8


def check_record(record) -> None:
    """The caption is true of the scene except for the faults the record declares."""
    scene_pairs = {(o.colour, o.shape) for o in record.scene.objects}
    named = named_pairs(record.caption)
    expected = len(record.scene.objects) - (record.distractor is not None)
    assert len(named) == expected, record.caption
    false = [pair for pair in named if pair not in scene_pairs]
    if record.wrong_colour is None:
        assert false == []
    else:
        # exactly one phrase is false: its colour is no object's of that shape
        assert len(false) == 1 and false[0][0] == record.wrong_colour != record.true_colour
        assert (record.true_colour, false[0][1]) in scene_pairs
    # with the wrong colour put right, the caption names every object but the distractor, once
    corrected = [
        (record.true_colour, shape) if (colour, shape) in false else (colour, shape) for colour, shape in named
    ]
    hidden = set()
    if record.distractor is not None:
        obj = record.scene.objects[record.distractor]
        hidden = {(obj.colour, obj.shape)}
    assert len(set(corrected)) == len(corrected) and set(corrected) == scene_pairs - hidden


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    wrong=st.sampled_from([0.0, 0.3, 1.0]),
    distractor=st.sampled_from([0.0, 0.3, 1.0]),
)
def test_captions_are_false_exactly_where_the_truth_says(seed, wrong, distractor):
    records = list(generate_traffic(seed, 6, wrong_colour=wrong, distractor=distractor))
    for record in records:
        check_record(record)
    if wrong == 1.0:
        assert all(r.wrong_colour is not None for r in records)
    if wrong == 0.0:
        assert all(r.wrong_colour is None for r in records)
    if distractor == 1.0:
        assert all(r.distractor is not None for r in records)
    if distractor == 0.0:
        assert all(r.distractor is None for r in records)


def test_distractor_is_drawn_but_not_named(sample):
    out, rows = sample
    for row in (r for r in rows if r["truth_distractor"] is not None):
        colour, shape = row["truth_distractor"].split()
        assert (colour, shape) not in named_pairs(row["caption"])
        assert any(o.endswith(f" {colour} {shape}") for o in row["truth_objects"])
        x0, y0, x1, y1 = row["truth_distractor_box"]
        assert row["truth_distractor_box"] in row["truth_boxes"]
        with Image.open(out / row["image"]) as image:
            patch = np.asarray(image.convert("RGB"), dtype=np.float64)[y0:y1, x0:x1]
        # the object's colour is drawn inside its box (JPEG and resampling blur it a little)
        distance = np.linalg.norm(patch - np.asarray(COLOURS[colour], dtype=np.float64), axis=-1)
        assert (distance < 60).mean() > 0.2


def test_the_baseline_names_every_object(tmp_path):
    for record in generate_traffic(11, 20):
        assert sorted(named_pairs(record.caption)) == sorted((o.colour, o.shape) for o in record.scene.objects)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--wrong-colour", "1.5", "--wrong-colour: must be a probability in [0, 1]"),
        ("--distractor", "x", "--distractor: must be a number in [0, 1]"),
        ("--count", "-3", "--count: must be >= 0"),
        ("--segments", "web,,app", "--segments: must be comma-separated non-empty names"),
    ],
)
def test_bad_flags_are_refused_naming_the_flag_and_the_rule(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), flag, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_segments_flag_sets_the_segment_names(tmp_path):
    assert main([str(tmp_path), "--count", "30", "--seed", "2", "--segments", "eu,us"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "sample.jsonl").read_text().splitlines()]
    assert {row["segment"] for row in rows} == {"eu", "us"}
