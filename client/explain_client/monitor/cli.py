"""The ``explain-monitor`` command (docs/monitoring.md)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from explain_api.version import add_version_argument
from explain_client.monitor import compare

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """``explain-monitor``'s parser: one subcommand per job step."""
    parser = argparse.ArgumentParser(
        prog="explain-monitor", description="Monitor a model through its explanations (docs/monitoring.md)."
    )
    add_version_argument(parser)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    compare.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``explain-monitor``; returns the command's exit status."""
    args = build_parser().parse_args(argv)
    return args.func(args)
