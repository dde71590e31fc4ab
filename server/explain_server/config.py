"""Server configuration: command-line flags, optionally from a TOML config file.

Precedence: the defaults (the fields of :class:`ServerConfig`) < the ``--config`` file < flags
given on the command line. The file uses the flags' long names with underscores, and a table per
model (the keys of :class:`~.model_spec.ModelSpec`)::

    default_model = "b32"
    host = "0.0.0.0"
    port = 50051
    max_batch_size = 16

    [[models]]
    name = "b32"
    architecture = "ViT-B-32"
    pretrained = "/weights/vit-b-32.safetensors"
    n_steps = 5
    instances = 2

``models = ["b32=ViT-B-32:/weights/vit-b-32.safetensors,n_steps=5"]``, the ``--model``
shorthand, reads the same. Loading a configuration imports neither grpc nor torch, so a bad
setting is reported, in one line naming it and its rule, before anything heavy loads.
"""

from __future__ import annotations

import argparse
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

from explain_api.version import add_version_argument

from . import DISTRIBUTION
from .model_spec import DEFAULT_METHOD, DEFAULT_N_STEPS, DEVICE_FORMS, ModelSpec, is_device
from .settings import DEFAULT_AUTH_EXEMPT, DTYPES, BatchingConfig, ImageLimits, Limits
from .shapes import model as shapes_model
from .tls_files import check_tls_files

# The embedded default: the small known-answer model trained on generated shape scenes, shipped
# with the package, so the server starts offline with trained weights (its architecture is
# registered at start-up; see shapes/model.py).
DEFAULT_MODEL = shapes_model.spec()
"""The ``--model`` shorthand of the model served when none is configured."""

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs to start. Units are in the field names.

    The field defaults are the server's defaults. Each model's ``instances`` and ``device``
    default to the server-wide ``instances`` and ``device`` (resolved by :func:`load_config`);
    :func:`instance_devices` gives each instance's device.
    """

    models: tuple[ModelSpec, ...]
    model_configs: tuple[str, ...] = ()
    default_model: str | None = None
    host: str = "127.0.0.1"
    port: int = 50051
    instances: int = 1
    device: str = "auto"
    dtype: str = "float32"
    # one source for the limits' defaults: the service's own
    max_n_steps: int = Limits.max_n_steps
    max_image_pixels: int = ImageLimits.max_pixels
    max_image_side: int = ImageLimits.max_side
    max_pixels_per_call: int = Limits.max_pixels_per_call
    max_message_mb: int = Limits.max_message_bytes >> 20
    jvp_memory_mb: int = 256
    jvp_chunk_seconds: float = 0.25
    max_batch_size: int = BatchingConfig.max_batch_size
    max_queue_delay_ms: float = BatchingConfig.max_queue_delay_seconds * 1000
    max_queue_size: int = BatchingConfig.max_queue_size
    factor_cache_mb: int = 256
    metrics_port: int = 9090
    intra_op_threads: int | None = None
    max_connection_age_seconds: float | None = None
    grace_seconds: float = 30.0
    log_level: str = "INFO"
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    auth_tokens_file: str | None = None
    auth_tokens_env: str | None = None
    auth_exempt: tuple[str, ...] = DEFAULT_AUTH_EXEMPT

    @property
    def default_model_name(self) -> str:
        """``default_model``, or the first model's name."""
        return self.default_model or self.models[0].name


_KEYS = sorted(f.name for f in fields(ServerConfig))
_DEFAULTS = {f.name: f.default for f in fields(ServerConfig)}

# Each setting's rule beyond its type: (check, the rule as messages state it).
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **dict.fromkeys(("port", "metrics_port"), (lambda v: 0 <= v <= 65535, "must be in [0, 65535]")),
    **dict.fromkeys(
        (
            "instances",
            "max_n_steps",
            "max_image_pixels",
            "max_image_side",
            "max_pixels_per_call",
            "max_message_mb",
            "jvp_memory_mb",
            "max_batch_size",
            "max_queue_size",
            "intra_op_threads",
        ),
        (lambda v: v >= 1, "must be positive"),
    ),
    **dict.fromkeys(
        ("grace_seconds", "max_queue_delay_ms", "factor_cache_mb", "jvp_chunk_seconds"),
        (lambda v: v >= 0, "must be >= 0"),
    ),
    "max_connection_age_seconds": (lambda v: v > 0, "must be positive"),
    "device": (is_device, f"must be {DEVICE_FORMS}"),
    "dtype": (lambda v: v in DTYPES, f"must be one of {', '.join(DTYPES)}"),
    "log_level": (lambda v: v.upper() in LOG_LEVELS, f"must be one of {', '.join(LOG_LEVELS)}"),
}
_TYPE_RULES = {int: "must be an integer", float: "must be a number", str: "must be a string"}
# flags whose names are not the key's
_FLAGS = {"models": "--model", "model_configs": "--model-config"}


def instance_devices(device: str, instances: int, cuda_count: int) -> list[str]:
    """The device of each of a model's worker processes, instance 0 first.

    ``auto`` puts instance i on ``cuda:(i mod cuda_count)``, or every instance on ``cpu`` when
    there is no GPU; ``cuda`` spreads the instances over the GPUs the same way but needs one;
    ``cpu`` and ``cuda:INDEX`` put every instance there.

    Args:
        device: a model's device setting (:attr:`.ModelSpec.device`).
        instances: how many instances (:attr:`.ModelSpec.instances`).
        cuda_count: how many CUDA devices there are (``torch.cuda.device_count()``).

    Raises:
        ValueError: ``device`` is none of those forms, ``instances`` is below 1, or a CUDA
            device it names is absent.
    """
    if not is_device(device):
        raise ValueError(f"device must be {DEVICE_FORMS}; got {device!r}")
    if instances < 1:
        raise ValueError(f"instances must be positive; got {instances}")
    if device == "cpu" or (device == "auto" and cuda_count == 0):
        return ["cpu"] * instances
    if device in ("auto", "cuda"):
        if cuda_count == 0:
            raise ValueError("device cuda: this machine has no CUDA device")
        return [f"cuda:{i % cuda_count}" for i in range(instances)]
    index = int(device.removeprefix("cuda:"))
    if index >= cuda_count:
        raise ValueError(f"device {device}: this machine has {cuda_count} CUDA device(s)")
    return [device] * instances


def build_parser() -> argparse.ArgumentParser:
    """The ``explain-server`` argument parser (every default is None: see :func:`load_config`)."""
    d = _DEFAULTS
    p = argparse.ArgumentParser(
        prog="explain-server",
        description="Serve second-order CLIP explanations (explain.v1.Explain) over gRPC.",
    )
    add_version_argument(p, DISTRIBUTION)
    p.add_argument("--config", help="TOML file with any of these options (flags override it)")
    p.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="NAME=ARCH:PRETRAINED[,OPTION=VALUE]...",
        help="a model to host (repeatable). PRETRAINED: an open_clip tag such as 'openai' (downloaded "
        "and cached by open_clip when online), a local weights file, or 'random:SEED' (seeded random "
        "weights, tests only). OPTIONs, the model's default explanation settings: text_layer, "
        "image_layer (default: the family's, docs/benchmarks.md), n_steps and method (default: the "
        f"family's, else {DEFAULT_METHOD} with {DEFAULT_N_STEPS} nodes); and where it runs: instances, device (default: --instances, --device). "
        f"Default: {DEFAULT_MODEL}",
    )
    p.add_argument(
        "--model-config",
        dest="model_configs",
        action="append",
        metavar="PATH",
        help="an open_clip model config JSON (or a folder of them) to register as architectures (repeatable)",
    )
    p.add_argument("--default-model", help="model used when a request names none (default: the first)")
    p.add_argument("--host", help=f"address to bind (default {d['host']}; 0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, help=f"gRPC port (default {d['port']})")
    p.add_argument(
        "--instances",
        type=int,
        help=f"worker processes per model (default {d['instances']}); a model's own instances overrides it",
    )
    p.add_argument(
        "--device",
        help=f"{DEVICE_FORMS} (default {d['device']}: the GPUs when present, instance i of a model on GPU "
        "i mod their number); a model's own device overrides it",
    )
    p.add_argument("--dtype", choices=DTYPES, help=f"model weights and activations (default {d['dtype']})")
    p.add_argument(
        "--max-n-steps", type=int, help=f"largest n_steps a request may ask for (default {d['max_n_steps']})"
    )
    p.add_argument(
        "--max-image-pixels", type=int, help=f"largest width*height of an image (default {d['max_image_pixels']})"
    )
    p.add_argument(
        "--max-image-side",
        type=int,
        help=f"largest width or height of an image, pixels (default {d['max_image_side']})",
    )
    p.add_argument(
        "--max-pixels-per-call",
        type=int,
        help=f"most pixels of all the images of one call together (default {d['max_pixels_per_call']})",
    )
    p.add_argument(
        "--max-message-mb", type=int, help=f"largest request and response, MiB (default {d['max_message_mb']})"
    )
    p.add_argument(
        "--jvp-memory-mb",
        type=int,
        help=f"memory budget of one JVP chunk, MiB (default {d['jvp_memory_mb']}; raise it on GPUs)",
    )
    p.add_argument(
        "--jvp-chunk-seconds",
        type=float,
        help=f"wall time one JVP chunk aims at, seconds (default {d['jvp_chunk_seconds']:g}): cancelled and "
        "expired requests are dropped between chunks, so this bounds how long they keep a model busy; "
        "0 = memory budget only",
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        help=f"most requests per model run together (dynamic batching; 1 turns it off; default {d['max_batch_size']})",
    )
    p.add_argument(
        "--max-queue-delay-ms",
        type=float,
        help=f"longest a request waits for its batch to fill, milliseconds (default {d['max_queue_delay_ms']:g}, "
        "as Triton's)",
    )
    p.add_argument(
        "--max-queue-size",
        type=int,
        help=f"most requests waiting per model; beyond it RESOURCE_EXHAUSTED (default {d['max_queue_size']})",
    )
    p.add_argument(
        "--factor-cache-mb",
        type=int,
        help=f"factor cache per model, MiB (0 disables caching; default {d['factor_cache_mb']})",
    )
    p.add_argument(
        "--intra-op-threads",
        type=int,
        help="torch intra-op threads per worker process (default: the cores shared out among all workers)",
    )
    p.add_argument(
        "--metrics-port", type=int, help=f"Prometheus /metrics HTTP port (0 disables; default {d['metrics_port']})"
    )
    p.add_argument(
        "--max-connection-age-seconds",
        type=float,
        help="close client connections after this long so that clients re-resolve and rebalance (default: never)",
    )
    p.add_argument(
        "--grace-seconds", type=float, help=f"shutdown grace period, seconds (default {d['grace_seconds']:g})"
    )
    p.add_argument("--log-level", help=f"{', '.join(LOG_LEVELS)} (default {d['log_level']})")
    p.add_argument("--tls-cert", metavar="PEM", help="server certificate chain: serve TLS (with --tls-key)")
    p.add_argument("--tls-key", metavar="PEM", help="server private key (unencrypted)")
    p.add_argument("--tls-client-ca", metavar="PEM", help="CA of client certificates: require mutual TLS")
    p.add_argument(
        "--auth-tokens-file",
        metavar="PATH",
        help="accepted bearer tokens, one per line (blank lines and # comments skipped)",
    )
    p.add_argument("--auth-tokens-env", metavar="VAR", help="environment variable with comma-separated bearer tokens")
    p.add_argument(
        "--auth-exempt",
        action="append",
        metavar="SERVICE",
        help=f"a service callable without a token (repeatable; default: {', '.join(DEFAULT_AUTH_EXEMPT)})",
    )
    return p


@dataclass(frozen=True)
class _Origin:
    """Where the settings came from, so that messages name each as its user wrote it."""

    path: str | None
    in_file: frozenset[str]

    def label(self, key: str) -> str:
        """The key as the file spells it, or its flag."""
        return key if key in self.in_file else _FLAGS.get(key, "--" + key.replace("_", "-"))

    def where(self, key: str) -> str:
        """``"PATH: "`` when the setting ``key`` came from the file, else nothing."""
        return f"{self.path}: " if key in self.in_file else ""

    def error(self, key: str, rule: str) -> ValueError:
        """``rule`` broken by the setting ``key``."""
        return ValueError(f"{self.where(key)}{self.label(key)} {rule}")

    def entry(self, index: int, entry: object) -> str:
        """The ``index``-th model entry, for messages."""
        if "models" not in self.in_file:
            return f"--model {entry!r}"
        shorthand = f" {entry!r}" if isinstance(entry, str) else ""
        return f"{self.path}: models[{index}]{shorthand}"


def _read_file(path: str) -> dict[str, Any]:
    """The settings of a TOML config file.

    Raises:
        ValueError: the file cannot be read, is not TOML, or has a key that is no setting.
    """
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except OSError as err:
        raise ValueError(f"--config {path}: cannot read it: {err.strerror or err}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid TOML: {err}") from None
    unknown = sorted(set(values) - set(_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; known: {_KEYS}")
    return values


def _typed(value: object, hint: object) -> object:
    """``value`` as the type ``hint`` (int, float, str, ``tuple[str, ...]``, or one of them | None).

    Raises:
        TypeError: ``value`` is not of that type; the message is the rule.
    """
    if isinstance(hint, types.UnionType):  # X | None: TOML has no null, and unset flags never get here
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if typing.get_origin(hint) is tuple:
        if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
            return tuple(value)
        raise TypeError("must be a list of strings")
    if isinstance(value, bool):  # an int to Python, but `port = true` is no port
        raise TypeError(_TYPE_RULES[hint])
    if hint is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, hint):
        raise TypeError(_TYPE_RULES[hint])
    return value


def _model_specs(entries: object, origin: _Origin, defaults: dict[str, Any]) -> tuple[ModelSpec, ...]:
    """The models of ``entries``: ``[[models]]`` tables and ``--model`` shorthands.

    Raises:
        ValueError: no entries, or a bad one; the message names it.
    """
    if not isinstance(entries, list):
        raise origin.error(
            "models", f"must be a list of [[models]] tables or NAME=ARCH:PRETRAINED strings; got {entries!r}"
        )
    if not entries:
        raise origin.error("models", "must name at least one model; got []")
    specs = []
    for index, entry in enumerate(entries):
        try:
            specs.append(
                ModelSpec.parse(entry, defaults) if isinstance(entry, str) else ModelSpec.from_table(entry, defaults)
            )
        except ValueError as err:
            raise ValueError(f"{origin.entry(index, entry)}: {err}") from None
    return tuple(specs)


def load_config(argv: list[str] | None = None) -> ServerConfig:
    """Parse flags and the optional config file into a :class:`ServerConfig`.

    Raises:
        SystemExit: bad flags (argparse prints the reason).
        ValueError: an unreadable or invalid config file, an unknown key, a setting of the wrong
            type or out of range, a malformed model, a default model that is not configured, or
            TLS files grpc could not use; the one-line message names the setting (as the flag,
            or as the file's key after the file's path) and the rule.
    """
    flags = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if v is not None}
    path = flags.pop("config", None)
    values = _read_file(path) if path else {}
    origin = _Origin(path, frozenset(values) - frozenset(flags))
    values.update(flags)
    entries = values.pop("models", [DEFAULT_MODEL])
    hints = typing.get_type_hints(ServerConfig)
    settings: dict[str, Any] = {}
    for key, value in values.items():
        try:
            settings[key] = _typed(value, hints[key])
        except TypeError as err:
            raise origin.error(key, f"{err}; got {value!r}") from None
        check, rule = _RULES.get(key, (None, ""))
        if check is not None and not check(settings[key]):
            raise origin.error(key, f"{rule}; got {value!r}")
    server_wide = ServerConfig(models=(), **settings)
    models = _model_specs(entries, origin, {"instances": server_wide.instances, "device": server_wide.device})
    config = replace(server_wide, models=models)
    _check_together(config, origin)
    return config


def _check_together(config: ServerConfig, origin: _Origin) -> None:
    """Check the rules that span settings.

    Raises:
        ValueError: as :func:`load_config`.
    """
    names = [spec.name for spec in config.models]
    if len(set(names)) != len(names):
        raise origin.error("models", f"names must be unique; got {names}")
    if config.default_model is not None and config.default_model not in names:
        raise origin.error("default_model", f"{config.default_model!r} is not one of the configured models {names}")
    for spec in config.models:
        if spec.n_steps is not None and spec.n_steps > config.max_n_steps:
            raise ValueError(
                f"{origin.where('models')}model {spec.name!r}: n_steps={spec.n_steps} exceeds "
                f"{origin.label('max_n_steps')} {config.max_n_steps}"
            )
    check_tls_files(config.tls_cert, config.tls_key, config.tls_client_ca, origin.label)
