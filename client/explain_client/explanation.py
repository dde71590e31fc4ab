"""The decoded result of one Explain call, and views derived from it.

Method: L. Moeller, P. Tilli, N. T. Vu, S. Pado, "Explaining Caption-Image
Interactions in CLIP Models with Second-Order Attributions", TMLR 2025
(arXiv 2408.14153). ``attribution[s, i, j]`` is the interaction of caption
token ``s`` with image grid cell ``(i, j)``, in cosine units; the grid is that
of the attributed image layer (a ViT's patches, a ResNet stage's feature map).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
from PIL import Image

from explain_api import explain_pb2
from explain_api.summary import Summary
from explain_api.summary import from_proto as summary_from_proto
from explain_client.images import ImageInput, load_image
from explain_client.overlay import overlay_figure
from explain_client.tensors import decode_float32_tensor

__all__ = ["Explanation", "ReferenceTerms", "ResolvedOptions", "Span"]

Span = Union[str, Sequence[int]]
"""A caption span: a substring of the caption, or a (start, stop) row range."""


@dataclass(frozen=True)
class ReferenceTerms:
    """The reference terms of the decomposition, in cosine units (divided by ||e_t|| ||e_v||).

    ``score = attribution.sum() + prefix_attribution.sum() + text_reference
    + image_reference - both_references + convergence_delta``.
    """

    text_reference: float
    """<e_t^r, e_v>: text path endpoint with the image embedding."""
    image_reference: float
    """<e_t, e_v^r>: caption embedding with the image path endpoint."""
    both_references: float
    """<e_t^r, e_v^r>: both path endpoints."""

    @classmethod
    def from_proto(cls, refs: explain_pb2.ReferenceTerms) -> ReferenceTerms:
        return cls(refs.text_reference, refs.image_reference, refs.both_references)


@dataclass(frozen=True)
class ResolvedOptions:
    """The options an explanation was computed with, server defaults resolved."""

    text_layer: int
    """Text-tower layer whose input hidden states were attributed (non-negative index)."""
    image_layer: int
    """Image-tower layer whose input hidden states were attributed (non-negative index)."""
    n_steps: int
    """Quadrature nodes of the path integral."""
    method: str
    """Quadrature rule, e.g. "riemann_right" or "gausslegendre"."""
    text_layer_name: str = ""
    """Name of the text layer, e.g. "block 11"; empty from servers that predate layer names."""
    image_layer_name: str = ""
    """Name of the image layer, e.g. "block 11", "layer4", "head"; empty from older servers."""

    @classmethod
    def from_proto(cls, opts: explain_pb2.ResolvedOptions) -> ResolvedOptions:
        return cls(
            opts.text_layer, opts.image_layer, opts.n_steps, opts.method, opts.text_layer_name, opts.image_layer_name
        )


def _normalise(text: str) -> str:
    return "".join(text.split()).lower()


def _read_only_float32(values: Any) -> np.ndarray:
    # A copy, so that freezing it cannot affect the caller's array; read-only
    # because the dataclass is frozen and derived views assume it never changes.
    array = np.array(values, dtype=np.float32)
    array.flags.writeable = False
    return array


def _cell_coverage(lo: float, hi: float, edges: np.ndarray) -> np.ndarray:
    """Fraction of each interval [edges[k], edges[k+1]) covered by [lo, hi), float64."""
    overlap = np.minimum(hi, edges[1:]) - np.maximum(lo, edges[:-1])
    return np.clip(overlap, 0.0, None) / np.diff(edges)


# Coerced to float so that to_dict stays JSON-serialisable for numpy scalars too.
_FLOAT_FIELDS = ("score", "logit_scale", "convergence_delta", "queue_seconds", "compute_seconds")


# eq=False: the generated __eq__/__hash__ would compare numpy arrays, which
# raises; instances compare by identity instead.
@dataclass(frozen=True, eq=False)
class Explanation:
    """Token x image-region interaction attributions of one image-caption pair.

    T is the number of attributed token rows: for CLIP from the start token to
    the end token (row 0 is "<start_of_text>", row T-1 "<end_of_text>"); for
    a text tower that sees padding (SigLIP) the caption's tokens then padding
    rows up to the context length (``padding``). (Gh, Gw) is the grid of the
    attributed image layer over the crop box the model saw, grid row 0 at its
    top, column 0 at its left; each cell covers (crop size) / (Gh, Gw). Image
    positions before the grid (class token, registers) are in
    ``prefix_attribution``, labelled by ``image_prefix``. Attribution values are
    raw and signed cosine contributions: positive values raise the similarity;
    multiply by ``logit_scale`` for logits.

    Arrays are read-only float32 copies. Construction validates consistency and
    raises ValueError on mismatched shapes, an empty crop box or a bad image size.
    The fields after ``compute_seconds`` have defaults for explanations from servers
    that predate them: ``cls_attribution`` then stands for a one-token prefix "cls".
    """

    attribution: np.ndarray
    """float32 (T, Gh, Gw): token x patch interactions, cosine units."""
    cls_attribution: np.ndarray
    """float32 (T,): token x image-class-token interactions, cosine units; (0,) when the
    image layer has no class token (see ``prefix_attribution``)."""
    token_ids: tuple[int, ...]
    """Token ids, length T (padding rows carry the pad id)."""
    tokens: tuple[str, ...]
    """Decoded label of each token, length T."""
    score: float
    """Cosine similarity of the caption and image embeddings."""
    logit_scale: float
    """exp(learned log temperature): cosine x logit_scale = logit."""
    reference_terms: ReferenceTerms
    """Reference terms of the decomposition, cosine units."""
    convergence_delta: float
    """Score minus all attributions and reference terms: the quadrature error."""
    crop_box: tuple[float, float, float, float]
    """(x0, y0, x1, y1) region of the original image the model saw, original pixels."""
    image_size: tuple[int, int]
    """(width, height) of the original image after EXIF orientation, pixels."""
    request_id: str
    """The request's id (the caller's, or one the server generated)."""
    model: str
    """Name of the model that computed the explanation."""
    options: ResolvedOptions
    """Layers, steps and quadrature rule used."""
    queue_seconds: float
    """Time the request waited, seconds: for a server thread to decode its call's images, then
    until the batch that computed it started."""
    compute_seconds: float
    """Wall time of the batch that computed this explanation (with any other requests in it), seconds."""
    image_prefix: tuple[str, ...] | None = None
    """Labels of the image positions before the grid: ``("cls",)`` for open_clip's ViTs,
    ``("cls", "reg0", ...)`` with registers, ``()`` for towers without (ResNets, ConvNeXts,
    SigLIP's ViTs). None (the default) = ``("cls",)`` when ``cls_attribution`` has T values,
    else ``()``."""
    prefix_attribution: np.ndarray | None = None
    """float32 (T, P): token x prefix-position interactions, P = len(image_prefix), cosine
    units. None (the default) = ``cls_attribution`` as its one column, or (T, 0)."""
    padding: tuple[bool, ...] = ()
    """Per token row, whether it is padding; empty (the default) = no padding rows."""
    token_spans: tuple[tuple[int, int], ...] = ()
    """Per token row, the caption characters [start, end) it spells (start == end for special
    and padding tokens); empty when the server does not report them."""
    logit_bias: float | None = None
    """SigLIP's bias: logit = score x logit_scale + logit_bias; None for models without one."""
    summary: Summary | None = None
    """The server's monitoring summary (``ExplanationSummary`` in explain.proto: interaction
    share, per-word relevance, peak cell and grounding concentration, top (word, cell) pairs),
    computed from these float32 tensors; None from servers that predate it."""

    def __post_init__(self) -> None:
        attribution = _read_only_float32(self.attribution)
        cls_attribution = _read_only_float32(self.cls_attribution)
        token_ids = tuple(int(t) for t in self.token_ids)
        tokens = tuple(str(t) for t in self.tokens)
        crop_box = tuple(float(v) for v in self.crop_box)
        image_size = tuple(int(v) for v in self.image_size)
        if attribution.ndim != 3 or min(attribution.shape[1:]) < 1:
            raise ValueError(f"attribution must have shape (T, Gh, Gw) with Gh, Gw >= 1; got {attribution.shape}")
        n_tokens = attribution.shape[0]
        if n_tokens < 1:
            raise ValueError("need at least one token row; got T = 0")
        if len(token_ids) != n_tokens or len(tokens) != n_tokens:
            raise ValueError(f"{len(token_ids)} token ids and {len(tokens)} tokens for T = {n_tokens} rows")
        image_prefix, prefix_attribution = self._prefix(cls_attribution, n_tokens)
        if "cls" in image_prefix:
            if cls_attribution.shape != (n_tokens,):
                raise ValueError(f"cls_attribution has shape {cls_attribution.shape}; expected ({n_tokens},)")
        elif cls_attribution.size:
            raise ValueError(
                f"cls_attribution has {cls_attribution.size} values but image_prefix {image_prefix} has no cls"
            )
        padding = tuple(bool(p) for p in self.padding) or (False,) * n_tokens
        if len(padding) != n_tokens:
            raise ValueError(f"{len(padding)} padding flags for T = {n_tokens} rows")
        token_spans = tuple((int(a), int(b)) for a, b in self.token_spans)
        if token_spans and (len(token_spans) != n_tokens or any(not 0 <= a <= b for a, b in token_spans)):
            raise ValueError(f"token_spans must be T = {n_tokens} (start, end) pairs with 0 <= start <= end")
        if len(crop_box) != 4 or not (crop_box[2] > crop_box[0] and crop_box[3] > crop_box[1]):
            raise ValueError(f"crop_box must be (x0, y0, x1, y1) with x1 > x0, y1 > y0; got {crop_box}")
        if len(image_size) != 2 or min(image_size) < 1:
            raise ValueError(f"image_size must be (width, height) >= 1; got {image_size}")
        # Frozen dataclass: normalised values can only be stored via object.__setattr__.
        for name, value in (
            ("attribution", attribution),
            ("cls_attribution", cls_attribution),
            ("image_prefix", image_prefix),
            ("prefix_attribution", prefix_attribution),
            ("padding", padding),
            ("token_spans", token_spans),
            ("token_ids", token_ids),
            ("tokens", tokens),
            ("crop_box", crop_box),
            ("image_size", image_size),
            *((name, float(getattr(self, name))) for name in _FLOAT_FIELDS),
        ):
            object.__setattr__(self, name, value)

    def _prefix(self, cls_attribution: np.ndarray, n_tokens: int) -> tuple[tuple[str, ...], np.ndarray]:
        """The validated prefix labels and (T, P) attributions, defaults resolved from ``cls_attribution``."""
        if self.image_prefix is None and self.prefix_attribution is None:
            if cls_attribution.shape == (n_tokens,):
                return ("cls",), _read_only_float32(cls_attribution[:, None])
            return (), _read_only_float32(np.zeros((n_tokens, 0)))
        image_prefix = tuple(str(label) for label in self.image_prefix or ())
        values = np.zeros((n_tokens, 0)) if self.prefix_attribution is None else self.prefix_attribution
        prefix_attribution = _read_only_float32(values)
        if prefix_attribution.shape != (n_tokens, len(image_prefix)):
            raise ValueError(
                f"prefix_attribution has shape {prefix_attribution.shape}; expected ({n_tokens}, {len(image_prefix)}) "
                f"for image_prefix {image_prefix}"
            )
        return image_prefix, prefix_attribution

    @classmethod
    def from_proto(cls, resp: explain_pb2.ExplainResponse) -> Explanation:
        """Decode an ``ExplainResponse``.

        Raises:
            ValueError: the attribution tensor's data length does not match its
                shape, or the fields are inconsistent (see the class docstring).
        """
        box = resp.crop_box
        return cls(
            attribution=decode_float32_tensor(resp.attribution),
            cls_attribution=np.array(resp.cls_attribution, dtype=np.float32),
            token_ids=tuple(resp.token_ids),
            tokens=tuple(resp.tokens),
            score=resp.score,
            logit_scale=resp.logit_scale,
            reference_terms=ReferenceTerms.from_proto(resp.reference_terms),
            convergence_delta=resp.convergence_delta,
            crop_box=(box.x0, box.y0, box.x1, box.y1),
            image_size=(resp.image_size.width, resp.image_size.height),
            request_id=resp.request_id,
            model=resp.model,
            options=ResolvedOptions.from_proto(resp.options),
            queue_seconds=resp.timings.queue_seconds,
            compute_seconds=resp.timings.compute_seconds,
            # servers that predate these fields send neither: cls_attribution stands for the prefix
            image_prefix=tuple(resp.image_prefix) if resp.HasField("prefix_attribution") else None,
            prefix_attribution=(
                decode_float32_tensor(resp.prefix_attribution) if resp.HasField("prefix_attribution") else None
            ),
            padding=tuple(resp.padding),
            token_spans=tuple((span.start, span.end) for span in resp.token_spans),
            logit_bias=resp.logit_bias if resp.HasField("logit_bias") else None,
            summary=summary_from_proto(resp.summary) if resp.HasField("summary") else None,
        )

    def __repr__(self) -> str:
        # one line: the generated repr printed every attribution value
        gh, gw = self.grid
        return (
            f"Explanation(model={self.model!r}, score={self.score:.4f}, tokens={len(self.tokens)}, "
            f"grid={gh}x{gw}, convergence_delta={self.convergence_delta:.2e}, request_id={self.request_id!r})"
        )

    @property
    def grid(self) -> tuple[int, int]:
        """(Gh, Gw): rows and columns of the image layer's grid."""
        return self.attribution.shape[1], self.attribution.shape[2]

    @property
    def content_rows(self) -> list[int]:
        """Token rows that stand for caption text: with ``token_spans``, the rows that spell
        at least one character; without, every row but padding and the first and last of the
        rest (CLIP's start and end tokens)."""
        if self.token_spans:
            return [row for row, (a, b) in enumerate(self.token_spans) if b > a and not self.padding[row]]
        tokens = [row for row, pad in enumerate(self.padding) if not pad]
        return tokens[1:-1]

    @property
    def padding_rows(self) -> list[int]:
        """Token rows that are padding (a text tower that sees padding attributes them too)."""
        return [row for row, pad in enumerate(self.padding) if pad]

    def rows(self, span: Span) -> list[int]:
        """Token rows of a caption span.

        Args:
            span: either a ``(start, stop)`` pair of ints selecting rows
                ``start..stop-1`` (``0 <= start < stop <= T``), or a substring of
                the caption. Substrings are matched case-insensitively with all
                whitespace removed, against the concatenated labels of the
                :attr:`content_rows`; the first match wins and every row it
                overlaps is returned, so "red circ" selects "red" and "circle".

        Returns:
            Ascending, contiguous row indices.

        Raises:
            TypeError: ``span`` is neither a str nor a pair of ints.
            ValueError: a range outside ``0 <= start < stop <= T``; an empty or
                whitespace-only substring; a substring not found (the message
                lists the tokens).
        """
        if isinstance(span, str):
            return self._rows_matching(span)
        try:
            start, stop = (operator.index(v) for v in span)
        except (TypeError, ValueError) as err:
            raise TypeError(f"span must be a caption substring or a (start, stop) pair of ints; got {span!r}") from err
        n_tokens = len(self.tokens)
        if not 0 <= start < stop <= n_tokens:
            raise ValueError(f"row range ({start}, {stop}) is not within 0 <= start < stop <= {n_tokens}")
        return list(range(start, stop))

    def _rows_matching(self, substring: str) -> list[int]:
        needle = _normalise(substring)
        if not needle:
            raise ValueError("span substring is empty or whitespace only")
        labels: list[str] = []
        row_of_char: list[int] = []
        for row in self.content_rows:
            # Normalise per label so that the char -> row map stays aligned even
            # when lower-casing changes a label's length.
            label = _normalise(self.tokens[row])
            labels.append(label)
            row_of_char.extend([row] * len(label))
        at = "".join(labels).find(needle)
        if at < 0:
            words = [self.tokens[row] for row in self.content_rows]
            raise ValueError(f"span {substring!r} not found in the caption tokens {words}")
        return list(range(row_of_char[at], row_of_char[at + len(needle) - 1] + 1))

    def heatmap(self, span: Span) -> np.ndarray:
        """Image heatmap of a caption span: the sum of its attribution rows.

        Args:
            span: see :meth:`rows`.

        Returns:
            float32 (Gh, Gw), cosine units; grid row 0 is the top of the crop box.

        Raises:
            TypeError, ValueError: as :meth:`rows`.
        """
        return self.attribution[self.rows(span)].sum(axis=0, dtype=np.float64).astype(np.float32)

    def token_scores(self, box: Sequence[float]) -> np.ndarray:
        """Per-token scores of an image region.

        Grid cell (i, j) covers x in [cx0 + j*cw, cx0 + (j+1)*cw), y in
        [cy0 + i*ch, cy0 + (i+1)*ch) of the crop box, with cw = (cx1-cx0)/Gw,
        ch = (cy1-cy0)/Gh. Each cell contributes its attribution times the
        fraction of its area inside ``box``; parts of ``box`` outside the crop
        box contribute nothing.

        Args:
            box: (x0, y0, x1, y1) in original-image pixels, may be fractional.

        Returns:
            float32 (T,), cosine units; row 0 is the start token.

        Raises:
            ValueError: ``box`` does not have 4 finite values, x1 <= x0 or y1 <= y0, or it
                lies wholly outside the image (a box in the wrong image's coordinates).
        """
        values = tuple(float(v) for v in box)
        if len(values) != 4 or not all(math.isfinite(v) for v in values):
            raise ValueError(f"box must be 4 finite numbers (x0, y0, x1, y1); got {box!r}")
        x0, y0, x1, y1 = values
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"box {values} is empty: need x1 > x0 and y1 > y0")
        width, height = self.image_size
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            raise ValueError(f"box {values} lies outside the {width}x{height} image")
        gh, gw = self.grid
        cx0, cy0, cx1, cy1 = self.crop_box
        weight_y = _cell_coverage(y0, y1, np.linspace(cy0, cy1, gh + 1))
        weight_x = _cell_coverage(x0, x1, np.linspace(cx0, cx1, gw + 1))
        scores = np.einsum("tij,i,j->t", self.attribution.astype(np.float64), weight_y, weight_x)
        return scores.astype(np.float32)

    def top_interactions(self, k: int = 5) -> list[tuple[int, str, int, int, float]]:
        """The k token-patch interactions of largest magnitude.

        Only :attr:`content_rows` count: start, end and padding rows stand for
        no part of the caption (the end token aggregates all of it).

        Args:
            k: how many to return (fewer if there are fewer entries).

        Returns:
            ``(token_row, token_label, grid_row, grid_col, value)`` tuples sorted
            by decreasing ``|value|`` (cosine units); ties keep row-major order.

        Raises:
            ValueError: ``k`` is negative.
        """
        if k < 0:
            raise ValueError(f"k must be >= 0; got {k}")
        rows = self.content_rows
        content = self.attribution[rows]
        order = np.argsort(-np.abs(content).ravel(), kind="stable")[:k]
        result = []
        for flat in order:
            s, i, j = (int(v) for v in np.unravel_index(flat, content.shape))
            result.append((rows[s], self.tokens[rows[s]], i, j, float(content[s, i, j])))
        return result

    def overlay(self, image: ImageInput, span: Span, *, min_size: int = 640) -> Image.Image:
        """A readable figure of the heatmap of ``span`` over the crop box of the original image.

        Drawn by :func:`explain_client.overlay.overlay_figure`: the span and its tokens and
        the score in the title, the photo muted under the heat's grid cells (colour bar
        centred on zero, in cosine units), the crop box and the peak cell marked, a legend.

        Args:
            image: the image that was explained, in any form
                :func:`explain_client.images.encode_image` accepts; decoded with
                its EXIF orientation applied and converted to RGB.
            span: see :meth:`rows`; a substring is shown as given, a row range as its tokens.
            min_size: pixels on the long side of the image area (at least 300); the figure
                is larger.

        Returns:
            A new RGB image whose long side is more than ``min_size`` pixels.

        Raises:
            TypeError: ``image`` or ``span`` of an unsupported kind.
            ValueError: the image's size differs from ``image_size``, the image
                cannot be decoded, ``min_size`` is below 300, or a bad span
                (see :meth:`rows`).
            OSError: an image path that cannot be read.
        """
        rows = self.rows(span)
        heat = self.heatmap(span)
        picture = load_image(image)
        if picture.size != self.image_size:
            raise ValueError(
                f"image is {picture.size[0]}x{picture.size[1]} pixels but the explanation is for "
                f"{self.image_size[0]}x{self.image_size[1]}"
            )
        tokens = [self.tokens[row] for row in rows]
        title = span if isinstance(span, str) else " ".join(tokens)
        return overlay_figure(
            picture, heat, self.crop_box, title=title, tokens=tokens, score=self.score, min_size=min_size
        )

    @property
    def logit(self) -> float:
        """The model's logit for the pair: score x logit_scale (+ logit_bias where the model has one)."""
        return self.score * self.logit_scale + (self.logit_bias or 0.0)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of all fields.

        Arrays become nested lists of floats (``attribution``: T x Gh x Gw,
        ``cls_attribution``: T or 0, ``prefix_attribution``: T x P), tuples
        become lists, and ``reference_terms``, ``options`` and ``summary`` become dicts
        (``summary`` None without one; a NaN ``interaction_share`` stays NaN).
        """
        return {
            "request_id": self.request_id,
            "model": self.model,
            "score": self.score,
            "logit_scale": self.logit_scale,
            "logit_bias": self.logit_bias,
            "convergence_delta": self.convergence_delta,
            "reference_terms": dataclasses.asdict(self.reference_terms),
            "options": dataclasses.asdict(self.options),
            "token_ids": list(self.token_ids),
            "tokens": list(self.tokens),
            "attribution": self.attribution.tolist(),
            "cls_attribution": self.cls_attribution.tolist(),
            "image_prefix": list(self.image_prefix),
            "prefix_attribution": self.prefix_attribution.tolist(),
            "padding": list(self.padding),
            "token_spans": [list(span) for span in self.token_spans],
            "crop_box": list(self.crop_box),
            "image_size": list(self.image_size),
            "queue_seconds": self.queue_seconds,
            "compute_seconds": self.compute_seconds,
            "summary": None if self.summary is None else dataclasses.asdict(self.summary),
        }
