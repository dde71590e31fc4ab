"""`pip install .` resolves to the thin client only: no torch."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

ROOT = pathlib.Path(__file__).resolve().parent.parent


def resolve(target: str, tmp_path: pathlib.Path) -> dict[str, str]:
    """{name: version} pip would install for ``target`` into an empty environment (nothing installed)."""
    report = tmp_path / "report.json"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", str(report), target],
        check=True, cwd=ROOT, capture_output=True, timeout=600,
    )
    items = json.loads(report.read_text())["install"]
    return {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"] for item in items}


def test_thin_client_has_no_torch(tmp_path):
    names = resolve(".", tmp_path)
    assert {"grpcio", "protobuf", "numpy", "pillow", "clip-explain"} <= set(names)
    assert not {"torch", "torchvision", "open-clip-torch"} & set(names)
