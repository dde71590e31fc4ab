"""Shared fixtures: seeded random open_clip models, and a real server subprocess on loopback."""

from __future__ import annotations

import pathlib

import open_clip
import pytest
import torch
from hypothesis import HealthCheck, settings
from safetensors.torch import save_file
from servers import ServerProcess

DATA = pathlib.Path(__file__).parent / "data"
TINY_CONFIG = DATA / "tiny-ViT.json"
TINY = "tiny-ViT"  # 64 px images, 16 px patches (4x4 grid), two blocks per tower
open_clip.add_model_config(TINY_CONFIG)


def seeded_model(architecture: str, seed: int = 0) -> torch.nn.Module:
    """open_clip ``architecture`` with random weights from ``seed``, in eval mode (as the server builds it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.create_model(architecture, pretrained=None).eval()


@pytest.fixture(scope="session")
def b32_weights(tmp_path_factory) -> pathlib.Path:
    """ViT-B-32 with seeded random weights, saved as a local safetensors file."""
    path = tmp_path_factory.mktemp("weights") / "vit-b-32-seed0.safetensors"
    state = {k: v.contiguous() for k, v in seeded_model("ViT-B-32").state_dict().items()}
    save_file(state, str(path))
    return path


@pytest.fixture(scope="session")
def server(tmp_path_factory, b32_weights) -> ServerProcess:
    """A real Explain server hosting ``tiny`` (default; seeded random) and ``b32`` (weights file)."""
    proc = ServerProcess(
        [
            "--model-config", str(TINY_CONFIG),
            "--model", f"tiny={TINY}:random:0",
            "--model", f"b32=ViT-B-32:{b32_weights}",
            "--device", "cpu",
        ],
        tmp_path_factory.mktemp("logs") / "server.log",
    ).wait_serving()
    yield proc
    proc.stop()


@pytest.fixture
def client(server):
    """An ExplainClient connected to the session server."""
    from explain_client import ExplainClient

    with ExplainClient(server.target, timeout=300) as c:
        yield c


# Randomised tests: few examples in CI, many with `pytest --hypothesis-profile thorough`.
settings.register_profile(
    "ci", max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.register_profile(
    "thorough", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile("ci")
