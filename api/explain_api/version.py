"""``--version`` for every command: the version of the installed distribution it came with."""

from __future__ import annotations

import argparse
from importlib import metadata

__all__ = ["DISTRIBUTION", "add_version_argument"]

DISTRIBUTION = "clip-explain"
"""The distribution of the thin client and its commands."""


def add_version_argument(parser: argparse.ArgumentParser, distribution: str = DISTRIBUTION) -> None:
    """Add ``--version``, which prints ``PROG VERSION`` (``distribution``'s installed version) and exits 0."""
    try:
        version = metadata.version(distribution)
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        version = f"(not installed: no {distribution} distribution found)"
    parser.add_argument("--version", action="version", version=f"%(prog)s {version}")
