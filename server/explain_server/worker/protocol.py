"""What crosses between the front end and a model worker: jobs, outcomes and reports.

Everything here is plain data (numpy arrays, no torch tensors, no protobuf), pickled over a
``multiprocessing`` connection. Inputs travel as numpy arrays on purpose: a pixel tensor
pickled through the pipe costs well under a millisecond, less than handing it over through
shared memory (docs/architecture.md has the measurement), and leaves nothing in ``/dev/shm``
if a process dies.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

from ..engine.attribution import Attribution
from ..engine.layers import Layer
from ..model_spec import DEFAULT_METHOD, DEFAULT_N_STEPS


class Tower(Enum):
    """Which tower a side goes through."""

    TEXT = "text"
    IMAGE = "image"


@dataclass(frozen=True)
class SideKey:
    """What a side's factor depends on: the factor cache's key.

    Attributes:
        tower: which tower.
        layer: the non-negative index (into the tower's layers) whose inputs are attributed.
        method, n_steps: the quadrature rule and its node count.
        digest: SHA-256 of the content (token ids, or the image's bytes as sent).
    """

    tower: Tower
    layer: int
    method: str
    n_steps: int
    digest: str


@dataclass(frozen=True)
class SideInput:
    """One side of a job: its key and its model inputs: token ids (S_t,) int64 as the text tower
    reads them (the caption's, then, for a tower that sees padding, pad ids up to its context
    length), or pixels (3, H, W)."""

    key: SideKey
    inputs: np.ndarray


@dataclass(frozen=True)
class JobSpec:
    """One explanation to compute.

    Attributes:
        job_id: unique among the jobs in flight on one worker.
        text, image: the two sides.
        deadline: ``time.monotonic()`` after which nobody wants the result (the clock is the
            machine's, shared by its processes), or None.
        waited: seconds already spent waiting in the front end (for a decoding thread).
    """

    job_id: int
    text: SideInput
    image: SideInput
    deadline: float | None
    waited: float


# front end -> worker


@dataclass(frozen=True)
class Submit:
    """Queue ``jobs`` together, all or none (an ExplainMany call's jobs)."""

    jobs: list[JobSpec]


@dataclass(frozen=True)
class Cancel:
    """Nobody awaits these jobs any more: drop them before or between chunks."""

    job_ids: list[int]


@dataclass(frozen=True)
class Stop:
    """Finish what is queued, then exit."""


# worker -> front end


@dataclass(frozen=True)
class ModelDescription:
    """What the front end needs to know of a loaded model to validate, tokenise and answer.

    Attributes:
        image_size, patch_size: (height, width) of the model input and of a ViT's patches, in
            pixels; the patch size is (0, 0) for towers without patches.
        embed_dim: D, the joint embedding width.
        logit_scale: exp(logit_scale).
        logit_bias: SigLIP's bias added to the scaled cosine; None for models without one.
        context_length: the text tower's token limit, special tokens included.
        text_layer_list, image_layer_list: the layers a request may attribute, by index (the
            explainer's ``text.layers`` and ``image.layers``).
        default_text_layer, default_image_layer: the layers explained when a request names none.
        text_sees_padding: the text tower reads its padding (SplitTower.sees_padding): inputs
            are padded to ``context_length`` with ``pad_id`` and every row is attributed.
        pad_id, pad_label: the id that pads token sequences, and the label of padding rows.
        preprocess_cfg: open_clip's preprocessing configuration, as a dict.
        device, dtype: where and in what the model runs.
        load_seconds: loading plus warm-up.
        default_method, default_n_steps: the quadrature explained with when a request names
            none (the model's configuration, else its family's; see ``LoadedModel``).
    """

    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    embed_dim: int
    logit_scale: float
    context_length: int
    text_layer_list: tuple[Layer, ...]
    image_layer_list: tuple[Layer, ...]
    default_text_layer: int
    default_image_layer: int
    text_sees_padding: bool
    pad_id: int
    pad_label: str
    preprocess_cfg: dict
    device: str
    dtype: str
    load_seconds: float
    logit_bias: float | None = None
    default_method: str = DEFAULT_METHOD
    default_n_steps: int = DEFAULT_N_STEPS

    @property
    def text_layers(self) -> int:
        """L_t, the number of text layers."""
        return len(self.text_layer_list)

    @property
    def image_layers(self) -> int:
        """L_v, the number of image layers."""
        return len(self.image_layer_list)

    @property
    def grid_size(self) -> tuple[int, int]:
        """(Gh, Gw) of the default image layer."""
        return self.image_layer_list[self.default_image_layer].grid


@dataclass(frozen=True)
class Ready:
    """The worker loaded and warmed up its model and takes jobs."""

    description: ModelDescription


@dataclass(frozen=True)
class LoadFailed:
    """The worker could not load or warm up its model; it exits after sending this."""

    message: str


@dataclass(frozen=True)
class Explained:
    """A job's result.

    Attributes:
        attribution: the pair's attribution.
        queue_seconds: waited before its batch started (the front end's wait included).
        compute_seconds: wall time of its batch.
    """

    attribution: Attribution
    queue_seconds: float
    compute_seconds: float


@dataclass(frozen=True)
class Dropped:
    """The job stopped (deadline passed or cancelled) before its result was complete."""


@dataclass(frozen=True)
class Failed:
    """The job failed in a way its caller is told about.

    Attributes:
        kind: ``non_finite`` (the dtype cannot represent the result), ``queue_full`` (the
            worker's queue had no room) or ``internal`` (a bug; logged by the worker under
            ``error_id`` with its traceback).
        message: for the caller.
        error_id: the log's id of an internal error, else "".
    """

    kind: str
    message: str
    error_id: str = ""


Outcome = Explained | Dropped | Failed


@dataclass(frozen=True)
class Finished:
    """A job's outcome."""

    job_id: int
    outcome: Outcome


@dataclass(frozen=True)
class BatchReport:
    """One executed batch, for the front end's metrics.

    Attributes:
        size: jobs in the batch (a batch that raised is run again job by job; those count too).
        cache_hits, cache_misses: factor lookups per tower.
        cache_bytes: bytes the factor cache holds after the batch.
    """

    size: int
    cache_hits: dict[Tower, int]
    cache_misses: dict[Tower, int]
    cache_bytes: int


@dataclass(frozen=True)
class QueueDepth:
    """Jobs waiting for a batch, sent whenever it changes."""

    depth: int
