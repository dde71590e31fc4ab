"""Readable overlay figures (explain_client.overlay): size, heat, colour bar, crop box, title, legend.

Checked through the returned image's pixels, located with the figure's own transforms, and
through the figure's artists (text, patches, legend); ``explain-client --out`` against a real
``explain-server`` on its defaults.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from matplotlib import colormaps
from matplotlib.patches import Rectangle
from PIL import Image

from explain_client import cli
from explain_client.overlay import COLORMAP, UNIT, build_overlay, overlay_figure, side_by_side
from explain_server.launcher import ServerProcess
from explain_server.shapes.dataset import scenes_with_captions
from explain_server.shapes.scenes import render

ASSETS = pathlib.Path(__file__).parents[1] / "client" / "explain_client" / "assets"
MIN_SIZE = 640


def scene() -> Image.Image:
    """A 96x96 scene of the shipped model's generator."""
    return render(next(scenes_with_captions(5, 1))[0])


def big_photo() -> Image.Image:
    """A 2000x1500 photo (the cat, enlarged), as a large camera image would be."""
    with Image.open(ASSETS / "chelsea.jpg") as cat:
        return cat.convert("RGB").resize((2000, 1500), Image.Resampling.LANCZOS)


def rendered(fig) -> np.ndarray:
    """The figure's pixels (H, W, 3) int, after drawing: the transforms then hold the layout."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)


def to_pixel(fig, ax, x: float, y: float) -> tuple[int, int]:
    """(row, col) of the output pixel showing data point (x, y) of ``ax``."""
    px, py = ax.transData.transform((x, y))
    return int(fig.bbox.height - py), int(px)


def cell_patch(fig, box, grid, cell, fraction: float = 0.4) -> tuple[slice, slice]:
    """Output-pixel slices of the central ``fraction`` of grid cell ``cell`` of crop box ``box``."""
    x0, y0, x1, y1 = box
    (gh, gw), (i, j) = grid, cell
    cw, ch = (x1 - x0) / gw, (y1 - y0) / gh
    cx, cy = x0 + (j + 0.5) * cw, y0 + (i + 0.5) * ch
    r0, c0 = to_pixel(fig, fig.axes[0], cx - fraction * cw / 2, cy - fraction * ch / 2)
    r1, c1 = to_pixel(fig, fig.axes[0], cx + fraction * cw / 2, cy + fraction * ch / 2)
    return slice(r0, r1 + 1), slice(c0, c1 + 1)


def redness(pixels: np.ndarray) -> float:
    """Mean red minus blue (positive heat is red, negative blue)."""
    return float(np.mean(pixels[..., 0] - pixels[..., 2]))


# --- size ------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("image", "crop_box"),
    [(scene, (0, 0, 96, 96)), (big_photo, (250, 0, 1750, 1500))],
    ids=["96x96 scene", "2000x1500 photo"],
)
def test_output_is_at_least_the_minimum_size(image, crop_box):
    heat = np.random.default_rng(0).normal(size=(7, 7))
    out = overlay_figure(image(), heat, crop_box, title="red circle", tokens=["red", "circle"], score=0.3)
    assert out.mode == "RGB"
    assert max(out.size) >= MIN_SIZE and min(out.size) >= MIN_SIZE / 2
    larger = overlay_figure(image(), heat, crop_box, title="red circle", min_size=1000)
    assert max(larger.size) >= 1000
    # a large photo is shown downscaled: the figure is nowhere near 2000 px
    assert max(out.size) < 1200


# --- heat ------------------------------------------------------------------------


@pytest.mark.unit
def test_heat_is_clearly_visible_on_a_photo():
    photo = big_photo()
    box, grid = (250.0, 0.0, 1750.0, 1500.0), (7, 7)
    heat = np.random.default_rng(1).normal(scale=0.05, size=grid)
    heat[2, 3], heat[5, 1] = 0.4, -0.4  # the largest |heat|, both signs
    fig = build_overlay(photo, heat, box, title="green eyes")
    out = rendered(fig)
    ax = fig.axes[0]
    original = np.asarray(photo).astype(int)
    for cell, sign in [((2, 3), 1), ((5, 1), -1)]:
        rows, cols = cell_patch(fig, box, grid, cell)
        shown = out[rows, cols]
        # the photo's pixels that the patch shows, through the inverse of the axes' transform
        ys, xs = np.mgrid[rows, cols]
        data = ax.transData.inverted().transform(
            np.column_stack([xs.ravel() + 0.5, fig.bbox.height - ys.ravel() - 0.5])
        )
        under = original[data[:, 1].astype(int), data[:, 0].astype(int)].reshape(shown.shape)
        assert np.mean(np.abs(shown - under)) > 50, f"cell {cell} looks like the photo"
        assert sign * redness(shown) > 40, f"cell {cell} is not {'red' if sign > 0 else 'blue'}"
        # nearly the colormap's end colour: the photo shows through only a little
        end = np.array(colormaps[COLORMAP](1.0 if sign > 0 else 0.0)[:3]) * 255
        assert np.mean(np.abs(shown - end)) < 30


@pytest.mark.unit
def test_each_cell_is_one_flat_colour_of_the_grid():
    """Nearest-neighbour cells: honest about the resolution (no interpolated blur between cells)."""
    box, grid = (10.0, 20.0, 160.0, 110.0), (3, 5)
    heat = np.zeros(grid)
    heat[1, 3] = 1.0
    fig = build_overlay(Image.new("RGB", (200, 120), (128, 128, 128)), heat, box, title="x", peak=(0, 0))
    out = rendered(fig)
    hot = out[cell_patch(fig, box, grid, (1, 3), fraction=0.8)]
    assert np.ptp(hot.reshape(-1, 3), axis=0).max() <= 2
    assert redness(hot) > 40
    for neighbour in [(1, 2), (0, 3), (2, 3), (1, 4)]:
        assert abs(redness(out[cell_patch(fig, box, grid, neighbour)])) < 10


# --- colour bar ------------------------------------------------------------------


@pytest.mark.unit
def test_colour_bar_is_centred_on_zero_with_symmetric_limits():
    heat = np.array([[0.3, 0.1], [-0.05, 0.0]])  # asymmetric: the bar still spans -0.3..0.3
    fig = build_overlay(scene(), heat, (0, 0, 96, 96), title="red circle")
    out = rendered(fig)
    cax = fig.axes[1]
    assert cax.get_ylim() == pytest.approx((-0.3, 0.3))
    assert UNIT in cax.get_ylabel()
    labels = [t.get_text() for t in cax.get_yticklabels()]
    assert labels == ["-0.3", "-0.15", "0", "+0.15", "+0.3"]
    cmap = colormaps[COLORMAP]
    x = (cax.bbox.x0 + cax.bbox.x1) / 2
    for value, expected in [(0.0, cmap(0.5)), (0.28, cmap(0.28 / 0.6 + 0.5)), (-0.28, cmap(-0.28 / 0.6 + 0.5))]:
        _, y = cax.transData.transform((0, value))
        pixel = out[int(fig.bbox.height - y), int(x)]
        np.testing.assert_allclose(pixel, np.array(expected[:3]) * 255, atol=4)


# --- crop box, peak, legend, title ----------------------------------------------


@pytest.mark.unit
def test_the_crop_box_is_drawn_on_the_original_image():
    photo = Image.open(ASSETS / "chelsea.jpg").convert("RGB")  # 451x300; the crop is its centre square
    box = (75.17, 0.0, 375.83, 300.0)
    fig = build_overlay(photo, np.zeros((8, 8)), box, title="a cat")
    out = rendered(fig)
    ax = fig.axes[0]
    crops = [p for p in ax.patches if isinstance(p, Rectangle) and "crop box" in p.get_label()]
    assert len(crops) == 1 and crops[0].get_bbox().bounds == pytest.approx((75.17, 0.0, 300.66, 300.0))
    # the whole image is in view, not only the crop box
    assert ax.get_xlim() == pytest.approx((0, 451)) and ax.get_ylim() == pytest.approx((300, 0))
    # its dashed dark left edge is in the pixels: most rows of that column are near black
    top, col = to_pixel(fig, ax, 75.17, 10)
    bottom, _ = to_pixel(fig, ax, 75.17, 290)
    edge = out[top:bottom, col - 1 : col + 2].sum(axis=2).min(axis=1)
    assert np.mean(edge < 150) > 0.5
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[0] == "crop box (the model saw only this; 8x8 cells)"
    assert not any("peak" in text for text in legend)  # all-zero heat has no peak


@pytest.mark.unit
def test_the_peak_cell_and_extra_boxes_are_marked_and_named_in_the_legend():
    heat = np.zeros((4, 4))
    heat[1, 2], heat[3, 0] = 0.2, -0.5  # the peak is the largest value, not the largest |value|
    fig = build_overlay(
        scene(), heat, (0, 0, 96, 96), title="red circle", boxes=[("the object's box", (50, 20, 70, 44))]
    )
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == [
        "crop box (the model saw only this; 4x4 cells)",
        "the object's box",
        "peak cell (row 1, col 2): +0.2",
    ]
    outlines = {p.get_label(): p.get_bbox().bounds for p in fig.axes[0].patches}
    assert outlines["the object's box"] == (50, 20, 20, 24)
    assert outlines["peak cell (row 1, col 2): +0.2"] == (48, 24, 24, 24)
    explicit = build_overlay(scene(), heat, (0, 0, 96, 96), title="x", peak=(3, 0))
    assert "peak cell (row 3, col 0): -0.5" in [t.get_text() for t in explicit.legends[0].get_texts()]


@pytest.mark.unit
def test_the_title_names_the_span_its_tokens_and_the_score():
    fig = build_overlay(
        scene(), np.ones((2, 2)), (0, 0, 96, 96), title="red circle", tokens=["red", "circle"], score=0.2468,
        note="record 17",
    )  # fmt: skip
    text = "\n".join(t.get_text() for t in fig.texts)
    assert "\u201cred circle\u201d" in text
    assert "tokens: red, circle" in text
    assert "score 0.2468" in text and "record 17" in text


@pytest.mark.unit
def test_a_long_caption_is_wrapped_inside_the_figure():
    words = ["word%d" % k for k in range(60)]
    fig = build_overlay(scene(), np.ones((2, 2)), (0, 0, 96, 96), title=" ".join(words), tokens=words, score=0.1)
    rendered(fig)
    renderer = fig.canvas.get_renderer()
    (header,) = fig.texts
    extent = header.get_window_extent(renderer)
    assert extent.x0 >= 0 and extent.x1 <= fig.bbox.width and extent.y1 <= fig.bbox.height
    # nor does it run into the image
    assert extent.y0 >= fig.axes[0].get_window_extent(renderer).y1
    assert header.get_text().count("\n") <= 5 and "\u2026" in header.get_text()


@pytest.mark.unit
@pytest.mark.parametrize("min_size", [300, 640, 1000])
@pytest.mark.parametrize("image_size", [(96, 96), (300, 1200), (1200, 300)])
def test_the_legend_and_colour_bar_fit_in_the_figure(min_size, image_size):
    boxes = [("the object's box", (10, 10, 40, 40)), ("another object's box", (50, 50, 90, 90))]
    heat = np.random.default_rng(2).normal(size=(6, 6))
    fig = build_overlay(
        Image.new("RGB", image_size), heat, (0, 0, *image_size), title="x", boxes=boxes, min_size=min_size
    )
    rendered(fig)
    renderer = fig.canvas.get_renderer()
    image_extent = fig.axes[0].get_window_extent(renderer)
    for artist in [fig.legends[0], fig.axes[1]]:
        extent = artist.get_tightbbox(renderer)
        assert extent.x0 >= 0 and extent.y0 >= 0 and extent.x1 <= fig.bbox.width and extent.y1 <= fig.bbox.height
    assert fig.legends[0].get_window_extent(renderer).y1 <= image_extent.y0  # under the image, not over it


# --- randomised ------------------------------------------------------------------


@st.composite
def overlay_inputs(draw):
    width, height = draw(st.integers(16, 400)), draw(st.integers(16, 400))
    # crop boxes at least 40% of each side, partly outside the image in any direction
    cw = draw(st.floats(0.4, 1.3)) * width
    ch = draw(st.floats(0.4, 1.3)) * height
    x0 = draw(st.floats(-0.3 * cw, width - 0.3 * cw))
    y0 = draw(st.floats(-0.3 * ch, height - 0.3 * ch))
    grid = (draw(st.integers(1, 8)), draw(st.integers(1, 8)))
    kind = draw(st.sampled_from(["zero", "random", "negative"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    heat = {"zero": np.zeros(grid), "random": rng.normal(size=grid), "negative": -rng.random(grid) - 0.1}[kind]
    cell = (draw(st.integers(0, grid[0] - 1)), draw(st.integers(0, grid[1] - 1)))
    min_size = draw(st.sampled_from([300, 640, 900]))
    return (width, height), (x0, y0, x0 + cw, y0 + ch), heat, cell, min_size


@pytest.mark.unit
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(overlay_inputs())
def test_any_grid_and_crop_box_gives_a_finite_readable_figure(inputs):
    (width, height), box, heat, cell, min_size = inputs
    heat = heat.copy()
    if np.any(heat):
        heat[cell] = 2 * np.abs(heat).max()  # the peak, red
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    fig = build_overlay(image, heat, box, title="a span", tokens=["a", "span"], min_size=min_size)
    out = rendered(fig)
    assert max(out.shape[:2]) >= min_size
    ax = fig.axes[0]
    colours = ax.images[1].get_array()
    assert np.all(np.isfinite(colours)) and colours.shape == heat.shape + (4,)
    # image and crop box are both in view
    (left, right), (bottom, top) = ax.get_xlim(), ax.get_ylim()
    assert left <= min(0, box[0]) and right >= max(width, box[2])
    assert top <= min(0, box[1]) and bottom >= max(height, box[3])
    # pixels stay square
    assert (right - left) / (bottom - top) == pytest.approx(ax.bbox.width / ax.bbox.height, rel=0.02)
    crop = next(p for p in ax.patches if "crop box" in p.get_label())
    np.testing.assert_allclose(crop.get_bbox().extents, box)
    cax = fig.axes[1]
    low, high = cax.get_ylim()
    assert low == pytest.approx(-high) and high > 0
    if np.any(heat):
        rows, cols = cell_patch(fig, box, heat.shape, cell, fraction=1.0)
        if min(rows.stop - rows.start, cols.stop - cols.start) >= 16:  # room inside the peak's outline
            # the peak cell's centre shows the heat's red where the heat grid says it is
            assert redness(out[cell_patch(fig, box, heat.shape, cell, fraction=0.2)]) > 40
        assert any(p.get_label().startswith(f"peak cell (row {cell[0]}, col {cell[1]})") for p in ax.patches)


# --- errors and helpers ----------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("heat", "box", "kwargs", "message"),
    [
        (np.ones(4), (0, 0, 96, 96), {}, "heatmap must be a non-empty 2-D"),
        (np.full((2, 2), np.nan), (0, 0, 96, 96), {}, "heatmap must be finite"),
        (np.ones((2, 2)), (10, 0, 10, 96), {}, "crop_box .* is empty"),
        (np.ones((2, 2)), (0, 0, 96), {}, "crop_box must be 4 finite numbers"),
        (np.ones((2, 2)), (0, 0, 96, 96), {"peak": (2, 0)}, r"peak \(2, 0\) is not a cell of the 2x2 grid"),
        (np.ones((2, 2)), (0, 0, 96, 96), {"min_size": 10}, "min_size must be >= 300"),
    ],
)
def test_bad_input_is_refused_by_name(heat, box, kwargs, message):
    with pytest.raises(ValueError, match=message):
        overlay_figure(scene(), heat, box, title="x", **kwargs)


@pytest.mark.unit
def test_side_by_side_puts_panels_in_one_row():
    panels = [Image.new("RGB", (100, 80), "red"), Image.new("RGB", (50, 120), "blue")]
    sheet = side_by_side(panels, gap=10)
    assert sheet.size == (160, 120)
    pixels = np.asarray(sheet)
    assert tuple(pixels[0, 0]) == (255, 0, 0) and tuple(pixels[0, 105]) == (255, 255, 255)
    assert tuple(pixels[119, 159]) == (0, 0, 255) and tuple(pixels[100, 50]) == (255, 255, 255)
    with pytest.raises(ValueError, match="at least one panel"):
        side_by_side([])


# --- through a real server -------------------------------------------------------


@pytest.fixture(scope="module")
def shapes_server(tmp_path_factory):
    """``explain-server`` as users start it: no flags, the shipped shapes model."""
    proc = ServerProcess([], tmp_path_factory.mktemp("logs") / "server.log", metrics=False)
    try:
        proc.wait_serving(timeout=600)
        yield proc
    finally:
        proc.stop()


@pytest.mark.integration
@pytest.mark.parametrize(
    ("name", "caption", "span"),
    [("scene.png", None, None), ("grace_hopper.jpg", "a woman in a dark uniform with a tie", "dark uniform")],
)
def test_cli_out_writes_a_readable_overlay(shapes_server, tmp_path, capsys, name, caption, span):
    if name == "scene.png":
        scene_, described = next(scenes_with_captions(7, 1))
        render(scene_).save(tmp_path / name)
        image_path, caption = tmp_path / name, described.text
    else:
        image_path = ASSETS / name
    out = tmp_path / "overlay.png"
    argv = [str(image_path), caption, "--target", shapes_server.target, "--out", str(out)]
    assert cli.main(argv + (["--span", span] if span else [])) == 0
    assert f"overlay written to {out}" in capsys.readouterr().out
    with Image.open(out) as overlay, Image.open(image_path) as original:
        assert overlay.format == "PNG" and max(overlay.size) >= MIN_SIZE
        assert overlay.size != original.size
