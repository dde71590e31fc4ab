"""Tower adapters per model family, and the choice of adapter for a loaded model.

Each module adapts one family's tower to :class:`~..split.SplitTower`. :func:`split_towers`
picks them by the class of the module that is the tower; adding a family means adding a module
and an entry in :data:`TEXT_ADAPTERS` or :data:`IMAGE_ADAPTERS`.
"""

from __future__ import annotations

from typing import Callable

import torch
from open_clip.hf_model import HFTextEncoder
from open_clip.model import CLIP
from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel
from open_clip.transformer import TextTransformer, VisionTransformer

from ..split import SplitTower, UnsupportedModelError
from . import openclip
from .resnet import ResNetImageTower
from .timm_trunks import timm_image_tower


def _hf_text_tower(text: torch.nn.Module) -> SplitTower:
    # transformers is an optional extra (server[hf]): imported only for the models that use it
    from .hf_text import HFTextTower

    return HFTextTower(text)


TEXT_ADAPTERS: dict[type, Callable[[torch.nn.Module], SplitTower]] = {
    TextTransformer: openclip.TextTower,  # model.text of CustomTextCLIP and CoCa
    CLIP: openclip.TextTower,  # the text tower built into open_clip.model.CLIP
    HFTextEncoder: _hf_text_tower,  # Hugging Face encoders inside open_clip (RoBERTa, XLM-R, NLLB)
}
"""Text adapters by the class of the text tower (:func:`text_module`)."""

IMAGE_ADAPTERS: dict[type, Callable[[torch.nn.Module], SplitTower]] = {
    VisionTransformer: openclip.VisionTower,
    TimmModel: timm_image_tower,  # picks the adapter by the timm trunk's class
    ModifiedResNet: ResNetImageTower,  # OpenAI's ResNets (RN50, RN101, RN50xN)
}
"""Image adapters by the class of ``model.visual``."""


def split_towers(model: torch.nn.Module) -> tuple[SplitTower, SplitTower]:
    """The (text, image) towers of a loaded dual encoder.

    Raises:
        UnsupportedModelError: a tower no adapter explains; the message names its class.
    """
    return text_tower(model), image_tower(model)


def text_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module that is ``model``'s text tower: ``model.text`` (CustomTextCLIP, CoCa), else the
    model itself (open_clip's CLIP keeps its text tower's parts as its own attributes)."""
    text = getattr(model, "text", None)
    return text if isinstance(text, torch.nn.Module) else model


def _from_transformers(model: torch.nn.Module) -> bool:
    # by module name: transformers is an optional extra, imported only for its own models
    return type(model).__module__.startswith("transformers.")


def text_tower(model: torch.nn.Module) -> SplitTower:
    """The text tower's adapter. Raises UnsupportedModelError."""
    if _from_transformers(model):
        from . import hf_models

        return hf_models.text_tower(model)
    module = text_module(model)
    adapter = TEXT_ADAPTERS.get(type(module))
    if adapter is None:
        raise UnsupportedModelError(
            f"no adapter explains the text tower {type(module).__name__} of {type(model).__name__}"
        )
    return adapter(module)


def image_tower(model: torch.nn.Module) -> SplitTower:
    """The image tower's adapter. Raises UnsupportedModelError."""
    if _from_transformers(model):
        from . import hf_models

        return hf_models.image_tower(model)
    visual = getattr(model, "visual", None)
    adapter = IMAGE_ADAPTERS.get(type(visual))
    if adapter is None:
        raise UnsupportedModelError(
            f"no adapter explains the image tower {type(visual).__name__} of {type(model).__name__}"
        )
    return adapter(visual)
