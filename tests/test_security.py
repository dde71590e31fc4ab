"""TLS, mutual TLS and bearer tokens, with certificates generated at test time."""

from __future__ import annotations

import datetime
import ipaddress
import pathlib
import ssl
import subprocess
import sys

import grpc
import pytest
from conftest import TINY, TINY_CONFIG
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from test_end_to_end import noise_image

from explain_api import explain_pb2
from explain_api.explain_pb2_grpc import ExplainStub
from explain_client import ExplainClient, UnauthenticatedError, UnavailableError, loadgen, tls_credentials
from explain_client.cli import main as cli_main
from explain_client.client import bearer_metadata
from explain_server.config import load_config
from explain_server.launcher import ServerProcess, free_port, wait_serving
from explain_server.security import load_tokens

CAPTION = "SECRET-CAPTION-a red circle"
TOKEN = "s3cret-token-value"
TINY_ARGS = ["--model-config", str(TINY_CONFIG), "--model", f"tiny={TINY}:random:0"]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(subject: str, issuer_key, issuer_name, *, ca: bool, san: list | None = None):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name or _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    return key, cert


def _write(directory, name: str, key, cert) -> tuple[str, str]:
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.pem"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(key_path), str(cert_path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """A CA, a server certificate for localhost, a client certificate, and a client of another CA."""
    directory = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = _issue("test CA", None, None, ca=True)
    rogue_key, rogue_cert = _issue("rogue CA", None, None, ca=True)
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    return {
        "ca": _write(directory, "ca", ca_key, ca_cert),
        "server": _write(directory, "server", *_issue("localhost", ca_key, ca_cert.subject, ca=False, san=san)),
        "client": _write(directory, "client", *_issue("client", ca_key, ca_cert.subject, ca=False)),
        "rogue": _write(directory, "rogue", *_issue("rogue client", rogue_key, rogue_cert.subject, ca=False)),
    }


def _started(args: list[str], log) -> ServerProcess:
    """Start and wait for the port to answer (health needs credentials, checked by each test)."""
    return ServerProcess(TINY_ARGS + args, log)


def _wait(server: ServerProcess, credentials: grpc.ChannelCredentials) -> None:
    with ExplainClient(f"localhost:{server.port}", credentials=credentials) as client:
        client.wait_until_ready(timeout=300)


@pytest.mark.integration
def test_tls(tmp_path, pki):
    server = _started(["--tls-cert", pki["server"][1], "--tls-key", pki["server"][0]], tmp_path / "tls.log")
    try:
        credentials = tls_credentials(pki["ca"][1])
        _wait(server, credentials)
        with ExplainClient(f"localhost:{server.port}", credentials=credentials, timeout=60) as client:
            assert client.explain(noise_image(64, 64), CAPTION).tokens[0] == "<start_of_text>"
        with ExplainClient(f"localhost:{server.port}", timeout=10) as plaintext:
            with pytest.raises(UnavailableError):
                plaintext.list_models()
        load = [
            "--target",
            f"localhost:{server.port}",
            "--requests",
            "2",
            "--image-sides",
            "64",
            "96",
            "--metrics-url",
            server.metrics_url,
            "--deadline",
            "60",
        ]
        assert loadgen.main([*load, "--tls-ca", pki["ca"][1]]) == 0
        assert loadgen.main(load) == 1  # plaintext: every call fails
    finally:
        server.stop()


@pytest.mark.integration
def test_mutual_tls_requires_a_client_certificate_from_the_trusted_ca(tmp_path, pki):
    server = _started(
        ["--tls-cert", pki["server"][1], "--tls-key", pki["server"][0], "--tls-client-ca", pki["ca"][1]],
        tmp_path / "mtls.log",
    )
    try:
        good = tls_credentials(pki["ca"][1], pki["client"][1], pki["client"][0])
        _wait(server, good)
        with ExplainClient(f"localhost:{server.port}", credentials=good, timeout=60) as client:
            assert client.explain(noise_image(64, 64), CAPTION).model == "tiny"
        for credentials in (
            tls_credentials(pki["ca"][1]),
            tls_credentials(pki["ca"][1], pki["rogue"][1], pki["rogue"][0]),
        ):
            with ExplainClient(f"localhost:{server.port}", credentials=credentials, timeout=10) as client:
                with pytest.raises(UnavailableError):
                    client.list_models()
    finally:
        server.stop()


@pytest.mark.unit
def test_tls_files_grpc_cannot_use_are_refused_naming_the_file(tmp_path, pki):
    (key, cert), (other_key, _), (_, ca) = pki["server"], pki["client"], pki["ca"]
    der = tmp_path / "server.der"
    der.write_bytes(ssl.PEM_cert_to_DER_cert(pathlib.Path(cert).read_text()))
    encrypted = tmp_path / "encrypted.key"
    private = serialization.load_pem_private_key(pathlib.Path(key).read_bytes(), password=None)
    encrypted.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
        )
    )
    absent = tmp_path / "absent.pem"
    cases = [
        (
            ["--tls-cert", cert, "--tls-key", other_key],
            f"--tls-key {other_key} does not match the certificate in --tls-cert {cert}",
        ),
        (["--tls-cert", str(der), "--tls-key", key], f"--tls-cert {der} is not a PEM certificate"),
        (["--tls-cert", cert, "--tls-key", cert], f"--tls-key {cert} is not an unencrypted PEM private key"),
        (
            ["--tls-cert", cert, "--tls-key", str(encrypted)],
            f"--tls-key {encrypted} is not an unencrypted PEM private key",
        ),
        (
            ["--tls-cert", cert, "--tls-key", key, "--tls-client-ca", key],
            f"--tls-client-ca {key} is not a PEM certificate",
        ),
        (
            ["--tls-cert", str(absent), "--tls-key", key],
            f"--tls-cert {absent}: cannot read it: No such file or directory",
        ),
        (["--tls-cert", cert], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", ca], "--tls-client-ca needs --tls-cert and --tls-key"),
    ]
    for flags, message in cases:
        with pytest.raises(ValueError) as raised:
            load_config(flags)
        assert str(raised.value) == message
    assert load_config(["--tls-cert", cert, "--tls-key", key, "--tls-client-ca", ca]).tls_client_ca == ca


@pytest.mark.integration
def test_a_key_that_does_not_match_the_certificate_fails_start_up_naming_both(pki):
    """Not as grpc's "Failed to bind", which reads like a port clash."""
    (_, cert), (other_key, _) = pki["server"], pki["client"]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "explain_server",
            "--port",
            str(free_port()),
            "--metrics-port",
            "0",
            *TINY_ARGS,
            "--tls-cert",
            cert,
            "--tls-key",
            other_key,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"explain-server: --tls-key {other_key} does not match the certificate in --tls-cert {cert}"
    ]


COMMENT = "# a comment"


@pytest.mark.unit
def test_token_files_skip_blank_and_comment_lines(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{COMMENT}\n\n  other-token  \n   #indented comment\n{TOKEN}\n#\n")
    assert load_tokens(str(tokens), None) == ["other-token", TOKEN]


@pytest.mark.unit
def test_a_token_file_of_comments_only_fails_start_up(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{COMMENT}\n\n# {TOKEN}\n")
    with pytest.raises(ValueError, match="holds no token"):
        load_tokens(str(tokens), None)


@pytest.mark.integration
@pytest.mark.parametrize("source", ["file", "env"])
def test_bearer_tokens(tmp_path, source, monkeypatch):
    if source == "file":
        tokens = tmp_path / "tokens"
        tokens.write_text(f"{COMMENT}\nother-token\n{TOKEN}\n")
        args = ["--auth-tokens-file", str(tokens)]
    else:
        monkeypatch.setenv("EXPLAIN_TEST_TOKENS", f"other-token,{TOKEN}")
        args = ["--auth-tokens-env", "EXPLAIN_TEST_TOKENS"]
    log = tmp_path / "tokens.log"
    server = _started(args, log)
    try:
        wait_serving(server.target, server.process)  # health is exempt by default: no token
        with ExplainClient(server.target, token=TOKEN, timeout=60) as client:
            assert client.explain(noise_image(64, 64), CAPTION).model == "tiny"
        for token in (None, "wrong", TOKEN + "x"):
            with ExplainClient(server.target, token=token, timeout=10) as client:
                with pytest.raises(UnauthenticatedError, match="bearer token"):
                    client.explain(noise_image(64, 64), CAPTION)
        # the client refuses to send a comment line ('#' and spaces are no bearer token); a raw caller can
        with grpc.insecure_channel(server.target) as channel:
            with pytest.raises(grpc.RpcError) as info:
                ExplainStub(channel).ListModels(
                    explain_pb2.ListModelsRequest(), metadata=(("authorization", f"Bearer {COMMENT}"),), timeout=10
                )
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with grpc.insecure_channel(server.target) as channel:  # reflection is not exempt
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                list(
                    stub.ServerReflectionInfo(
                        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
                    )
                )
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop()
    text = log.read_text()
    assert "SECRET-CAPTION" not in text and TOKEN not in text  # nothing the caller sent, at INFO


@pytest.mark.integration
def test_exempting_reflection_by_config(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN)
    server = _started(
        [
            "--auth-tokens-file",
            str(tokens),
            "--auth-exempt",
            "grpc.health.v1.Health",
            "--auth-exempt",
            "grpc.reflection.v1alpha.ServerReflection",
        ],
        tmp_path / "exempt.log",
    )
    try:
        wait_serving(server.target, server.process)
        with grpc.insecure_channel(server.target) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            reply = next(
                stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
            )
            assert "explain.v1.Explain" in {s.name for s in reply.list_services_response.service}
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop()


@pytest.mark.unit
@pytest.mark.parametrize("token", [TOKEN + "\n", " " + TOKEN, "two words", "tok\u00e9n", "#comment"])
def test_the_client_refuses_what_is_no_bearer_token_before_sending(token, monkeypatch, capsys):
    """gRPC itself would fail such metadata with INTERNAL ("Invalid metadata") before sending:
    the client says what is wrong instead, without repeating the token, and the CLI exits 1
    (a local error) without contacting anyone (the target does not exist)."""
    with pytest.raises(ValueError, match="token: not a bearer token") as info:
        ExplainClient("127.0.0.1:1", token=token)
    assert token.strip() not in str(info.value)
    monkeypatch.setenv("EXPLAIN_TOKEN", token)
    assert cli_main(["image.png", "a caption", "--target", "127.0.0.1:1"]) == 1
    assert "token: not a bearer token" in capsys.readouterr().err
    assert bearer_metadata(TOKEN + "==") == (("authorization", f"Bearer {TOKEN}=="),)
    assert bearer_metadata(None) is None
