"""`make demo` on the install it makes: the server distribution without its extras."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
from PIL import Image

pytestmark = pytest.mark.integration

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_the_demo_runs_without_the_hf_extra(tmp_path):
    # transformers comes with server[hf] only; a package of that name that fails to import stands
    # for its absence in the demo and in the server the demo starts
    shadow = tmp_path / "shadow" / "transformers"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'transformers'\", name='transformers')\n"
    )
    paths = [str(tmp_path / "shadow"), *(str(ROOT / p) for p in ("api", "server", "client"))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "MPLBACKEND": "Agg"}
    out = tmp_path / "overlay.png"
    result = subprocess.run(
        [sys.executable, "-c", "from explain_server.demo import main; raise SystemExit(main())", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 of 3 phrases point inside their object" in result.stdout
    assert min(Image.open(out).size) >= 640
