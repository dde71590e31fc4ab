"""Shared fixtures: seeded random open_clip models, a real server subprocess on loopback, and test tiers."""

from __future__ import annotations

import pathlib

import open_clip
import pytest
import torch
from hypothesis import HealthCheck, settings
from safetensors.torch import save_file

from explain_server.launcher import ServerProcess

DATA = pathlib.Path(__file__).parent / "data"
TINY_CONFIG = DATA / "tiny-ViT.json"
TINY = "tiny-ViT"  # 64 px images, 16 px patches (4x4 grid), two blocks per tower
open_clip.add_model_config(TINY_CONFIG)

# One torch thread in the test process (the servers it starts choose their own): when other
# processes hold the cores, a second thread spin-waits for the first, and the in-process engine
# tests ran ten times slower on a busy 2-core machine.
torch.set_num_threads(1)


def seeded_model(architecture: str, seed: int = 0) -> torch.nn.Module:
    """open_clip ``architecture`` with random weights from ``seed``, in eval mode (as the server builds it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.create_model(architecture, pretrained=None).eval()


TIERS = ("unit", "integration", "slow")  # the markers registered in pyproject.toml


@pytest.hookimpl(tryfirst=True)  # before -m deselects: every collected test is checked, whatever runs
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Refuse to run unless every test carries exactly one tier marker, so that ``-m unit`` is
    the whole fast tier and a new test must choose its tier."""
    wrong = []
    for item in items:
        tiers = sorted({mark.name for mark in item.iter_markers() if mark.name in TIERS})
        if len(tiers) != 1:
            wrong.append(f"{item.nodeid}: {', '.join(tiers) or 'none'}")
    if wrong:
        raise pytest.UsageError(
            f"each test needs exactly one of the markers {', '.join(TIERS)} (pyproject.toml says what each means); "
            "these have other counts:\n" + "\n".join(wrong)
        )


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
            "--model-config",
            str(TINY_CONFIG),
            "--model",
            f"tiny={TINY}:random:0",
            "--model",
            f"b32=ViT-B-32:{b32_weights}",
            "--device",
            "cpu",
        ],
        tmp_path_factory.mktemp("logs") / "server.log",
    ).wait_serving()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> ServerProcess:
    """``explain-server`` with no flags: the shipped shapes model at its defaults, metrics on."""
    proc = ServerProcess([], tmp_path_factory.mktemp("logs") / "shapes-server.log").wait_serving()
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
    "thorough",
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ci")
