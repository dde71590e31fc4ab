"""The ``explain-eval`` command: grounding figures of a dataset through a running service."""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
from collections.abc import Sequence

from explain_api.grounding import DatasetError, load_dataset
from explain_api.version import add_version_argument
from explain_client.cli import add_credential_arguments, connection_credentials, layer_argument, positive_float
from explain_client.client import ExplainClient
from explain_client.errors import ExplainError
from explain_client.evaluation.report import markdown_table, summarise
from explain_client.evaluation.runner import evaluate

__all__ = ["build_parser", "main"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``explain-eval``."""
    parser = argparse.ArgumentParser(
        prog="explain-eval",
        description="Explain every (image, caption) pair of a grounding dataset through a running Explain "
        "service and report the pointing game, relevance mass and box-to-text accuracy, overall and per class.",
    )
    parser.add_argument("dataset", type=pathlib.Path, help="dataset JSON (format explain-eval-grounding/1, see README)")
    parser.add_argument("--target", default="localhost:50051", help="server address (default: %(default)s)")
    parser.add_argument("--model", help="hosted model name (default: the server's default)")
    parser.add_argument("--workers", type=_positive_int, default=4, help="requests in flight (default: %(default)s)")
    parser.add_argument("--limit", type=_positive_int, help="evaluate only the first N captions")
    parser.add_argument("--json", dest="json_out", type=pathlib.Path, metavar="PATH", help="write the JSON report here")
    parser.add_argument("--markdown", type=pathlib.Path, metavar="PATH", help="write the Markdown table here")
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=600.0,
        metavar="SECONDS",
        help="deadline per call (default: %(default)s)",
    )
    parser.add_argument("--n-steps", type=int, metavar="N", help="quadrature nodes (default: the server's)")
    parser.add_argument("--method", help="quadrature rule (default: the server's)")
    parser.add_argument(
        "--text-layer", type=layer_argument, metavar="L", help="text-tower layer, index or name (default: the server's)"
    )
    parser.add_argument(
        "--image-layer",
        type=layer_argument,
        metavar="L",
        help='image-tower layer, index or name such as "block 11" or "layer4" (default: the server\'s)',
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (there is none without tqdm, the eval extra)"
    )
    add_credential_arguments(parser)
    add_version_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``explain-eval``.

    Prints the Markdown table (and how many pairs were skipped, and why) to stdout.

    Returns:
        0 when at least one pair was scored; 1 for a bad dataset or output path, or when no
        pair could be scored; 2 when the server cannot be reached. Bad arguments make argparse
        exit with status 2.
    """
    args = build_parser().parse_args(argv)
    try:
        dataset = load_dataset(args.dataset)
    except (OSError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    options = {
        key: value
        for key, value in {
            "model": args.model,
            "n_steps": args.n_steps,
            "method": args.method,
            "text_layer": args.text_layer,
            "image_layer": args.image_layer,
        }.items()
        if value is not None
    }
    credentials, token = connection_credentials(args)
    try:
        with ExplainClient(args.target, timeout=args.timeout, credentials=credentials, token=token) as client:
            models = client.wait_until_ready(timeout=args.timeout)
            model = args.model or next(m.name for m in models if m.is_default)
            results = evaluate(
                client,
                dataset,
                workers=args.workers,
                limit=args.limit,
                progress=not args.no_progress,
                explain_options=options,
            )
    except ExplainError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    report = {"dataset": dataset.name or str(args.dataset), "model": model, "options": options, **summarise(results)}
    table = markdown_table(report)
    print(
        f"{dataset.name or args.dataset}: {report['pairs']} pairs scored on model {model!r} "
        f"(mean abs convergence delta {report['mean_abs_convergence_delta']:.2e})\n\n{table}"
    )
    if report["skipped"]:
        print(f"\n{len(report['skipped'])} pairs skipped, e.g. {report['skipped'][0]['reason']}")
    try:
        if args.json_out:
            args.json_out.write_text(json.dumps(report, indent=1, allow_nan=True) + "\n")
        if args.markdown:
            args.markdown.write_text(table + "\n")
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0 if report["pairs"] and not math.isnan(report["overall"]["pointing_accuracy"]) else 1


if __name__ == "__main__":
    sys.exit(main())
