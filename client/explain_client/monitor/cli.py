"""The ``explain-monitor`` command: ``explain`` a traffic sample through a running service into a
Parquet summary table, and ``compare`` two such tables for drift (docs/monitoring.md)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from explain_api.version import add_version_argument
from explain_client.monitor import compare, explain_command

__all__ = ["COMMANDS", "build_parser", "main"]

# The subcommands, in the order --help lists them: each module's register(subparsers) adds its
# parser and sets `run` (args -> exit code) as its default. A new subcommand adds its module here.
COMMANDS = (explain_command, compare)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``explain-monitor`` with every subcommand (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="explain-monitor",
        description="Model monitoring with explanations: summaries of a traffic sample, and drift between two.",
    )
    add_version_argument(parser)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``explain-monitor``; returns the subcommand's exit code (2 for bad arguments)."""
    args = build_parser().parse_args(argv)
    return args.run(args)
