"""The public Inventory API served by a shard over its Owner, unary and batched.

Each call: convert the request, check its shape with the core's rules (before it is routed
or queued), submit it to the owner of its partition with its deadline, and map the outcome
through the one error table. A refusal is a ``Refusal`` carrying the google.rpc.Status the
unary call aborts with, or the Batch stream returns as that item's result. No stock rule
lives here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from inventory.v1 import inventory_pb2 as pb

from inventory_core import (
    ClientCommand,
    Committed,
    Extended,
    InventoryKey,
    Outcome,
    Released,
    ReservationNotFound,
    Reserved,
    StockChanged,
    is_accepted,
    partition_of,
    partition_of_reservation,
    validate,
    validate_read,
)

from ..common import convert, errors
from ..common.calls import Refusal, check
from ..common.servicer import CallsServicer
from .owner import DeadlineExpired, FlushFailed, NotOwner, Overloaded, Owner

T = TypeVar("T")


class Calls:
    """Every call as ``request, deadline -> response``, raising ``Refusal``."""

    def __init__(self, owner: Owner) -> None:
        self._owner = owner

    async def get_availability(
        self, request: pb.GetAvailabilityRequest, deadline: float | None
    ) -> pb.GetAvailabilityResponse:
        keys = [convert.key_from_proto(k) for k in request.keys]
        check(validate_read(keys))
        by_partition: dict[int, list[int]] = {}
        for index, key in enumerate(keys):
            partition = partition_of(key.merchant_id, key.location_id)
            by_partition.setdefault(partition, []).append(index)
        levels: list[pb.StockLevel] = [pb.StockLevel()] * len(keys)
        answers = await asyncio.gather(
            *(
                _guard(self._owner.levels(p, tuple(keys[i] for i in indexes), deadline))
                for p, indexes in by_partition.items()
            )
        )
        for indexes, found in zip(by_partition.values(), answers, strict=True):
            for index, level in zip(indexes, found, strict=True):
                levels[index] = convert.level_to_proto(level)
        return pb.GetAvailabilityResponse(levels=levels, staleness_ms=0)

    async def reserve(
        self, request: pb.ReserveRequest, deadline: float | None
    ) -> pb.ReserveResponse:
        command = convert.reserve(request)
        lines = command.lines
        partition = partition_of(lines[0].key.merchant_id, lines[0].key.location_id) if lines else 0
        outcome = await self._mutate(command, partition, deadline)
        assert isinstance(outcome, Reserved)
        return pb.ReserveResponse(
            reservation=convert.reservation_to_proto(outcome.reservation),
            levels=[convert.level_to_proto(level) for level in outcome.levels],
        )

    async def commit(self, request: pb.CommitRequest, deadline: float | None) -> pb.CommitResponse:
        command = convert.commit(request)
        partition = partition_of_reservation(command.reservation_id)
        outcome = await self._mutate(command, partition, deadline)
        assert isinstance(outcome, Committed)
        return pb.CommitResponse(
            reservation=convert.reservation_to_proto(outcome.reservation),
            levels=[convert.level_to_proto(level) for level in outcome.levels],
        )

    async def release(
        self, request: pb.ReleaseRequest, deadline: float | None
    ) -> pb.ReleaseResponse:
        command = convert.release(request)
        partition = partition_of_reservation(command.reservation_id)
        outcome = await self._mutate(command, partition, deadline)
        assert isinstance(outcome, Released)
        return pb.ReleaseResponse(
            reservation=convert.reservation_to_proto(outcome.reservation),
            levels=[convert.level_to_proto(level) for level in outcome.levels],
        )

    async def extend_reservation(
        self, request: pb.ExtendReservationRequest, deadline: float | None
    ) -> pb.ExtendReservationResponse:
        command = convert.extend(request)
        partition = partition_of_reservation(command.reservation_id)
        outcome = await self._mutate(command, partition, deadline)
        assert isinstance(outcome, Extended)
        return pb.ExtendReservationResponse(
            reservation=convert.reservation_to_proto(outcome.reservation)
        )

    async def get_reservation(
        self, request: pb.GetReservationRequest, deadline: float | None
    ) -> pb.GetReservationResponse:
        partition = partition_of_reservation(request.reservation_id)
        if partition is None:
            raise Refusal.of(ReservationNotFound(request.reservation_id))
        found = await _guard(
            self._owner.reservation(
                partition, request.merchant_id, request.reservation_id, deadline
            )
        )
        if found is None:
            raise Refusal.of(ReservationNotFound(request.reservation_id))
        return pb.GetReservationResponse(reservation=convert.reservation_to_proto(found))

    async def adjust_stock(
        self, request: pb.AdjustStockRequest, deadline: float | None
    ) -> pb.AdjustStockResponse:
        level, over_commit = await self._stock_change(convert.adjust_stock(request), deadline)
        return pb.AdjustStockResponse(level=level, over_commit=over_commit)

    async def set_stock(
        self, request: pb.SetStockRequest, deadline: float | None
    ) -> pb.SetStockResponse:
        level, over_commit = await self._stock_change(convert.set_stock(request), deadline)
        return pb.SetStockResponse(level=level, over_commit=over_commit)

    async def set_safety_stock(
        self, request: pb.SetSafetyStockRequest, deadline: float | None
    ) -> pb.SetSafetyStockResponse:
        level, over_commit = await self._stock_change(convert.set_safety_stock(request), deadline)
        return pb.SetSafetyStockResponse(level=level, over_commit=over_commit)

    async def _stock_change(
        self, command: ClientCommand, deadline: float | None
    ) -> tuple[pb.StockLevel, pb.OverCommit | None]:
        key: InventoryKey = command.key  # type: ignore[union-attr]
        outcome = await self._mutate(
            command, partition_of(key.merchant_id, key.location_id), deadline
        )
        assert isinstance(outcome, StockChanged)
        return convert.level_to_proto(outcome.level), convert.over_commit_to_proto(
            outcome.over_commit
        )

    async def _mutate(
        self, command: ClientCommand, partition: int | None, deadline: float | None
    ) -> Outcome:
        check(validate(command))
        if partition is None:  # a reservation id that is not one of ours
            raise Refusal.of(ReservationNotFound(getattr(command, "reservation_id", "")))
        outcome = await _guard(self._owner.mutate(partition, command, deadline))
        if not is_accepted(outcome):
            raise Refusal.of(outcome)  # type: ignore[arg-type]
        return outcome


class InventoryService(CallsServicer):
    """The shard's gRPC surface: unary calls and the Batch stream over ``Calls``."""

    def __init__(self, owner: Owner) -> None:
        super().__init__(Calls(owner))


async def _guard(call: Awaitable[T]) -> T:
    """Await the owner, turning its refusals into the error table's statuses."""
    try:
        return await call
    except NotOwner as error:
        if error.recovering:
            status = errors.partition_recovering(error.partition, str(error))
        else:
            status = errors.not_owner(error.partition, str(error))
        raise Refusal(status) from None
    except Overloaded as error:  # refused before it was queued
        raise Refusal(errors.overloaded(str(error))) from None
    except DeadlineExpired:  # the owner checked the deadline before applying the work
        message = "deadline passed before the owner applied the work; nothing applied"
        raise Refusal(errors.deadline_not_applied(message)) from None
    except FlushFailed as error:  # the batch may or may not be durable
        message = f"{error}; outcome unknown, retry with the same idempotency key"
        raise Refusal(errors.flush_failed(message)) from None
