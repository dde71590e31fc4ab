"""Scaled-down stand-ins for every architecture of ``open_clip.list_pretrained()``, with random weights.

Each stand-in keeps the module types, pooling, masking, prefix tokens and rope of its architecture
and shrinks it: fewer and narrower blocks, a small image, a small vocabulary.

- timm image towers: open_clip builds such a tower as ``TimmModel(timm.create_model(vision_cfg['timm_model_name'],
  ...))`` and passes timm no size arguments, so a smaller tower needs a smaller *timm model name*. For each timm
  trunk that ``open_clip.list_pretrained()`` uses, :func:`register_scaled_timm` registers ``small_<name>`` with
  timm: the original entrypoint called with fewer and narrower blocks and a small image.
- open_clip's own towers (VisionTransformer of CLIP, CLIPA, CoCa, MetaCLIP worldwide; ModifiedResNet; the text
  transformers): their config's sizes are shrunk in place (:func:`scaled_config`).
- Hugging Face text towers (RoBERTa, XLM-RoBERTa, NLLB) and hub tokenizers (SigLIP, SigLIP2, CLIPA's BERT,
  XLM-V): tests/tiny_hf.py builds them locally, and the open_clip text vocabulary shrinks to the tokenizer's.

:func:`scale_architecture` does all of it for one architecture and says which tokenizer directory the model
spec needs (``tokenizer=DIR``).

Usage::

    scaled = scale_architecture("ViT-B-16-SigLIP", tmp_dir)   # scaled.name == "small-ViT-B-16-SigLIP"
    model = open_clip.create_model(scaled.name, pretrained=None)
    spec = ModelSpec.parse(scaled.spec("m"))                  # m=small-...:random:0,tokenizer=...
"""

from __future__ import annotations

import copy
import json
import pathlib
import re
from dataclasses import dataclass
from typing import Any, Callable

import open_clip
import tiny_hf
import torch.nn as nn
from open_clip.factory import get_model_config
from timm.models import is_model, model_entrypoint, register_model
from timm.models.vision_transformer_hybrid import ConvStem, _create_vision_transformer_hybrid
from timm.models.vitamin import VitCfg, VitConvCfg
from transformers import AutoTokenizer

WIDTH = 64
"""Width of every scaled transformer (vision and text) and of the joint embedding."""

HEADS = 2
"""Attention heads of every scaled transformer block (head width 32, which 2-d rope needs divisible by 4)."""

DEPTH = 2
"""Blocks of every scaled transformer."""

PREFIX = "small_"
"""Prefix of the registered timm names."""

# Stages of the FastViT-MCi entrypoints (their per-stage arguments must keep this length).
_FASTVIT_STAGES = {"fastvit_mci0": 4, "fastvit_mci1": 4, "fastvit_mci2": 4, "fastvit_mci3": 5, "fastvit_mci4": 5}


def _patch(name: str) -> int:
    match = re.search(r"patch(\d+)", name)
    if match is None:
        raise ValueError(f"no patch size in timm name {name!r}")
    return int(match[1])


def _transformer(name: str) -> tuple[dict[str, Any], int]:
    """ViT and Eva (EVA01/02, PE-Core, any timm ViT named by its patch): fewer, narrower blocks; a 4x4 patch grid."""
    size = 4 * _patch(name)
    return dict(depth=DEPTH, embed_dim=WIDTH, num_heads=HEADS, img_size=size), size


def _vitamin(name: str) -> tuple[dict[str, Any], int]:
    """ViTamin: the same conv-stage embedding (stem, two MbConv stages, strided conv; stride 16), narrower;
    every ViTamin entrypoint uses this conv config."""
    embed_cfg = VitCfg(
        embed_dim=(16, 32, WIDTH),
        depths=(1, 1, 1),
        stem_width=16,
        conv_cfg=VitConvCfg(norm_layer="layernorm2d", norm_eps=1e-6),
        head_type="1d",
    )
    return dict(depth=DEPTH, embed_dim=WIDTH, num_heads=HEADS, img_size=64, embed_cfg=embed_cfg), 64


def _convnext(name: str) -> tuple[dict[str, Any], int]:
    """ConvNeXt: one block per stage, narrow stages; 64 px gives maps of 16, 8, 4 and 2 cells a side."""
    return dict(depths=(1, 1, 1, 1), dims=(16, 24, 32, WIDTH)), 64


def _fastvit(name: str) -> tuple[dict[str, Any], int]:
    """FastViT-MCi: one block per stage, narrow stages (attention stages keep timm's head width 32);
    the five-stage variants (stride 64) get 128 px so that their last map is 2x2 as well."""
    stages = _FASTVIT_STAGES[name]
    dims = (16, 32, 32, WIDTH) if stages == 4 else (16, 32, 32, WIDTH, WIDTH)
    return dict(layers=(1,) * stages, embed_dims=dims), 32 * 2 ** (stages - 3)


def _small_mci_vit(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``vit_base_mci_224`` with its conv stem narrowed: the entrypoint fixes the stem's channels to the
    ViT width (768), so it is rebuilt here with the same layer types, kernels and strides (stride 16)."""
    backbone = ConvStem(
        channels=(WIDTH // 4, WIDTH // 4, WIDTH),
        stride=(4, 2, 2),
        kernel_size=(4, 2, 2),
        padding=0,
        in_chans=kwargs.get("in_chans", 3),
        act_layer=nn.GELU,
    )
    args = dict(embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, no_embed_class=True, img_size=64)
    return _create_vision_transformer_hybrid(
        "vit_base_mci_224", backbone=backbone, embed_args=dict(proj=False), pretrained=pretrained, **{**args, **kwargs}
    )


# timm name pattern -> (entrypoint overrides, image size); the first match wins.
_RECIPES: tuple[tuple[str, Callable[[str], tuple[dict[str, Any], int]]], ...] = (
    (r"^(vit|eva)\w*_patch\d+", _transformer),  # SigLIP, CLIP ViT-L, EVA01/02, PE-Core, and timm's other ViTs
    (r"^vitamin_", _vitamin),
    (r"^convnext_", _convnext),
    (r"^fastvit_mci", _fastvit),
)


def register_scaled_timm(name: str) -> tuple[str, int]:
    """Register ``small_<name>``, a scaled-down ``name`` with the same module types, with timm.

    Args:
        name: a timm model name that an open_clip pretrained architecture uses.

    Returns:
        (the registered timm name, the image size it is built for).

    Raises:
        ValueError: no recipe scales ``name``.
    """
    small = PREFIX + name
    if name.startswith("vit_base_mci_"):
        entry, size = _small_mci_vit, 64
    else:
        recipe = next((fn for pattern, fn in _RECIPES if re.search(pattern, name)), None)
        if recipe is None:
            raise ValueError(f"no recipe scales the timm model {name!r}")
        overrides, size = recipe(name)
        original = model_entrypoint(name)

        def entry(pretrained: bool = False, **kwargs: Any) -> nn.Module:
            return original(pretrained=pretrained, **{**overrides, **kwargs})

    # register_model names the model after the function and files it under the function's module.
    entry.__name__ = small
    entry.__module__ = __name__
    if not is_model(small):
        register_model(entry)
    return small, size


RESNET_WIDTH = 8
"""Stem width of every scaled ModifiedResNet: its attention pool reads 32 x 8 = 256 channels."""

RESNET_HEAD_WIDTH = 32
"""Head width of a scaled ModifiedResNet's attention pool (8 heads)."""

# Hub tokenizers of open_clip text towers -> the kind tests/tiny_hf.py trains in their place; the first
# matching pattern wins (SigLIP2's Gemma tokenizer before SigLIP's sentencepiece one).
HUB_TOKENIZERS: tuple[tuple[str, str], ...] = (
    (r"SigLIP2", "byte_fallback_bpe"),
    (r"SigLIP", "siglip"),
    (r"^bert-", "wordpiece"),
    (r"xlm-v", "unigram"),
)

# Hugging Face text towers (hf_model_name) -> the tiny_hf.FAMILIES entry that stands in for them.
HF_TEXT_TOWERS: tuple[tuple[str, str], ...] = (
    (r"^xlm-roberta-", "xlm-roberta"),
    (r"^roberta-", "roberta"),
    (r"nllb-", "nllb"),
)


def _match(table: tuple[tuple[str, str], ...], name: str, what: str) -> str:
    found = next((value for pattern, value in table if re.search(pattern, name)), None)
    if found is None:
        raise ValueError(f"no local stand-in for the {what} {name!r}")
    return found


def _scaled_vision(vision: dict[str, Any]) -> None:
    """Shrink a vision config in place: a timm trunk by name, a ModifiedResNet or an open_clip ViT by size."""
    if "timm_model_name" in vision:
        vision["timm_model_name"], vision["image_size"] = register_scaled_timm(vision["timm_model_name"])
    elif isinstance(vision.get("layers"), (list, tuple)):
        # ModifiedResNet: one Bottleneck per stage; 64 px gives maps of 16, 16, 8, 4 and 2 cells a side
        vision.update(layers=[1, 1, 1, 1], width=RESNET_WIDTH, head_width=RESNET_HEAD_WIDTH, image_size=64)
    else:
        # open_clip's VisionTransformer: a 4x4 patch grid; CoCa's attentional pooler keeps its queries
        vision.update(layers=DEPTH, width=WIDTH, head_width=WIDTH // HEADS, image_size=4 * vision["patch_size"])
        if "attn_pooler_heads" in vision:
            vision["attn_pooler_heads"] = HEADS


def scaled_config(
    architecture: str, text_cfg: dict[str, Any] | None = None, vocab_size: int | None = None
) -> dict[str, Any]:
    """The open_clip config of ``architecture``, scaled down.

    The image tower shrinks (:func:`_scaled_vision`), the joint embedding becomes :data:`WIDTH` wide.
    An open_clip text tower keeps its context length, pooling, masking and tokenizer options and
    shrinks to :data:`DEPTH` blocks of :data:`WIDTH` with :data:`HEADS` heads (CoCa's multimodal
    decoder as well); a Hugging Face text tower (``hf_model_name``) is kept as it is unless
    ``text_cfg`` replaces it.

    Args:
        architecture: an open_clip architecture.
        text_cfg: a text config to use instead of the shrunk one.
        vocab_size: the open_clip text tower's vocabulary, when its tokenizer is replaced by a
            smaller one; None keeps it (CLIP's BPE, whose ids reach 49407).

    Returns:
        a config dict for ``open_clip.add_model_config``.

    Raises:
        ValueError: unknown architecture, or no recipe scales its timm trunk.
    """
    cfg = copy.deepcopy(get_model_config(architecture))
    if cfg is None:
        raise ValueError(f"unknown open_clip architecture {architecture!r}")
    _scaled_vision(cfg["vision_cfg"])
    cfg["embed_dim"] = WIDTH
    if text_cfg is not None:
        cfg["text_cfg"] = text_cfg
    elif "hf_model_name" not in cfg["text_cfg"]:
        cfg["text_cfg"].update(width=WIDTH, heads=HEADS, layers=DEPTH)
        if vocab_size is not None:
            cfg["text_cfg"]["vocab_size"] = vocab_size
    if "multimodal_cfg" in cfg:
        cfg["multimodal_cfg"].update(width=WIDTH, heads=HEADS, layers=1, attn_pooler_heads=HEADS)
    return cfg


def add_scaled_architecture(
    architecture: str, directory: pathlib.Path, text_cfg: dict[str, Any] | None = None, vocab_size: int | None = None
) -> str:
    """Write :func:`scaled_config` of ``architecture`` to ``directory`` and register it with open_clip.

    Returns:
        the name ``open_clip.create_model`` builds it under: ``small-<architecture>``.
    """
    name = f"small-{architecture}"
    path = pathlib.Path(directory) / f"{name}.json"
    path.write_text(json.dumps(scaled_config(architecture, text_cfg, vocab_size)))
    open_clip.add_model_config(path)
    return name


@dataclass(frozen=True)
class Scaled:
    """A registered scaled-down architecture.

    Attributes:
        name: what ``open_clip.create_model`` builds it under, ``small-<architecture>``.
        architecture: the real architecture it stands for.
        tokenizer: the local tokenizer directory a model spec needs (``tokenizer=DIR``), or None
            when open_clip's own CLIP tokenizer serves.
    """

    name: str
    architecture: str
    tokenizer: str | None

    def spec(self, model: str, seed: int = 0, **options: Any) -> str:
        """The ``--model`` shorthand that loads it with seeded random weights, e.g. ``m=small-RN50:random:0``."""
        extra = {**options, **({"tokenizer": self.tokenizer} if self.tokenizer else {})}
        return f"{model}={self.name}:random:{seed}" + "".join(f",{k}={v}" for k, v in extra.items())


def scale_architecture(architecture: str, directory: pathlib.Path) -> Scaled:
    """Register the scaled-down ``architecture`` with open_clip (and timm), building what it needs locally.

    A Hugging Face text tower becomes a tiny one of its family, saved with its tokenizer under
    ``directory/hf-<family>``; a hub tokenizer becomes a small trained one under
    ``directory/tokenizer-<kind>``, and the open_clip text vocabulary shrinks to its size. Both are
    built once per directory.

    Raises:
        ValueError: unknown architecture, or a trunk, text tower or tokenizer without a stand-in.
    """
    directory = pathlib.Path(directory)
    text = (get_model_config(architecture) or {}).get("text_cfg", {})
    if "hf_model_name" in text:
        family = _match(HF_TEXT_TOWERS, text["hf_model_name"], "Hugging Face text tower")
        local = directory / f"hf-{family}"
        if not (local / "config.json").exists():
            tiny_hf.save_text_tower(local, family, width=WIDTH, layers=DEPTH)
        text_cfg = {**text, "hf_model_name": str(local), "hf_tokenizer_name": str(local)}
        return Scaled(add_scaled_architecture(architecture, directory, text_cfg=text_cfg), architecture, str(local))
    if "hf_tokenizer_name" in text:
        kind = _match(HUB_TOKENIZERS, text["hf_tokenizer_name"], "tokenizer")
        local = directory / f"tokenizer-{kind}"
        if not (local / "tokenizer.json").exists():
            tiny_hf.save_tokenizer(local, kind)
        vocab = len(AutoTokenizer.from_pretrained(local))
        return Scaled(add_scaled_architecture(architecture, directory, vocab_size=vocab), architecture, str(local))
    return Scaled(add_scaled_architecture(architecture, directory), architecture, None)


def pretrained_architectures() -> list[str]:
    """Every architecture of ``open_clip.list_pretrained()``, once each, sorted."""
    return sorted({architecture for architecture, _ in open_clip.list_pretrained()})


def timm_architectures() -> dict[str, str]:
    """Every pretrained open_clip architecture with a timm image tower -> its timm trunk's name."""
    found = {}
    for architecture, _ in open_clip.list_pretrained():
        vision = (get_model_config(architecture) or {}).get("vision_cfg", {})
        if "timm_model_name" in vision:
            found[architecture] = vision["timm_model_name"]
    return found
