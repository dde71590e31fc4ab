"""open_clip's own transformer towers split at every layer (engine/families/openclip.py).

Models are real open_clip configs (ViT-B-32, CLIPA, CoCa, worldwide, SigLIP, MobileCLIP text
towers) shrunk to a few narrow blocks, with seeded random weights in float64.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from open_clip.coca_model import CoCa
from open_clip.factory import get_model_config
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer
from torch.func import jvp, vjp, vmap

from explain_server.engine.families import image_tower, split_towers, text_tower
from explain_server.engine.families.openclip import TextTower, VisionTower
from explain_server.engine.split import UnsupportedModelError

pytestmark = pytest.mark.unit

CONTEXT = 12
SOT, EOT = 49406, 49407  # CLIP's start and end tokens; the end token is the largest id
TINY_VISION = {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 8}
TINY_TEXT = {"context_length": CONTEXT, "width": 32, "heads": 4, "layers": 2}

# name -> (real architecture, overrides of its vision_cfg or None = a tiny open_clip ViT in place
# of a timm tower, overrides of its text_cfg, model-level overrides)
VARIANTS = {
    "ViT-B-32": ("ViT-B-32", {}, {}, {}),
    "ViT-B-32-quickgelu": ("ViT-B-32-quickgelu", {}, {}, {}),
    "ViT-L-14-CLIPA": ("ViT-L-14-CLIPA", {}, {}, {}),
    "ViT-H-14-worldwide": ("ViT-H-14-worldwide", {}, {"vocab_size": 1000}, {}),
    "coca_ViT-B-32": ("coca_ViT-B-32", {"attn_pooler_queries": 8, "attn_pooler_heads": 4}, {}, {}),
    "ViT-B-16-SigLIP": ("ViT-B-16-SigLIP", None, {"vocab_size": 1000}, {}),
    "ViT-SO400M-16-SigLIP-i18n-256": ("ViT-SO400M-16-SigLIP-i18n-256", None, {"vocab_size": 1000}, {}),
    "ViT-B-16-SigLIP2": ("ViT-B-16-SigLIP2", None, {"vocab_size": 1000}, {}),
    "MobileCLIP-S1": ("MobileCLIP-S1", None, {}, {}),
    "MobileCLIP-B": ("MobileCLIP-B", None, {}, {}),
    # not in any pretrained config: CustomResidualAttentionBlock with every option but scaled
    # cosine, layer scale, avg pooling with ln_post before it, 'first' text pooling
    "custom-blocks": (
        "ViT-B-32",
        {
            "qk_norm": True,
            "scale_heads": True,
            "scale_attn_inner": True,
            "scale_attn": True,
            "scale_fc": True,
            "ls_init_value": 0.5,
            "pool_type": "avg",
        },
        {"qk_norm": True, "scale_heads": True, "scale_attn": True, "scale_fc": True, "ls_init_value": 0.5},
        {},
    ),
    "first-pool": ("ViT-B-32", {"no_ln_pre": True}, {"pool_type": "first", "proj_bias": True}, {"custom_text": True}),
}


def tiny_config(name: str) -> dict:
    """The real config of VARIANTS[name], shrunk: same module types and pooling, tiny sizes."""
    architecture, vision, text, model = VARIANTS[name]
    cfg = copy.deepcopy(get_model_config(architecture))
    cfg["embed_dim"] = 16
    if vision is None or "timm_model_name" in cfg["vision_cfg"]:
        cfg["vision_cfg"] = dict(TINY_VISION)
    else:
        cfg["vision_cfg"].update(TINY_VISION, **vision)
    cfg["text_cfg"].update(TINY_TEXT, **text)
    if "multimodal_cfg" in cfg:
        cfg["multimodal_cfg"].update(context_length=CONTEXT, width=32, heads=4, layers=1)
    cfg.update(model)
    return cfg


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """The tiny model of ``name`` with seeded random weights, float64, eval mode, no gradients."""
    cfg = tiny_config(name)
    custom = cfg.pop("custom_text", False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if "multimodal_cfg" in cfg:
            model = CoCa(**cfg)
        else:
            model = (CustomTextCLIP if custom else CLIP)(**cfg)
        # open_clip leaves some parameters at zero or one (biases, layer scales, norms): randomise
        # them so that every term is exercised
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.data.normal_(parameter.data.mean().item(), 0.2)
    return model.double().eval().requires_grad_(False)  # as the server loads it


MODELS = {name: build(name) for name in VARIANTS}


def caption_ids(model: torch.nn.Module, lengths: list[int], seed: int = 0) -> torch.Tensor:
    """Random captions of ``lengths`` ids (start, words, end), zero-padded to the context length.

    The end token is the one the tower pools: ``eos_id`` for 'eos' pooling, else the largest id
    (what 'argmax' finds). Words avoid the pad id 0 and the start and end ids.
    """
    tower = text_tower(model)
    vocab = tower.source.token_embedding.num_embeddings
    end = getattr(tower.source, "eos_id", getattr(tower.source, "text_eos_id", None))
    if tower.pool_type != "eos":
        end = vocab - 1
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), tower.context_length, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(3, vocab - 2, (length,), generator=generator)
        ids[row, 0], ids[row, length - 1] = vocab - 2, end
    return ids


def text_inputs(model: torch.nn.Module, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids as the engine passes them, the same ids at the context length for open_clip) and lengths:
    cut after the longest caption unless the tower sees padding."""
    full = caption_ids(model, lengths, seed)
    cut = full if text_tower(model).sees_padding else full[:, : max(lengths)]
    return cut, full


def images(seed: int = 0, batch: int = 2) -> torch.Tensor:
    """Random normalised pixels (B, 3, 32, 32), float64."""
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def own_text(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model.encode_text(ids, normalize=False)


def own_image(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    return model.encode_image(pixels, normalize=False)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_text_composition_equals_encode_text_at_every_layer(name):
    model = MODELS[name]
    tower = text_tower(model)
    lengths = torch.tensor([3, 7, CONTEXT])
    ids, full = text_inputs(model, lengths.tolist())
    expected = own_text(model, full)
    assert expected.shape == (3, tower.embed_dim)
    for layer in range(len(tower.layers)):
        hidden = tower.lower(ids, layer, lengths)
        assert hidden.shape[1] == ids.shape[1] + len(tower.suffix)
        torch.testing.assert_close(tower.upper(hidden, layer, lengths), expected, rtol=0, atol=1e-10)
    # every text pooling reads one row: at a ``head`` layer the other positions would have no attribution
    assert [layer.name for layer in tower.layers] == ["block 0", "block 1"]
    assert tower.default_layer == 1


@pytest.mark.parametrize("name", list(VARIANTS))
def test_image_composition_equals_encode_image_at_every_layer(name):
    model = MODELS[name]
    tower = image_tower(model)
    pixels = images()
    expected = own_image(model, pixels)
    lengths = torch.zeros(2, dtype=torch.long)
    for layer in range(len(tower.layers)):
        hidden = tower.lower(pixels, layer, lengths)
        assert hidden.shape == (2, tower.layers[layer].positions, hidden.shape[2])
        torch.testing.assert_close(tower.upper(hidden, layer, lengths), expected, rtol=0, atol=1e-10)
    assert all(layer.grid == (4, 4) and layer.prefix == ("cls",) for layer in tower.layers)
    assert tower.embed_dim == expected.shape[1] == 16


def check_jvp_vjp(upper, hidden: torch.Tensor, seed: int) -> None:
    """<u, J t> through vmapped jvp equals <J^T u, t> through vmapped vjp, for random u, t.

    The tangents are row-sparse, as the engine's (a random delta on one row, zero elsewhere),
    but for the first, which is dense, so that it moves the embedding at every layer.
    """
    generator = torch.Generator().manual_seed(seed)
    seq = hidden.shape[1]
    rows = torch.randint(0, seq, (4,), generator=generator)
    tangents = torch.zeros(4, *hidden.shape, dtype=hidden.dtype)
    for k, row in enumerate(rows):
        tangents[k, :, row] = torch.randn(hidden.shape[0], hidden.shape[2], generator=generator, dtype=hidden.dtype)
    tangents[0] = torch.randn(hidden.shape, generator=generator, dtype=hidden.dtype)
    pushed = vmap(lambda t: jvp(upper, (hidden,), (t,))[1])(tangents)
    output, pull = vjp(upper, hidden)
    cotangents = torch.randn(3, *output.shape, generator=generator, dtype=hidden.dtype)
    pulled = vmap(lambda u: pull(u)[0])(cotangents)
    forward = torch.einsum("kbd,jbd->kj", cotangents, pushed)
    reverse = torch.einsum("kbsd,jbsd->kj", pulled, tangents)
    torch.testing.assert_close(forward, reverse, rtol=1e-9, atol=1e-12)
    assert pushed[0].abs().min() > 0
    # and forward mode agrees with a finite difference
    step = 1e-6
    difference = (upper(hidden + step * tangents[0]) - upper(hidden - step * tangents[0])) / (2 * step)
    torch.testing.assert_close(pushed[0], difference, rtol=1e-5, atol=1e-7)


captions = st.lists(st.integers(3, CONTEXT), min_size=1, max_size=3)


@pytest.mark.parametrize("name", list(VARIANTS))
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_text_upper_jvp_vjp_under_vmap(name, data):
    model = MODELS[name]
    tower = text_tower(model)
    layer = data.draw(st.integers(0, len(tower.layers) - 1), label="layer")
    lengths = torch.tensor(data.draw(captions, label="lengths"))
    ids, _ = text_inputs(model, lengths.tolist(), seed=int(lengths.sum()))
    hidden = tower.lower(ids, layer, lengths)
    check_jvp_vjp(lambda h: tower.upper(h, layer, lengths), hidden, seed=layer)


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-L-14-CLIPA", "coca_ViT-B-32", "custom-blocks", "first-pool"])
@settings(max_examples=4, deadline=None)
@given(layer=st.integers(0, 2), batch=st.integers(1, 3))
def test_image_upper_jvp_vjp_under_vmap(name, layer, batch):
    tower = image_tower(MODELS[name])
    lengths = torch.zeros(batch, dtype=torch.long)
    hidden = tower.lower(images(seed=batch, batch=batch), layer, lengths)
    check_jvp_vjp(lambda h: tower.upper(h, layer, lengths), hidden, seed=layer)


@pytest.mark.parametrize("name", [n for n in VARIANTS if not text_tower(MODELS[n]).sees_padding])
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_padding_to_the_longest_caption_changes_no_embedding(name, data):
    model = MODELS[name]
    tower = text_tower(model)
    layer = data.draw(st.integers(0, len(tower.layers) - 1), label="layer")
    lengths = data.draw(st.lists(st.integers(3, CONTEXT), min_size=2, max_size=4), label="lengths")
    ids, full = text_inputs(model, lengths)
    lengths = torch.tensor(lengths)
    batched = tower.upper(tower.lower(ids, layer, lengths), layer, lengths)
    for row, length in enumerate(lengths.tolist()):
        alone = ids[row : row + 1, :length]
        own = tower.upper(tower.lower(alone, layer, lengths[row : row + 1]), layer, lengths[row : row + 1])
        torch.testing.assert_close(batched[row : row + 1], own, rtol=0, atol=1e-10)
    torch.testing.assert_close(batched, own_text(model, full), rtol=0, atol=1e-10)


def test_which_towers_see_padding():
    seen = {name: text_tower(MODELS[name]).sees_padding for name in VARIANTS}
    assert seen == {
        "ViT-B-32": False,
        "ViT-B-32-quickgelu": False,
        "ViT-L-14-CLIPA": True,  # not causal, pools the last position
        "ViT-H-14-worldwide": False,
        "coca_ViT-B-32": True,  # the class token's position is the padded length
        "ViT-B-16-SigLIP": True,
        "ViT-SO400M-16-SigLIP-i18n-256": True,
        "ViT-B-16-SigLIP2": True,
        "MobileCLIP-S1": True,  # not causal: the end token's row attends to the padding
        "MobileCLIP-B": False,
        "custom-blocks": False,
        "first-pool": False,
    }


def test_clip_tokenizer_end_token_is_the_row_before_the_padding():
    """argmax pooling picks row lengths - 1 on real tokenised captions, truncated ones included."""
    model = MODELS["ViT-B-32"]
    tower = text_tower(model)
    texts = ["a dog", "two cats on a red sofa!", "a very long caption " * 6, "!"]
    ids = SimpleTokenizer(context_length=CONTEXT)(texts)
    lengths = torch.tensor([len(SimpleTokenizer().encode(t)) + 2 for t in texts]).clamp(max=CONTEXT)
    assert torch.equal(ids.argmax(-1), lengths - 1)
    expected = own_text(model, ids)
    for layer in range(len(tower.layers)):
        cut = ids[:, : int(lengths.max())]
        torch.testing.assert_close(tower.upper(tower.lower(cut, layer, lengths), layer, lengths), expected)


def test_eos_pooling_on_a_local_hf_tokenizer(tmp_path):
    """eos pooling (the worldwide towers' xlm-v tokenizer: <s>=0, <pad>=1, </s>=2) picks row lengths - 1."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["a", "dog", "cat", "on", "red", "sofa", "two", "very", "long", "caption"]
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(tmp_path)
    tokenizer = HFTokenizer(str(tmp_path), context_length=CONTEXT)
    texts = ["a dog", "two cat on a red sofa", "a very long caption " * 4]
    ids = tokenizer(texts)
    lengths = (ids != 1).sum(-1)
    assert torch.equal((ids == 2).int().argmax(-1), lengths - 1)
    model = MODELS["ViT-H-14-worldwide"]
    tower = text_tower(model)
    padded = ids.masked_fill(ids == 1, tower.pad_id)  # the tower's padding
    expected = own_text(model, ids)
    for layer in range(len(tower.layers)):
        cut = padded[:, : int(lengths.max())]
        torch.testing.assert_close(tower.upper(tower.lower(cut, layer, lengths), layer, lengths), expected)


def test_dispatch_by_tower_class():
    text, image = split_towers(MODELS["coca_ViT-B-32"])
    assert isinstance(text, TextTower) and text.suffix == ("cls",)
    assert isinstance(image, VisionTower)
    assert isinstance(text_tower(MODELS["ViT-B-32"]), TextTower)
    assert isinstance(text_tower(MODELS["ViT-B-16-SigLIP"]), TextTower)
    model = torch.nn.Module()
    model.visual = torch.nn.Identity()
    with pytest.raises(UnsupportedModelError, match="image tower Identity of Module"):
        image_tower(model)
    with pytest.raises(UnsupportedModelError, match="text tower Module of Module"):
        text_tower(model)


def test_unsupported_variants_are_named():
    cfg = tiny_config("ViT-B-32")
    cfg["vision_cfg"]["scaled_cosine_attn"] = True
    with pytest.raises(UnsupportedModelError, match="CustomResidualAttentionBlock with scaled cosine"):
        image_tower(CLIP(**cfg))
    cfg = tiny_config("ViT-B-32")
    cfg["vision_cfg"]["pool_type"] = "none"
    with pytest.raises(UnsupportedModelError, match="pool_type 'none'"):
        image_tower(CLIP(**cfg))
    cfg = tiny_config("ViT-B-32")
    cfg["text_cfg"]["pool_type"] = "none"
    with pytest.raises(UnsupportedModelError, match="text pool_type 'none'"):
        text_tower(CLIP(**cfg))


def test_variants_cover_the_pretrained_tower_variants():
    """Every (tower class, variant) that a pretrained config builds from open_clip's own modules is
    among the tested ones (the architecture survey in tests/openclip_coverage.py lists them)."""
    from openclip_coverage import survey

    tested = {json.dumps(v, sort_keys=True) for n in VARIANTS for v in survey_variants(tiny_config(n))}
    needed = {json.dumps(v, sort_keys=True) for row in survey() for v in row["variants"]}
    assert needed <= tested, needed - tested


def survey_variants(cfg: dict) -> list:
    from openclip_coverage import variants

    return variants(cfg)


def test_float32_models_agree_with_their_own_forward():
    model = build("coca_ViT-B-32").float()
    lengths = torch.tensor([4, CONTEXT])
    ids, full = text_inputs(model, lengths.tolist())
    tower = text_tower(model)
    np.testing.assert_allclose(
        tower.upper(tower.lower(ids, 1, lengths), 1, lengths).detach().numpy(),
        own_text(model, full).detach().numpy(),
        rtol=1e-4,
        atol=1e-5,
    )


# --- the row-wise split of f_hi (engine/generic.py's cheaper JVPs) ---------------------------


def split_layers(tower) -> list[int]:
    """The layers at which ``tower`` offers a row split."""
    return [layer for layer in range(len(tower.layers)) if tower.row_split(layer) is not None]


def test_which_layers_split():
    """Every text tower at its last block; class-token image towers at their last block, CoCa's
    attentional pooler at the head; no split where f_hi begins with a block whose rows are all averaged."""
    for name in VARIANTS:
        model = MODELS[name]
        assert split_layers(text_tower(model)) == [1], name
        want = {"coca_ViT-B-32": [2], "custom-blocks": [], "ViT-L-14-CLIPA": []}.get(name, [1])
        assert split_layers(image_tower(model)) == want, name


def path_integrals(tower, hidden: torch.Tensor, lengths: torch.Tensor, n_steps: int = 3) -> list:
    """One path per input, from a shared random reference, as the explainer sets them up."""
    from explain_server.engine.attribution import PathIntegral
    from explain_server.engine.quadrature import nodes_and_weights

    generator = torch.Generator().manual_seed(7)
    reference = torch.randn(hidden.shape[1:], generator=generator, dtype=hidden.dtype)
    alphas, weights = nodes_and_weights("gausslegendre", n_steps)
    own = tower.own_rows(lengths, hidden.shape[1])
    return [
        PathIntegral(h, reference, alphas, weights, length=int(n), content_length=int(c))
        for h, n, c in zip(hidden, own, lengths)
    ]


def check_split(tower, layer: int, hidden: torch.Tensor, lengths: torch.Tensor) -> None:
    """rest o rows is f_hi, and the generic path's factors are the same with the split as without."""
    from explain_server.engine import generic
    from explain_server.engine.attribution import ChunkBudget

    split = tower.row_split(layer)
    positions = torch.arange(hidden.shape[1]).expand(hidden.shape[0], -1)
    with torch.no_grad():
        got = split.rest(split.rows(hidden, positions), lengths)
        torch.testing.assert_close(got, tower.upper(hidden, layer, lengths), rtol=0, atol=1e-10)
        paths = path_integrals(tower, hidden, lengths)
        fast = generic._forward(tower, layer, paths, ChunkBudget(1 << 16))
        tower.row_split = lambda layer: None  # the same tower without the split (an instance attribute)
        try:
            slow = generic._forward(tower, layer, paths, ChunkBudget(1 << 30))
        finally:
            del tower.row_split
    for factor, expected in zip(fast, slow):
        torch.testing.assert_close(factor, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", list(VARIANTS))
@settings(max_examples=3, deadline=None)
@given(lengths=st.lists(st.integers(3, CONTEXT), min_size=1, max_size=3))
def test_text_row_split_is_f_hi_and_keeps_the_factors(name, lengths):
    """Captions of different lengths in one batch: their pooled rows, causal and key masks come from lengths."""
    model = MODELS[name]
    tower = text_tower(model)
    ids, _ = text_inputs(model, lengths, seed=sum(lengths))
    lengths = torch.tensor(lengths)
    layer = len(tower.blocks) - 1
    check_split(tower, layer, tower.lower(ids, layer, lengths), lengths)


@pytest.mark.parametrize("name", [n for n in VARIANTS if n not in ("custom-blocks", "ViT-L-14-CLIPA")])
def test_image_row_split_is_f_hi_and_keeps_the_factors(name):
    tower = image_tower(MODELS[name])
    (layer,) = split_layers(tower)
    hidden = tower.lower(images(seed=3), layer, None)
    check_split(tower, layer, hidden, torch.full((2,), hidden.shape[1]))  # an image's rows are all its own
