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
from .engine.families import split_towers
from .engine.quadrature import check_rule
from .engine.split import SplitTower, UnsupportedModelError, default_quadrature
from .engine.towers import ImageTower, TextTower
from .model_spec import DEFAULT_METHOD, DEFAULT_N_STEPS, ModelSpec
from .tokenizers import CaptionTokenizer, TokenizerLoadError, hf_tokenizer, load_tokenizer

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
    """A preloaded, warmed-up model with its tokenizer, preprocessing and explainer.

    Attributes:
        model: the open_clip model, or the transformers CLIPModel / SiglipModel / Siglip2Model.
        logit_scale: exp(logit_scale), the factor from cosine to logits.
        logit_bias: SigLIP's bias added to the scaled cosine; None for models without one.
    """

    spec: ModelSpec
    model: torch.nn.Module
    tokenizer: CaptionTokenizer
    preprocess_cfg: PreprocessCfg
    explainer: Explainer
    device: torch.device
    dtype_name: str
    load_seconds: float
    logit_scale: float
    logit_bias: float | None = None

    def __post_init__(self) -> None:
        self.transform = image_transform_v2(self.preprocess_cfg, is_train=False)

    @property
    def image_size(self) -> tuple[int, int]:
        """Model input (height, width) in pixels."""
        return _pair(self.preprocess_cfg.size)

    @property
    def patch_size(self) -> tuple[int, int]:
        """Pixels per grid cell at the default image layer, (height, width); (0, 0) when the grid
        does not divide the input."""
        (height, width), (rows, cols) = self.image_size, self.grid_size
        if height % rows or width % cols:
            return (0, 0)
        return (height // rows, width // cols)

    @property
    def grid_size(self) -> tuple[int, int]:
        """(Gh, Gw) at the default image layer."""
        return self.explainer.image.layers[self.default_image_layer].grid

    @property
    def embed_dim(self) -> int:
        """D, the joint embedding width."""
        return self.explainer.embed_dim

    @property
    def default_text_layer(self) -> int:
        """The spec's ``text_layer``, else the tower's default."""
        return self.explainer.text.default_layer if self.spec.text_layer is None else self.spec.text_layer

    @property
    def default_image_layer(self) -> int:
        """The spec's ``image_layer``, else the tower's default."""
        return self.explainer.image.default_layer if self.spec.image_layer is None else self.spec.image_layer

    @property
    def default_method(self) -> str:
        """The spec's ``method``, else the towers' family's (:func:`default_quadrature`), else
        ``model_spec.DEFAULT_METHOD``."""
        family, _ = default_quadrature(self.explainer.text, self.explainer.image)
        return self.spec.method or family or DEFAULT_METHOD

    @property
    def default_n_steps(self) -> int:
        """The spec's ``n_steps``, else the family's when :attr:`default_method` is the family's
        method, else ``model_spec.DEFAULT_N_STEPS``."""
        if self.spec.n_steps is not None:
            return self.spec.n_steps
        method, n_steps = default_quadrature(self.explainer.text, self.explainer.image)
        return n_steps if method is not None and method == self.default_method else DEFAULT_N_STEPS


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def _create(spec: ModelSpec, device: torch.device, dtype: str) -> torch.nn.Module:
    precision = _PRECISION[dtype]
    seed = spec.random_seed
    if seed is not None:
        # fork_rng: seeding must not disturb the process-wide generator
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # pretrained_text=False: a Hugging Face text tower must not fetch its weights either
            return open_clip.create_model(
                spec.architecture, pretrained=None, pretrained_text=False, precision=precision, device=device
            )
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
    budget = ChunkBudget(memory_bytes, chunk_seconds)
    if spec.hf_source is not None:
        loaded = _load_hf(spec, device, dtype, budget)
        loaded.load_seconds = time.perf_counter() - start
        return loaded
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
        text, image = split_towers(model)
    except UnsupportedModelError as err:
        raise ModelLoadError(f"model {spec.name!r} ({spec.architecture}) cannot be explained: {err}") from err
    preprocess_cfg = PreprocessCfg(**model.visual.preprocess_cfg)
    loaded = LoadedModel(
        spec=spec,
        model=model,
        tokenizer=tokenizer,
        preprocess_cfg=preprocess_cfg,
        explainer=_explainer(model, text, image, tokenizer, preprocess_cfg, budget),
        device=device,
        dtype_name=dtype,
        load_seconds=0.0,
        logit_scale=float(model.logit_scale.detach().exp()),
        logit_bias=None if getattr(model, "logit_bias", None) is None else float(model.logit_bias),
    )
    _check_layers(spec, loaded.explainer)
    _check_quadrature(loaded)
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


def _explainer(
    model: torch.nn.Module,
    text: SplitTower,
    image: SplitTower,
    tokenizer: CaptionTokenizer,
    preprocess_cfg: PreprocessCfg,
    budget: ChunkBudget,
) -> Explainer:
    """The explainer of ``model``'s towers, with the fast path of engine/towers.py on the
    towers whose structure it covers (open_clip's ViT CLIP)."""
    fast = {}
    for tower, build in ((text, TextTower), (image, ImageTower)):
        try:
            fast[tower] = build(model)
        except UnsupportedModelError:  # the generic path explains it
            pass
    # what the model computes in: the dtype of most of its linear and convolution weights (open_clip
    # keeps embeddings and norms in float32 for half precision)
    by_dtype: dict[torch.dtype, int] = {}
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            by_dtype[module.weight.dtype] = by_dtype.get(module.weight.dtype, 0) + module.weight.numel()
    weight = next(model.parameters())
    return Explainer(
        text,
        image,
        text_reference=torch.tensor(tokenizer.reference_ids),
        pad_id=tokenizer.pad_id,
        image_size=_pair(preprocess_cfg.size),
        device=weight.device,
        dtype=max(by_dtype, key=by_dtype.get),
        budget=budget,
        fast=fast,
    )


def _check_layers(spec: ModelSpec, explainer: Explainer) -> None:
    for tower, layer in (("text", spec.text_layer), ("image", spec.image_layer)):
        count = len(getattr(explainer, tower).layers)
        if layer is not None and layer >= count:
            raise ModelLoadError(
                f"model {spec.name!r}: {tower}_layer={layer} is not a layer of its {tower} tower, which has "
                f"{count} (0 to {count - 1})"
            )


def _check_quadrature(loaded: LoadedModel) -> None:
    """The spec's method or n_steps completed with the family's must make a rule."""
    try:
        check_rule(loaded.default_method, loaded.default_n_steps)
    except ValueError as err:
        raise ModelLoadError(f"model {loaded.spec.name!r}: {err}") from err


def _load_hf(spec: ModelSpec, device: torch.device, dtype: str, budget: ChunkBudget) -> LoadedModel:
    """A transformers CLIPModel, SiglipModel or Siglip2Model (the ``hf`` extra)."""
    from .hf_loading import HFLoadError, load_hf  # transformers is optional: imported for hf: specs only

    try:
        hf = load_hf(spec.hf_source, device=device, dtype=dtype)
        tokenizer = hf_tokenizer(spec.tokenizer or spec.hf_source, hf.text.context_length)
    except (HFLoadError, TokenizerLoadError) as err:
        raise ModelLoadError(f"model {spec.name!r}: {err}") from err
    loaded = LoadedModel(
        spec=spec,
        model=hf.model,
        tokenizer=tokenizer,
        preprocess_cfg=hf.preprocess_cfg,
        explainer=_explainer(hf.model, hf.text, hf.image, tokenizer, hf.preprocess_cfg, budget),
        device=device,
        dtype_name=dtype,
        load_seconds=0.0,
        logit_scale=hf.logit_scale,
        logit_bias=hf.logit_bias,
    )
    _check_layers(spec, loaded.explainer)
    _check_quadrature(loaded)
    return loaded
