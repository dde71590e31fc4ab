from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Detail(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DETAIL_FULL: _ClassVar[Detail]
    DETAIL_SUMMARY: _ClassVar[Detail]
DETAIL_FULL: Detail
DETAIL_SUMMARY: Detail

class ExplainRequest(_message.Message):
    __slots__ = ("model", "image", "caption", "text_layer", "image_layer", "n_steps", "method", "request_id", "text_layer_name", "image_layer_name", "detail", "summary_top_k")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    CAPTION_FIELD_NUMBER: _ClassVar[int]
    TEXT_LAYER_FIELD_NUMBER: _ClassVar[int]
    IMAGE_LAYER_FIELD_NUMBER: _ClassVar[int]
    N_STEPS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_LAYER_NAME_FIELD_NUMBER: _ClassVar[int]
    IMAGE_LAYER_NAME_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_TOP_K_FIELD_NUMBER: _ClassVar[int]
    model: str
    image: bytes
    caption: str
    text_layer: int
    image_layer: int
    n_steps: int
    method: str
    request_id: str
    text_layer_name: str
    image_layer_name: str
    detail: Detail
    summary_top_k: int
    def __init__(self, model: _Optional[str] = ..., image: _Optional[bytes] = ..., caption: _Optional[str] = ..., text_layer: _Optional[int] = ..., image_layer: _Optional[int] = ..., n_steps: _Optional[int] = ..., method: _Optional[str] = ..., request_id: _Optional[str] = ..., text_layer_name: _Optional[str] = ..., image_layer_name: _Optional[str] = ..., detail: _Optional[_Union[Detail, str]] = ..., summary_top_k: _Optional[int] = ...) -> None: ...

class ExplainManyRequest(_message.Message):
    __slots__ = ("model", "images", "captions", "text_layer", "image_layer", "n_steps", "method", "request_id", "text_layer_name", "image_layer_name", "detail", "summary_top_k")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    CAPTIONS_FIELD_NUMBER: _ClassVar[int]
    TEXT_LAYER_FIELD_NUMBER: _ClassVar[int]
    IMAGE_LAYER_FIELD_NUMBER: _ClassVar[int]
    N_STEPS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_LAYER_NAME_FIELD_NUMBER: _ClassVar[int]
    IMAGE_LAYER_NAME_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_TOP_K_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: _containers.RepeatedScalarFieldContainer[bytes]
    captions: _containers.RepeatedScalarFieldContainer[str]
    text_layer: int
    image_layer: int
    n_steps: int
    method: str
    request_id: str
    text_layer_name: str
    image_layer_name: str
    detail: Detail
    summary_top_k: int
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Iterable[bytes]] = ..., captions: _Optional[_Iterable[str]] = ..., text_layer: _Optional[int] = ..., image_layer: _Optional[int] = ..., n_steps: _Optional[int] = ..., method: _Optional[str] = ..., request_id: _Optional[str] = ..., text_layer_name: _Optional[str] = ..., image_layer_name: _Optional[str] = ..., detail: _Optional[_Union[Detail, str]] = ..., summary_top_k: _Optional[int] = ...) -> None: ...

class ExplainManyResponse(_message.Message):
    __slots__ = ("explanations",)
    EXPLANATIONS_FIELD_NUMBER: _ClassVar[int]
    explanations: _containers.RepeatedCompositeFieldContainer[ExplainResponse]
    def __init__(self, explanations: _Optional[_Iterable[_Union[ExplainResponse, _Mapping]]] = ...) -> None: ...

class Float32Tensor(_message.Message):
    __slots__ = ("shape", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x0", "y0", "x1", "y1")
    X0_FIELD_NUMBER: _ClassVar[int]
    Y0_FIELD_NUMBER: _ClassVar[int]
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    x0: float
    y0: float
    x1: float
    y1: float
    def __init__(self, x0: _Optional[float] = ..., y0: _Optional[float] = ..., x1: _Optional[float] = ..., y1: _Optional[float] = ...) -> None: ...

class ImageSize(_message.Message):
    __slots__ = ("width", "height")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class ReferenceTerms(_message.Message):
    __slots__ = ("text_reference", "image_reference", "both_references")
    TEXT_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    BOTH_REFERENCES_FIELD_NUMBER: _ClassVar[int]
    text_reference: float
    image_reference: float
    both_references: float
    def __init__(self, text_reference: _Optional[float] = ..., image_reference: _Optional[float] = ..., both_references: _Optional[float] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_seconds", "compute_seconds")
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    queue_seconds: float
    compute_seconds: float
    def __init__(self, queue_seconds: _Optional[float] = ..., compute_seconds: _Optional[float] = ...) -> None: ...

class ResolvedOptions(_message.Message):
    __slots__ = ("text_layer", "image_layer", "n_steps", "method", "text_layer_name", "image_layer_name")
    TEXT_LAYER_FIELD_NUMBER: _ClassVar[int]
    IMAGE_LAYER_FIELD_NUMBER: _ClassVar[int]
    N_STEPS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    TEXT_LAYER_NAME_FIELD_NUMBER: _ClassVar[int]
    IMAGE_LAYER_NAME_FIELD_NUMBER: _ClassVar[int]
    text_layer: int
    image_layer: int
    n_steps: int
    method: str
    text_layer_name: str
    image_layer_name: str
    def __init__(self, text_layer: _Optional[int] = ..., image_layer: _Optional[int] = ..., n_steps: _Optional[int] = ..., method: _Optional[str] = ..., text_layer_name: _Optional[str] = ..., image_layer_name: _Optional[str] = ...) -> None: ...

class TextSpan(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("request_id", "model", "token_ids", "tokens", "attribution", "cls_attribution", "score", "logit_scale", "reference_terms", "convergence_delta", "crop_box", "image_size", "timings", "options", "image_prefix", "prefix_attribution", "padding", "token_spans", "logit_bias", "summary")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    CLS_ATTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    LOGIT_SCALE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_TERMS_FIELD_NUMBER: _ClassVar[int]
    CONVERGENCE_DELTA_FIELD_NUMBER: _ClassVar[int]
    CROP_BOX_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_PREFIX_FIELD_NUMBER: _ClassVar[int]
    PREFIX_ATTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    TOKEN_SPANS_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    attribution: Float32Tensor
    cls_attribution: _containers.RepeatedScalarFieldContainer[float]
    score: float
    logit_scale: float
    reference_terms: ReferenceTerms
    convergence_delta: float
    crop_box: Box
    image_size: ImageSize
    timings: Timings
    options: ResolvedOptions
    image_prefix: _containers.RepeatedScalarFieldContainer[str]
    prefix_attribution: Float32Tensor
    padding: _containers.RepeatedScalarFieldContainer[bool]
    token_spans: _containers.RepeatedCompositeFieldContainer[TextSpan]
    logit_bias: float
    summary: ExplanationSummary
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Iterable[str]] = ..., attribution: _Optional[_Union[Float32Tensor, _Mapping]] = ..., cls_attribution: _Optional[_Iterable[float]] = ..., score: _Optional[float] = ..., logit_scale: _Optional[float] = ..., reference_terms: _Optional[_Union[ReferenceTerms, _Mapping]] = ..., convergence_delta: _Optional[float] = ..., crop_box: _Optional[_Union[Box, _Mapping]] = ..., image_size: _Optional[_Union[ImageSize, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., options: _Optional[_Union[ResolvedOptions, _Mapping]] = ..., image_prefix: _Optional[_Iterable[str]] = ..., prefix_attribution: _Optional[_Union[Float32Tensor, _Mapping]] = ..., padding: _Optional[_Iterable[bool]] = ..., token_spans: _Optional[_Iterable[_Union[TextSpan, _Mapping]]] = ..., logit_bias: _Optional[float] = ..., summary: _Optional[_Union[ExplanationSummary, _Mapping]] = ...) -> None: ...

class WordSummary(_message.Message):
    __slots__ = ("text", "start", "end", "first_token", "end_token", "relevance", "peak_row", "peak_column", "peak_value", "concentration")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    END_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RELEVANCE_FIELD_NUMBER: _ClassVar[int]
    PEAK_ROW_FIELD_NUMBER: _ClassVar[int]
    PEAK_COLUMN_FIELD_NUMBER: _ClassVar[int]
    PEAK_VALUE_FIELD_NUMBER: _ClassVar[int]
    CONCENTRATION_FIELD_NUMBER: _ClassVar[int]
    text: str
    start: int
    end: int
    first_token: int
    end_token: int
    relevance: float
    peak_row: int
    peak_column: int
    peak_value: float
    concentration: float
    def __init__(self, text: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., first_token: _Optional[int] = ..., end_token: _Optional[int] = ..., relevance: _Optional[float] = ..., peak_row: _Optional[int] = ..., peak_column: _Optional[int] = ..., peak_value: _Optional[float] = ..., concentration: _Optional[float] = ...) -> None: ...

class WordCell(_message.Message):
    __slots__ = ("word", "row", "column", "value")
    WORD_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    word: int
    row: int
    column: int
    value: float
    def __init__(self, word: _Optional[int] = ..., row: _Optional[int] = ..., column: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...

class ExplanationSummary(_message.Message):
    __slots__ = ("interaction_share", "interaction_total", "positive_interaction", "negative_interaction", "words", "top_interactions", "grid_height", "grid_width")
    INTERACTION_SHARE_FIELD_NUMBER: _ClassVar[int]
    INTERACTION_TOTAL_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_INTERACTION_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_INTERACTION_FIELD_NUMBER: _ClassVar[int]
    WORDS_FIELD_NUMBER: _ClassVar[int]
    TOP_INTERACTIONS_FIELD_NUMBER: _ClassVar[int]
    GRID_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    GRID_WIDTH_FIELD_NUMBER: _ClassVar[int]
    interaction_share: float
    interaction_total: float
    positive_interaction: float
    negative_interaction: float
    words: _containers.RepeatedCompositeFieldContainer[WordSummary]
    top_interactions: _containers.RepeatedCompositeFieldContainer[WordCell]
    grid_height: int
    grid_width: int
    def __init__(self, interaction_share: _Optional[float] = ..., interaction_total: _Optional[float] = ..., positive_interaction: _Optional[float] = ..., negative_interaction: _Optional[float] = ..., words: _Optional[_Iterable[_Union[WordSummary, _Mapping]]] = ..., top_interactions: _Optional[_Iterable[_Union[WordCell, _Mapping]]] = ..., grid_height: _Optional[int] = ..., grid_width: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LayerInfo(_message.Message):
    __slots__ = ("index", "name", "grid_height", "grid_width", "prefix")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    GRID_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    GRID_WIDTH_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    grid_height: int
    grid_width: int
    prefix: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., grid_height: _Optional[int] = ..., grid_width: _Optional[int] = ..., prefix: _Optional[_Iterable[str]] = ...) -> None: ...

class Preprocessing(_message.Message):
    __slots__ = ("mean", "std", "resize_mode", "interpolation", "fill_color", "conversion")
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    RESIZE_MODE_FIELD_NUMBER: _ClassVar[int]
    INTERPOLATION_FIELD_NUMBER: _ClassVar[int]
    FILL_COLOR_FIELD_NUMBER: _ClassVar[int]
    CONVERSION_FIELD_NUMBER: _ClassVar[int]
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    resize_mode: str
    interpolation: str
    fill_color: int
    conversion: str
    def __init__(self, mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., resize_mode: _Optional[str] = ..., interpolation: _Optional[str] = ..., fill_color: _Optional[int] = ..., conversion: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "architecture", "pretrained", "embed_dim", "image_size", "patch_size", "grid_height", "grid_width", "context_length", "text_layers", "image_layers", "default_text_layer", "default_image_layer", "default_n_steps", "default_method", "methods", "max_n_steps", "preprocessing", "device", "dtype", "text_layer_list", "image_layer_list", "default_text_layer_name", "default_image_layer_name", "text_sees_padding", "pad_token", "logit_bias")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    PRETRAINED_FIELD_NUMBER: _ClassVar[int]
    EMBED_DIM_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    GRID_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    GRID_WIDTH_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TEXT_LAYERS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TEXT_LAYER_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_IMAGE_LAYER_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_N_STEPS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_METHOD_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    MAX_N_STEPS_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    TEXT_LAYER_LIST_FIELD_NUMBER: _ClassVar[int]
    IMAGE_LAYER_LIST_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TEXT_LAYER_NAME_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_IMAGE_LAYER_NAME_FIELD_NUMBER: _ClassVar[int]
    TEXT_SEES_PADDING_FIELD_NUMBER: _ClassVar[int]
    PAD_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    name: str
    architecture: str
    pretrained: str
    embed_dim: int
    image_size: ImageSize
    patch_size: ImageSize
    grid_height: int
    grid_width: int
    context_length: int
    text_layers: int
    image_layers: int
    default_text_layer: int
    default_image_layer: int
    default_n_steps: int
    default_method: str
    methods: _containers.RepeatedScalarFieldContainer[str]
    max_n_steps: int
    preprocessing: Preprocessing
    device: str
    dtype: str
    text_layer_list: _containers.RepeatedCompositeFieldContainer[LayerInfo]
    image_layer_list: _containers.RepeatedCompositeFieldContainer[LayerInfo]
    default_text_layer_name: str
    default_image_layer_name: str
    text_sees_padding: bool
    pad_token: str
    logit_bias: float
    def __init__(self, name: _Optional[str] = ..., architecture: _Optional[str] = ..., pretrained: _Optional[str] = ..., embed_dim: _Optional[int] = ..., image_size: _Optional[_Union[ImageSize, _Mapping]] = ..., patch_size: _Optional[_Union[ImageSize, _Mapping]] = ..., grid_height: _Optional[int] = ..., grid_width: _Optional[int] = ..., context_length: _Optional[int] = ..., text_layers: _Optional[int] = ..., image_layers: _Optional[int] = ..., default_text_layer: _Optional[int] = ..., default_image_layer: _Optional[int] = ..., default_n_steps: _Optional[int] = ..., default_method: _Optional[str] = ..., methods: _Optional[_Iterable[str]] = ..., max_n_steps: _Optional[int] = ..., preprocessing: _Optional[_Union[Preprocessing, _Mapping]] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., text_layer_list: _Optional[_Iterable[_Union[LayerInfo, _Mapping]]] = ..., image_layer_list: _Optional[_Iterable[_Union[LayerInfo, _Mapping]]] = ..., default_text_layer_name: _Optional[str] = ..., default_image_layer_name: _Optional[str] = ..., text_sees_padding: _Optional[bool] = ..., pad_token: _Optional[str] = ..., logit_bias: _Optional[float] = ...) -> None: ...

class ServerLimits(_message.Message):
    __slots__ = ("max_message_bytes", "max_image_pixels", "max_image_side", "max_explanations_per_call", "max_pixels_per_call")
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_SIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_EXPLANATIONS_PER_CALL_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXELS_PER_CALL_FIELD_NUMBER: _ClassVar[int]
    max_message_bytes: int
    max_image_pixels: int
    max_image_side: int
    max_explanations_per_call: int
    max_pixels_per_call: int
    def __init__(self, max_message_bytes: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., max_image_side: _Optional[int] = ..., max_explanations_per_call: _Optional[int] = ..., max_pixels_per_call: _Optional[int] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "default_model", "limits")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    default_model: str
    limits: ServerLimits
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., default_model: _Optional[str] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ...) -> None: ...
