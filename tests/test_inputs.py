"""Image decoding, crop geometry and tokenisation, in-process."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import open_clip
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from explain_server.inputs import InputError, crop_box, decode_image, token_label, tokenize
from explain_server.settings import ImageLimits

pytestmark = pytest.mark.unit

TOKENIZER = open_clip.get_tokenizer("ViT-B-32")


def smooth_image(width: int, height: int) -> Image.Image:
    """A smooth colour ramp: resampling it twice in different orders agrees closely."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([255 * x / width, 255 * y / height, 128 + 100 * np.sin(x / 37.0 + y / 23.0)], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.mark.parametrize("size", [(448, 224), (300, 451), (640, 480), (224, 224), (97, 1000)])
@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
def test_crop_box_is_what_the_transform_feeds_the_model(size, resize_mode):
    """Resizing just the crop box to the model size gives the open_clip transform's pixels."""
    cfg = PreprocessCfg(size=224, resize_mode=resize_mode, interpolation="bilinear")
    image = smooth_image(*size)
    want = image_transform_v2(cfg, is_train=False)(image)
    box = crop_box(*size, cfg)
    direct = image.resize((224, 224), Image.Resampling.BILINEAR, box=box)
    got = image_transform_v2(PreprocessCfg(size=224, resize_mode="squash", interpolation="bilinear"), is_train=False)(
        direct
    )
    assert torch.mean(torch.abs(got - want)) < 0.02  # normalised units; a one-pixel shift gives > 0.05


def test_crop_box_examples():
    cfg = PreprocessCfg(size=224)
    assert crop_box(448, 224, cfg) == (112.0, 0.0, 336.0, 224.0)
    assert crop_box(224, 448, cfg) == (0.0, 112.0, 224.0, 336.0)
    assert crop_box(1000, 1000, cfg) == (0.0, 0.0, 1000.0, 1000.0)
    x0, y0, x1, y1 = crop_box(300, 451, cfg)
    assert (x0, x1) == (0.0, 300.0) and y1 - y0 == pytest.approx(300.0, rel=0.01)
    assert crop_box(640, 480, PreprocessCfg(size=224, resize_mode="squash")) == (0.0, 0.0, 640.0, 480.0)
    x0, y0, x1, y1 = crop_box(640, 480, PreprocessCfg(size=224, resize_mode="longest"))
    assert (x0, x1) == (0.0, 640.0) and y0 < 0 < 480 < y1  # padded above and below


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def test_decode_applies_exif_orientation_and_returns_rgb():
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees counter-clockwise for display
    data = encoded(Image.new("L", (30, 10), 200), "JPEG", exif=exif)
    image = decode_image(data, ImageLimits(max_pixels=10_000))
    assert image.size == (10, 30) and image.mode == "RGB"


def test_transparency_is_composited_onto_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    image = decode_image(encoded(rgba, "PNG"), ImageLimits(max_pixels=100))
    assert image.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "is empty"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "could not be decoded"),
        (b"<!doctype html><html></html>", "could not be decoded"),
        (np.random.default_rng(0).bytes(4096), "could not be decoded"),
    ],
)
def test_undecodable_payloads(data, reason):
    with pytest.raises(InputError, match=f"^image: {reason}") as info:
        decode_image(data, ImageLimits(max_pixels=10_000))
    assert info.value.field == "image"


def test_truncated_jpeg_is_refused():
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = encoded(noise, "JPEG")
    with pytest.raises(InputError, match="could not be decoded"):
        decode_image(data[: len(data) // 2], ImageLimits(max_pixels=10_000))


# Adam7 passes: (first row, first column, row step, column step), as the PNG spec lists them.
ADAM7 = ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1))


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk of a PNG file."""
    chunks, pos = [], 8
    while pos < len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        chunks.append((kind, data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks


def png_file(chunks: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d)) for k, d in chunks)
    return b"\x89PNG\r\n\x1a\n" + body


def with_scanlines(png: bytes, keep) -> bytes:
    """``png`` with its image data replaced by one complete zlib stream of ``keep(scanlines)``."""
    chunks = png_chunks(png)
    scanlines = zlib.decompress(b"".join(d for k, d in chunks if k == b"IDAT"))
    first = next(i for i, (k, _) in enumerate(chunks) if k == b"IDAT")
    rest = [c for c in chunks[first:] if c[0] != b"IDAT"]
    return png_file(chunks[:first] + [(b"IDAT", zlib.compress(keep(scanlines)))] + rest)


def interlaced_png(rgb: np.ndarray) -> bytes:
    """An Adam7-interlaced 8-bit RGB PNG (Pillow writes none), every row with filter type 0."""
    height, width, _ = rgb.shape
    passes = (rgb[r::dr, c::dc] for r, c, dr, dc in ADAM7)
    scanlines = b"".join(b"\x00" + row.tobytes() for sub in passes if sub.shape[1] for row in sub)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 1)
    return png_file([(b"IHDR", ihdr), (b"IDAT", zlib.compress(scanlines)), (b"IEND", b"")])


def valid_pngs():
    """(name, PNG bytes, the RGB pixels decode_image must return) for PNG variants that must load."""
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (23, 37, 3), dtype=np.uint8)  # odd sizes: partial bytes and passes
    gray = rgb[..., 0]
    yield "RGB", encoded(Image.fromarray(rgb), "PNG"), rgb
    yield "L", encoded(Image.fromarray(gray), "PNG"), np.dstack([gray] * 3)
    bits = gray > 127
    yield "1-bit", encoded(Image.fromarray(bits), "PNG"), np.dstack([np.where(bits, 255, 0).astype(np.uint8)] * 3)
    for colours in (4, 16):  # Pillow writes these with 2 and 4 bits per pixel
        palette = Image.fromarray(rgb).quantize(colours)
        yield f"palette-{colours}", encoded(palette, "PNG"), np.asarray(palette.convert("RGB"))
    opaque = np.full(gray.shape, 255, dtype=np.uint8)
    yield "RGBA", encoded(Image.fromarray(np.dstack([rgb, opaque])), "PNG"), rgb
    yield "LA", encoded(Image.fromarray(np.dstack([gray, opaque]), mode="LA"), "PNG"), np.dstack([gray] * 3)
    sixteen = rng.integers(0, 65536, gray.shape).astype(np.uint16)
    yield "16-bit", encoded(Image.fromarray(sixteen), "PNG"), np.dstack([np.rint(sixteen / 257).astype(np.uint8)] * 3)
    apng = encoded(Image.fromarray(rgb), "PNG", save_all=True, append_images=[Image.fromarray(255 - rgb)])
    yield "APNG", apng, rgb
    big = rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)
    several = encoded(Image.fromarray(big), "PNG")
    assert [k for k, _ in png_chunks(several)].count(b"IDAT") > 1
    yield "several IDATs", several, big
    yield "interlaced", interlaced_png(rgb), rgb
    yield "interlaced 1x1", interlaced_png(rgb[:1, :1]), rgb[:1, :1]
    yield "data past the last row", with_scanlines(encoded(Image.fromarray(rgb), "PNG"), lambda s: s + bytes(500)), rgb


VALID_PNGS = list(valid_pngs())


@pytest.mark.parametrize("name, data, want", VALID_PNGS, ids=[c[0] for c in VALID_PNGS])
def test_valid_pngs_decode_to_their_pixels(name, data, want):
    np.testing.assert_array_equal(np.asarray(decode_image(data, ImageLimits())), want)


def truncated_pngs():
    """(name, PNG bytes) whose image data ends before the header's last row."""
    rgb = np.random.default_rng(6).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    row = 1 + 96 * 3  # filter byte and pixels
    png = encoded(Image.fromarray(rgb), "PNG")
    yield "30 of 96 rows", with_scanlines(png, lambda s: s[: 30 * row])
    yield "one row short", with_scanlines(png, lambda s: s[:-row])
    yield "ends inside a row", with_scanlines(png, lambda s: s[: 30 * row + 100])
    yield "no rows", with_scanlines(png, lambda s: b"")
    palette = encoded(Image.fromarray(rgb).quantize(4), "PNG")  # 2 bits per pixel: 25 bytes a row
    yield "2-bit palette, one row short", with_scanlines(palette, lambda s: s[: -(1 + 24)])
    last_pass = 48 * row  # Adam7's pass 7 holds the odd rows, whole
    yield "interlaced, last pass missing", with_scanlines(interlaced_png(rgb), lambda s: s[:-last_pass])
    yield "cut inside the data", png[: len(png) // 2]


TRUNCATED_PNGS = list(truncated_pngs())


@pytest.mark.parametrize("name, data", TRUNCATED_PNGS, ids=[c[0] for c in TRUNCATED_PNGS])
def test_truncated_pngs_are_refused(name, data):
    with pytest.raises(InputError, match="^image: .*truncated"):
        decode_image(data, ImageLimits())


def test_a_truncated_png_names_what_is_missing():
    rgb = np.zeros((96, 96, 3), dtype=np.uint8)
    data = with_scanlines(encoded(Image.fromarray(rgb), "PNG"), lambda s: s[: 30 * 289])
    with pytest.raises(InputError, match="^image: is truncated: its PNG image data holds 8670 of the 27744 bytes"):
        decode_image(data, ImageLimits())


def test_pixel_limits_are_checked_before_decoding():
    data = encoded(Image.new("RGB", (200, 100)), "PNG")
    with pytest.raises(InputError, match="200x100 = 20000 pixels; the limit is 19999"):
        decode_image(data, ImageLimits(max_pixels=19_999))
    with pytest.raises(InputError, match="is 200x100; the limit is 150 pixels per side"):
        decode_image(data, ImageLimits(max_side=150))


def test_a_header_claiming_a_giant_image_is_refused_without_decoding():
    """A 100000 x 100000 PNG header over a few bytes of data: refused from the header alone."""
    png = encoded(Image.new("L", (1, 1)), "PNG")
    ihdr = b"IHDR" + (100_000).to_bytes(4, "big") * 2 + png[24:29]
    giant = png[:12] + ihdr + zlib.crc32(ihdr).to_bytes(4, "big") + png[33:]
    with pytest.raises(InputError, match="is 100000x100000; the limit is 20000 pixels per side"):
        decode_image(giant, ImageLimits())


def test_tokenize_matches_open_clip_and_cuts_after_the_end_token():
    caption = tokenize(TOKENIZER, "A photo of a cat!")
    full = TOKENIZER(["A photo of a cat!"])[0]
    assert caption.token_ids.tolist() == full[: len(caption.token_ids)].tolist()
    assert caption.token_ids[-1] == TOKENIZER.eot_token_id and full[len(caption.token_ids)] == 0
    assert caption.labels == ("<start_of_text>", "a", "photo", "of", "a", "cat", "!", "<end_of_text>")


def test_token_labels_are_valid_utf8():
    caption = tokenize(TOKENIZER, "café 🐱 naïve")
    assert caption.labels[0] == "<start_of_text>"
    for label in caption.labels:
        label.encode("utf-8")  # raises on lone surrogates
    assert "".join(caption.labels[1:-1]).replace("\ufffd", "") != ""


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_captions_are_refused(text):
    with pytest.raises(InputError, match="^caption: must contain text"):
        tokenize(TOKENIZER, text)


def test_captions_with_no_tokens_after_normalisation_are_refused():
    with pytest.raises(InputError, match="^caption: has no tokens after normalisation"):
        tokenize(TOKENIZER, "\ufeff")  # a byte order mark, which the tokenizer's cleaning deletes


@pytest.mark.parametrize("control", ["\x00", "\x01", "\x07", "\x0b", "\x1b", "\x1f", "\x7f", "\x85", "\x9f"])
def test_control_characters_separate_words_as_whitespace_does(control):
    assert tokenize(TOKENIZER, f"a{control}cat").labels == tokenize(TOKENIZER, "a cat").labels
    caption = f"a small{control}{control}red circle{control}"
    spaced = "a small  red circle "
    assert tokenize(TOKENIZER, caption).token_ids.tolist() == tokenize(TOKENIZER, spaced).token_ids.tolist()


@pytest.mark.parametrize("text", ["a\tcat", "a\ncat", "a\r\ncat", "a\x0ccat", "a \t\n cat\n"])
def test_tabs_and_newlines_still_separate_words(text):
    assert tokenize(TOKENIZER, text).labels == ("<start_of_text>", "a", "cat", "<end_of_text>")


@pytest.mark.parametrize("text", ["\x00", "\x00\x00 \t", "\x1b\x7f\x85"])
def test_captions_of_only_control_characters_are_refused_as_empty(text):
    with pytest.raises(InputError, match="^caption: must contain text; it is empty or only whitespace and control"):
        tokenize(TOKENIZER, text)


@pytest.mark.parametrize(
    "text, special",
    [
        ("a cat <end_of_text> on a mat", "<end_of_text>"),
        ("<START_OF_TEXT> a cat", "<start_of_text>"),
        ("a &lt;end_of_text&gt; cat", "<end_of_text>"),  # the tokenizer decodes HTML entities
        ("a <end_of\ufeff_text> cat", "<end_of_text>"),  # and deletes byte order marks
    ],
)
def test_special_tokens_are_refused_however_they_are_spelled(text, special):
    with pytest.raises(InputError, match=f"^caption: contains '{special}', which the tokenizer reads as a special"):
        tokenize(TOKENIZER, text)


def test_a_control_character_cannot_join_a_special_token():
    """Read as a space, a NUL inside a special token's text leaves ordinary tokens."""
    caption = tokenize(TOKENIZER, "a <end_of\x00_text> cat")
    assert caption.token_ids.tolist().count(TOKENIZER.eot_token_id) == 1 and caption.labels[-2] == "cat"


def test_token_label_of_special_tokens():
    assert token_label(TOKENIZER, TOKENIZER.sot_token_id) == "<start_of_text>"
    assert token_label(TOKENIZER, TOKENIZER.eot_token_id) == "<end_of_text>"


def test_captions_longer_than_the_context_are_refused_with_the_true_count():
    caption = " ".join(["word"] * 80)
    with pytest.raises(
        InputError, match="^caption: has 82 tokens including the start and end tokens; the model's limit is 77"
    ):
        tokenize(TOKENIZER, caption)
    fits = " ".join(["word"] * 75)
    assert len(tokenize(TOKENIZER, fits).token_ids) == 77


def test_real_exclamation_marks_are_kept():
    """Token id 0 is '!': cutting at the end token, not at the first zero, keeps them."""
    caption = tokenize(TOKENIZER, "a cat !(really)")
    assert 0 in caption.token_ids.tolist()  # "!(" -> ["!", "("], and "!" alone is id 0
    assert caption.labels[-1] == "<end_of_text>" and "!" in caption.labels
    assert caption.token_ids.tolist() == TOKENIZER(["a cat !(really)"])[0][: len(caption.token_ids)].tolist()
