"""Where the shipped ``shapes`` model lives, and how to name it to the server.

The model is an open_clip ``CLIP`` built from :data:`CONFIG` (registered with open_clip under
the architecture name :data:`ARCHITECTURE`, the file's stem) with the trained weights in
:data:`WEIGHTS`. Serve it with::

    explain-server --model-config CONFIG --model shapes=shapes-ViT:WEIGHTS
"""

from __future__ import annotations

import pathlib

ASSETS = pathlib.Path(__file__).resolve().parent.parent / "assets" / "shapes"
CONFIG = ASSETS / "shapes-ViT.json"
"""open_clip model config: 96 px images, 12 px patches (8x8 grid), causal text tower."""
ARCHITECTURE = CONFIG.stem
"""The open_clip architecture name the config registers."""
WEIGHTS = ASSETS / "shapes-ViT.safetensors"
"""Trained weights (float16 safetensors; loading casts them to the model's dtype)."""
NAME = "shapes"
"""The model's name on the server."""


def server_args(name: str = NAME, weights: str | pathlib.Path = WEIGHTS) -> list[str]:
    """``explain-server`` flags hosting the shapes model as ``name``.

    Args:
        name: the hosted model's name.
        weights: a weights file, or ``random:SEED`` for the same architecture with seeded
            random weights (the untrained baseline).

    Returns:
        ``["--model-config", CONFIG, "--model", "NAME=shapes-ViT:WEIGHTS"]``.
    """
    return ["--model-config", str(CONFIG), "--model", f"{name}={ARCHITECTURE}:{weights}"]
