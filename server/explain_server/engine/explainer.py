"""Explain one (caption, image) pair with a loaded open_clip CLIP model."""

from __future__ import annotations

import numpy as np
import torch
from open_clip.model import CLIP

from .attribution import FACTORS, Attribution, ExplanationCancelled, StopCheck, never, choose_mode, combine
from .quadrature import nodes_and_weights
from .towers import ImageTower, TextTower


class NonFiniteError(ArithmeticError):
    """An explanation came out NaN or infinite (typically float16 overflow); never returned as a result."""


class Explainer:
    """Computes :class:`Attribution` s for one model; references are deterministic and cached.

    References (method.md, exclip's defaults): the text reference is the token sequence
    [start, id 0, end] padded with zeros; the image reference is the all-zeros tensor in
    normalised pixel space (the dataset-mean image). Their hidden states never change, so
    they are computed once per layer.
    """

    def __init__(self, model: CLIP, *, sot_token_id: int, eot_token_id: int, memory_bytes: int):
        """Wrap an eval-mode ``model``.

        Args:
            model: open_clip CLIP in eval mode, on its device and dtype.
            sot_token_id, eot_token_id: the tokenizer's start and end token ids.
            memory_bytes: budget for the tangent activations of one JVP chunk.

        Raises:
            UnsupportedModelError: a tower the engine cannot explain.
        """
        self.text = TextTower(model)
        self.image = ImageTower(model)
        self.memory_bytes = memory_bytes
        self.embed_dim = int(model.visual.output_dim)
        # the patch embedding's weights say what the image tower computes in
        weight = model.visual.conv1.weight
        self.device, self.dtype = weight.device, weight.dtype
        ref_ids = torch.zeros((1, model.context_length), dtype=torch.long, device=self.device)
        ref_ids[0, 0], ref_ids[0, 2] = sot_token_id, eot_token_id
        self._text_reference_ids = ref_ids
        height, width = model.visual.image_size
        self._image_reference = torch.zeros((1, 3, height, width), dtype=self.dtype, device=self.device)
        self._reference_hidden: dict[tuple[str, int], torch.Tensor] = {}

    def _reference(self, tower: str, layer: int) -> torch.Tensor:
        key = (tower, layer)
        if key not in self._reference_hidden:
            if tower == "text":
                hidden = self.text.lower(self._text_reference_ids, layer)
            else:
                hidden = self.image.lower(self._image_reference, layer)
            self._reference_hidden[key] = hidden[0]
        return self._reference_hidden[key]

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
        if should_stop():
            raise ExplanationCancelled()
        alphas, weights = nodes_and_weights(method, n_steps)
        seq = token_ids.shape[0]
        with torch.no_grad():
            h_t = self.text.lower(token_ids[None].to(self.device), text_layer)[0]
            h_v = self.image.lower(pixels[None].to(self.device, self.dtype), image_layer)[0]
            # Causal tower: the reference's first S_t rows do not depend on what follows them.
            h_t_ref = self._reference("text", text_layer)[:seq]
            h_v_ref = self._reference("image", image_layer)
            text_endpoints = self.text.upper(torch.stack([h_t, h_t_ref]), text_layer)
            image_endpoints = self.image.upper(torch.stack([h_v, h_v_ref]), image_layer)
            factors = [
                self._factor(tower, layer, hidden, reference, alphas, weights, should_stop)
                for tower, layer, hidden, reference in (
                    (self.text, text_layer, h_t, h_t_ref),
                    (self.image, image_layer, h_v, h_v_ref),
                )
            ]
        result = combine(*factors, text_endpoints, image_endpoints)
        scalars = (result.score, result.text_reference, result.image_reference, result.both_references)
        if not (np.isfinite(result.interactions).all() and np.isfinite(scalars).all()):
            raise NonFiniteError(f"the attribution is not finite in {self.dtype}; float32 avoids overflow")
        return result

    def _factor(self, tower, layer, hidden, reference, alphas, weights, should_stop) -> torch.Tensor:
        mode = choose_mode(tower, layer, hidden.shape[0], self.embed_dim)
        return FACTORS[mode](tower, layer, hidden, reference, alphas, weights, self.memory_bytes, should_stop)
