"""Turning request bytes and text into model inputs: image decoding, crop geometry, tokens."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer
from open_clip.transform import PreprocessCfg
from PIL import Image, ImageOps, UnidentifiedImageError

from .settings import ImageLimits
from .token_spans import readable
from .tokenizers import CaptionTokenizer, caption_tokenizer

# Documented in ListModels (Preprocessing.conversion).
CONVERSION_RULES = (
    "EXIF orientation applied; multi-frame images (GIF, WebP, TIFF, ...) use their first frame; "
    "images with transparency (RGBA, LA, PA, palette with a transparent colour) are composited onto "
    "white (255, 255, 255); 16-bit images are scaled to 8 bits over the full 16-bit range "
    "(value / 257); 32-bit integer and float images are scaled from their own minimum and maximum "
    "to 0-255; CMYK, grayscale, palette and other modes are converted with Pillow's "
    "Image.convert('RGB')"
)
_BACKGROUND = (255, 255, 255)
# Far above any caption that fits a CLIP context; bounds the tokenizer's work per request.
MAX_CAPTION_CHARS = 4096
# Unicode's control characters (category Cc: C0, DEL, C1) read as spaces. The tokenizer's
# cleaning (ftfy) would delete most of them and join the words around them ("a\x00cat" -> "ac",
# "at"); sampled real traffic carries them (NUL padding, Word's vertical tab line breaks), so
# they are not refused, and a one-for-one replacement keeps every character offset.
_CONTROLS_AS_SPACES = dict.fromkeys([*range(0x00, 0x20), *range(0x7F, 0xA0)], " ")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # samples per pixel, by IHDR colour type
# Adam7 interlacing: each pass's (first row, first column, row step, column step).
_ADAM7 = ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1))

# Pillow's own decompression-bomb check would refuse large images before ours can name the
# limit; decode_image checks the header's size against the configured limits instead.
Image.MAX_IMAGE_PIXELS = None


class InputError(ValueError):
    """A request field breaks a rule; ``field`` names it, ``rule`` says what is wrong."""

    def __init__(self, field: str, rule: str):
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule

    def renamed(self, fields: dict[str, str]) -> "InputError":
        """The same error for a field named differently in the request, e.g. ``images[2]`` for ``image``."""
        return InputError(fields.get(self.field, self.field), self.rule)


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Decode encoded image bytes into an RGB image in display orientation.

    Args:
        data: encoded bytes in any format Pillow reads.
        limits: size limits, checked from the header before decoding.

    Returns:
        An RGB ``PIL.Image`` after EXIF orientation, converted by :data:`CONVERSION_RULES`.

    Raises:
        InputError: empty, undecodable or truncated data, a size beyond the limits, or a mode
            that cannot be converted to RGB.
    """
    return load_image(open_image(data, limits), data)


def open_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Read the header of encoded image bytes and check its size; no pixel is decoded yet.

    Returns:
        The opened image, for :func:`load_image`; its ``size`` is before EXIF orientation.

    Raises:
        InputError: empty data, no header Pillow reads, or a size beyond the limits.
    """
    if not data:
        raise InputError("image", "is empty; send encoded image bytes (JPEG, PNG, WebP, ...)")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as err:  # its message quotes a BytesIO object address
        raise InputError("image", "could not be decoded: not in any image format Pillow reads") from err
    except (OSError, ValueError, SyntaxError) as err:
        raise InputError("image", f"could not be decoded: {err}") from err
    width, height = image.size
    if max(width, height) > limits.max_side:
        raise InputError("image", f"is {width}x{height}; the limit is {limits.max_side} pixels per side")
    if width * height > limits.max_pixels:
        raise InputError("image", f"has {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}")
    return image


def load_image(image: Image.Image, data: bytes) -> Image.Image:
    """Decode an image from :func:`open_image` of ``data`` into RGB in display orientation, as :func:`decode_image`.

    Raises:
        InputError: undecodable or truncated data, or a mode that cannot be converted to RGB.
    """
    try:
        image.load()  # decode now: truncated data raises here instead of being padded
        rgb = _to_rgb(ImageOps.exif_transpose(image))
    except (OSError, ValueError, SyntaxError) as err:
        raise InputError("image", f"could not be decoded: {err}") from err
    if image.format == "PNG":
        _check_png_data(data)
    return rgb


def _check_png_data(data: bytes) -> None:
    """Refuse a PNG whose image data ends before its header's last row.

    Pillow's PNG decoder stops without an error when the zlib stream in the IDAT chunks ends
    early, leaving the remaining rows black (its check that image and data end together is
    commented out in libImaging/ZipDecode.c). A stream cut inside a chunk raises in
    ``Image.load`` already; this catches a complete stream that is too short. Call it after
    Pillow has loaded the image, so the chunk layout and the stream are known to be sound.

    Raises:
        InputError: the IDAT stream inflates to fewer bytes than the header requires.
    """
    header, idat, pos = b"", [], len(b"\x89PNG\r\n\x1a\n")
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"IHDR":
            header = data[pos + 8 : pos + 8 + length]
        elif kind == b"IDAT":
            idat.append(data[pos + 8 : pos + 8 + length])
        elif idat:  # Pillow, as the PNG spec, reads the image from one run of consecutive IDATs
            break
        pos += 12 + length  # length, type, data, CRC
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    need = _png_scanline_bytes(width, height, depth * _PNG_CHANNELS[colour], interlace == 1)
    inflater, pending, got = zlib.decompressobj(), b"".join(idat), 0
    while got < need:
        # in bounded pieces, and no further than the header needs: Pillow ignores the rest
        rows = inflater.decompress(pending, min(need - got, 1 << 20))
        if not rows:  # the stream, or the data, ended
            break
        got, pending = got + len(rows), inflater.unconsumed_tail
    if got < need:
        raise InputError(
            "image",
            f"is truncated: its PNG image data holds {got} of the {need} bytes of rows its {width}x{height} "
            "header declares",
        )


def _png_scanline_bytes(width: int, height: int, bits_per_pixel: int, interlaced: bool) -> int:
    """Bytes of filtered PNG scanlines (a filter-type byte per row) an image's header declares."""
    total = 0
    for row, column, row_step, column_step in _ADAM7 if interlaced else ((0, 0, 1, 1),):
        rows = max(0, -(-(height - row) // row_step))
        columns = max(0, -(-(width - column) // column_step))
        if columns:  # a pass without columns has no rows either, not even filter bytes
            total += rows * (1 + (columns * bits_per_pixel + 7) // 8)
    return total


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT:
        # Pillow's convert clips 16-bit values at 255, turning most images near-white.
        gray = np.rint(np.asarray(image, dtype=np.float64) / 257.0).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        return Image.fromarray(np.rint(scaled).astype(np.uint8)).convert("RGB")
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


def check_resize(width: int, height: int, cfg: PreprocessCfg, limits: ImageLimits) -> None:
    """Refuse images whose resized intermediate would be huge (extreme aspect ratios).

    Raises:
        InputError: the resized image would have more than ``limits.max_pixels`` pixels.
    """
    new_w, new_h = _resized_size(width, height, cfg)
    if new_w * new_h > limits.max_pixels:
        raise InputError(
            "image",
            f"is {width}x{height}; preprocessing would resize it to {new_w}x{new_h}, above the limit of "
            f"{limits.max_pixels} pixels (crop extreme aspect ratios before sending)",
        )


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
    """A tokenised caption: ids from the start token up to and including the end token.

    Attributes:
        token_ids: (S_t,) int64, the ids the text tower reads before any padding.
        labels: one readable label per token: a special token's text, else the token's text as
            the tokenizer sees it (e.g. lower-cased); a token holding part of a character's
            UTF-8 bytes is labelled with the characters it shares with its neighbours (never
            U+FFFD); a token of whitespace only is labelled U+2581.
        spans: per token, the (start, end) character offsets in the caption string as given
            (before any cleaning) of the characters it stands for: (0, 0) for special tokens;
            the whole character for each fragment of a multi-byte character (shared by the
            fragments); an empty span for whitespace tokens. Characters the tokenizer's cleaning
            deletes (punctuation for SigLIP, invisible characters) belong to the token before
            them, so the spans cover every non-whitespace character of the caption.
    """

    token_ids: torch.Tensor  # (S_t,) int64
    labels: tuple[str, ...]  # one readable label per token
    spans: tuple[tuple[int, int], ...] = ()  # one (start, end) per token, in the caption as given


def token_label(tokenizer: SimpleTokenizer, token_id: int) -> str:
    """Readable label of one token on its own: its BPE text without the end-of-word marker, as UTF-8.

    Byte-pair fragments that are not valid UTF-8 alone decode to U+FFFD; :func:`tokenize` labels
    them from the caption instead.
    """
    text = tokenizer.decoder[token_id].replace("</w>", "")
    if text.startswith("<") and text.endswith(">"):  # special tokens are plain text
        return text
    return bytearray(tokenizer.byte_decoder[c] for c in text).decode("utf-8", errors="replace")


def tokenize(tokenizer: CaptionTokenizer | SimpleTokenizer | HFTokenizer, caption: str) -> Caption:
    """Tokenise with the model's tokenizer and cut after the end token.

    Control characters (U+0000-U+001F, U+007F-U+009F) count as whitespace, as tab and newline
    do. Policy for long captions: refused, never truncated (a truncated caption would be
    explained as if it were the whole one).

    Args:
        tokenizer: a :class:`~.tokenizers.CaptionTokenizer`, or open_clip's tokenizer of the model.
        caption: the caption as the request gives it.

    Raises:
        InputError: the caption is empty or only whitespace and control characters, longer
            than :data:`MAX_CAPTION_CHARS`, spells a special token (also through the
            tokenizer's cleaning, e.g. an HTML entity), has no tokens, or needs more tokens
            (special tokens included) than the model's context length.
    """
    tok = caption_tokenizer(tokenizer)
    text = caption.translate(_CONTROLS_AS_SPACES)
    if not text.strip():
        raise InputError("caption", "must contain text; it is empty or only whitespace and control characters")
    if len(text) > MAX_CAPTION_CHARS:
        raise InputError(
            "caption",
            f"has {len(text)} characters; the limit is {MAX_CAPTION_CHARS} (models read at most a few dozen tokens)",
        )
    cleaned, pieces, sequence = tok.encode(text)
    # checked on the ids: the tokenizer's cleaning (lower-casing, HTML entities, deleting
    # invisible characters) can spell a special token the raw text does not
    content = {p.token_id for p in pieces}
    for special in tok.refused_ids:
        if special in content:
            raise InputError("caption", tok.refusal(special))
    if not pieces:
        raise InputError("caption", "has no tokens after normalisation")
    if len(sequence) > tok.context_length:
        raise InputError(
            "caption",
            f"has {len(sequence)} tokens including {tok.counted}; the model's limit is {tok.context_length}",
        )
    # the translation of control characters is one-for-one, so offsets in text are offsets in caption
    labels, spans = readable(text, cleaned, pieces)
    first, last = tok.prefix_length, tok.prefix_length + len(pieces)
    return Caption(
        token_ids=torch.tensor(sequence, dtype=torch.long),
        labels=(
            *(tok.special_label(i) for i in sequence[:first]),
            *labels,
            *(tok.special_label(i) for i in sequence[last:]),
        ),
        spans=((0, 0),) * first + tuple(spans) + ((0, 0),) * (len(sequence) - last),
    )
