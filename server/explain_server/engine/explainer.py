"""Explain (caption, image) pairs with a loaded dual encoder, one side at a time and batched."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from open_clip.model import CLIP

from . import generic
from .attribution import (
    FACTORS,
    Attribution,
    ChunkBudget,
    ExplanationCancelled,
    PathIntegral,
    StopCheck,
    choose_mode,
    combine,
    never,
)
from .quadrature import nodes_and_weights
from .split import SplitTower
from .towers import ImageTower, TextTower, Tower


class NonFiniteError(ArithmeticError):
    """An explanation came out NaN or infinite (typically float16 overflow); never returned as a result."""


@dataclass(frozen=True)
class Side:
    """One side (caption or image) of one explanation: what :meth:`Explainer.factors` computes.

    Attributes:
        inputs: token ids (S_t,) int64 from the start to the end token, or normalised pixels (3, H, W).
        layer: non-negative block index whose inputs are attributed.
        method, n_steps: the quadrature rule and its node count (see quadrature.METHODS).
        should_stop: polled before and during the work; once true the side is dropped.
    """

    inputs: torch.Tensor
    layer: int
    method: str
    n_steps: int
    should_stop: StopCheck = never


@dataclass(frozen=True)
class Factor:
    """One side's attribution factor and path endpoints; all that side contributes to a pair.

    Attributes:
        matrix: T (D, S_t) or V (D, S_v), float32 (float64 for a float64 model).
        endpoints: (2, D): the embedding of the input and of the reference, f_hi(h) and f_hi(h^r).
    """

    matrix: torch.Tensor
    endpoints: torch.Tensor

    @property
    def nbytes(self) -> int:
        """Memory held by the two tensors, bytes."""
        return sum(t.element_size() * t.nelement() for t in (self.matrix, self.endpoints))


class Explainer:
    """Computes :class:`Attribution` s for one model; references are deterministic and cached.

    References (method.md, exclip's defaults): the text reference is the tokenizer's special
    tokens around one id 0 ([start, 0, end] for CLIP), padded like any caption; the image
    reference is the all-zeros tensor in normalised pixel space (the dataset-mean image).
    Their hidden states never change, so they are computed once per layer.

    Each tower is explained by the generic path (engine/generic.py), or by a structure-aware
    fast path (engine/towers.py) at the layers where one is given.
    """

    def __init__(
        self,
        text: SplitTower,
        image: SplitTower,
        *,
        text_reference: torch.Tensor,
        pad_id: int | None = None,
        image_size: tuple[int, int],
        device: torch.device,
        dtype: torch.dtype,
        budget: ChunkBudget,
        fast: dict[SplitTower, Tower] | None = None,
    ):
        """Explain with two towers of an eval-mode model on ``device`` computing in ``dtype``.

        Args:
            text, image: the towers.
            text_reference: the reference's ids before padding, (R,) int64.
            pad_id: the id captions are padded with (the tokenizer's); the text tower's when None.
            image_size: the model's input (height, width) in pixels.
            budget: the memory and time one chunk of the engine's work may take (it learns
                this model's speed as it runs, so give each explainer its own).
            fast: per tower, a fast path on the same model whose layer i is the tower's layer
                i, for its :attr:`Tower.n_layers` first layers.
        """
        self.text, self.image = text, image
        self.budget = budget
        self.embed_dim = int(image.embed_dim)
        self.device, self.dtype = device, dtype
        self._fast = dict(fast or {})
        self.pad_id = text.pad_id if pad_id is None else pad_id
        self._text_reference_ids = self._pad_ids([text_reference.to(device)], text.context_length)
        self._text_reference_length = torch.tensor([len(text_reference)], device=device)
        height, width = image_size
        self._image_reference = torch.zeros((1, 3, height, width), dtype=dtype, device=device)
        self._reference_hidden: dict[tuple[SplitTower, int], torch.Tensor] = {}

    @classmethod
    def for_clip(
        cls, model: CLIP, *, sot_token_id: int, eot_token_id: int, budget: ChunkBudget, fast: bool = True
    ) -> "Explainer":
        """An explainer of an open_clip ViT ``CLIP`` through the fast-path towers (the generic
        path on the same towers when ``fast`` is False).

        Raises:
            UnsupportedModelError: a tower the fast path cannot split.
        """
        text, image = TextTower(model), ImageTower(model)
        weight = model.visual.conv1.weight  # the patch embedding's weights say what the image tower computes in
        return cls(
            text,
            image,
            text_reference=torch.tensor([sot_token_id, 0, eot_token_id]),
            image_size=tuple(model.visual.image_size),
            device=weight.device,
            dtype=weight.dtype,
            budget=budget,
            fast={text: text, image: image} if fast else None,
        )

    def _pad_ids(self, ids: list[torch.Tensor], seq: int) -> torch.Tensor:
        batch = torch.full((len(ids), seq), self.pad_id, dtype=torch.long, device=self.device)
        for row, one in enumerate(ids):
            batch[row, : len(one)] = one
        return batch

    def _reference(self, tower: SplitTower, layer: int) -> torch.Tensor:
        key = (tower, layer)
        if key not in self._reference_hidden:
            if tower is self.text:
                hidden = tower.lower(self._text_reference_ids, layer, self._text_reference_length)
            else:
                hidden = tower.lower(self._image_reference, layer, torch.zeros(1, dtype=torch.long))
            self._reference_hidden[key] = hidden[0]
        return self._reference_hidden[key]

    def _lower(self, tower: SplitTower, inputs: list[torch.Tensor], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs' hidden states at ``layer`` (B, S, d) and their lengths (B,)."""
        if tower is self.text:
            lengths = torch.tensor([len(ids) for ids in inputs], device=self.device)
            # a tower that reads padding sees the whole context; otherwise the longest input's rows suffice
            seq = tower.context_length if tower.sees_padding else int(lengths.max())
            return tower.lower(self._pad_ids(inputs, seq), layer, lengths), lengths
        hidden = tower.lower(torch.stack(inputs).to(self.dtype), layer, torch.zeros(len(inputs), dtype=torch.long))
        return hidden, torch.full((len(inputs),), hidden.shape[1], device=self.device)

    def factors(self, tower: SplitTower, sides: list[Side]) -> list[Factor | None]:
        """Factors and path endpoints of many inputs on one tower, batched.

        Inputs with the same attribution layer share every pass: the lower tower, the path
        endpoints and the JVP (or VJP) chunks. Captions of different lengths are padded to
        the longest after their end tokens (to the context when the tower reads padding),
        and each is pooled where it is alone.

        Args:
            tower: ``self.text`` (inputs: token ids (S_t,) int64, start to end token, no
                padding) or ``self.image`` (inputs: normalised pixels (3, H, W)).
            sides: what to compute.

        Returns:
            Per side, in order: its :class:`Factor`, or None when its ``should_stop`` turned
            true before or during the work.
        """
        groups: dict[int, list[int]] = {}
        for index, side in enumerate(sides):
            if not side.should_stop():
                groups.setdefault(side.layer, []).append(index)
        results: list[Factor | None] = [None] * len(sides)
        with torch.no_grad():
            for layer, members in groups.items():
                hidden, lengths = self._lower(tower, [sides[i].inputs.to(self.device) for i in members], layer)
                seq = hidden.shape[1]
                # rows up to S of the reference do not depend on later ones where inputs are cut
                reference = self._reference(tower, layer)[:seq]
                own = tower.own_rows(lengths, seq)
                # The reference's endpoint is taken with its input's lengths (pooled at the same
                # row, method.md): once per distinct length.
                reference_lengths, reference_of = lengths.unique(return_inverse=True)
                endpoints = tower.upper(
                    torch.cat([hidden, reference.expand(len(reference_lengths), -1, -1)]),
                    layer,
                    torch.cat([lengths, reference_lengths]),
                )
                integrals = [
                    PathIntegral(
                        hidden[j],
                        reference,
                        *nodes_and_weights(sides[i].method, sides[i].n_steps),
                        sides[i].should_stop,
                        int(own[j]),
                        int(lengths[j]),
                    )
                    for j, i in enumerate(members)
                ]
                for j, (i, factor) in enumerate(zip(members, self._integrate(tower, layer, integrals))):
                    if factor is not None:
                        own_end, ref_end = endpoints[j], endpoints[len(members) + reference_of[j]]
                        results[i] = Factor(factor, torch.stack([own_end, ref_end]))
        return results

    def _integrate(self, tower: SplitTower, layer: int, integrals: list[PathIntegral]) -> list[torch.Tensor | None]:
        fast = self._fast.get(tower)
        if fast is not None and layer < fast.n_layers:
            mode = choose_mode(fast, layer, integrals[0].hidden.shape[0], self.embed_dim)
            return FACTORS[mode](fast, layer, integrals, self.budget)
        return generic.factors(tower, layer, integrals, self.budget)

    def combine(self, text: Factor, image: Factor) -> Attribution:
        """The :class:`Attribution` of one pair from its two sides' factors (paper Eq. 10, method.md).

        Raises:
            NonFiniteError: a NaN or infinity in the result.
        """
        result = combine(text.matrix, image.matrix, text.endpoints, image.endpoints)
        scalars = (result.score, result.text_reference, result.image_reference, result.both_references)
        if not (np.isfinite(result.interactions).all() and np.isfinite(scalars).all()):
            raise NonFiniteError(f"the attribution is not finite in {self.dtype}; float32 avoids overflow")
        return result

    def explain(
        self,
        token_ids: torch.Tensor,
        pixels: torch.Tensor,
        *,
        text_layer: int,
        image_layer: int,
        method: str,
        n_steps: int,
        should_stop: StopCheck = never,
    ) -> Attribution:
        """Token x patch interactions of one pair (paper Eq. 10, factorised as in method.md).

        Args:
            token_ids: the caption's ids before padding (its start to its end token).
            pixels: (3, H, W) normalised image, float32.
            text_layer, image_layer: indices into the towers' ``layers`` whose inputs are attributed.
            method: quadrature rule (see quadrature.METHODS).
            n_steps: number of quadrature nodes.
            should_stop: polled before the work starts and between chunks of JVPs; when it
                turns true the explanation is abandoned.

        Returns:
            The :class:`Attribution`, interactions of shape (S_t, S_v): the text layer's positions
            by the image layer's (its prefix tokens, then its grid row by row).

        Raises:
            ValueError: bad method or n_steps for it.
            NonFiniteError: a NaN or infinity in the result.
            ExplanationCancelled: ``should_stop()`` turned true.
        """
        text = self.factors(self.text, [Side(token_ids, text_layer, method, n_steps, should_stop)])[0]
        image = (
            None
            if text is None
            else self.factors(self.image, [Side(pixels, image_layer, method, n_steps, should_stop)])[0]
        )
        if text is None or image is None:
            raise ExplanationCancelled()
        return self.combine(text, image)
