"""The ``explain-client`` command: explain one image-caption pair from a shell."""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import os
import re
import sys
import unicodedata
from collections.abc import Sequence
from typing import NoReturn

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from explain_api.summary import Summary
from explain_api.version import add_version_argument
from explain_client.client import ExplainClient, bearer_metadata, tls_credentials
from explain_client.errors import ExplainError
from explain_client.explanation import Explanation, Span
from explain_client.summary_result import SummaryResult

__all__ = ["COMMANDS", "build_health_parser", "build_models_parser", "build_parser", "main"]

COMMANDS = ("explain", "health", "models")
"""The commands of ``explain-client``; ``explain`` when none is named."""
EXIT_LOCAL_ERROR = 1
"""Exit code for bad arguments and bad local input (unreadable image, unknown span, ...)."""
EXIT_SERVER_ERROR = 2
"""Exit code for a failed call, and for nothing else."""
EXIT_UNHEALTHY = 1
"""Exit code of ``explain-client health`` for anything but SERVING; Docker's HEALTHCHECK
reads 1 as unhealthy and reserves 2."""

_RANGE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


class _Parser(argparse.ArgumentParser):
    """Exits 1 on bad arguments, not argparse's 2: explain-client keeps 2 for failed calls, and
    Docker reserves 2 in health checks."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_LOCAL_ERROR, f"{self.prog}: error: {message}\n")


class _Scanner(argparse.ArgumentParser):
    """Finds the command word; leaves reporting bad arguments to the command's own parser."""

    def error(self, message: str) -> NoReturn:
        raise argparse.ArgumentError(None, message)


def positive_float(text: str) -> float:
    """argparse type of seconds and other quantities that must be > 0; shared with explain-eval."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def integer_argument(text: str, rule: str) -> int:
    """``text`` as an int for an argparse type function; text that is not one is refused naming
    ``rule`` (e.g. ">= 0"), not the type function's name, which argparse would print."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer {rule}, got {text!r}") from None


def non_negative_int(text: str) -> int:
    """argparse type of counts that may be 0; shared with explain-monitor."""
    value = integer_argument(text, ">= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def layer_argument(text: str) -> int | str:
    """argparse type of a layer: an index (negative counts from the end), or a name such as
    "block 11", "layer4" or "head"; shared with explain-eval."""
    try:
        return int(text)
    except ValueError:
        return text


def _parse_span(text: str) -> Span:
    match = _RANGE.match(text)
    return (int(match[1]), int(match[2])) if match else text


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``explain-client [explain]`` (exposed for tests and docs)."""
    parser = _Parser(
        prog="explain-client",
        usage="%(prog)s [explain] IMAGE CAPTION [options]\n"
        "       %(prog)s health [options]\n"
        "       %(prog)s models [options]",
        description="Explain a CLIP image-caption similarity with token x image-patch attributions. "
        "`explain-client models --help`: list the hosted models; `explain-client health --help`: the "
        "health check command. The connection options may also come before the command.",
    )
    parser.add_argument("image", metavar="IMAGE", help="image file (any format Pillow reads)")
    parser.add_argument("caption", metavar="CAPTION", help="caption text")
    _add_connection_arguments(parser)
    _add_explain_options(parser)
    add_version_argument(parser)
    return parser


def _add_explain_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``explain-client explain`` other than the connection's."""
    parser.add_argument("--model", help="hosted model name (default: the server's default)")
    parser.add_argument(
        "--span",
        type=_parse_span,
        help='caption part for --out: a substring such as "red circle", or a token row '
        "range START:STOP (default: all content tokens)",
    )
    parser.add_argument(
        "--out",
        metavar="PNG",
        help="write the overlay figure of --span (heatmap with title, colour bar, crop box and legend) to this file",
    )
    parser.add_argument("--json", action="store_true", help="print the whole explanation as JSON")
    parser.add_argument(
        "--detail",
        choices=("full", "summary"),
        default="full",
        help="summary: ask for the summary and the scalars only, no attribution tensor, as a monitoring "
        "job does (--out and --span need full; default: %(default)s)",
    )
    parser.add_argument(
        "--top",
        type=non_negative_int,
        default=5,
        metavar="K",
        help="token-region interactions to list (default: %(default)s)",
    )
    parser.add_argument("--timeout", type=positive_float, metavar="SECONDS", help="call deadline")
    parser.add_argument("--n-steps", type=int, metavar="N", help="quadrature nodes")
    parser.add_argument("--method", help='quadrature rule, e.g. "riemann_right", "gausslegendre"')
    parser.add_argument(
        "--text-layer",
        type=layer_argument,
        metavar="L",
        help='text-tower layer: index (negative: from the end) or name, e.g. "block 11" (`models --json` lists them)',
    )
    parser.add_argument(
        "--image-layer",
        type=layer_argument,
        metavar="L",
        help='image-tower layer: index (negative: from the end) or name, e.g. "block 11", "layer4", "head"',
    )
    parser.add_argument(
        "--show-padding",
        action="store_true",
        help="list padding rows too (models whose text tower sees padding, e.g. SigLIP, attribute them)",
    )


def _add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the server is and how to reach it: shared by the explain and health commands."""
    parser.add_argument(
        "--target",
        default="localhost:50051",
        help="server address, any gRPC target: host:port, dns:///host:port, "
        "ipv4:host:port,host:port (default: %(default)s)",
    )
    parser.add_argument(
        "--load-balancing-policy",
        metavar="POLICY",
        help='gRPC policy across the addresses the target resolves to, e.g. "round_robin" '
        "(default: gRPC's pick_first)",
    )
    add_credential_arguments(parser)


def add_credential_arguments(parser: argparse.ArgumentParser) -> None:
    """TLS and bearer-token flags, read back by :func:`connection_credentials`; shared with
    explain-eval and explain-loadgen."""
    parser.add_argument("--tls-ca", metavar="PEM", help="CA of the server's certificate: connect with TLS")
    parser.add_argument("--tls-cert", metavar="PEM", help="client certificate, for mutual TLS (with --tls-key)")
    parser.add_argument("--tls-key", metavar="PEM", help="client private key")
    parser.add_argument(
        "--token-env",
        metavar="VAR",
        default="EXPLAIN_TOKEN",
        help="environment variable holding a bearer token, sent when set (default: %(default)s)",
    )


def _subcommand_parser(name: str, description: str, timeout: float) -> argparse.ArgumentParser:
    """The parser of ``explain-client NAME``: the connection flags and a call deadline."""
    parser = _Parser(prog=f"explain-client {name}", description=description)
    _add_connection_arguments(parser)
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=timeout,
        metavar="SECONDS",
        help="call deadline (default: %(default)s)",
    )
    add_version_argument(parser)
    return parser


def build_health_parser() -> argparse.ArgumentParser:
    """The argument parser of ``explain-client health`` (exposed for tests and docs)."""
    parser = _subcommand_parser(
        "health",
        "Ask the server's grpc.health.v1.Health service; exit 0 only when SERVING, 1 otherwise "
        "(for container health checks).",
        timeout=5.0,
    )
    parser.add_argument(
        "--service",
        default="",
        help='service whose health to ask, e.g. "explain.v1.Explain" (default: the whole server)',
    )
    return parser


def build_models_parser() -> argparse.ArgumentParser:
    """The argument parser of ``explain-client models`` (exposed for tests and docs)."""
    parser = _subcommand_parser(
        "models",
        "List the models the server hosts (ListModels): names for --model, architecture, "
        "weights, grid, blocks and default explanation settings.",
        timeout=10.0,
    )
    parser.add_argument("--json", action="store_true", help="print every field of every model as JSON")
    return parser


def connection_credentials(args: argparse.Namespace) -> tuple[grpc.ChannelCredentials | None, str | None]:
    """Channel credentials and bearer token from the :func:`add_credential_arguments` flags.

    Raises:
        ValueError: a client certificate without its key or the reverse.
        OSError: a PEM file that cannot be read.
    """
    credentials = None
    if args.tls_ca or args.tls_cert:
        credentials = tls_credentials(args.tls_ca, args.tls_cert, args.tls_key)
    token = os.environ.get(args.token_env) if args.token_env else None
    return credentials, token


def _connect(args: argparse.Namespace) -> ExplainClient:
    """A client from the connection flags and ``--timeout``.

    Raises:
        ValueError, OSError: as :func:`connection_credentials`; an empty target.
    """
    credentials, token = connection_credentials(args)
    return ExplainClient(
        args.target,
        timeout=args.timeout,
        credentials=credentials,
        token=token,
        load_balancing_policy=args.load_balancing_policy,
    )


def _health(argv: Sequence[str]) -> int:
    """Run ``explain-client health``: 0 when SERVING, 1 otherwise; the status goes to stdout."""
    args = build_health_parser().parse_args(argv)
    try:
        credentials, token = connection_credentials(args)
        # the token goes with the check only, but the client warns when it travels in plaintext
        with ExplainClient(
            args.target, credentials=credentials, token=token, load_balancing_policy=args.load_balancing_policy
        ) as client:
            response = health_pb2_grpc.HealthStub(client.channel).Check(
                health_pb2.HealthCheckRequest(service=args.service),
                timeout=args.timeout,
                metadata=bearer_metadata(token),
            )
    except grpc.RpcError as err:
        print(f"error: {err.code().name}: {_health_error_details(err, args.service)}", file=sys.stderr)
        return EXIT_UNHEALTHY
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_UNHEALTHY
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(status)
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else EXIT_UNHEALTHY


def _health_error_details(err: grpc.RpcError, service: str) -> str:
    """The message of a failed health check. grpc.health.v1 answers a service it does not know
    NOT_FOUND with no message, which alone would print as an empty one."""
    if err.code() is grpc.StatusCode.NOT_FOUND and not err.details():
        return f"the server's health service knows no service {service!r}"
    return err.details()


def _models(argv: Sequence[str]) -> int:
    """Run ``explain-client models``: 0 with the models on stdout, 2 when the call fails, 1 for bad local files."""
    args = build_models_parser().parse_args(argv)
    try:
        with _connect(args) as client:
            models = client.list_models()
    except ExplainError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_SERVER_ERROR
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_LOCAL_ERROR
    if args.json:
        print(json.dumps([dataclasses.asdict(model) for model in models]))
        return 0
    header = (
        "model",
        "architecture",
        "weights",
        "grid",
        "layers (text, image)",
        "defaults (text, image, method, n_steps)",
    )
    rows = [
        (
            model.name + (" (default)" if model.is_default else ""),
            model.architecture,
            model.pretrained,
            f"{model.grid[0]}x{model.grid[1]}",
            f"{model.text_layers}, {model.image_layers}",
            f"{_layer_label(model.default_text_layer, model.default_text_layer_name)}, "
            f"{_layer_label(model.default_image_layer, model.default_image_layer_name)}, "
            f"{model.default_method}, {model.default_n_steps}",
        )
        for model in models
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _layer_label(index: int, name: str) -> str:
    """A layer as the reports show it: its name (servers that predate names: its index)."""
    return name or str(index)


def _format_report(explanation: Explanation, top: int, show_padding: bool = False) -> str:
    """The text report: score, layers, tokens (padding rows only with ``show_padding``), the
    image prefix's share, and the top interactions."""
    padding = set(explanation.padding_rows)
    shown = [row for row in range(len(explanation.tokens)) if show_padding or row not in padding]
    tokens = " ".join(f"[{i}]{explanation.tokens[i]}" for i in shown)
    if padding and not show_padding:
        label = explanation.tokens[min(padding)]
        tokens += f"  (+{len(padding)} padding rows {label!r} not shown; --show-padding lists them)"
    lines = [*_head_lines(explanation, explanation.grid), "tokens:            " + tokens]
    if explanation.image_prefix:
        sums = explanation.prefix_attribution.sum(axis=0, dtype=np.float64)
        lines.append(
            "image prefix:      "
            + ", ".join(f"{label} {_signed(value)}" for label, value in zip(explanation.image_prefix, sums))
            + " (summed over tokens)"
        )
    interactions = explanation.top_interactions(top)
    if interactions:
        width = max(len("token"), *(len(label) for _, label, *_ in interactions))
        lines += ["", f"top {len(interactions)} token-region interactions (cosine units):"]
        lines.append(f"  {'row':>4}  {'token':<{width}}  {'cell (row, col)':<15}  value")
        for row, label, i, j, value in interactions:
            lines.append(f"  {row:>4}  {label:<{width}}  {f'({i}, {j})':<15}  {_signed(value)}")
    if explanation.summary is not None:
        lines += ["", *_format_summary(explanation.summary)]
    return "\n".join(lines)


def _head_lines(result: Explanation | SummaryResult, grid: tuple[int, int]) -> list[str]:
    """Model, score, convergence delta and layers: the first lines of either report."""
    options = result.options
    return [
        f"model:             {result.model}",
        f"score:             {result.score:.6f} (cosine; logit {result.logit:.4f})",
        f"convergence delta: {result.convergence_delta:.3e}",
        f"layers:            text {_layer_label(options.text_layer, options.text_layer_name)}; "
        f"image {_layer_label(options.image_layer, options.image_layer_name)} ({grid[0]}x{grid[1]} grid)",
    ]


def _format_summary_report(result: SummaryResult) -> str:
    """The text report of a ``--detail summary`` call: score, layers, then the summary."""
    grid = (result.summary.grid_height, result.summary.grid_width)
    return "\n".join([*_head_lines(result, grid), "", *_format_summary(result.summary)])


def _signed(value: float, digits: int = 6) -> str:
    """``value`` with its sign, never "-0.000000": a value that rounds to zero reads "+0.000000"."""
    return f"{round(float(value), digits) + 0.0:+.{digits}f}"


def _display_width(text: str) -> int:
    """Terminal columns of ``text``: wide and full-width characters (CJK) take two."""
    return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text)


def _format_summary(summary: Summary) -> list[str]:
    """The summary's lines: interaction share and mass, then one line per caption word."""
    lines = [
        f"interaction share: {summary.interaction_share:.4f} (token x image interactions / (score - convergence delta))",
        f"interactions:      {_signed(summary.interaction_total)} (positive {_signed(summary.positive_interaction)}, "
        f"negative {_signed(summary.negative_interaction)})",
    ]
    if not summary.words:
        return [*lines, "words:             none (the caption spells no letter or digit)"]
    width = max(len("word"), *(_display_width(word.text) for word in summary.words))
    lines += [
        "",
        f"words (relevance: sum over the {summary.grid_height}x{summary.grid_width} grid, cosine units; "
        "concentration: share of |mass| in the top 10% cells):",
        f"  {'word':<{width}}  {'relevance':>10}  {'peak cell':<10}  {'peak value':>10}  concentration",
    ]
    for word in summary.words:
        peak = f"({word.peak_row}, {word.peak_column})"
        text = word.text + " " * (width - _display_width(word.text))
        lines.append(
            f"  {text}  {_signed(word.relevance):>10}  {peak:<10}  {_signed(word.peak_value):>10}  "
            f"{word.concentration:.3f}"
        )
    return lines


def _format_span(explanation: Explanation, span: Span) -> str:
    """Where a caption span's heatmap peaks, and its strongest and weakest cells."""
    rows = explanation.rows(span)
    heat = explanation.heatmap(span)
    i, j = divmod(int(heat.argmax()), heat.shape[1])
    labels = " ".join(explanation.tokens[r] for r in rows)
    return (
        f"span {labels!r} (rows {rows[0]}-{rows[-1]}): peak at cell ({i}, {j}) = {_signed(heat[i, j])}; "
        f"sum {_signed(heat.sum())}"
    )


def _letters(text: str) -> str:
    return "".join(char for char in unicodedata.normalize("NFKC", text).casefold() if char.isalnum())


def _check_span(span: Span, caption: str) -> None:
    """Refuse a ``--span`` that cannot name a part of ``caption``, before the (costly) call.

    A row range needs START < STOP; whether STOP is within the tokens is known after the call.
    A substring must occur in the caption when both are compared on their letters and digits
    alone, case-folded, with the caption's HTML entities decoded (twice, as the tokenizer
    does): the tokenizer's cleaning may change the rest, so this refuses only spans that no
    token rows can match, and :meth:`Explanation.rows` decides the others.

    Raises:
        ValueError: an empty range or substring, or a substring not in the caption.
    """
    if isinstance(span, tuple):
        start, stop = span
        if start >= stop:
            raise ValueError(f"--span {start}:{stop}: START must be below STOP")
    elif not span.strip():
        raise ValueError("--span: empty; give a part of the caption or a token row range START:STOP")
    elif _letters(span) not in _letters(html.unescape(html.unescape(caption))):
        raise ValueError(f"--span {span!r} is not in the caption {caption!r}")


def _check_out(path: str) -> None:
    """Refuse an ``--out`` the overlay could not be written to, before the (costly) call.

    Raises:
        ValueError: an extension Pillow cannot write, or a directory that does not exist or
            is not writable.
    """
    extension = os.path.splitext(path)[1].lower()
    if Image.registered_extensions().get(extension) not in Image.SAVE:
        raise ValueError(
            f"--out: Pillow cannot write {extension or 'files without an extension'}; use e.g. .png or .jpg"
        )
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise ValueError(f"--out: {directory} is not a writable directory")


def _split_command(argv: list[str]) -> tuple[str, list[str]]:
    """The command ``argv`` names, and its arguments without the command word.

    The command word is the first argument that is neither an option nor an option's value,
    when it is one of :data:`COMMANDS`; without one, the command is ``explain`` and every
    argument is its own (``explain-client IMAGE CAPTION``). So the connection options may come
    before the command (``--target HOST:PORT models``), and an option's value, such as a model
    named "models", is never read as a command.
    """
    scanner = _Scanner(add_help=False)
    _add_connection_arguments(scanner)
    _add_explain_options(scanner)
    scanner.add_argument("first", nargs="?")
    scanner.add_argument("rest", nargs=argparse.REMAINDER)
    try:
        scanned, _ = scanner.parse_known_args(argv)
    except argparse.ArgumentError:  # the explain parser reports it
        return "explain", argv
    at = len(argv) - len(scanned.rest) - 1
    if scanned.first not in COMMANDS or "--" in argv[:at]:  # after "--", a positional argument
        return "explain", argv
    return scanned.first, argv[:at] + argv[at + 1 :]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``explain-client``: ``explain`` (also when no command is named), ``health`` or ``models``.

    The command is the first argument that is neither an option nor an option's value (an
    image file named like a command: pass ``./models``); the connection options may come before
    or after it.

    Args:
        argv: arguments without the program name; ``None`` = ``sys.argv[1:]``.

    Returns:
        0 on success, 1 for bad local input (unreadable image or output path,
        span not in the caption), 2 when the server call fails; the error is
        printed to stderr as "error: ...". ``health``: 0 when the server is
        SERVING, 1 for any other status or a failed call. ``models``: 0, or
        2 when the call fails and 1 for unreadable TLS files. Bad arguments exit
        with status 1 (``SystemExit``), as other local errors; ``--help`` and
        ``--version`` with status 0.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    command, arguments = _split_command(argv)
    return {"explain": _explain, "health": _health, "models": _models}[command](arguments)


def _explain(argv: Sequence[str]) -> int:
    """Run ``explain-client explain``: the report (or JSON) on stdout; exit codes as :func:`main`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.detail == "summary" and (args.out or args.span is not None):
        parser.error(f"{'--out' if args.out else '--span'} needs the attribution: leave out --detail summary")
    try:
        if args.span is not None:
            _check_span(args.span, args.caption)
        if args.out:
            _check_out(args.out)
        with _connect(args) as client:
            explanation = client.explain(
                args.image,
                args.caption,
                model=args.model,
                text_layer=args.text_layer,
                image_layer=args.image_layer,
                n_steps=args.n_steps,
                method=args.method,
                detail=args.detail,
            )
    except ExplainError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_SERVER_ERROR
    except OSError as err:
        if err.filename == args.image:  # say which argument, not only the errno
            print(f"error: image: cannot read {args.image}: {err.strerror}", file=sys.stderr)
        else:
            print(f"error: {err}", file=sys.stderr)
        return EXIT_LOCAL_ERROR
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_LOCAL_ERROR

    if args.json:
        print(json.dumps(explanation.to_dict()))
    elif args.detail == "summary":
        print(_format_summary_report(explanation))
    else:
        print(_format_report(explanation, args.top, args.show_padding))
    if args.detail == "summary":
        return 0

    content = explanation.content_rows or [0]
    span = args.span if args.span is not None else (content[0], content[-1] + 1)
    try:
        if args.span is not None and not args.json:
            print("\n" + _format_span(explanation, span))
        if args.out:
            explanation.overlay(args.image, span).save(args.out)  # format from the file name
            if not args.json:
                print(f"\noverlay written to {args.out}")
    except (OSError, ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_LOCAL_ERROR
    return 0
