"""``InventoryClient``: the public Inventory API as typed async methods, with retries.

Every method builds its request message once, then tries that very message until it has
an answer, by the answer's class (``_errors``, DESIGN section 11):

  1. One attempt goes onto the shared Batch stream (``batching=True``: concurrent calls of
     this process travel together, see ``_batcher``) or is a plain unary call. A full
     pending queue of this process raises ``Overloaded`` at once (back-pressure; but
     ``OutcomeUnknown`` if an earlier attempt's outcome was unknown).
  2. A final answer (a response, a rejection) is returned or raised at once; after an
     attempt of unknown outcome it is the truth (the retry found the durable answer or ran
     the call afresh).
  3. A retryable answer (not the owner, recovering, overloaded, the work's deadline passed
     before it was applied: nothing was applied) is tried again.
  4. An answer of unknown outcome (a failed flush, a broken stream, a transport error) is
     tried again only with the same idempotency key: always so, since the request is
     resent unchanged, and a mutation without a key is never resent. The server answers a
     retry of an applied call with its original answer. A read applies nothing, so its
     unknown answers count as retryable.
  5. Pauses grow exponentially from ``backoff_s_initial`` to ``backoff_s_max`` with full
     jitter, drawn from a ``random.Random`` seeded by ``seed``. Retries stop at
     ``retry_attempts_max`` attempts or at the call's deadline; the caller then gets
     ``OutcomeUnknown`` (``Unavailable``, ``DeadlineExceeded``) if any attempt's outcome was
     unknown, else ``NotApplied``: never "nothing applied" for work that might have been.
  6. The call's deadline (``timeout_s``) is local: each attempt gets what is left of it. When
     it fires before an answer, gRPC answers DEADLINE_EXCEEDED here without the server
     having said anything, so the client raises ``DeadlineExceeded`` (outcome unknown: the
     server may still apply the work; retry with the same idempotency key). On the Batch
     stream the batcher waits its ``answer_grace_s`` past the deadline for the server's own,
     definite answer before giving up the same way.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
from google.protobuf.message import Message
from google.rpc import status_pb2
from grpc_status import rpc_status
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc

from ..common import errors, rpcs
from ..common.calls import bearer
from ..common.config import ChannelTLSConfig
from ..common.errors import AnswerClass, answer_class_of
from ..common.tls import ChannelFactory
from ._batcher import BatcherStats, StreamBatcher
from ._errors import (
    Overloaded,
    error_from_status,
    given_up,
    outcome_unknown,
)

R = TypeVar("R", bound=Message)
_FAILED = pb.EVENT_ACK_STATUS_FAILED

# Defaults of the constructor, with why.
# 8 attempts with pauses up to 1 s span a hand-off (an owner recovering its partitions).
RETRY_ATTEMPTS_MAX_DEFAULT = 8
BACKOFF_S_INITIAL_DEFAULT = 0.02
BACKOFF_S_MAX_DEFAULT = 1.0
# The server's own default for an item without timeout_ms.
TIMEOUT_S_DEFAULT = 10.0


def key(merchant_id: str, sku_id: str, location_id: str) -> pb.InventoryKey:
    return pb.InventoryKey(merchant_id=merchant_id, sku_id=sku_id, location_id=location_id)


def line(key: pb.InventoryKey, quantity: int) -> pb.ReservationLine:
    return pb.ReservationLine(key=key, quantity=quantity)


class InventoryClient:
    """An async client of one address (a router, or a shard directly).

    Use as ``async with InventoryClient(address, token=...) as client:``; every method
    returns the generated response message or raises an ``InventoryError``. ``token`` is the
    caller's signed token (``inventory token`` makes one for a local run), sent with every
    call; a server run with ``--no-auth`` needs none. ``tls`` is how the server is reached:
    plaintext without it; TLS trusting ``ca_path``, and presenting ``cert_path`` and
    ``key_path`` to a server that asks for a certificate (mutual TLS; ``inventory up --tls``
    prints the three). A configuration that cannot run raises ``ValueError`` at once.
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
        token: str = "",
        tls: ChannelTLSConfig | None = None,
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
        self._metadata = bearer(token.strip()) if token.strip() else ()
        self._channels = ChannelFactory(tls)
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
        return await self._call(rpcs.GET_AVAILABILITY, request, timeout_s)

    async def reserve(
        self,
        lines: Iterable[pb.ReservationLine],
        *,
        idempotency_key: str,
        ttl_s: int = 0,
        timeout_s: float | None = None,
    ) -> pb.ReserveResponse:
        request = pb.ReserveRequest(lines=lines, ttl_s=ttl_s, idempotency_key=idempotency_key)
        return await self._call(rpcs.RESERVE, request, timeout_s)

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
        return await self._call(rpcs.COMMIT, request, timeout_s)

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
        return await self._call(rpcs.RELEASE, request, timeout_s)

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
        return await self._call(rpcs.EXTEND_RESERVATION, request, timeout_s)

    async def get_reservation(
        self, merchant_id: str, reservation_id: str, *, timeout_s: float | None = None
    ) -> pb.GetReservationResponse:
        request = pb.GetReservationRequest(merchant_id=merchant_id, reservation_id=reservation_id)
        return await self._call(rpcs.GET_RESERVATION, request, timeout_s)

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
        return await self._call(rpcs.ADJUST_STOCK, request, timeout_s)

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
        return await self._call(rpcs.SET_STOCK, request, timeout_s)

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
        return await self._call(rpcs.SET_SAFETY_STOCK, request, timeout_s)

    async def get_over_committed(
        self, merchant_id: str, location_ids: Iterable[str], *, timeout_s: float | None = None
    ) -> pb.GetOverCommittedResponse:
        """The over-committed keys at these locations, each with its exposure and the live
        reservations at risk, newest first: what to cancel or source elsewhere."""
        request = pb.GetOverCommittedRequest(merchant_id=merchant_id, location_ids=location_ids)
        return await self._call(rpcs.GET_OVER_COMMITTED, request, timeout_s)

    async def expect_delivery(
        self,
        merchant_id: str,
        location_id: str,
        delivery_id: str,
        lines: Iterable[tuple[str, int]],
        eta_ms: int,
        *,
        idempotency_key: str,
        timeout_s: float | None = None,
    ) -> pb.ExpectDeliveryResponse:
        """A supplier's notice: ``lines`` of (sku_id, units) expected at the location by
        ``eta_ms``. It replaces the delivery's last notice; no lines cancels it."""
        request = pb.ExpectDeliveryRequest(
            merchant_id=merchant_id,
            idempotency_key=idempotency_key,
            delivery_id=delivery_id,
            location_id=location_id,
            lines=[pb.DeliveryLine(sku_id=sku, quantity=units) for sku, units in lines],
            eta_ms=eta_ms,
        )
        return await self._call(rpcs.EXPECT_DELIVERY, request, timeout_s)

    async def get_feed_health(
        self, merchant_id: str, location_ids: Iterable[str], *, timeout_s: float | None = None
    ) -> pb.GetFeedHealthResponse:
        """Each fed location's sources (last event, arrival, lag) and whether it is stale."""
        request = pb.GetFeedHealthRequest(merchant_id=merchant_id, location_ids=location_ids)
        return await self._call(rpcs.GET_FEED_HEALTH, request, timeout_s)

    async def ingest(
        self,
        merchant_id: str,
        source: str,
        events: Iterable[pb.FeedEvent],
        *,
        batch_id: str = "",
        alive_at: Iterable[str] = (),
        timeout_s: float | None = None,
    ) -> pb.IngestResponse:
        """Send a feed's events (a POS gateway's, a supplier's): one acknowledgement per
        event, in order. Events acknowledged FAILED are sent again (always safe: they are
        de-duplicated by event id) until answered or the attempts run out; what is still
        FAILED then carries the status of its last attempt.

        ``alive_at``: a heartbeat, the locations this source is up at (events may then be
        empty); it keeps them from going stale. It is not sent again: the next one will be."""
        request = pb.IngestRequest(
            merchant_id=merchant_id,
            source=source,
            events=events,
            batch_id=batch_id,
            alive_at=alive_at,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self._timeout_s_default if timeout_s is None else timeout_s)
        response = await self._call(rpcs.INGEST, request, deadline - loop.time())
        for attempt in range(1, self._retry_attempts_max):
            failed = [i for i, a in enumerate(response.acks) if a.status == _FAILED]
            pause_s = self._backoff_s(attempt)
            if not failed or loop.time() + pause_s >= deadline:
                break
            await asyncio.sleep(pause_s)
            again = pb.IngestRequest(
                merchant_id=merchant_id,
                source=source,
                events=[request.events[i] for i in failed],
                batch_id=batch_id,
            )
            answer = await self._call(rpcs.INGEST, again, max(deadline - loop.time(), 0.001))
            for index, ack in zip(failed, answer.acks, strict=True):
                response.acks[index].CopyFrom(ack)
            response.over_committed.extend(answer.over_committed)
        return response

    # -------------------------------------------------------------------------- the policy

    async def _call(self, rpc: rpcs.Rpc[Any, R], request: Message, timeout_s: float | None) -> R:
        """Try ``request`` until a final answer, by the rules of the module's docstring."""
        timeout_s = self._timeout_s_default if timeout_s is None else timeout_s
        assert timeout_s > 0, timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        unknown_seen = False  # has any attempt had an unknown outcome (maybe applied)?
        attempt = 0
        while True:
            attempt += 1
            try:
                answer = await self._attempt(rpc, request, deadline - loop.time())
            except Overloaded as shed:  # this process's own queue: back-pressure, at once
                if not unknown_seen:
                    raise
                raise given_up(shed.status, attempt, unknown_seen=True) from shed
            if isinstance(answer, rpc.response_type):
                return answer
            assert isinstance(answer, status_pb2.Status), answer
            answer_class = answer_class_of(answer)
            if answer_class is AnswerClass.OUTCOME_UNKNOWN and not rpc.mutating:
                answer_class = AnswerClass.RETRYABLE  # a read applied nothing, whatever happened
            if answer_class is AnswerClass.FINAL:
                raise error_from_status(answer)  # the true answer, even after unknown attempts
            unknown_seen = unknown_seen or answer_class is AnswerClass.OUTCOME_UNKNOWN
            if answer_class is AnswerClass.OUTCOME_UNKNOWN and not _resend_is_safe(rpc, request):
                raise outcome_unknown(answer, attempt, "; not resent: it has no idempotency key")
            if attempt >= self._retry_attempts_max:
                raise given_up(answer, attempt, unknown_seen=unknown_seen)
            pause_s = self._backoff_s(attempt)
            if loop.time() + pause_s >= deadline:
                raise given_up(answer, attempt, unknown_seen=unknown_seen, deadline_passed=True)
            await asyncio.sleep(pause_s)
            if loop.time() >= deadline:  # the pause overslept the deadline
                raise given_up(answer, attempt, unknown_seen=unknown_seen, deadline_passed=True)

    def _backoff_s(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, initial * 2^(attempt-1)))."""
        ceiling_s = min(self._backoff_s_max, self._backoff_s_initial * 2 ** (attempt - 1))
        return self._random.uniform(0, ceiling_s)

    async def _attempt(
        self, rpc: rpcs.Rpc[Any, Any], request: Message, timeout_s: float
    ) -> Message | status_pb2.Status:
        """One try: the response message, or the status the call failed with."""
        stub, batcher = self._open()
        if batcher is not None:
            result = await batcher.call(rpc.field, request, timeout_s)
            if result.WhichOneof("result") == "error":
                return result.error
            response: Message = getattr(result, rpc.field)
            return response
        if rpc.service == rpcs.INGEST_SERVICE:
            assert self._channel is not None
            method = getattr(pb_grpc.IngestStub(self._channel), rpc.method)
        else:
            method = getattr(stub, rpc.method)
        try:
            unary_response: Message = await method(
                request, timeout=timeout_s, metadata=self._metadata or None
            )
        except grpc.aio.AioRpcError as error:
            return _status_of(error, timeout_s)
        return unary_response

    def _open(self) -> tuple[pb_grpc.InventoryStub, StreamBatcher | None]:
        if self._closed:
            raise RuntimeError("InventoryClient is closed")
        if self._stub is None:
            self._channel = self._channels.open(self.address)
            self._stub = pb_grpc.InventoryStub(self._channel)
            if self._batching:
                self._batcher = StreamBatcher(self._channel, metadata=self._metadata)
        return self._stub, self._batcher


def _resend_is_safe(rpc: rpcs.Rpc[Any, Any], request: Message) -> bool:
    """May a call of unknown outcome be sent again? A read, always; a mutation only with
    its idempotency key, which the server uses to answer an applied one from memory (a
    feed's events: always, they are de-duplicated by event id)."""
    if not rpc.mutating or rpc.retried_by != "idempotency_key":
        return True
    return bool(getattr(request, "idempotency_key", ""))


def _status_of(error: grpc.aio.AioRpcError, timeout_s: float) -> status_pb2.Status:
    status = rpc_status.from_call(error)
    if status is not None:
        assert isinstance(status, status_pb2.Status)
        return status
    if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        # gRPC's own answer when the caller's deadline fires: the server said nothing.
        message = f"no answer within the call's deadline ({timeout_s:.3f} s left)"
        return errors.status(grpc.StatusCode.DEADLINE_EXCEEDED, message)
    return errors.status(error.code(), error.details() or "")
