"""Split open_clip CLIP towers at a transformer block: f = f_hi o f_lo (method.md).

``lower`` runs the embedding and the blocks before the attribution layer with the model's own
modules. ``upper`` runs the rest with an explicit attention (no fused kernels), because
forward-mode AD fails inside nn.MultiheadAttention's fast path and the fused CPU attention
kernels. Since only the pooled position (the end token for text, the class token for images)
reaches the embedding, the last block computes its query, attention output and MLP for that
row alone: the same embedding at a fraction of the cost.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer


class UnsupportedModelError(ValueError):
    """The model is not of the kind the engine explains (raised at load time)."""


def block_forward(
    block: ResidualAttentionBlock,
    x: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    pool_index: int | None = None,
) -> torch.Tensor:
    """One open_clip ``ResidualAttentionBlock`` with explicit attention, differentiable in forward mode.

    Args:
        block: the block whose parameters are used.
        x: hidden states, shape (B, S, d), the block's dtype.
        attn_mask: additive float mask (S, S) or None.
        pool_index: if given, only that row is computed (it still attends to every row).

    Returns:
        (B, S, d), or (B, 1, d) when ``pool_index`` is given.
    """
    attn = block.attn
    batch, seq, width = x.shape
    heads = attn.num_heads
    head_dim = width // heads
    y = block.ln_1(x)
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3) if attn.in_proj_bias is not None else (None,) * 3
    if pool_index is not None:
        x = x[:, pool_index : pool_index + 1]
        y_q = y[:, pool_index : pool_index + 1]
        attn_mask = attn_mask[pool_index : pool_index + 1] if attn_mask is not None else None
    else:
        y_q = y
    q = F.linear(y_q, w_q, b_q).view(batch, -1, heads, head_dim).transpose(1, 2)
    k = F.linear(y, w_k, b_k).view(batch, seq, heads, head_dim).transpose(1, 2)
    v = F.linear(y, w_v, b_v).view(batch, seq, heads, head_dim).transpose(1, 2)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(head_dim))
    if attn_mask is not None:
        scores = scores + attn_mask.to(scores.dtype)
    out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, -1, width)
    x = x + block.ls_1(attn.out_proj(out))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _check_blocks(blocks: torch.nn.ModuleList, tower: str) -> None:
    for i, block in enumerate(blocks):
        if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv"):
            raise UnsupportedModelError(
                f"{tower} tower block {i} is {type(block).__name__}; only open_clip's "
                "ResidualAttentionBlock (self-attention) is supported"
            )
        if not block.attn.batch_first or not block.attn._qkv_same_embed_dim:
            raise UnsupportedModelError(f"{tower} tower block {i}: attention must be batch-first with packed q/k/v")


class TextTower:
    """The causal text transformer of an open_clip ``CLIP`` model, split at a block.

    Positions after the end token cannot affect a causal tower's pooled output, so every
    sequence here is cut after its end token: S = position of the end token + 1.
    """

    def __init__(self, model: CLIP):
        """Wrap ``model``'s text tower.

        Raises:
            UnsupportedModelError: not a ``CLIP`` with a causal, end-token-pooled text transformer.
        """
        if type(model) is not CLIP:
            raise UnsupportedModelError(
                f"model class {type(model).__name__} is not supported; only open_clip.model.CLIP "
                "(built-in text transformer; no custom_text / Hugging Face text towers)"
            )
        if model.text_pool_type not in ("argmax", "eos"):
            raise UnsupportedModelError(
                f"text pool_type {model.text_pool_type!r} is not supported; the engine needs end-token pooling"
            )
        if model.attn_mask is None:
            raise UnsupportedModelError("text tower has no causal attention mask")
        self.model = model
        self.blocks = model.transformer.resblocks
        _check_blocks(self.blocks, "text")

    @property
    def n_layers(self) -> int:
        """Number of transformer blocks."""
        return len(self.blocks)

    def _mask(self, seq: int) -> torch.Tensor:
        return self.model.attn_mask[:seq, :seq]

    def lower(self, token_ids: torch.Tensor, layer: int) -> torch.Tensor:
        """f_lo: hidden states entering block ``layer``.

        Args:
            token_ids: (B, S) int64, cut after the end token of the longest sequence.
            layer: block index in [0, n_layers - 1].

        Returns:
            (B, S, d_t) in the model's dtype.
        """
        m = self.model
        seq = token_ids.shape[1]
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(token_ids).to(cast) + m.positional_embedding[:seq].to(cast)
        mask = self._mask(seq).to(cast)
        for block in self.blocks[:layer]:
            x = block(x, attn_mask=mask)
        return x

    def upper(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """f_hi: the embedding from the hidden states entering block ``layer``, pooled at the last position.

        Args:
            hidden: (B, S, d_t); position S - 1 must be the end token.
            layer: block index in [0, n_layers - 1].

        Returns:
            Unnormalised embeddings (B, D).
        """
        m = self.model
        seq = hidden.shape[1]
        mask = self._mask(seq)
        x = hidden
        for block in self.blocks[layer:-1]:
            x = block_forward(block, x, mask)
        x = block_forward(self.blocks[-1], x, mask, pool_index=seq - 1)[:, 0]
        x = m.ln_final(x)
        if m.text_projection is None:
            return x
        if isinstance(m.text_projection, torch.nn.Linear):
            return m.text_projection(x)
        return x @ m.text_projection


class ImageTower:
    """The ViT image tower of an open_clip ``CLIP`` model, split at a block (class-token pooling)."""

    def __init__(self, model: CLIP):
        """Wrap ``model.visual``.

        Raises:
            UnsupportedModelError: not a class-token-pooled open_clip ``VisionTransformer``.
        """
        visual = model.visual
        if type(visual) is not VisionTransformer:
            raise UnsupportedModelError(
                f"image tower {type(visual).__name__} is not supported; only open_clip's VisionTransformer"
            )
        if visual.attn_pool is not None or visual.pool_type != "tok":
            raise UnsupportedModelError("image tower must pool the class token (pool_type 'tok', no attentional pooling)")
        self.visual = visual
        self.blocks = visual.transformer.resblocks
        _check_blocks(self.blocks, "image")

    @property
    def n_layers(self) -> int:
        """Number of transformer blocks."""
        return len(self.blocks)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (Gh, Gw)."""
        return tuple(self.visual.grid_size)

    def lower(self, pixels: torch.Tensor, layer: int) -> torch.Tensor:
        """g_lo: hidden states entering block ``layer``.

        Args:
            pixels: normalised images (B, 3, H, W) in the model's dtype.
            layer: block index in [0, n_layers - 1].

        Returns:
            (B, 1 + Gh * Gw, d_v): the class token, then the patches in row-major order.
        """
        x = self.visual._embeds(pixels)
        for block in self.blocks[:layer]:
            x = block(x)
        return x

    def upper(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """g_hi: the embedding from the hidden states entering block ``layer``.

        Args:
            hidden: (B, 1 + Gh * Gw, d_v).
            layer: block index in [0, n_layers - 1].

        Returns:
            Unnormalised embeddings (B, D).
        """
        x = hidden
        for block in self.blocks[layer:-1]:
            x = block_forward(block, x)
        # ln_post is row-wise, so applying it to the pooled row equals open_clip's order.
        x = self.visual.ln_post(block_forward(self.blocks[-1], x, pool_index=0)[:, 0])
        return x @ self.visual.proj if self.visual.proj is not None else x
