"""Transport security and caller authentication: TLS, mutual TLS and bearer tokens."""

from __future__ import annotations

import hmac
import os
import pathlib

import grpc

from .interceptors import HandlerInterceptor, replace_behavior
from .settings import DEFAULT_AUTH_EXEMPT


def server_credentials(cert: str | None, key: str | None, client_ca: str | None) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files, or None for plaintext.

    The files are expected to have passed :func:`.tls_files.check_tls_files` (the configuration
    checks them), which reports an unusable file by name; grpc would only fail to bind.

    Args:
        cert, key: the server's certificate chain and private key (both or neither).
        client_ca: CA bundle that client certificates must chain to; given, every client must
            present a certificate (mutual TLS); needs ``cert`` and ``key``.

    Raises:
        OSError: a file that cannot be read.
    """
    if not cert:
        return None
    pair = (pathlib.Path(key).read_bytes(), pathlib.Path(cert).read_bytes())
    roots = pathlib.Path(client_ca).read_bytes() if client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=roots, require_client_auth=roots is not None)


def load_tokens(tokens_file: str | None, tokens_env: str | None) -> list[str]:
    """Accepted bearer tokens: one per line of ``tokens_file``, skipping blank lines and comment
    lines (first non-blank character ``#``), and/or comma-separated in the environment variable
    named ``tokens_env``.

    Raises:
        ValueError: the variable is unset, or a source yields no token.
        OSError: the file cannot be read.
    """
    tokens: list[str] = []
    if tokens_file:
        lines = (line.strip() for line in pathlib.Path(tokens_file).read_text().splitlines())
        # '#' cannot occur in a bearer token (RFC 6750's b64token), so no token is lost
        from_file = [line for line in lines if line and not line.startswith("#")]
        if not from_file:
            raise ValueError(f"--auth-tokens-file {tokens_file} holds no token")
        tokens += from_file
    if tokens_env:
        if tokens_env not in os.environ:
            raise ValueError(f"--auth-tokens-env: environment variable {tokens_env} is not set")
        from_env = [t.strip() for t in os.environ[tokens_env].split(",") if t.strip()]
        if not from_env:
            raise ValueError(f"--auth-tokens-env: environment variable {tokens_env} holds no token")
        tokens += from_env
    return tokens


def _aborting_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as ``handler`` that answers UNAUTHENTICATED."""

    async def deny(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # an async generator, as streaming handlers are

    return replace_behavior(handler, deny_stream if handler.response_streaming else deny)


class BearerTokenInterceptor(HandlerInterceptor):
    """Requires ``authorization: Bearer <token>`` metadata with one of the accepted tokens.

    Calls to the services in ``exempt`` (full names, e.g. ``grpc.health.v1.Health``) pass
    without a token. Tokens are compared in constant time and never logged.
    """

    def __init__(self, tokens: list[str], exempt: tuple[str, ...] = DEFAULT_AUTH_EXEMPT):
        """Accept any of ``tokens``; let ``exempt`` services through."""
        self._tokens = [t.encode() for t in tokens]
        self._exempt = tuple(f"/{name}/" for name in exempt)

    def _authorised(self, metadata) -> bool:
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                offered = value[len("Bearer ") :].encode()
                # compare with every token, so the time taken does not reveal which one matched
                return any([hmac.compare_digest(offered, token) for token in self._tokens])
        return False

    def intercept_handler(
        self, handler: grpc.RpcMethodHandler, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        """Pass authorised and exempt calls on; answer the others UNAUTHENTICATED."""
        if handler_call_details.method.startswith(self._exempt):
            return handler
        if self._authorised(handler_call_details.invocation_metadata):
            return handler
        return _aborting_handler(
            handler, "missing or invalid bearer token: send metadata 'authorization: Bearer <token>'"
        )
