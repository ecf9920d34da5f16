"""The public Inventory API served by a shard over its Owner.

Each handler: convert the request, check its shape with the core's rules (before it is
routed or queued), submit it to the owner of its partition with the caller's deadline, and
map the outcome through the one error table. No stock rule lives here.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import NoReturn, TypeVar

import grpc
from grpc_status import rpc_status
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc

from inventory_core import (
    ClientCommand,
    Committed,
    Extended,
    Invalid,
    InventoryKey,
    Outcome,
    Released,
    ReservationNotFound,
    Reserved,
    SetStock,
    StockChanged,
    is_accepted,
    limits,
    partition_of,
    partition_of_reservation,
    validate,
)

from ..common import convert, errors
from .owner import DeadlineExpired, FlushFailed, NotOwner, Overloaded, Owner

T = TypeVar("T")


class InventoryService(pb_grpc.InventoryServicer):
    def __init__(self, owner: Owner) -> None:
        self._owner = owner

    async def GetAvailability(
        self, request: pb.GetAvailabilityRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetAvailabilityResponse:
        keys = [convert.key_from_proto(k) for k in request.keys]
        if not keys or len(keys) > limits.availability_keys_max:
            await _reject(context, Invalid("keys", f"1 to {limits.availability_keys_max} keys"))
        by_partition: dict[int, list[int]] = {}
        for index, key in enumerate(keys):
            problem = validate_key(f"keys[{index}]", key)
            if problem:
                await _reject(context, problem)
            by_partition.setdefault(partition_of(key.merchant_id, key.location_id), []).append(
                index
            )
        levels: list[pb.StockLevel | None] = [None] * len(keys)
        deadline = _deadline(context)
        for partition, indexes in by_partition.items():
            found = await _guard(
                context,
                self._owner.levels(partition, tuple(keys[i] for i in indexes), deadline),
            )
            for index, level in zip(indexes, found, strict=True):
                levels[index] = convert.level_to_proto(level)
        return pb.GetAvailabilityResponse(levels=[lv for lv in levels if lv], staleness_ms=0)

    async def Reserve(
        self, request: pb.ReserveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReserveResponse:
        command = convert.reserve(request)
        outcome = await self._mutate(context, command, _partition_of_lines(command.lines))
        assert isinstance(outcome, Reserved)
        return pb.ReserveResponse(
            reservation=convert.reservation_to_proto(outcome.reservation),
            levels=[convert.level_to_proto(level) for level in outcome.levels],
        )

    async def Commit(
        self, request: pb.CommitRequest, context: grpc.aio.ServicerContext
    ) -> pb.CommitResponse:
        command = convert.commit(request)
        outcome = await self._mutate(
            context, command, partition_of_reservation(command.reservation_id)
        )
        assert isinstance(outcome, Committed)
        return pb.CommitResponse(
            reservation=convert.reservation_to_proto(outcome.reservation),
            levels=[convert.level_to_proto(level) for level in outcome.levels],
        )

    async def Release(
        self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseResponse:
        command = convert.release(request)
        outcome = await self._mutate(
            context, command, partition_of_reservation(command.reservation_id)
        )
        assert isinstance(outcome, Released)
        return pb.ReleaseResponse(
            reservation=convert.reservation_to_proto(outcome.reservation),
            levels=[convert.level_to_proto(level) for level in outcome.levels],
        )

    async def ExtendReservation(
        self, request: pb.ExtendReservationRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExtendReservationResponse:
        command = convert.extend(request)
        outcome = await self._mutate(
            context, command, partition_of_reservation(command.reservation_id)
        )
        assert isinstance(outcome, Extended)
        return pb.ExtendReservationResponse(
            reservation=convert.reservation_to_proto(outcome.reservation)
        )

    async def GetReservation(
        self, request: pb.GetReservationRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetReservationResponse:
        partition = partition_of_reservation(request.reservation_id)
        if partition is None:
            await _reject(context, ReservationNotFound(request.reservation_id))
        found = await _guard(
            context,
            self._owner.reservation(
                partition, request.merchant_id, request.reservation_id, _deadline(context)
            ),
        )
        if found is None:
            await _reject(context, ReservationNotFound(request.reservation_id))
        return pb.GetReservationResponse(reservation=convert.reservation_to_proto(found))

    async def AdjustStock(
        self, request: pb.AdjustStockRequest, context: grpc.aio.ServicerContext
    ) -> pb.AdjustStockResponse:
        command = convert.adjust_stock(request)
        if isinstance(command, str):
            await _reject(context, Invalid("reason", command))
        outcome = await self._mutate(context, command, _partition_of_key(command.key))
        level, over_commit = _stock_changed(outcome)
        return pb.AdjustStockResponse(level=level, over_commit=over_commit)

    async def SetStock(
        self, request: pb.SetStockRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetStockResponse:
        command = convert.set_stock(request)
        outcome = await self._mutate(context, command, _partition_of_key(command.key))
        level, over_commit = _stock_changed(outcome)
        return pb.SetStockResponse(level=level, over_commit=over_commit)

    async def SetSafetyStock(
        self, request: pb.SetSafetyStockRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetSafetyStockResponse:
        command = convert.set_safety_stock(request)
        outcome = await self._mutate(context, command, _partition_of_key(command.key))
        level, over_commit = _stock_changed(outcome)
        return pb.SetSafetyStockResponse(level=level, over_commit=over_commit)

    async def _mutate(
        self, context: grpc.aio.ServicerContext, command: ClientCommand, partition: int | None
    ) -> Outcome:
        invalid = validate(command)
        if invalid is not None:
            await _reject(context, invalid)
        if partition is None:  # a reservation id that is not one of ours
            await _reject(context, ReservationNotFound(getattr(command, "reservation_id", "")))
        outcome = await _guard(context, self._owner.mutate(partition, command, _deadline(context)))
        if not is_accepted(outcome):
            await _reject(context, outcome)
        return outcome


def validate_key(field: str, key: InventoryKey) -> Invalid | None:
    """A key's shape, by the core's rules (a read has no command to validate)."""
    problem = validate(SetStock(key, "read", 0, None, 0))
    if problem is None:
        return None
    return Invalid(problem.field.replace("key", field, 1), problem.reason)


def _partition_of_lines(lines: tuple[object, ...]) -> int | None:
    if not lines:
        return 0  # refused by validation before it is routed
    key = lines[0].key  # type: ignore[attr-defined]
    return partition_of(key.merchant_id, key.location_id)


def _partition_of_key(key: InventoryKey) -> int:
    return partition_of(key.merchant_id, key.location_id)


def _stock_changed(outcome: Outcome) -> tuple[pb.StockLevel, pb.OverCommit | None]:
    assert isinstance(outcome, StockChanged)
    return convert.level_to_proto(outcome.level), convert.over_commit_to_proto(outcome.over_commit)


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


async def _reject(context: grpc.aio.ServicerContext, rejection: object) -> NoReturn:
    await _abort(context, errors.rejection_to_status(rejection))  # type: ignore[arg-type]


async def _abort(context: grpc.aio.ServicerContext, status: object) -> NoReturn:
    await context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("abort_with_status returned")


async def _guard(context: grpc.aio.ServicerContext, call: Awaitable[T]) -> T:
    """Await the owner, turning its refusals into statuses."""
    try:
        return await call
    except NotOwner as error:
        await _abort(context, errors.status(grpc.StatusCode.UNAVAILABLE, str(error)))
    except Overloaded as error:
        await _abort(context, errors.status(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)))
    except DeadlineExpired:
        await _abort(
            context,
            errors.status(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed; nothing applied"),
        )
    except FlushFailed as error:
        await _abort(context, errors.status(grpc.StatusCode.UNAVAILABLE, str(error)))


Handler = Callable[..., Awaitable[object]]
