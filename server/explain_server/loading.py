"""Loading open_clip models for serving: what a :class:`~.model_spec.ModelSpec` names, on a device, in a dtype."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from .engine.attribution import ChunkBudget
from .engine.explainer import Explainer
from .model_spec import ModelSpec
from .tokenizers import CaptionTokenizer, TokenizerLoadError, load_tokenizer

log = logging.getLogger(__name__)

_PRECISION = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


class ModelLoadError(RuntimeError):
    """A configured model could not be loaded; the message names the model and the cause."""


def resolve_device(device: str) -> torch.device:
    """``auto`` -> the first CUDA device when present, else CPU; otherwise ``cpu`` or ``cuda[:i]``.

    Raises:
        ValueError: unknown device string, or CUDA requested but not available.
    """
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda[:i]; got {device!r}")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    return resolved


@dataclass
class LoadedModel:
    """A preloaded, warmed-up model with its tokenizer, preprocessing and explainer."""

    spec: ModelSpec
    model: open_clip.model.CLIP
    tokenizer: CaptionTokenizer
    preprocess_cfg: PreprocessCfg
    explainer: Explainer
    device: torch.device
    dtype_name: str
    load_seconds: float

    def __post_init__(self) -> None:
        self.transform = image_transform_v2(self.preprocess_cfg, is_train=False)

    @property
    def image_size(self) -> tuple[int, int]:
        """Model input (height, width) in pixels."""
        return tuple(self.model.visual.image_size)

    @property
    def patch_size(self) -> tuple[int, int]:
        """Patch (height, width) in pixels."""
        return tuple(self.model.visual.patch_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        """(Gh, Gw)."""
        return self.explainer.image.grid_size

    @property
    def embed_dim(self) -> int:
        """D, the joint embedding width."""
        return self.explainer.embed_dim

    @property
    def logit_scale(self) -> float:
        """exp(logit_scale): the factor from cosine to logits."""
        return float(self.model.logit_scale.detach().exp())

    @property
    def default_text_layer(self) -> int:
        """The spec's ``text_layer``, else the input of the last text block (as in exclip)."""
        return self.explainer.text.n_layers - 1 if self.spec.text_layer is None else self.spec.text_layer

    @property
    def default_image_layer(self) -> int:
        """The spec's ``image_layer``, else the input of the last image block (as in exclip)."""
        return self.explainer.image.n_layers - 1 if self.spec.image_layer is None else self.spec.image_layer

    @property
    def default_method(self) -> str:
        """The spec's ``method``."""
        return self.spec.method

    @property
    def default_n_steps(self) -> int:
        """The spec's ``n_steps``."""
        return self.spec.n_steps


def _create(spec: ModelSpec, device: torch.device, dtype: str) -> torch.nn.Module:
    precision = _PRECISION[dtype]
    seed = spec.random_seed
    if seed is not None:
        # fork_rng: seeding must not disturb the process-wide generator
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return open_clip.create_model(spec.architecture, pretrained=None, precision=precision, device=device)
    looks_like_path = os.sep in spec.pretrained or spec.pretrained.endswith((".safetensors", ".pt", ".pth", ".bin"))
    if looks_like_path and not os.path.isfile(spec.pretrained):
        raise ModelLoadError(f"model {spec.name!r}: weights file {spec.pretrained} does not exist")
    return open_clip.create_model(
        spec.architecture, pretrained=spec.pretrained, precision=precision, device=device, require_pretrained=True
    )


def load_model(
    spec: ModelSpec, *, device: torch.device, dtype: str, memory_bytes: int, chunk_seconds: float | None = None
) -> LoadedModel:
    """Build, load and check one model; weights come from ``spec.pretrained``.

    Args:
        spec: what to load.
        device: where the model runs.
        dtype: ``float32``, ``float16`` or ``bfloat16`` (weights and activations; path sums
            are accumulated in float32).
        memory_bytes, chunk_seconds: the memory and wall time one chunk of the explainer's
            work may take (see :class:`ChunkBudget`); no time bound when ``chunk_seconds`` is None.

    Raises:
        ModelLoadError: unknown architecture, missing or unreadable weights, an
            architecture the engine cannot explain, or a default layer the tower lacks; the
            message names the model.
    """
    start = time.perf_counter()
    if spec.architecture not in open_clip.list_models():
        raise ModelLoadError(
            f"model {spec.name!r}: unknown open_clip architecture {spec.architecture!r} "
            "(see open_clip.list_models(), or register a config with --model-config)"
        )
    try:
        model = _create(spec, device, dtype)
    except ModelLoadError:
        raise
    except Exception as err:  # open_clip raises RuntimeError, safetensors/torch their own types
        raise ModelLoadError(f"model {spec.name!r}: cannot load weights {spec.pretrained!r}: {err}") from err
    model.eval().requires_grad_(False)
    try:
        tokenizer = load_tokenizer(spec.architecture, spec.tokenizer)
    except TokenizerLoadError as err:
        raise ModelLoadError(f"model {spec.name!r}: {err}") from err
    try:
        explainer = Explainer.for_clip(
            model,
            # CLIP's reference is [start, 0, end]; other tokenizers' towers go through the generic path
            sot_token_id=tokenizer.reference_ids[0],
            eot_token_id=tokenizer.reference_ids[-1],
            budget=ChunkBudget(memory_bytes, chunk_seconds),
        )
    except ValueError as err:
        raise ModelLoadError(f"model {spec.name!r} ({spec.architecture}) cannot be explained: {err}") from err
    for tower, layer in (("text", spec.text_layer), ("image", spec.image_layer)):
        blocks = getattr(explainer, tower).n_layers
        if layer is not None and layer >= blocks:
            raise ModelLoadError(
                f"model {spec.name!r}: {tower}_layer={layer} is not a block of its {blocks}-block {tower} tower"
            )
    loaded = LoadedModel(
        spec=spec,
        model=model,
        tokenizer=tokenizer,
        preprocess_cfg=PreprocessCfg(**model.visual.preprocess_cfg),
        explainer=explainer,
        device=device,
        dtype_name=dtype,
        load_seconds=0.0,
    )
    loaded.load_seconds = time.perf_counter() - start
    log.info(
        "loaded model %s (%s, %s) on %s in %.1f s",
        spec.name,
        spec.architecture,
        spec.pretrained,
        device,
        loaded.load_seconds,
    )
    return loaded
