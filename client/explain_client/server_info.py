"""What a server reports about itself in ``ListModels``, as plain Python: its hosted models and its
request limits."""

from __future__ import annotations

from dataclasses import dataclass

from explain_api import explain_pb2

__all__ = ["LayerInfo", "ModelInfo", "Preprocessing", "ServerLimits"]


@dataclass(frozen=True)
class LayerInfo:
    """A layer of a tower whose input an explanation may attribute."""

    index: int
    """What ``text_layer`` / ``image_layer`` take."""
    name: str
    """Readable name, also accepted instead of the index: "block 11", "layer4", "stages.2", "head"."""
    grid: tuple[int, int] | None
    """Image layers: (Gh, Gw) of the grid after the prefix; None for text layers."""
    prefix: tuple[str, ...]
    """Image layers: labels of the positions before the grid ("cls", "reg0", ...)."""

    @classmethod
    def from_proto(cls, info: explain_pb2.LayerInfo) -> LayerInfo:
        """Convert a ``LayerInfo`` message."""
        grid = (info.grid_height, info.grid_width) if info.grid_height and info.grid_width else None
        return cls(info.index, info.name, grid, tuple(info.prefix))


@dataclass(frozen=True)
class Preprocessing:
    """How the server turns an image into model input (open_clip conventions)."""

    mean: tuple[float, ...]
    """Per RGB channel, in [0, 1] pixel units."""
    std: tuple[float, ...]
    """Per RGB channel."""
    resize_mode: str
    """"shortest", "longest" or "squash"."""
    interpolation: str
    """"bicubic", "bilinear" or "nearest"."""
    fill_color: int
    """Padding value for resize_mode "longest"."""
    conversion: str
    """How images are converted to RGB."""


@dataclass(frozen=True)
class ModelInfo:
    """One hosted model: what it is, its grid and preprocessing, and its defaults."""

    name: str
    """The name requests use."""
    architecture: str
    """open_clip architecture, e.g. "ViT-B-32"."""
    pretrained: str
    """open_clip pretrained tag, a local weights path, or "random:SEED"."""
    embed_dim: int
    """Embedding dimension D."""
    image_size: tuple[int, int]
    """Model input (width, height), pixels."""
    patch_size: tuple[int, int]
    """ViT patch (width, height), pixels; (0, 0) for towers without patches."""
    grid: tuple[int, int]
    """(Gh, Gw) of the default image layer (``image_layer_list`` has every layer's)."""
    context_length: int
    """Text tokens, special tokens included."""
    text_layers: int
    """L_t, layers of the text tower."""
    image_layers: int
    """L_v, layers of the image tower."""
    default_text_layer: int
    default_image_layer: int
    default_n_steps: int
    default_method: str
    methods: tuple[str, ...]
    """Accepted quadrature rules."""
    max_n_steps: int
    preprocessing: Preprocessing
    device: str
    """E.g. "cpu", "cuda:0"."""
    dtype: str
    """E.g. "float32"."""
    is_default: bool
    """Whether requests without a model name use this model."""
    text_layer_list: tuple[LayerInfo, ...] = ()
    """Every text layer, by index; empty from servers that predate layer names."""
    image_layer_list: tuple[LayerInfo, ...] = ()
    """Every image layer, by index, with its grid and prefix; empty from older servers."""
    default_text_layer_name: str = ""
    default_image_layer_name: str = ""
    text_sees_padding: bool = False
    """Whether explanations carry padding rows up to ``context_length`` (e.g. SigLIP)."""
    pad_token: str = ""
    """The label of padding rows."""
    logit_bias: float | None = None
    """SigLIP's bias: logit = cosine x logit_scale + logit_bias; None for models without one."""

    @classmethod
    def from_proto(cls, info: explain_pb2.ModelInfo, *, is_default: bool) -> ModelInfo:
        """Convert a ``ModelInfo`` message; ``is_default`` comes from ``ListModelsResponse.default_model``."""
        pre = info.preprocessing
        return cls(
            name=info.name,
            architecture=info.architecture,
            pretrained=info.pretrained,
            embed_dim=info.embed_dim,
            image_size=(info.image_size.width, info.image_size.height),
            patch_size=(info.patch_size.width, info.patch_size.height),
            grid=(info.grid_height, info.grid_width),
            context_length=info.context_length,
            text_layers=info.text_layers,
            image_layers=info.image_layers,
            default_text_layer=info.default_text_layer,
            default_image_layer=info.default_image_layer,
            default_n_steps=info.default_n_steps,
            default_method=info.default_method,
            methods=tuple(info.methods),
            max_n_steps=info.max_n_steps,
            preprocessing=Preprocessing(
                mean=tuple(pre.mean),
                std=tuple(pre.std),
                resize_mode=pre.resize_mode,
                interpolation=pre.interpolation,
                fill_color=pre.fill_color,
                conversion=pre.conversion,
            ),
            device=info.device,
            dtype=info.dtype,
            is_default=is_default,
            text_layer_list=tuple(LayerInfo.from_proto(layer) for layer in info.text_layer_list),
            image_layer_list=tuple(LayerInfo.from_proto(layer) for layer in info.image_layer_list),
            default_text_layer_name=info.default_text_layer_name,
            default_image_layer_name=info.default_image_layer_name,
            text_sees_padding=info.text_sees_padding,
            pad_token=info.pad_token,
            logit_bias=info.logit_bias if info.HasField("logit_bias") else None,
        )


@dataclass(frozen=True)
class ServerLimits:
    """Limits the server applies to every request (``ListModelsResponse.limits``)."""

    max_message_bytes: int
    """Largest request or response message, bytes."""
    max_image_pixels: int
    """Largest width * height of an image."""
    max_image_side: int
    """Largest width or height of an image, pixels."""
    max_explanations_per_call: int
    """Most explanations one ``explain_many`` call may ask for."""
    max_pixels_per_call: int
    """Most pixels (width * height) of all the images of one call together; 0 from servers
    that predate the limit."""

    @classmethod
    def from_proto(cls, msg: explain_pb2.ServerLimits) -> ServerLimits:
        """Convert the proto message."""
        return cls(
            int(msg.max_message_bytes),
            int(msg.max_image_pixels),
            int(msg.max_image_side),
            int(msg.max_explanations_per_call),
            int(msg.max_pixels_per_call),
        )
