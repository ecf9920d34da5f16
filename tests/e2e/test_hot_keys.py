"""A hot key's split and transfers through a router and three shards as real processes.

The admin's and the rebalancer's calls end to end: the router places the buckets on owners of
their own, a grant and a return travel as durable transfers (credited once however often
they are carried), a reservation a bucket holds is committed by the key callers know, and the
units come home across a merge. On top of them: reservations spread over the parts admit
exactly the stock (256 callers on 1,000 units), also with the home's owner killed by kill -9
mid-run (no acknowledged reservation lost, a retry with the same key gets the same answer);
detection splits a key that runs hot and merges it when it cools; Watch shows the key as its
total, its version going up across the split and the merge.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import pytest
from inventory.v1 import events_pb2
from inventory.v1 import events_pb2_grpc as events_grpc
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc

from inventory_core import partition_of
from persistence.embedded import EmbeddedRedis
from shard_router.common.convert import key_from_proto
from shard_router.router.hot_keys import walk_order
from tests.conftest import Cluster, start_cluster
from tests.e2e.ledger import ledger_is_fenced_and_contiguous, owners

pytestmark = [pytest.mark.e2e, pytest.mark.pg]

CALL_TIMEOUT_S = 20.0
# How long a Watch stream may take to show what a strong read shows, once writes stop.
CONVERGE_TIMEOUT_S = 30.0
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
                try:
                    return await reserve_one(inventory, f"cart-{number}")
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
                    return None

            # Forty at once, then one at a time: the parts run out one by one, and a cart
            # whose first part has run out is taken further along its walk.
            answers = list(await asyncio.gather(*(reserve(n) for n in range(40))))
            answers += [await reserve(n) for n in range(40, 90)]
            taken = [a for a in answers if a is not None]
            assert len(taken) == 60  # every unit, and not one more
            partitions = {a.reservation.reservation_id[:5] for a in taken}
            assert len(partitions) == 3  # spread over the home and both buckets
            for answer in taken:  # as callers know the key: never a bucket
                assert answer.reservation.location_id == HOT.location_id
                assert [line.key for line in answer.reservation.lines] == [HOT]
                assert [level.key for level in answer.levels] == [HOT]
            # Sold out, a retry with the same key gets the original answer, wherever it was
            # taken: it goes on past the refusals its walk kept, whatever the parts offer now.
            parts = (key_from_proto(HOT), *(key_from_proto(b) for b in split.buckets))
            partition_of_part = {
                f"r{partition_of(p.merchant_id, p.location_id):04d}": p for p in parts
            }
            past_a_refusal = 0
            for number, answer in enumerate(answers):
                if answer is None:
                    continue
                order = walk_order(f"cart-{number}", parts)
                past_a_refusal += (
                    partition_of_part[answer.reservation.reservation_id[:5]] != order[0]
                )
                again = await reserve(number)
                assert again is not None, f"cart-{number} was lost on its retry"
                assert again.reservation.reservation_id == answer.reservation.reservation_id
            assert past_a_refusal > 0  # some were taken past a refusal their walk kept

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
            await granted(hot_keys, buckets)
            admitted: list[str] = []
            numbers = iter(range(10**6))
            stop_at = asyncio.get_running_loop().time() + 60.0

            async def caller() -> None:
                while asyncio.get_running_loop().time() < stop_at:
                    try:
                        answer = await reserve_one(inventory, f"cart-{next(numbers)}")
                    except grpc.aio.AioRpcError as error:
                        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
                        if await sold_out(inventory, stock):
                            return  # every unit is held
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
                    answer = await reserve_one(inventory, f"cart-{next(numbers)}")
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


@dataclass
class HotWatcher:
    """The hot key as a Watch stream shows it: never a bucket, versions never going back."""

    last: pb.StockLevel | None = None
    changes: int = 0

    def take(self, event: events_pb2.WatchEvent) -> None:
        shown: list[pb.StockLevel] = []
        if event.HasField("snapshot"):
            shown = list(event.snapshot.levels)
        elif event.HasField("change"):
            change = event.change
            self.changes += 1
            after = change.after
            shown = [
                pb.StockLevel(
                    key=change.key,
                    on_hand=after.on_hand,
                    reserved=after.reserved,
                    available=after.available,
                    sellable=after.sellable,
                    allotted=after.allotted,
                    version=change.version,
                    parts=change.parts,
                )
            ]
        for level in shown:
            assert level.key.location_id == HOT.location_id, level  # never a bucket
            if level.key != HOT:
                continue
            seen = 0 if self.last is None else self.last.version
            assert level.version > seen or (event.HasField("snapshot") and level.version == seen)
            self.last = level


def test_watch_shows_a_split_key_as_its_total_across_split_and_merge(
    database_url: str, tmp_path: Path
) -> None:
    redis_dir = Path(tempfile.mkdtemp(prefix="inv-hot-redis-"))
    redis = EmbeddedRedis()
    url = redis.start(redis_dir)
    cluster = start_cluster(database_url, tmp_path, shards=3, redis_url=url)
    watcher = HotWatcher()

    async def run() -> None:
        async with grpc.aio.insecure_channel(cluster.router.address) as channel:
            inventory = pb_grpc.InventoryStub(channel)
            hot_keys = pb_grpc.HotKeysStub(channel)
            await inventory.SetStock(
                pb.SetStockRequest(key=HOT, on_hand=300, idempotency_key="stock"),
                timeout=CALL_TIMEOUT_S,
            )
            call = events_grpc.AvailabilityStreamStub(channel).Watch(
                events_pb2.WatchRequest(merchant_id=HOT.merchant_id, location_ids=["store-1"])
            )

            async def follow() -> None:
                async for event in call:
                    watcher.take(event)

            following = asyncio.ensure_future(follow())

            async def strong() -> pb.StockLevel:
                answer = await inventory.GetAvailability(
                    pb.GetAvailabilityRequest(keys=[HOT]), timeout=CALL_TIMEOUT_S
                )
                return answer.levels[0]

            async def converged(parts: int) -> pb.StockLevel:
                """Until the stream shows what a strong read of the key shows."""
                deadline = asyncio.get_running_loop().time() + CONVERGE_TIMEOUT_S
                while asyncio.get_running_loop().time() < deadline:
                    level, shown = await strong(), watcher.last
                    if shown is not None and (
                        shown.on_hand,
                        shown.reserved,
                        shown.sellable,
                        shown.version,
                        shown.parts,
                    ) == (level.on_hand, level.reserved, level.sellable, level.version, parts):
                        return level
                    await asyncio.sleep(0.2)
                raise AssertionError(f"the stream shows {watcher.last}, a read {await strong()}")

            try:
                split = await hot_keys.SplitKey(
                    pb.SplitKeyRequest(key=HOT, bucket_count=2, idempotency_key="split"),
                    timeout=CALL_TIMEOUT_S,
                )
                buckets = list(split.split.buckets)
                await granted(hot_keys, buckets)
                held = []
                for number in range(120):
                    answer = await reserve_one(inventory, f"cart-{number}")
                    held.append(answer.reservation.reservation_id)
                for number, reservation_id in enumerate(held[:30]):
                    await inventory.Commit(
                        pb.CommitRequest(
                            merchant_id=HOT.merchant_id,
                            reservation_id=reservation_id,
                            idempotency_key=f"pay-{number}",
                        ),
                        timeout=CALL_TIMEOUT_S,
                    )
                level = await converged(parts=3)
                assert (level.on_hand, level.reserved) == (270, 90), level
                changes_while_split = watcher.changes
                await hot_keys.MergeKey(
                    pb.MergeKeyRequest(key=HOT, idempotency_key="merge"), timeout=CALL_TIMEOUT_S
                )
                for number, reservation_id in enumerate(held[30:]):
                    await inventory.Release(
                        pb.ReleaseRequest(
                            merchant_id=HOT.merchant_id,
                            reservation_id=reservation_id,
                            idempotency_key=f"cancel-{number}",
                        ),
                        timeout=CALL_TIMEOUT_S,
                    )
                for _ in range(300):
                    listed = await hot_keys.GetHotKeys(
                        pb.GetHotKeysRequest(), timeout=CALL_TIMEOUT_S
                    )
                    if not listed.parts:
                        break
                    await asyncio.sleep(0.1)
                else:
                    raise AssertionError("the key never merged")
                # Merged: the home is the whole key, and its versions go on up from the total.
                await inventory.SetStock(
                    pb.SetStockRequest(key=HOT, on_hand=500, idempotency_key="restock"),
                    timeout=CALL_TIMEOUT_S,
                )
                level = await converged(parts=0)
                assert (level.on_hand, level.reserved, level.sellable) == (500, 0, 500)
                assert watcher.changes > changes_while_split
            finally:
                call.cancel()
                await asyncio.gather(following, return_exceptions=True)

    try:
        asyncio.run(run())
    finally:
        cluster.stop()
        redis.stop()
        shutil.rmtree(redis_dir, ignore_errors=True)


def test_a_split_key_hammered_by_256_callers_with_a_shard_killed_loses_nothing(
    cluster3: Cluster, database_url: str
) -> None:
    """kill -9 of the home's owner while 256 callers reserve: its partitions move to the
    other two shards, the callers retry what had no answer with the same key, and at the end
    every acknowledged reservation is held, each unit at most once."""
    stock, callers = 1000, 256
    acknowledged: dict[str, str] = {}  # idempotency key -> reservation id
    unknown: set[str] = set()  # no answer: settled below by retrying with the same key

    async def run() -> None:
        victim_id = await owner_of(database_url, HOT)
        victim = next(s for s in cluster3.shards if s.shard_id == victim_id)
        async with grpc.aio.insecure_channel(cluster3.router.address) as channel:
            inventory = pb_grpc.InventoryStub(channel)
            hot_keys = pb_grpc.HotKeysStub(channel)
            buckets = list((await stock_and_split(inventory, hot_keys, stock)).buckets)
            await granted(hot_keys, buckets)
            numbers = iter(range(10**6))
            loop = asyncio.get_running_loop()
            stop_at = loop.time() + 90.0
            killed, third_admitted = asyncio.Event(), asyncio.Event()

            async def caller() -> None:
                while loop.time() < stop_at:
                    idempotency_key = f"cart-{next(numbers)}"
                    try:
                        answer = await reserve_one(inventory, idempotency_key)
                    except grpc.aio.AioRpcError as error:
                        if error.code() != grpc.StatusCode.FAILED_PRECONDITION:
                            unknown.add(idempotency_key)  # unavailable, or the deadline
                            await asyncio.sleep(0.05)
                            continue
                        if await sold_out(inventory, stock):
                            return
                        await asyncio.sleep(0.05)  # units in transit: try again
                        continue
                    acknowledged[idempotency_key] = answer.reservation.reservation_id
                    if len(acknowledged) >= stock // 3:
                        third_admitted.set()

            async def kill_midway() -> None:
                await asyncio.wait_for(third_admitted.wait(), timeout=60.0)
                await asyncio.to_thread(victim.kill)
                killed.set()

            await asyncio.gather(kill_midway(), *(caller() for _ in range(callers)))
            assert killed.is_set()
            by_owner = await owners(database_url)
            assert all(owner != victim_id for owner, _ in by_owner.values()), "not moved"
            held = 0
            for idempotency_key in sorted(acknowledged.keys() | unknown):
                try:
                    answer = await reserve_one(inventory, idempotency_key)
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
                    lost = acknowledged.get(idempotency_key)
                    assert lost is None, f"{idempotency_key} ({lost}) was lost: {error.details()}"
                    continue
                if idempotency_key in acknowledged:
                    assert answer.reservation.reservation_id == acknowledged[idempotency_key]
                found = await inventory.GetReservation(
                    pb.GetReservationRequest(
                        merchant_id=HOT.merchant_id,
                        reservation_id=answer.reservation.reservation_id,
                    ),
                    timeout=CALL_TIMEOUT_S,
                )
                assert found.reservation.state == pb.RESERVATION_STATE_ACTIVE, found
                assert [line.key for line in found.reservation.lines] == [HOT]
                held += 1
            level = (
                await inventory.GetAvailability(
                    pb.GetAvailabilityRequest(keys=[HOT]), timeout=CALL_TIMEOUT_S
                )
            ).levels[0]
            assert level.reserved == held <= stock  # each unit once, none oversold
            assert len(acknowledged) <= stock

    asyncio.run(run())
    asyncio.run(ledger_is_fenced_and_contiguous(database_url))
    assert len(acknowledged) > stock // 3  # the kill came mid-run


async def granted(hot_keys: pb_grpc.HotKeysStub, buckets: list[pb.InventoryKey]) -> None:
    """Until the rebalancer's first rounds have handed every bucket its share."""
    for _ in range(100):
        parts = await hot_keys.GetHotKeys(
            pb.GetHotKeysRequest(keys=buckets), timeout=CALL_TIMEOUT_S
        )
        if len(parts.parts) == len(buckets) and all(p.level.on_hand > 0 for p in parts.parts):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the rebalancer never granted the buckets")


async def reserve_one(inventory: pb_grpc.InventoryStub, idempotency_key: str) -> pb.ReserveResponse:
    request = pb.ReserveRequest(
        lines=[pb.ReservationLine(key=HOT, quantity=1)], idempotency_key=idempotency_key
    )
    answer: pb.ReserveResponse = await inventory.Reserve(request, timeout=CALL_TIMEOUT_S)
    return answer


async def sold_out(inventory: pb_grpc.InventoryStub, stock: int) -> bool:
    """Every unit held, as a strong read of the key shows (a shard away: not known yet)."""
    try:
        answer = await inventory.GetAvailability(
            pb.GetAvailabilityRequest(keys=[HOT]), timeout=CALL_TIMEOUT_S
        )
    except grpc.aio.AioRpcError:
        return False
    return answer.levels[0].reserved >= stock
