"""Server flags, the TOML config file, and start-up behaviour of the real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from conftest import TINY, TINY_CONFIG, seeded_model
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import save_file
from test_end_to_end import noise_image

from explain_client import ExplainClient, ResolvedOptions, UnavailableError
from explain_server.config import DEFAULT_MODEL, instance_devices, load_config
from explain_server.launcher import ServerProcess, free_port, server_command
from explain_server.model_spec import ModelSpec

# Reconnect at once when the port opens: gRPC's default backoff could skip the loading window.
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 100),
]


@pytest.mark.unit
def test_defaults_host_the_embedded_model():
    config = load_config([])
    assert config.models == (ModelSpec.parse(DEFAULT_MODEL),) and config.default_model_name == "shapes"
    assert (config.host, config.port, config.device, config.dtype) == ("127.0.0.1", 50051, "auto", "float32")
    assert config.instances == 1 and (config.models[0].instances, config.models[0].device) == (1, "auto")


@pytest.mark.unit
def test_config_file_and_flag_precedence(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text('models = ["a=ViT-B-32:random:1", "b=ViT-B-16:openai"]\nport = 6000\nhost = "0.0.0.0"\n')
    config = load_config(["--config", str(path), "--port", "7000"])
    assert [s.name for s in config.models] == ["a", "b"]
    assert (config.port, config.host, config.default_model_name) == (7000, "0.0.0.0", "a")
    flagged = load_config(["--config", str(path), "--model", "c=ViT-L-14:openai"])
    assert [s.name for s in flagged.models] == ["c"]


TABLES = """instances = 2
device = "cpu"

[[models]]
name = "a"
architecture = "ViT-B-32"
pretrained = "random:1"
text_layer = 0
image_layer = 1
n_steps = 5
method = "riemann_middle"
instances = 3
device = "cuda:1"

[[models]]
name = "b"
architecture = "ViT-B-16"
pretrained = "openai"
"""


@pytest.mark.unit
def test_models_are_tables_whose_instances_and_device_default_to_the_server_wide_ones(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text(TABLES)
    a, b = load_config(["--config", str(path)]).models
    assert a == ModelSpec(
        "a",
        "ViT-B-32",
        "random:1",
        text_layer=0,
        image_layer=1,
        n_steps=5,
        method="riemann_middle",
        instances=3,
        device="cuda:1",
    )
    assert b == ModelSpec("b", "ViT-B-16", "openai", instances=2, device="cpu")
    shorthand = (
        "a=ViT-B-32:random:1,text_layer=0,image_layer=1,n_steps=5,method=riemann_middle,instances=3,device=cuda:1"
    )
    assert ModelSpec.parse(shorthand) == a
    flagged = load_config(["--config", str(path), "--instances", "4", "--device", "auto"])
    assert (flagged.instances, flagged.device) == (4, "auto")
    assert [(s.instances, s.device) for s in flagged.models] == [(3, "cuda:1"), (4, "auto")]
    assert load_config(["--instances", "2"]).models[0].instances == 2


@pytest.mark.unit
def test_instance_devices_spread_instances_over_the_gpus():
    assert instance_devices("auto", 3, 0) == ["cpu", "cpu", "cpu"]
    assert instance_devices("auto", 3, 2) == ["cuda:0", "cuda:1", "cuda:0"]
    assert instance_devices("cuda", 2, 4) == ["cuda:0", "cuda:1"]
    assert instance_devices("cpu", 2, 2) == ["cpu", "cpu"]
    assert instance_devices("cuda:1", 2, 2) == ["cuda:1", "cuda:1"]


@pytest.mark.unit
@pytest.mark.parametrize(
    "device, instances, cuda_count, message",
    [
        ("cuda", 1, 0, "no CUDA device"),
        ("cuda:2", 1, 2, r"cuda:2: this machine has 2 CUDA device\(s\)"),
        ("tpu", 1, 0, "device must be auto, cpu, cuda or cuda:INDEX; got 'tpu'"),
        ("auto", 0, 1, "instances must be positive; got 0"),
    ],
)
def test_instance_devices_refuses_what_cannot_be(device, instances, cuda_count, message):
    with pytest.raises(ValueError, match=message):
        instance_devices(device, instances, cuda_count)


@pytest.mark.unit
def test_loading_a_config_imports_neither_grpc_nor_torch(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text(TABLES)
    code = (
        "import sys\n"
        "from explain_server.config import load_config\n"
        "load_config(sys.argv[1:])\n"
        "print(sorted(m for m in ('grpc', 'torch', 'open_clip', 'PIL') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "--config", str(path), "--model", "c=ViT-B-32:random:0,n_steps=4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


MODEL_TABLE = '[[models]]\nname = "a"\narchitecture = "ViT-B-32"\npretrained = "openai"\n'
CONFIG_ERRORS = [
    ('port = "fifty"\n', "port must be an integer; got 'fifty'"),
    ('max_batch_size = "4"\n', "max_batch_size must be an integer; got '4'"),
    ("models = []\n", "models must name at least one model; got []"),
    ('log_level = "LOUD"\n', "log_level must be one of DEBUG, INFO, WARNING, ERROR; got 'LOUD'"),
    ("port = \n", "not valid TOML: Invalid value (at line 1, column 8)"),
    ("prot = 6000\n", "unknown keys ['prot']"),
    ('device = "tpu"\n', "device must be auto, cpu, cuda or cuda:INDEX; got 'tpu'"),
    ('dtype = "float64"\n', "dtype must be one of float32, float16, bfloat16; got 'float64'"),
    ("instances = 0\n", "instances must be positive; got 0"),
    ("max_queue_delay_ms = true\n", "max_queue_delay_ms must be a number; got True"),
    ('auth_exempt = "grpc.health.v1.Health"\n', "auth_exempt must be a list of strings; got 'grpc.health.v1.Health'"),
    ('models = "a=ViT-B-32:openai"\n', "models must be a list of [[models]] tables or NAME=ARCH:PRETRAINED strings"),
    ('models = ["a=ViT-B-32"]\n', "models[0] 'a=ViT-B-32': must be NAME=ARCH:PRETRAINED"),
    (
        'default_model = "b"\nmodels = ["a=ViT-B-32:openai"]\n',
        "default_model 'b' is not one of the configured models ['a']",
    ),
    ('models = ["a=ViT-B-32:openai", "a=ViT-B-16:openai"]\n', "models names must be unique; got ['a', 'a']"),
    (MODEL_TABLE + 'n_steps = "5"\n', "models[0]: n_steps must be an integer; got '5'"),
    (MODEL_TABLE + "text_layer = true\n", "models[0]: text_layer must be a non-negative integer; got True"),
    (MODEL_TABLE + "instances = 0\n", "models[0]: instances must be a positive integer; got 0"),
    (MODEL_TABLE + 'device = "gpu"\n', "models[0]: device must be auto, cpu, cuda or cuda:INDEX; got 'gpu'"),
    (MODEL_TABLE + 'method = "simpson"\n', "models[0]: method must be one of riemann_right,"),
    (MODEL_TABLE + "layer = 3\n", "models[0]: unknown keys ['layer']; keys are name, architecture, pretrained,"),
    (MODEL_TABLE + "n_steps = 600\n", "model 'a': n_steps=600 exceeds --max-n-steps 512"),
    ('[[models]]\nname = "a"\narchitecture = "ViT-B-32"\n', "models[0]: needs pretrained"),
    (
        '[[models]]\nname = 5\narchitecture = "ViT-B-32"\npretrained = "openai"\n',
        "models[0]: name must be a non-empty string; got 5",
    ),
]


@pytest.mark.unit
@pytest.mark.parametrize("text, message", CONFIG_ERRORS)
def test_a_bad_config_file_is_one_line_naming_the_file_the_key_and_the_rule(tmp_path, text, message):
    path = tmp_path / "server.toml"
    path.write_text(text)
    with pytest.raises(ValueError) as raised:
        load_config(["--config", str(path)])
    assert str(raised.value).startswith(f"{path}: ") and message in str(raised.value), str(raised.value)
    assert "\n" not in str(raised.value)


@pytest.mark.unit
def test_a_flag_overriding_a_bad_file_value_is_named_as_the_flag(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text("port = 8000\n")
    with pytest.raises(ValueError, match=r"^--port must be in \[0, 65535\]; got 70000$"):
        load_config(["--config", str(path), "--port", "70000"])
    with pytest.raises(ValueError, match=r"^--config .*absent.toml: cannot read it: No such file or directory$"):
        load_config(["--config", str(tmp_path / "absent.toml")])


@pytest.mark.integration
@pytest.mark.parametrize("text, message", [CONFIG_ERRORS[i] for i in (1, 4)])
def test_explain_server_reports_a_bad_config_in_one_line_and_exits_2(tmp_path, text, message):
    path = tmp_path / "server.toml"
    path.write_text(text)
    result = run_server("--config", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"explain-server: {path}: {message}"]


@pytest.mark.unit
def test_batching_cache_and_metrics_settings_come_from_file_and_flags(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text(
        "max_batch_size = 8\nmax_queue_delay_ms = 2.5\nmax_queue_size = 100\nfactor_cache_mb = 0\n"
        "metrics_port = 9191\nmax_connection_age_seconds = 300\nintra_op_threads = 1\n"
    )
    config = load_config(["--config", str(path), "--max-batch-size", "1"])
    assert (config.max_batch_size, config.max_queue_delay_ms, config.max_queue_size) == (1, 2.5, 100)
    assert (config.factor_cache_mb, config.metrics_port, config.max_connection_age_seconds) == (0, 9191, 300)
    assert config.intra_op_threads == 1


@pytest.mark.unit
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-batch-size", "0"], "--max-batch-size must be positive"),
        (["--max-queue-size", "0"], "--max-queue-size must be positive"),
        (["--max-queue-delay-ms", "-1"], "--max-queue-delay-ms must be >= 0"),
        (["--factor-cache-mb", "-1"], "--factor-cache-mb must be >= 0"),
        (["--metrics-port", "70000"], r"--metrics-port must be in \[0, 65535\]"),
        (["--max-connection-age-seconds", "0"], "--max-connection-age-seconds must be positive"),
        (["--intra-op-threads", "0"], "--intra-op-threads must be positive"),
    ],
)
def test_out_of_range_batching_and_server_settings_are_refused(flags, message):
    with pytest.raises(ValueError, match=message):
        load_config(flags)


@pytest.mark.unit
def test_config_file_rejects_unknown_keys(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text("prot = 6000\n")
    with pytest.raises(ValueError, match=r"unknown keys \['prot'\]"):
        load_config(["--config", str(path)])


@pytest.mark.unit
def test_a_model_default_n_steps_above_the_limit_is_refused():
    with pytest.raises(ValueError, match="model 'a': n_steps=64 exceeds --max-n-steps 50"):
        load_config(["--model", "a=ViT-B-32:random,n_steps=64", "--max-n-steps", "50"])
    # refused by the limit, before any nodes are built (100,000 Gauss-Legendre nodes need 75 GiB)
    with pytest.raises(ValueError, match="model 'a': n_steps=100000 exceeds --max-n-steps 512"):
        load_config(["--model", "a=ViT-B-32:random,n_steps=100000"])


@pytest.mark.unit
def test_malformed_model_flag_is_refused():
    with pytest.raises(ValueError, match="NAME=ARCH:PRETRAINED"):
        load_config(["--model", "ViT-B-32"])


def run_server(*args: str) -> subprocess.CompletedProcess:
    """A server start expected to fail; no metrics port, so that nothing else's 9090 matters."""
    return subprocess.run(server_command(*args, port=free_port()), capture_output=True, text=True, timeout=120)


@pytest.mark.integration
def test_missing_weights_file_fails_start_up_naming_model_and_file(tmp_path):
    missing = tmp_path / "absent.safetensors"
    result = run_server("--model", f"b32=ViT-B-32:{missing}")
    assert result.returncode == 1
    assert f"model 'b32': weights file {missing} does not exist" in result.stderr


@pytest.mark.integration
def test_a_corrupt_weights_file_fails_start_up_naming_model_and_file(tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}" + bytes(64))
    result = run_server("--model-config", str(TINY_CONFIG), "--model", f"bad={TINY}:{corrupt}")
    assert result.returncode == 1
    assert f"model 'bad': cannot load weights '{corrupt}'" in result.stderr


@pytest.mark.integration
def test_a_default_layer_the_tower_lacks_fails_start_up():
    result = run_server("--model-config", str(TINY_CONFIG), "--model", f"t={TINY}:random:0,image_layer=2")
    assert result.returncode == 1
    assert "model 't': image_layer=2 is not a layer of its image tower, which has 2 (0 to 1)" in result.stderr


@pytest.mark.integration
def test_a_model_s_default_settings_are_listed_and_used(tmp_path):
    proc = ServerProcess(
        [
            "--model-config",
            str(TINY_CONFIG),
            "--model",
            f"t={TINY}:random:0,text_layer=0,image_layer=1,n_steps=4,method=riemann_middle",
        ],
        tmp_path / "server.log",
    ).wait_serving()
    try:
        with ExplainClient(proc.target, timeout=60) as client:
            (listed,) = client.list_models()
            assert (listed.default_text_layer, listed.default_image_layer) == (0, 1)
            assert (listed.default_n_steps, listed.default_method) == (4, "riemann_middle")
            image = noise_image(64, 64)
            default = client.explain(image, "a red circle")
            assert default.options == ResolvedOptions(0, 1, 4, "riemann_middle", "block 0", "block 1")
            explicit = client.explain(
                image, "a red circle", text_layer=0, image_layer=1, n_steps=4, method="riemann_middle"
            )
            other = client.explain(image, "a red circle", text_layer=1, image_layer=1)
        assert (default.attribution == explicit.attribution).all()
        assert not (default.attribution == other.attribution).all()
    finally:
        proc.stop()


@pytest.mark.integration
def test_a_model_giving_non_finite_results_fails_start_up(tmp_path):
    model = seeded_model(TINY)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["visual.proj"][0, 0] = float("nan")
    path = tmp_path / "poisoned.safetensors"
    save_file(state, str(path))
    result = run_server("--model-config", str(TINY_CONFIG), "--model", f"bad={TINY}:{path}")
    assert result.returncode == 1
    assert "model 'bad': warm-up explanation failed: the attribution is not finite" in result.stderr


@pytest.mark.integration
def test_unknown_default_model_is_a_usage_error():
    result = run_server("--model", "a=ViT-B-32:random:0", "--default-model", "b")
    assert result.returncode == 2
    assert "--default-model 'b' is not one of the configured models ['a']" in result.stderr


LOAD_DEADLINE_SECONDS = 600


@pytest.mark.integration
def test_not_serving_and_unavailable_until_models_are_warm():
    server = ServerProcess(["--model", "b32=ViT-B-32:random:0", "--model", "b16=ViT-B-16:random:0"], metrics=False)
    target = server.target
    fast = FAST_RECONNECT
    statuses, refusals = [], []
    try:
        with (
            grpc.insecure_channel(target, options=fast) as channel,
            ExplainClient(target, timeout=10, options=fast) as client,
        ):
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + LOAD_DEADLINE_SECONDS
            while time.monotonic() < deadline:
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                except grpc.RpcError:
                    time.sleep(0.05)  # not listening yet
                    continue
                if not statuses or statuses[-1] != status:
                    statuses.append(status)
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
                try:
                    client.list_models()
                except UnavailableError as err:
                    refusals.append(err.details)
                time.sleep(0.05)
            # Two large random models on a contended 2-core machine can take minutes; a missed
            # deadline must read as that, not as a connection error from the call below.
            assert statuses and statuses[-1] == health_pb2.HealthCheckResponse.SERVING, (
                f"not SERVING after {LOAD_DEADLINE_SECONDS} s; statuses seen {statuses}"
            )
            assert client.list_models()[0].name == "b32"
    finally:
        server.stop()
    assert statuses == [health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING]
    assert refusals and all("models are loading" in r for r in refusals)


AUDIT_HOOK = """
import os, sys
_LOG = os.environ["NETWORK_AUDIT_LOG"]
_LOCAL = {"localhost", "127.0.0.1", "::1", "0.0.0.0", "::", ""}

def _record(event, args):
    if event == "socket.getaddrinfo":
        host = args[0]
    elif event == "socket.connect" and isinstance(args[1], tuple):
        host = args[1][0]
    else:
        return
    host = host.decode() if isinstance(host, bytes) else str(host)
    if host not in _LOCAL:
        with open(_LOG, "a") as f:
            f.write(f"{event} {host}\\n")

sys.addaudithook(_record)
"""


@pytest.mark.integration
def test_offline_start_up_makes_no_network_attempt(tmp_path):
    """HF_HUB_OFFLINE=1 and a local weights file: no name lookup or connection leaves the machine.

    An audit hook (sitecustomize) records every non-loopback socket.getaddrinfo/connect."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(AUDIT_HOOK)
    attempts = tmp_path / "network.log"
    env = {"PYTHONPATH": str(hooks), "NETWORK_AUDIT_LOG": str(attempts)}
    control = subprocess.run(
        [sys.executable, "-c", "import socket\ntry: socket.getaddrinfo('example.org', 443)\nexcept OSError: pass"],
        env={**os.environ, **env},
        timeout=60,
    )
    assert control.returncode == 0 and "example.org" in attempts.read_text()  # the hook sees lookups
    attempts.unlink()

    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in seeded_model(TINY).state_dict().items()}, str(weights))
    server = ServerProcess(
        ["--model-config", str(TINY_CONFIG), "--model", f"tiny={TINY}:{weights}"], tmp_path / "offline.log", env=env
    ).wait_serving()
    assert server.stop() == 0
    assert not attempts.exists(), attempts.read_text()


@pytest.mark.unit
@pytest.mark.parametrize(
    "flag, value",
    [("--max-n-steps", "0"), ("--port", "99999"), ("--max-message-mb", "-1"), ("--max-pixels-per-call", "0")],
)
def test_out_of_range_settings_are_refused(flag, value):
    with pytest.raises(ValueError, match=flag):
        load_config([flag, value])


@pytest.mark.integration
def test_a_busy_port_fails_start_up(server):
    result = subprocess.run(
        server_command("--model-config", str(TINY_CONFIG), "--model", f"tiny={TINY}:random:0", port=server.port),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{server.port}" in result.stderr


@pytest.mark.integration
def test_a_busy_metrics_port_fails_start_up_naming_it(server):
    busy = server.metrics_port
    result = subprocess.run(
        server_command(
            "--model-config", str(TINY_CONFIG), "--model", f"tiny={TINY}:random:0", port=free_port(), metrics_port=busy
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert f"cannot serve metrics on 127.0.0.1:{busy} (--metrics-port)" in result.stderr


@pytest.mark.integration
def test_sigterm_while_loading_exits_promptly():
    server = ServerProcess(["--model", "b32=ViT-B-32:random:0", "--model", "b16=ViT-B-16:random:0"], metrics=False)
    with grpc.insecure_channel(server.target, options=FAST_RECONNECT) as channel:  # listening, still loading
        grpc.channel_ready_future(channel).result(timeout=120)
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    start = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0
    assert time.monotonic() - start < 5.0
