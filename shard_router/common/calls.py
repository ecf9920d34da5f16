"""What the shard's and the router's call handlers share: refusals and the unary wrapper.

A handler is ``request, deadline -> response`` and raises ``Refusal`` with the
google.rpc.Status to answer; the unary wrapper aborts with it, the Batch stream returns it
as that item's result.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import TypeVar

import grpc
from google.rpc import status_pb2
from grpc_status import rpc_status

from inventory_core import Invalid, InventoryKey, Rejection, SetStock, validate

from . import errors

T = TypeVar("T")

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


def validate_key(field: str, key: InventoryKey) -> Invalid | None:
    """A key's shape, by the core's rules (a read has no command to validate)."""
    problem = validate(SetStock(key, "read", 0, None, 0))
    if problem is None:
        return None
    return Invalid(problem.field.replace("key", field, 1), problem.reason)


def deadline_of(context: grpc.aio.ServicerContext) -> float:
    remaining = context.time_remaining()
    return time.monotonic() + (CALL_TIMEOUT_S_DEFAULT if remaining is None else remaining)


def remaining_s(deadline: float | None) -> float:
    if deadline is None:
        return CALL_TIMEOUT_S_DEFAULT
    return max(deadline - time.monotonic(), 0.001)


def refusal_status(error: Exception) -> status_pb2.Status | None:
    return error.status if isinstance(error, Refusal) else None


async def unary(context: grpc.aio.ServicerContext, call: Awaitable[T]) -> T:
    try:
        return await call
    except Refusal as refusal:
        await context.abort_with_status(rpc_status.to_status(refusal.status))
        raise AssertionError("abort_with_status returned") from refusal
