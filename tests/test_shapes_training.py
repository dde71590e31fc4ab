"""The shapes model's training: deterministic batches and weights, hard negatives, the shipped files."""

from __future__ import annotations

import dataclasses

import numpy as np
import open_clip
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from safetensors.torch import load_file

from explain_server.shapes import model as shapes_model
from explain_server.shapes import training
from explain_server.shapes.scenes import describe, generate_scene, random_style

pytestmark = pytest.mark.unit

TINY_RECIPE = training.Recipe(steps=2, scenes_per_batch=3, warmup_steps=1)


def _batch(step: int) -> training.Batch:
    open_clip.add_model_config(shapes_model.CONFIG)
    tokenizer = open_clip.get_tokenizer(shapes_model.ARCHITECTURE)
    cfg = training.build_model(0).visual.preprocess_cfg
    return training.make_batch(
        TINY_RECIPE, step, tokenizer, image_transform_v2(PreprocessCfg(**cfg), is_train=False), 12
    )


def test_batches_are_a_function_of_seed_and_step():
    a, b, c = _batch(5), _batch(5), _batch(6)
    for field in ("pixels", "tokens", "positives", "kinds", "pairs"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert not torch.equal(a.pixels, c.pixels)
    # 3 scenes and their twins; each image's own caption describes it, its twin's does not
    assert a.pixels.shape[0] == 6 and a.tokens.shape[0] == 12
    assert a.positives[:, :6].diagonal().all()
    assert not a.positives[0, 1] and not a.positives[1, 0]


@pytest.mark.parametrize("token_pairs", [0.0, 1.0])
def test_training_is_deterministic(token_pairs):
    recipe = dataclasses.replace(TINY_RECIPE, token_pairs=token_pairs)
    first = training.train(recipe, log=lambda _: None).state_dict()
    second = training.train(recipe, log=lambda _: None).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["visual.proj"], training.build_model(0).state_dict()["visual.proj"])


def test_hard_negatives_are_false_for_their_scene():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = generate_scene(rng, n_objects=(1, 4))
        style = random_style(scene, rng)
        assert training.describes_exactly(training.named_objects(scene, style), scene)
        for negative in (
            training.hard_negative(scene, rng),
            training.altered(scene, rng, "colour"),
            training.altered(scene, rng, "shape"),
        ):
            assert not training.describes_exactly(training.named_objects(negative, style), scene)
            assert describe(negative, style).text != describe(scene, style).text


def test_shipped_weights_fit_the_config_and_the_budget():
    assert shapes_model.WEIGHTS.stat().st_size <= 10_000_000
    state = load_file(str(shapes_model.WEIGHTS))
    open_clip.add_model_config(shapes_model.CONFIG)
    model = open_clip.create_model(
        shapes_model.ARCHITECTURE, pretrained=str(shapes_model.WEIGHTS), require_pretrained=True
    )
    assert set(state) == set(model.state_dict())
    assert tuple(model.visual.grid_size) == (8, 8)


def test_patch_kind_labels_name_the_object_covering_most_of_each_patch():
    scene = generate_scene(np.random.default_rng(3), n_objects=2)
    square = dataclasses.replace(scene.objects[0], shape="square", box=(12, 12, 36, 30))  # full rows 1, half of row 2
    circle = dataclasses.replace(scene.objects[1], shape="circle", box=(60, 60, 84, 84))  # a disc in 2x2 patches
    labels = training.patch_kind_labels(dataclasses.replace(scene, objects=(square, circle)), 12).reshape(8, 8)
    kind = {o.shape: training.KINDS.index((o.colour, o.shape, o.size)) for o in (square, circle)}
    expected = np.full((8, 8), training.BACKGROUND_KIND)
    expected[1:3, 1:3] = kind["square"]  # row 2 is half covered
    expected[5:7, 5:7] = kind["circle"]  # each quarter of the disc covers about 79% of its patch
    assert (labels == expected).all()
    # A sliver below a fifth of a patch leaves it background.
    sliver = dataclasses.replace(square, box=(12, 12, 36, 26))  # 2 of row 2's 12 pixel rows
    labels = training.patch_kind_labels(dataclasses.replace(scene, objects=(sliver,)), 12).reshape(8, 8)
    assert (labels[1, 1:3] == kind["square"]).all() and (labels[2] == training.BACKGROUND_KIND).all()


def test_token_pair_labels_name_each_shape_word_after_a_colour_word():
    open_clip.add_model_config(shapes_model.CONFIG)
    tokenizer = open_clip.get_tokenizer(shapes_model.ARCHITECTURE)
    # Every word and full stop is one token; token 0 is the start token.
    texts = [
        "a small red circle next to a blue square.",
        "there is a cross, a large black diamond and a yellow triangle.",
    ]
    labels = training.token_pair_labels(tokenizer(texts), tokenizer)
    named = [{int(t): training.PAIRS[int(p)] for t, p in enumerate(row) if p != training.NO_PAIR} for row in labels]
    # "cross" follows "a", not a colour word
    assert named == [
        {4: ("red", "circle"), 9: ("blue", "square")},
        {9: ("black", "diamond"), 13: ("yellow", "triangle")},
    ]
