"""A hot key's split and transfers through a router and three shards as real processes.

The admin's and the rebalancer's calls end to end: the router places the buckets on owners of
their own, a grant and a return travel as durable transfers (credited once however often
they are carried), a reservation a bucket holds is committed by the key callers know, and the
units come home across a merge. The router's spreading of reservations and its rebalancer
build on these calls (issue 11's later steps).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc

from inventory_core import partition_of
from tests.conftest import Cluster, start_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.pg]

CALL_TIMEOUT_S = 20.0
HOT = pb.InventoryKey(merchant_id="m-1", sku_id="viral", location_id="store-1")


@pytest.fixture
def cluster3(database_url: str, tmp_path: Path) -> Iterator[Cluster]:
    cluster = start_cluster(database_url, tmp_path, shards=3)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster3_by_hand(database_url: str, tmp_path: Path) -> Iterator[Cluster]:
    """No rebalancer and no detection: every transfer is the test's."""
    arguments = ("--rebalance-interval-s", "0", "--hot-key-threshold-per-s", "0")
    cluster = start_cluster(database_url, tmp_path, shards=3, router_arguments=arguments)
    try:
        yield cluster
    finally:
        cluster.stop()


async def owner_of(database_url: str, key: pb.InventoryKey) -> str:
    connection = await asyncpg.connect(database_url)
    try:
        owner: str = await connection.fetchval(
            "SELECT owner FROM partitions WHERE partition = $1",
            partition_of(key.merchant_id, key.location_id),
        )
        return owner
    finally:
        await connection.close()


async def stock_and_split(
    inventory: pb_grpc.InventoryStub, hot_keys: pb_grpc.HotKeysStub, on_hand: int
) -> pb.HotKeySplit:
    """The hot key with ``on_hand`` units, split into two buckets besides its home."""
    await inventory.SetStock(
        pb.SetStockRequest(key=HOT, on_hand=on_hand, idempotency_key="stock"),
        timeout=CALL_TIMEOUT_S,
    )
    answer = await hot_keys.SplitKey(
        pb.SplitKeyRequest(key=HOT, bucket_count=2, idempotency_key="split"),
        timeout=CALL_TIMEOUT_S,
    )
    return answer.split


def test_a_split_key_moves_units_through_transfers_and_merges_back_whole(
    cluster3_by_hand: Cluster, database_url: str
) -> None:
    async def run() -> None:
        async with grpc.aio.insecure_channel(cluster3_by_hand.router.address) as channel:
            inventory = pb_grpc.InventoryStub(channel)
            hot_keys = pb_grpc.HotKeysStub(channel)
            split = await stock_and_split(inventory, hot_keys, 100)
            assert len(split.buckets) == 2 and split.generation > 0 and not split.merging
            owners = {await owner_of(database_url, k) for k in (HOT, *split.buckets)}
            assert len(owners) == 3, owners  # the home and each bucket on a shard of its own
            bucket = split.buckets[0]

            async def carry(transfer: pb.QuotaTransfer) -> pb.ReceiveQuotaResponse:
                request = pb.ReceiveQuotaRequest(transfer=transfer)
                first = await hot_keys.ReceiveQuota(request, timeout=CALL_TIMEOUT_S)
                again = await hot_keys.ReceiveQuota(request, timeout=CALL_TIMEOUT_S)
                assert again == first  # carried twice, credited once
                settle = pb.SettleTransferRequest(
                    key=transfer.source, transfer_id=transfer.transfer_id
                )
                assert (await hot_keys.SettleTransfer(settle, timeout=CALL_TIMEOUT_S)).settled
                return first

            sent = await hot_keys.SendQuota(
                pb.SendQuotaRequest(key=HOT, target=bucket, quantity=40, idempotency_key="g1"),
                timeout=CALL_TIMEOUT_S,
            )
            assert sent.level.allotted == 40 and sent.level.sellable == 60
            received = await carry(sent.transfer)
            assert received.level.on_hand == 40

            # A reservation the bucket holds, committed by the key callers know.
            reserved = await inventory.Reserve(
                pb.ReserveRequest(
                    lines=[pb.ReservationLine(key=bucket, quantity=30)], idempotency_key="cart-1"
                ),
                timeout=CALL_TIMEOUT_S,
            )
            reservation_id = reserved.reservation.reservation_id
            assert partition_of(bucket.merchant_id, bucket.location_id) == int(reservation_id[1:5])
            await inventory.Commit(
                pb.CommitRequest(
                    merchant_id=HOT.merchant_id,
                    reservation_id=reservation_id,
                    lines=[pb.ReservationLine(key=HOT, quantity=30)],
                    idempotency_key="fulfil-1",
                ),
                timeout=CALL_TIMEOUT_S,
            )

            merged = await hot_keys.MergeKey(
                pb.MergeKeyRequest(key=HOT, idempotency_key="merge"), timeout=CALL_TIMEOUT_S
            )
            assert merged.split.merging
            parts = await hot_keys.GetHotKeys(
                pb.GetHotKeysRequest(keys=[bucket]), timeout=CALL_TIMEOUT_S
            )
            (part,) = parts.parts
            assert (part.granted, part.level.on_hand, part.home) == (40, 10, HOT)

            returned = await hot_keys.SendQuota(
                pb.SendQuotaRequest(key=bucket, target=HOT, quantity=10, idempotency_key="r1"),
                timeout=CALL_TIMEOUT_S,
            )
            assert returned.transfer.quantity == 10
            assert sum(c.quantity for c in returned.transfer.consumed) == 30
            home = await carry(returned.transfer)
            assert home.merged
            assert (home.level.on_hand, home.level.allotted, home.level.sellable) == (70, 0, 70)
            listed = await hot_keys.GetHotKeys(pb.GetHotKeysRequest(), timeout=CALL_TIMEOUT_S)
            assert list(listed.parts) == []  # whole again: no split anywhere

            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await hot_keys.SendQuota(
                    pb.SendQuotaRequest(key=HOT, target=bucket, quantity=1, idempotency_key="g2"),
                    timeout=CALL_TIMEOUT_S,
                )
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    asyncio.run(run())


def test_reservations_of_a_split_key_spread_over_its_parts_and_admit_exactly_its_units(
    cluster3_by_hand: Cluster,
) -> None:
    async def run() -> None:
        async with grpc.aio.insecure_channel(cluster3_by_hand.router.address) as channel:
            inventory = pb_grpc.InventoryStub(channel)
            hot_keys = pb_grpc.HotKeysStub(channel)
            split = await stock_and_split(inventory, hot_keys, 60)
            for number, bucket in enumerate(split.buckets):
                sent = await hot_keys.SendQuota(
                    pb.SendQuotaRequest(
                        key=HOT, target=bucket, quantity=20, idempotency_key=f"grant-{number}"
                    ),
                    timeout=CALL_TIMEOUT_S,
                )
                await hot_keys.ReceiveQuota(
                    pb.ReceiveQuotaRequest(transfer=sent.transfer), timeout=CALL_TIMEOUT_S
                )

            async def reserve(number: int) -> pb.ReserveResponse | None:
                request = pb.ReserveRequest(
                    lines=[pb.ReservationLine(key=HOT, quantity=1)],
                    idempotency_key=f"cart-{number}",
                )
                try:
                    return await inventory.Reserve(request, timeout=CALL_TIMEOUT_S)
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
                    return None

            answers = await asyncio.gather(*(reserve(n) for n in range(90)))
            taken = [a for a in answers if a is not None]
            assert len(taken) == 60  # every unit, and not one more
            partitions = {a.reservation.reservation_id[:5] for a in taken}
            assert len(partitions) == 3  # spread over the home and both buckets
            for answer in taken:  # as callers know the key: never a bucket
                assert answer.reservation.location_id == HOT.location_id
                assert [line.key for line in answer.reservation.lines] == [HOT]
                assert [level.key for level in answer.levels] == [HOT]
            # A retry with the same key gets the original answer, wherever it was taken.
            first = next(n for n, a in enumerate(answers) if a is not None)
            again = await reserve(first)
            assert again is not None
            assert again.reservation.reservation_id == answers[first].reservation.reservation_id  # type: ignore[union-attr]

            level = (
                await inventory.GetAvailability(
                    pb.GetAvailabilityRequest(keys=[HOT]), timeout=CALL_TIMEOUT_S
                )
            ).levels[0]
            assert (level.on_hand, level.reserved, level.sellable) == (60, 60, 0)

            home_partition = partition_of(HOT.merchant_id, HOT.location_id)
            held = [  # reservations a bucket holds
                a.reservation
                for a in taken
                if int(a.reservation.reservation_id[1:5]) != home_partition
            ]
            found = await inventory.GetReservation(
                pb.GetReservationRequest(
                    merchant_id=HOT.merchant_id, reservation_id=held[-1].reservation_id
                ),
                timeout=CALL_TIMEOUT_S,
            )
            assert found.reservation.location_id == HOT.location_id
            released = await inventory.Release(
                pb.ReleaseRequest(
                    merchant_id=HOT.merchant_id,
                    reservation_id=held[-1].reservation_id,
                    idempotency_key="cancel-1",
                ),
                timeout=CALL_TIMEOUT_S,
            )
            assert [level.key for level in released.levels] == [HOT]
            assert released.levels[0].sellable == 1

    asyncio.run(run())


def test_a_split_key_hammered_by_256_callers_admits_exactly_its_units(
    cluster3: Cluster,
) -> None:
    """The router's rebalancer spreads the units (no transfer made by hand); 256 callers
    reserve one unit at a time until the key is sold out; exactly the stock is admitted."""
    stock, callers = 1000, 256

    async def run() -> None:
        async with grpc.aio.insecure_channel(cluster3.router.address) as channel:
            inventory = pb_grpc.InventoryStub(channel)
            hot_keys = pb_grpc.HotKeysStub(channel)
            buckets = list((await stock_and_split(inventory, hot_keys, stock)).buckets)
            for _ in range(100):  # the rebalancer's first rounds hand the buckets their share
                parts = await hot_keys.GetHotKeys(
                    pb.GetHotKeysRequest(keys=buckets), timeout=CALL_TIMEOUT_S
                )
                if len(parts.parts) == 2 and all(p.level.on_hand > 0 for p in parts.parts):
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the rebalancer never granted the buckets")
            admitted: list[str] = []
            numbers = iter(range(10**6))
            stop_at = asyncio.get_running_loop().time() + 60.0

            async def caller() -> None:
                while asyncio.get_running_loop().time() < stop_at:
                    request = pb.ReserveRequest(
                        lines=[pb.ReservationLine(key=HOT, quantity=1)],
                        idempotency_key=f"cart-{next(numbers)}",
                    )
                    try:
                        answer = await inventory.Reserve(request, timeout=CALL_TIMEOUT_S)
                    except grpc.aio.AioRpcError as error:
                        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
                        level = (
                            await inventory.GetAvailability(
                                pb.GetAvailabilityRequest(keys=[HOT]), timeout=CALL_TIMEOUT_S
                            )
                        ).levels[0]
                        if level.reserved >= stock:
                            return  # sold out: every unit is held
                        await asyncio.sleep(0.05)  # units in transit: try again
                        continue
                    admitted.append(answer.reservation.reservation_id)

            await asyncio.gather(*(caller() for _ in range(callers)))
            assert len(admitted) == stock == len(set(admitted))
            assert len({rid[:5] for rid in admitted}) == 3  # the home and both buckets
            level = (
                await inventory.GetAvailability(
                    pb.GetAvailabilityRequest(keys=[HOT]), timeout=CALL_TIMEOUT_S
                )
            ).levels[0]
            assert (level.on_hand, level.reserved, level.sellable) == (stock, stock, 0)

    asyncio.run(run())


def test_a_key_is_split_when_it_runs_hot_and_merged_whole_when_it_cools(
    database_url: str, tmp_path: Path
) -> None:
    arguments = (
        *("--hot-key-threshold-per-s", "100", "--hot-key-window-s", "0.5"),
        *("--hot-key-buckets", "2", "--hot-key-cool-windows", "2"),
    )
    cluster = start_cluster(database_url, tmp_path, shards=3, router_arguments=arguments)

    async def run() -> None:
        async with grpc.aio.insecure_channel(cluster.router.address) as channel:
            inventory = pb_grpc.InventoryStub(channel)
            hot_keys = pb_grpc.HotKeysStub(channel)
            await inventory.SetStock(
                pb.SetStockRequest(key=HOT, on_hand=100_000, idempotency_key="stock"),
                timeout=CALL_TIMEOUT_S,
            )
            held: list[str] = []
            numbers = iter(range(10**6))
            split_seen = asyncio.Event()
            loop = asyncio.get_running_loop()
            stop_at = loop.time() + 30.0

            async def caller() -> None:
                while not split_seen.is_set() and loop.time() < stop_at:
                    answer = await inventory.Reserve(
                        pb.ReserveRequest(
                            lines=[pb.ReservationLine(key=HOT, quantity=1)],
                            idempotency_key=f"cart-{next(numbers)}",
                        ),
                        timeout=CALL_TIMEOUT_S,
                    )
                    held.append(answer.reservation.reservation_id)

            async def watch_for_split() -> None:
                while loop.time() < stop_at:
                    listed = await hot_keys.GetHotKeys(
                        pb.GetHotKeysRequest(), timeout=CALL_TIMEOUT_S
                    )
                    if any(len(p.split.buckets) == 2 for p in listed.parts):
                        split_seen.set()
                        return
                    await asyncio.sleep(0.2)

            await asyncio.gather(watch_for_split(), *(caller() for _ in range(32)))
            assert split_seen.is_set(), "the router never split the hot key"
            # Cool now: release everything held, then the split goes by itself.
            for number, reservation_id in enumerate(held):
                await inventory.Release(
                    pb.ReleaseRequest(
                        merchant_id=HOT.merchant_id,
                        reservation_id=reservation_id,
                        idempotency_key=f"cancel-{number}",
                    ),
                    timeout=CALL_TIMEOUT_S,
                )
            while loop.time() < stop_at + 30.0:
                listed = await hot_keys.GetHotKeys(pb.GetHotKeysRequest(), timeout=CALL_TIMEOUT_S)
                if not listed.parts:
                    break
                await asyncio.sleep(0.2)
            else:
                raise AssertionError("the cooled key was never merged whole")
            level = (
                await inventory.GetAvailability(
                    pb.GetAvailabilityRequest(keys=[HOT]), timeout=CALL_TIMEOUT_S
                )
            ).levels[0]
            assert (level.on_hand, level.reserved, level.allotted, level.sellable) == (
                100_000,
                0,
                0,
                100_000,
            )

    try:
        asyncio.run(run())
    finally:
        cluster.stop()
