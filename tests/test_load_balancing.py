"""Client-side load balancing: one client channel spreads its calls over several servers.

Two real servers on loopback stand for two replicas. Each hosts the tiny model under its own
name, so every answer says which server computed it.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
from conftest import TINY, TINY_CONFIG
from PIL import Image

from explain_client import ExplainClient, cli
from explain_server.launcher import ServerProcess

IMAGE = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
CAPTION = "a red circle and a blue square"


@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> dict[str, ServerProcess]:
    """Two servers, {model name: server}; both start before either is waited for."""
    logs = tmp_path_factory.mktemp("replicas")
    servers = {
        name: ServerProcess(
            ["--model-config", str(TINY_CONFIG), "--model", f"{name}={TINY}:random:0", "--device", "cpu"],
            logs / f"{name}.log",
        )
        for name in ("a", "b")
    }
    try:
        for server in servers.values():
            server.wait_serving()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def multi_address_target(replicas: dict[str, ServerProcess]) -> str:
    """One gRPC target naming both servers (the ipv4 resolver: a static address list)."""
    return "ipv4:" + ",".join(f"127.0.0.1:{server.port}" for server in replicas.values())


def answering_server(client: ExplainClient) -> str:
    """The name of the server that answered a ListModels call."""
    (model,) = client.list_models()
    return model.name


@pytest.mark.integration
def test_round_robin_spreads_calls_evenly_over_both_servers(replicas):
    with ExplainClient(multi_address_target(replicas), timeout=120, load_balancing_policy="round_robin") as client:
        # round_robin picks among the connections that are up: the first calls may precede
        # the second connection, so call until both servers have answered (bounded)
        seen = set()
        for _ in range(100):
            seen.add(answering_server(client))
            if seen == set(replicas):
                break
        assert seen == set(replicas)
        counts = collections.Counter(client.explain(IMAGE, CAPTION).model for _ in range(20))
    # with both connections up, round_robin alternates: an even split, call for call
    assert counts == {"a": 10, "b": 10}


@pytest.mark.integration
def test_without_a_policy_every_call_goes_to_one_server(replicas):
    """gRPC's default, pick_first, sends everything to the first address that connects: why
    the policy matters. Which one that is can vary: pick_first starts the next address when the
    first is slow to connect (gRFC A61's "happy eyeballs"), as on a busy machine."""
    with ExplainClient(multi_address_target(replicas), timeout=120) as client:
        counts = collections.Counter(answering_server(client) for _ in range(10))
    ((server, calls),) = counts.items()
    assert server in replicas and calls == 10


@pytest.mark.integration
def test_dns_target_with_round_robin(replicas):
    """A dns:/// target, as for a headless Kubernetes Service (here one name, one server)."""
    target = f"dns:///localhost:{replicas['a'].port}"
    with ExplainClient(target, timeout=120, load_balancing_policy="round_robin") as client:
        assert client.explain(IMAGE, CAPTION).model == "a"


@pytest.mark.integration
def test_cli_passes_the_policy_to_grpc(replicas, tmp_path, capsys):
    image = tmp_path / "image.png"
    Image.fromarray(IMAGE).save(image)
    target = multi_address_target(replicas)
    assert cli.main([str(image), CAPTION, "--target", target, "--load-balancing-policy", "round_robin", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] in replicas
    # a policy gRPC does not know fails the call with gRPC's own reason
    code = cli.main([str(image), CAPTION, "--target", target, "--load-balancing-policy", "no_such_policy"])
    assert code == cli.EXIT_SERVER_ERROR
    assert "no_such_policy" in capsys.readouterr().err


@pytest.mark.unit
def test_policy_and_a_service_config_option_conflict():
    with pytest.raises(ValueError, match="service_config"):
        ExplainClient(
            "localhost:50051",
            load_balancing_policy="round_robin",
            options=[("grpc.service_config", json.dumps({"loadBalancingConfig": [{"pick_first": {}}]}))],
        )
