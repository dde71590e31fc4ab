"""Where the shipped ``shapes`` model lives, and how to name it to the server.

The model is an open_clip ``CLIP`` built from :data:`CONFIG` (registered with open_clip under
the architecture name :data:`ARCHITECTURE`, the file's stem) with the trained weights in
:data:`WEIGHTS`, whose image tower commutes with mirrors and quarter turns of the image
(:mod:`.symmetry`). Serve it with::

    explain-server --model-config CONFIG --model shapes=shapes-ViT:WEIGHTS,text_layer=0,image_layer=0,n_steps=8,method=riemann_trapezoid
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


TEXT_LAYER = 0
"""Default text attribution block: the token embeddings (input of block 0)."""
IMAGE_LAYER = 0
"""Default image attribution block: the patch embeddings (input of block 0)."""
N_STEPS = 8
"""Default quadrature nodes."""
METHOD = "riemann_trapezoid"
"""Default quadrature rule.

Why these four defaults, rather than exclip's last blocks and the service-wide rule: the model
card docs/shapes-model.md, section "The default explanation settings".
"""


def spec(name: str = NAME, weights: str | pathlib.Path = WEIGHTS) -> str:
    """The ``--model`` value hosting the shapes architecture as ``name``, with its default settings.

    Args:
        name: the hosted model's name.
        weights: a weights file, or ``random:SEED`` for the same architecture with seeded
            random weights (the untrained baseline).

    Returns:
        ``"NAME=shapes-ViT:WEIGHTS,text_layer=0,image_layer=0,n_steps=8,method=riemann_trapezoid"``.
    """
    return (
        f"{name}={ARCHITECTURE}:{weights},text_layer={TEXT_LAYER},image_layer={IMAGE_LAYER},"
        f"n_steps={N_STEPS},method={METHOD}"
    )


def server_args(name: str = NAME, weights: str | pathlib.Path = WEIGHTS) -> list[str]:
    """``explain-server`` flags hosting the shapes model as ``name`` (arguments as in :func:`spec`).

    Returns:
        ``["--model-config", CONFIG, "--model", spec(name, weights)]``.
    """
    return ["--model-config", str(CONFIG), "--model", spec(name, weights)]
