"""Write docs/models.md: every (architecture, pretrained tag) pair of ``open_clip.list_pretrained()``, by family,
with what the server does with it.

Run ``python docs/models_table.py > docs/models.md`` (with the server on the path) after changing an adapter,
a default layer or the default quadrature; tests/test_coverage.py fails while the file differs from this
script's output.

Each architecture is built at its real size on PyTorch's meta device (shapes, no weights, no download) and
split by the server's own family adapters (engine/families), so the status, layer names and grids are the
ones a served model reports. Two things cannot come from open_clip alone offline:

- Hugging Face text towers (XLM-RoBERTa, RoBERTa, NLLB) are configured by their hub ``config.json``; the sizes
  in :data:`HF_TEXT_CONFIGS` are those files' values, written to a local directory and built with
  ``hf_model_pretrained`` off.
- FastViT trunks (MobileCLIP) fold their branches into single convolutions when adapted, which needs
  tensors with storage: their image tower is given uninitialised CPU memory (``to_empty``) first.
"""

from __future__ import annotations

import copy
import json
import logging
import pathlib
import sys
import tempfile
from collections import defaultdict

import open_clip
import torch
from open_clip.factory import get_model_config
from timm.models.fastvit import FastVit

from explain_server.engine.families import split_towers
from explain_server.engine.split import SplitTower, UnsupportedModelError, default_quadrature
from explain_server.model_spec import DEFAULT_METHOD, DEFAULT_N_STEPS

HF_TEXT_CONFIGS = {
    "xlm-roberta-base": dict(
        model_type="xlm-roberta", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, vocab_size=250002, max_position_embeddings=514, pad_token_id=1, type_vocab_size=1,
    ),
    "xlm-roberta-large": dict(
        model_type="xlm-roberta", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
        intermediate_size=4096, vocab_size=250002, max_position_embeddings=514, pad_token_id=1, type_vocab_size=1,
    ),
    "roberta-base": dict(
        model_type="roberta", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, vocab_size=50265, max_position_embeddings=514, pad_token_id=1, type_vocab_size=1,
    ),
    "facebook/nllb-200-distilled-600M": dict(
        model_type="m2m_100", d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
        decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, vocab_size=256206,
        max_position_embeddings=1024, pad_token_id=1, scale_embedding=True,
    ),
    "facebook/nllb-200-distilled-1.3B": dict(
        model_type="m2m_100", d_model=1024, encoder_layers=24, decoder_layers=24, encoder_attention_heads=16,
        decoder_attention_heads=16, encoder_ffn_dim=8192, decoder_ffn_dim=8192, vocab_size=256206,
        max_position_embeddings=1024, pad_token_id=1, scale_embedding=True,
    ),
}  # fmt: skip
"""The hub configs of the Hugging Face text towers of open_clip's pretrained models (their sizes and ids)."""

FAMILIES = (
    "ViT CLIP (open_clip VisionTransformer)",
    "OpenAI ResNet (ModifiedResNet)",
    "CLIPA",
    "MetaCLIP worldwide (XLM-V tokenizer)",
    "CoCa",
    "SigLIP",
    "SigLIP2",
    "EVA",
    "PE-Core",
    "ConvNeXt",
    "MobileCLIP",
    "ViTamin",
    "Hugging Face text towers (XLM-RoBERTa, RoBERTa, NLLB)",
)
"""The families, in the order the document lists them."""


def family(architecture: str) -> str:
    """The family of a pretrained open_clip architecture (one of :data:`FAMILIES`), read from its config."""
    cfg = get_model_config(architecture)
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    trunk = vision.get("timm_model_name", "")
    tokenizer = text.get("hf_tokenizer_name", "")
    rules = (
        ("hf_model_name" in text, FAMILIES[12]),
        ("multimodal_cfg" in cfg, FAMILIES[4]),
        (isinstance(vision.get("layers"), list), FAMILIES[1]),
        (tokenizer.startswith("bert-"), FAMILIES[2]),
        ("xlm-v" in tokenizer, FAMILIES[3]),
        ("siglip" in trunk, FAMILIES[6] if "SigLIP2" in architecture else FAMILIES[5]),
        (trunk.startswith("eva"), FAMILIES[7]),
        ("pe_core" in trunk, FAMILIES[8]),
        (trunk.startswith("convnext"), FAMILIES[9]),
        (architecture.startswith("MobileCLIP"), FAMILIES[10]),
        (trunk.startswith("vitamin"), FAMILIES[11]),
    )
    return next((name for matched, name in rules if matched), FAMILIES[0])


def _meta_model(architecture: str, hf_dir: pathlib.Path) -> torch.nn.Module:
    """``architecture`` at its real size on the meta device (see the module docstring for the two exceptions)."""
    cfg = copy.deepcopy(get_model_config(architecture))
    text = cfg["text_cfg"]
    if "hf_model_name" in text:
        local = hf_dir / text["hf_model_name"].replace("/", "--")
        local.mkdir(parents=True, exist_ok=True)
        (local / "config.json").write_text(json.dumps(HF_TEXT_CONFIGS[text["hf_model_name"]]))
        text.update(hf_model_name=str(local), hf_model_pretrained=False)
    cfg.pop("custom_text", None)
    custom = "hf_model_name" in text or get_model_config(architecture).get("custom_text", False)
    with torch.device("meta"):
        if "multimodal_cfg" in cfg:
            model = open_clip.CoCa(**cfg)
        else:
            model = (open_clip.CustomTextCLIP if custom else open_clip.CLIP)(**cfg)
    return model.eval()


def _towers(model: torch.nn.Module) -> tuple[SplitTower, SplitTower]:
    if isinstance(getattr(model.visual, "trunk", None), FastVit):
        # its adapter reparameterises it, writing tensors, which meta tensors cannot hold
        model.visual.to_empty(device="cpu")
    return split_towers(model)


def _tokenizer(architecture: str) -> str:
    text = get_model_config(architecture)["text_cfg"]
    hub = text.get("hf_tokenizer_name") or text.get("hf_model_name")
    return f"`{hub}` (hub): offline, `tokenizer=DIR`" if hub else "CLIP BPE (bundled with open_clip)"


def _layers(tower: SplitTower) -> str:
    layer = tower.layers[tower.default_layer]
    return f"`{layer.name}` of {len(tower.layers)}"


def rows() -> list[tuple[str, str, str, str, str, str, str, str, str]]:
    """Per (architecture, tag), in the document's order: family, architecture, tag, status, text tower, image
    tower, grid (prefix + rows x columns), default quadrature and tokenizer."""
    tags: dict[str, list[str]] = defaultdict(list)
    for architecture, tag in open_clip.list_pretrained():
        tags[architecture].append(tag)
    described = []
    with tempfile.TemporaryDirectory() as hf_dir:
        for architecture in sorted(tags):
            model = _meta_model(architecture, pathlib.Path(hf_dir))
            try:
                text, image = _towers(model)
            except UnsupportedModelError as err:
                status, text_cell, image_cell, grid, quadrature = f"refused: {err}", "", "", "", ""
            else:
                status = "explained"
                text_cell = f"{type(text).__name__}, {_layers(text)}"
                image_cell = f"{type(image).__name__}, {_layers(image)}"
                layer = image.layers[image.default_layer]
                prefix = " + ".join(layer.prefix)
                grid = f"{prefix + ' + ' if prefix else ''}{layer.grid[0]}x{layer.grid[1]}"
                method, n_steps = default_quadrature(text, image)
                quadrature = f"{method or DEFAULT_METHOD} {n_steps or DEFAULT_N_STEPS}"
            for tag in tags[architecture]:
                described.append(
                    (
                        family(architecture),
                        architecture,
                        tag,
                        status,
                        text_cell,
                        image_cell,
                        grid,
                        quadrature,
                        _tokenizer(architecture),
                    )
                )
    order = {name: k for k, name in enumerate(FAMILIES)}
    return sorted(described, key=lambda row: order[row[0]])


def document() -> str:
    """docs/models.md."""
    table = rows()
    explained = sum(row[3] == "explained" for row in table)
    lines = [
        "# Models",
        "",
        "<!-- Generated by docs/models_table.py; do not edit (tests/test_coverage.py checks it). -->",
        "",
        f"Every pretrained model of open_clip {open_clip.__version__} (`open_clip.list_pretrained()`): "
        f"{len(table)} (architecture, tag) pairs of {len({row[1] for row in table})} architectures, "
        f"{explained} explained. Structure is read from each architecture at its real size, split by the "
        "server's own family adapters.",
        "",
        "Quadrature is each model's default rule and node count, its families' measured choice "
        "(docs/benchmarks.md). Layers are given as the default layer's name and the number of layers a request may pick; the image grid is the "
        "default image layer's, at the model's own image size, with its prefix tokens first. A tokenizer "
        "from the Hugging Face hub needs a local copy offline: the model option `tokenizer=DIR`.",
    ]
    for name in FAMILIES:
        members = [row for row in table if row[0] == name]
        if not members:
            continue
        lines += [
            "",
            f"## {name}",
            "",
            "| architecture | tag | status | text tower, default layer | image tower, default layer | grid | quadrature "
            "| tokenizer |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += ["| " + " | ".join(row[1:]) + " |" for row in members]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    logging.disable(logging.WARNING)  # open_clip logs a warning per model built without weights
    sys.stdout.write(document())
