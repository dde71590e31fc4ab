"""Loading Hugging Face transformers dual encoders (CLIPModel, SiglipModel, Siglip2Model) for serving.

A model spec ``--model NAME=hf:PATH_OR_REPO`` names a local directory (read offline, as
``save_pretrained`` writes it) or a hub repository id (downloaded when online; from the local
cache when ``HF_HUB_OFFLINE`` is set). The directory holds the model (``config.json`` and
weights), its tokenizer (``tokenizer.json`` or the files ``AutoTokenizer`` reads) and its
image processor (``preprocessor_config.json``).

transformers is an optional extra (``pip install 'clip-explain-server[hf]'``): this module
imports it only when a model is loaded, and says which extra to install when it is missing.

Preprocessing is expressed as open_clip's :class:`PreprocessCfg`, so that the server's one
image transform (open_clip's, on PIL images) serves these models too:

- CLIP (``CLIPImageProcessor``): resize the shortest side to the crop size, centre crop:
  ``resize_mode='shortest'``. A resize larger than the crop is refused (open_clip cannot
  express it; no released CLIP checkpoint does it).
- SigLIP (``SiglipImageProcessor``): resize to height x width, no crop: ``'squash'``.
- SigLIP2 (``Siglip2ImageProcessor``, NaFlex): the processor keeps each image's aspect ratio
  and fits it into ``max_num_patches`` patches. The server serves the fixed-resolution case
  (see engine/families/hf_models.py): every image squashed to a square of
  ``floor(sqrt(max_num_patches))`` patches per side, which is what the processor gives a square
  image. Other aspect ratios are distorted where the processor would keep them.

transformers resizes with torchvision on tensors, open_clip with PIL: pixels may differ by a
grey level or so, as between any two resampling libraries.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from open_clip.transform import PreprocessCfg

from .engine.split import SplitTower, UnsupportedModelError

EXTRA = "hf"
"""The optional extra of clip-explain-server that installs transformers."""

MODEL_TYPES = ("clip", "siglip", "siglip2")
"""``config.model_type`` values that load (as CLIPModel, SiglipModel, Siglip2Model)."""

_INTERPOLATION = {2: "bilinear", 3: "bicubic", "bilinear": "bilinear", "bicubic": "bicubic"}
_PATH_PREFIXES = ("/", "./", "../", "~", "." + os.sep)


class HFLoadError(RuntimeError):
    """A Hugging Face model could not be loaded or is not one the server explains; the message
    says why (the caller adds the model's name)."""


@dataclass
class HFDualEncoder:
    """What the server needs of a loaded Hugging Face dual encoder.

    Attributes:
        model: the CLIPModel, SiglipModel or Siglip2Model, eval mode, no gradients, on its
            device and dtype, with explicit attention (hf_models.ATTENTION).
        model_type: ``clip``, ``siglip`` or ``siglip2``.
        text, image: the towers' adapters (engine/families/hf_models.py).
        tokenizer: the ``AutoTokenizer``. CLIP's adds start and end tokens; SigLIP's adds an
            end token only, and the text tower reads every position of its context
            (``text.sees_padding``), so inputs are padded with ``text.pad_id`` to
            ``text.context_length``.
        preprocess_cfg: the image transform, as open_clip's configuration.
        image_size: model input (height, width) in pixels.
        patch_size: patch (height, width) in pixels.
        logit_scale: exp(logit_scale), the factor from cosine to logits.
        logit_bias: SigLIP's bias added to the scaled cosine (its logit is
            ``logit_scale * cos + logit_bias``, read through a sigmoid); None for CLIP.
    """

    model: torch.nn.Module
    model_type: str
    text: SplitTower
    image: SplitTower
    tokenizer: Any
    preprocess_cfg: PreprocessCfg
    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    logit_scale: float
    logit_bias: float | None


def is_local(source: str) -> bool:
    """Whether ``source`` names a local directory (an existing one, or a path by its form:
    absolute, ``./``, ``../`` or ``~``) rather than a hub repository id (``owner/name``)."""
    return os.path.isdir(os.path.expanduser(source)) or source.startswith(_PATH_PREFIXES)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise HFLoadError(
            f"Hugging Face models (hf:...) need transformers, the optional extra {EXTRA!r} of the server: "
            f"pip install 'clip-explain-server[{EXTRA}]'"
        ) from err
    return transformers


def load_hf(source: str, *, device: torch.device, dtype: str) -> HFDualEncoder:
    """Load a CLIPModel, SiglipModel or Siglip2Model with its tokenizer and preprocessing.

    Args:
        source: ``PATH_OR_REPO`` of the spec ``hf:PATH_OR_REPO``: a local directory, read with
            ``local_files_only`` (never the network), or a hub repository id, fetched when
            online (``HF_HUB_OFFLINE`` unset) and read from the cache otherwise.
        device: where the model runs.
        dtype: ``float32``, ``float16``, ``bfloat16`` or ``float64`` (tests).

    Returns:
        The :class:`HFDualEncoder`.

    Raises:
        HFLoadError: transformers is not installed; the directory does not exist; the config,
            weights, tokenizer or image processor cannot be read; the model type is not one of
            :data:`MODEL_TYPES`; its preprocessing has no open_clip equivalent; or a tower the
            engine cannot explain.
    """
    transformers = _transformers()
    from .engine.families import hf_models

    local = is_local(source)
    path = os.path.expanduser(source) if local else source
    if local and not os.path.isdir(path):
        raise HFLoadError(f"hf:{source}: no such directory")
    offline = {"local_files_only": True} if local else {}
    try:
        config = transformers.AutoConfig.from_pretrained(path, **offline)
    except (OSError, ValueError) as err:
        raise HFLoadError(f"hf:{source}: cannot read the model config: {err}") from err
    if config.model_type not in MODEL_TYPES:
        raise HFLoadError(
            f"hf:{source} is a {config.model_type!r} model; the server explains {', '.join(MODEL_TYPES)} "
            "(CLIPModel, SiglipModel, Siglip2Model)"
        )
    model_class = {"clip": transformers.CLIPModel, "siglip": transformers.SiglipModel}.get(
        config.model_type, transformers.Siglip2Model
    )
    try:
        model = model_class.from_pretrained(
            path, attn_implementation=hf_models.ATTENTION, dtype=getattr(torch, dtype), **offline
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, **offline)
        processor = transformers.AutoImageProcessor.from_pretrained(path, **offline)
    except (OSError, ValueError) as err:
        raise HFLoadError(f"hf:{source}: cannot load the model, its tokenizer or its image processor: {err}") from err
    model.to(device).eval().requires_grad_(False)
    preprocess, grid = preprocess_cfg(processor, int(config.vision_config.patch_size))
    try:
        text = hf_models.text_tower(model, pad_id=tokenizer.pad_token_id)
        image = hf_models.image_tower(model, grid=grid)
    except UnsupportedModelError as err:
        raise HFLoadError(f"hf:{source} cannot be explained: {err}") from err
    size = (preprocess.size, preprocess.size) if isinstance(preprocess.size, int) else tuple(preprocess.size)
    if size != image.image_size:
        raise HFLoadError(
            f"hf:{source}: the image processor makes {size[0]}x{size[1]} inputs; the vision tower takes "
            f"{image.image_size[0]}x{image.image_size[1]}"
        )
    bias = getattr(model, "logit_bias", None)
    return HFDualEncoder(
        model=model,
        model_type=config.model_type,
        text=text,
        image=image,
        tokenizer=tokenizer,
        preprocess_cfg=preprocess,
        image_size=size,
        patch_size=(image.patch, image.patch),
        logit_scale=float(model.logit_scale.detach().exp()),
        logit_bias=None if bias is None else float(bias.detach()),
    )


def preprocess_cfg(processor: Any, patch_size: int) -> tuple[PreprocessCfg, int | None]:
    """The open_clip preprocessing equal to a transformers image processor's (see the module's notes).

    Args:
        processor: a ``CLIPImageProcessor``, ``SiglipImageProcessor`` or ``Siglip2ImageProcessor``.
        patch_size: the vision tower's patch side.

    Returns:
        The configuration, and for SigLIP2 the patches per side of its fixed-resolution input
        (None for the others).

    Raises:
        HFLoadError: a resampling filter other than bilinear or bicubic, no resize, no
            normalisation to [0, 1] before mean and std, or a resize and crop open_clip
            cannot express.
    """
    resample = getattr(processor.resample, "value", processor.resample)
    if resample not in _INTERPOLATION:
        raise HFLoadError(f"the image processor resamples with {processor.resample!r}; only bilinear and bicubic")
    if not getattr(processor, "do_resize", True):
        raise HFLoadError("the image processor does not resize; the model needs a fixed input size")
    if not processor.do_rescale or not math.isclose(processor.rescale_factor, 1 / 255):
        raise HFLoadError("the image processor must scale pixels by 1/255 before normalising")
    mean, std = (processor.image_mean, processor.image_std) if processor.do_normalize else ((0.0,) * 3, (1.0,) * 3)
    common = dict(mean=tuple(mean), std=tuple(std), interpolation=_INTERPOLATION[resample])
    max_patches = getattr(processor, "max_num_patches", None)
    if max_patches is not None:  # SigLIP2 NaFlex: a square image's patches
        if int(processor.patch_size) != patch_size:
            raise HFLoadError(
                f"the image processor's patch size {processor.patch_size} is not the model's {patch_size}"
            )
        grid = math.isqrt(int(max_patches))
        return PreprocessCfg(size=grid * patch_size, resize_mode="squash", **common), grid
    size, crop = processor.size, getattr(processor, "crop_size", None)
    if getattr(processor, "do_center_crop", False):
        if size.shortest_edge is None or crop is None or not (size.shortest_edge == crop.height == crop.width):
            raise HFLoadError(
                f"the image processor resizes to {size} and crops to {crop}; the server reproduces only a resize "
                "of the shortest side to a square crop's side"
            )
        return PreprocessCfg(size=int(crop.height), resize_mode="shortest", **common), None
    if size.height is None or size.width is None:
        raise HFLoadError(f"the image processor resizes to {size} without a crop; the server needs a height and width")
    height, width = int(size.height), int(size.width)
    return PreprocessCfg(size=height if height == width else (height, width), resize_mode="squash", **common), None
