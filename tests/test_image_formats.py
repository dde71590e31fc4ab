"""Every image mode and container gives the result of its documented plain-RGB equivalent."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.integration

CAPTION = "a red circle and a blue square"
RNG = np.random.default_rng(11)
RGB = RNG.integers(0, 256, size=(48, 80, 3), dtype=np.uint8)
GRAY = RNG.integers(0, 256, size=(48, 80), dtype=np.uint8)
OPAQUE = RNG.random((48, 80)) < 0.5  # binary alpha: compositing onto white is exact


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def white_where_transparent(rgb: np.ndarray) -> np.ndarray:
    return np.where(OPAQUE[..., None], rgb, 255).astype(np.uint8)


def frames(fmt: str, **kwargs) -> bytes:
    first, second = Image.fromarray(RGB), Image.fromarray(255 - RGB)
    return encode(first, fmt, save_all=True, append_images=[second], **kwargs)


def cases():
    alpha = np.where(OPAQUE, 255, 0).astype(np.uint8)
    palette = Image.fromarray(RGB).quantize(16)
    indices = np.asarray(palette).copy()
    indices[~OPAQUE] = 16  # a palette entry used only by transparent pixels
    transparent = Image.fromarray(indices, mode="P")
    transparent.putpalette(palette.getpalette()[: 16 * 3] + [0, 0, 0])
    palette_rgb = np.asarray(palette.convert("RGB"))
    yield "RGBA", encode(Image.fromarray(np.dstack([RGB, alpha])), "PNG"), white_where_transparent(RGB)
    gray_rgb = np.repeat(GRAY[..., None], 3, axis=2)
    yield "LA", encode(Image.fromarray(np.dstack([GRAY, alpha]), mode="LA"), "PNG"), white_where_transparent(gray_rgb)
    yield "P+transparency", encode(transparent, "PNG", transparency=16), white_where_transparent(palette_rgb)
    yield "L", encode(Image.fromarray(GRAY), "PNG"), gray_rgb
    yield "CMYK", encode(Image.fromarray(RGB).convert("CMYK"), "TIFF"), RGB
    sixteen = Image.fromarray(GRAY.astype(np.uint16) * 257)
    assert sixteen.mode.startswith("I;16")
    yield "I;16", encode(sixteen, "PNG"), gray_rgb
    yield "GIF frames", frames("GIF"), np.asarray(Image.open(io.BytesIO(frames("GIF"))).convert("RGB"))
    yield "WebP frames", frames("WEBP", lossless=True), RGB
    yield "TIFF pages", frames("TIFF"), RGB


CASES = list(cases())


@pytest.mark.parametrize("name, data, equivalent", CASES, ids=[c[0] for c in CASES])
def test_format_equals_its_rgb_equivalent(client, name, data, equivalent):
    got = client.explain(data, CAPTION)
    want = client.explain(encode(Image.fromarray(equivalent), "PNG"), CAPTION)
    assert got.image_size == want.image_size == (80, 48)
    np.testing.assert_array_equal(got.attribution, want.attribution)
    assert got.score == want.score


def test_sixteen_bit_is_not_clipped_to_white(client):
    """Pillow's own convert('RGB') would clip 16-bit values at 255 and explain a white image."""
    dark = Image.fromarray(np.full((48, 80), 20 * 257, dtype=np.uint16))
    white = client.explain(encode(Image.new("RGB", (80, 48), (255, 255, 255)), "PNG"), CAPTION)
    got = client.explain(encode(dark, "PNG"), CAPTION)
    want = client.explain(encode(Image.new("RGB", (80, 48), (20, 20, 20)), "PNG"), CAPTION)
    np.testing.assert_array_equal(got.attribution, want.attribution)
    assert not np.array_equal(got.attribution, white.attribution)


def test_list_models_documents_the_conversion_rules(client):
    conversion = client.list_models()[0].preprocessing.conversion
    for rule in ("first frame", "composited onto white", "16-bit", "CMYK"):
        assert rule in conversion
