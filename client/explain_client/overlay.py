"""Readable overlay figures: a (Gh, Gw) heatmap over the crop box of the original image.

Each figure has a title (the span, its tokens, the score), the photo muted under the heat so
that the heat stands out, the heat as its Gh x Gw grid of cells over the crop box (drawn
with nearest-neighbour sampling, honest about the resolution), the crop box and the peak
cell marked, a legend, and a colour bar centred on zero. Drawn with matplotlib's Agg
backend on a private :class:`~matplotlib.figure.Figure`: pyplot's global state is never
touched, so this is safe in servers, threads and notebooks alike.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps, patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import CenteredNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from explain_client.images import ImageInput, load_image

__all__ = ["COLORMAP", "UNIT", "build_overlay", "overlay_figure", "side_by_side"]

COLORMAP = "RdBu_r"
"""Diverging colormap: blue for negative, near-white at zero, red for positive."""
UNIT = "cosine-similarity contribution per cell"
"""What the colour bar measures: the heatmap's values are in cosine units."""

_DPI = 100
_FONT = 13  # points at 100 dpi: 18 px, readable on a screen and in a report
_MAX_OPACITY = 0.9
_MIN_SIDE = 300  # pixels: the image area's least side, and the least min_size
_CROP_COLOUR = "black"
_PEAK_COLOUR = "#ffd400"
_BOX_COLOURS = ("#00a000", "#ff7f0e", "#9467bd", "#8c564b")
# Outlines get a white halo so that they read on dark photos and on red or blue heat alike.
_HALO = [patheffects.withStroke(linewidth=4.5, foreground="white")]


def build_overlay(
    image: ImageInput,
    heatmap: np.ndarray,
    crop_box: Sequence[float],
    *,
    title: str,
    tokens: Sequence[str] = (),
    score: float | None = None,
    peak: tuple[int, int] | None = None,
    boxes: Sequence[tuple[str, Sequence[float]]] = (),
    note: str | None = None,
    min_size: int = 640,
) -> Figure:
    """The overlay as a matplotlib Figure (Agg canvas attached), e.g. to save as SVG or PDF.

    Args: as :func:`overlay_figure`.

    Returns:
        A :class:`~matplotlib.figure.Figure` of exactly the pixel size :func:`overlay_figure`
        returns (at its ``dpi``); ``figure.axes[0]`` shows the image in image-pixel data
        coordinates (y downwards), ``figure.axes[1]`` is the colour bar.

    Raises:
        As :func:`overlay_figure`.
    """
    heat = np.asarray(heatmap, dtype=np.float64)
    if heat.ndim != 2 or 0 in heat.shape:
        raise ValueError(f"heatmap must be a non-empty 2-D (Gh, Gw) array; got shape {heat.shape}")
    if not np.all(np.isfinite(heat)):
        raise ValueError("heatmap must be finite; it has NaN or infinite values")
    box = tuple(float(v) for v in crop_box)
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        raise ValueError(f"crop_box must be 4 finite numbers (x0, y0, x1, y1); got {tuple(crop_box)!r}")
    x0, y0, x1, y1 = box
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"crop_box {box} is empty: need x1 > x0 and y1 > y0")
    if min_size < _MIN_SIDE:
        raise ValueError(f"min_size must be >= {_MIN_SIDE} pixels; got {min_size}")
    gh, gw = heat.shape
    if peak is not None and not (0 <= peak[0] < gh and 0 <= peak[1] < gw):
        raise ValueError(f"peak {tuple(peak)} is not a cell of the {gh}x{gw} grid")
    picture = load_image(image)
    width, height = picture.size

    # Everything drawn, image and crop box alike, must be in view.
    left, right = min(0.0, x0), max(float(width), x1)
    top, bottom = min(0.0, y0), max(float(height), y1)
    view_w, view_h = right - left, bottom - top
    # The image area's long side is min_size pixels (small scenes shown large, large photos
    # downscaled). An elongated view is widened to a short side of _MIN_SIDE pixels, room for
    # the colour bar's label, rather than its pixels stretched.
    scale = min_size / max(view_w, view_h)
    pad_x = max(0.0, _MIN_SIDE / scale - view_w) / 2
    pad_y = max(0.0, _MIN_SIDE / scale - view_h) / 2
    left, right, top, bottom = left - pad_x, right + pad_x, top - pad_y, bottom + pad_y
    area_w, area_h = (right - left) * scale, (bottom - top) * scale

    # A fixed layout in pixels (no layout engine): every part gets the room it needs, and the
    # output size follows from the inputs alone.
    margin, gap, bar_w, bar_labels_w = 16, 14, 24, 150
    line_h = _FONT * 1.25 * _DPI / 72
    # At least as wide as the longest legend entry, for narrow images and small min_size.
    fig_w = max(margin + area_w + gap + bar_w + bar_labels_w + margin, 440)
    header = _header(title, tokens, score, note, width_chars=int((fig_w - 2 * margin) / (_FONT * _DPI / 72 * 0.6)))
    header_h = (header.count("\n") + 1) * line_h + gap
    legend_columns = 2 if fig_w >= 740 else 1  # the entries are long: two fit side by side only on wide figures
    legend_h = math.ceil((2 + len(boxes)) / legend_columns) * line_h + gap
    fig_h = margin + header_h + area_h + legend_h + margin

    fig = Figure(figsize=(fig_w / _DPI, fig_h / _DPI), dpi=_DPI, facecolor="white")
    FigureCanvasAgg(fig)

    def rect(x: float, y: float, w: float, h: float) -> list[float]:
        """A figure-fraction rectangle from pixels, y from the bottom."""
        return [x / fig_w, y / fig_h, w / fig_w, h / fig_h]

    bottom_px = margin + legend_h
    ax = fig.add_axes(rect(margin, bottom_px, area_w, area_h))
    cax = fig.add_axes(rect(margin + area_w + gap, bottom_px, bar_w, area_h))
    fig.text(margin / fig_w, 1 - margin / fig_h, header, fontsize=_FONT, va="top", ha="left", linespacing=1.25)
    ax.set_facecolor("#e6e6e6")  # parts of the crop box outside the image
    ax.imshow(
        _muted(picture, scale),
        extent=(0, width, height, 0),
        interpolation="antialiased",
    )
    peak_value = float(heat.max())
    halfrange = float(np.abs(heat).max())
    norm = CenteredNorm(vcenter=0.0, halfrange=halfrange if halfrange > 0 else 1.0)
    cmap = colormaps[COLORMAP]
    colours = cmap(norm(heat))
    # Opacity grows with |value|: the cells that matter cover the photo, near-zero ones let it through.
    # The square root lifts middling values, which a linear ramp leaves hard to see on a photo.
    colours[..., 3] = _MAX_OPACITY * np.sqrt(np.abs(heat) / norm.halfrange)
    ax.imshow(colours, extent=(x0, x1, y1, y0), interpolation="nearest")
    _draw_grid(ax, box, gh, gw)

    handles = []
    crop = Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=_CROP_COLOUR, linewidth=2, linestyle=(0, (4, 2)))
    crop.set_path_effects(_HALO)
    crop.set_label(f"crop box (the model saw only this; {gh}x{gw} cells)")
    ax.add_patch(crop)
    handles.append(crop)
    for k, (label, (bx0, by0, bx1, by1)) in enumerate(boxes):
        colour = _BOX_COLOURS[k % len(_BOX_COLOURS)]
        mark = Rectangle((bx0, by0), bx1 - bx0, by1 - by0, fill=False, edgecolor=colour, linewidth=2.5, label=label)
        mark.set_path_effects(_HALO)
        ax.add_patch(mark)
        handles.append(mark)
    if peak is None and peak_value > 0:
        peak = tuple(int(v) for v in np.unravel_index(int(np.argmax(heat)), heat.shape))
    if peak is not None:
        i, j = peak
        cw, ch = (x1 - x0) / gw, (y1 - y0) / gh
        # A thinner outline on small cells, so that it does not hide the cell's own colour.
        width_pt = float(np.clip(min(cw, ch) * scale / 10, 1.0, 3.0))
        cell = Rectangle(
            (x0 + j * cw, y0 + i * ch), cw, ch, fill=False, edgecolor=_PEAK_COLOUR, linewidth=width_pt,
            label=f"peak cell (row {i}, col {j}): {heat[i, j]:+.3g}",
        )  # fmt: skip
        cell.set_path_effects([patheffects.withStroke(linewidth=2 * width_pt, foreground="black")])
        ax.add_patch(cell)
        handles.append(cell)
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)
    ax.set_xticks([])
    ax.set_yticks([])
    # The axes already have the view's proportions: "equal" would only add rounding slack.
    ax.set_aspect("auto")

    colourbar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax)
    limit = norm.halfrange
    colourbar.set_ticks([-limit, -limit / 2, 0.0, limit / 2, limit])
    colourbar.set_ticklabels([f"{v:+.2g}" if v else "0" for v in (-limit, -limit / 2, 0.0, limit / 2, limit)])
    colourbar.ax.tick_params(labelsize=_FONT - 2)
    colourbar.set_label(
        f"{UNIT}\n(red raises the score, blue lowers it;\nopacity grows with |value|)", fontsize=_FONT - 2
    )

    fig.legend(
        handles=handles, loc="lower left", bbox_to_anchor=(margin / fig_w, margin / fig_h), ncols=legend_columns,
        fontsize=_FONT - 2, frameon=False, borderaxespad=0, borderpad=0,
    )  # fmt: skip
    return fig


def overlay_figure(
    image: ImageInput,
    heatmap: np.ndarray,
    crop_box: Sequence[float],
    *,
    title: str,
    tokens: Sequence[str] = (),
    score: float | None = None,
    peak: tuple[int, int] | None = None,
    boxes: Sequence[tuple[str, Sequence[float]]] = (),
    note: str | None = None,
    min_size: int = 640,
) -> Image.Image:
    """Draw a readable overlay of ``heatmap`` on the crop box of ``image``.

    The photo is shown muted (mostly grey, lower contrast); over the crop box each of the
    Gh x Gw grid cells is one flat colour of the ``RdBu_r`` colormap, centred on zero and
    scaled to +-max|heatmap| (the colour bar), with opacity proportional to |value|.

    Args:
        image: the image that was explained, in any form
            :func:`explain_client.images.load_image` accepts (EXIF orientation applied).
        heatmap: (Gh, Gw) finite values in cosine units; grid row 0 is the top of the crop box.
        crop_box: (x0, y0, x1, y1) in image pixels; may be fractional and extend past the image
            (the view then includes it, on a grey background).
        title: the span the heatmap is of, e.g. ``"red circle"``; shown in quotes.
        tokens: the span's token labels, listed after the title.
        score: the explanation's score (cosine similarity), shown when given.
        peak: (row, col) grid cell to mark; ``None`` marks the cell of the largest value when
            it is positive (the first in row-major order on ties) and none otherwise.
        boxes: extra (label, (x0, y0, x1, y1)) boxes in image pixels, e.g. an object's box,
            drawn as coloured outlines and named in the legend.
        note: one more line under the title, e.g. a verdict or a record id.
        min_size: pixels on the long side of the image area (the whole figure is larger);
            at least 300 (an elongated image is shown in an area at least 300 pixels on its short side).

    Returns:
        A new RGB image; its long side is more than ``min_size`` pixels.

    Raises:
        ValueError: ``heatmap`` is not a non-empty 2-D finite array, ``crop_box`` is not 4
            finite numbers with x1 > x0 and y1 > y0, ``peak`` is outside the grid,
            ``min_size`` is below 300, or ``image`` cannot be decoded.
        TypeError, OSError: as :func:`explain_client.images.load_image`.

    This signature is stable: the monitoring report draws its overlays with it.
    """
    fig = build_overlay(
        image, heatmap, crop_box, title=title, tokens=tokens, score=score, peak=peak, boxes=boxes, note=note,
        min_size=min_size,
    )  # fmt: skip
    return _to_image(fig)


def side_by_side(panels: Sequence[Image.Image], *, gap: int = 16) -> Image.Image:
    """Several overlays in one row on white, top-aligned, ``gap`` pixels apart.

    Raises:
        ValueError: no panels, or a negative gap.
    """
    if not panels:
        raise ValueError("side_by_side needs at least one panel")
    if gap < 0:
        raise ValueError(f"gap must be >= 0 pixels; got {gap}")
    sheet = Image.new(
        "RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1), max(p.height for p in panels)), "white"
    )
    x = 0
    for panel in panels:
        sheet.paste(panel.convert("RGB"), (x, 0))
        x += panel.width + gap
    return sheet


def _header(title: str, tokens: Sequence[str], score: float | None, note: str | None, width_chars: int) -> str:
    """The title block, wrapped to the figure's width; long token lists are cut with an ellipsis."""
    width_chars = max(width_chars, 20)
    lines = textwrap.wrap(f"\u201c{title}\u201d", width_chars, max_lines=2, placeholder=" \u2026")
    if tokens:
        lines += textwrap.wrap("tokens: " + ", ".join(tokens), width_chars, max_lines=2, placeholder=" \u2026")
    if score is not None:
        lines.append(f"score {score:.4f} (cosine similarity)")
    if note:
        lines += textwrap.wrap(note, width_chars, max_lines=2, placeholder=" \u2026")
    return "\n".join(lines)


def _muted(picture: Image.Image, zoom: float) -> np.ndarray:
    """The photo mostly grey and with lower contrast, so that the heat's colours stand out.

    Photos are downscaled here (Pillow's Lanczos filter, better than the Agg resampler at
    large factors); small images stay as they are and are enlarged with nearest-neighbour.
    """
    if zoom < 1:
        size = (max(1, round(picture.width * zoom)), max(1, round(picture.height * zoom)))
        picture = picture.resize(size, Image.Resampling.LANCZOS)
    rgb = np.asarray(picture, dtype=np.float64) / 255.0
    grey = rgb @ np.array([0.299, 0.587, 0.114])
    # Keep a third of the colour, so that "the red circle" can still be told from the blue one.
    mixed = 0.65 * grey[..., None] + 0.35 * rgb
    return 0.3 + 0.5 * mixed


def _draw_grid(ax, box: tuple[float, float, float, float], gh: int, gw: int) -> None:
    """Thin lines between the grid cells, when the cells are large enough to show them."""
    x0, y0, x1, y1 = box
    if max(gh, gw) > 40:
        return
    style = {"colors": "white", "linewidths": 0.5, "alpha": 0.5}
    ax.vlines(np.linspace(x0, x1, gw + 1)[1:-1], y0, y1, **style)
    ax.hlines(np.linspace(y0, y1, gh + 1)[1:-1], x0, x1, **style)


def _to_image(fig: Figure) -> Image.Image:
    """Render a Figure with its Agg canvas to an RGB PIL image of the figure's pixel size."""
    canvas = fig.canvas
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB")
