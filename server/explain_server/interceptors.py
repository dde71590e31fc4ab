"""What the server's interceptors share: seeing each call's handler, and replacing its behaviour."""

from __future__ import annotations

import abc
from typing import Awaitable, Callable

import grpc

# grpc's handler constructors, by (request streaming, response streaming)
_CONSTRUCTORS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def replace_behavior(
    handler: grpc.RpcMethodHandler, behavior: Callable, request_deserializer: Callable[[bytes], object] | None = None
) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s streaming kind that runs ``behavior`` instead of its own.

    ``behavior`` takes what the replaced behaviour takes (a request or a request iterator, and
    the context) and is an async generator where the method streams its responses. The new
    handler keeps ``handler``'s response serializer, and its request deserializer unless
    ``request_deserializer`` is given.
    """
    constructor = _CONSTRUCTORS[handler.request_streaming, handler.response_streaming]
    return constructor(
        behavior,
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class HandlerInterceptor(grpc.aio.ServerInterceptor):
    """A server interceptor that decides per call which handler serves it.

    Calls to methods the server does not have pass by it (grpc answers them UNIMPLEMENTED);
    for the others :meth:`intercept_handler` chooses.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return self.intercept_handler(handler, handler_call_details)

    @abc.abstractmethod
    def intercept_handler(
        self, handler: grpc.RpcMethodHandler, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        """The handler for a call to ``handler_call_details.method``: ``handler`` itself, or
        one made by :func:`replace_behavior`."""
