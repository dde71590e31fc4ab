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
from open_clip.timm_model import TimmModel
from timm.models.convnext import ConvNeXt
from timm.models.eva import Eva
from timm.models.fastvit import FastVit
from timm.models.vision_transformer import VisionTransformer
from timm.utils import reparameterize_model

from ..split import Layer, SplitTower, UnsupportedModelError


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
        self.layers = tuple(Layer(f"block {i}", grid, prefix) for i in range(self.n_blocks)) + (
            Layer("head", grid, prefix),
        )
        self.default_layer = self.n_blocks - 1
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

    def _blocks(self, x: torch.Tensor, start: int, stop: int, rope: torch.Tensor | None) -> torch.Tensor:
        for i in range(start, stop):
            block = self.trunk.blocks[i]
            if not self.is_eva:
                x = block(x)
            elif getattr(self.trunk, "rope_mixed", False) and rope is not None:
                x = block(x, rope=rope[i])
            else:
                x = block(x, rope=rope)
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
            x = self.trunk.norm(self._blocks(x, layer, self.n_blocks, self._rope()))
        return self.visual.head(self.trunk.forward_head(x))


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
        self.default_layer = self.n_stages - 1

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
