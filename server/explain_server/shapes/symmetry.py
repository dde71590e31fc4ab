"""Tie the image tower's weights so that it commutes with mirrors and quarter turns of the image.

The scenes' captions say nothing a mirror or a quarter turn changes (no positions, and a
triangle's turn is not named), so the image tower loses nothing by being invariant to the eight
symmetries of the square (the dihedral group D4). Two parameters break that symmetry in a ViT:

- the patch embedding ``visual.conv1``: a mirrored patch meets a mirrored kernel only if every
  kernel equals its own mirror images, so each kernel is the mean of its eight images;
- the positional embedding of the patches: a patch must get the same one as every cell a symmetry
  maps it to, so each is the mean over its cell's orbit (10 orbits on an 8x8 grid); the class
  token's is free.

With both tied, the tower maps a transformed image's patch tokens to the same transform of the
original's, block after block (attention and MLPs act on each token alike), and its pooled class
token is unchanged; so an explanation's heatmap over the grid moves exactly as the image does, up
to floating-point rounding. The tying is a ``torch.nn.utils.parametrize`` parametrisation during
training; :func:`untie` bakes it into plain open_clip weights that any loader reads.
"""

from __future__ import annotations

import math

import torch
from torch.nn.utils import parametrize


def dihedral_images(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 images of ``x`` under the symmetries of the square acting on its last two dimensions:
    quarter turns 0-3 (``torch.rot90``), then each of them mirrored (``flip(-1)``).

    Args:
        x: (..., n, n) tensor.

    Returns:
        8 tensors shaped like ``x``.
    """
    turns = [torch.rot90(x, k, dims=(-2, -1)) for k in range(4)]
    return turns + [t.flip(-1) for t in turns]


def dihedral_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of :func:`dihedral_images` of ``x``: same shape and dtype, invariant under mirrors and
    quarter turns of its last two dimensions up to rounding (each member of an orbit sums the
    same 8 values in a different order)."""
    return torch.stack(dihedral_images(x)).mean(0)


class SymmetricKernels(torch.nn.Module):
    """Parametrisation of a conv weight (D, C, p, p): each kernel is the mean of its 8 images."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """(D, C, p, p) -> (D, C, p, p), each kernel invariant under mirrors and quarter turns."""
        return dihedral_mean(weight)


class OrbitPositions(torch.nn.Module):
    """Parametrisation of a ViT positional embedding (1 + g * g, D) with the class token first:
    each patch's row is the mean over the rows of the cells its grid cell's orbit holds."""

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """(1 + g * g, D) -> same, patch rows tied across each D4 orbit of the g x g grid."""
        cls, patches = positions[:1], positions[1:]
        side = math.isqrt(len(patches))
        grid = patches.T.reshape(-1, side, side)  # (D, g, g)
        return torch.cat([cls, dihedral_mean(grid).reshape(len(grid), -1).T])


def tie(model) -> None:
    """Register both parametrisations on an open_clip ``CLIP`` model's image tower, in place.

    Raises:
        ValueError: the patch grid or the patches are not square.
    """
    visual = model.visual
    grid_h, grid_w = visual.grid_size
    if grid_h != grid_w or visual.conv1.weight.shape[-1] != visual.conv1.weight.shape[-2]:
        raise ValueError(f"a dihedral tie needs square patches and grid; got grid {visual.grid_size}")
    parametrize.register_parametrization(visual.conv1, "weight", SymmetricKernels())
    parametrize.register_parametrization(visual, "positional_embedding", OrbitPositions())


def plain_state_dict(model) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with each parametrised tensor under its plain name and current value,
    as :func:`untie` would leave it, without changing ``model`` (for checkpoints during training)."""
    state = model.state_dict()
    for prefix, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for name in module.parametrizations:
                inner = f"{prefix}.parametrizations.{name}."
                for key in [k for k in state if k.startswith(inner)]:
                    del state[key]
                state[f"{prefix}.{name}"] = getattr(module, name).detach()
    return state


def untie(model) -> None:
    """Replace the parametrisations :func:`tie` registered by their current values, in place."""
    parametrize.remove_parametrizations(model.visual.conv1, "weight", leave_parametrized=True)
    parametrize.remove_parametrizations(model.visual, "positional_embedding", leave_parametrized=True)
