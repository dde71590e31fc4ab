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

from ..split import Layer, SplitTower, UnsupportedModelError

STAGES = ("layer1", "layer2", "layer3", "layer4")


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
    batch, _, width = cells.shape
    heads = pool.num_heads
    head_dim = width // heads
    x = torch.cat([cells.mean(dim=1, keepdim=True), cells], dim=1) + pool.positional_embedding.to(cells.dtype)
    q = pool.q_proj(x[:, :1]).view(batch, 1, heads, head_dim).transpose(1, 2)
    k = pool.k_proj(x).view(batch, -1, heads, head_dim).transpose(1, 2)
    v = pool.v_proj(x).view(batch, -1, heads, head_dim).transpose(1, 2)
    weights = ((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(head_dim))).softmax(dim=-1)
    return pool.c_proj((weights @ v).reshape(batch, width))


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
        self.default_layer = STAGES.index("layer4")
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
