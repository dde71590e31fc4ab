"""Issue 22's coverage acceptance: every architecture of ``open_clip.list_pretrained()`` is served and
explained, the completeness identity holds on every family, and docs/models.md is current.

Each architecture is its scaled-down stand-in (tests/scaled_models.py: the same module types, pooling
and tokenizer kind, fewer and narrower blocks, random weights, local tokenizers); nothing is downloaded.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import pathlib
import sys

import numpy as np
import open_clip
import pytest
import torch
from inprocess import serving
from open_clip.transform import PreprocessCfg
from PIL import Image
from scaled_models import Scaled, pretrained_architectures, scale_architecture
from test_family_hf import tiny_model as tiny_transformers_model
from transformers import BertConfig, BertModel

from explain_client import ExplainClient, Explanation
from explain_server.engine.attribution import Attribution, ChunkBudget
from explain_server.engine.families import split_towers
from explain_server.hf_loading import load_hf
from explain_server.inputs import tokenize
from explain_server.loading import ModelLoadError, _explainer, load_model
from explain_server.model_spec import ModelSpec
from explain_server.tokenizers import hf_tokenizer, load_tokenizer
from explain_server.worker.process import warm_up

ROOT = pathlib.Path(__file__).parent.parent
CAPTION = "a photo of a cat"
ARCHITECTURES = pretrained_architectures()

# family -> the architecture that stands for it in the completeness and server tests
FAMILIES = {
    "vit-clip": "ViT-B-32",
    "resnet": "RN50",
    "convnext": "convnext_base_w",
    "fastvit": "MobileCLIP-S1",
    "mci-vit": "MobileCLIP-B",
    "vitamin": "ViTamin-S",
    "siglip": "ViT-B-16-SigLIP",
    "siglip2": "ViT-B-16-SigLIP2",
    "eva": "EVA02-B-16",
    "pe-core": "PE-Core-B-16",
    "clipa": "ViT-L-14-CLIPA",
    "worldwide": "ViT-H-14-worldwide",
    "coca": "coca_ViT-B-32",
    "xlm-roberta": "xlm-roberta-base-ViT-B-32",
    "nllb": "nllb-clip-base",
}


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    """architecture -> its registered :class:`Scaled` stand-in, built on first use."""
    directory = tmp_path_factory.mktemp("scaled")
    cache: dict[str, Scaled] = {}

    def get(architecture: str) -> Scaled:
        if architecture not in cache:
            cache[architecture] = scale_architecture(architecture, directory)
        return cache[architecture]

    return get


def load(scaled_model: Scaled, name: str = "m"):
    return load_model(
        ModelSpec.parse(scaled_model.spec(name)), device=torch.device("cpu"), dtype="float32", memory_bytes=1 << 28
    )


def own_cosine(model: torch.nn.Module, ids: torch.Tensor, context: int, pad_id: int, pixels: torch.Tensor) -> float:
    """The model's own cosine of a caption (ids up to its end token, padded here) and an image."""
    padded = torch.full((1, context), pad_id, dtype=torch.long)
    padded[0, : len(ids)] = ids
    with torch.no_grad():
        text = model.encode_text(padded, normalize=True)[0]
        image = model.encode_image(pixels[None].to(next(model.parameters()).dtype), normalize=True)[0]
    return float(text.double() @ image.double())


@pytest.mark.unit
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_pretrained_architecture_loads_and_explains(scaled, architecture):
    loaded = load(scaled(architecture))
    caption = tokenize(loaded.tokenizer, CAPTION)
    explainer = loaded.explainer
    pixels = torch.randn((3, *loaded.image_size), generator=torch.Generator().manual_seed(0))
    result = explainer.explain(
        caption.token_ids,
        pixels,
        text_layer=loaded.default_text_layer,
        image_layer=loaded.default_image_layer,
        method="gausslegendre",
        n_steps=2,
    )
    text = explainer.text
    # rows: the ids (padded to the context where the tower reads padding), then CoCa's appended class token
    rows = (text.context_length if text.sees_padding else len(caption.token_ids)) + len(getattr(text, "suffix", ()))
    assert result.interactions.shape == (rows, explainer.image.layers[loaded.default_image_layer].positions)
    assert np.isfinite(result.interactions).all() and np.isfinite(result.convergence_delta)
    cosine = own_cosine(loaded.model, caption.token_ids, text.context_length, explainer.pad_id, pixels)
    assert result.score == pytest.approx(cosine, abs=1e-5)


def float64_explainer(model: torch.nn.Module, tokenizer, preprocess_cfg: PreprocessCfg, towers=None):
    """The explainer loading.py builds, on a float64 model (load_model serves float32, 16 and bfloat16)."""
    text, image = towers or split_towers(model)
    return _explainer(model, text, image, tokenizer, preprocess_cfg, ChunkBudget(1 << 28))


def check_completeness(explain, ids: torch.Tensor, cosine: float) -> None:
    """score = attributions + reference terms + delta in float64, the score is the model's own cosine,
    and |delta| shrinks as riemann_left gets more nodes."""
    deltas = []
    for n_steps in (4, 16, 64):
        result: Attribution = explain(ids, method="riemann_left", n_steps=n_steps)
        parts = result.interactions.sum() + result.text_reference + result.image_reference - result.both_references
        assert abs(result.score - parts) == pytest.approx(abs(result.convergence_delta), abs=1e-9)
        assert result.score == pytest.approx(cosine, abs=1e-9)
        deltas.append(abs(result.convergence_delta))
    assert deltas[0] > deltas[1] > deltas[2], deltas


@pytest.mark.unit
@pytest.mark.parametrize("family, architecture", list(FAMILIES.items()))
def test_completeness_on_every_family(scaled, family, architecture):
    stand_in = scaled(architecture)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(stand_in.name, pretrained=None).double().eval().requires_grad_(False)
    tokenizer = load_tokenizer(stand_in.name, stand_in.tokenizer)
    explainer = float64_explainer(model, tokenizer, PreprocessCfg(**model.visual.preprocess_cfg))
    size = model.visual.image_size  # ModifiedResNet keeps an int
    size = (size, size) if isinstance(size, int) else tuple(size)
    pixels = torch.randn((3, *size), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ids = tokenize(tokenizer, CAPTION).token_ids
    layers = dict(text_layer=explainer.text.default_layer, image_layer=explainer.image.default_layer)
    check_completeness(
        lambda ids, **rule: explainer.explain(ids, pixels, **layers, **rule),
        ids,
        own_cosine(model, ids, explainer.text.context_length, explainer.pad_id, pixels),
    )


@pytest.fixture(scope="module")
def transformers_dirs(tmp_path_factory):
    """kind -> a directory holding a tiny transformers CLIPModel, SiglipModel or Siglip2Model."""
    dirs = {}
    for kind in ("clip", "siglip", "siglip2"):
        dirs[kind] = tmp_path_factory.mktemp(f"hf-{kind}")
        for part in tiny_transformers_model(kind):
            part.save_pretrained(dirs[kind])
    return dirs


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["clip", "siglip", "siglip2"])
def test_completeness_on_transformers_models(transformers_dirs, kind):
    hf = load_hf(str(transformers_dirs[kind]), device=torch.device("cpu"), dtype="float64")
    tokenizer = hf_tokenizer(str(transformers_dirs[kind]), hf.text.context_length)
    explainer = float64_explainer(hf.model, tokenizer, hf.preprocess_cfg, (hf.text, hf.image))
    pixels = torch.randn((3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ids = tokenize(tokenizer, "a red cat").token_ids
    context = explainer.text.context_length if explainer.text.sees_padding else len(ids)
    padded = explainer._pad_ids([ids], context)
    with torch.no_grad():
        text = explainer.text.upper(
            explainer.text.lower(padded, 0, torch.tensor([len(ids)])), 0, torch.tensor([len(ids)])
        )
        image = explainer.image.upper(explainer.image.lower(pixels[None], 0, torch.zeros(1)), 0, torch.zeros(1))
    cosine = float(torch.nn.functional.cosine_similarity(text, image)[0])
    layers = dict(text_layer=explainer.text.default_layer, image_layer=explainer.image.default_layer)
    check_completeness(lambda ids, **rule: explainer.explain(ids, pixels, **layers, **rule), ids, cosine)


@pytest.mark.unit
def test_a_model_that_is_not_a_dual_encoder_is_refused_by_name(tmp_path):
    directory = tmp_path / "bert"
    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(directory)
    spec = ModelSpec.parse(f"encoder=hf:{directory}")
    with pytest.raises(ModelLoadError) as refused:
        load_model(spec, device=torch.device("cpu"), dtype="float32", memory_bytes=1 << 28)
    message = str(refused.value)
    assert message.startswith("model 'encoder': ")
    assert "'bert' model; the server explains clip, siglip, siglip2" in message


@pytest.mark.unit
def test_an_image_tower_no_adapter_explains_is_refused_by_name(tmp_path):
    # a dual encoder whose image tower is a timm trunk of a class no family adapter splits
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"timm_model_name": "resnet10t", "timm_pool": "avg", "timm_proj": "linear", "image_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    path = tmp_path / "timm-resnet-clip.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    spec = ModelSpec.parse("odd=timm-resnet-clip:random:0")
    with pytest.raises(ModelLoadError) as refused:
        load_model(spec, device=torch.device("cpu"), dtype="float32", memory_bytes=1 << 28)
    assert str(refused.value) == (
        "model 'odd' (timm-resnet-clip) cannot be explained: no adapter explains the image tower's timm trunk "
        "timm.models.resnet.ResNet"
    )


def _models_table():
    spec = importlib.util.spec_from_file_location("models_table", ROOT / "docs" / "models_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["models_table"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.unit
def test_models_md_is_the_tables_output():
    table = _models_table()
    document = table.document()
    assert (ROOT / "docs" / "models.md").read_text() == document, "run: python docs/models_table.py > docs/models.md"
    pairs = open_clip.list_pretrained()
    assert len(pairs) == 196
    for architecture, tag in pairs:
        assert f"| {architecture} | {tag} | " in document
    assert {table.family(a) for a in ARCHITECTURES} == set(table.FAMILIES)


def png(seed: int, width: int = 80, height: int = 60) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.integration
def test_one_server_explains_a_model_of_every_family(scaled, transformers_dirs):
    served = list(FAMILIES)
    models = [load(scaled(FAMILIES[family]), family) for family in served]
    hf = load_model(
        ModelSpec.parse(f"hf-clip=hf:{transformers_dirs['clip']}"),
        device=torch.device("cpu"),
        dtype="float32",
        memory_bytes=1 << 28,
    )
    models.append(hf)
    for loaded in models:
        warm_up(loaded)

    def ask(target: str) -> tuple[dict, dict[str, Explanation]]:
        with ExplainClient(target, timeout=300) as client:
            infos = {info.name: info for info in client.list_models()}
            return infos, {name: client.explain(png(0), "a red cat", model=name) for name in infos}

    async def scenario():
        async with serving(models) as server:
            # the client blocks; the server answers on this event loop
            return await asyncio.to_thread(ask, server.target)

    infos, explanations = asyncio.run(scenario())
    assert set(infos) == {*served, "hf-clip"}
    for loaded in models:
        name = loaded.spec.name
        info, exp = infos[name], explanations[name]
        layer = loaded.explainer.image.layers[loaded.default_image_layer]
        assert info.grid == layer.grid, name
        assert exp.image_prefix == layer.prefix, name
        rows = len(exp.tokens)
        assert exp.attribution.shape == (rows, *layer.grid), name
        assert exp.prefix_attribution.shape == (rows, len(layer.prefix)), name
        padded = loaded.explainer.text.sees_padding
        assert rows == len(exp.token_ids) and (rows >= info.context_length) == padded, name
        assert any(exp.padding) == padded, name
        total = (
            exp.attribution.sum(dtype=np.float64)
            + exp.prefix_attribution.sum(dtype=np.float64)
            + exp.reference_terms.text_reference
            + exp.reference_terms.image_reference
            - exp.reference_terms.both_references
            + exp.convergence_delta
        )
        assert total == pytest.approx(exp.score, abs=1e-4), name
    assert any(explanations["siglip"].padding) and not any(explanations["vit-clip"].padding)
