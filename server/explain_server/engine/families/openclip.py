"""open_clip's own transformer towers as :class:`~..split.SplitTower` s (method.md, "Beyond CLIP's ViT towers").

Covers open_clip's ``VisionTransformer`` (class-token, average and CoCa's attentional pooling,
with or without ``ln_pre`` and with the final norm before or after pooling) and its text
transformer, both the ``TextTransformer`` module (``model.text`` of ``CustomTextCLIP`` and
``CoCa``) and the tower built into ``open_clip.model.CLIP`` (causal or not; pooled at the end
token, by ``argmax`` or ``eos``, at the first or last position, or at CoCa's appended class
token).

``lower`` runs the model's own modules. ``upper`` runs the blocks with an explicit attention,
since nn.MultiheadAttention's fast path and the fused attention kernels break
``torch.func.jvp``; where a single row is pooled, the last block computes that row alone.

Layers: ``block i`` is the input of transformer block i; ``head`` is the input of the pooling
head, after all blocks and the final norm when that norm is row-wise and precedes pooling
(``ln_post`` / ``ln_final`` applied to every row, or the attentional pooler's key norm
``ln_k``); where the norm follows pooling (``final_ln_after_pool``, CoCa's text class token)
``upper`` applies it.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import (
    AttentionalPooler,
    CustomResidualAttentionBlock,
    ResidualAttentionBlock,
    TextTransformer,
    VisionTransformer,
)

from ..split import Layer, RowSplit, SplitTower, UnsupportedModelError
from ..towers import mask_rows, mlp_half, select_rows


def check_blocks(blocks: torch.nn.ModuleList, tower: str) -> None:
    """Refuse blocks ``upper`` cannot run with explicit attention.

    Raises:
        UnsupportedModelError: a block class other than open_clip's self-attention
            ``ResidualAttentionBlock`` / ``CustomResidualAttentionBlock``, or scaled cosine
            attention (open_clip 3.3's own forward of it fails: ``torch.bmm`` on 4-D tensors).
    """
    for i, block in enumerate(blocks):
        if type(block) is ResidualAttentionBlock and not hasattr(block, "ln_1_kv"):
            if not block.attn.batch_first or not block.attn._qkv_same_embed_dim or block.attn.bias_k is not None:
                raise UnsupportedModelError(
                    f"{tower} tower block {i}: attention must be batch-first with packed q/k/v and no extra key bias"
                )
        elif type(block) is CustomResidualAttentionBlock:
            if block.attn.logit_scale is not None:
                raise UnsupportedModelError(
                    f"{tower} tower block {i}: CustomResidualAttentionBlock with scaled cosine attention is not "
                    "supported (open_clip's own forward of it fails)"
                )
        else:
            raise UnsupportedModelError(
                f"{tower} tower block {i} is {type(block).__name__}; only open_clip's ResidualAttentionBlock and "
                "CustomResidualAttentionBlock (self-attention) are supported"
            )


def qkv_rows(block: ResidualAttentionBlock | CustomResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """The row-wise start of a block: each row's input beside its query, key and value.

    Args:
        block: an open_clip self-attention block (packed ``in_proj`` weights).
        x: (B, R, d) rows entering the block.

    Returns:
        (B, R, 4d): ``[x, q, k, v]``, the projections of ``ln_1(x)``.
    """
    attn = block.attn
    return torch.cat([x, F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)], dim=-1)


def attend(
    block: ResidualAttentionBlock | CustomResidualAttentionBlock,
    x: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    key_mask: torch.Tensor | None,
) -> torch.Tensor:
    """The attention half of a block from its projections: ``x + ls_1(attention)``, explicit.

    ``CustomResidualAttentionBlock``'s options (qk norm, per-head scale, inner norm, ``ln_attn``)
    are applied where it has them.

    Args:
        x: (B, Q, d) the query rows' inputs (the residual).
        q: (B, Q, d) their queries; k, v: (B, S, d) every row's keys and values.
        mask: additive mask broadcastable to the scores (B, H, Q, S), or None.
        key_mask: additive (B, S) mask over keys, or None.

    Returns:
        (B, Q, d).
    """
    attn = block.attn
    batch, queries, width = q.shape
    heads = attn.num_heads
    head_dim = width // heads
    custom = type(block) is CustomResidualAttentionBlock
    q = q.reshape(batch, queries, heads, head_dim).transpose(1, 2)
    k = k.reshape(batch, -1, heads, head_dim).transpose(1, 2)
    v = v.reshape(batch, -1, heads, head_dim).transpose(1, 2)
    if custom:
        q, k = attn.ln_q(q), attn.ln_k(k)
    scores = (q @ k.transpose(-2, -1)) * (attn.scale if custom else 1.0 / math.sqrt(head_dim))
    if mask is not None:
        scores = scores + mask.to(scores.dtype)
    if key_mask is not None:
        scores = scores + key_mask[:, None, None, :].to(scores.dtype)
    out = scores.softmax(dim=-1) @ v
    if custom and attn.head_scale is not None:
        out = out * attn.head_scale
    out = out.transpose(1, 2).reshape(batch, queries, width)
    if custom:
        return x + block.ls_1(block.ln_attn(attn.out_proj(attn.ln_inner(out))))
    return x + block.ls_1(attn.out_proj(out))


def attention_rows(
    block: ResidualAttentionBlock | CustomResidualAttentionBlock,
    x: torch.Tensor,
    attn_mask: torch.Tensor | None,
    rows: torch.Tensor | None,
    key_mask: torch.Tensor | None,
) -> torch.Tensor:
    """``x + ls_1(attn(ln_1(x)))`` for the query ``rows`` (B, Q) int64 (None = all S rows);
    every row still serves as key and value. Masks as :func:`..towers.attention_half`.
    Returns (B, Q, d)."""
    width = x.shape[-1]
    attn = block.attn
    y = block.ln_1(x)
    w_q, w_kv = attn.in_proj_weight.split([width, 2 * width])
    b_q, b_kv = attn.in_proj_bias.split([width, 2 * width]) if attn.in_proj_bias is not None else (None, None)
    k, v = F.linear(y, w_kv, b_kv).chunk(2, dim=-1)
    q = F.linear(select_rows(y, rows), w_q, b_q)
    return attend(block, select_rows(x, rows), q, k, v, mask_rows(attn_mask, rows), key_mask)


def run_blocks(
    blocks: torch.nn.ModuleList,
    x: torch.Tensor,
    first: int,
    attn_mask: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    last_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Blocks ``first``.. of ``blocks`` on ``x`` (B, S, d) with explicit attention.

    Args:
        attn_mask: additive (S, S) mask, or None.
        key_mask: additive (B, S) mask over keys, or None.
        last_rows: (B, Q) int64, the only rows the last block computes; None = all.

    Returns:
        (B, S, d), or (B, Q, d) when ``last_rows`` is given and the last block ran.
    """
    for index in range(first, len(blocks)):
        block = blocks[index]
        rows = last_rows if index == len(blocks) - 1 else None
        x = mlp_half(block, attention_rows(block, x, attn_mask, rows, key_mask))
    return x


def last_block_split(
    block: ResidualAttentionBlock | CustomResidualAttentionBlock,
    attn_mask: Callable[[int], torch.Tensor | None],
    key_mask: Callable[[torch.Tensor, int, torch.dtype], torch.Tensor | None],
    pool: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    head: Callable[[torch.Tensor], torch.Tensor],
) -> RowSplit:
    """f_hi at the input of the last block, for a tower pooled at one row per input.

    ``rows`` is :func:`qkv_rows`; ``rest`` attends from the pooled row alone over every key and
    value, finishes the block on that row and applies ``head``: so a column's dense tangent in
    ``rest`` costs one query row, not a block over S rows.

    Args:
        block: the last block.
        attn_mask: sequence length -> the additive (S, S) mask, or None.
        key_mask: (lengths, S, dtype) -> the additive (B, S) key mask, or None.
        pool: (lengths, rows' output (B, S, 4d)) -> (B,) int64, each input's pooled row.
        head: the pooled rows after the block (B, d) -> embeddings (B, D).
    """

    def rest(h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        seq, width = h.shape[1], h.shape[-1] // 4
        x, q, k, v = h.split(width, dim=-1)
        rows = pool(lengths, h)[:, None]
        out = attend(
            block,
            select_rows(x, rows),
            select_rows(q, rows),
            k,
            v,
            mask_rows(attn_mask(seq), rows),
            key_mask(lengths, seq, h.dtype),
        )
        return head(mlp_half(block, out)[:, 0])

    return RowSplit(lambda x, positions: qkv_rows(block, x), rest)


def pool_keys_values(pooler: AttentionalPooler, keys: torch.Tensor) -> torch.Tensor:
    """The row-wise start of CoCa's pooler: keys and values (B, R, 2D) of tokens (B, R, d)
    already normalised by ``pooler.ln_k``."""
    mha = pooler.attn
    width = mha.embed_dim
    if mha._qkv_same_embed_dim:
        w_k, w_v = mha.in_proj_weight[width:].chunk(2)
    else:
        w_k, w_v = mha.k_proj_weight, mha.v_proj_weight
    b_k, b_v = mha.in_proj_bias[width:].chunk(2) if mha.in_proj_bias is not None else (None, None)
    return torch.cat([F.linear(keys, w_k, b_k), F.linear(keys, w_v, b_v)], dim=-1)


def attentional_pool(pooler: AttentionalPooler, kv: torch.Tensor, queries: slice) -> torch.Tensor:
    """CoCa's ``AttentionalPooler`` with explicit attention, for some of its learned queries.

    Args:
        pooler: the pooler.
        kv: (B, S, 2D) keys and values, :func:`pool_keys_values`.
        queries: which learned queries to compute (its norm ``ln_q`` is row-wise).

    Returns:
        (B, Q, D) pooled queries.
    """
    mha = pooler.attn
    batch, seq, _ = kv.shape
    heads, width = mha.num_heads, mha.embed_dim
    head_dim = width // heads
    w_q = mha.in_proj_weight[:width] if mha._qkv_same_embed_dim else mha.q_proj_weight
    b_q = mha.in_proj_bias[:width] if mha.in_proj_bias is not None else None
    q = F.linear(pooler.ln_q(pooler.query[queries]), w_q, b_q)
    q = q.view(-1, heads, head_dim).transpose(0, 1)  # (H, Q, e), shared by the batch
    k, v = (part.reshape(batch, seq, heads, head_dim).transpose(1, 2) for part in kv.chunk(2, dim=-1))
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(head_dim))
    out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, -1, width)
    return mha.out_proj(out)


def block_layers(
    count: int, grid: tuple[int, int] | None = None, prefix: tuple[str, ...] = (), head: bool = True
) -> tuple[Layer, ...]:
    """``block 0`` .. ``block count-1``, then ``head`` when ``head``, all with the same positions.

    A head that pools one row (a class or end token) is not offered: at its input every other
    position's attribution would be zero.
    """
    blocks = tuple(Layer(f"block {i}", grid, prefix) for i in range(count))
    return blocks + (Layer("head", grid, prefix),) if head else blocks


class VisionTower(SplitTower):
    """open_clip's ``VisionTransformer``; positions are the class token then the patch grid.

    Pooling: the class token (``tok``), the mean of the patch tokens (``avg``), or CoCa's
    attentional pooler (its first query is the contrastive embedding), each with the final norm
    ``ln_post`` before pooling (row-wise: the ``head`` layer's hidden state includes it) or after
    (``final_ln_after_pool``, CLIPA: ``upper`` applies it). With the attentional pooler the
    ``head`` layer's hidden state includes the pooler's key norm ``ln_k``.
    """

    def __init__(self, visual: VisionTransformer):
        """Wrap ``visual``.

        Raises:
            UnsupportedModelError: ``pool_type`` 'none' (no single embedding), the 'parallel' /
                'cascade' attentional poolers (open_clip marks them untested; no pretrained
                config uses them), or an unsupported block (see :func:`check_blocks`).
        """
        if visual.attn_pool is not None and visual.attn_pool_contrastive is not None:
            raise UnsupportedModelError(
                f"VisionTransformer with attentional_pool {visual.attn_pool_type!r} is not supported "
                "(open_clip marks it untested; only the original CoCa pooler is)"
            )
        if visual.pool_type not in ("tok", "avg"):
            raise UnsupportedModelError(
                f"VisionTransformer pool_type {visual.pool_type!r} yields no single embedding; 'tok' or 'avg' needed"
            )
        check_blocks(visual.transformer.resblocks, "image")
        self.visual = visual
        self.blocks = visual.transformer.resblocks
        self.embed_dim = visual.proj.shape[1] if visual.proj is not None else visual.ln_post.normalized_shape[0]
        pools_all = visual.attn_pool is not None or visual.pool_type == "avg"
        self.layers = block_layers(len(self.blocks), tuple(visual.grid_size), ("cls",), head=pools_all)
        # the head's input where the pooling reads every row (average, CoCa's attentional pooler)
        self.default_layer = len(self.layers) - 1
        # measured (benchmarks/choose_defaults.py; the class-token case: bench_engine.py's sweep)
        self.default_method, self.default_n_steps = "gausslegendre", 3

    def _norm_before_pool(self, x: torch.Tensor) -> torch.Tensor:
        """The row-wise norm between the last block and the pooling (part of the ``head`` layer)."""
        if self.visual.attn_pool is not None:
            return self.visual.attn_pool.ln_k(x)
        return x if self.visual.final_ln_after_pool else self.visual.ln_post(x)

    def lower(self, inputs: torch.Tensor, layer: int, lengths: torch.Tensor) -> torch.Tensor:
        """g_lo with the model's own modules: (B, 1 + Gh * Gw, d), class token first (see SplitTower)."""
        x = self.visual._embeds(inputs)
        for block in self.blocks[:layer]:
            x = block(x)
        return self._norm_before_pool(x) if layer == len(self.blocks) else x

    def _single(self) -> bool:
        """Only the class token reaches the embedding: 'tok' pooling without the attentional pooler."""
        return self.visual.pool_type == "tok" and self.visual.attn_pool is None

    def upper(self, hidden: torch.Tensor, layer: int, lengths: torch.Tensor) -> torch.Tensor:
        """g_hi: the blocks from ``layer``, pooling, norm and projection, as ``visual.forward`` (see SplitTower)."""
        x = hidden
        if layer < len(self.blocks):
            rows = torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device) if self._single() else None
            x = self._norm_before_pool(run_blocks(self.blocks, x, layer, last_rows=rows))
        return self._from_head(x)

    def _from_head(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding from the ``head`` layer's hidden state (B, S, d) (or its class token alone)."""
        visual = self.visual
        if visual.attn_pool is not None:
            return self._from_keys_values(pool_keys_values(visual.attn_pool, x))
        pooled = x[:, 0] if visual.pool_type == "tok" else x[:, 1:].mean(dim=1)
        if visual.final_ln_after_pool:
            pooled = visual.ln_post(pooled)
        return pooled @ visual.proj if visual.proj is not None else pooled

    def _from_keys_values(self, kv: torch.Tensor) -> torch.Tensor:
        """The embedding from the attentional pooler's keys and values (B, S, 2D)."""
        visual = self.visual
        tok = visual.pool_type == "tok"
        # ln_post is row-wise over the pooler's queries, so only the pooled ones are computed
        x = visual.ln_post(attentional_pool(visual.attn_pool, kv, slice(0, 1) if tok else slice(None)))
        pooled = x[:, 0] if tok else x[:, 1:].mean(dim=1)
        return pooled @ visual.proj if visual.proj is not None else pooled

    def row_split(self, layer: int) -> RowSplit | None:
        """At the last block of a class-token tower, :func:`last_block_split`; at the ``head`` of
        CoCa's attentional pooler, its key and value projections are the row-wise part."""
        if layer == len(self.blocks) - 1 and self._single():
            return last_block_split(
                self.blocks[-1],
                lambda seq: None,
                lambda lengths, seq, dtype: None,
                lambda lengths, h: torch.zeros(h.shape[0], dtype=torch.long, device=h.device),
                lambda row: self._from_head(self._norm_before_pool(row[:, None])),
            )
        if layer == len(self.blocks) and self.visual.attn_pool is not None:
            pooler = self.visual.attn_pool
            return RowSplit(
                lambda x, positions: pool_keys_values(pooler, x), lambda kv, lengths: self._from_keys_values(kv)
            )
        return None


class TextTower(SplitTower):
    """open_clip's text transformer: a ``TextTransformer`` module or the tower built into ``CLIP``.

    Positions are the token ids. With CoCa's class token (``embed_cls``) the hidden state has
    one more row, the class token appended after the ids (labelled by :attr:`suffix`); its
    embedding depends on the padded length (the class token's position), so such inputs are
    padded to :attr:`context_length` and every row is attributed (:attr:`sees_padding`).

    Pooled row: ``argmax`` and ``eos`` pool the end token, taken as row ``lengths - 1`` (for
    open_clip's tokenisers the end token is the last real id; tested); ``first`` row 0;
    ``last`` and CoCa's class token the last row. A key mask (CoCa, ``use_pad_mask``) is also
    taken from ``lengths``: ids from ``lengths`` on are padding. open_clip masks ids equal to
    ``pad_id`` instead; the two differ only for a caption with ``pad_id`` among its real ids
    (CLIP's id 0 is "!"), where ``lower`` (the model's own ``_embeds``) and ``upper`` disagree.
    """

    suffix: tuple[str, ...]
    """Labels of hidden rows after the ids: ``("cls",)`` with CoCa's class token, else empty."""

    # measured with each image tower it is paired with (benchmarks/choose_defaults.py): the
    # image side asks for more nodes where a pair needs them
    default_method, default_n_steps = "gausslegendre", 2

    def __init__(self, source: TextTransformer | CLIP):
        """Wrap ``source``: a ``TextTransformer``, or a ``CLIP`` whose text tower is built in.

        Raises:
            UnsupportedModelError: pool_type 'none' (no single embedding) or an unsupported
                block (see :func:`check_blocks`).
        """
        self.source = source
        module = isinstance(source, TextTransformer)
        self.pool_type = source.pool_type if module else source.text_pool_type
        self.cls = getattr(source, "cls_emb", None) is not None
        if not self.cls and self.pool_type not in ("argmax", "eos", "first", "last"):
            raise UnsupportedModelError(
                f"text pool_type {self.pool_type!r} yields no single embedding; argmax, eos, first or last needed"
            )
        self.blocks = source.transformer.resblocks
        check_blocks(self.blocks, "text")
        self.key_masked = module and (source.use_pad_mask or self.cls)
        self.correct_cls_mask = module and source.correct_cls_mask
        self.context_length = source.context_length
        self.pad_id = source.pad_id if module else 0
        self.suffix = ("cls",) if self.cls else ()
        # Padding moves the embedding when nothing masks it (no causal and no key mask), when
        # the last (padding) row is pooled, and through the position of CoCa's class token.
        self.sees_padding = self.cls or self.pool_type == "last" or (source.attn_mask is None and not self.key_masked)
        projection = source.text_projection
        if projection is None:
            self.embed_dim = source.transformer.width
        elif isinstance(projection, torch.nn.Linear):
            self.embed_dim = projection.out_features
        else:
            self.embed_dim = projection.shape[1]
        self.layers = block_layers(len(self.blocks), head=False)  # every text pooling reads one row
        self.default_layer = len(self.blocks) - 1

    def _norm_before_pool(self) -> bool:
        """``ln_final`` on every row before pooling (it follows the pooling of CoCa's class token)."""
        return not self.cls

    def _pool_rows(self, lengths: torch.Tensor, seq: int) -> torch.Tensor:
        """(B,) the pooled row of each input of ``seq`` rows."""
        if self.cls or self.pool_type == "last":
            return torch.full_like(lengths, seq - 1)
        if self.pool_type == "first":
            return torch.zeros_like(lengths)
        return lengths - 1

    def _key_mask(self, lengths: torch.Tensor, seq: int, dtype: torch.dtype) -> torch.Tensor | None:
        """open_clip's padding (and class-token) key mask, from ``lengths``: (B, seq) additive, or None."""
        if not self.key_masked:
            return None
        ids = seq - 1 if self.cls else seq
        valid = torch.arange(ids, device=lengths.device)[None] < lengths[:, None]
        if self.cls:
            # open_clip's legacy mask (the default) shifts the validity by one position
            keep = valid.new_ones(valid.shape[0], 1)
            valid = torch.cat([valid, keep] if self.correct_cls_mask else [keep, valid], 1)
        return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, float("-inf"))

    def _causal_mask(self, seq: int) -> torch.Tensor | None:
        mask = self.source.attn_mask
        return None if mask is None else mask[:seq, :seq]

    def _embeds(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden state entering block 0 and the attention mask the model's blocks take."""
        source = self.source
        if isinstance(source, TextTransformer):
            x, mask = source._embeds(ids)
            # without a key mask open_clip passes its whole causal mask, fit for context-length inputs only
            return x, mask if mask is None or mask.dim() == 3 else mask[: x.shape[1], : x.shape[1]]
        cast = source.transformer.get_cast_dtype()
        x = source.token_embedding(ids).to(cast) + source.positional_embedding[: ids.shape[1]].to(cast)
        mask = self._causal_mask(ids.shape[1])
        return x, None if mask is None else mask.to(cast)

    def lower(self, inputs: torch.Tensor, layer: int, lengths: torch.Tensor) -> torch.Tensor:
        """f_lo with the model's own modules: (B, S, d), or (B, S + 1, d) with CoCa's class token."""
        x, mask = self._embeds(inputs)
        for block in self.blocks[:layer]:
            x = block(x, attn_mask=mask)
        if layer == len(self.blocks) and self._norm_before_pool():
            x = self.source.ln_final(x)
        return x

    def upper(self, hidden: torch.Tensor, layer: int, lengths: torch.Tensor) -> torch.Tensor:
        """f_hi: the blocks from ``layer``, pooling, ``ln_final`` and ``text_projection`` (see SplitTower)."""
        seq = hidden.shape[1]
        pool = self._pool_rows(lengths, seq)
        if layer < len(self.blocks):
            x = run_blocks(
                self.blocks,
                hidden,
                layer,
                attn_mask=self._causal_mask(seq),
                key_mask=self._key_mask(lengths, seq, hidden.dtype),
                last_rows=pool[:, None],
            )[:, 0]
            return self._head(x)
        x = select_rows(hidden, pool[:, None])[:, 0]
        if not self._norm_before_pool():
            x = self.source.ln_final(x)
        return self._project(x)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding from the last block's pooled rows (B, d): ``ln_final`` (row-wise, so the
        pooled row alone, before or after pooling alike) and the projection."""
        return self._project(self.source.ln_final(x))

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        projection = self.source.text_projection
        if projection is None:
            return x
        if isinstance(projection, torch.nn.Linear):
            return projection(x)
        return x @ projection

    def row_split(self, layer: int) -> RowSplit | None:
        """At the last block, :func:`last_block_split`: every text pooling reads one row."""
        if layer != len(self.blocks) - 1:
            return None
        return last_block_split(
            self.blocks[-1],
            self._causal_mask,
            self._key_mask,
            lambda lengths, h: self._pool_rows(lengths, h.shape[1]),
            self._head,
        )
