"""The scene generator, the grounding dataset format, its converters and the metrics' geometry (no server)."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import open_clip
import pytest
from PIL import Image

from explain_api.grounding import DatasetError, load_dataset, parse_dataset
from explain_client.evaluation import convert
from explain_client.evaluation.scoring import AlignmentError, phrase_rows, score_phrase, union_coverage
from explain_client.explanation import Explanation, ReferenceTerms, ResolvedOptions
from explain_server.inputs import token_label, tokenize
from explain_server.shapes import dataset as shapes_dataset
from explain_server.shapes.scenes import (
    COLOURS,
    SHAPES,
    SIZES,
    colour_swapped,
    describe,
    generate_scene,
    random_style,
    render,
)


def scenes(seed: int, count: int, n_objects=(1, 4)):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        scene = generate_scene(rng, n_objects=n_objects)
        out.append((scene, describe(scene, random_style(scene, rng))))
    return out


@pytest.mark.unit
def test_same_seed_same_scenes_captions_and_pixels():
    first, second = scenes(11, 5), scenes(11, 5)
    assert first == second
    for (a, _), (b, _) in zip(first, second):
        assert np.array_equal(np.asarray(render(a)), np.asarray(render(b)))
    assert scenes(12, 5) != first


@pytest.mark.unit
def test_vocabulary_is_large_enough():
    assert {"circle", "square", "triangle", "cross"} <= set(SHAPES)
    assert len(COLOURS) >= 6 and len(SIZES) >= 2


@pytest.mark.unit
def test_objects_are_apart_inside_the_canvas_and_distinct():
    for scene, _ in scenes(1, 200):
        assert 1 <= len(scene.objects) <= 4
        kinds = [(o.colour, o.shape) for o in scene.objects]
        assert len(set(kinds)) == len(kinds)
        for k, a in enumerate(scene.objects):
            x0, y0, x1, y1 = a.box
            assert 0 <= x0 < x1 <= scene.width and 0 <= y0 < y1 <= scene.height
            for b in scene.objects[k + 1 :]:
                assert a.box[2] < b.box[0] or b.box[2] < a.box[0] or a.box[3] < b.box[1] or b.box[3] < a.box[1]


@pytest.mark.unit
def test_rendered_objects_stay_inside_their_boxes():
    checked = 0
    for scene, _ in scenes(2, 60):
        if scene.texture:
            continue
        pixels = np.asarray(render(scene)).astype(int)
        outside = np.ones(pixels.shape[:2], dtype=bool)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            outside[y0:y1, x0:x1] = False
            # the object's own colour covers a good part of its box
            close = np.abs(pixels[y0:y1, x0:x1] - np.array(obj.rgb)).max(axis=-1) <= 2
            assert close.mean() > 0.3, obj
        # plain background: every pixel outside the boxes is exactly the background colour
        assert (pixels[outside] == np.array(scene.background)).all()
        checked += 1
    assert checked > 10


@pytest.mark.unit
def test_each_phrase_names_its_object_once():
    for scene, caption in scenes(3, 200):
        assert sorted(p.object_index for p in caption.phrases) == list(range(len(scene.objects)))
        for phrase in caption.phrases:
            obj = scene.objects[phrase.object_index]
            words = caption.text[phrase.start : phrase.end]
            assert words in (f"{obj.colour} {obj.shape}", f"{obj.size} {obj.colour} {obj.shape}")
            assert caption.text.count(f"{obj.colour} {obj.shape}") == 1


@pytest.mark.unit
def test_captions_vary_in_template_and_order():
    texts = [caption.text for _, caption in scenes(4, 200, n_objects=(2, 2))]
    assert len({t.split(" ")[0] for t in texts}) >= 4  # different openings
    assert any(" next to " in t for t in texts) and any(" and " in t for t in texts)
    assert any(re.search(r"\b(small|large)\b", t) for t in texts)


@pytest.mark.unit
def test_colour_swapped_twin_differs_only_in_two_colour_words():
    rng = np.random.default_rng(5)
    twins = 0
    for scene, _ in scenes(5, 200, n_objects=(2, 4)):
        style = random_style(scene, rng)
        twin = colour_swapped(scene, rng)
        if twin is None:
            continue
        twins += 1
        a, b = describe(scene, style).text.split(), describe(twin, style).text.split()
        changed = [(x, y) for x, y in zip(a, b) if x != y]
        assert len(a) == len(b) and len(changed) == 2 and changed[0] == changed[1][::-1]
        assert {w.strip(",.") for pair in changed for w in pair} <= set(COLOURS)
        kinds = [(o.colour, o.shape) for o in twin.objects]
        assert len(set(kinds)) == len(kinds) and set(kinds) != {(o.colour, o.shape) for o in scene.objects}
        assert [o.box for o in twin.objects] == [o.box for o in scene.objects]
    assert twins > 100
    single = generate_scene(np.random.default_rng(0), n_objects=1)
    assert colour_swapped(single, rng) is None


@pytest.mark.unit
def test_shapes_scenes_writes_a_valid_dataset(tmp_path):
    assert shapes_dataset.main([str(tmp_path), "--count", "6", "--seed", "9"]) == 0
    dataset = load_dataset(tmp_path / "dataset.json")
    assert len(dataset.images) == len(dataset.captions) == 6
    for entry, (scene, caption) in zip(dataset.captions, shapes_dataset.scenes_with_captions(9, 6)):
        assert entry.text == caption.text
        image = dataset.images[entry.image_id]
        assert np.array_equal(np.asarray(render(scene)), np.asarray(Image.open(image.path)))
        for phrase, truth in zip(entry.phrases, caption.phrases):
            obj = scene.objects[truth.object_index]
            assert (phrase.start, phrase.end, phrase.label, phrase.boxes) == (
                truth.start,
                truth.end,
                obj.shape,
                (tuple(map(float, obj.box)),),
            )


def _minimal(**phrase):
    base = {"start": 0, "end": 3, "class": "x", "boxes": [[0, 0, 5, 5]]}
    return {
        "format": "explain-eval-grounding/1",
        "images": [{"id": "a", "file": "a.png", "width": 10, "height": 10}],
        "captions": [{"image_id": "a", "text": "red circle", "phrases": [{**base, **phrase}]}],
    }


@pytest.mark.unit
@pytest.mark.parametrize(
    "phrase, message",
    [
        ({"end": 40}, r"captions\[0\]\.phrases\[0\]: span"),
        ({"boxes": [[5, 5, 5, 9]]}, r"boxes\[0\]: is empty"),
        ({"boxes": [[20, 20, 30, 30]]}, "outside the 10x10 image"),
        ({"boxes": []}, "at least one box"),
    ],
)
def test_dataset_errors_name_the_entry(tmp_path, phrase, message):
    with pytest.raises(DatasetError, match=message):
        parse_dataset(_minimal(**phrase), tmp_path)
    parse_dataset(_minimal(), tmp_path)  # the unmodified entry is valid


@pytest.mark.unit
def test_coco_converter_finds_mentions_and_boxes(tmp_path):
    instances = {
        "images": [{"id": 7, "file_name": "000007.jpg", "width": 640, "height": 480}],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 3, "name": "car"}],
        "annotations": [
            {"image_id": 7, "category_id": 18, "bbox": [10, 20, 100, 50], "iscrowd": 0},
            {"image_id": 7, "category_id": 18, "bbox": [300, 200, 40, 40], "iscrowd": 0},
            {"image_id": 7, "category_id": 1, "bbox": [400, 100, 80, 200], "iscrowd": 0},
            {"image_id": 7, "category_id": 3, "bbox": [0, 0, 640, 480], "iscrowd": 1},
        ],
    }
    captions = {
        "annotations": [
            {"image_id": 7, "id": 1, "caption": "A man walking two dogs past a car."},
            {"image_id": 7, "id": 2, "caption": "An empty street."},
        ]
    }
    out = tmp_path / "out" / "coco.json"
    out.parent.mkdir()
    data = convert.coco_dataset(instances, captions, tmp_path / "val2017", out)
    (entry,) = data["captions"]  # the caption mentioning nothing is left out
    spans = {p["class"]: (entry["text"][p["start"] : p["end"]], p["boxes"]) for p in entry["phrases"]}
    assert spans == {
        "person": ("man", [[400, 100, 480, 300]]),
        "dog": ("dogs", [[10, 20, 110, 70], [300, 200, 340, 240]]),
    }
    assert data["images"][0]["file"] == "../val2017/000007.jpg"
    parse_dataset(data, out.parent)


@pytest.mark.unit
def test_flickr30k_converter_spans_and_one_based_boxes(tmp_path):
    (tmp_path / "Sentences").mkdir()
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Sentences" / "42.txt").write_text(
        "[/EN#18/people A man] with [/EN#19/clothing pierced ears] is wearing [/EN#20/other glasses] .\n"
        "[/EN#21/scene A street] at night .\n"
    )
    (tmp_path / "Annotations" / "42.xml").write_text(
        "<annotation><size><width>500</width><height>333</height><depth>3</depth></size>"
        "<object><name>18</name><bndbox><xmin>1</xmin><ymin>11</ymin><xmax>100</xmax><ymax>200</ymax></bndbox></object>"
        "<object><name>19</name><name>20</name><bndbox><xmin>50</xmin><ymin>60</ymin><xmax>70</xmax><ymax>80</ymax></bndbox></object>"
        "<object><name>21</name><nobndbox>0</nobndbox><scene>1</scene></object>"
        "</annotation>"
    )
    out = tmp_path / "flickr.json"
    assert (
        convert.main(
            [
                "flickr30k",
                "--sentences",
                str(tmp_path / "Sentences"),
                "--annotations",
                str(tmp_path / "Annotations"),
                "--images",
                str(tmp_path / "images"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    dataset = load_dataset(out)
    (entry,) = dataset.captions  # the scene-only sentence has no boxed phrase
    assert entry.text == "A man with pierced ears is wearing glasses ."
    got = [(entry.text[p.start : p.end], p.label, p.boxes) for p in entry.phrases]
    assert got == [
        ("A man", "people", ((0.0, 10.0, 100.0, 200.0),)),
        ("pierced ears", "clothing", ((49.0, 59.0, 70.0, 80.0),)),
        ("glasses", "other", ((49.0, 59.0, 70.0, 80.0),)),
    ]
    assert dataset.images["42"].path == tmp_path / "images" / "42.jpg"
    assert json.loads(out.read_text())["images"][0]["file"] == "images/42.jpg"


@pytest.mark.unit
def test_union_coverage_is_exact():
    xs = ys = np.array([0.0, 10.0, 20.0])
    # two overlapping boxes: in cell (0, 1), 50 + 50 px^2 of which 25 overlap, out of 100
    cover = union_coverage(xs, ys, [(0, 0, 15, 10), (5, 0, 20, 5)])
    assert np.allclose(cover, [[1.0, 0.75], [0.0, 0.0]])
    assert np.allclose(union_coverage(xs, ys, [(-5, -5, 50, 50)]), 1.0)


def _explanation(caption: str, attribution: np.ndarray, crop_box=(0.0, 0.0, 96.0, 96.0)) -> Explanation:
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    ids = tokenize(tokenizer, caption).token_ids.tolist()
    return Explanation(
        attribution=attribution,
        cls_attribution=np.zeros(len(ids)),
        token_ids=ids,
        tokens=[token_label(tokenizer, i) for i in ids],
        score=0.0,
        logit_scale=1.0,
        reference_terms=ReferenceTerms(0, 0, 0),
        convergence_delta=0.0,
        crop_box=crop_box,
        image_size=(int(crop_box[0] + crop_box[2]), int(crop_box[3])),  # the crop box centred in it
        request_id="r",
        model="m",
        options=ResolvedOptions(0, 0, 1, "gausslegendre"),
        queue_seconds=0,
        compute_seconds=0,
    )


@pytest.mark.slow
def test_phrase_rows_are_the_tokenizers_rows_and_only_they_make_the_heatmap():
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    rng = np.random.default_rng(0)
    for scene, caption in scenes(6, 40):
        n = len(tokenizer.encode(caption.text)) + 2
        for phrase in caption.phrases:
            # the tokenizer's own answer: tokens of the text before the phrase, and up to its end
            expected = list(
                range(
                    1 + len(tokenizer.encode(caption.text[: phrase.start])),
                    1 + len(tokenizer.encode(caption.text[: phrase.end])),
                )
            )
            base = _explanation(caption.text, np.zeros((n, 8, 8)))
            rows = phrase_rows(base, caption.text, phrase.start, phrase.end)
            assert rows == expected
            # a spike in any other row never moves the peak; a spike in the phrase's rows does
            attribution = rng.normal(0, 0.01, (n, 8, 8))
            attribution[rows, 2, 5] += 1.0
            for other in set(range(n)) - set(rows):
                attribution[other, 6, 1] += 5.0
            result = score_phrase(_explanation(caption.text, attribution), rows, [(60, 24, 72, 36)])
            assert result.peak == (2, 5) and result.pointing_hit


@pytest.mark.unit
def test_phrase_offsets_hold_across_control_characters():
    """The service reads a NUL as a space: the words around it stay apart and keep their offsets."""
    text = "a red\x00circle\x1band a blue square"
    exp = _explanation(text, np.zeros((9, 8, 8)))
    assert exp.tokens[1:-1] == ("a", "red", "circle", "and", "a", "blue", "square")
    assert phrase_rows(exp, text, text.index("circle"), text.index("circle") + 6) == [3]
    assert phrase_rows(exp, text, text.index("blue"), len(text)) == [6, 7]


@pytest.mark.unit
def test_pointing_maps_cells_through_the_crop_box():
    caption = "a red circle"
    attribution = np.zeros((5, 4, 4))
    attribution[2:4, 1, 3] = 1.0  # "red circle", grid row 1, column 3
    # the model saw x in [100, 300), y in [0, 200) of a wider image: cell (1, 3) is x 250-300, y 50-100
    exp = _explanation(caption, attribution, crop_box=(100.0, 0.0, 300.0, 200.0))
    assert score_phrase(exp, [2, 3], [(260, 60, 290, 90)]).pointing_hit
    assert not score_phrase(exp, [2, 3], [(150, 60, 200, 90)]).pointing_hit
    assert score_phrase(exp, [2, 3], [(250, 50, 300, 100)]).relevance_mass == pytest.approx(1.0)
    with pytest.raises(AlignmentError):
        phrase_rows(
            dataclasses.replace(exp, tokens=("<start_of_text>", "a", "blue", "circle", "<end_of_text>")), caption, 2, 12
        )
