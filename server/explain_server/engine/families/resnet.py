"""OpenAI's ResNet image towers (open_clip ``ModifiedResNet``: RN50, RN101, RN50x4, RN50x16, RN50x64).

The tower is a three-convolution stem with an average pool, four stages of Bottleneck blocks
(BatchNorm, so the model must be in eval mode, where each image is normalised on its own), and
an attention pool: the mean of the final feature map's cells is prepended as a query token,
a positional embedding is added, and one multi-head attention row from that token, projected
by ``c_proj``, is the embedding.

Positions are the cells of a stage's feature map (B, C, H, W), presented as (B, H * W, C) in
row-major order (method.md, "Beyond CLIP's ViT towers"); there are no prefix tokens. Layer
``layerN`` is the input of stage N, as in exclip's ``OpenAIExplainer`` (which hooks the
input of ``visual.layerN``); ``attnpool`` is the attention pool's input, stage 4's output.
"""

from __future__ import annotations

import math

import torch
from open_clip.modified_resnet import AttentionPool2d, ModifiedResNet

from ..split import Layer, RowSplit, SplitTower, UnsupportedModelError

STAGES = ("layer1", "layer2", "layer3", "layer4")


def _attend(pool: AttentionPool2d, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The mean token's attention row and ``c_proj``, from the tokens ``x`` (B, 1 + H * W, C) with
    the positional embedding added, and their key and value projections."""
    batch, _, width = x.shape
    heads = pool.num_heads
    head_dim = width // heads
    q = pool.q_proj(x[:, :1]).view(batch, 1, heads, head_dim).transpose(1, 2)
    k = k.view(batch, -1, heads, head_dim).transpose(1, 2)
    v = v.view(batch, -1, heads, head_dim).transpose(1, 2)
    weights = ((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(head_dim))).softmax(dim=-1)
    return pool.c_proj((weights @ v).reshape(batch, width))


def attention_pool(pool: AttentionPool2d, cells: torch.Tensor) -> torch.Tensor:
    """``pool``'s output from the final feature map's cells, with explicit attention.

    ``AttentionPool2d`` calls ``F.multi_head_attention_forward``, whose fused kernels break
    ``torch.func.jvp``; this computes the same attention, and only the query row it returns
    (the mean token's).

    Args:
        pool: the attention pool whose parameters are used.
        cells: (B, H * W, C), row-major, in the pool's dtype.

    Returns:
        (B, output_dim).
    """
    x = torch.cat([cells.mean(dim=1, keepdim=True), cells], dim=1) + pool.positional_embedding.to(cells.dtype)
    return _attend(pool, x, pool.k_proj(x), pool.v_proj(x))


class ResNetImageTower(SplitTower):
    """The image tower of an open_clip CLIP built on ``ModifiedResNet``, split at a stage's input.

    Layers, by index: ``layer1`` .. ``layer4`` (the input of each stage; ``layer1``'s is the
    stem's output) and ``attnpool`` (stage 4's output). Each layer's grid is its feature map's
    (H, W): the input size / 4, / 4, / 8, / 16 and / 32.
    """

    def __init__(self, visual: ModifiedResNet):
        """Wrap ``visual``, which must be in eval mode when explained (BatchNorm's running statistics).

        Raises:
            UnsupportedModelError: ``visual`` is not open_clip's ModifiedResNet with its AttentionPool2d.
        """
        if type(visual) is not ModifiedResNet:
            raise UnsupportedModelError(f"image tower {type(visual).__name__} is not open_clip's ModifiedResNet")
        if type(visual.attnpool) is not AttentionPool2d:
            raise UnsupportedModelError(
                f"ModifiedResNet pools with {type(visual.attnpool).__name__}; only AttentionPool2d is supported"
            )
        self.visual = visual
        self.stages = tuple(getattr(visual, name) for name in STAGES)
        size = visual.image_size
        height, width = (size, size) if isinstance(size, int) else size
        # the stem halves twice; stages 2-4 each halve once (ModifiedResNet._make_layer)
        divisors = (4, 4, 8, 16, 32)
        self.layers = tuple(
            Layer(name, grid=(height // divisor, width // divisor))
            for name, divisor in zip((*STAGES, "attnpool"), divisors)
        )
        # the pool's input: a cell's tangent moves one key and value row there (row_split); the path
        # is nearly linear, so one Gauss-Legendre node beats riemann_left at 50 (docs/benchmarks.md)
        self.default_layer = len(STAGES)
        self.default_method, self.default_n_steps = "gausslegendre", 1
        self.embed_dim = int(visual.output_dim)

    def lower(self, inputs: torch.Tensor, layer: int, lengths: torch.Tensor) -> torch.Tensor:
        """The feature map entering ``layers[layer]``, its cells as rows: (B, H * W, C). ``lengths`` is ignored."""
        x = self.visual.stem(inputs)
        for stage in self.stages[:layer]:
            x = stage(x)
        return x.flatten(2).transpose(1, 2)

    def upper(self, hidden: torch.Tensor, layer: int, lengths: torch.Tensor) -> torch.Tensor:
        """The unnormalised embedding (B, D), as ``CLIP.encode_image``, from the cells (B, H * W, C)
        entering ``layers[layer]``. ``lengths`` is ignored.

        The stages run as the model's own modules: their in-place additions and ReLUs act on
        their own intermediates only, never on ``hidden``, which torch.func's transforms allow.
        """
        if layer == len(self.stages):
            return attention_pool(self.visual.attnpool, hidden)
        height, width = self.layers[layer].grid
        x = hidden.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[2], height, width)
        for stage in self.stages[layer:]:
            x = stage(x)
        return attention_pool(self.visual.attnpool, x.flatten(2).transpose(1, 2))

    def row_split(self, layer: int) -> RowSplit | None:
        """At ``attnpool``: each cell's key and value projections are row-wise; the query (from the
        cells' mean) and the attention take the rest."""
        if layer != len(self.stages):
            return None
        pool = self.visual.attnpool

        def rows(cells: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            x = cells + pool.positional_embedding[positions + 1].to(cells.dtype)  # row 0 is the mean token's
            return torch.cat([cells, pool.k_proj(x), pool.v_proj(x)], dim=-1)

        def rest(projected: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            cells, k, v = projected.chunk(3, dim=-1)
            mean = cells.mean(dim=1, keepdim=True) + pool.positional_embedding[:1].to(cells.dtype)
            x = torch.cat([mean, cells], dim=1)  # only the mean token's row is read below
            return _attend(pool, x, torch.cat([pool.k_proj(mean), k], dim=1), torch.cat([pool.v_proj(mean), v], dim=1))

        return RowSplit(rows, rest)
