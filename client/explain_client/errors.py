"""Typed exceptions for the gRPC status codes the Explain service returns."""

from __future__ import annotations

from typing import ClassVar

import grpc

__all__ = [
    "CancelledError",
    "DeadlineExceededError",
    "ExplainError",
    "InternalError",
    "InvalidArgumentError",
    "MessageTooLargeError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "from_rpc_error",
]


class ExplainError(Exception):
    """A failed call to the Explain service.

    Attributes:
        code: the gRPC status code (``grpc.StatusCode``).
        details: the server's error message (may be empty).

    ``str(err)`` is ``"CODE_NAME: details"``, e.g. ``"NOT_FOUND: unknown model 'x'"``.
    Subclasses fix ``code`` to the one they stand for; codes without a subclass
    are raised as a plain ``ExplainError``.
    """

    default_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        """Args:
        details: the server's message.
        code: the status code; ``None`` = the class's ``default_code``.
        """
        # Both values go to Exception.args so that pickling (e.g. across
        # multiprocessing) rebuilds an equal error.
        super().__init__(details, code)
        self.details = details
        self.code = self.default_code if code is None else code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


class InvalidArgumentError(ExplainError):
    """INVALID_ARGUMENT: bad image, caption, layer, n_steps or method; details name the field."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(ExplainError):
    """NOT_FOUND: the requested model is not hosted by the server."""

    default_code = grpc.StatusCode.NOT_FOUND


class UnavailableError(ExplainError):
    """UNAVAILABLE: server unreachable, still loading models, or shutting down; retry later."""

    default_code = grpc.StatusCode.UNAVAILABLE


class ResourceExhaustedError(ExplainError):
    """RESOURCE_EXHAUSTED: server overloaded or a message exceeded the size limit."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class MessageTooLargeError(ResourceExhaustedError):
    """The request is larger than the channel's send limit; raised by the client before sending.

    Attributes:
        size: the serialised request, bytes.
        limit: ``grpc.max_send_message_length`` of the client, bytes.
    """

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"the request is {size} bytes, above the limit of {limit} bytes "
            "(max_send_message_length; the server's limit is in ListModels)"
        )
        self.size, self.limit = size, limit

    def __reduce__(self):
        return type(self), (self.size, self.limit)


class DeadlineExceededError(ExplainError):
    """DEADLINE_EXCEEDED: the call's timeout expired before the server answered."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class CancelledError(ExplainError):
    """CANCELLED: the call was cancelled (by the client or the server)."""

    default_code = grpc.StatusCode.CANCELLED


class UnauthenticatedError(ExplainError):
    """UNAUTHENTICATED: missing or invalid credentials."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(ExplainError):
    """PERMISSION_DENIED: the credentials do not allow this call."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class InternalError(ExplainError):
    """INTERNAL: the server failed; details may say why."""

    default_code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[ExplainError]] = {
    cls.default_code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        UnavailableError,
        ResourceExhaustedError,
        DeadlineExceededError,
        CancelledError,
        UnauthenticatedError,
        PermissionDeniedError,
        InternalError,
    )
}


def from_rpc_error(err: grpc.RpcError) -> ExplainError:
    """Convert a ``grpc.RpcError`` into the matching ``ExplainError`` subclass.

    Args:
        err: the error a stub call raised. Errors raised by calls also implement
            ``grpc.Call`` (``code()``, ``details()``); a bare ``RpcError`` without
            them maps to ``UNKNOWN`` with ``str(err)`` as details.

    Returns:
        An instance of the subclass for ``err.code()``, or a plain
        ``ExplainError`` for codes without one. Never raises.
    """
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = details_fn() if callable(details_fn) else str(err)
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    return _BY_CODE.get(code, ExplainError)(details or "", code)
