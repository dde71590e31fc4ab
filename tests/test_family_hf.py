"""Hugging Face transformers dual encoders: the tower adapters, loading from a directory, and
the equivalence with open_clip on the same weights.

Every model here is tiny (2 layers of width 32, 32 or 64 px images), built from a seeded
config, saved with ``save_pretrained`` beside a tokenizer built with the ``tokenizers``
library and an image processor config: nothing is downloaded.
"""

from __future__ import annotations

import json
import string
import sys

import numpy as np
import open_clip
import pytest
import torch
import transformers
from conftest import TINY_CONFIG
from hypothesis import given, settings
from hypothesis import strategies as st
from open_clip.transform import PreprocessCfg
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch.func import jvp, vjp, vmap

from explain_server.engine.attribution import ChunkBudget
from explain_server.engine.explainer import Explainer
from explain_server.engine.families import hf_models, image_tower, split_towers, text_tower
from explain_server.engine.split import UnsupportedModelError
from explain_server.engine.towers import ImageTower, TextTower
from explain_server.hf_loading import HFLoadError, is_local, load_hf, preprocess_cfg
from explain_server.model_spec import ModelSpec

pytestmark = pytest.mark.unit

WORDS = ("a", "photo", "of", "red", "blue", "cat", "dog", "circle", "square", "and")
PAD, BOS, UNK, EOS = 0, 1, 2, 3  # EOS 2 would be the legacy CLIP config that pools at the highest id
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=40)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=8)
KINDS = ("clip", "siglip", "siglip2")
CAPTIONS = ["a red cat", "a photo of a blue square and a red circle", "dog"]


def word_tokenizer(with_start: bool, max_length: int) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over :data:`WORDS`, built in memory: CLIP's adds start and end
    tokens, SigLIP's the end token only."""
    vocab = {"<pad>": PAD, "<s>": BOS, "<unk>": UNK, "</s>": EOS, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    template = "<s> $A </s>" if with_start else "$A </s>"
    tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("<s>", BOS), ("</s>", EOS)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def char_tokenizer(max_length: int) -> transformers.Siglip2Tokenizer:
    """SigLIP2's tokenizer class (Gemma's, lower-cased) over single characters: AutoTokenizer
    builds this class for a siglip2 config whatever the saved tokenizer says. It adds no
    special tokens and pads on the left."""
    specials = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
    vocab = {token: i for i, token in enumerate((*specials, "\u2581", *string.ascii_lowercase))}
    return transformers.Siglip2Tokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_model(kind: str, seed: int = 0) -> tuple[transformers.PreTrainedModel, object, object]:
    """A seeded tiny ``kind`` model in float32, its tokenizer and its image processor."""
    special = dict(pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "clip":
            config = transformers.CLIPConfig(
                text_config={**TEXT, **special, "max_position_embeddings": 16},
                vision_config={**VISION, "image_size": 32},
                projection_dim=24,
            )
            model = transformers.CLIPModel(config)
            processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32)
            return model, word_tokenizer(True, 16), processor
        text = {**TEXT, **special, "max_position_embeddings": 12}
        if kind == "siglip":
            config = transformers.SiglipConfig(text_config=text, vision_config={**VISION, "image_size": 32})
            model = transformers.SiglipModel(config)
            processor = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
        else:
            # a character per token: room for the longest caption
            text = {**text, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "max_position_embeddings": 48}
            config = transformers.Siglip2Config(text_config=text, vision_config={**VISION, "num_patches": 16})
            model = transformers.Siglip2Model(config)
            processor = transformers.Siglip2ImageProcessor(patch_size=8, max_num_patches=16)
        # transformers initialises these to constants; random values make the tests see them
        torch.nn.init.normal_(model.logit_bias)
        for module in model.modules():
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.Linear)) and module.bias is not None:
                torch.nn.init.normal_(module.bias, std=0.1)
        tokenizer = word_tokenizer(False, 12) if kind == "siglip" else char_tokenizer(48)
        return model, tokenizer, processor


@pytest.fixture(scope="module", params=KINDS)
def saved(request, tmp_path_factory):
    """(kind, directory) of a tiny model saved as ``save_pretrained`` writes it."""
    directory = tmp_path_factory.mktemp(request.param)
    for part in tiny_model(request.param):
        part.save_pretrained(directory)
    return request.param, directory


@pytest.fixture(scope="module")
def loaded(saved):
    """The saved model loaded through the server's loader in float64."""
    return load_hf(str(saved[1]), device=torch.device("cpu"), dtype="float64")


def text_inputs(loaded, captions=CAPTIONS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, lengths and where the padding is, as the tokenizer gives them: padded to
    the longest caption (CLIP, after its end token), or to the context length when the tower
    reads padding (SigLIP; SigLIP2's tokenizer pads on the left)."""
    text = loaded.text
    padding = dict(padding="max_length", max_length=text.context_length) if text.sees_padding else dict(padding=True)
    batch = loaded.tokenizer(captions, return_tensors="pt", **padding)
    return batch["input_ids"], batch["attention_mask"].sum(dim=1), batch["attention_mask"] == 0


def pixels(count: int, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn((count, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def image_features(model, images: torch.Tensor) -> torch.Tensor:
    """``get_image_features`` as transformers' own processor feeds it (SigLIP2: patches, grid, mask)."""
    if isinstance(model, transformers.Siglip2Model):
        tower = hf_models.image_tower(model, grid=images.shape[-1] // model.config.vision_config.patch_size)
        patches = torch.stack([hf_models.convert_image_to_patches(image, tower.patch) for image in images])
        mask = torch.ones(patches.shape[:2], dtype=torch.long)
        spatial = tower.spatial_shapes(len(images), images.device)
        return model.get_image_features(
            pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=spatial
        ).pooler_output
    return model.get_image_features(pixel_values=images).pooler_output


def test_every_layer_composes_to_the_models_own_features(loaded):
    """upper(lower(x, l), l) is get_text_features / get_image_features at every layer, and
    lower(x, block i) is the hidden state transformers records entering layer i."""
    model = loaded.model
    ids, lengths, _ = text_inputs(loaded)
    images = pixels(2)
    with torch.no_grad():
        want_text = model.get_text_features(input_ids=ids).pooler_output
        want_image = image_features(model, images)
        recorded = model.text_model(input_ids=ids, output_hidden_states=True).hidden_states
        for layer in range(len(loaded.text.layers)):
            hidden = loaded.text.lower(ids, layer, lengths)
            torch.testing.assert_close(loaded.text.upper(hidden, layer, lengths), want_text, rtol=0, atol=1e-10)
            if layer < len(recorded) - 1:
                torch.testing.assert_close(hidden, recorded[layer], rtol=0, atol=1e-12)
        for layer in range(len(loaded.image.layers)):
            hidden = loaded.image.lower(images, layer, lengths)
            assert hidden.shape[1] == loaded.image.layers[layer].positions
            got = loaded.image.upper(hidden, layer, torch.full((2,), hidden.shape[1]))
            torch.testing.assert_close(got, want_image, rtol=0, atol=1e-10)
    assert want_text.shape[1] == loaded.text.embed_dim and want_image.shape[1] == loaded.image.embed_dim


def test_layers_name_blocks_and_head_with_the_models_grid(loaded):
    """Blocks, and ``head`` only where the pooling reads every position (SigLIP's MAP head)."""
    text, image = loaded.text, loaded.image
    blocks = ["block 0", "block 1"]
    assert [layer.name for layer in text.layers] == blocks
    assert [layer.name for layer in image.layers] == blocks + (["head"] if loaded.model_type != "clip" else [])
    # the text towers pool one row: their last block; SigLIP's MAP head reads every row: its input
    assert text.default_layer == 1 and image.default_layer == len(image.layers) - 1
    assert all(layer.grid is None and layer.prefix == () for layer in text.layers)
    prefix = ("cls",) if loaded.model_type == "clip" else ()
    assert all(layer.grid == (4, 4) and layer.prefix == prefix for layer in image.layers)
    assert loaded.image_size == (32, 32) and loaded.patch_size == (8, 8)


def test_clip_text_ignores_padding_and_siglip_text_reads_it(loaded):
    """CLIP is causal and pooled at the end token: ids after it cannot move the embedding.
    SigLIP pools the last position of an unmasked tower: padding moves it (sees_padding)."""
    text = loaded.text
    ids, lengths, padding = text_inputs(loaded)
    other = ids.clone()
    other[padding] = UNK
    assert padding.any()
    with torch.no_grad():
        same = torch.allclose(
            text.upper(text.lower(ids, 0, lengths), 0, lengths), text.upper(text.lower(other, 0, lengths), 0, lengths)
        )
    assert text.sees_padding is (loaded.model_type != "clip")
    assert same is (loaded.model_type == "clip")
    assert text.pad_id == loaded.tokenizer.pad_token_id == PAD
    assert text.context_length == {"clip": 16, "siglip": 12, "siglip2": 48}[loaded.model_type]


@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_jvp_and_vjp_under_vmap_are_adjoint(loaded, data):
    """The engine's two derivatives of upper, batched as it batches them: <J t, c> = <t, J^T c>."""
    tower = data.draw(st.sampled_from([loaded.text, loaded.image]), label="tower")
    layer = data.draw(st.integers(0, len(tower.layers) - 1), label="layer")
    batch = data.draw(st.integers(1, 3), label="batch")
    if tower is loaded.text:
        inputs, lengths, _ = text_inputs(loaded, CAPTIONS[:batch])
    else:
        inputs = pixels(batch, seed=batch)
        lengths = torch.full((batch,), tower.layers[layer].positions)
    with torch.no_grad():
        hidden = tower.lower(inputs, layer, lengths)
    generator = torch.Generator().manual_seed(layer)
    tangents = torch.randn((4, *hidden.shape), generator=generator, dtype=hidden.dtype)

    def upper(h):
        return tower.upper(h, layer, lengths)

    pushed = vmap(lambda t: jvp(upper, (hidden,), (t,))[1])(tangents)
    output, pull = vjp(upper, hidden)
    cotangents = torch.randn((3, *output.shape), generator=generator, dtype=hidden.dtype)
    pulled = vmap(lambda c: pull(c)[0])(cotangents)
    forward = torch.einsum("tbd,cbd->tc", pushed, cotangents)
    reverse = torch.einsum("cbsd,tbsd->tc", pulled, tangents)
    torch.testing.assert_close(forward, reverse, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(output, tower.upper(hidden, layer, lengths))


def test_loader_reports_scale_bias_and_preprocessing(saved, loaded):
    kind, directory = saved
    model = loaded.model
    assert type(model).__name__ == {"clip": "CLIPModel", "siglip": "SiglipModel", "siglip2": "Siglip2Model"}[kind]
    assert model.config._attn_implementation == hf_models.ATTENTION and not model.training
    assert next(model.parameters()).dtype == torch.float64
    assert not any(p.requires_grad for p in model.parameters())
    assert loaded.logit_scale == pytest.approx(float(model.logit_scale.exp()))
    if kind == "clip":
        assert loaded.logit_bias is None
        assert loaded.preprocess_cfg == PreprocessCfg(
            size=32,
            mean=tuple(transformers.CLIPImageProcessor.image_mean),
            std=tuple(transformers.CLIPImageProcessor.image_std),
            interpolation="bicubic",
            resize_mode="shortest",
        )
    else:
        assert loaded.logit_bias == pytest.approx(float(model.logit_bias)) and loaded.logit_bias != 0
        interpolation = "bicubic" if kind == "siglip" else "bilinear"
        assert loaded.preprocess_cfg == PreprocessCfg(
            size=32, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation=interpolation, resize_mode="squash"
        )
    words = {"clip": [BOS, 4, 9, EOS], "siglip": [4, 9, EOS], "siglip2": [6, 5, 8, 6, 25]}[kind]  # "a cat"
    assert loaded.tokenizer("A cat" if kind == "siglip2" else "a cat")["input_ids"] == words


def test_siglip2_serves_the_square_image_its_processor_makes(tmp_path):
    """The fixed-resolution case equals transformers' own pipeline on a square image: the
    processor's patches, grid and mask give the embedding of the squashed image."""
    for part in tiny_model("siglip2"):
        part.save_pretrained(tmp_path)
    loaded = load_hf(str(tmp_path), device=torch.device("cpu"), dtype="float64")
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path, local_files_only=True)
    image = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    batch = processor(images=image, return_tensors="pt")
    assert batch["spatial_shapes"].tolist() == [[4, 4]] and bool(batch["pixel_attention_mask"].all())
    # the same resize and normalisation, as an image: patches back in (3, H, W) order
    patches = batch["pixel_values"][0].double().reshape(4, 4, 8, 8, 3)
    as_image = patches.permute(4, 0, 2, 1, 3).reshape(1, 3, 32, 32)
    with torch.no_grad():
        want = loaded.model.get_image_features(
            pixel_values=batch["pixel_values"].double(),
            pixel_attention_mask=batch["pixel_attention_mask"],
            spatial_shapes=batch["spatial_shapes"],
        ).pooler_output
        got = loaded.image.upper(loaded.image.lower(as_image, 0, None), 0, None)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_families_choose_the_hf_adapters(loaded):
    text, image = split_towers(loaded.model)
    assert isinstance(text, hf_models.HFTextTower) and isinstance(image, hf_models.HFImageTower)


def test_fused_attention_is_refused_with_the_way_out():
    model, _, _ = tiny_model("clip")
    model.set_attn_implementation("sdpa")
    for adapter in (text_tower, image_tower):
        with pytest.raises(UnsupportedModelError, match="attn_implementation='explain_eager'"):
            adapter(model)


def test_loader_refuses_what_it_cannot_serve(tmp_path):
    with pytest.raises(HFLoadError, match="no such directory"):
        load_hf(str(tmp_path / "missing"), device=torch.device("cpu"), dtype="float32")
    text_only = tmp_path / "text-only"
    model, tokenizer, _ = tiny_model("clip")
    model.text_model.save_pretrained(text_only)
    with pytest.raises(HFLoadError, match="'clip_text_model' model; the server explains clip, siglip, siglip2"):
        load_hf(str(text_only), device=torch.device("cpu"), dtype="float32")
    no_processor = tmp_path / "no-processor"
    model.save_pretrained(no_processor)
    tokenizer.save_pretrained(no_processor)
    with pytest.raises(HFLoadError, match="cannot load the model, its tokenizer or its image processor"):
        load_hf(str(no_processor), device=torch.device("cpu"), dtype="float32")


def test_a_server_without_transformers_names_the_extra(monkeypatch, saved):
    monkeypatch.setitem(sys.modules, "transformers", None)  # what `import transformers` meets when absent
    with pytest.raises(HFLoadError, match=r"pip install 'clip-explain-server\[hf\]'"):
        load_hf(str(saved[1]), device=torch.device("cpu"), dtype="float32")


@pytest.mark.parametrize(
    "processor, message",
    [
        (transformers.CLIPImageProcessor(size={"shortest_edge": 36}, crop_size=32), "resizes to .* and crops"),
        (transformers.SiglipImageProcessor(size={"height": 32, "width": 32}, resample=0), "only bilinear and bicubic"),
        (transformers.SiglipImageProcessor(size={"height": 32, "width": 32}, rescale_factor=1 / 127.5), "1/255"),
    ],
)
def test_preprocessing_open_clip_cannot_express_is_refused(processor, message):
    with pytest.raises(HFLoadError, match=message):
        preprocess_cfg(processor, 8)


def test_non_square_siglip_size_squashes_to_height_and_width():
    cfg, grid = preprocess_cfg(transformers.SiglipImageProcessor(size={"height": 32, "width": 48}), 8)
    assert cfg.size == (32, 48) and cfg.resize_mode == "squash" and grid is None


@pytest.mark.parametrize(
    "text, architecture, pretrained, options",
    [
        ("s=hf:google/siglip-base-patch16-224", "hf", "google/siglip-base-patch16-224", {}),
        ("c=hf:/models/clip,n_steps=5,image_layer=3", "hf", "/models/clip", {"n_steps": 5, "image_layer": 3}),
        ("c=hf:./my models/a,b", "hf", "./my models/a,b", {}),
        ("r=hf:random:3", "hf", "random:3", {}),
    ],
)
def test_hf_model_spec(text, architecture, pretrained, options):
    spec = ModelSpec.parse(text)
    assert (spec.architecture, spec.pretrained, spec.hf_source) == (architecture, pretrained, pretrained)
    assert all(getattr(spec, key) == value for key, value in options.items())
    assert spec.random_seed is None  # hf: never means open_clip's seeded random weights
    table = ModelSpec.from_table({"name": spec.name, "architecture": "hf", "pretrained": pretrained, **options})
    assert table == spec


def test_open_clip_specs_have_no_hf_source():
    assert ModelSpec.parse("b=ViT-B-32:openai").hf_source is None
    assert ModelSpec.parse("t=tiny-ViT:random:2").random_seed == 2


def test_local_sources_are_told_from_hub_ids(tmp_path):
    assert is_local(str(tmp_path)) and is_local("./clip") and is_local("/no/such/dir") and is_local("~/m")
    assert not is_local("google/siglip-base-patch16-224") and not is_local("openai/clip-vit-base-patch32")


# --- the same weights in open_clip and transformers -------------------------------------------


def open_clip_to_hf(model: open_clip.model.CLIP) -> transformers.CLIPModel:
    """A transformers CLIPModel with the weights of an open_clip ViT ``CLIP``: the conversion
    transformers' convert_clip_original_pytorch_to_hf.py does, for open_clip's names.

    open_clip packs q, k, v into ``attn.in_proj_*``; its projections are matrices applied as
    ``x @ proj``, transformers' are Linear layers (``x @ weight.T``); QuickGELU is ``quick_gelu``.
    """
    visual = model.visual
    text_block = model.transformer.resblocks[0]
    activation = "quick_gelu" if isinstance(text_block.mlp.gelu, open_clip.transformer.QuickGELU) else "gelu"

    def tower(width: int, heads: int, layers: int, mlp: int) -> dict:
        return dict(
            hidden_size=width,
            num_attention_heads=heads,
            num_hidden_layers=layers,
            intermediate_size=mlp,
            hidden_act=activation,
            layer_norm_eps=text_block.ln_1.eps,
        )

    vision_block = visual.transformer.resblocks[0]
    config = transformers.CLIPConfig(
        text_config=dict(
            **tower(
                model.transformer.width,
                text_block.attn.num_heads,
                len(model.transformer.resblocks),
                text_block.mlp.c_fc.out_features,
            ),
            vocab_size=model.vocab_size,
            max_position_embeddings=model.context_length,
            # open_clip's tokenizer: start and end of text are the last two ids
            bos_token_id=model.vocab_size - 2,
            eos_token_id=model.vocab_size - 1,
            pad_token_id=0,
        ),
        vision_config=dict(
            **tower(
                visual.transformer.width,
                vision_block.attn.num_heads,
                len(visual.transformer.resblocks),
                vision_block.mlp.c_fc.out_features,
            ),
            image_size=visual.image_size[0],
            patch_size=visual.patch_size[0],
        ),
        projection_dim=visual.output_dim,
    )
    hf = transformers.CLIPModel._from_config(config, attn_implementation=hf_models.ATTENTION)

    def blocks(prefix: str, target: str, count: int) -> dict:
        names = {
            "ln_1": "layer_norm1",
            "ln_2": "layer_norm2",
            "attn.out_proj": "self_attn.out_proj",
            "mlp.c_fc": "mlp.fc1",
            "mlp.c_proj": "mlp.fc2",
        }
        state = model.state_dict()
        out = {}
        for i in range(count):
            source, dest = f"{prefix}.{i}", f"{target}.{i}"
            for old, new in names.items():
                for kind in ("weight", "bias"):
                    out[f"{dest}.{new}.{kind}"] = state[f"{source}.{old}.{kind}"]
            for kind in ("weight", "bias"):
                for name, part in zip("qkv", state[f"{source}.attn.in_proj_{kind}"].chunk(3)):
                    out[f"{dest}.self_attn.{name}_proj.{kind}"] = part
        return out

    state = {
        "text_model.embeddings.token_embedding.weight": model.token_embedding.weight,
        "text_model.embeddings.position_embedding.weight": model.positional_embedding,
        "text_model.final_layer_norm.weight": model.ln_final.weight,
        "text_model.final_layer_norm.bias": model.ln_final.bias,
        "text_projection.weight": model.text_projection.T,
        "vision_model.embeddings.class_embedding": visual.class_embedding,
        "vision_model.embeddings.patch_embedding.weight": visual.conv1.weight,
        "vision_model.embeddings.position_embedding.weight": visual.positional_embedding,
        "vision_model.pre_layrnorm.weight": visual.ln_pre.weight,
        "vision_model.pre_layrnorm.bias": visual.ln_pre.bias,
        "vision_model.post_layernorm.weight": visual.ln_post.weight,
        "vision_model.post_layernorm.bias": visual.ln_post.bias,
        "visual_projection.weight": visual.proj.T,
        "logit_scale": model.logit_scale,
        **blocks("transformer.resblocks", "text_model.encoder.layers", len(model.transformer.resblocks)),
        **blocks("visual.transformer.resblocks", "vision_model.encoder.layers", len(visual.transformer.resblocks)),
    }
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    assert not unexpected and all(name.endswith("position_ids") for name in missing), (missing, unexpected)
    return hf.eval().requires_grad_(False)


@pytest.fixture(scope="module", params=[False, True], ids=["gelu", "quickgelu"])
def both(request, tmp_path_factory):
    """(open_clip model, the HF dual encoder loaded from the converted, saved weights), float64."""
    config = json.loads(TINY_CONFIG.read_text())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.model.CLIP(**config, quick_gelu=request.param)
        # open_clip zero-initialises biases; random ones make the comparison see them
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                torch.nn.init.normal_(parameter, std=0.1)
    model = model.double().eval().requires_grad_(False)
    directory = tmp_path_factory.mktemp("converted")
    open_clip_to_hf(model).save_pretrained(directory)
    word_tokenizer(True, model.context_length).save_pretrained(directory)
    transformers.CLIPImageProcessor(size={"shortest_edge": 64}, crop_size=64).save_pretrained(directory)
    return model, load_hf(str(directory), device=torch.device("cpu"), dtype="float64")


def open_clip_ids(length: int, seed: int) -> torch.Tensor:
    """A caption of ``length`` ids in open_clip's layout: start, words, end (the highest id)."""
    words = torch.randint(1, 49000, (length - 2,), generator=torch.Generator().manual_seed(seed))
    return torch.cat([torch.tensor([49406]), words, torch.tensor([49407])])


def test_hf_path_equals_open_clip_on_converted_weights(both):
    """The same hidden state at every block and the same embeddings, both towers."""
    model, hf = both
    ids = open_clip_ids(9, 0)[None]
    lengths = torch.tensor([9])
    images = pixels(2, size=64)
    text, image = TextTower(model), ImageTower(model)
    with torch.no_grad():
        want_text, want_image = model.encode_text(torch.nn.functional.pad(ids, (0, 68))), model.encode_image(images)
        torch.testing.assert_close(
            hf.model.get_text_features(input_ids=ids).pooler_output, want_text, rtol=0, atol=1e-12
        )
        for layer in range(text.n_layers):
            hidden = hf.text.lower(ids, layer, lengths)
            torch.testing.assert_close(hidden, text.lower(ids, layer), rtol=0, atol=1e-12)
            torch.testing.assert_close(hf.text.upper(hidden, layer, lengths), want_text, rtol=0, atol=1e-12)
        for layer in range(image.n_layers):
            hidden = hf.image.lower(images, layer, None)
            torch.testing.assert_close(hidden, image.lower(images, layer), rtol=0, atol=1e-12)
            torch.testing.assert_close(hf.image.upper(hidden, layer, None), want_image, rtol=0, atol=1e-12)
    assert hf.logit_scale == pytest.approx(float(model.logit_scale.exp()))
    assert hf.preprocess_cfg == PreprocessCfg(size=64)  # open_clip's for OpenAI CLIP: the mean, std, resize


@pytest.mark.parametrize("layers, method, n_steps", [((1, 1), "gausslegendre", 3), ((0, 1), "riemann_right", 4)])
def test_hf_attributions_equal_open_clips(both, layers, method, n_steps):
    """The same token x patch attributions from the HF towers (generic path) as from open_clip's
    towers (fast path), with the same references ([start, 0, end]; the zero image)."""
    model, hf = both
    text_layer, image_layer = layers
    ids = open_clip_ids(7, 1)
    image = pixels(1, size=64, seed=3)[0]
    options = dict(text_layer=text_layer, image_layer=image_layer, method=method, n_steps=n_steps)
    want = Explainer.for_clip(model, sot_token_id=49406, eot_token_id=49407, budget=ChunkBudget(1 << 24)).explain(
        ids, image, **options
    )
    explainer = Explainer(
        hf.text,
        hf.image,
        text_reference=torch.tensor([49406, 0, 49407]),
        image_size=(64, 64),
        device=torch.device("cpu"),
        dtype=torch.float64,
        budget=ChunkBudget(1 << 24),
    )
    got = explainer.explain(ids, image, **options)
    # float64 throughout: the two paths agree to rounding (about 1e-15 of the largest interaction)
    scale = np.abs(want.interactions).max()
    np.testing.assert_allclose(got.interactions, want.interactions, rtol=0, atol=1e-10 * scale)
    for name in ("score", "text_reference", "image_reference", "both_references"):
        assert getattr(got, name) == pytest.approx(getattr(want, name), rel=1e-10, abs=1e-12)


# --- the row-wise split of f_hi (engine/generic.py's cheaper JVPs) ---------------------------


def test_row_splits_rest_of_rows_is_f_hi_and_keeps_the_factors(loaded):
    """At the last layer (text and image) and at SigLIP's MAP head, rest(rows(h)) is f_hi, and
    the generic path's factors with the split equal those without it, for captions of
    different lengths in one batch."""
    from explain_server.engine import generic
    from explain_server.engine.attribution import PathIntegral
    from explain_server.engine.quadrature import nodes_and_weights

    ids, lengths, _ = text_inputs(loaded)
    images = pixels(2)
    alphas, weights = nodes_and_weights("gausslegendre", 2)
    for tower, inputs, want in (
        (loaded.text, ids, loaded.model.get_text_features(input_ids=ids).pooler_output),
        (loaded.image, images, image_features(loaded.model, images)),
    ):
        layers = [layer for layer in range(len(tower.layers)) if tower.row_split(layer) is not None]
        assert layers == list(range(len(tower.blocks) - 1, len(tower.layers)))  # the last layer, and a head
        for layer in layers:
            split = tower.row_split(layer)
            with torch.no_grad():
                hidden = tower.lower(inputs, layer, lengths)
                seq = hidden.shape[1]
                own = tower.own_rows(lengths, seq) if tower is loaded.text else torch.full((2,), seq)
                content = lengths if tower is loaded.text else own
                positions = torch.arange(seq).expand(len(hidden), -1)
                got = split.rest(split.rows(hidden, positions), content)
                torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
                generator = torch.Generator().manual_seed(layer)
                reference = torch.randn(hidden.shape[1:], generator=generator, dtype=hidden.dtype)
                paths = [
                    PathIntegral(h, reference, alphas, weights, length=int(n), content_length=int(c))
                    for h, n, c in zip(hidden, own, content)
                ]
                fast = generic._forward(tower, layer, paths, ChunkBudget(1 << 16))
                tower.row_split = lambda layer: None  # the same tower without the split
                try:
                    slow = generic._forward(tower, layer, paths, ChunkBudget(1 << 30))
                finally:
                    del tower.row_split
            for factor, expected in zip(fast, slow):
                torch.testing.assert_close(factor, expected, rtol=1e-9, atol=1e-12)
