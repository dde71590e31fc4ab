"""The service equals the authors' reference implementation, exclip 1.1 (Moeller et al., TMLR 2025)."""

from __future__ import annotations

import io

import numpy as np
import open_clip
import pytest
import torch
from exclip import OpenClipExplainer
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

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
