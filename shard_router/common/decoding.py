"""Bytes that are not a request of their method are refused INVALID_ARGUMENT, naming it.

gRPC parses a call's message with the method's deserializer before any handler runs; when
the bytes do not parse, the aio server answers UNKNOWN ("Unexpected DecodeError"), which a
caller cannot tell from a bug (the error table never answers UNKNOWN). ``RequestDecoding``
is the outermost server interceptor (``server.create_server``): it wraps each method's
deserializer so that a ``DecodeError`` becomes a ``Malformed`` value rather than an
exception, and the method's behaviour so that a ``Malformed`` request is answered with the
table's INVALID_ARGUMENT (field ``request``, the method and the message type named) before
anything else sees it: authentication, access and the servicer only ever get messages. On a
stream, the first request that does not parse ends the stream so.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import status_pb2

from inventory_core import Invalid

from . import errors
from .calls import Continuation, abort


@dataclass(frozen=True, slots=True)
class Malformed:
    """A request's bytes that did not parse, and why."""

    reason: str


class RequestDecoding(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return decoding(handler, details.method)


def decoding(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """``handler`` with its requests parsed as above (``method`` names them)."""
    parse = handler.request_deserializer
    message_type = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
    type_name = message_type.full_name if message_type is not None else "request"

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as error:
            return Malformed(f"not a valid {type_name} for {method} ({error})")

    serializer = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _unary(handler.unary_unary), deserialize, serializer
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _unary(handler.unary_stream), deserialize, serializer
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _stream(handler.stream_unary), deserialize, serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        _stream(handler.stream_stream), deserialize, serializer
    )


def _refusal(malformed: Malformed) -> status_pb2.Status:
    return errors.rejection_to_status(Invalid("request", malformed.reason))


Behavior = Callable[[Any, grpc.aio.ServicerContext], Any]


def _unary(behavior: Behavior) -> Behavior:
    """A behaviour taking one request: refused when it did not parse."""
    if inspect.isasyncgenfunction(behavior):

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Malformed):
                await abort(context, _refusal(request))
            async for response in behavior(request, context):
                yield response

        return streaming

    async def answering(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Malformed):
            await abort(context, _refusal(request))
        return await behavior(request, context)

    return answering


def _stream(behavior: Behavior) -> Behavior:
    """A behaviour reading a stream of requests: it ends at the first that did not parse."""

    async def parsed(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        async for request in requests:
            if isinstance(request, Malformed):
                await abort(context, _refusal(request))
            yield request

    if inspect.isasyncgenfunction(behavior):

        async def streaming(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            async for response in behavior(parsed(requests, context), context):
                yield response

        return streaming

    async def answering(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        return await behavior(parsed(requests, context), context)

    return answering
