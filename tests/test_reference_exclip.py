"""The service equals the authors' reference implementation, exclip 1.1 (Moeller et al., TMLR 2025)."""

from __future__ import annotations

import copy
import io
import json

import numpy as np
import open_clip
import pytest
import torch
from conftest import TINY, seeded_model
from exclip import OpenClipExplainer
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from explain_server.engine.attribution import ChunkBudget
from explain_server.engine.explainer import Explainer

pytestmark = pytest.mark.slow

CAPTION = "a cat sitting on a wooden floor"


def test_vit_b_32_equals_exclip(client, b32_weights):
    """Same weights file, layers (input of the last block), n_steps=10 and references."""
    rng = np.random.default_rng(7)
    photo = Image.fromarray(rng.integers(0, 256, size=(240, 320, 3), dtype=np.uint8))
    encoded = io.BytesIO()
    photo.save(encoded, format="PNG")

    served = client.explain(encoded.getvalue(), CAPTION, model="b32", method="riemann_right", n_steps=10)

    model = open_clip.create_model("ViT-B-32", pretrained=str(b32_weights)).eval()
    pixels = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)(photo)[None]
    tokens = open_clip.get_tokenizer("ViT-B-32")([CAPTION])
    explainer = OpenClipExplainer(model, device=torch.device("cpu"))
    reference, score, *_ = explainer.explain(
        tokens, pixels, text_layer=11, image_layer=11, N=10, compute_lhs_terms=True
    )
    reference = reference.numpy()  # (T, 7, 7): exclip drops the class-token column

    assert served.options.method == "riemann_right" and served.options.text_layer == 11
    assert served.attribution.shape == reference.shape
    error = np.linalg.norm(served.attribution - reference) / np.linalg.norm(reference)
    assert error <= 1e-4
    assert served.score == pytest.approx(score, abs=1e-5)


@pytest.mark.parametrize("text_layer, image_layer", [(0, 0), (1, 1), (2, 2), (3, 3), (0, 3), (3, 0)])
def test_every_layer_equals_exclip_on_a_four_block_model(tmp_path, text_layer, image_layer):
    """In-process: the engine's fast path against exclip at every layer of both towers."""
    config = copy.deepcopy(open_clip.get_model_config(TINY))
    config["vision_cfg"]["layers"] = config["text_cfg"]["layers"] = 4
    path = tmp_path / "tiny-4-blocks.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    model = seeded_model("tiny-4-blocks")
    tokenizer = open_clip.get_tokenizer(TINY)
    tokens = tokenizer([CAPTION])
    pixels = torch.randn((1, 3, 64, 64), generator=torch.Generator().manual_seed(5))

    reference = (
        OpenClipExplainer(model, image_dim=64, device=torch.device("cpu"))
        .explain(tokens, pixels, text_layer=text_layer, image_layer=image_layer, N=10)
        .numpy()
    )
    explainer = Explainer.for_clip(
        model.requires_grad_(False),
        sot_token_id=tokenizer.sot_token_id,
        eot_token_id=tokenizer.eot_token_id,
        budget=ChunkBudget(1 << 20),
    )
    ids = tokens[0, : int(tokens[0].argmax()) + 1].long()
    got = (
        explainer.explain(
            ids, pixels[0], text_layer=text_layer, image_layer=image_layer, method="riemann_right", n_steps=10
        )
        .interactions[:, 1:]
        .reshape(reference.shape)
    )
    assert np.linalg.norm(got - reference) <= 1e-5 * np.linalg.norm(reference)
