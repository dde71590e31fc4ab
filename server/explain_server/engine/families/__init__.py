"""Tower adapters per model family, and the choice of adapter for a loaded model.

Each module adapts one family's tower to :class:`~..split.SplitTower`. :func:`split_towers`
picks them by the classes the model is built from; adding a family means adding a module and
a line here.
"""

from __future__ import annotations

import torch
from open_clip.modified_resnet import ModifiedResNet

from ..split import SplitTower, UnsupportedModelError
from .resnet import ResNetImageTower


def split_towers(model: torch.nn.Module) -> tuple[SplitTower, SplitTower]:
    """The (text, image) towers of a loaded dual encoder.

    Raises:
        UnsupportedModelError: a tower no adapter explains; the message names its class.
    """
    return text_tower(model), image_tower(model)


def text_tower(model: torch.nn.Module) -> SplitTower:
    """The text tower's adapter. Raises UnsupportedModelError."""
    raise UnsupportedModelError(f"no adapter explains the text tower of {type(model).__name__}")


def image_tower(model: torch.nn.Module) -> SplitTower:
    """The image tower's adapter. Raises UnsupportedModelError."""
    if isinstance(getattr(model, "visual", None), ModifiedResNet):
        return ResNetImageTower(model.visual)
    raise UnsupportedModelError(f"no adapter explains the image tower of {type(model).__name__}")
