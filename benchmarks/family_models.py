"""Real-size models of each family for the family benchmarks, built offline with seeded random weights.

Shared by ``bench_families.py`` and ``choose_defaults.py``. Nothing is downloaded: open_clip
builds each architecture with ``pretrained=None`` under ``torch.manual_seed(0)``; the
xlm-roberta text tower gets a local Hugging Face config with xlm-roberta-base's real sizes.

Captions are fed as token ids (the cost of an explanation depends on the lengths, not on which
ids): ids drawn in the real vocabulary's range, wrapped in the family tokenizer's start and end
tokens and padded with its pad id. The text reference is those special tokens around one id 0,
as :mod:`explain_server.tokenizers` builds it.
"""

from __future__ import annotations

import json
import pathlib
import tempfile
from dataclasses import dataclass

import numpy as np
import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from explain_server.engine.attribution import ChunkBudget
from explain_server.engine.explainer import Explainer
from explain_server.engine.families import split_towers
from explain_server.engine.split import UnsupportedModelError
from explain_server.engine.towers import ImageTower, TextTower

ROOT = pathlib.Path(__file__).resolve().parent.parent
PHOTO = ROOT / "server" / "explain_server" / "assets" / "chelsea.jpg"
MIB = 1 << 20

FAMILIES = {
    "ResNet": "RN50",
    "SigLIP": "ViT-B-16-SigLIP",
    "SigLIP2": "ViT-B-16-SigLIP2",
    "EVA02": "EVA02-B-16",
    "ConvNeXt": "convnext_base_w",
    "MobileCLIP": "MobileCLIP-S1",
    "ViTamin": "ViTamin-B",
    "XLM-RoBERTa": "xlm-roberta-base-ViT-B-32",
    "CoCa": "coca_ViT-B-32",
}
"""One real-size architecture per family (issue 22's bench list)."""

# (start ids, end ids, pad id) of the family's tokenizer, by the text tower's vocabulary size
_SPECIALS = {
    49408: ((49406,), (49407,), 0),  # open_clip's CLIP BPE (CLIP, EVA, ConvNeXt, MobileCLIP, ViTamin, CoCa)
    32000: ((), (1,), 1),  # SigLIP's sentencepiece: the end token only, padded with it
    256000: ((2,), (1,), 0),  # SigLIP2's Gemma tokenizer
    250002: ((0,), (2,), 1),  # XLM-RoBERTa's <s> ... </s>, <pad> = 1
}

# one caption of about 12 words is about 14 ids with the special tokens; the others vary it
CONTENT_LENGTHS = (12, 7, 17)


@dataclass
class Bench:
    """A model, its explainer and its inputs."""

    architecture: str
    model: torch.nn.Module
    explainer: Explainer
    captions: list[torch.Tensor]
    images: list[torch.Tensor]
    forward_tokens: torch.Tensor
    fast: tuple[str, ...]


def _register_xlm_roberta(root: pathlib.Path) -> str:
    """A copy of xlm-roberta-base-ViT-B-32 whose HF text config is local (xlm-roberta-base's real sizes)."""
    from transformers import XLMRobertaConfig

    hf_dir = root / "xlm-roberta-base"
    XLMRobertaConfig(
        vocab_size=250002,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=514,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    ).save_pretrained(hf_dir)
    cfg = open_clip.get_model_config("xlm-roberta-base-ViT-B-32")
    cfg["text_cfg"].update(hf_model_name=str(hf_dir), hf_tokenizer_name=str(hf_dir))
    name = "local-xlm-roberta-base-ViT-B-32"
    path = root / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return name


def _vocabulary(model: torch.nn.Module) -> int:
    text = getattr(model, "text", model)
    if hasattr(text, "token_embedding"):
        return text.token_embedding.num_embeddings
    return text.transformer.get_input_embeddings().num_embeddings


def build(architecture: str, budget_mib: int = 256, device: str = "cpu") -> Bench:
    """The model (float32, CPU, eval), its explainer as the server builds it, 3 captions and 3 images.

    Raises:
        UnsupportedModelError: a tower no adapter explains (e.g. RN50 before its adapter lands).
    """
    tmp = tempfile.mkdtemp(prefix="bench-families-")
    name = _register_xlm_roberta(pathlib.Path(tmp)) if architecture.startswith("xlm-roberta") else architecture
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(name, pretrained=None, pretrained_text=False)
    model = model.to(device).eval().requires_grad_(False)
    text, image = split_towers(model)
    fast, names = {}, []
    for tower, build_fast, label in ((text, TextTower, "text"), (image, ImageTower, "image")):
        try:
            fast[tower] = build_fast(model)
            names.append(label)
        except UnsupportedModelError:
            pass
    vocabulary = _vocabulary(model)
    start, end, pad = _SPECIALS[vocabulary]
    cfg = PreprocessCfg(**model.visual.preprocess_cfg)
    size = (cfg.size, cfg.size) if isinstance(cfg.size, int) else tuple(cfg.size)
    explainer = Explainer(
        text,
        image,
        text_reference=torch.tensor([*start, 0, *end]),
        pad_id=pad,
        image_size=size,
        device=torch.device(device),
        dtype=torch.float32,
        budget=ChunkBudget(budget_mib * MIB),
        fast=fast,
    )
    rng = np.random.default_rng(0)
    captions = [
        torch.tensor([*start, *rng.integers(3, min(vocabulary, 49000), n).tolist(), *end]) for n in CONTENT_LENGTHS
    ]
    transform = image_transform_v2(cfg, is_train=False)
    pictures = [Image.open(PHOTO).convert("RGB")] + [
        Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)) for _ in range(2)
    ]
    context = text.context_length or 77
    forward_tokens = torch.full((1, context), pad, dtype=torch.long, device=device)
    forward_tokens[0, : len(captions[0])] = captions[0]
    return Bench(
        architecture,
        model,
        explainer,
        captions,
        [transform(p).to(device) for p in pictures],
        forward_tokens,
        tuple(names),
    )


def single_row(tower, layer: int, hidden: torch.Tensor, lengths: torch.Tensor) -> bool:
    """Whether f_hi at ``layer`` reads one row of ``hidden`` only (class-token, end-token or
    last-token pooling at the head): an explanation there puts everything on that row."""
    with torch.enable_grad():
        h = hidden.detach().clone().requires_grad_(True)
        out = tower.upper(h, layer, lengths)
        (grad,) = torch.autograd.grad(out.sum() + (out * torch.linspace(0, 1, out.shape[-1])).sum(), h)
    return int((grad.abs().sum(-1) > 0).sum()) <= 1
