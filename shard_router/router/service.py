"""The router's Inventory API: route each call to its partition's owner, over batch streams.

Every call is checked with the core's rules first (a malformed request never costs a hop),
then forwarded as an item on the owner's ``Inventory.Batch`` stream with the caller's
remaining deadline. UNAVAILABLE answers (a redirect from a shard that does not own the
partition, a recovering partition, a broken stream) refresh the ring and retry with
backoff until the deadline: mutations carry idempotency keys, so a retry can never apply
twice. Batch reads fan out per owner and are merged back in request order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

import grpc
import structlog
from google.protobuf.message import Message
from google.rpc import status_pb2
from inventory.v1 import inventory_pb2 as pb

from inventory_core import (
    Invalid,
    InventoryKey,
    ReservationNotFound,
    limits,
    partition_of,
    partition_of_reservation,
    validate,
)

from ..common import convert, errors
from ..common.calls import (
    Refusal,
    check,
    deadline_of,
    remaining_s,
    unary,
    validate_key,
)
from ..common.servicer import CallsServicer
from .routing import Routes

T = TypeVar("T")
log = structlog.get_logger(__name__)

# Retries of one call on UNAVAILABLE before giving up (within its deadline anyway).
FORWARD_ATTEMPTS_MAX = 30
# Backoff between them: a partition hand-off takes about a membership lease.
RETRY_BACKOFF_S_INITIAL = 0.02
RETRY_BACKOFF_S_MAX = 0.5
# Legs of one ReserveOrder: a marketplace order rarely spans more than a few locations.
ORDER_LEGS_MAX = 20
ORDER_IDEMPOTENCY_KEY_LENGTH_MAX = 100


class ReadView(Protocol):
    """The eventually consistent read view (persistence.readview.EventReader)."""

    async def levels(
        self, keys: Sequence[InventoryKey]
    ) -> list[tuple[pb.StockLevel, int, int, int] | None]: ...

    async def asof(self, partitions: Sequence[int]) -> dict[int, int | None]: ...


class RouterCalls:
    def __init__(self, routes: Routes, read_view: ReadView | None = None) -> None:
        self._routes = routes
        self._read_view = read_view

    # ------------------------------------------------------------------------ reads

    async def get_availability(
        self, request: pb.GetAvailabilityRequest, deadline: float | None
    ) -> pb.GetAvailabilityResponse:
        if not request.keys or len(request.keys) > limits.availability_keys_max:
            raise Refusal.of(Invalid("keys", f"1 to {limits.availability_keys_max} keys"))
        partitions: list[int] = []
        for index, key in enumerate(request.keys):
            problem = validate_key(f"keys[{index}]", convert.key_from_proto(key))
            if problem:
                raise Refusal.of(problem)
            partitions.append(partition_of(key.merchant_id, key.location_id))
        levels: list[pb.StockLevel] = [pb.StockLevel()] * len(partitions)
        pending = list(range(len(partitions)))
        staleness_ms = 0
        eventual = request.consistency == pb.CONSISTENCY_EVENTUAL
        if eventual and self._read_view is not None:
            pending, staleness_ms = await self._from_read_view(request, partitions, levels)
        if not pending:
            return pb.GetAvailabilityResponse(levels=levels, staleness_ms=staleness_ms)
        for attempt in range(FORWARD_ATTEMPTS_MAX):
            groups: dict[str | None, list[int]] = {}
            for index in pending:
                groups.setdefault(self._routes.address_of(partitions[index]), []).append(index)
            results = await asyncio.gather(
                *(
                    self._read_group(address, request, indexes, deadline)
                    for address, indexes in groups.items()
                )
            )
            pending = []
            for indexes, answer in zip(groups.values(), results, strict=True):
                if isinstance(answer, status_pb2.Status):
                    if answer.code != grpc.StatusCode.UNAVAILABLE.value[0]:
                        raise Refusal(answer)
                    pending.extend(indexes)
                    continue
                for index, level in zip(indexes, answer.levels, strict=True):
                    levels[index] = level
            if not pending:
                return pb.GetAvailabilityResponse(levels=levels, staleness_ms=staleness_ms)
            await self._backoff(attempt, deadline)
        raise Refusal(errors.status(grpc.StatusCode.UNAVAILABLE, "owners unavailable"))

    async def _from_read_view(
        self,
        request: pb.GetAvailabilityRequest,
        partitions: list[int],
        levels: list[pb.StockLevel],
    ) -> tuple[list[int], int]:
        """Fill what the read view can answer with a known staleness bound; the indexes
        left (keys it has never seen, partitions no publisher has stamped, or Redis down)
        are read from their owners instead."""
        assert self._read_view is not None
        keys = [convert.key_from_proto(k) for k in request.keys]
        try:
            found = await self._read_view.levels(keys)
            stamps = await self._read_view.asof(partitions)
        except Exception as error:  # the view is an optimisation: fall back to owners
            log.warning("read_view_unavailable", error=repr(error))
            return list(range(len(keys))), 0
        now_ms = int(time.time() * 1000)
        pending: list[int] = []
        oldest_ms = now_ms
        for index, answer in enumerate(found):
            stamp = stamps.get(partitions[index])
            if answer is None or stamp is None:
                pending.append(index)
                continue
            levels[index] = answer[0]
            oldest_ms = min(oldest_ms, stamp)
        return pending, max(now_ms - oldest_ms, 0)

    async def _read_group(
        self,
        address: str | None,
        request: pb.GetAvailabilityRequest,
        indexes: list[int],
        deadline: float | None,
    ) -> pb.GetAvailabilityResponse | status_pb2.Status:
        if address is None:
            return errors.status(grpc.StatusCode.UNAVAILABLE, "no live shard")
        part = pb.GetAvailabilityRequest(
            keys=[request.keys[i] for i in indexes], consistency=request.consistency
        )
        result = await self._routes.batcher(address).call(
            "get_availability", part, remaining_s(deadline)
        )
        if result.WhichOneof("result") == "error":
            return result.error
        return result.get_availability

    async def get_reservation(
        self, request: pb.GetReservationRequest, deadline: float | None
    ) -> pb.GetReservationResponse:
        partition = partition_of_reservation(request.reservation_id)
        if partition is None:
            raise Refusal.of(ReservationNotFound(request.reservation_id))
        answer: pb.GetReservationResponse = await self._forward(
            partition, "get_reservation", request, deadline
        )
        return answer

    # -------------------------------------------------------------------- mutations

    async def reserve(
        self, request: pb.ReserveRequest, deadline: float | None
    ) -> pb.ReserveResponse:
        command = convert.reserve(request)
        check(validate(command))
        first = command.lines[0].key
        answer: pb.ReserveResponse = await self._forward(
            partition_of(first.merchant_id, first.location_id), "reserve", request, deadline
        )
        return answer

    async def commit(self, request: pb.CommitRequest, deadline: float | None) -> pb.CommitResponse:
        check(validate(convert.commit(request)))
        answer: pb.CommitResponse = await self._forward(
            _reservation_partition(request.reservation_id), "commit", request, deadline
        )
        return answer

    async def release(
        self, request: pb.ReleaseRequest, deadline: float | None
    ) -> pb.ReleaseResponse:
        check(validate(convert.release(request)))
        answer: pb.ReleaseResponse = await self._forward(
            _reservation_partition(request.reservation_id), "release", request, deadline
        )
        return answer

    async def extend_reservation(
        self, request: pb.ExtendReservationRequest, deadline: float | None
    ) -> pb.ExtendReservationResponse:
        check(validate(convert.extend(request)))
        answer: pb.ExtendReservationResponse = await self._forward(
            _reservation_partition(request.reservation_id), "extend_reservation", request, deadline
        )
        return answer

    async def adjust_stock(
        self, request: pb.AdjustStockRequest, deadline: float | None
    ) -> pb.AdjustStockResponse:
        command = convert.adjust_stock(request)
        if isinstance(command, str):
            raise Refusal.of(Invalid("reason", command))
        check(validate(command))
        answer: pb.AdjustStockResponse = await self._forward(
            _key_partition(request.key), "adjust_stock", request, deadline
        )
        return answer

    async def set_stock(
        self, request: pb.SetStockRequest, deadline: float | None
    ) -> pb.SetStockResponse:
        check(validate(convert.set_stock(request)))
        answer: pb.SetStockResponse = await self._forward(
            _key_partition(request.key), "set_stock", request, deadline
        )
        return answer

    async def set_safety_stock(
        self, request: pb.SetSafetyStockRequest, deadline: float | None
    ) -> pb.SetSafetyStockResponse:
        check(validate(convert.set_safety_stock(request)))
        answer: pb.SetSafetyStockResponse = await self._forward(
            _key_partition(request.key), "set_safety_stock", request, deadline
        )
        return answer

    # ------------------------------------------------------------------------- saga

    async def reserve_order(
        self, request: pb.ReserveOrderRequest, deadline: float | None
    ) -> pb.ReserveOrderResponse:
        """Reserve every leg; on any failure release the legs taken, then fail like that leg."""
        key = request.idempotency_key
        if not request.legs or len(request.legs) > ORDER_LEGS_MAX:
            raise Refusal.of(Invalid("legs", f"1 to {ORDER_LEGS_MAX} legs"))
        if not key or len(key) > ORDER_IDEMPOTENCY_KEY_LENGTH_MAX:
            limit = ORDER_IDEMPOTENCY_KEY_LENGTH_MAX
            raise Refusal.of(Invalid("idempotency_key", f"1 to {limit} characters"))
        legs = [
            pb.ReserveRequest(
                lines=leg.lines, ttl_s=request.ttl_s, idempotency_key=f"{key}/leg-{i}"
            )
            for i, leg in enumerate(request.legs)
        ]
        for index, leg in enumerate(legs):
            problem = validate(convert.reserve(leg))
            if problem is not None:
                raise Refusal.of(Invalid(f"legs[{index}].{problem.field}", problem.reason))
        outcomes = await asyncio.gather(
            *(self.reserve(leg, deadline) for leg in legs), return_exceptions=True
        )
        taken = [o.reservation for o in outcomes if isinstance(o, pb.ReserveResponse)]
        failure = next((o for o in outcomes if isinstance(o, BaseException)), None)
        if failure is None:
            # A retry of an order that failed before gets its legs' original answers; the
            # legs were released then, so the order is still failed: check they are held.
            states = await asyncio.gather(*(self._state(r, deadline) for r in taken))
            if all(s == pb.RESERVATION_STATE_ACTIVE for s in states):
                return pb.ReserveOrderResponse(reservations=taken)
            message = f"order {key!r} failed before and its legs were released"
            failure = Refusal(errors.status(grpc.StatusCode.FAILED_PRECONDITION, message))
        await asyncio.gather(*(self._compensate(key, r, deadline) for r in taken))
        if isinstance(failure, Refusal):
            raise failure
        raise failure

    async def _state(self, reservation: pb.Reservation, deadline: float | None) -> int:
        found = await self.get_reservation(
            pb.GetReservationRequest(
                merchant_id=reservation.merchant_id, reservation_id=reservation.reservation_id
            ),
            deadline,
        )
        return found.reservation.state

    async def _compensate(
        self, key: str, reservation: pb.Reservation, deadline: float | None
    ) -> None:
        request = pb.ReleaseRequest(
            merchant_id=reservation.merchant_id,
            reservation_id=reservation.reservation_id,
            idempotency_key=f"{key}/undo-{reservation.reservation_id}",
        )
        try:
            await self.release(request, deadline)
        except Refusal as refusal:  # already released or expired: nothing is held
            if refusal.status.code != grpc.StatusCode.FAILED_PRECONDITION.value[0]:
                raise

    # -------------------------------------------------------------------- forwarding

    async def _forward(
        self, partition: int, field: str, request: Message, deadline: float | None
    ) -> Any:
        for attempt in range(FORWARD_ATTEMPTS_MAX):
            address = self._routes.address_of(partition)
            if address is not None:
                result = await self._routes.batcher(address).call(
                    field, request, remaining_s(deadline)
                )
                if result.WhichOneof("result") != "error":
                    return getattr(result, field)
                if result.error.code != grpc.StatusCode.UNAVAILABLE.value[0]:
                    raise Refusal(result.error)
            await self._backoff(attempt, deadline)
        raise Refusal(
            errors.status(grpc.StatusCode.UNAVAILABLE, f"partition {partition} unavailable")
        )

    async def _backoff(self, attempt: int, deadline: float | None) -> None:
        pause_s = min(RETRY_BACKOFF_S_INITIAL * 2**attempt, RETRY_BACKOFF_S_MAX)
        if deadline is not None and time.monotonic() + pause_s >= deadline:
            raise Refusal(
                errors.status(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    "deadline passed while the owner was unavailable",
                )
            )
        await asyncio.sleep(pause_s)
        await self._routes.refresh(force=True)


class RouterService(CallsServicer):
    """The router's gRPC surface over ``RouterCalls`` (which adds ReserveOrder)."""

    def __init__(self, routes: Routes, read_view: ReadView | None = None) -> None:
        self._router_calls = RouterCalls(routes, read_view)
        super().__init__(self._router_calls)

    async def ReserveOrder(
        self, request: pb.ReserveOrderRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReserveOrderResponse:
        return await unary(context, self._router_calls.reserve_order(request, deadline_of(context)))


def _reservation_partition(reservation_id: str) -> int:
    partition = partition_of_reservation(reservation_id)
    if partition is None:
        raise Refusal.of(ReservationNotFound(reservation_id))
    return partition


def _key_partition(key: pb.InventoryKey) -> int:
    return partition_of(key.merchant_id, key.location_id)
