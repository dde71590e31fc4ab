"""``explain-server`` as a child process on a free loopback port: started, awaited until SERVING, stopped.

``explain-demo`` starts its server with it, and so do the tests and the benchmarks.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on ``HOST`` that is free now; another process may take it before it is used."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants: a server's front end, then its workers (and
    multiprocessing's resource tracker)."""
    tree = [pid]
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            tree += process_tree(int(child))
    return tree


def is_worker(pid: int) -> bool:
    """A model worker: started by ``multiprocessing`` with ``spawn``, not its resource tracker."""
    cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
    return b"spawn_main" in cmdline and b"resource_tracker" not in cmdline


def server_command(*args: str, port: int, metrics_port: int = 0) -> list[str]:
    """``python -m explain_server`` with ``args`` on ``port`` of ``HOST``, /metrics on ``metrics_port`` (0: none)."""
    ports = ["--port", str(port), "--metrics-port", str(metrics_port)]
    return [sys.executable, "-m", "explain_server", "--host", HOST, *ports, *args]


def wait_serving(target: str, process: subprocess.Popen, timeout: float = 300.0) -> None:
    """Block until the server at ``target`` reports SERVING.

    Raises:
        RuntimeError: ``process`` exited first.
        TimeoutError: not SERVING within ``timeout`` seconds.
    """
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
    """``python -m explain_server`` with ``args`` on a free port of ``HOST``, started at construction.

    ``metrics`` gives it a free /metrics port (``metrics_url``; None without). Its output goes
    to ``log_path``, or nowhere when None. It runs offline (``HF_HUB_OFFLINE=1``) with ``env``
    added to this process's environment. :meth:`stop` ends it.
    """

    def __init__(
        self,
        args: list[str],
        log_path: pathlib.Path | None = None,
        *,
        env: dict[str, str] | None = None,
        metrics: bool = True,
    ):
        self.port = free_port()
        self.target = f"{HOST}:{self.port}"
        self.metrics_port = free_port() if metrics else 0
        self.metrics_url = f"http://{HOST}:{self.metrics_port}/metrics" if metrics else None
        self.log_path = log_path
        self._log = open(log_path, "w") if log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            server_command(*args, port=self.port, metrics_port=self.metrics_port),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        )

    def wait_serving(self, timeout: float = 300.0) -> ServerProcess:
        """Wait for SERVING (see :func:`wait_serving`); on failure stop the server and raise
        RuntimeError with its log."""
        try:
            wait_serving(self.target, self.process, timeout)
        except (RuntimeError, TimeoutError) as err:
            self.stop()
            log = self.log_path.read_text() if self.log_path else "(not kept)"
            raise RuntimeError(f"{err}\n--- server log ---\n{log}") from err
        return self

    def stop(self) -> int:
        """SIGTERM, wait (SIGKILL after 60 s), return the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.log_path:
            self._log.close()
        return self.process.returncode
