"""``InventoryClient``: the public Inventory API as typed async methods, with retries.

Every method builds its request message once, then tries it until it has an answer:

  1. One attempt goes onto the shared Batch stream (``batching=True``: concurrent calls of
     this process travel together, see ``_batcher``) or is a plain unary call.
  2. UNAVAILABLE (the owner is recovering or handing off, a NOT_OWNER redirect, a broken
     stream) is retried with the very same request, so the same idempotency key: the server
     answers a retry of an applied call with the original answer. Pauses grow exponentially
     from ``backoff_s_initial`` to ``backoff_s_max`` with full jitter, drawn from a
     ``random.Random`` seeded by ``seed``.
  3. Retries stop at ``retry_attempts_max`` attempts (``Unavailable``) or at the call's
     deadline (``DeadlineExceeded``); both leave the outcome unknown.
  4. Any other status is final and raised at once as its precise exception (``_errors``).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable
from types import TracebackType
from typing import Self, TypeVar

import grpc
from google.protobuf.message import Message
from google.rpc import status_pb2
from grpc_status import rpc_status
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc

from ..common import errors
from ._batcher import BatcherStats, StreamBatcher
from ._errors import DeadlineExceeded, Unavailable, error_from_status, status_code

R = TypeVar("R", bound=Message)

# Defaults of the constructor, with why.
# 8 attempts with pauses up to 1 s span a hand-off (an owner recovering its partitions).
RETRY_ATTEMPTS_MAX_DEFAULT = 8
BACKOFF_S_INITIAL_DEFAULT = 0.02
BACKOFF_S_MAX_DEFAULT = 1.0
# The server's own default for an item without timeout_ms.
TIMEOUT_S_DEFAULT = 10.0

# The unary method of the stub for each Batch oneof field.
_UNARY_METHODS = {
    "get_availability": "GetAvailability",
    "reserve": "Reserve",
    "commit": "Commit",
    "release": "Release",
    "extend_reservation": "ExtendReservation",
    "get_reservation": "GetReservation",
    "adjust_stock": "AdjustStock",
    "set_stock": "SetStock",
    "set_safety_stock": "SetSafetyStock",
}


def key(merchant_id: str, sku_id: str, location_id: str) -> pb.InventoryKey:
    return pb.InventoryKey(merchant_id=merchant_id, sku_id=sku_id, location_id=location_id)


def line(key: pb.InventoryKey, quantity: int) -> pb.ReservationLine:
    return pb.ReservationLine(key=key, quantity=quantity)


class InventoryClient:
    """An async client of one address (a router, or a shard directly).

    Use as ``async with InventoryClient(address) as client:``; every method returns the
    generated response message or raises an ``InventoryError``.
    """

    def __init__(
        self,
        address: str,
        *,
        batching: bool = True,
        retry_attempts_max: int = RETRY_ATTEMPTS_MAX_DEFAULT,
        backoff_s_initial: float = BACKOFF_S_INITIAL_DEFAULT,
        backoff_s_max: float = BACKOFF_S_MAX_DEFAULT,
        timeout_s_default: float = TIMEOUT_S_DEFAULT,
        seed: int | None = None,
    ) -> None:
        assert retry_attempts_max >= 1, retry_attempts_max
        assert 0 < backoff_s_initial <= backoff_s_max, (backoff_s_initial, backoff_s_max)
        assert timeout_s_default > 0, timeout_s_default
        self.address = address
        self._batching = batching
        self._retry_attempts_max = retry_attempts_max
        self._backoff_s_initial = backoff_s_initial
        self._backoff_s_max = backoff_s_max
        self._timeout_s_default = timeout_s_default
        self._random = random.Random(seed)
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.InventoryStub | None = None
        self._batcher: StreamBatcher | None = None
        self._closed = False

    async def __aenter__(self) -> Self:
        self._open()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Let calls in flight finish (bounded), then close the stream and the channel."""
        self._closed = True
        batcher, channel = self._batcher, self._channel
        if batcher is not None:
            await batcher.close()
        if channel is not None:
            await channel.close()

    @property
    def batcher_stats(self) -> BatcherStats | None:
        """The batch stream's counters; None without batching or before the first call."""
        return None if self._batcher is None else self._batcher.stats

    # -------------------------------------------------------------------------- the API

    async def get_availability(
        self,
        keys: Iterable[pb.InventoryKey],
        consistency: pb.Consistency.ValueType = pb.CONSISTENCY_STRONG,
        *,
        timeout_s: float | None = None,
    ) -> pb.GetAvailabilityResponse:
        request = pb.GetAvailabilityRequest(keys=keys, consistency=consistency)
        return await self._call("get_availability", request, pb.GetAvailabilityResponse, timeout_s)

    async def reserve(
        self,
        lines: Iterable[pb.ReservationLine],
        *,
        idempotency_key: str,
        ttl_s: int = 0,
        timeout_s: float | None = None,
    ) -> pb.ReserveResponse:
        request = pb.ReserveRequest(lines=lines, ttl_s=ttl_s, idempotency_key=idempotency_key)
        return await self._call("reserve", request, pb.ReserveResponse, timeout_s)

    async def commit(
        self,
        merchant_id: str,
        reservation_id: str,
        *,
        idempotency_key: str,
        lines: Iterable[pb.ReservationLine] = (),
        timeout_s: float | None = None,
    ) -> pb.CommitResponse:
        request = pb.CommitRequest(
            merchant_id=merchant_id,
            reservation_id=reservation_id,
            lines=lines,
            idempotency_key=idempotency_key,
        )
        return await self._call("commit", request, pb.CommitResponse, timeout_s)

    async def release(
        self,
        merchant_id: str,
        reservation_id: str,
        *,
        idempotency_key: str,
        timeout_s: float | None = None,
    ) -> pb.ReleaseResponse:
        request = pb.ReleaseRequest(
            merchant_id=merchant_id, reservation_id=reservation_id, idempotency_key=idempotency_key
        )
        return await self._call("release", request, pb.ReleaseResponse, timeout_s)

    async def extend_reservation(
        self,
        merchant_id: str,
        reservation_id: str,
        *,
        ttl_s: int,
        idempotency_key: str,
        timeout_s: float | None = None,
    ) -> pb.ExtendReservationResponse:
        request = pb.ExtendReservationRequest(
            merchant_id=merchant_id,
            reservation_id=reservation_id,
            ttl_s=ttl_s,
            idempotency_key=idempotency_key,
        )
        return await self._call(
            "extend_reservation", request, pb.ExtendReservationResponse, timeout_s
        )

    async def get_reservation(
        self, merchant_id: str, reservation_id: str, *, timeout_s: float | None = None
    ) -> pb.GetReservationResponse:
        request = pb.GetReservationRequest(merchant_id=merchant_id, reservation_id=reservation_id)
        return await self._call("get_reservation", request, pb.GetReservationResponse, timeout_s)

    async def adjust_stock(
        self,
        key: pb.InventoryKey,
        delta: int,
        *,
        reason: pb.AdjustmentReason.ValueType,
        idempotency_key: str,
        occurred_at_ms: int = 0,
        timeout_s: float | None = None,
    ) -> pb.AdjustStockResponse:
        request = pb.AdjustStockRequest(
            key=key,
            delta=delta,
            reason=reason,
            occurred_at_ms=occurred_at_ms,
            idempotency_key=idempotency_key,
        )
        return await self._call("adjust_stock", request, pb.AdjustStockResponse, timeout_s)

    async def set_stock(
        self,
        key: pb.InventoryKey,
        on_hand: int,
        *,
        idempotency_key: str,
        expected_version: int | None = None,
        timeout_s: float | None = None,
    ) -> pb.SetStockResponse:
        request = pb.SetStockRequest(
            key=key,
            on_hand=on_hand,
            expected_version=expected_version,
            idempotency_key=idempotency_key,
        )
        return await self._call("set_stock", request, pb.SetStockResponse, timeout_s)

    async def set_safety_stock(
        self,
        key: pb.InventoryKey,
        safety_stock: int,
        *,
        idempotency_key: str,
        expected_version: int | None = None,
        timeout_s: float | None = None,
    ) -> pb.SetSafetyStockResponse:
        request = pb.SetSafetyStockRequest(
            key=key,
            safety_stock=safety_stock,
            expected_version=expected_version,
            idempotency_key=idempotency_key,
        )
        return await self._call("set_safety_stock", request, pb.SetSafetyStockResponse, timeout_s)

    # -------------------------------------------------------------------------- the policy

    async def _call(
        self, field_name: str, request: Message, response_type: type[R], timeout_s: float | None
    ) -> R:
        timeout_s = self._timeout_s_default if timeout_s is None else timeout_s
        assert timeout_s > 0, timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        attempt = 0
        while True:
            attempt += 1
            remaining_s = deadline - loop.time()
            if remaining_s <= 0:  # the last pause overslept the deadline
                raise _deadline_passed(attempt - 1)
            answer = await self._attempt(field_name, request, remaining_s)
            if isinstance(answer, response_type):
                return answer
            assert isinstance(answer, status_pb2.Status), answer
            if status_code(answer) != grpc.StatusCode.UNAVAILABLE:
                raise error_from_status(answer)
            if attempt >= self._retry_attempts_max:
                raise Unavailable(answer, attempt)
            pause_s = self._backoff_s(attempt)
            if loop.time() + pause_s >= deadline:
                raise _deadline_passed(attempt)
            await asyncio.sleep(pause_s)

    def _backoff_s(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, initial * 2^(attempt-1)))."""
        ceiling_s = min(self._backoff_s_max, self._backoff_s_initial * 2 ** (attempt - 1))
        return self._random.uniform(0, ceiling_s)

    async def _attempt(
        self, field_name: str, request: Message, timeout_s: float
    ) -> Message | status_pb2.Status:
        """One try: the response message, or the status the call failed with."""
        stub, batcher = self._open()
        if batcher is not None:
            result = await batcher.call(field_name, request, timeout_s)
            if result.WhichOneof("result") == "error":
                return result.error
            response: Message = getattr(result, field_name)
            return response
        method = getattr(stub, _UNARY_METHODS[field_name])
        try:
            unary_response: Message = await method(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            return _status_of(error)
        return unary_response

    def _open(self) -> tuple[pb_grpc.InventoryStub, StreamBatcher | None]:
        if self._closed:
            raise RuntimeError("InventoryClient is closed")
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(self.address)
            self._stub = pb_grpc.InventoryStub(self._channel)
            if self._batching:
                self._batcher = StreamBatcher(self._channel)
        return self._stub, self._batcher


def _status_of(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    status = rpc_status.from_call(error)
    if status is not None:
        assert isinstance(status, status_pb2.Status)
        return status
    return errors.status(error.code(), error.details() or "")


def _deadline_passed(attempts: int) -> DeadlineExceeded:
    message = f"deadline passed after {attempts} attempts answered UNAVAILABLE; outcome unknown"
    return DeadlineExceeded(errors.status(grpc.StatusCode.DEADLINE_EXCEEDED, message))
