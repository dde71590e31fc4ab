"""What each row and column of an attribution matrix stands for in the API: tokens, padding,
image prefix tokens and the grid.

The engine returns interactions (S_t, S_v): one row per text position the tower attributes
(the caption's tokens, then its padding when the tower sees padding) and one column per image
position at the attributed layer (its prefix tokens, then its grid row by row; engine/split.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .engine.layers import Layer
from .inputs import Caption

__all__ = ["ImageColumns", "TokenRows", "image_columns", "token_rows"]


@dataclass(frozen=True)
class TokenRows:
    """The text rows of an explanation, T of each.

    Attributes:
        token_ids: the caption's ids, then ``pad_id`` per padding row.
        labels: the caption's labels, then the pad label per padding row.
        padding: False for the caption's rows, True for padding rows.
        spans: caption characters [start, end) per row; padding rows get the empty span at the
            end of the last token's; empty when the caption carries no spans.
    """

    token_ids: tuple[int, ...]
    labels: tuple[str, ...]
    padding: tuple[bool, ...]
    spans: tuple[tuple[int, int], ...]


def token_rows(caption: Caption, rows: int, pad_id: int, pad_label: str) -> TokenRows:
    """Label the ``rows`` attributed text positions of ``caption``.

    Args:
        caption: the tokenised caption (its real tokens, no padding).
        rows: S_t, the attribution's rows: ``len(caption.token_ids)``, or more when the tower
            sees padding (the rows after the caption's are padding).
        pad_id, pad_label: the padding rows' id and label.

    Raises:
        ValueError: fewer rows than the caption has tokens, or spans that do not match its
            tokens one to one (a server bug).
    """
    ids = [int(i) for i in caption.token_ids]
    extra = rows - len(ids)
    if extra < 0:
        raise ValueError(f"{rows} attributed text rows for a caption of {len(ids)} tokens")
    spans = tuple((int(a), int(b)) for a, b in caption.spans)
    if spans and len(spans) != len(ids):
        raise ValueError(f"{len(spans)} character spans for {len(ids)} tokens")
    if spans:
        end = spans[-1][1]
        spans += ((end, end),) * extra
    return TokenRows(
        token_ids=tuple(ids) + (pad_id,) * extra,
        labels=tuple(caption.labels) + (pad_label,) * extra,
        padding=(False,) * len(ids) + (True,) * extra,
        spans=spans,
    )


@dataclass(frozen=True)
class ImageColumns:
    """The image columns of an explanation, split as the API reports them.

    Attributes:
        prefix: labels of the prefix positions (``cls``, ``reg0``, ...), P of them.
        prefix_attribution: (T, P) little-endian float32.
        grid: (T, Gh, Gw) little-endian float32, C-contiguous.
        cls: (T,) the ``cls`` column when the prefix has one, else (0,).
    """

    prefix: tuple[str, ...]
    prefix_attribution: np.ndarray
    grid: np.ndarray
    cls: np.ndarray


def image_columns(interactions: np.ndarray, layer: Layer) -> ImageColumns:
    """Split interactions (T, S_v) into the prefix and grid of the attributed image ``layer``.

    Raises:
        ValueError: ``layer`` has no grid, or S_v is not ``len(layer.prefix) + Gh * Gw`` (a
            server bug).
    """
    if layer.grid is None:
        raise ValueError(f"image layer {layer.name!r} has no grid")
    rows, columns = interactions.shape
    if columns != layer.positions:
        raise ValueError(
            f"{columns} attributed image positions; layer {layer.name!r} has {len(layer.prefix)} prefix "
            f"position(s) and a {layer.grid[0]}x{layer.grid[1]} grid"
        )
    split = len(layer.prefix)
    prefix = np.ascontiguousarray(interactions[:, :split], dtype="<f4")
    grid = np.ascontiguousarray(interactions[:, split:].reshape(rows, *layer.grid), dtype="<f4")
    cls = prefix[:, layer.prefix.index("cls")] if "cls" in layer.prefix else np.zeros(0, dtype="<f4")
    return ImageColumns(layer.prefix, prefix, grid, cls)
