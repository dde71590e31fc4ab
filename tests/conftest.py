"""Shared fixtures: seeded random open_clip models, and a real server subprocess on loopback."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import time

import grpc
import open_clip
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, settings
from safetensors.torch import save_file

DATA = pathlib.Path(__file__).parent / "data"
TINY_CONFIG = DATA / "tiny-ViT.json"
TINY = "tiny-ViT"  # 64 px images, 16 px patches (4x4 grid), two blocks per tower
open_clip.add_model_config(TINY_CONFIG)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seeded_model(architecture: str, seed: int = 0) -> torch.nn.Module:
    """open_clip ``architecture`` with random weights from ``seed``, in eval mode (as the server builds it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.create_model(architecture, pretrained=None).eval()


def wait_serving(target: str, process: subprocess.Popen, timeout: float = 300.0) -> None:
    """Block until the server's health is SERVING; fail if the process exits first."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with code {process.returncode}")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"server at {target} not SERVING after {timeout} s")


class ServerProcess:
    """``python -m explain_server`` on free loopback ports (gRPC and /metrics); stops with SIGTERM."""

    def __init__(self, args: list[str], log_path: pathlib.Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{free_port()}/metrics"
        self.log_path = log_path
        self._log = open(log_path, "w")
        ports = ["--port", str(self.port), "--metrics-port", self.metrics_url.split(":")[2].split("/")[0]]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "explain_server", "--host", "127.0.0.1", *ports, *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        )

    def wait_serving(self, timeout: float = 300.0) -> "ServerProcess":
        """Wait for SERVING; on failure, show the server's log."""
        try:
            wait_serving(self.target, self.process, timeout)
        except (RuntimeError, TimeoutError) as err:
            self.stop()
            raise RuntimeError(f"{err}\n--- server log ---\n{self.log_path.read_text()}") from err
        return self

    def stop(self) -> int:
        """SIGTERM, wait, return the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


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
