"""The public Inventory API served by a shard over its Owner, unary and batched.

Each call: convert the request, check its shape with the core's rules (before it is routed
or queued), submit it to the owner of its partition with its deadline, and map the outcome
through the one error table. A refusal is a ``Refusal`` carrying the google.rpc.Status the
unary call aborts with, or the Batch stream returns as that item's result. No stock rule
lives here.

Every mutating call is one row of ``MUTATIONS`` (request -> command and partition, outcome ->
response), used by the unary path (await the owner) and by the Batch stream, which hands a
request's mutations to the owner by callback: no task and no future per item.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import structlog
from google.rpc import status_pb2
from inventory.v1 import inventory_pb2 as pb

from inventory_core import (
    ClientCommand,
    Committed,
    DeliveryExpected,
    Extended,
    HotKeyPart,
    Ingested,
    InventoryKey,
    KeySplit,
    Outcome,
    OverCommitted,
    QuotaReceived,
    QuotaSent,
    Released,
    ReservationNotFound,
    Reserved,
    StockChanged,
    TransferSettled,
    is_accepted,
    locations_by_partition,
    partition_of,
    partition_of_reservation,
    validate,
    validate_hot_keys_read,
    validate_locations_read,
    validate_read,
)

from ..common import batching, convert, errors
from ..common import ingest as ingest_service
from ..common.calls import Refusal, check
from ..common.servicer import CallsServicer
from .owner import DeadlineExpired, FlushFailed, NotOwner, Overloaded, Owner

log = structlog.get_logger(__name__)

T = TypeVar("T")
R = TypeVar("R")  # a call's response message


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
        return await self._call(RESERVE, request, deadline)

    async def commit(self, request: pb.CommitRequest, deadline: float | None) -> pb.CommitResponse:
        return await self._call(COMMIT, request, deadline)

    async def release(
        self, request: pb.ReleaseRequest, deadline: float | None
    ) -> pb.ReleaseResponse:
        return await self._call(RELEASE, request, deadline)

    async def extend_reservation(
        self, request: pb.ExtendReservationRequest, deadline: float | None
    ) -> pb.ExtendReservationResponse:
        return await self._call(EXTEND, request, deadline)

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
        return await self._call(ADJUST_STOCK, request, deadline)

    async def set_stock(
        self, request: pb.SetStockRequest, deadline: float | None
    ) -> pb.SetStockResponse:
        return await self._call(SET_STOCK, request, deadline)

    async def set_safety_stock(
        self, request: pb.SetSafetyStockRequest, deadline: float | None
    ) -> pb.SetSafetyStockResponse:
        return await self._call(SET_SAFETY_STOCK, request, deadline)

    async def expect_delivery(
        self, request: pb.ExpectDeliveryRequest, deadline: float | None
    ) -> pb.ExpectDeliveryResponse:
        return await self._call(EXPECT_DELIVERY, request, deadline)

    async def split_key(
        self, request: pb.SplitKeyRequest, deadline: float | None
    ) -> pb.SplitKeyResponse:
        return await self._call(SPLIT_KEY, request, deadline)

    async def merge_key(
        self, request: pb.MergeKeyRequest, deadline: float | None
    ) -> pb.MergeKeyResponse:
        return await self._call(MERGE_KEY, request, deadline)

    async def send_quota(
        self, request: pb.SendQuotaRequest, deadline: float | None
    ) -> pb.SendQuotaResponse:
        return await self._call(SEND_QUOTA, request, deadline)

    async def receive_quota(
        self, request: pb.ReceiveQuotaRequest, deadline: float | None
    ) -> pb.ReceiveQuotaResponse:
        return await self._call(RECEIVE_QUOTA, request, deadline)

    async def settle_transfer(
        self, request: pb.SettleTransferRequest, deadline: float | None
    ) -> pb.SettleTransferResponse:
        return await self._call(SETTLE_TRANSFER, request, deadline)

    async def get_hot_keys(
        self, request: pb.GetHotKeysRequest, deadline: float | None
    ) -> pb.GetHotKeysResponse:
        """The named parts, each asked of its partition's owner in the order asked; with no
        keys, every split key's home in the partitions this process owns."""
        keys = [convert.key_from_proto(k) for k in request.keys]
        check(validate_hot_keys_read(keys))
        by_partition: dict[int, list[InventoryKey]] = {}
        for key in keys:
            by_partition.setdefault(partition_of(key.merchant_id, key.location_id), []).append(key)
        partitions = list(by_partition) if keys else self._owner.partitions_with_splits()
        answers = await asyncio.gather(
            *(
                _guard(self._owner.hot_key_parts(p, by_partition.get(p), deadline))
                for p in partitions
            )
        )
        found: dict[InventoryKey, HotKeyPart] = {
            part.level.key: part for answer in answers for part in answer
        }
        ordered = [found[k] for k in dict.fromkeys(keys) if k in found] if keys else found.values()
        return pb.GetHotKeysResponse(parts=[convert.hot_key_part_to_proto(p) for p in ordered])

    async def get_over_committed(
        self, request: pb.GetOverCommittedRequest, deadline: float | None
    ) -> pb.GetOverCommittedResponse:
        """Each location's partition asked of its owner; keys by location, then SKU."""
        answers = await self._by_location(self._owner.over_committed, request, deadline)
        found = sorted((o for answer in answers for o in answer), key=_by_location)
        return pb.GetOverCommittedResponse(keys=convert.over_committed_to_proto(found))

    async def get_feed_health(
        self, request: pb.GetFeedHealthRequest, deadline: float | None
    ) -> pb.GetFeedHealthResponse:
        """Each location's partition asked of its owner; in the order asked."""
        answers = await self._by_location(self._owner.feed_health, request, deadline)
        found = {h.location.location_id: h for answer in answers for h in answer}
        ordered = [found[i] for i in dict.fromkeys(request.location_ids) if i in found]
        return pb.GetFeedHealthResponse(locations=convert.feed_health_to_proto(ordered))

    async def _by_location(
        self,
        query: Callable[[int, str, Sequence[str], float | None], Awaitable[tuple[T, ...]]],
        request: Any,
        deadline: float | None,
    ) -> list[tuple[T, ...]]:
        """A read by location (merchant_id, location_ids): each partition's asked of its
        owner (``query(partition, merchant_id, locations, deadline)``)."""
        merchant_id = request.merchant_id
        check(validate_locations_read(merchant_id, request.location_ids))
        return list(
            await asyncio.gather(
                *(
                    _guard(query(p, merchant_id, locations, deadline))
                    for p, locations in locations_by_partition(
                        merchant_id, request.location_ids
                    ).items()
                )
            )
        )

    async def ingest(self, request: pb.IngestRequest, deadline: float | None) -> pb.IngestResponse:
        """A feed's events, each part applied by the owner of its partition."""
        return await ingest_service.ingest(request, deadline, self._ingest_part)

    async def _ingest_part(
        self, part: ingest_service.Part, deadline: float
    ) -> pb.IngestResponse | status_pb2.Status:
        try:
            command, partition = INGEST.prepare(part.request)
            if partition != part.partition:
                raise AssertionError(f"part of partition {part.partition} in {partition}")
            outcome = await _guard(self._owner.mutate(partition, command, deadline))
            return INGEST.respond(outcome)
        except Refusal as refusal:
            return refusal.status

    async def _call(self, mutation: _Mutation[R], request: Any, deadline: float | None) -> R:
        command, partition = mutation.prepare(request)
        outcome = await _guard(self._owner.mutate(partition, command, deadline))
        return mutation.respond(outcome)

    # --------------------------------------------------------------- the Batch stream

    def batch_handler(self, others: batching.ItemHandler) -> batching.ItemHandler:
        """Mutations without metadata go to the owner by callback (no task or future per
        item); every other item (reads, metadata to bind for its logs) goes to ``others``."""

        def handle(
            items: Sequence[pb.BatchItem],
            received_at: float,
            answer: batching.Answer,
            group: asyncio.TaskGroup,
        ) -> None:
            rest = []
            for item in items:
                name = item.WhichOneof("call")
                mutation = MUTATIONS.get(name) if name is not None else None
                if name is None or mutation is None or item.metadata:
                    rest.append(item)
                    continue
                deadline = batching.item_deadline(item, received_at)
                self._submit_item(item, name, mutation, deadline=deadline, answer=answer)
            if rest:
                others(rest, received_at, answer, group)

        return handle

    def _submit_item(
        self,
        item: pb.BatchItem,
        name: str,
        mutation: _Mutation[Any],
        *,
        deadline: float,
        answer: batching.Answer,
    ) -> None:
        item_id = item.id

        def done(outcome: Outcome | Exception) -> None:
            answer(_item_result(item_id, name, mutation, outcome))

        try:
            command, partition = mutation.prepare(getattr(item, name))
            self._owner.submit_mutation(partition, command, deadline, done)
        except Exception as error:  # refused before it was queued
            answer(_item_result(item_id, name, mutation, error))


@dataclass(frozen=True, slots=True)
class _Mutation(Generic[R]):
    """One mutating call: request -> (checked command, its partition), outcome -> response."""

    to_command: Callable[[Any], ClientCommand]
    partition_of: Callable[[Any], int | None]
    to_response: Callable[[Any], R]
    accepted: type[Outcome]

    def prepare(self, request: Any) -> tuple[ClientCommand, int]:
        """Raises Refusal for a request that is malformed or names no partition of ours."""
        command = self.to_command(request)
        check(validate(command))
        partition = self.partition_of(command)
        if partition is None:  # a reservation id that is not one of ours
            raise Refusal.of(ReservationNotFound(getattr(command, "reservation_id", "")))
        return command, partition

    def respond(self, outcome: Outcome) -> R:
        if not is_accepted(outcome):
            raise Refusal.of(outcome)  # type: ignore[arg-type]
        assert isinstance(outcome, self.accepted), outcome
        return self.to_response(outcome)


def _by_location(found: OverCommitted) -> tuple[str, str]:
    return (found.key.location_id, found.key.sku_id)


def _cart_partition(command: Any) -> int:
    lines = command.lines
    return partition_of(lines[0].key.merchant_id, lines[0].key.location_id) if lines else 0


def _key_partition(command: Any) -> int:
    return _key_partition_of(command.key)


def _key_partition_of(key: InventoryKey) -> int:
    return partition_of(key.merchant_id, key.location_id)


def _feed_partition(command: Any) -> int:
    """The partition of the first event's location (or of the heartbeat's first location)."""
    if command.events:
        key: InventoryKey = command.events[0].key
        return partition_of(key.merchant_id, key.location_id)
    return partition_of(command.merchant_id, command.alive_at[0] if command.alive_at else "")


def _delivery_partition(command: Any) -> int:
    return partition_of(command.merchant_id, command.location_id)


def _reservation_partition(command: Any) -> int | None:
    return partition_of_reservation(command.reservation_id)


def _with_levels(response: Callable[..., R]) -> Callable[[Any], R]:
    def build(outcome: Any) -> R:
        return response(
            reservation=convert.reservation_to_proto(outcome.reservation),
            levels=[convert.level_to_proto(level) for level in outcome.levels],
        )

    return build


def _extended(outcome: Extended) -> pb.ExtendReservationResponse:
    return pb.ExtendReservationResponse(
        reservation=convert.reservation_to_proto(outcome.reservation)
    )


def _stock_changed(response: Callable[..., R]) -> Callable[[StockChanged], R]:
    def build(outcome: StockChanged) -> R:
        answer = response(
            level=convert.level_to_proto(outcome.level),
            over_commit=convert.over_commit_to_proto(outcome.over_commit),
        )
        if outcome.superseded:  # a physical fact a later count covers (not safety stock)
            answer.superseded = True  # type: ignore[attr-defined]
        return answer

    return build


RESERVE = _Mutation(convert.reserve, _cart_partition, _with_levels(pb.ReserveResponse), Reserved)
COMMIT = _Mutation(
    convert.commit, _reservation_partition, _with_levels(pb.CommitResponse), Committed
)
RELEASE = _Mutation(
    convert.release, _reservation_partition, _with_levels(pb.ReleaseResponse), Released
)
EXTEND = _Mutation(convert.extend, _reservation_partition, _extended, Extended)
ADJUST_STOCK = _Mutation(
    convert.adjust_stock, _key_partition, _stock_changed(pb.AdjustStockResponse), StockChanged
)
SET_STOCK = _Mutation(
    convert.set_stock, _key_partition, _stock_changed(pb.SetStockResponse), StockChanged
)
SET_SAFETY_STOCK = _Mutation(
    convert.set_safety_stock,
    _key_partition,
    _stock_changed(pb.SetSafetyStockResponse),
    StockChanged,
)
# One part of a feed's request (a partition's events; common/ingest.py splits a request).
EXPECT_DELIVERY = _Mutation(
    convert.expect_delivery,
    _delivery_partition,
    lambda outcome: pb.ExpectDeliveryResponse(
        levels=[convert.level_to_proto(level) for level in outcome.levels]
    ),
    DeliveryExpected,
)
INGEST = _Mutation(convert.ingest, _feed_partition, convert.ingested_to_proto, Ingested)
SPLIT_KEY = _Mutation(
    convert.split_key,
    _key_partition,
    lambda outcome: pb.SplitKeyResponse(split=convert.split_to_proto(outcome)),
    KeySplit,
)
MERGE_KEY = _Mutation(
    convert.merge_key,
    _key_partition,
    lambda outcome: pb.MergeKeyResponse(split=convert.split_to_proto(outcome)),
    KeySplit,
)
SEND_QUOTA = _Mutation(
    convert.send_quota,
    _key_partition,
    lambda outcome: pb.SendQuotaResponse(
        transfer=convert.transfer_to_proto(outcome.transfer),
        level=convert.level_to_proto(outcome.level),
    ),
    QuotaSent,
)
RECEIVE_QUOTA = _Mutation(
    convert.receive_quota,
    lambda command: _key_partition_of(command.transfer.target),
    lambda outcome: pb.ReceiveQuotaResponse(
        transfer_id=outcome.transfer_id,
        level=convert.level_to_proto(outcome.level),
        merged=outcome.merged,
    ),
    QuotaReceived,
)
SETTLE_TRANSFER = _Mutation(
    convert.settle_transfer,
    _key_partition,
    lambda outcome: pb.SettleTransferResponse(
        transfer_id=outcome.transfer_id, settled=outcome.settled
    ),
    TransferSettled,
)
# Every mutating call of the shard, by its BatchItem field (and Calls method) name.
MUTATIONS: dict[str, _Mutation[Any]] = {
    "reserve": RESERVE,
    "commit": COMMIT,
    "release": RELEASE,
    "extend_reservation": EXTEND,
    "adjust_stock": ADJUST_STOCK,
    "set_stock": SET_STOCK,
    "set_safety_stock": SET_SAFETY_STOCK,
    "expect_delivery": EXPECT_DELIVERY,
    "split_key": SPLIT_KEY,
    "merge_key": MERGE_KEY,
    "send_quota": SEND_QUOTA,
    "receive_quota": RECEIVE_QUOTA,
    "settle_transfer": SETTLE_TRANSFER,
}


def _item_result(
    item_id: int, name: str, mutation: _Mutation[Any], outcome: Outcome | Exception
) -> pb.BatchItemResult:
    """A Batch item's result, exactly what the unary call would answer."""
    try:
        if isinstance(outcome, Exception):
            raise _refusal_of(outcome) or outcome
        response = mutation.respond(outcome)
    except Refusal as refusal:
        return pb.BatchItemResult(id=item_id, error=refusal.status)
    except Exception as error:
        log.error("batch_item_failed", call=name, error=repr(error), exc_info=error)
        status = errors.internal(f"internal error: {error!r}", mutating=True)
        return pb.BatchItemResult(id=item_id, error=status)
    result = pb.BatchItemResult(id=item_id)
    getattr(result, name).CopyFrom(response)
    return result


class InventoryService(CallsServicer):
    """The shard's gRPC surface: unary calls and the Batch stream over ``Calls``; the Batch
    stream hands mutations to the owner by callback (``Calls.batch_handler``)."""

    def __init__(self, owner: Owner) -> None:
        super().__init__(Calls(owner))


async def _guard(call: Awaitable[T]) -> T:
    """Await the owner, turning its refusals into the error table's statuses."""
    try:
        return await call
    except (NotOwner, Overloaded, DeadlineExpired, FlushFailed) as error:
        refusal = _refusal_of(error)
        assert refusal is not None
        raise refusal from None


def _refusal_of(error: Exception) -> Refusal | None:
    """The owner's refusal as the error table's status (None: not one of the owner's)."""
    match error:
        case Refusal():
            return error
        case NotOwner(recovering=True):
            return Refusal(errors.partition_recovering(error.partition, str(error)))
        case NotOwner():
            return Refusal(errors.not_owner(error.partition, str(error)))
        case Overloaded():  # refused before it was queued
            return Refusal(errors.overloaded(str(error)))
        case DeadlineExpired():  # the owner checked the deadline before applying the work
            message = "deadline passed before the owner applied the work; nothing applied"
            return Refusal(errors.deadline_not_applied(message))
        case FlushFailed():  # the batch may or may not be durable
            message = f"{error}; outcome unknown, retry with the same idempotency key"
            return Refusal(errors.flush_failed(message))
    return None
