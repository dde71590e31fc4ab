"""The contract every explained tower meets: f = f_hi o f_lo, split at a named layer (method.md).

A tower of any family (ViT, ResNet, ConvNeXt, FastViT, timm or Hugging Face transformers)
presents its hidden state at a layer as positions x features, (B, S, d): the tokens of a
transformer, or the cells of a convolutional feature map in row-major order (d = channels).
Image positions are the prefix tokens (class token, registers), then the grid row by row.
The engine needs nothing else: it integrates the Jacobian of :meth:`SplitTower.upper` along
the straight path from the reference's hidden state to the input's (engine/generic.py), or
takes a faster path where a tower's structure allows one (engine/towers.py).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .layers import Layer

__all__ = ["Layer", "PoolSplit", "RowSplit", "SplitTower", "UnsupportedModelError", "default_quadrature"]


class UnsupportedModelError(ValueError):
    """The model is not of the kind the engine explains (raised at load time); the message
    names the model part and the reason."""


class RowSplit(NamedTuple):
    """f_hi = rest o rows, where ``rows`` maps each position's vector alone.

    A tangent on one position then moves one row of ``rows``' output, so its JVP costs one row,
    not S; only ``rest`` sees a dense tangent. An attention pooling head over all positions, whose
    key and value projections are row-wise, costs a few rows per position instead of S.

    Attributes:
        rows: (x (B, R, d), positions (B, R) int64, each row's index among the S positions)
            -> (B, R, e).
        rest: (rows' output for all S positions (B, S, e), lengths (B,)) -> (B, D).
    """

    rows: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    rest: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class PoolSplit(NamedTuple):
    """f_hi = tail(attention of a few queries over keys and values that are row-wise in h): an
    attention pooling head (SigLIP's and PE-Core's MAP) at its input, or a last block whose pool
    reads the class row alone (EVA), where the query and the residual come from that row.

    A tangent on a position s past the ``query_rows`` moves key and value row s only, and with
    the queries fixed the attention's tangent is closed-form, d o = a_s (alpha (v_s - o) + d v_s)
    with alpha = <q, d k_s> (method.md's softmax derivative): no dense tangent at all. The query
    rows' own columns take the dense path through ``whole``.

    Attributes:
        keys_values: (x (B, R, d), positions (B, R) int64) -> (k, v), each (B, R, H, e); k
            already normalised (and rotated) where the head does so.
        queries: (hidden (B, S, d)) -> (B, L, H, e), the queries, multiplied by the attention's
            scale; they may read the first ``query_rows`` positions only.
        first_key: positions before it are not keys (prefix tokens a pool leaves out); their
            attributions are zero.
        tail: (attention output (B, L, H * e), hidden (B, S, d), lengths (B,)) -> (B, D): the
            output projection and everything after it; it may read the first ``query_rows``
            positions of ``hidden`` only.
        query_rows: leading positions the queries and the tail read (0 for latent queries).
        whole: f_hi as a :class:`RowSplit`, for the query rows' columns.
    """

    keys_values: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    queries: Callable[[torch.Tensor], torch.Tensor]
    first_key: int
    tail: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    query_rows: int = 0
    whole: RowSplit | None = None

    def attend(self, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(queries (B, L, H, e), k and v (B, S', H, e), attention (B, H, L, S'), output (B, L, H, e))."""
        batch, seq = hidden.shape[:2]
        positions = torch.arange(seq, device=hidden.device).expand(batch, seq)[:, self.first_key :]
        k, v = self.keys_values(hidden[:, self.first_key :], positions)
        queries = self.queries(hidden).to(k.dtype)
        attention = torch.einsum("blhe,bshe->bhls", queries, k).softmax(dim=-1)
        return queries, k, v, attention, torch.einsum("bhls,bshe->blhe", attention, v)

    def upper(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """f_hi itself, from all positions (B, S, d)."""
        out = self.attend(hidden)[-1]
        return self.tail(out.flatten(2), hidden, lengths)


class SplitTower:
    """One tower of a dual encoder, split at any of its :attr:`layers`.

    ``upper`` must be a pure function of its arguments that ``torch.func.jvp``, ``vjp`` and
    ``vmap`` can transform: no fused attention kernels, no in-place updates of its inputs, no
    data-dependent Python control flow on ``hidden``.
    """

    embed_dim: int
    """D, the width of the embedding :meth:`upper` returns."""

    layers: tuple[Layer, ...]
    """The layers a user may pick, by index; the last is usually the pooling head's input."""

    default_layer: int
    """The layer explained when a request names none: the pooling head's input where the head
    reads every row (average, attention or MAP pooling), else the last block's or stage's input
    (benchmarks/choose_defaults.py, docs/benchmarks.md)."""

    default_method: str | None = None
    """The quadrature rule this tower's family is explained with when neither request nor model
    configuration names one (chosen by measurement with :attr:`default_n_steps`); None: the
    service default (``model_spec.DEFAULT_METHOD``)."""

    default_n_steps: int | None = None
    """The quadrature nodes that go with :attr:`default_method`."""

    sees_padding: bool = False
    """Text towers only. True when the tower reads every position of its context, padding
    included (no causal mask and no key mask, e.g. SigLIP's text tower): inputs then arrive
    padded to :attr:`context_length` and every position is attributed. False when positions
    after a caption's end cannot change its embedding (causal or key-masked), so a batch may
    pad to its longest caption and the padding is not attributed."""

    context_length: int | None = None
    """Text towers: most positions an input may have; None for image towers."""

    pad_id: int = 0
    """Text towers: the id that pads token sequences."""

    def lower(self, inputs: torch.Tensor, layer: int, lengths: torch.Tensor) -> torch.Tensor:
        """f_lo: the hidden state entering ``layer``, with the model's own modules.

        Args:
            inputs: text: (B, S) int64 ids, each padded with :attr:`pad_id` after its first
                ``lengths[b]`` ids; image: normalised pixels (B, 3, H, W) in the model's dtype.
            layer: index into :attr:`layers`.
            lengths: (B,) int64: text: each input's ids before the padding (its start to end
                tokens); image: ignored.

        Returns:
            (B, S, d) in the model's dtype.
        """
        raise NotImplementedError

    def upper(self, hidden: torch.Tensor, layer: int, lengths: torch.Tensor) -> torch.Tensor:
        """f_hi: unnormalised embeddings (B, D) from the hidden states (B, S, d) entering ``layer``.

        ``lengths`` is as for :meth:`lower` (the pooled row, key masks); a reference is
        evaluated with its input's lengths, so that both are pooled at the same row (method.md).
        """
        raise NotImplementedError

    def row_split(self, layer: int) -> RowSplit | PoolSplit | None:
        """An optional speed-up: f_hi at ``layer`` as :class:`RowSplit`, with
        ``rest(rows(h, arange(S)), lengths) == upper(h, layer, lengths)``, or as
        :class:`PoolSplit`, with ``split.upper(h, lengths) == upper(h, layer, lengths)``; None
        when f_hi starts with no row-wise part worth splitting off."""
        return None

    def own_rows(self, lengths: torch.Tensor, seq: int) -> torch.Tensor:
        """The positions attributed per input, (B,) int64: all ``seq`` when the tower sees
        padding, else each input's ``lengths``."""
        return torch.full_like(lengths, seq) if self.sees_padding else lengths


def default_quadrature(text: SplitTower, image: SplitTower) -> tuple[str | None, int | None]:
    """The (method, n_steps) two towers' families ask for when nothing else names one.

    Both sides of an explanation share one rule: the towers' common :attr:`~SplitTower.default_method`
    with the more nodes either asks for; a tower that names none defers to the other; (None, None)
    when neither names one or they name different rules (the service default then applies).
    """
    named = [(t.default_method, t.default_n_steps) for t in (text, image) if t.default_method is not None]
    if not named or len({method for method, _ in named}) > 1:
        return None, None
    return named[0][0], max(n for _, n in named)
