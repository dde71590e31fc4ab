"""Rendering a (Gh, Gw) heatmap onto the crop box of the original image."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

__all__ = ["diverging_colors", "render_overlay"]


def diverging_colors(values: np.ndarray) -> np.ndarray:
    """Map values in [-1, 1] to RGB with a blue-white-red diverging colormap.

    Args:
        values: array of any shape; values outside [-1, 1] are clipped.

    Returns:
        float64 array of shape ``values.shape + (3,)``, RGB in [0, 1]:
        -1 -> blue (0, 0, 1), 0 -> white (1, 1, 1), +1 -> red (1, 0, 0),
        linear in between.
    """
    v = np.clip(np.asarray(values, dtype=np.float64), -1.0, 1.0)
    neg = np.maximum(-v, 0.0)
    pos = np.maximum(v, 0.0)
    return np.stack([1.0 - neg, 1.0 - np.abs(v), 1.0 - pos], axis=-1)


def _painted_range(lo: float, hi: float, size: int) -> tuple[int, int]:
    """Pixel indices [start, stop) of 0..size-1 whose centres (index + 0.5) lie in [lo, hi)."""
    start = min(max(math.ceil(lo - 0.5), 0), size)
    stop = min(max(math.ceil(hi - 0.5), start), size)
    return start, stop


def render_overlay(
    image: Image.Image,
    heatmap: np.ndarray,
    crop_box: Sequence[float],
    *,
    alpha: float = 0.5,
) -> Image.Image:
    """Alpha-blend a coloured heatmap onto the crop box of ``image``.

    Args:
        image: the original image (any mode; converted to RGB).
        heatmap: (Gh, Gw) values, any real dtype; grid row 0 is the top of the
            crop box, column 0 its left. Resized bilinearly (Pillow) onto the
            crop box and coloured by :func:`diverging_colors` of
            ``heatmap / max|heatmap|``; the colour's opacity is ``alpha`` times
            that magnitude, so zero leaves the photo visible.
        crop_box: (x0, y0, x1, y1) in ``image`` pixels, may be fractional and may
            extend past the image. The pixels whose centres lie inside it and
            inside the image are painted; all other pixels are left unchanged.
        alpha: opacity of the colour at the largest magnitude, in [0, 1].

    Returns:
        A new RGB image of ``image.size``.

    Raises:
        ValueError: ``heatmap`` is not 2-D, the crop box is empty, or ``alpha``
            is outside [0, 1].
    """
    heat = np.asarray(heatmap, dtype=np.float64)
    if heat.ndim != 2:
        raise ValueError(f"heatmap must be 2-D (Gh, Gw); got shape {heat.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
    x0, y0, x1, y1 = (float(v) for v in crop_box)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"crop box {tuple(crop_box)} is empty")

    pixels = np.array(image.convert("RGB"))
    height, width = pixels.shape[:2]
    c0, c1 = _painted_range(x0, x1, width)
    r0, r1 = _painted_range(y0, y1, height)
    if c0 == c1 or r0 == r1:
        return Image.fromarray(pixels)

    gh, gw = heat.shape
    cell_w, cell_h = (x1 - x0) / gw, (y1 - y0) / gh
    # The painted pixel range in grid-cell units: Pillow resamples exactly that part of the grid.
    # Edge pixels are painted when their centres are inside, so their outer edges may lie up to
    # half a pixel outside the grid; clamping shifts the heat there by less than half a pixel.
    source = (
        max(0.0, (c0 - x0) / cell_w),
        max(0.0, (r0 - y0) / cell_h),
        min(float(gw), (c1 - x0) / cell_w),
        min(float(gh), (r1 - y0) / cell_h),
    )
    grid = Image.fromarray(heat.astype(np.float32), mode="F")
    resized = np.asarray(grid.resize((c1 - c0, r1 - r0), Image.Resampling.BILINEAR, box=source), dtype=np.float64)
    scale = float(np.max(np.abs(heat)))
    normalised = resized / scale if scale > 0 else resized
    opacity = alpha * np.abs(normalised)[..., None]

    region = pixels[r0:r1, c0:c1].astype(np.float64)
    blended = (1.0 - opacity) * region + opacity * 255.0 * diverging_colors(normalised)
    pixels[r0:r1, c0:c1] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)
