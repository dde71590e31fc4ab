"""Which tower classes and variants open_clip's pretrained architectures build, read from their configs.

Run ``python tests/openclip_coverage.py`` for a table: per architecture, its image and text tower
and whether engine/families/openclip.py adapts it. tests/test_family_openclip.py checks that
every open_clip-native variant listed here is among the scaled-down variants it tests.
"""

from __future__ import annotations

import open_clip
from open_clip.factory import get_model_config

CUSTOM_BLOCK_FLAGS = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")


def _block(tower_cfg: dict) -> str:
    if tower_cfg.get("block_type") == "custom" or any(tower_cfg.get(flag) for flag in CUSTOM_BLOCK_FLAGS):
        return "scaled-cosine" if tower_cfg.get("scaled_cosine_attn") else "custom"
    return "default"


def image_variant(cfg: dict) -> dict:
    """The image tower's class and, for open_clip's VisionTransformer, what shapes its pooling."""
    vision = cfg.get("vision_cfg", {})
    if vision.get("timm_model_name"):
        return {"tower": "TimmModel"}
    if isinstance(vision.get("layers"), (list, tuple)):
        return {"tower": "ModifiedResNet"}
    return {
        "tower": "VisionTransformer",
        "pool": "attentional" if vision.get("attentional_pool") else vision.get("pool_type", "tok"),
        "final_ln_after_pool": bool(vision.get("final_ln_after_pool")) and not vision.get("attentional_pool"),
        "ln_pre": not vision.get("no_ln_pre", False),
        "block": _block(vision),
    }


def text_variant(cfg: dict) -> dict:
    """The text tower's class and, for open_clip's own text transformer, its mask, pooling and projection."""
    text = cfg.get("text_cfg", {})
    if text.get("hf_model_name"):
        return {"tower": "HFTextEncoder"}
    if text.get("proj_type") == "none":
        projection = "none"
    else:
        projection = "linear+bias" if text.get("proj_bias") else "matrix"
    return {
        "tower": "TextTransformer" if cfg.get("custom_text") or "multimodal_cfg" in cfg else "CLIP built-in",
        "causal": not text.get("no_causal_mask", False),
        "pool": "cls (CoCa)" if text.get("embed_cls") else text.get("pool_type", "argmax"),
        "projection": projection,
        "block": _block(text),
    }


def variants(cfg: dict) -> list[dict]:
    """The open_clip-native tower variants of a model config (timm, ResNet and HF towers left out)."""
    found = [image_variant(cfg), text_variant(cfg)]
    return [v for v in found if v["tower"] in ("VisionTransformer", "TextTransformer", "CLIP built-in")]


def supported(variant: dict) -> bool:
    """Whether engine/families/openclip.py adapts a tower of this variant."""
    if variant["tower"] == "VisionTransformer":
        return variant["pool"] in ("tok", "avg", "attentional") and variant["block"] != "scaled-cosine"
    if variant["tower"] in ("TextTransformer", "CLIP built-in"):
        return variant["pool"] != "none" and variant["block"] != "scaled-cosine"
    return False


def survey() -> list[dict]:
    """One row per pretrained architecture: its name, tags, image and text variant, native variants."""
    tags: dict[str, list[str]] = {}
    for architecture, tag in open_clip.list_pretrained():
        tags.setdefault(architecture, []).append(tag)
    rows = []
    for architecture in sorted(tags):
        cfg = get_model_config(architecture)
        rows.append(
            {
                "architecture": architecture,
                "tags": tags[architecture],
                "image": image_variant(cfg),
                "text": text_variant(cfg),
                "variants": variants(cfg),
            }
        )
    return rows


def _describe(variant: dict) -> str:
    rest = ", ".join(f"{k}={v}" for k, v in variant.items() if k != "tower")
    mark = "ok" if supported(variant) else "--"
    return f"[{mark}] {variant['tower']}" + (f" ({rest})" if rest else "")


def main() -> None:
    """Print the survey and the counts of covered towers, architectures and (architecture, tag) pairs."""
    rows = survey()
    both = image_only = text_only = 0
    pairs = 0
    for row in rows:
        image, text = supported(row["image"]), supported(row["text"])
        print(f"{row['architecture']:32s} image {_describe(row['image'])}")
        print(f"{'':32s} text  {_describe(row['text'])}")
        both += image and text
        image_only += image
        text_only += text
        pairs += len(row["tags"]) if image and text else 0
    total_pairs = sum(len(row["tags"]) for row in rows)
    print(f"\n{len(rows)} architectures, {total_pairs} (architecture, tag) pairs")
    print(f"image tower adapted here: {image_only}; text tower adapted here: {text_only}")
    print(f"both towers adapted here: {both} architectures, {pairs} pairs")


if __name__ == "__main__":
    main()
