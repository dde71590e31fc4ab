"""The console commands in process: parsing, exit codes, versions and warnings (no server)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import warnings
from importlib import metadata

import grpc
import pytest

from explain_api.grounding import load_dataset
from explain_client import ExplainClient, PlaintextTokenWarning, cli, errors, loadgen
from explain_client.evaluation import cli as eval_cli
from explain_client.evaluation import convert, runner
from explain_server import demo, server
from explain_server.shapes import dataset as shapes_dataset
from explain_server.shapes import traffic as shapes_traffic

pytestmark = pytest.mark.unit

ROOT = pathlib.Path(__file__).resolve().parent.parent
HELDOUT = ROOT / "benchmarks" / "data" / "shapes-heldout" / "dataset.json"


class DownClient:
    """An ExplainClient stand-in whose every call fails as an unreachable server's would."""

    def explain(self, *args, **kwargs):
        raise errors.UnavailableError("connection refused")


@pytest.mark.parametrize(
    ("argv", "command", "arguments"),
    [
        (["cat.jpg", "a cat", "--json"], "explain", ["cat.jpg", "a cat", "--json"]),
        (["explain", "cat.jpg", "a cat"], "explain", ["cat.jpg", "a cat"]),
        (["--target", "h:1", "explain", "cat.jpg", "a cat"], "explain", ["--target", "h:1", "cat.jpg", "a cat"]),
        (["--target", "h:1", "models", "--json"], "models", ["--target", "h:1", "--json"]),
        (["models", "--target", "h:1"], "models", ["--target", "h:1"]),
        (["--tls-ca", "ca.pem", "health", "--service", "s"], "health", ["--tls-ca", "ca.pem", "--service", "s"]),
        # values and positional arguments named like a command are none
        (["--model", "models", "cat.jpg", "a cat"], "explain", ["--model", "models", "cat.jpg", "a cat"]),
        (["--span", "health", "cat.jpg", "health"], "explain", ["--span", "health", "cat.jpg", "health"]),
        (["--", "models", "a cat"], "explain", ["--", "models", "a cat"]),
        (["./models", "a cat"], "explain", ["./models", "a cat"]),
    ],
)
def test_cli_finds_the_command_word(monkeypatch, argv, command, arguments):
    called = []
    for name in cli.COMMANDS:
        monkeypatch.setattr(cli, f"_{name}", lambda given, name=name: called.append((name, given)) or 0)
    assert cli.main(argv) == 0
    assert called == [(command, arguments)]


@pytest.mark.parametrize(
    ("span", "message"),
    [
        ("a dog", "--span 'a dog' is not in the caption 'A red circle &amp; a blue square.'"),
        ("  ", "--span: empty"),
        ("3:3", "--span 3:3: START must be below STOP"),
    ],
)
def test_cli_refuses_a_span_before_calling(tmp_path, capsys, span, message):
    image = tmp_path / "photo.png"
    image.write_bytes(b"not read: the span is refused first")
    # nothing listens on port 1: had the call been made, it would have failed with exit code 2
    argv = [str(image), "A red circle &amp; a blue square.", "--target", "127.0.0.1:1", "--span", span]
    assert cli.main(argv) == cli.EXIT_LOCAL_ERROR
    assert capsys.readouterr().err.startswith(f"error: {message}")


@pytest.mark.parametrize("span", ["RED circle", "redcircle", "&", "circle & a", "blue square.", "1:3"])
def test_cli_span_check_lets_through_what_the_tokens_may_match(span):
    cli._check_span(cli._parse_span(span), "A red circle &amp; a blue square.")


def test_evaluate_runs_without_tqdm(monkeypatch, capsys):
    monkeypatch.setattr(runner, "tqdm", None)  # the thin client, without the eval extra
    results = runner.evaluate(DownClient(), load_dataset(HELDOUT), limit=3, progress=True)
    assert [result.error for result in results] == ["UnavailableError: UNAVAILABLE: connection refused"] * 3
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("main", "argv", "prog", "distribution"),
    [
        (cli.main, [], "explain-client", "clip-explain"),
        (cli.main, ["health"], "explain-client health", "clip-explain"),
        (cli.main, ["models"], "explain-client models", "clip-explain"),
        (loadgen.main, [], "explain-loadgen", "clip-explain"),
        (eval_cli.main, [], "explain-eval", "clip-explain"),
        (convert.main, [], "explain-eval-convert", "clip-explain"),
        (server.main, [], "explain-server", "clip-explain-server"),
        (demo.main, [], "explain-demo", "clip-explain-server"),
        (shapes_dataset.main, [], "shapes-scenes", "clip-explain-server"),
        (shapes_traffic.main, [], "shapes-traffic", "clip-explain-server"),
    ],
)
def test_every_command_prints_its_distribution_version(main, argv, prog, distribution, capsys):
    with pytest.raises(SystemExit) as info:
        main([*argv, "--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out.strip()
    try:
        assert out == f"{prog} {metadata.version(distribution)}"
    except metadata.PackageNotFoundError:  # a checkout run without installing it
        assert out.startswith(f"{prog} (not installed")


# TEST-NET-1 (RFC 5737): routed nowhere, so calls there fail at their deadline
OFF_MACHINE = "192.0.2.1:50051"


@pytest.mark.parametrize(
    "target",
    [OFF_MACHINE, "explain.example.com:443", "dns:///explain:50051", "ipv4:127.0.0.1:1,10.0.0.7:1", "[2001:db8::1]:1"],
)
def test_a_token_without_tls_off_this_machine_warns(target):
    with pytest.warns(PlaintextTokenWarning, match=re.escape(f"sent to {target} over a plaintext channel")):
        ExplainClient(target, token="t0ken").close()


@pytest.mark.parametrize(
    "target",
    ["localhost:50051", "127.0.0.1:50051", "[::1]:50051", "dns:///localhost:50051", "ipv6:[::1]:1", "unix:/tmp/s"],
)
def test_no_token_warning_on_this_machine_with_tls_or_without_a_token(target):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ExplainClient(target, token="t0ken").close()
        ExplainClient(OFF_MACHINE).close()
        ExplainClient(OFF_MACHINE, token="t0ken", credentials=grpc.ssl_channel_credentials()).close()


def test_the_commands_warn_of_a_token_without_tls(monkeypatch):
    monkeypatch.setenv("EXPLAIN_TOKEN", "t0ken")
    with pytest.warns(PlaintextTokenWarning):
        assert cli.main(["health", "--target", OFF_MACHINE, "--timeout", "0.5"]) == cli.EXIT_UNHEALTHY
    with pytest.warns(PlaintextTokenWarning):
        load = [
            "--target",
            OFF_MACHINE,
            "--requests",
            "1",
            "--deadline",
            "0.5",
            "--image-sides",
            "64",
            "64",
            "--metrics-url",
            "http://127.0.0.1:1/metrics",
        ]
        assert loadgen.main(load) == 1


def test_the_token_warning_goes_to_stderr_once():
    command = [sys.executable, "-m", "explain_client", "models", "--target", OFF_MACHINE, "--timeout", "0.5"]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=60, env={**os.environ, "EXPLAIN_TOKEN": "t0ken"}
    )
    assert result.returncode == cli.EXIT_SERVER_ERROR
    assert result.stderr.count("PlaintextTokenWarning") == 1 and "t0ken" not in result.stderr


@pytest.mark.parametrize(
    ("path", "reason"), [("/nonexistent.png", "No such file or directory"), ("/", "Is a directory")]
)
def test_an_unreadable_image_is_named_as_the_image_argument(path, reason, capsys):
    assert cli.main(["--target", "127.0.0.1:1", path, "a cat"]) == 1
    assert capsys.readouterr().err.strip() == f"error: image: cannot read {path}: {reason}"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--duration", "-1"], "argument --duration: must be > 0"),
        (["--requests", "4", "--deadline", "0"], "argument --deadline: must be > 0"),
        (["--concurrency", "0", "--requests", "4"], "--concurrency must be positive; got 0"),
        (["--requests", "0"], "--requests must be positive; got 0"),
        (["--requests", "4", "--image-sides", "800", "64"], "--image-sides must be 1 <= MIN <= MAX; got 800 64"),
    ],
)
def test_loadgen_refuses_each_bad_value_by_name(argv, message, capsys):
    try:
        code = loadgen.main(["--target", "127.0.0.1:1", *argv])
    except SystemExit as exit_:  # argparse's own refusals
        code = exit_.code
    assert code == 2
    assert message in capsys.readouterr().err
