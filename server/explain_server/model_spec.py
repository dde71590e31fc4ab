"""What a hosted model is: :class:`ModelSpec`, from a TOML ``[[models]]`` table or the
``--model NAME=ARCH:PRETRAINED[,KEY=VALUE]...`` shorthand.

Hugging Face transformers models (CLIPModel, SiglipModel, Siglip2Model) take the architecture
``hf`` and a local directory or hub repository id as PRETRAINED:
``--model NAME=hf:PATH_OR_REPO[,KEY=VALUE]...`` (``architecture = "hf"`` in a table).

Pure data: this module imports neither torch nor open_clip, so that reading a configuration
stays cheap; :mod:`.models` loads what a spec names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from .engine.quadrature import check_rule

# The service default where a model's towers name none (SplitTower.default_method): chosen by
# `make bench` (benchmarks/bench_engine.py), the cheapest rule whose convergence delta is no
# larger than both first-order Riemann rules' at n_steps=50.
DEFAULT_METHOD = "gausslegendre"
DEFAULT_N_STEPS = 3

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_OPTION = re.compile(r",(?P<key>[A-Za-z_]\w*)=(?P<value>[^,=/]*)$")
# a path's value may hold "/", so the tokenizer option is read by its key
_TOKENIZER_OPTION = re.compile(r",tokenizer=(?P<value>[^,=]+)$")
_INT_OPTIONS = ("text_layer", "image_layer", "n_steps", "instances")
_OPTIONS = ("text_layer", "image_layer", "n_steps", "method", "instances", "device", "tokenizer")
_REQUIRED = ("name", "architecture", "pretrained")

HF_ARCHITECTURE = "hf"
"""The architecture of a Hugging Face transformers model (its PRETRAINED names the model)."""

DEVICE_FORMS = "auto, cpu, cuda or cuda:INDEX"
"""The device settings there are, as messages name them."""


def is_device(value: object) -> bool:
    """Whether ``value`` is a device setting: ``auto``, ``cpu``, ``cuda`` or ``cuda:INDEX``."""
    return isinstance(value, str) and _DEVICE.fullmatch(value) is not None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # TOML's true is no count


@dataclass(frozen=True)
class ModelSpec:
    """A hosted model: what to load, its default explanation settings, and where it runs.

    Requests may override each explanation setting. Construction validates every field.

    Attributes:
        name: the name requests use.
        architecture: open_clip architecture (``open_clip.list_models()`` or a ``--model-config`` file
            stem), or ``hf`` for a Hugging Face transformers model.
        pretrained: an open_clip pretrained tag (downloaded and cached by open_clip when online),
            a path to a local weights file (.safetensors, .pt, .bin), or ``random:SEED`` for
            seeded random weights (tests and demos; not a trained model). With architecture
            ``hf``: a local directory that ``save_pretrained`` wrote (read offline) or a hub
            repository id such as ``google/siglip-base-patch16-224`` (fetched when online).
        text_layer: default text-tower attribution layer; None = the tower's family default
            (``SplitTower.default_layer``).
        image_layer: the same for the image tower.
        n_steps: default quadrature nodes; None = the family's (``SplitTower.default_n_steps``)
            when the method is the family's, else :data:`DEFAULT_N_STEPS`.
        method: default quadrature rule (Captum's names); None = the family's
            (``SplitTower.default_method``), else :data:`DEFAULT_METHOD`.
        instances: worker processes serving this model (at least 1).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:INDEX``; see
            :func:`explain_server.config.instance_devices` for what each instance gets.
        tokenizer: a local directory holding the model's Hugging Face tokenizer (as
            ``save_pretrained`` writes it), used instead of the hub tokenizer the architecture
            names (SigLIP, SigLIP2, CLIPA, XLM-RoBERTa, RoBERTa, NLLB, MetaCLIP 2 models), so
            that nothing is downloaded; None: open_clip's own tokenizer for the architecture.

    Raises:
        ValueError: a field of the wrong type or out of range, naming the field.
    """

    name: str
    architecture: str
    pretrained: str
    text_layer: int | None = None
    image_layer: int | None = None
    n_steps: int | None = None
    method: str | None = None
    instances: int = 1
    device: str = "auto"
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        for key in ("name", "architecture", "pretrained", "method"):
            value = getattr(self, key)
            if key == "method" and value is None:
                continue
            if not (isinstance(value, str) and value):
                raise ValueError(f"{key} must be a non-empty string; got {value!r}")
        for key in ("text_layer", "image_layer"):
            value = getattr(self, key)
            if value is not None and not (_is_int(value) and value >= 0):
                raise ValueError(f"{key} must be a non-negative integer; got {value!r}")
        if self.n_steps is not None and not _is_int(self.n_steps):
            raise ValueError(f"n_steps must be an integer; got {self.n_steps!r}")
        # a rule or a node count alone is checked as far as it goes; the family fills in the rest
        if self.method is not None:
            check_rule(self.method, 2 if self.n_steps is None else self.n_steps)
        elif self.n_steps is not None and self.n_steps < 1:
            raise ValueError(f"n_steps must be >= 1; got {self.n_steps}")
        if not (_is_int(self.instances) and self.instances >= 1):
            raise ValueError(f"instances must be a positive integer; got {self.instances!r}")
        if not is_device(self.device):
            raise ValueError(f"device must be {DEVICE_FORMS}; got {self.device!r}")
        if self.tokenizer is not None and not (isinstance(self.tokenizer, str) and self.tokenizer):
            raise ValueError(f"tokenizer must be a directory path; got {self.tokenizer!r}")

    @classmethod
    def parse(cls, text: str, defaults: Mapping[str, Any] | None = None) -> ModelSpec:
        """Parse the shorthand ``NAME=ARCH:PRETRAINED[,KEY=VALUE]...``, or ``NAME=hf:PATH_OR_REPO[,KEY=VALUE]...``.

        KEY is text_layer, image_layer, n_steps, instances (non-negative integers), method,
        device or tokenizer (a directory). Trailing ``,KEY=VALUE`` pieces (KEY an identifier;
        VALUE without ``,``, ``=`` or ``/``, except tokenizer's, which may hold ``/``) are read as
        options; any other comma stays part of PRETRAINED (a path may hold one).

        Args:
            text: the shorthand.
            defaults: values of the fields the text leaves out (e.g. the server-wide
                ``instances`` and ``device``); the dataclass defaults otherwise.

        Raises:
            ValueError: the text is not of that form, an option is unknown, repeats or has a
                bad value, or n_steps is too small for the method.
        """
        name, sep, rest = text.partition("=")
        architecture, sep2, pretrained = rest.partition(":")
        options: dict[str, int | str] = {}
        while (match := _OPTION.search(pretrained) or _TOKENIZER_OPTION.search(pretrained)) is not None:
            key, value = match.groupdict().get("key", "tokenizer"), match["value"]
            if key not in _OPTIONS:
                raise ValueError(f"unknown option {key!r}; options are {', '.join(_OPTIONS)}")
            if key in options:
                raise ValueError(f"option {key} is given twice")
            if key in _INT_OPTIONS and not value.isdigit():
                raise ValueError(f"{key} must be a non-negative integer; got {value!r}")
            options[key] = int(value) if key in _INT_OPTIONS else value
            pretrained = pretrained[: match.start()]
        if not (sep and sep2 and name and architecture and pretrained):
            raise ValueError(
                "must be NAME=ARCH:PRETRAINED[,OPTION=VALUE]... (e.g. b32=ViT-B-32:openai,n_steps=5) "
                "or NAME=hf:PATH_OR_REPO[,OPTION=VALUE]... (e.g. siglip=hf:google/siglip-base-patch16-224)"
            )
        return cls(
            **{**(defaults or {}), "name": name, "architecture": architecture, "pretrained": pretrained, **options}
        )

    @classmethod
    def from_table(cls, table: object, defaults: Mapping[str, Any] | None = None) -> ModelSpec:
        """Read a TOML ``[[models]]`` table: the field names as keys; name, architecture and
        pretrained required.

        Args:
            table: the decoded table.
            defaults: values of the fields the table leaves out, as in :meth:`parse`.

        Raises:
            ValueError: not a table, an unknown or missing key, or a bad value; the message
                names the key.
        """
        if not isinstance(table, Mapping):
            raise ValueError(f"must be a table with keys {', '.join(_REQUIRED)}, ...; got {table!r}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(table) - set(known))
        if unknown:
            raise ValueError(f"unknown keys {unknown}; keys are {', '.join(known)}")
        missing = [key for key in _REQUIRED if key not in table]
        if missing:
            raise ValueError(f"needs {', '.join(missing)}")
        return cls(**{**(defaults or {}), **table})

    @property
    def hf_source(self) -> str | None:
        """The local directory or hub repository id of a Hugging Face model (architecture ``hf``), else None."""
        return self.pretrained if self.architecture == HF_ARCHITECTURE else None

    @property
    def random_seed(self) -> int | None:
        """The seed when ``pretrained`` is ``random[:SEED]`` (open_clip architectures only), else None."""
        kind, _, seed = self.pretrained.partition(":")
        if kind != "random" or self.architecture == HF_ARCHITECTURE:
            return None
        return int(seed) if seed else 0
