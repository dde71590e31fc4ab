"""Hugging Face text towers in open_clip (RoBERTa, XLM-RoBERTa, NLLB's M2M-100, BERT), split at every layer."""

from __future__ import annotations

import open_clip
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_hf import FAMILIES, register_tiny_hf_clip

from explain_server.engine import generic
from explain_server.engine.attribution import ChunkBudget, PathIntegral
from explain_server.engine.families import text_tower
from explain_server.engine.families.hf_text import HFTextTower
from explain_server.engine.quadrature import nodes_and_weights
from explain_server.inputs import tokenize
from explain_server.tokenizers import load_tokenizer

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (float64 model, its tower adapter, its tokenizer), seeded random weights."""
    root = tmp_path_factory.mktemp("hf")
    built = {}
    for family in FAMILIES:
        name = register_tiny_hf_clip(root, family)
        torch.manual_seed(0)
        model = open_clip.create_model(name, pretrained=None, pretrained_text=False).double().eval()
        built[family] = (model, text_tower(model), load_tokenizer(name, str(root / family)))
    return built


def padded(model, tokenizer, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded with the pad id to the longest caption, and each caption's length."""
    rows = [tokenize(tokenizer, c).token_ids for c in captions]
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.full((len(rows), int(lengths.max())), tokenizer.pad_id, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = row
    return ids, lengths


CAPTIONS = ["a photo of a cat", "صورة قطة", "猫", "two dogs playing in the grass 🐶", "café naïve"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_adapter_is_chosen_and_names_its_layers(models, family):
    model, tower, tokenizer = models[family]
    assert isinstance(tower, HFTextTower) and not tower.sees_padding
    n = len(tower.blocks)
    # ``head`` only where the pooler reads every token: a class-token pooler reads one
    head = ["head"] if type(model.text.pooler).__name__ == "MeanPooler" else []
    assert [layer.name for layer in tower.layers] == [*(f"block {i}" for i in range(n)), *head]
    # the pooler's input where it has one, else the last block's
    assert tower.default_layer == len(tower.layers) - 1 and tower.embed_dim == 24
    assert tower.pad_id == model.text.config.pad_token_id == tokenizer.pad_id
    assert model.text.transformer.config._attn_implementation == "eager"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_upper_of_lower_is_the_models_embedding_at_every_layer(models, family):
    model, tower, tokenizer = models[family]
    ids, lengths = padded(model, tokenizer, CAPTIONS)
    with torch.no_grad():
        want = model.encode_text(ids)
        for layer in range(len(tower.layers)):
            got = tower.upper(tower.lower(ids, layer, lengths), layer, lengths)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=f"layer {tower.layers[layer].name}")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_padding_does_not_change_the_embedding(models, family):
    model, tower, tokenizer = models[family]
    ids, lengths = padded(model, tokenizer, ["a cat"])
    longer = torch.cat([ids, torch.full((1, 7), tokenizer.pad_id)], dim=1)
    with torch.no_grad():
        alone = model.encode_text(ids)
        torch.testing.assert_close(model.encode_text(longer), alone, rtol=0, atol=1e-12)
        for layer in range(len(tower.layers)):
            hidden = tower.lower(longer, layer, lengths)
            hidden[:, ids.shape[1] :] = torch.randn_like(hidden[:, ids.shape[1] :])  # whatever the pad rows hold
            torch.testing.assert_close(tower.upper(hidden, layer, lengths), alone, rtol=0, atol=1e-10)


@pytest.mark.parametrize("family", list(FAMILIES))
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_upper_is_transformed_by_vmap_of_jvp_and_vjp(models, family, data):
    """The generic engine's use: per-row tangents through jvp under vmap, cotangents through vjp under vmap."""
    model, tower, tokenizer = models[family]
    batch = data.draw(st.integers(1, 3), label="batch")
    captions = data.draw(st.lists(st.sampled_from(CAPTIONS), min_size=batch, max_size=batch), label="captions")
    layer = data.draw(st.integers(0, len(tower.layers) - 1), label="layer")
    ids, lengths = padded(model, tokenizer, captions)
    hidden = tower.lower(ids, layer, lengths).detach()
    b, s, d = hidden.shape

    def f(h):
        return tower.upper(h, layer, lengths)

    rows = torch.randint(0, int(lengths.min()), (4,))
    tangents = torch.zeros(4, b, s, d, dtype=hidden.dtype)
    tangents[torch.arange(4), :, rows] = torch.randn(4, b, d, dtype=hidden.dtype)
    jvps = torch.func.vmap(lambda t: torch.func.jvp(f, (hidden,), (t,))[1])(tangents)
    eps = 1e-6
    for k in range(4):
        finite = (f(hidden + eps * tangents[k]) - f(hidden - eps * tangents[k])) / (2 * eps)
        torch.testing.assert_close(jvps[k], finite, rtol=1e-6, atol=1e-7)
    _, pullback = torch.func.vjp(f, hidden)
    cotangents = torch.randn(3, b, tower.embed_dim, dtype=hidden.dtype)
    (vjps,) = torch.func.vmap(pullback)(cotangents)
    # <c, J t> = <J^T c, t> for every pair
    left = torch.einsum("cbe,tbe->ct", cotangents, jvps)
    right = torch.einsum("cbsd,tbsd->ct", vjps, tangents)
    torch.testing.assert_close(left, right, rtol=1e-9, atol=1e-12)


def test_nllb_pools_its_language_token(models):
    """NLLB's cls_pooler reads row 0, the language code: at the head, only row 0 moves the embedding."""
    model, tower, tokenizer = models["nllb"]
    ids, lengths = padded(model, tokenizer, ["a photo of a cat"])
    head = len(tower.layers) - 1
    hidden = tower.lower(ids, head, lengths).detach()
    tangent = torch.zeros_like(hidden)
    tangent[:, 1:] = 1.0
    assert torch.func.jvp(lambda h: tower.upper(h, head, lengths), (hidden,), (tangent,))[1].abs().max() == 0
    assert tokenizer.special_label(int(ids[0, 0])) == "eng_Latn"


@pytest.mark.parametrize("family", list(FAMILIES))
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(captions=st.lists(st.sampled_from(CAPTIONS), min_size=1, max_size=3))
def test_the_row_split_is_f_hi_and_keeps_the_factors(models, family, captions):
    """At the last encoder layer rest(rows(h)) is f_hi, and the generic path's factors are the
    same with the split as without, for captions of different lengths in one batch."""
    model, tower, tokenizer = models[family]
    splits = [layer for layer in range(len(tower.layers)) if tower.row_split(layer) is not None]
    assert splits == [len(tower.blocks) - 1]  # the last encoder layer only
    ids, lengths = padded(model, tokenizer, captions)
    layer = len(tower.blocks) - 1
    split = tower.row_split(layer)
    with torch.no_grad():
        hidden = tower.lower(ids, layer, lengths)
        positions = torch.arange(hidden.shape[1]).expand(len(ids), -1)
        got = split.rest(split.rows(hidden, positions), lengths)
        torch.testing.assert_close(got, model.encode_text(ids), rtol=0, atol=1e-10)
        alphas, weights = nodes_and_weights("gausslegendre", 2)
        reference = torch.randn(hidden.shape[1:], generator=torch.Generator().manual_seed(1), dtype=hidden.dtype)
        paths = [
            PathIntegral(h, reference, alphas, weights, length=int(n), content_length=int(n))
            for h, n in zip(hidden, lengths)
        ]
        fast = generic._forward(tower, layer, paths, ChunkBudget(1 << 16))
        tower.row_split = lambda layer: None  # the same tower without the split
        try:
            slow = generic._forward(tower, layer, paths, ChunkBudget(1 << 30))
        finally:
            del tower.row_split
    for factor, expected in zip(fast, slow):
        torch.testing.assert_close(factor, expected, rtol=1e-9, atol=1e-12)
