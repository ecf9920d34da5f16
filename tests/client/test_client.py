"""The client against a real shard process over PostgreSQL: typed answers, precise
exceptions, and automatic batching that coalesces concurrent calls exactly once."""

from __future__ import annotations

import asyncio

import pytest
from inventory.v1 import inventory_pb2 as pb

import inventory_core as core
from shard_router.client import (
    IdempotencyKeyReused,
    InsufficientStock,
    InvalidArgument,
    InventoryClient,
    ReservationNotActive,
    ReservationNotFound,
    VersionMismatch,
    key,
    line,
)
from tests.conftest import ShardProcess

pytestmark = [pytest.mark.e2e, pytest.mark.pg]

BATCHING = pytest.mark.parametrize("batching", [True, False], ids=["batched", "unary"])
MERCHANT, LOCATION = "m-1", "store-1"


def sku(name: str) -> pb.InventoryKey:
    return key(MERCHANT, name, LOCATION)


@BATCHING
def test_every_call_returns_its_typed_response(shard: ShardProcess, batching: bool) -> None:
    apples, pears = sku("apples"), sku("pears")

    async def run() -> None:
        async with InventoryClient(shard.address, batching=batching) as client:
            stocked = await client.set_stock(apples, 10, idempotency_key="count-1")
            assert isinstance(stocked, pb.SetStockResponse)
            assert (stocked.level.on_hand, stocked.level.version) == (10, 1)

            adjusted = await client.adjust_stock(
                pears, 5, reason=pb.ADJUSTMENT_REASON_RECEIPT, idempotency_key="receipt-1"
            )
            assert isinstance(adjusted, pb.AdjustStockResponse)
            assert adjusted.level.on_hand == 5

            safety = await client.set_safety_stock(apples, 2, idempotency_key="safety-1")
            assert isinstance(safety, pb.SetSafetyStockResponse)
            assert safety.level.available == 8

            levels = await client.get_availability([apples, pears])
            assert isinstance(levels, pb.GetAvailabilityResponse)
            assert [level.available for level in levels.levels] == [8, 5]

            reserved = await client.reserve(
                [line(apples, 3), line(pears, 1)], idempotency_key="order-1", ttl_s=60
            )
            assert isinstance(reserved, pb.ReserveResponse)
            reservation = reserved.reservation
            assert reservation.state == pb.RESERVATION_STATE_ACTIVE
            assert [level.reserved for level in reserved.levels] == [3, 1]

            extended = await client.extend_reservation(
                MERCHANT, reservation.reservation_id, ttl_s=600, idempotency_key="extend-1"
            )
            assert isinstance(extended, pb.ExtendReservationResponse)
            assert extended.reservation.expires_at_ms > reservation.expires_at_ms

            found = await client.get_reservation(MERCHANT, reservation.reservation_id)
            assert isinstance(found, pb.GetReservationResponse)
            assert found.reservation.reservation_id == reservation.reservation_id

            committed = await client.commit(
                MERCHANT,
                reservation.reservation_id,
                idempotency_key="commit-1",
                lines=[line(apples, 2)],  # the pear and one apple go back
            )
            assert isinstance(committed, pb.CommitResponse)
            assert committed.reservation.state == pb.RESERVATION_STATE_COMMITTED
            assert {(c.key.sku_id, c.quantity) for c in committed.reservation.committed_lines} == {
                ("apples", 2)
            }

            second = await client.reserve([line(pears, 2)], idempotency_key="order-2")
            released = await client.release(
                MERCHANT, second.reservation.reservation_id, idempotency_key="release-2"
            )
            assert isinstance(released, pb.ReleaseResponse)
            assert released.reservation.state == pb.RESERVATION_STATE_RELEASED
            assert released.levels[0].available == 5

    asyncio.run(run())


@BATCHING
def test_each_rejection_raises_its_exception_with_its_fields(
    shard: ShardProcess, batching: bool
) -> None:
    apples = sku("apples")

    async def run() -> None:
        async with InventoryClient(shard.address, batching=batching) as client:
            await client.set_stock(apples, 5, idempotency_key="count-1")

            with pytest.raises(InsufficientStock) as short:
                await client.reserve([line(apples, 7)], idempotency_key="order-1")
            assert short.value.lines == (
                core.ShortLine(core.InventoryKey(MERCHANT, "apples", LOCATION), 7, 5),
            )

            first = await client.reserve([line(apples, 1)], idempotency_key="order-2")
            with pytest.raises(IdempotencyKeyReused) as reused:
                await client.reserve([line(apples, 2)], idempotency_key="order-2")
            assert reused.value.idempotency_key == "order-2"

            with pytest.raises(ReservationNotFound) as missing:
                await client.get_reservation(MERCHANT, "no-such-reservation")
            assert missing.value.reservation_id == "no-such-reservation"

            reservation_id = first.reservation.reservation_id
            await client.release(MERCHANT, reservation_id, idempotency_key="release-2")
            with pytest.raises(ReservationNotActive) as inactive:
                await client.commit(MERCHANT, reservation_id, idempotency_key="commit-2")
            assert inactive.value.state is core.ReservationState.RELEASED
            assert inactive.value.changed_at_ms > 0

            version = (await client.get_availability([apples])).levels[0].version
            with pytest.raises(VersionMismatch) as mismatch:
                await client.set_stock(apples, 9, idempotency_key="cas-1", expected_version=99)
            assert (mismatch.value.expected_version, mismatch.value.current_version) == (
                99,
                version,
            )

            with pytest.raises(InvalidArgument) as invalid:
                await client.reserve([line(apples, 0)], idempotency_key="order-3")
            assert invalid.value.field == "lines[0].quantity"

    asyncio.run(run())


def test_concurrent_calls_are_coalesced_into_few_batches_exactly_once(shard: ShardProcess) -> None:
    """500 concurrent reserves travel in far fewer BatchRequests; a replay of all of them
    with the same keys gets the same answers and holds nothing more."""
    calls, stock = 500, 1000
    hot = sku("hot")

    async def reserve_all(client: InventoryClient) -> list[str]:
        answers = await asyncio.gather(
            *(client.reserve([line(hot, 1)], idempotency_key=f"order-{i}") for i in range(calls))
        )
        return [answer.reservation.reservation_id for answer in answers]

    async def run() -> None:
        async with InventoryClient(shard.address) as client:
            await client.set_stock(hot, stock, idempotency_key="count-1")
            stats = client.batcher_stats
            assert stats is not None
            requests_before, items_before = stats.requests_sent, stats.items_sent

            reservation_ids = await reserve_all(client)

            requests, items = stats.requests_sent - requests_before, stats.items_sent - items_before
            print(f"{calls} concurrent reserves in {requests} BatchRequests")
            assert items == calls  # no item was sent twice: none failed, none retried
            assert requests <= calls // 10
            assert len(set(reservation_ids)) == calls

            assert await reserve_all(client) == reservation_ids  # replays: the original answers
            level = (await client.get_availability([hot])).levels[0]
            assert (level.reserved, level.available) == (calls, stock - calls)
            assert stats.streams_broken == 0

    asyncio.run(run())
