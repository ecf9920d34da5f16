"""What the shard's and the router's call handlers share: refusals and the unary wrapper.

A handler is ``request, deadline -> response`` and raises ``Refusal`` with the
google.rpc.Status to answer (always one of the error table's, shard_router.common.errors);
the unary wrapper aborts with it, the Batch stream returns it as that item's result. Any
other exception is a bug: it is logged and answered INTERNAL (outcome unknown for a
mutation).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar
from typing import Any, NoReturn, TypeVar

import grpc
import structlog
from google.rpc import status_pb2
from grpc_status import rpc_status

from inventory_core import Invalid, Rejection

from . import errors

T = TypeVar("T")
# What a server interceptor is given to reach the next one (and the servicer at the end).
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]]
log = structlog.get_logger(__name__)

# Caller metadata that travels with a call from router to owner (and into log lines).
PROPAGATED_METADATA = ("x-request-id", "traceparent", "tracestate")
# The caller's token: "authorization: Bearer <JWT>" (shard_router.common.tokens); never
# propagated, never logged.
AUTHORIZATION_METADATA = "authorization"
BEARER = "Bearer "
# The metadata of the call being served, for whatever it forwards.
request_metadata: ContextVar[dict[str, str]] = ContextVar("request_metadata", default={})  # noqa: B039

# A call without a deadline gets this one, so no work waits forever.
CALL_TIMEOUT_S_DEFAULT = 10.0


class Refusal(Exception):
    """A call's answer is this status (code, message, details)."""

    def __init__(self, status: status_pb2.Status) -> None:
        super().__init__(status.message)
        self.status = status

    @staticmethod
    def of(rejection: Rejection) -> Refusal:
        return Refusal(errors.rejection_to_status(rejection))


def check(problem: Invalid | None) -> None:
    if problem is not None:
        raise Refusal.of(problem)


def deadline_of(context: grpc.aio.ServicerContext) -> float:
    remaining = context.time_remaining()
    return time.monotonic() + (CALL_TIMEOUT_S_DEFAULT if remaining is None else remaining)


def remaining_s(deadline: float | None) -> float:
    if deadline is None:
        return CALL_TIMEOUT_S_DEFAULT
    return max(deadline - time.monotonic(), 0.001)


def refusal_status(error: Exception) -> status_pb2.Status | None:
    return error.status if isinstance(error, Refusal) else None


def bearer(token: str) -> tuple[tuple[str, str]]:
    """The metadata that presents ``token``."""
    return ((AUTHORIZATION_METADATA, BEARER + token),)


def propagated(pairs: Iterable[tuple[str, Any]]) -> dict[str, str]:
    return {k: str(v) for k, v in pairs if k in PROPAGATED_METADATA}


def with_metadata(metadata: dict[str, str], call: Awaitable[T]) -> Awaitable[T]:
    """``call``, to be run with its caller's metadata in context (forwarding and logs).

    Most calls carry none: then, if the context holds none either, ``call`` itself is
    returned, with nothing set and nothing bound (binding log fields costs ~11 us a call).
    Otherwise the metadata replaces the context's for the call, so nothing of another
    call's leaks into it, and its log fields are bound only if it has any.
    """
    if not metadata and not request_metadata.get():
        return call
    return _with_metadata(metadata, call)


async def _with_metadata(metadata: dict[str, str], call: Awaitable[T]) -> T:
    token = request_metadata.set(metadata)
    try:
        fields = _log_fields(metadata)
        if not fields:
            return await call
        with structlog.contextvars.bound_contextvars(**fields):
            return await call
    finally:
        request_metadata.reset(token)


def _log_fields(metadata: dict[str, str]) -> dict[str, str]:
    fields = {}
    if "x-request-id" in metadata:
        fields["request_id"] = metadata["x-request-id"]
    if "traceparent" in metadata:
        fields["traceparent"] = metadata["traceparent"]
    return fields


async def unary(
    context: grpc.aio.ServicerContext, call: Awaitable[T], *, mutating: bool = True
) -> T:
    metadata = propagated(context.invocation_metadata() or ())
    try:
        return await with_metadata(metadata, call)
    except Refusal as refusal:
        await abort(context, refusal.status)
    except Exception as error:  # a bug: the last-resort answer, as the Batch items get
        log.exception("call_failed")
        await abort(context, errors.internal(f"internal error: {error!r}", mutating=mutating))


async def abort(context: grpc.aio.ServicerContext, status: status_pb2.Status) -> NoReturn:
    """End the call with ``status`` (grpc's abort raises)."""
    await context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("abort_with_status returned")
