"""Malformed request messages get INVALID_ARGUMENT, not gRPC's UNKNOWN."""

from __future__ import annotations

from typing import Callable

import grpc
from google.protobuf.message import DecodeError

from .interceptors import HandlerInterceptor, replace_behavior


class _Malformed:
    """Stands in for a request that failed to parse."""

    def __init__(self, error: DecodeError):
        self.error = error


def _safe(deserialize: Callable[[bytes], object] | None) -> Callable[[bytes], object] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> object:
        try:
            return deserialize(data)
        except DecodeError as err:  # e.g. invalid UTF-8 in a string field, corrupt wire format
            return _Malformed(err)

    return parse


class MalformedRequestInterceptor(HandlerInterceptor):
    """Parses unary requests itself and answers unparsable ones with INVALID_ARGUMENT.

    gRPC would report a deserialisation failure as UNKNOWN, which callers cannot tell from a
    server bug. Streaming methods (health Watch, reflection) keep gRPC's own handling.
    """

    def intercept_handler(
        self, handler: grpc.RpcMethodHandler, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        """Wrap unary-unary handlers; pass the others through."""
        if not handler.unary_unary:
            return handler
        behaviour = handler.unary_unary

        async def guarded(request, context: grpc.aio.ServicerContext):
            if isinstance(request, _Malformed):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"request: not a valid {handler_call_details.method} message: {request.error}",
                )
            return await behaviour(request, context)

        return replace_behavior(handler, guarded, request_deserializer=_safe(handler.request_deserializer))
