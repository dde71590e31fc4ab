"""Explain (caption, image) pairs with a loaded open_clip CLIP model, one side at a time and batched."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from open_clip.model import CLIP
from torch.nn.utils.rnn import pad_sequence

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
from .towers import ImageTower, TextTower


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

    References (method.md, exclip's defaults): the text reference is the token sequence
    [start, id 0, end] padded with zeros; the image reference is the all-zeros tensor in
    normalised pixel space (the dataset-mean image). Their hidden states never change, so
    they are computed once per layer.
    """

    def __init__(self, model: CLIP, *, sot_token_id: int, eot_token_id: int, budget: ChunkBudget):
        """Wrap an eval-mode ``model``.

        Args:
            model: open_clip CLIP in eval mode, on its device and dtype.
            sot_token_id, eot_token_id: the tokenizer's start and end token ids.
            budget: the memory and time one chunk of the engine's work may take (it learns
                this model's speed as it runs, so give each explainer its own).

        Raises:
            UnsupportedModelError: a tower the engine cannot explain.
        """
        self.text = TextTower(model)
        self.image = ImageTower(model)
        self.budget = budget
        self.embed_dim = int(model.visual.output_dim)
        # the patch embedding's weights say what the image tower computes in
        weight = model.visual.conv1.weight
        self.device, self.dtype = weight.device, weight.dtype
        ref_ids = torch.zeros((1, model.context_length), dtype=torch.long, device=self.device)
        ref_ids[0, 0], ref_ids[0, 2] = sot_token_id, eot_token_id
        self._text_reference_ids = ref_ids
        height, width = model.visual.image_size
        self._image_reference = torch.zeros((1, 3, height, width), dtype=self.dtype, device=self.device)
        self._reference_hidden: dict[tuple[TextTower | ImageTower, int], torch.Tensor] = {}

    def _reference(self, tower: TextTower | ImageTower, layer: int) -> torch.Tensor:
        key = (tower, layer)
        if key not in self._reference_hidden:
            reference = self._text_reference_ids if tower is self.text else self._image_reference
            self._reference_hidden[key] = tower.lower(reference, layer)[0]
        return self._reference_hidden[key]

    def factors(self, tower: TextTower | ImageTower, sides: list[Side]) -> list[Factor | None]:
        """Factors and path endpoints of many inputs on one tower, batched.

        Inputs with the same attribution layer share every pass: the lower tower, the path
        endpoints and the JVP (or VJP) chunks. Captions of different lengths are padded after
        their end tokens to the longest: a causal tower's rows up to the end token do not
        depend on the padding, and each caption is pooled at its own end token.

        Args:
            tower: ``self.text`` (inputs: token ids (S_t,) int64, start to end token) or
                ``self.image`` (inputs: normalised pixels (3, H, W)).
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
                inputs = [sides[i].inputs.to(self.device) for i in members]
                if tower is self.text:
                    hidden = tower.lower(pad_sequence(inputs, batch_first=True), layer)
                    lengths = torch.tensor([len(ids) for ids in inputs], device=self.device)
                else:
                    hidden = tower.lower(torch.stack(inputs).to(self.dtype), layer)
                    lengths = torch.full((len(members),), hidden.shape[1], device=self.device)
                # Causal tower: the reference's first S rows do not depend on what follows them.
                reference = self._reference(tower, layer)[: hidden.shape[1]]
                # The reference's endpoint is pooled where its input's is (method.md): once per such row.
                pool = tower.pool_rows(lengths)
                reference_pool, reference_of = pool.unique(return_inverse=True)
                endpoints = tower.upper(
                    torch.cat([hidden, reference.expand(len(reference_pool), -1, -1)]),
                    layer,
                    torch.cat([pool, reference_pool]),
                )
                integrals = [
                    PathIntegral(
                        hidden[j],
                        reference,
                        *nodes_and_weights(sides[i].method, sides[i].n_steps),
                        sides[i].should_stop,
                        int(lengths[j]),
                    )
                    for j, i in enumerate(members)
                ]
                mode = choose_mode(tower, layer, hidden.shape[1], self.embed_dim)
                for j, (i, factor) in enumerate(zip(members, FACTORS[mode](tower, layer, integrals, self.budget))):
                    if factor is not None:
                        own, ref = endpoints[j], endpoints[len(members) + reference_of[j]]
                        results[i] = Factor(factor, torch.stack([own, ref]))
        return results

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
            token_ids: (S_t,) int64 from the start token up to and including the end token.
            pixels: (3, H, W) normalised image, float32.
            text_layer, image_layer: non-negative block indices whose inputs are attributed.
            method: quadrature rule (see quadrature.METHODS).
            n_steps: number of quadrature nodes.
            should_stop: polled before the work starts and between chunks of JVPs; when it
                turns true the explanation is abandoned.

        Returns:
            The :class:`Attribution`, interactions of shape (S_t, 1 + Gh * Gw).

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
