"""`pip install .` resolves to the thin client only: no torch, and only commands that run without it."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys
import tomllib

import pytest

pytestmark = pytest.mark.integration

ROOT = pathlib.Path(__file__).resolve().parent.parent
CLIENT_COMMANDS = {"explain-client", "explain-loadgen", "explain-eval", "explain-eval-convert", "explain-monitor"}
SERVER_COMMANDS = {"explain-server", "explain-demo", "shapes-scenes", "shapes-traffic"}


def resolve(target: str, tmp_path: pathlib.Path) -> dict[str, str]:
    """{name: version} pip would install for ``target`` into an empty environment (nothing installed)."""
    report = tmp_path / "report.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            str(report),
            target,
        ],
        check=True,
        cwd=ROOT,
        capture_output=True,
        timeout=600,
    )
    items = json.loads(report.read_text())["install"]
    return {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"] for item in items}


def project(pyproject: pathlib.Path) -> dict:
    return tomllib.loads(pyproject.read_text())["project"]


def test_thin_client_has_no_torch(tmp_path):
    names = resolve(".", tmp_path)
    assert {"grpcio", "grpcio-health-checking", "protobuf", "numpy", "pillow", "clip-explain"} <= set(names)
    assert not {"torch", "torchvision", "open-clip-torch"} & set(names)


def test_the_server_is_a_distribution_of_its_own_on_the_same_client():
    client, server = project(ROOT / "pyproject.toml"), project(ROOT / "server" / "pyproject.toml")
    assert set(client["scripts"]) == CLIENT_COMMANDS
    assert all(target.startswith("explain_client.") for target in client["scripts"].values())
    assert set(server["scripts"]) == SERVER_COMMANDS
    assert all(target.startswith("explain_server.") for target in server["scripts"].values())
    assert server["version"] == client["version"]
    assert f"{client['name']}=={client['version']}" in server["dependencies"]


@pytest.fixture(scope="module")
def thin_bin(tmp_path_factory) -> pathlib.Path:
    """The scripts folder of a new virtualenv holding ``pip install .`` and nothing else."""
    tmp = tmp_path_factory.mktemp("thin")
    source = tmp / "src"  # a copy, so that the build leaves nothing in the checkout
    for package_root in ("api", "client"):
        shutil.copytree(
            ROOT / package_root, source / package_root, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "venv", str(tmp / "venv")], check=True, timeout=300)
    subprocess.run(
        [tmp / "venv" / "bin" / "python", "-m", "pip", "install", "--quiet", str(source)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return tmp / "venv" / "bin"


def run(*command: str | pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_thin_install_puts_only_commands_that_run_on_the_path(thin_bin):
    installed = {path.name for path in thin_bin.iterdir() if path.name.startswith(("explain-", "shapes-"))}
    assert installed == CLIENT_COMMANDS
    version = project(ROOT / "pyproject.toml")["version"]
    for command in sorted(installed):
        result = run(thin_bin / command, "--version")
        assert (result.returncode, result.stdout.strip()) == (0, f"{command} {version}"), result.stderr
        result = run(thin_bin / command, "--help")
        assert result.returncode == 0, f"{command} --help: {result.stderr}"


def test_thin_install_health_check_passes_against_a_real_server(thin_bin, server):
    result = run(thin_bin / "explain-client", "health", "--target", server.target)
    assert (result.returncode, result.stdout.strip()) == (0, "SERVING"), result.stderr


@pytest.mark.parametrize("argv", [["explain", "sample.jsonl", "out"], ["compare", "baseline", "current"]])
def test_thin_install_explain_monitor_names_the_extra_it_lacks(thin_bin, tmp_path, argv):
    result = subprocess.run(
        [thin_bin / "explain-monitor", *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr
    assert "pip install 'clip-explain[monitor]'" in result.stderr
