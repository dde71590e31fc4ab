"""Server configuration: command-line flags, optionally from a TOML config file.

Precedence: built-in defaults < the ``--config`` file < flags given on the command line.
The config file uses the flags' long names with underscores, e.g.::

    models = ["b32=ViT-B-32:/weights/vit-b-32.safetensors"]
    default_model = "b32"
    host = "0.0.0.0"
    port = 50051
    max_batch_size = 16
"""

from __future__ import annotations

import argparse
import tomllib
from dataclasses import dataclass, field, fields

from .models import DEFAULT_METHOD, DEFAULT_N_STEPS, ModelSpec
from .settings import DEFAULT_AUTH_EXEMPT, DTYPES, BatchingConfig, ImageLimits, Limits
from .shapes import model as shapes_model

# The embedded default: the small known-answer model trained on generated shape scenes, shipped
# with the package, so the server starts offline with trained weights (its architecture is
# registered at start-up; see shapes/model.py).
DEFAULT_MODEL = shapes_model.spec()


@dataclass
class ServerConfig:
    """Everything the server needs to start. Units are in the field names."""

    models: list[str]
    model_configs: list[str]
    default_model: str | None = None
    host: str = "127.0.0.1"
    port: int = 50051
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
    auth_exempt: list[str] = field(default_factory=lambda: list(DEFAULT_AUTH_EXEMPT))

    @property
    def model_specs(self) -> list[ModelSpec]:
        """Parsed ``models``.

        Raises:
            ValueError: a malformed entry.
        """
        return [ModelSpec.parse(text) for text in self.models]

    @property
    def default_model_name(self) -> str:
        """``default_model``, or the first model's name."""
        return self.default_model or self.model_specs[0].name


def build_parser() -> argparse.ArgumentParser:
    """The ``explain-server`` argument parser (every default is None: see :func:`load_config`)."""
    p = argparse.ArgumentParser(
        prog="explain-server",
        description="Serve second-order CLIP explanations (explain.v1.Explain) over gRPC.",
    )
    p.add_argument("--config", help="TOML file with any of these options (flags override it)")
    p.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="NAME=ARCH:PRETRAINED[,OPTION=VALUE]...",
        help="a model to host (repeatable). PRETRAINED: an open_clip tag such as 'openai' (downloaded "
        "and cached by open_clip when online), a local weights file, or 'random:SEED' (seeded random "
        "weights, tests only). OPTIONs, the model's default explanation settings: text_layer, "
        f"image_layer (default: each tower's last block), n_steps ({DEFAULT_N_STEPS}), method "
        f"({DEFAULT_METHOD}). Default: {DEFAULT_MODEL}",
    )
    p.add_argument(
        "--model-config",
        dest="model_configs",
        action="append",
        metavar="PATH",
        help="an open_clip model config JSON (or a folder of them) to register as architectures (repeatable)",
    )
    p.add_argument("--default-model", help="model used when a request names none (default: the first)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, help="gRPC port (default 50051)")
    p.add_argument("--device", help="auto, cpu or cuda[:i] (default auto: CUDA when present)")
    p.add_argument("--dtype", choices=DTYPES, help="model weights and activations (default float32)")
    p.add_argument("--max-n-steps", type=int, help="largest n_steps a request may ask for (default 512)")
    p.add_argument("--max-image-pixels", type=int, help="largest width*height of an image (default 50000000)")
    p.add_argument("--max-image-side", type=int, help="largest width or height of an image, pixels (default 20000)")
    p.add_argument(
        "--max-pixels-per-call", type=int,
        help=f"most pixels of all the images of one call together (default {Limits.max_pixels_per_call})",
    )
    p.add_argument("--max-message-mb", type=int, help="largest request and response, MiB (default 64)")
    p.add_argument("--jvp-memory-mb", type=int, help="memory budget of one JVP chunk, MiB (default 256; raise it on GPUs)")
    p.add_argument(
        "--jvp-chunk-seconds",
        type=float,
        help="wall time one JVP chunk aims at, seconds (default 0.25): cancelled and expired requests are "
        "dropped between chunks, so this bounds how long they keep a model busy; 0 = memory budget only",
    )
    p.add_argument(
        "--max-batch-size", type=int, help="most requests per model run together (dynamic batching; 1 turns it off; default 16)"
    )
    p.add_argument(
        "--max-queue-delay-ms", type=float, help="longest a request waits for its batch to fill, milliseconds (default 0, as Triton's)"
    )
    p.add_argument(
        "--max-queue-size", type=int, help="most requests waiting per model; beyond it RESOURCE_EXHAUSTED (default 256)"
    )
    p.add_argument("--factor-cache-mb", type=int, help="factor cache per model, MiB (0 disables caching; default 256)")
    p.add_argument(
        "--intra-op-threads", type=int, help="torch intra-op threads on the CPU (default: torch's, one per core)"
    )
    p.add_argument("--metrics-port", type=int, help="Prometheus /metrics HTTP port (0 disables; default 9090)")
    p.add_argument(
        "--max-connection-age-seconds",
        type=float,
        help="close client connections after this long so that clients re-resolve and rebalance "
        "(default: never)",
    )
    p.add_argument("--grace-seconds", type=float, help="shutdown grace period, seconds (default 30)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    p.add_argument("--tls-cert", metavar="PEM", help="server certificate chain: serve TLS (with --tls-key)")
    p.add_argument("--tls-key", metavar="PEM", help="server private key")
    p.add_argument("--tls-client-ca", metavar="PEM", help="CA of client certificates: require mutual TLS")
    p.add_argument(
        "--auth-tokens-file", metavar="PATH", help="accepted bearer tokens, one per line (blank lines and # comments skipped)"
    )
    p.add_argument("--auth-tokens-env", metavar="VAR", help="environment variable with comma-separated bearer tokens")
    p.add_argument(
        "--auth-exempt",
        action="append",
        metavar="SERVICE",
        help="a service callable without a token (repeatable; default: grpc.health.v1.Health)",
    )
    return p


def load_config(argv: list[str] | None = None) -> ServerConfig:
    """Parse flags and the optional config file into a :class:`ServerConfig`.

    Raises:
        SystemExit: bad flags (argparse prints the reason).
        ValueError: unreadable config file, unknown keys, malformed model specs, or a value out
            of range (the message names the flag or the model).
    """
    args = vars(build_parser().parse_args(argv))
    values: dict = {}
    config_path = args.pop("config")
    if config_path:
        with open(config_path, "rb") as f:
            values = tomllib.load(f)
        known = {f.name for f in fields(ServerConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{config_path}: unknown keys {unknown}; known: {sorted(known)}")
    values.update({k: v for k, v in args.items() if v is not None})
    values.setdefault("models", [DEFAULT_MODEL])
    values.setdefault("model_configs", [])
    config = ServerConfig(**values)
    config.model_specs  # validate now, before anything loads
    for name in ("port", "metrics_port"):
        if not 0 <= getattr(config, name) <= 65535:
            raise ValueError(f"--{name.replace('_', '-')} must be in [0, 65535]; got {getattr(config, name)}")
    positive = ("max_n_steps", "max_image_pixels", "max_image_side", "max_message_mb", "jvp_memory_mb",
                "max_batch_size", "max_queue_size", "max_pixels_per_call")
    for name in positive:
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive; got {getattr(config, name)}")
    for name in ("grace_seconds", "max_queue_delay_ms", "factor_cache_mb", "jvp_chunk_seconds"):
        if getattr(config, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0; got {getattr(config, name)}")
    for spec in config.model_specs:
        if spec.default_n_steps > config.max_n_steps:
            raise ValueError(
                f"model {spec.name!r}: n_steps={spec.default_n_steps} exceeds --max-n-steps {config.max_n_steps}"
            )
    if config.intra_op_threads is not None and config.intra_op_threads < 1:
        raise ValueError(f"--intra-op-threads must be positive; got {config.intra_op_threads}")
    if config.max_connection_age_seconds is not None and config.max_connection_age_seconds <= 0:
        raise ValueError(f"--max-connection-age-seconds must be positive; got {config.max_connection_age_seconds}")
    return config
