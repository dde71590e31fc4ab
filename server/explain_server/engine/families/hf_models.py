"""Hugging Face transformers' CLIPModel, SiglipModel and Siglip2Model, split at any block (method.md).

Both halves run the model's own modules (embeddings, encoder layers, norms, projections). The
model must use explicit attention: the fused scaled-dot-product kernels break
``torch.func.jvp``. transformers' ``"eager"`` implementation is explicit but takes the softmax
in float32 whatever the model's dtype, which limits a float64 model's derivatives to float32
precision; :data:`ATTENTION` (registered with transformers on import) is the same function
with the softmax in float32 or the model's dtype if wider, so it computes exactly what
``"eager"`` does in float32, float16 and bfloat16. Load models with
``attn_implementation=ATTENTION`` (``"eager"`` is accepted too). SigLIP's attention-pooling
head is an ``nn.MultiheadAttention``, whose fast path breaks forward-mode AD too, so its
attention is written out here from the module's own weights.

Towers and their layers (``block i`` = the input of encoder layer i; ``head`` = the input of
the pooling, after the encoder's last layer and the row-wise final layer norm):

- CLIP text (``CLIPTextTransformer``): causal; pooled at the end token, which is each input's
  last id (``lengths - 1``); then ``text_projection``. Positions after the end token cannot
  move the embedding (``sees_padding`` False).
- CLIP vision: class token first (prefix ``cls``), ``pre_layrnorm`` before block 0; pooled at
  the class token, ``post_layernorm``, ``visual_projection``.
- SigLIP / SigLIP2 text: non-causal and unmasked, inputs padded to the context length (64 in
  Google's checkpoints) and pooled at the last position, padding or not; then the ``head``
  Linear. Every position moves the embedding (``sees_padding`` True).
- SigLIP vision: no prefix tokens; pooled by the multihead attention-pooling (MAP) head.
- SigLIP2 vision: as SigLIP, but it takes flattened patches with their grid
  (``spatial_shapes``) and a mask of valid patches, so that images keep their aspect ratio
  (NaFlex). This adapter serves the fixed-resolution case only: a square input of ``grid``
  patches per side, every patch valid. The pixels arrive as an image (B, 3, H, W) and are cut
  into patches as ``Siglip2ImageProcessor`` does.

``upper`` returns what ``get_text_features`` / ``get_image_features`` return (their
``pooler_output``), before any normalisation.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, CLIPModel, PreTrainedModel, SiglipModel
from transformers.masking_utils import AttentionMaskInterface, create_causal_mask, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches
from transformers.models.siglip2.modeling_siglip2 import Siglip2Model

from ..split import Layer, RowSplit, SplitTower, UnsupportedModelError

MODELS = (CLIPModel, SiglipModel, Siglip2Model)
"""The dual encoders this module adapts."""

ATTENTION = "explain_eager"
"""The attention implementation to load models with: transformers' eager attention, softmax in
float32 or wider."""


def eager_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``eager_attention_forward`` (CLIP, SigLIP), the softmax in float32 or in the
    inputs' dtype if wider. Queries, keys, values (B, H, S, e); returns the output (B, S, H, e)
    and the attention weights (B, H, S, S)."""
    weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = weights.softmax(dim=-1, dtype=torch.promote_types(query.dtype, torch.float32)).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


AttentionInterface.register(ATTENTION, eager_attention)
AttentionMaskInterface.register(ATTENTION, eager_mask)


def _check_attention(model: PreTrainedModel) -> None:
    implementation = model.config._attn_implementation
    if implementation not in (ATTENTION, "eager"):
        raise UnsupportedModelError(
            f"{type(model).__name__} uses the {implementation!r} attention implementation; forward-mode AD needs "
            f"explicit attention: load it with attn_implementation={ATTENTION!r} (or 'eager')"
        )


def _block_layers(
    count: int, grid: tuple[int, int] | None = None, prefix: tuple[str, ...] = (), head: bool = True
) -> tuple[Layer, ...]:
    """The blocks, then ``head`` only where the pooling reads every position (SigLIP's MAP head)."""
    blocks = tuple(Layer(f"block {i}", grid, prefix) for i in range(count))
    return blocks + (Layer("head", grid, prefix),) if head else blocks


def _rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Row ``rows[b]`` of each ``x[b]``: (B, S, d), (B,) int64 -> (B, d)."""
    return x.gather(1, rows[:, None, None].expand(-1, 1, x.shape[-1]))[:, 0]


def _layer_start(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The row-wise start of a CLIP / SigLIP encoder layer: (B, R, d) -> (B, R, 4d), each row's
    input beside the query, key and value projections of its ``layer_norm1``."""
    y = layer.layer_norm1(x)
    attention = layer.self_attn
    return torch.cat([x, attention.q_proj(y), attention.k_proj(y), attention.v_proj(y)], dim=-1)


def _layer_rest(
    layer: torch.nn.Module, start: torch.Tensor, rows: torch.Tensor | None, mask: torch.Tensor | None
) -> torch.Tensor:
    """A CLIP / SigLIP encoder layer from its row-wise start (B, S, 4d), for the query ``rows``
    (B, Q) int64 only (None: all S), with the layer's own modules and attention function.

    Args:
        mask: the model's additive attention mask (B or 1, 1, S, S), or None.

    Returns:
        (B, Q, d), the layer's output rows.
    """
    attention = layer.self_attn
    x, q, k, v = start.split(start.shape[-1] // 4, dim=-1)
    batch = x.shape[0]
    if rows is not None:
        x, q = _select(x, rows), _select(q, rows)
        if mask is not None:
            mask = torch.take_along_dim(mask.expand(batch, -1, -1, -1), rows[:, None, :, None], dim=2)
    queries = q.shape[1]

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, -1, attention.num_heads, attention.head_dim).transpose(1, 2)

    function = ALL_ATTENTION_FUNCTIONS.get_interface(
        attention.config._attn_implementation, sys.modules[type(attention).__module__].eager_attention_forward
    )
    out = function(attention, heads(q), heads(k), heads(v), mask, scaling=attention.scale, dropout=0.0)[0]
    x = x + attention.out_proj(out.reshape(batch, queries, -1))
    return x + layer.mlp(layer.layer_norm2(x))


def _select(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows[b]`` of each ``x[b]``: (B, S, d), (B, Q) int64 -> (B, Q, d)."""
    return x.gather(1, rows[..., None].expand(*rows.shape, x.shape[-1]))


class HFTextTower(SplitTower):
    """The text tower of a CLIPModel, SiglipModel or Siglip2Model.

    Args:
        text_model: ``model.text_model`` (embeddings, encoder, final_layer_norm).
        projection: the Linear from the pooled row to the embedding: ``model.text_projection``
            for CLIP, ``text_model.head`` for SigLIP.
        causal: CLIP's causal mask, pooled at each input's end token; else SigLIP's unmasked
            tower pooled at the last position.
        pad_id: the tokenizer's padding id.
    """

    def __init__(self, text_model: torch.nn.Module, projection: torch.nn.Linear, *, causal: bool, pad_id: int):
        self.config = text_model.config
        self.embeddings = text_model.embeddings
        self.blocks = text_model.encoder.layers
        self.final_norm = text_model.final_layer_norm
        self.projection = projection
        self.causal = causal
        self.sees_padding = not causal
        self.context_length = int(self.config.max_position_embeddings)
        self.pad_id = int(pad_id)
        self.embed_dim = int(projection.out_features)
        self.layers = _block_layers(len(self.blocks), head=False)  # pooled at one row: end token or last
        self.default_layer = len(self.blocks) - 1

    def _mask(self, hidden: torch.Tensor) -> torch.Tensor | None:
        if not self.causal:
            return None
        # only the shape, dtype and device matter; a plain tensor keeps vmap's batching out of the mask
        shape = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        return create_causal_mask(config=self.config, inputs_embeds=shape, attention_mask=None, cache=None)

    def lower(self, inputs: torch.Tensor, layer: int, lengths: torch.Tensor) -> torch.Tensor:
        """f_lo: token embeddings and positions, then encoder layers before ``layer``; the final
        layer norm too at ``head``. See :meth:`SplitTower.lower`."""
        x = self.embeddings(input_ids=inputs)
        mask = self._mask(x)
        for block in self.blocks[:layer]:
            x = block(x, mask)
        return self.final_norm(x) if layer == len(self.blocks) else x

    def upper(self, hidden: torch.Tensor, layer: int, lengths: torch.Tensor) -> torch.Tensor:
        """f_hi: the remaining encoder layers, final layer norm, pooled row, projection.

        The pooled row is each input's ``lengths - 1`` (its end token) for CLIP, the last of
        the S positions for SigLIP; the last layer computes that row alone. See
        :meth:`SplitTower.upper`.
        """
        x = hidden
        if layer < len(self.blocks):
            mask = self._mask(x)
            for block in self.blocks[layer:-1]:
                x = block(x, mask)
            return self._rest(_layer_start(self.blocks[-1], x), lengths)
        return self.projection(_rows(x, self._pooled(lengths, x.shape[1])))

    def _pooled(self, lengths: torch.Tensor, seq: int) -> torch.Tensor:
        """(B,) int64, each input's pooled row."""
        return lengths - 1 if self.causal else torch.full_like(lengths, seq - 1)

    def _rest(self, start: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The embedding from the last layer's row-wise start (B, S, 4d): the pooled row through
        the layer, the final layer norm (row-wise) and the projection."""
        rows = self._pooled(lengths, start.shape[1])[:, None]
        return self.projection(self.final_norm(_layer_rest(self.blocks[-1], start, rows, self._mask(start))[:, 0]))

    def row_split(self, layer: int) -> RowSplit | None:
        """At the last layer: its row-wise start, then the pooled row alone (see :meth:`upper`)."""
        if layer != len(self.blocks) - 1:
            return None
        return RowSplit(lambda x, positions: _layer_start(self.blocks[-1], x), self._rest)


class HFImageTower(SplitTower):
    """The vision tower of a CLIPModel (class token), SiglipModel or Siglip2Model (MAP head).

    Args:
        model: the dual encoder.
        grid: Siglip2Model only: patches per side of the fixed-resolution input; default the
            side of its position-embedding grid (where resizing those embeddings is the identity).

    Raises:
        UnsupportedModelError: a SigLIP vision tower without its pooling head, or a head whose
            attention does not pack q, k and v into one projection.
    """

    def __init__(self, model: PreTrainedModel, grid: int | None = None):
        vision = model.vision_model
        config = vision.config
        self.embeddings = vision.embeddings
        self.blocks = vision.encoder.layers
        self.patch = int(config.patch_size)
        self.clip = isinstance(model, CLIPModel)
        self.naflex = isinstance(model, Siglip2Model)
        if self.clip:
            self.pre_norm = vision.pre_layrnorm
            self.final_norm = vision.post_layernorm
            self.projection = model.visual_projection
            self.embed_dim = int(model.visual_projection.out_features)
            side = int(config.image_size) // self.patch
            prefix = ("cls",)
        else:
            if not getattr(vision, "use_head", False):
                raise UnsupportedModelError(
                    f"{type(model).__name__}: the vision tower has no pooling head (vision_use_head=False), "
                    "so it has no image embedding"
                )
            self.final_norm = vision.post_layernorm
            self.head = vision.head
            if not self.head.attention._qkv_same_embed_dim:
                raise UnsupportedModelError(f"{type(model).__name__}: the pooling head's q, k, v must share a width")
            self.embed_dim = int(config.hidden_size)
            if self.naflex:
                side = grid if grid is not None else int(config.num_patches**0.5)
            else:
                side = int(config.image_size) // self.patch
            prefix = ()
        self.grid = (side, side)
        self.image_size = (side * self.patch, side * self.patch)
        self.layers = _block_layers(len(self.blocks), self.grid, prefix, head=not prefix)  # MAP, not a class token
        # SigLIP's MAP head reads every row: its input; CLIP's class token is one row
        self.default_layer = len(self.blocks) if not prefix else len(self.blocks) - 1
        # SigLIP's MAP head as measured on open_clip's ViT-B-16-SigLIP (the same architecture);
        # CLIP: the service default
        if not self.clip:
            self.default_method, self.default_n_steps = "gausslegendre", 4

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """The hidden state entering block 0 from normalised pixels (B, 3, H, W)."""
        if not self.naflex:
            x = self.embeddings(pixels)
            return self.pre_norm(x) if self.clip else x
        patches = torch.stack([convert_image_to_patches(image, self.patch) for image in pixels])
        return self.embeddings(patches, self.spatial_shapes(len(pixels), pixels.device))

    def spatial_shapes(self, batch: int, device: torch.device) -> torch.Tensor:
        """SigLIP2's ``spatial_shapes`` for ``batch`` fixed-resolution inputs: (B, 2) int64."""
        return torch.tensor([self.grid], dtype=torch.long, device=device).expand(batch, 2)

    def lower(self, inputs: torch.Tensor, layer: int, lengths: torch.Tensor) -> torch.Tensor:
        """f_lo: patch (and class) embeddings, then encoder layers before ``layer``; the final
        layer norm too at ``head``. See :meth:`SplitTower.lower`."""
        x = self.embed(inputs)
        for block in self.blocks[:layer]:
            x = block(x, None)
        return self.final_norm(x) if layer == len(self.blocks) else x

    def upper(self, hidden: torch.Tensor, layer: int, lengths: torch.Tensor) -> torch.Tensor:
        """f_hi: the remaining encoder layers, final layer norm and pooling (CLIP: class token
        and projection, the last layer computing the class token alone; SigLIP: the MAP head).
        See :meth:`SplitTower.upper`."""
        x = hidden
        if layer == len(self.blocks):
            return self._from_head(x)
        for block in self.blocks[layer:-1]:
            x = block(x, None)
        return self._rest(_layer_start(self.blocks[-1], x))

    def _rest(self, start: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """The embedding from the last layer's row-wise start (B, S, 4d)."""
        if self.clip:
            rows = torch.zeros(start.shape[0], 1, dtype=torch.long, device=start.device)
            # the layer norm is row-wise: norming the class token alone is what CLIP computes
            return self.projection(self.final_norm(_layer_rest(self.blocks[-1], start, rows, None)[:, 0]))
        return self._from_head(self.final_norm(_layer_rest(self.blocks[-1], start, None, None)))

    def _from_head(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding from the ``head`` layer's hidden state (B, S, d)."""
        if self.clip:
            return self.projection(x[:, 0])
        return attention_pool(self.head, head_keys_values(self.head, x))

    def row_split(self, layer: int) -> RowSplit | None:
        """At the last layer: its row-wise start (CLIP: then the class token alone); at SigLIP's
        ``head``: the MAP head's key and value projections."""
        if layer == len(self.blocks) - 1:
            return RowSplit(lambda x, positions: _layer_start(self.blocks[-1], x), self._rest)
        if layer == len(self.blocks):
            return RowSplit(
                lambda x, positions: head_keys_values(self.head, x), lambda kv, lengths: attention_pool(self.head, kv)
            )
        return None


def head_keys_values(head: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The row-wise start of SigLIP's ``MultiheadAttentionPoolingHead``: keys and values
    (B, R, 2d) of hidden states (B, R, d), from its ``nn.MultiheadAttention``'s weights."""
    attention = head.attention
    width = attention.embed_dim
    bias = attention.in_proj_bias[width:] if attention.in_proj_bias is not None else None
    return F.linear(x, attention.in_proj_weight[width:], bias)


def attention_pool(head: torch.nn.Module, kv: torch.Tensor) -> torch.Tensor:
    """SigLIP's ``MultiheadAttentionPoolingHead`` from its keys and values (B, S, 2d) -> (B, d).

    The learned probe attends to every position through the head's ``nn.MultiheadAttention``
    weights, written out (its fused fast path breaks forward-mode AD); then the residual MLP
    on the pooled row, with the head's own modules. No key mask: every patch is valid.
    """
    attention = head.attention
    batch, seq, _ = kv.shape
    width = attention.embed_dim
    heads = attention.num_heads
    head_dim = width // heads
    bias = attention.in_proj_bias[:width] if attention.in_proj_bias is not None else None
    q = F.linear(head.probe, attention.in_proj_weight[:width], bias).view(1, 1, heads, head_dim).transpose(1, 2)
    k, v = (part.reshape(batch, seq, heads, head_dim).transpose(1, 2) for part in kv.chunk(2, dim=-1))
    weights = ((q @ k.transpose(-2, -1)) * head_dim**-0.5).softmax(dim=-1)
    pooled = attention.out_proj((weights @ v).transpose(1, 2).reshape(batch, 1, width))
    return (pooled + head.mlp(head.layernorm(pooled)))[:, 0]


def text_tower(model: PreTrainedModel, pad_id: int | None = None) -> HFTextTower:
    """The text tower's adapter; ``pad_id`` defaults to the text config's ``pad_token_id``.

    Raises:
        UnsupportedModelError: not one of :data:`MODELS`, or not explicit attention.
    """
    _check_model(model)
    text = model.text_model
    pad = pad_id if pad_id is not None else text.config.pad_token_id
    if isinstance(model, CLIPModel):
        return HFTextTower(text, model.text_projection, causal=True, pad_id=pad if pad is not None else 0)
    return HFTextTower(text, text.head, causal=False, pad_id=pad if pad is not None else 0)


def image_tower(model: PreTrainedModel, grid: int | None = None) -> HFImageTower:
    """The image tower's adapter; ``grid`` as for :class:`HFImageTower`.

    Raises:
        UnsupportedModelError: not one of :data:`MODELS`, not explicit attention, or no pooling head.
    """
    _check_model(model)
    return HFImageTower(model, grid)


def _check_model(model: PreTrainedModel) -> None:
    if not isinstance(model, MODELS):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a dual encoder this server explains from transformers; "
            f"supported: {', '.join(cls.__name__ for cls in MODELS)}"
        )
    _check_attention(model)
