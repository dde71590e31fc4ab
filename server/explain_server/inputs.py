"""Turning request bytes and text into model inputs: image decoding, crop geometry, tokens."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transform import PreprocessCfg
from PIL import Image, ImageOps

# Documented in ListModels (Preprocessing.conversion).
CONVERSION_RULES = (
    "EXIF orientation applied; multi-frame images use their first frame; images with "
    "transparency are composited onto white (255, 255, 255); every other mode is converted "
    "with Pillow's Image.convert('RGB')"
)
_BACKGROUND = (255, 255, 255)


class InputError(ValueError):
    """A request field breaks a rule; ``field`` names it, the message says the rule."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode encoded image bytes into an RGB image in display orientation.

    Args:
        data: encoded bytes in any format Pillow reads.
        max_pixels: the largest width * height accepted; checked from the header, before decoding.

    Returns:
        An RGB ``PIL.Image`` after EXIF orientation (see :data:`CONVERSION_RULES`).

    Raises:
        InputError: empty, undecodable or truncated data, or too many pixels.
    """
    if not data:
        raise InputError("image", "is empty; send encoded image bytes (JPEG, PNG, WebP, ...)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise InputError(
                    "image", f"has {width}x{height} = {width * height} pixels, above the limit of {max_pixels}"
                )
            image.load()  # decode now: truncated data raises here instead of being padded
    except InputError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise InputError("image", f"could not be decoded: {err}") from err
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _resized_size(width: int, height: int, cfg: PreprocessCfg) -> tuple[int, int]:
    target_h, target_w = (cfg.size, cfg.size) if isinstance(cfg.size, int) else cfg.size
    if cfg.resize_mode == "squash":
        return target_w, target_h
    if cfg.resize_mode == "shortest" and target_h == target_w:
        # torchvision Resize(int): the short side becomes the target, the long side is truncated
        if width <= height:
            return target_w, int(target_w * height / width)
        return int(target_h * width / height), target_h
    # open_clip ResizeKeepRatio: 'longest' fits the long side, non-square 'shortest' the short one
    ratio_h, ratio_w = height / target_h, width / target_w
    ratio = max(ratio_h, ratio_w) if cfg.resize_mode == "longest" else min(ratio_h, ratio_w)
    return round(width / ratio), round(height / ratio)


def crop_box(width: int, height: int, cfg: PreprocessCfg) -> tuple[float, float, float, float]:
    """The region of the original image that open_clip's eval transform feeds to the model.

    Follows ``open_clip.transform.image_transform(is_train=False)``: resize by ``cfg.resize_mode``
    then centre crop (or pad, for 'longest') to ``cfg.size``, with torchvision's rounding.

    Args:
        width, height: original image size in pixels (after EXIF orientation).
        cfg: the model's preprocessing configuration.

    Returns:
        (x0, y0, x1, y1) in original-image pixels; may extend past the image where the
        transform pads ('longest' mode).
    """
    target_h, target_w = (cfg.size, cfg.size) if isinstance(cfg.size, int) else cfg.size
    new_w, new_h = _resized_size(width, height, cfg)
    left = int(round((new_w - target_w) / 2.0))
    top = int(round((new_h - target_h) / 2.0))
    sx, sy = width / new_w, height / new_h
    return (left * sx, top * sy, (left + target_w) * sx, (top + target_h) * sy)


@dataclass(frozen=True)
class Caption:
    """A tokenised caption: ids from the start token up to and including the end token."""

    token_ids: torch.Tensor  # (S_t,) int64
    labels: tuple[str, ...]  # one decoded label per token


def token_label(tokenizer: SimpleTokenizer, token_id: int) -> str:
    """Readable label of one token: its BPE text without the end-of-word marker, as UTF-8.

    Byte-pair fragments that are not valid UTF-8 alone decode to U+FFFD.
    """
    text = tokenizer.decoder[token_id].replace("</w>", "")
    if text.startswith("<") and text.endswith(">"):  # special tokens are plain text
        return text
    return bytearray(tokenizer.byte_decoder[c] for c in text).decode("utf-8", errors="replace")


def tokenize(tokenizer: SimpleTokenizer, caption: str) -> Caption:
    """Tokenise with open_clip's tokenizer and cut after the end token.

    Raises:
        InputError: the caption is empty or has no tokens (whitespace only).
    """
    if not caption.strip():
        raise InputError("caption", "must contain text; it is empty or whitespace only")
    ids = tokenizer([caption])[0]
    end = int((ids == tokenizer.eot_token_id).nonzero()[0])
    if end < 2:
        raise InputError("caption", "has no tokens after normalisation")
    token_ids = ids[: end + 1].long()
    return Caption(token_ids=token_ids, labels=tuple(token_label(tokenizer, int(i)) for i in token_ids))
