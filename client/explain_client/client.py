"""A blocking gRPC client for the ``explain.v1.Explain`` service."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import time
import urllib.parse
import warnings
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any, Literal, overload

import grpc

from explain_api import explain_pb2, explain_pb2_grpc
from explain_api.summary import MAX_TOP_K
from explain_client.errors import MessageTooLargeError, UnavailableError, from_rpc_error
from explain_client.explanation import Explanation
from explain_client.images import ImageInput, encode_image
from explain_client.server_info import ModelInfo, ServerLimits
from explain_client.summary_result import SummaryResult

__all__ = [
    "DETAILS",
    "DEFAULT_MAX_RECEIVE_MESSAGE_BYTES",
    "DEFAULT_MAX_SEND_MESSAGE_BYTES",
    "ExplainClient",
    "PlaintextTokenWarning",
    "bearer_metadata",
    "explain_request",
    "tls_credentials",
    "warn_if_plaintext_token",
]

# gRPC's 4 MiB default is too small for large photos going out and for
# (T, Gh, Gw) attributions of long captions on fine grids coming back.
DEFAULT_MAX_SEND_MESSAGE_BYTES = 64 * 1024 * 1024
"""Default ``grpc.max_send_message_length``, bytes."""
DEFAULT_MAX_RECEIVE_MESSAGE_BYTES = 64 * 1024 * 1024
"""Default ``grpc.max_receive_message_length``, bytes."""


_INT_FIELDS = ("text_layer", "image_layer", "n_steps")
_INT32 = (-(2**31), 2**31 - 1)


def _checked(field: str, value: Any) -> Any:
    """``value`` if it fits the request field (an int32, or text protobuf can send as UTF-8),
    else an error naming the field."""
    if field in _INT_FIELDS:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{field} must be an int; got {type(value).__name__}")
        if not _INT32[0] <= value <= _INT32[1]:
            raise ValueError(f"{field} must fit in a 32-bit integer; got {value}")
        return value
    if not isinstance(value, str):
        raise TypeError(f"{field} must be a str; got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{field} must be valid Unicode text; character {value[err.start]!r} at index {err.start} "
            "is a lone surrogate, which UTF-8 cannot encode"
        ) from None
    return value


_LAYER_FIELDS = ("text_layer", "image_layer")

Detail = Literal["full", "summary"]
DETAILS: dict[str, int] = {"full": explain_pb2.DETAIL_FULL, "summary": explain_pb2.DETAIL_SUMMARY}
"""The values of ``detail``, and the ``explain.v1.Detail`` each asks for."""


def _set_output(request: Any, detail: str, summary_top_k: int | None) -> None:
    """Set ``detail`` and ``summary_top_k`` on a request, checked as the server checks them."""
    if not isinstance(detail, str) or detail not in DETAILS:
        raise ValueError(f"detail must be one of {', '.join(map(repr, DETAILS))}; got {detail!r}")
    request.detail = DETAILS[detail]
    if summary_top_k is None:
        return
    if not isinstance(summary_top_k, int) or isinstance(summary_top_k, bool):
        raise TypeError(f"summary_top_k must be an int; got {type(summary_top_k).__name__}")
    if not 0 <= summary_top_k <= MAX_TOP_K:
        raise ValueError(f"summary_top_k must be in [0, {MAX_TOP_K}]; got {summary_top_k}")
    request.summary_top_k = summary_top_k


def _set_options(request: Any, options: dict[str, Any]) -> None:
    for field, value in options.items():
        if value is None:
            continue
        if field in _LAYER_FIELDS and isinstance(value, str):  # a layer by name, e.g. "block 11", "layer4"
            field = f"{field}_name"
        setattr(request, field, _checked(field, value))


# RFC 6750's b64token: what may follow "Bearer " in an authorization header
_BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """Call metadata carrying ``token`` as ``authorization: Bearer <token>``; None without one.

    Raises:
        ValueError: ``token`` is not a bearer token (RFC 6750: letters, digits, ``-._~+/``, then
            any ``=``), such as one read from a file with its newline; gRPC would refuse to send
            it. The message does not repeat the token.
    """
    if not token:
        return None
    if not _BEARER_TOKEN.fullmatch(token):
        bad = next((i for i, char in enumerate(token) if not _BEARER_TOKEN.fullmatch(char)), len(token) - 1)
        raise ValueError(
            f"token: not a bearer token: character {bad + 1} of {len(token)} is {token[bad]!r}; RFC 6750 allows "
            "letters, digits and -._~+/, then '=' (a newline or space read from a file?)"
        )
    return (("authorization", f"Bearer {token}"),)


class PlaintextTokenWarning(UserWarning):
    """A bearer token is about to travel without TLS to a server that is not on this machine."""


def _is_loopback(address: str) -> bool:
    """Whether a ``host[:port]`` (IPv6 hosts in brackets) names this machine."""
    try:
        host = urllib.parse.urlsplit(f"//{address}").hostname
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # not a URL authority, or a host name other than localhost
        return False


def _is_local(target: str) -> bool:
    """Whether every address a gRPC target names is on this machine: Unix sockets, loopback."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    if target.startswith(("ipv4:", "ipv6:")):
        addresses = target.partition(":")[2].split(",")
    else:  # dns:[//authority/]host[:port], or host[:port], which gRPC resolves by DNS
        addresses = [target.removeprefix("dns:").rpartition("/")[2]]
    return all(_is_loopback(address) for address in addresses)


def warn_if_plaintext_token(
    target: str, credentials: grpc.ChannelCredentials | None, token: str | None, *, stacklevel: int = 1
) -> None:
    """Warn with :class:`PlaintextTokenWarning` when ``token`` would go without TLS (no
    ``credentials``) to a ``target`` off this machine, where anyone on the path can read it.

    Unix sockets and loopback addresses (``localhost``, ``127.0.0.0/8``, ``[::1]``) are
    exempt. Python's default filter shows the warning once per line of code that issues it;
    ``stacklevel`` is :func:`warnings.warn`'s, counted from the caller of this function.
    """
    if token and credentials is None and not _is_local(target):
        warnings.warn(
            f"a bearer token is sent to {target} over a plaintext channel, which anyone on the network "
            "path can read; connect with TLS (tls_credentials(); the commands' --tls-ca)",
            PlaintextTokenWarning,
            stacklevel=stacklevel + 1,
        )


def _timeout(value: float | None) -> float | None:
    """A call deadline in seconds: None (no deadline) or a positive number."""
    if value is not None and not value > 0:
        raise ValueError(f"timeout must be > 0 seconds, or None for no deadline; got {value}")
    return value


def explain_request(
    image: ImageInput,
    caption: str,
    *,
    model: str | None = None,
    text_layer: int | str | None = None,
    image_layer: int | str | None = None,
    n_steps: int | None = None,
    method: str | None = None,
    request_id: str | None = None,
    detail: Detail = "full",
    summary_top_k: int | None = None,
) -> explain_pb2.ExplainRequest:
    """The ``ExplainRequest`` that :meth:`ExplainClient.explain` sends (arguments as there).

    Raises:
        TypeError: ``caption`` or an option of the wrong type, or an unsupported image kind.
        ValueError: an option outside the 32-bit range; a caption with a lone surrogate; an image
            array of the wrong shape or dtype; a ``detail`` or ``summary_top_k`` the API does not
            take.
        OSError: an image path that cannot be read.
    """
    caption = _checked("caption", caption)
    request = explain_pb2.ExplainRequest(image=encode_image(image), caption=caption)
    _set_options(
        request,
        {
            "model": model,
            "text_layer": text_layer,
            "image_layer": image_layer,
            "n_steps": n_steps,
            "method": method,
            "request_id": request_id,
        },
    )
    _set_output(request, detail, summary_top_k)
    return request


def _pem(value: bytes | str | os.PathLike | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    with open(value, "rb") as file:
        return file.read()


def tls_credentials(
    root_certificates: bytes | str | os.PathLike | None = None,
    certificate_chain: bytes | str | os.PathLike | None = None,
    private_key: bytes | str | os.PathLike | None = None,
) -> grpc.ChannelCredentials:
    """Channel credentials for TLS, or mutual TLS when a client certificate and key are given.

    Args:
        root_certificates: PEM bytes or a path of the CA that signed the server's certificate;
            ``None`` = the system's roots.
        certificate_chain, private_key: the client's PEM certificate and key (bytes or paths),
            for servers that require client certificates.

    Raises:
        ValueError: a certificate without a key or the reverse.
        OSError: a path that cannot be read.
    """
    if (certificate_chain is None) != (private_key is None):
        raise ValueError("certificate_chain and private_key go together")
    return grpc.ssl_channel_credentials(_pem(root_certificates), _pem(private_key), _pem(certificate_chain))


def _decode(resp: explain_pb2.ExplainResponse, detail: str) -> Explanation | SummaryResult:
    return SummaryResult.from_proto(resp) if detail == "summary" else Explanation.from_proto(resp)


class ExplainClient:
    """Client of an Explain server; use as a context manager or call :meth:`close`.

    Example::

        with ExplainClient("localhost:50051", timeout=60) as client:
            explanation = client.explain("cat.jpg", "a cat on a sofa")

    Args:
        target: server address, e.g. ``"localhost:50051"``.
        timeout: default deadline of each call, seconds; ``None`` = no deadline.
        credentials: ``grpc.ChannelCredentials`` for a TLS channel, e.g. from
            :func:`tls_credentials` (TLS or mutual TLS); ``None`` = plaintext.
        token: bearer token sent as ``authorization: Bearer <token>`` metadata
            on every call, for servers started with ``--auth-tokens-*``; without
            ``credentials``, to a server off this machine, a :class:`PlaintextTokenWarning`.
        options: extra gRPC channel options as (name, value) pairs; they
            override the defaults (64 MiB send and receive message limits).
        load_balancing_policy: gRPC load-balancing policy across the addresses the
            target resolves to, e.g. ``"round_robin"`` with a ``dns:///`` target naming a
            headless Kubernetes Service, or a multi-address ``ipv4:host:port,host:port``
            target; ``None`` = gRPC's default, ``pick_first`` (every call goes to one
            server). It becomes the channel's default service config; a name gRPC does
            not know fails the first call.

    The channel connects lazily: an unreachable server surfaces as
    ``UnavailableError`` on the first call, not here.

    Raises:
        ValueError: an empty ``target``; a ``timeout`` of 0 or less (here or on a call);
            ``load_balancing_policy`` given together with a
            ``grpc.service_config`` option (put ``loadBalancingConfig`` in that config).
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        options: Iterable[tuple[str, Any]] | None = None,
        load_balancing_policy: str | None = None,
    ) -> None:
        if not isinstance(target, str) or not target.strip():
            raise ValueError(f"target must be a gRPC target such as 'localhost:50051'; got {target!r}")
        merged = {
            "grpc.max_send_message_length": DEFAULT_MAX_SEND_MESSAGE_BYTES,
            "grpc.max_receive_message_length": DEFAULT_MAX_RECEIVE_MESSAGE_BYTES,
        }
        merged.update(options or ())
        if load_balancing_policy is not None:
            if "grpc.service_config" in merged:
                raise ValueError(
                    "give load_balancing_policy or a grpc.service_config option, not both; "
                    "put loadBalancingConfig in the service config"
                )
            # The service config, not the older grpc.lb_policy_name argument: it is the
            # documented way and lets gRPC validate the policy name.
            merged["grpc.service_config"] = json.dumps({"loadBalancingConfig": [{load_balancing_policy: {}}]})
        self._max_send_bytes = int(merged["grpc.max_send_message_length"])
        channel_options = list(merged.items())
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=channel_options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=channel_options)
        self._stub = explain_pb2_grpc.ExplainStub(self._channel)
        self._timeout = _timeout(timeout)
        self._metadata = bearer_metadata(token)
        warn_if_plaintext_token(target, credentials, token, stacklevel=2)

    @property
    def channel(self) -> grpc.Channel:
        """The client's gRPC channel, for other services of the same server (e.g. ``grpc.health.v1``)."""
        return self._channel

    def __enter__(self) -> ExplainClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; later calls fail. Safe to call more than once."""
        self._channel.close()

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """The models the server hosts, in the server's order.

        Args:
            timeout: deadline, seconds; ``None`` = the client's timeout.

        Raises:
            ExplainError: the call failed (a subclass per status code, e.g.
                ``UnavailableError`` while the server is loading models).
        """
        try:
            resp = self._stub.ListModels(
                explain_pb2.ListModelsRequest(), timeout=self._deadline(timeout), metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        return [ModelInfo.from_proto(m, is_default=m.name == resp.default_model) for m in resp.models]

    def server_limits(self, *, timeout: float | None = None) -> ServerLimits:
        """The server's request limits (message size, image size), from ListModels.

        Raises:
            ExplainError: the call failed.
        """
        try:
            resp = self._stub.ListModels(
                explain_pb2.ListModelsRequest(), timeout=self._deadline(timeout), metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        return ServerLimits.from_proto(resp.limits)

    def wait_until_ready(self, timeout: float, *, poll_seconds: float = 0.25) -> list[ModelInfo]:
        """Block until the server hosts its models (loaded and warmed up), polling ListModels.

        Args:
            timeout: longest wait, seconds.
            poll_seconds: pause between attempts, seconds.

        Returns:
            The hosted models, as :meth:`list_models`.

        Raises:
            UnavailableError: the server was unreachable or still loading after ``timeout``.
            ExplainError: any other failure, at once.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.list_models(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            except UnavailableError:
                if time.monotonic() + poll_seconds > deadline:
                    raise
            time.sleep(poll_seconds)

    @overload
    def explain(
        self,
        image: ImageInput,
        caption: str,
        *,
        model: str | None = None,
        text_layer: int | str | None = None,
        image_layer: int | str | None = None,
        n_steps: int | None = None,
        method: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        detail: Literal["full"] = "full",
        summary_top_k: int | None = None,
    ) -> Explanation: ...

    @overload
    def explain(
        self,
        image: ImageInput,
        caption: str,
        *,
        model: str | None = None,
        text_layer: int | str | None = None,
        image_layer: int | str | None = None,
        n_steps: int | None = None,
        method: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        detail: Literal["summary"],
        summary_top_k: int | None = None,
    ) -> SummaryResult: ...

    def explain(
        self,
        image: ImageInput,
        caption: str,
        *,
        model: str | None = None,
        text_layer: int | str | None = None,
        image_layer: int | str | None = None,
        n_steps: int | None = None,
        method: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        detail: Detail = "full",
        summary_top_k: int | None = None,
    ) -> Explanation | SummaryResult:
        """Explain the similarity of ``image`` and ``caption``.

        Args:
            image: a path, encoded bytes, a PIL image or an (H, W, 3) uint8 RGB
                array (see :func:`explain_client.images.encode_image`).
            caption: the caption text.
            model: hosted model name; ``None`` = the server's default.
            text_layer: text-tower layer: an index in [-L_t, L_t - 1] (negative
                counts from the end), or a name from ``ModelInfo.text_layer_list``
                (e.g. "block 11"); ``None`` = the model's default.
            image_layer: image-tower layer: an index in [-L_v, L_v - 1], or a name
                (e.g. "block 11", "layer4", "head"); ``None`` = default.
            n_steps: quadrature nodes in [1, max_n_steps]; ``None`` = default.
            method: quadrature rule (see ``ModelInfo.methods``); ``None`` = default.
            request_id: id echoed in the response (at most 128 printable ASCII
                characters); ``None`` = the server generates one.
            timeout: deadline, seconds; ``None`` = the client's timeout.
            detail: ``"full"`` (the default): the attribution tensors and the summary;
                ``"summary"``: the summary and the scalars only, without the tensors (for
                monitoring: a fraction of the bytes).
            summary_top_k: how many (word, cell) pairs the summary's ``top_interactions``
                holds, in [0, 100]; ``None`` = the server's default, 10.

        Returns:
            The decoded :class:`Explanation` (its ``summary`` too) with ``detail="full"``; a
            :class:`SummaryResult` with ``detail="summary"``.

        Raises:
            TypeError: ``caption`` or an option of the wrong type, or ``image`` of an
                unsupported kind.
            ValueError: an option outside the 32-bit range the API carries; a ``detail``
                other than "full" or "summary", or a ``summary_top_k`` outside [0, 100].
            MessageTooLargeError: the request exceeds the send limit (before sending).
            ValueError: an image array of the wrong shape or dtype, or a
                malformed response.
            OSError: an image path that cannot be read.
            ExplainError: the call failed; the subclass names the status code
                (``InvalidArgumentError``, ``NotFoundError``, ``UnavailableError``,
                ``DeadlineExceededError``, ...).
        """
        request = explain_request(
            image,
            caption,
            model=model,
            text_layer=text_layer,
            image_layer=image_layer,
            n_steps=n_steps,
            method=method,
            request_id=request_id,
            detail=detail,
            summary_top_k=summary_top_k,
        )
        self._check_size(request)
        try:
            resp = self._stub.Explain(request, timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        return _decode(resp, detail)

    @overload
    def explain_many(
        self,
        images: Sequence[ImageInput],
        captions: Sequence[str],
        *,
        model: str | None = None,
        text_layer: int | str | None = None,
        image_layer: int | str | None = None,
        n_steps: int | None = None,
        method: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        detail: Literal["full"] = "full",
        summary_top_k: int | None = None,
    ) -> list[Explanation]: ...

    @overload
    def explain_many(
        self,
        images: Sequence[ImageInput],
        captions: Sequence[str],
        *,
        model: str | None = None,
        text_layer: int | str | None = None,
        image_layer: int | str | None = None,
        n_steps: int | None = None,
        method: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        detail: Literal["summary"],
        summary_top_k: int | None = None,
    ) -> list[SummaryResult]: ...

    def explain_many(
        self,
        images: Sequence[ImageInput],
        captions: Sequence[str],
        *,
        model: str | None = None,
        text_layer: int | str | None = None,
        image_layer: int | str | None = None,
        n_steps: int | None = None,
        method: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        detail: Detail = "full",
        summary_top_k: int | None = None,
    ) -> list[Explanation] | list[SummaryResult]:
        """Explain one image against several captions, or one caption against several images, in one call.

        The server computes the shared side once, so this is much cheaper than separate
        :meth:`explain` calls.

        Args:
            images: one image, or several when ``captions`` holds one caption (kinds as in :meth:`explain`).
            captions: one caption, or several when ``images`` holds one image.
            model, text_layer, image_layer, n_steps, method: as in :meth:`explain`, for every pair.
            request_id: explanation i gets ``"<request_id>/<i>"``; ``None`` = the server generates one.
            timeout: deadline for the whole call, seconds; ``None`` = the client's timeout.
            detail, summary_top_k: as in :meth:`explain`, for every pair.

        Returns:
            One :class:`Explanation` (``detail="summary"``: :class:`SummaryResult`) per caption
            (one image) or per image (one caption), in order.

        Raises:
            TypeError, ValueError, OSError, MessageTooLargeError: as in :meth:`explain`.
            ExplainError: the call failed as a whole; an ``InvalidArgumentError`` names the
                element, e.g. ``captions[3]``, or ``images`` when their pixels together exceed
                :attr:`ServerLimits.max_pixels_per_call`; ``ResourceExhaustedError`` when the
                server's queue cannot take every pair.
        """
        if isinstance(images, (str, bytes)) or isinstance(captions, str):
            raise TypeError("images and captions must be sequences (lists); wrap a single item in a list")
        request = explain_pb2.ExplainManyRequest(images=[encode_image(image) for image in images])
        request.captions.extend(_checked(f"captions[{index}]", caption) for index, caption in enumerate(captions))
        _set_options(
            request,
            {
                "model": model,
                "text_layer": text_layer,
                "image_layer": image_layer,
                "n_steps": n_steps,
                "method": method,
                "request_id": request_id,
            },
        )
        _set_output(request, detail, summary_top_k)
        self._check_size(request)
        try:
            resp = self._stub.ExplainMany(request, timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        return [_decode(item, detail) for item in resp.explanations]

    def _check_size(self, request: Any) -> None:
        size = request.ByteSize()
        if size > self._max_send_bytes:
            raise MessageTooLargeError(size, self._max_send_bytes)

    def _deadline(self, timeout: float | None) -> float | None:
        return self._timeout if timeout is None else _timeout(timeout)
