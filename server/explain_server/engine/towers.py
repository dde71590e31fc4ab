"""Split open_clip CLIP towers at a transformer block: f = f_hi o f_lo (method.md).

``lower`` runs the embedding and the blocks before the attribution layer with the model's own
modules. ``upper`` runs the rest with an explicit attention (no fused kernels), because
forward-mode AD fails inside nn.MultiheadAttention's fast path and the fused CPU attention
kernels. Since only the pooled position (the end token for text, the class token for images)
reaches the embedding, the last block computes its query, attention output and MLP for that
row alone: the same embedding at a fraction of the cost.

The pooled row is given per input (``pool``), so that captions of different lengths can share
one padded batch: a causal tower's rows up to a caption's end token do not depend on the
padding after it.

``linearize_finish`` gives the forward-mode derivative of the blocks after the attribution
block as a linear map, built once per set of path nodes from their primal (layer-norm
statistics, attention weights, the activation's slope) and then applied to many tangents. A
JVP through the blocks would recompute all of that, and the activation's derivative, for every
tangent.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import QuickGELU, ResidualAttentionBlock, VisionTransformer
from torch.func import jvp, vmap

from .split import Layer, SplitTower, UnsupportedModelError

# A tangent map: tangents (C, B, S, d) at a fixed primal -> their images.
Linear = Callable[[torch.Tensor], torch.Tensor]


def select_rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """Rows ``rows[b]`` of each ``x[b]``: (B, S, d), (B, Q) int64 -> (B, Q, d); None = all rows."""
    if rows is None:
        return x
    return x.gather(1, rows[..., None].expand(*rows.shape, x.shape[-1]))


def mask_rows(attn_mask: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    """The additive mask's rows for the query rows, broadcastable to scores (B, H, Q, S)."""
    if attn_mask is None or rows is None:
        return attn_mask
    return attn_mask[rows][:, None]


def attention_half(
    block: ResidualAttentionBlock,
    x: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x + ls_1(attn(ln_1(x)))`` of an open_clip ``ResidualAttentionBlock``, with explicit attention.

    Args:
        block: the block whose parameters are used.
        x: hidden states, shape (B, S, d), the block's dtype.
        attn_mask: additive float mask (S, S) or None.
        rows: (B, Q) int64, the rows of each input to compute (every row still serves as key
            and value); None = all S rows.
        key_mask: additive float mask (B, S) over each input's keys (e.g. its padding), or None.

    Returns:
        (B, Q, d).
    """
    attn = block.attn
    batch, seq, width = x.shape
    heads = attn.num_heads
    head_dim = width // heads
    y = block.ln_1(x)
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3) if attn.in_proj_bias is not None else (None,) * 3
    q = F.linear(select_rows(y, rows), w_q, b_q).view(batch, -1, heads, head_dim).transpose(1, 2)
    k = F.linear(y, w_k, b_k).view(batch, seq, heads, head_dim).transpose(1, 2)
    v = F.linear(y, w_v, b_v).view(batch, seq, heads, head_dim).transpose(1, 2)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(head_dim))
    mask = mask_rows(attn_mask, rows)
    if mask is not None:
        scores = scores + mask.to(scores.dtype)
    if key_mask is not None:
        scores = scores + key_mask[:, None, None, :].to(scores.dtype)
    out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, -1, width)
    return select_rows(x, rows) + block.ls_1(attn.out_proj(out))


def mlp_half(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """``x + ls_2(mlp(ln_2(x)))``: the row-wise second half of the block."""
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def linear_layer_norm(norm: torch.nn.LayerNorm, x: torch.Tensor) -> tuple[torch.Tensor, Linear]:
    """``norm(x)`` and its derivative at ``x``, a map on tangents with any leading dimensions.

    d y = w * (dx - mean(dx) - x_hat mean(dx x_hat)) / sigma, with x_hat and sigma from the
    primal, computed in float32 for half-precision models as open_clip's LayerNorm does.
    """
    y = norm(x)
    exact = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    inverse = torch.rsqrt(exact.var(-1, unbiased=False, keepdim=True) + norm.eps)
    x_hat = (exact - exact.mean(-1, keepdim=True)) * inverse

    def tangent(t: torch.Tensor) -> torch.Tensor:
        u = t.to(x_hat.dtype)
        out = (u - u.mean(-1, keepdim=True) - x_hat * (u * x_hat).mean(-1, keepdim=True)) * inverse
        return (out if norm.weight is None else out * norm.weight).to(t.dtype)

    return y, tangent


def linear_attention_half(
    block: ResidualAttentionBlock, x: torch.Tensor, attn_mask: torch.Tensor | None, rows: torch.Tensor | None
) -> tuple[torch.Tensor, Linear]:
    """:func:`attention_half` and its derivative at ``x``: tangents (C, B, S, d) -> (C, B, Q, d).

    With the attention weights a of the primal: ds = (dq k^T + q dk^T) / sqrt(e),
    da = a * (ds - <a, ds>), do = da v + a dv.
    """
    attn = block.attn
    batch, seq, width = x.shape
    heads = attn.num_heads
    head_dim = width // heads
    scale = 1.0 / math.sqrt(head_dim)
    y, d_norm = linear_layer_norm(block.ln_1, x)
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3) if attn.in_proj_bias is not None else (None,) * 3
    q = F.linear(select_rows(y, rows), w_q, b_q).view(batch, -1, heads, head_dim).transpose(1, 2)  # (B, H, Q, e)
    k = F.linear(y, w_k, b_k).view(batch, seq, heads, head_dim).transpose(1, 2)
    v = F.linear(y, w_v, b_v).view(batch, seq, heads, head_dim).transpose(1, 2)
    scores = (q @ k.transpose(-2, -1)) * scale
    mask = mask_rows(attn_mask, rows)
    if mask is not None:
        scores = scores + mask.to(scores.dtype)
    a = scores.softmax(dim=-1)  # (B, H, Q, S)
    query_rows = q.shape[2]
    out = select_rows(x, rows) + block.ls_1(attn.out_proj((a @ v).transpose(1, 2).reshape(batch, query_rows, width)))

    def own_rows(t: torch.Tensor) -> torch.Tensor:
        return t if rows is None else vmap(lambda u: select_rows(u, rows))(t)

    def tangent(t: torch.Tensor) -> torch.Tensor:
        count = t.shape[0]
        t_y = d_norm(t)
        t_q = F.linear(own_rows(t_y), w_q).view(count, batch, query_rows, heads, head_dim).transpose(2, 3)
        t_k = F.linear(t_y, w_k).view(count, batch, seq, heads, head_dim).transpose(2, 3)
        t_v = F.linear(t_y, w_v).view(count, batch, seq, heads, head_dim).transpose(2, 3)
        t_scores = (t_q @ k.transpose(-2, -1) + q @ t_k.transpose(-2, -1)) * scale
        t_a = a * (t_scores - (a * t_scores).sum(-1, keepdim=True))
        t_o = (t_a @ v + a @ t_v).transpose(2, 3).reshape(count, batch, query_rows, width)
        return own_rows(t) + block.ls_1(F.linear(t_o, attn.out_proj.weight))

    return out, tangent


def linear_mlp_half(block: ResidualAttentionBlock, x: torch.Tensor) -> tuple[torch.Tensor, Linear]:
    """:func:`mlp_half` and its derivative at ``x``; the activation's slope is taken once, from the primal."""
    z, d_norm = linear_layer_norm(block.ln_2, x)
    fc, activation, projection = block.mlp.c_fc, block.mlp.gelu, block.mlp.c_proj
    hidden = fc(z)
    # an elementwise activation's JVP with a tangent of ones is its slope at each element
    activated, slope = jvp(activation, (hidden,), (torch.ones_like(hidden),))
    out = x + block.ls_2(projection(activated))

    def tangent(t: torch.Tensor) -> torch.Tensor:
        return t + block.ls_2(F.linear(slope * F.linear(d_norm(t), fc.weight), projection.weight))

    return out, tangent


def _check_blocks(blocks: torch.nn.ModuleList, tower: str) -> None:
    for i, block in enumerate(blocks):
        if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv"):
            raise UnsupportedModelError(
                f"{tower} tower block {i} is {type(block).__name__}; only open_clip's "
                "ResidualAttentionBlock (self-attention) is supported"
            )
        if not block.attn.batch_first or not block.attn._qkv_same_embed_dim:
            raise UnsupportedModelError(f"{tower} tower block {i}: attention must be batch-first with packed q/k/v")
        layout = [(name, type(module)) for name, module in block.mlp.named_children()]
        if layout not in [
            [("c_fc", torch.nn.Linear), ("gelu", act), ("c_proj", torch.nn.Linear)] for act in _ACTIVATIONS
        ]:
            raise UnsupportedModelError(
                f"{tower} tower block {i}: the MLP must be Linear, GELU or QuickGELU, Linear; got {layout}"
            )


# Elementwise activations, whose slope linear_mlp_half takes from one JVP.
_ACTIVATIONS = (torch.nn.GELU, QuickGELU)


class Tower(SplitTower):
    """One tower split at a block: ``lower`` (f_lo) and ``upper`` (f_hi) of method.md.

    Subclasses say where the blocks are, which row is pooled, the attention mask, and the final
    norm and projection of the pooled row. Layer i is the input of block i.
    """

    blocks: torch.nn.ModuleList

    @property
    def n_layers(self) -> int:
        """Number of transformer blocks."""
        return len(self.blocks)

    @property
    def default_layer(self) -> int:
        """The input of the last block, as in exclip."""
        return self.n_layers - 1

    def mask(self, seq: int) -> torch.Tensor | None:
        """Additive attention mask for ``seq`` positions, or None."""
        return None

    def pool_rows(self, lengths: torch.Tensor) -> torch.Tensor:
        """The row of each input that reaches the embedding: (B,) int64 from its length (B,)
        (rows from the length on are padding)."""
        raise NotImplementedError

    final_norm: torch.nn.LayerNorm
    """The layer norm of the pooled row, before the projection."""

    def project(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """The final projection (B, d) -> (B, D); without its bias, its derivative."""
        raise NotImplementedError

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """Final norm and projection: (B, d) pooled rows -> (B, D) embeddings."""
        return self.project(self.final_norm(pooled))

    def query_rows(self, layer: int, pool: torch.Tensor) -> torch.Tensor | None:
        """Rows block ``layer`` must compute, (B, Q) int64: only the pooled one (``pool``, (B,))
        in the last block; None = all rows."""
        return pool[:, None] if layer == self.n_layers - 1 else None

    def finish(self, x: torch.Tensor, layer: int, pool: torch.Tensor) -> torch.Tensor:
        """The embedding from block ``layer``'s attention-half output.

        Args:
            x: (B, Q, d), the rows of :meth:`query_rows` (all S rows, or the pooled one).
            layer: block index in [0, n_layers - 1].
            pool: (B,) int64, each input's pooled row.

        Returns:
            Unnormalised embeddings (B, D).
        """
        x = mlp_half(self.blocks[layer], x)
        for index in range(layer + 1, self.n_layers):
            x = mlp_half(self.blocks[index], self.attention(x, index, pool))
        return self.head(x[:, 0])  # the last block computed the pooled row alone

    def linearize_finish(self, x: torch.Tensor, layer: int, pool: torch.Tensor) -> tuple[torch.Tensor, Linear]:
        """:meth:`finish` and its derivative at ``x``: tangents (C, B, Q, d) -> (C, B, D).

        The map holds the primal's intermediates, so applying it costs the tangents' work only.
        """
        x, step = linear_mlp_half(self.blocks[layer], x)
        steps = [step]
        for index in range(layer + 1, self.n_layers):
            x, step = linear_attention_half(self.blocks[index], x, self.mask(x.shape[1]), self.query_rows(index, pool))
            steps.append(step)
            x, step = linear_mlp_half(self.blocks[index], x)
            steps.append(step)
        pooled, d_norm = linear_layer_norm(self.final_norm, x[:, 0])  # the last block computed the pooled row alone

        def tangent(t: torch.Tensor) -> torch.Tensor:
            for step in steps:
                t = step(t)
            return self.project(d_norm(t[:, :, 0]), bias=False)

        return self.project(pooled), tangent

    def attention(self, x: torch.Tensor, layer: int, pool: torch.Tensor) -> torch.Tensor:
        """Block ``layer``'s attention half on the rows it must compute."""
        return attention_half(self.blocks[layer], x, self.mask(x.shape[1]), self.query_rows(layer, pool))

    def upper(self, hidden: torch.Tensor, layer: int, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """f_hi: the embedding from the hidden states entering block ``layer``.

        Args:
            hidden: (B, S, d).
            layer: block index in [0, n_layers - 1].
            lengths: (B,) int64, each input's rows before its padding (see :meth:`pool_rows`);
                None = S, no padding.

        Returns:
            Unnormalised embeddings (B, D).
        """
        if lengths is None:
            batch, seq = hidden.shape[:2]
            lengths = torch.full((batch,), seq, device=hidden.device)
        pool = self.pool_rows(lengths)
        return self.finish(self.attention(hidden, layer, pool), layer, pool)


class TextTower(Tower):
    """The causal text transformer of an open_clip ``CLIP`` model, pooled at the end token.

    Positions after the end token cannot affect a causal tower's pooled output, so every
    sequence here is cut after its end token (S = position of the end token + 1), or after
    the longest one's when captions of different lengths share a padded batch.
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
        self.final_norm = model.ln_final
        _check_blocks(self.blocks, "text")
        self.layers = tuple(Layer(f"block {i}") for i in range(self.n_layers))
        # causal: positions after the end token cannot change the embedding
        self.sees_padding = False
        self.context_length = int(model.context_length)
        self.pad_id = 0
        projection = model.text_projection
        if projection is None:
            self.embed_dim = model.transformer.width
        elif isinstance(projection, torch.nn.Linear):
            self.embed_dim = projection.out_features
        else:
            self.embed_dim = projection.shape[1]

    def mask(self, seq: int) -> torch.Tensor:
        """The causal mask, cut to ``seq`` positions."""
        return self.model.attn_mask[:seq, :seq]

    def pool_rows(self, lengths: torch.Tensor) -> torch.Tensor:
        """The end token: the last position before the padding, since sequences are cut after it."""
        return lengths - 1

    def project(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """``text_projection`` (none, a matrix, or a Linear layer)."""
        projection = self.model.text_projection
        if projection is None:
            return x
        if isinstance(projection, torch.nn.Linear):
            return F.linear(x, projection.weight, projection.bias if bias else None)
        return x @ projection

    def lower(self, token_ids: torch.Tensor, layer: int, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """f_lo: hidden states entering block ``layer``, with the model's own modules.

        Args:
            token_ids: (B, S) int64, cut after the end token of the longest sequence; shorter
                ones padded with zeros after their end token.
            layer: block index in [0, n_layers - 1].
            lengths: unused: no row depends on the rows after it.

        Returns:
            (B, S, d_t) in the model's dtype.
        """
        m = self.model
        seq = token_ids.shape[1]
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(token_ids).to(cast) + m.positional_embedding[:seq].to(cast)
        mask = self.mask(seq).to(cast)
        for block in self.blocks[:layer]:
            x = block(x, attn_mask=mask)
        return x


class ImageTower(Tower):
    """The ViT image tower of an open_clip ``CLIP`` model, pooled at the class token."""

    def __init__(self, model: CLIP):
        """Wrap ``model.visual``.

        Raises:
            UnsupportedModelError: not a class-token-pooled open_clip ``VisionTransformer``
                (e.g. a transformers CLIPModel, which has no ``visual``).
        """
        visual = getattr(model, "visual", None)
        if type(visual) is not VisionTransformer:
            raise UnsupportedModelError(
                f"image tower {type(visual).__name__} is not supported; only open_clip's VisionTransformer"
            )
        if visual.attn_pool is not None or visual.pool_type != "tok":
            raise UnsupportedModelError(
                "image tower must pool the class token (pool_type 'tok', no attentional pooling)"
            )
        self.visual = visual
        self.blocks = visual.transformer.resblocks
        self.final_norm = visual.ln_post
        _check_blocks(self.blocks, "image")
        self.embed_dim = visual.output_dim
        self.layers = tuple(Layer(f"block {i}", self.grid_size, ("cls",)) for i in range(self.n_layers))

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (Gh, Gw)."""
        return tuple(self.visual.grid_size)

    def pool_rows(self, lengths: torch.Tensor) -> torch.Tensor:
        """The class token."""
        return torch.zeros_like(lengths)

    def project(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """``proj`` (ln_post, the final norm, is row-wise: applying it to the pooled row equals open_clip's order)."""
        return x @ self.visual.proj if self.visual.proj is not None else x

    def lower(self, pixels: torch.Tensor, layer: int, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """g_lo: hidden states entering block ``layer``, with the model's own modules.

        Args:
            pixels: normalised images (B, 3, H, W) in the model's dtype.
            layer: block index in [0, n_layers - 1].
            lengths: unused.

        Returns:
            (B, 1 + Gh * Gw, d_v): the class token, then the patches in row-major order.
        """
        x = self.visual._embeds(pixels)
        for block in self.blocks[:layer]:
            x = block(x)
        return x
