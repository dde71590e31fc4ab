"""Image towers that open_clip builds around a timm trunk (``open_clip.timm_model.TimmModel``).

``TimmModel.forward`` is ``head(trunk.forward_head(trunk.forward_features(x)))``: the trunk is a timm
model built with ``num_classes=0`` or the embedding width, and ``head`` is open_clip's projection
(linear, MLP, or none). The split f = f_hi o f_lo (method.md, "Beyond CLIP's ViT towers") is taken
inside ``forward_features``:

- transformer trunks (timm ``VisionTransformer``, including ViTamin and the hybrid conv-stem
  ``vit_base_mci``, and ``Eva``: EVA01/02, PE-Core): positions are the prefix tokens (``cls``,
  ``reg0``, ...) then the patch grid; layers are ``block i`` and ``head`` (the output of
  ``forward_features``, after the final norm: the pooling head's input);
- convolutional trunks (``ConvNeXt``, ``FastVit`` of MobileCLIP): positions are the cells of a
  stage's feature map in row-major order; layers are ``stages.i`` and ``head`` (after the last
  stage and ``norm_pre`` / ``final_conv``: the global pool's input).

Where the trunk pools its class token alone (EVA01/02, ``vit_large_patch14_clip``, ``vit_base_mci``),
nothing after the last block's attention mixes rows, so ``upper`` runs that block for the class row
only: its query attends over every row's keys and values, then its MLP and the final norm see one row.
:meth:`TimmTransformerTower.row_split` splits that block further (see :class:`_PooledLastBlock`).

``upper`` always ends with the trunk's own ``forward_head`` (token, average or MAP pooling, fc norm,
classifier-as-projection) and the TimmModel's head, so it returns exactly what
``CLIP.encode_image`` returns before normalisation. Building an adapter prepares the tower for
forward-mode AD in place: every module with a ``fused_attn`` switch (timm ``Attention``,
``AttentionRope``, ``AttentionPoolLatent``, Eva's attention, FastViT's attention) computes attention
explicitly, since the fused kernels have no forward-mode derivative; a FastViT trunk is
reparameterised into its inference form (each multi-branch MobileOne / RepMixer / conditional
position encoding block fused into single convolutions: the same function, fewer operations).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.timm_model import TimmModel
from timm.layers import Attention, AttentionPoolLatent, AttentionRope
from timm.layers.pos_embed_sincos import apply_rot_embed_cat
from timm.models.convnext import ConvNeXt
from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
from timm.models.fastvit import FastVit
from timm.models.vision_transformer import Block, VisionTransformer
from timm.utils import reparameterize_model

from ..split import Layer, PoolSplit, RowSplit, SplitTower, UnsupportedModelError


def timm_image_tower(visual: TimmModel) -> SplitTower:
    """The adapter for an open_clip ``TimmModel`` image tower, chosen by its trunk's class.

    Prepares ``visual`` in place for forward-mode AD (see the module docstring); ``visual`` should be
    in eval mode (a FastViT trunk's reparameterisation folds its batch-norm statistics).

    Raises:
        UnsupportedModelError: no adapter explains the trunk's class; the message names it.
    """
    trunk = visual.trunk
    if isinstance(trunk, (VisionTransformer, Eva)):
        return TimmTransformerTower(visual)
    if isinstance(trunk, (ConvNeXt, FastVit)):
        return TimmConvTower(visual)
    raise UnsupportedModelError(
        f"no adapter explains the image tower's timm trunk {type(trunk).__module__}.{type(trunk).__name__}"
    )


def disable_fused_attention(module: torch.nn.Module) -> None:
    """Make every submodule with a ``fused_attn`` switch compute attention explicitly (forward-mode AD
    has no rule for the fused scaled-dot-product kernels)."""
    for sub in module.modules():
        if hasattr(sub, "fused_attn"):
            sub.fused_attn = False


def _zero_image(visual: TimmModel) -> torch.Tensor:
    """A (1, 3, H, W) zero image at the tower's input size, dtype and device."""
    param = next(visual.parameters())
    return torch.zeros(1, 3, *visual.image_size, dtype=param.dtype, device=param.device)


class TimmTransformerTower(SplitTower):
    """A TimmModel whose trunk is a timm ``VisionTransformer`` or ``Eva``, split at a block or the head.

    Eva blocks take a rotary position embedding, which ``upper`` computes as
    ``Eva.forward_features`` does (per block where the rope is depth-dependent, "mixed").
    """

    def __init__(self, visual: TimmModel):
        trunk = visual.trunk
        disable_fused_attention(visual)
        self.visual, self.trunk = visual, trunk
        self.is_eva = isinstance(trunk, Eva)
        prefix = ("cls",) if trunk.cls_token is not None else ()
        if trunk.reg_token is not None:
            prefix += tuple(f"reg{i}" for i in range(trunk.reg_token.shape[1]))
        assert len(prefix) == trunk.num_prefix_tokens, (prefix, trunk.num_prefix_tokens)
        grid = tuple(trunk.patch_embed.grid_size)
        self.n_blocks = len(trunk.blocks)
        self.layers = tuple(Layer(f"block {i}", grid, prefix) for i in range(self.n_blocks))
        one_row = trunk.attn_pool is None and trunk.global_pool == "token"  # the class token's row alone
        if not one_row:
            self.layers += (Layer("head", grid, prefix),)
        last = trunk.blocks[-1]
        self.last = _PooledLastBlock(last, trunk.num_prefix_tokens) if one_row and _PooledLastBlock.fits(last) else None
        # the head's input where the pooling reads every row (MAP, average), else the last block's
        self.default_layer = len(self.layers) - 1
        # measured per pooling (benchmarks/choose_defaults.py): EVA02's last block (class
        # token), SigLIP's MAP head, ViTamin's average
        self.default_method = "gausslegendre"
        self.default_n_steps = 6 if one_row else 4 if trunk.global_pool == "map" else 3
        with torch.no_grad():
            self.embed_dim = visual(_zero_image(visual)).shape[-1]

    def _rope(self) -> torch.Tensor | None:
        """The rotary embedding Eva's blocks take, as ``Eva._pos_embed`` computes it for the model's
        own image size; None for a ViT or an Eva without rope."""
        rope = getattr(self.trunk, "rope", None) if self.is_eva else None
        if rope is None:
            return None
        if hasattr(rope, "feat_shape"):
            return rope.get_embed()
        return rope.get_embed(shape=self.trunk.patch_embed.grid_size)

    def _block_rope(self, rope: torch.Tensor | None, index: int) -> torch.Tensor | None:
        """Block ``index``'s rotary embedding: its own slice where the rope is depth-dependent ("mixed")."""
        return rope[index] if rope is not None and getattr(self.trunk, "rope_mixed", False) else rope

    def _blocks(self, x: torch.Tensor, start: int, stop: int, rope: torch.Tensor | None) -> torch.Tensor:
        for i in range(start, stop):
            block = self.trunk.blocks[i]
            x = block(x, rope=self._block_rope(rope, i)) if self.is_eva else block(x)
        return x

    def lower(self, inputs: torch.Tensor, layer: int, lengths: torch.Tensor) -> torch.Tensor:
        """The tokens entering ``layers[layer]`` (B, prefix + Gh * Gw, width); see SplitTower."""
        trunk = self.trunk
        x = trunk.patch_embed(inputs)
        if self.is_eva:
            x, rope = trunk._pos_embed(x)
        else:
            x, rope = trunk.patch_drop(trunk._pos_embed(x)), None
        x = self._blocks(trunk.norm_pre(x), 0, min(layer, self.n_blocks), rope)
        return trunk.norm(x) if layer == self.n_blocks else x

    def upper(self, hidden: torch.Tensor, layer: int, lengths: torch.Tensor) -> torch.Tensor:
        """The unnormalised embedding (B, D) from the tokens entering ``layers[layer]``; see SplitTower."""
        x = hidden
        if layer < self.n_blocks:
            rope = self._rope()
            if self.last is None:
                x = self.trunk.norm(self._blocks(x, layer, self.n_blocks, rope))
            else:
                x = self._blocks(x, layer, self.n_blocks - 1, rope)
                positions = torch.arange(x.shape[1], device=x.device).expand(x.shape[:2])
                return self._pooled(self.last.rows(x, positions, self._block_rope(rope, self.n_blocks - 1)), lengths)
        return self.visual.head(self.trunk.forward_head(x))

    def _pooled(self, rows: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The embedding from the last block's ``rows`` of every position: that block, the final norm and
        the head on the class row."""
        return self.visual.head(self.trunk.forward_head(self.trunk.norm(self.last.finish(rows))))

    def _class_row_split(self, rope: torch.Tensor | None) -> PoolSplit:
        """The last block for a pool that reads the class row: its query over row-wise keys and
        values, with the class row's own column taken densely."""
        last = self.last

        def rows(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return last.rows(x, positions, rope)

        def keys_values(x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return last.heads_of(rows(x, positions))[2:]

        def queries(hidden: torch.Tensor) -> torch.Tensor:
            first = torch.zeros((hidden.shape[0], 1), dtype=torch.long, device=hidden.device)
            return last.heads_of(rows(hidden[:, :1], first))[1] * last.attn.scale

        def tail(out: torch.Tensor, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            x = last.after_attention(out, hidden[:, :1])
            return self.visual.head(self.trunk.forward_head(self.trunk.norm(x)))

        return PoolSplit(keys_values, queries, 0, tail, query_rows=1, whole=RowSplit(rows, self._pooled))

    def row_split(self, layer: int) -> RowSplit | PoolSplit | None:
        """At the last block of a class-token-pooled trunk: the block's norm and query, key and value
        projections are row-wise, so a position's tangent moves one row of them, and the rest is one
        query's attention and one row's MLP (see :class:`_PooledLastBlock`). At ``head`` of an
        attention-pooled trunk (SigLIP, PE-Core): a :class:`PoolSplit`, the pool's fixed latent queries
        over row-wise keys and values, whose attention tangent is closed-form."""
        if layer == self.n_blocks - 1 and self.last is not None:
            return self._class_row_split(self._block_rope(self._rope(), layer))
        pool = self.trunk.attn_pool
        if layer != self.n_blocks or not isinstance(pool, AttentionPoolLatent):
            return None
        skip = 0 if self.is_eva or self.trunk.pool_include_prefix else self.trunk.num_prefix_tokens
        heads, head_dim, latents = pool.num_heads, pool.head_dim, pool.latent_len

        def keys_values(x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if pool.pos_embed is not None:  # the pool's own position embedding, over the pooled positions
                x = x + pool.pos_embed[positions - skip].to(x.dtype)
            k, v = pool.kv(x).reshape(*x.shape[:2], 2, heads, head_dim).unbind(2)
            return pool.k_norm(k), v

        latent = pool.q_norm(pool.q(pool.latent).reshape(latents, heads, head_dim).transpose(0, 1)).transpose(0, 1)

        def queries(hidden: torch.Tensor) -> torch.Tensor:
            return (latent * pool.scale).expand(hidden.shape[0], -1, -1, -1)

        def tail(out: torch.Tensor, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            x = pool.proj(out)
            if pool.mlp is not None:
                x = x + pool.mlp(pool.norm(x))
            pooled = x[:, 0] if pool.pool == "token" else x.mean(1) if pool.pool == "avg" else x
            trunk = self.trunk
            return self.visual.head(trunk.head(trunk.head_drop(trunk.fc_norm(pooled))))

        return PoolSplit(keys_values, queries, skip, tail)


class _PooledLastBlock:
    """A trunk's last transformer block, split for a pool that reads the class token (row 0) alone.

    ``rows`` is the block's row-wise start: each row's input with its query, key and value (after the
    q/k norms and, on Eva, the rotary embedding at the row's own position; prefix tokens take none).
    ``finish`` is the rest for the class row only: its query attends over every row's key and value,
    then the projection, residuals, and MLP run on that one row. The block's own modules do all but the
    attention product. Fits timm's pre-norm ``Block`` with ``Attention``, and Eva's pre- and post-norm
    blocks with ``EvaAttention`` or ``AttentionRope`` (fused or separate projections, grouped keys and
    values, gated output).
    """

    def __init__(self, block: torch.nn.Module, prefix: int):
        attn = block.attn
        self.block, self.attn, self.prefix = block, attn, prefix
        self.post_norm = isinstance(block, EvaBlockPostNorm)
        self.heads, self.kv_heads = attn.num_heads, getattr(attn, "num_kv_heads", attn.num_heads)
        self.sizes = [attn.proj.out_features, self.heads * attn.head_dim, *2 * [self.kv_heads * attn.head_dim]]

    @staticmethod
    def fits(block: torch.nn.Module) -> bool:
        """Whether ``block``'s forward is the one this class reproduces (exact types: a subclass may differ)."""
        vit = type(block) is Block and type(block.attn) is Attention
        eva = type(block) in (EvaBlock, EvaBlockPostNorm) and type(block.attn) in (EvaAttention, AttentionRope)
        return vit or eva

    def _attention_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.post_norm else self.block.norm1(x)

    def rows(self, x: torch.Tensor, positions: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
        """Each row's [input, query, key, value] (B, R, C + 3 * heads * head_dim, fewer with grouped keys).

        Args:
            x: (B, R, C) rows of the block's input.
            positions: (B, R) each row's index among all positions (prefix tokens first).
            rope: the block's rotary embedding over the grid positions, as Eva passes it; or None.
        """
        attn = self.attn
        h = self._attention_input(x)
        if attn.qkv is None:
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        else:
            q_bias = getattr(attn, "q_bias", None)
            if q_bias is None:
                qkv = attn.qkv(h)
            else:  # Eva keeps its (fixed zero) key bias apart from the weights
                bias = torch.cat((q_bias, attn.k_bias, attn.v_bias))
                qkv = attn.qkv(h) + bias if attn.qkv_bias_separate else F.linear(h, attn.qkv.weight, bias)
            q, k, v = qkv.unflatten(-1, (3, -1)).unbind(-2)
        q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))  # (B, R, heads, head_dim)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if rope is not None:
            # rope's table runs over the grid (its second-to-last dimension); each row takes its own entry
            table = rope.movedim(-2, 0)[(positions - self.prefix).clamp(min=0)]
            table = table.unsqueeze(-2) if rope.dim() == 2 else table
            on_grid = (positions >= self.prefix)[..., None, None]
            half = getattr(attn, "rotate_half", False)
            q = torch.where(on_grid, apply_rot_embed_cat(q, table, half=half), q).type_as(v)
            k = torch.where(on_grid, apply_rot_embed_cat(k, table, half=half), k).type_as(v)
        return torch.cat([x, q.flatten(2), k.flatten(2), v.flatten(2)], dim=-1)

    def heads_of(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`rows` as (input (B, R, C), q, k, v (B, R, heads, head_dim)), keys and values
        repeated to the query heads."""
        x, q, k, v = rows.split(self.sizes, dim=-1)
        q, k, v = (t.unflatten(-1, (-1, self.attn.head_dim)) for t in (q, k, v))
        if self.kv_heads != self.heads:
            k, v = (t.repeat_interleave(self.heads // self.kv_heads, dim=2) for t in (k, v))
        return x, q, k, v

    def finish(self, rows: torch.Tensor) -> torch.Tensor:
        """The block's output on the class row (B, 1, C) from :meth:`rows` of every position (B, S, .)."""
        x, q, k, v = self.heads_of(rows)
        # one query: products and sums in the rows' own layout, where matmuls would copy transposed
        # (and, under vmap, mostly zero) key and value tangents
        weights = ((q[:, :1] * self.attn.scale) * k).sum(-1, keepdim=True).softmax(dim=1)  # (B, S, heads, 1)
        return self.after_attention((weights * v).sum(1, keepdim=True).flatten(2), x[:, :1])

    def after_attention(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The block's output on the class row (B, 1, C) from its attention output (B, 1, heads *
        head_dim) and its input row ``x`` (B, 1, C)."""
        attn, block = self.attn, self.block
        out = attn.norm(out)
        if getattr(attn, "gate", None) is not None:
            out = out * attn.gate(self._attention_input(x)).sigmoid()
        out = attn.proj(out)
        if self.post_norm:
            x = x + block.norm1(out)
            return x + block.norm2(block.mlp(x))
        if isinstance(block, Block):
            x = x + block.ls1(out)
            return x + block.ls2(block.mlp(block.norm2(x)))
        x = x + (out if block.gamma_1 is None else block.gamma_1 * out)
        out = block.mlp(block.norm2(x))
        return x + (out if block.gamma_2 is None else block.gamma_2 * out)


class TimmConvTower(SplitTower):
    """A TimmModel whose trunk is a timm ``ConvNeXt`` or ``FastVit``, split at a stage or the head.

    A feature map (B, C, H, W) is presented as (B, H * W, C), row-major; each layer's grid is its
    map's (H, W) at the model's image size, found by running a zero image once.
    """

    def __init__(self, visual: TimmModel):
        trunk = visual.trunk
        if isinstance(trunk, FastVit):
            reparameterize_model(trunk, inplace=True)
        disable_fused_attention(visual)
        self.visual, self.trunk = visual, trunk
        # What follows the last stage before the pool: ConvNeXt's norm_pre (usually an identity),
        # FastViT's final MobileOne conv.
        self.finish = trunk.final_conv if isinstance(trunk, FastVit) else trunk.norm_pre
        self.n_stages = len(trunk.stages)
        grids, widths = [], []
        with torch.no_grad():
            x = trunk.stem(_zero_image(visual))
            for stage in trunk.stages:
                grids.append(tuple(x.shape[-2:]))
                widths.append(x.shape[1])
                x = stage(x)
            x = self.finish(x)
            grids.append(tuple(x.shape[-2:]))
            widths.append(x.shape[1])
            self.embed_dim = self.visual.head(trunk.forward_head(x)).shape[-1]
        self.widths = tuple(widths)
        self.layers = tuple(Layer(f"stages.{i}", grids[i]) for i in range(self.n_stages)) + (Layer("head", grids[-1]),)
        self.default_layer = self.n_stages  # the head's input: the pooling averages every cell
        # measured on MobileCLIP-S1 (benchmarks/choose_defaults.py; ConvNeXt's random weights
        # leave the yardstick uninformative, docs/benchmarks.md)
        self.default_method, self.default_n_steps = "gausslegendre", 2

    def lower(self, inputs: torch.Tensor, layer: int, lengths: torch.Tensor) -> torch.Tensor:
        """The feature map entering ``layers[layer]`` as (B, H * W, C), row-major; see SplitTower."""
        x = self.trunk.stem(inputs)
        for stage in self.trunk.stages[:layer]:
            x = stage(x)
        if layer == self.n_stages:
            x = self.finish(x)
        return x.flatten(2).transpose(1, 2)

    def upper(self, hidden: torch.Tensor, layer: int, lengths: torch.Tensor) -> torch.Tensor:
        """The unnormalised embedding (B, D) from the cells (B, H * W, C) entering ``layers[layer]``."""
        height, width = self.layers[layer].grid
        x = hidden.transpose(1, 2).reshape(hidden.shape[0], self.widths[layer], height, width)
        if layer < self.n_stages:
            for stage in self.trunk.stages[layer:]:
                x = stage(x)
            x = self.finish(x)
        return self.visual.head(self.trunk.forward_head(x))
