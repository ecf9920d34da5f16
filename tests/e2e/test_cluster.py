"""Shards behind a router as real processes: kill -9, a paused (zombie) owner, the saga."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_status import rpc_status
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc

from inventory_core import partition_of
from shard_router.common import errors
from tests.conftest import Cluster, ServiceProcess, start_cluster
from tests.e2e.ledger import ledger_is_fenced_and_contiguous, owners

pytestmark = [pytest.mark.e2e, pytest.mark.pg]

CALL_TIMEOUT_S = 20.0
MERCHANT = "m-1"


def key(sku: str, location: str) -> pb.InventoryKey:
    return pb.InventoryKey(merchant_id=MERCHANT, sku_id=sku, location_id=location)


def line(k: pb.InventoryKey, quantity: int) -> pb.ReservationLine:
    return pb.ReservationLine(key=k, quantity=quantity)


@pytest.fixture
def cluster3(database_url: str, tmp_path: Path) -> Iterator[Cluster]:
    cluster = start_cluster(database_url, tmp_path, shards=3)
    try:
        yield cluster
    finally:
        cluster.stop()


@dataclass
class Cart:
    idempotency_key: str
    lines: list[tuple[str, str, int]]  # (sku, location, quantity)
    reservation_id: str | None = None


def test_kill_9_of_one_shard_under_load_moves_its_partitions_and_loses_nothing(
    cluster3: Cluster, database_url: str
) -> None:
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    rng = random.Random(seed)
    locations = [f"store-{i}" for i in range(12)]  # spread over all three shards
    skus = [f"sku-{i}" for i in range(5)]
    stock = 300  # per key: small enough that some carts are refused
    carts: list[Cart] = []
    victim = cluster3.shards[1]

    async def run() -> None:
        async with grpc.aio.insecure_channel(cluster3.router.address) as channel:
            stub = pb_grpc.InventoryStub(channel)
            for location in locations:
                for sku in skus:
                    await stub.SetStock(
                        pb.SetStockRequest(
                            key=key(sku, location),
                            on_hand=stock,
                            idempotency_key=f"seed-{sku}-{location}",
                        ),
                        timeout=CALL_TIMEOUT_S,
                    )
            stop_at = time.monotonic() + 8.0
            counter = iter(range(10**6))

            async def worker() -> None:
                while time.monotonic() < stop_at:
                    location = rng.choice(locations)
                    cart = Cart(
                        f"cart-{next(counter)}",
                        [(s, location, rng.randint(1, 4)) for s in rng.sample(skus, 2)],
                    )
                    carts.append(cart)
                    request = pb.ReserveRequest(
                        lines=[line(key(s, loc), q) for s, loc, q in cart.lines],
                        idempotency_key=cart.idempotency_key,
                    )
                    try:
                        answer = await stub.Reserve(request, timeout=CALL_TIMEOUT_S)
                        cart.reservation_id = answer.reservation.reservation_id
                    except grpc.aio.AioRpcError as error:
                        assert error.code() in (
                            grpc.StatusCode.FAILED_PRECONDITION,  # sold out: fine
                            grpc.StatusCode.UNAVAILABLE,  # unknown: checked below
                            grpc.StatusCode.DEADLINE_EXCEEDED,
                        ), error

            async def kill_soon() -> None:
                await asyncio.sleep(2.0)
                await asyncio.to_thread(victim.kill)

            await asyncio.gather(*(worker() for _ in range(24)), kill_soon())
            await verify(stub)

    async def verify(stub: pb_grpc.InventoryStub) -> None:
        by_owner = await owners(database_url)
        assert all(owner != victim.shard_id for owner, _ in by_owner.values()), "not moved"
        held: Counter[tuple[str, str]] = Counter()
        for cart in carts:  # settle unknown outcomes by retrying with the same key
            request = pb.ReserveRequest(
                lines=[line(key(s, loc), q) for s, loc, q in cart.lines],
                idempotency_key=cart.idempotency_key,
            )
            try:
                answer = await stub.Reserve(request, timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
                assert cart.reservation_id is None, "an acknowledged cart was lost"
                continue
            if cart.reservation_id is not None:
                assert answer.reservation.reservation_id == cart.reservation_id
            for sku, location, quantity in cart.lines:
                held[(sku, location)] += quantity
        for location in locations:
            answer = await stub.GetAvailability(
                pb.GetAvailabilityRequest(keys=[key(s, location) for s in skus]),
                timeout=CALL_TIMEOUT_S,
            )
            for sku, found in zip(skus, answer.levels, strict=True):
                assert found.reserved == held[(sku, location)], (sku, location)
                assert found.reserved <= stock, "oversold"
                assert found.available >= 0

    asyncio.run(run())
    assert sum(1 for c in carts if c.reservation_id) > 100
    asyncio.run(ledger_is_fenced_and_contiguous(database_url))


def test_paused_owner_is_fenced_when_it_wakes_and_its_writes_are_refused(
    database_url: str, tmp_path: Path
) -> None:
    cluster = start_cluster(database_url, tmp_path, shards=2, lease_s=2.0)
    zombie = cluster.shards[0]
    try:
        asyncio.run(_paused_owner_scenario(cluster, zombie.shard_id, database_url))
        log = zombie.log_text()
        # On waking, its lapsed lease stops it serving at once; then whichever comes first
        # gives its partitions up: its next append finds the epoch moved on (flush_fenced),
        # its heartbeat does (partitions_fenced), or its rebalance finds itself off the ring
        # (partitions_dropped).
        given_up = ("flush_fenced", "partitions_fenced", "partitions_dropped")
        assert any(event in log for event in given_up), "the zombie kept its partitions"
    finally:
        cluster.stop()


async def _paused_owner_scenario(cluster: Cluster, zombie_id: str, database_url: str) -> None:
    zombie = next(s for s in cluster.shards if s.shard_id == zombie_id)
    by_owner = await owners(database_url)
    location = next(
        loc
        for loc in (f"store-{i}" for i in range(1000))
        if by_owner[partition_of(MERCHANT, loc)][0] == zombie_id
    )
    partition = partition_of(MERCHANT, location)
    k = key("milk", location)
    async with (
        grpc.aio.insecure_channel(cluster.router.address) as router_channel,
        grpc.aio.insecure_channel(zombie.address) as zombie_channel,
    ):
        router = pb_grpc.InventoryStub(router_channel)
        direct = pb_grpc.InventoryStub(zombie_channel)
        await router.SetStock(pb.SetStockRequest(key=k, on_hand=10, idempotency_key="seed"))
        zombie.signal(signal.SIGSTOP)
        # Sent to the paused owner: it will try to append these when it wakes.
        pending = [
            asyncio.ensure_future(
                direct.Reserve(
                    pb.ReserveRequest(lines=[line(k, 4)], idempotency_key=f"zombie-{i}"),
                    timeout=60.0,
                )
            )
            for i in range(2)
        ]
        taken_epoch = by_owner[partition][1]
        deadline = time.monotonic() + 30.0
        while (await owners(database_url))[partition][1] == taken_epoch:
            assert time.monotonic() < deadline, "the partition was not taken over"
            await asyncio.sleep(0.2)
        # The new owner serves and writes: these must survive the zombie's wake-up.
        taken = await router.Reserve(
            pb.ReserveRequest(lines=[line(k, 7)], idempotency_key="new-owner"),
            timeout=CALL_TIMEOUT_S,
        )
        zombie.signal(signal.SIGCONT)
        results = await asyncio.gather(*pending, return_exceptions=True)
        refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        for error in refused:
            assert error.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.FAILED_PRECONDITION,
            )
        admitted = [r for r in results if isinstance(r, pb.ReserveResponse)]
        # Only 3 units were left after the new owner's 7: a stale zombie would admit 4.
        assert not admitted, "the zombie admitted a reservation against stale state"
        level = await router.GetAvailability(
            pb.GetAvailabilityRequest(keys=[k]), timeout=CALL_TIMEOUT_S
        )
        assert level.levels[0].reserved == 7
        found = await router.GetReservation(
            pb.GetReservationRequest(
                merchant_id=MERCHANT, reservation_id=taken.reservation.reservation_id
            ),
            timeout=CALL_TIMEOUT_S,
        )
        assert found.reservation.state == pb.RESERVATION_STATE_ACTIVE
    await ledger_is_fenced_and_contiguous(database_url)


def test_order_whose_last_leg_is_short_leaves_no_stock_held_anywhere(cluster3: Cluster) -> None:
    async def run() -> None:
        async with grpc.aio.insecure_channel(cluster3.router.address) as channel:
            stub = pb_grpc.InventoryStub(channel)
            locations = ["store-a", "store-b", "warehouse-c"]
            for location in locations:
                await stub.SetStock(
                    pb.SetStockRequest(
                        key=key("rice", location), on_hand=5, idempotency_key=f"s-{location}"
                    )
                )
            legs = [
                pb.ReserveRequest(lines=[line(key("rice", "store-a"), 3)]),
                pb.ReserveRequest(lines=[line(key("rice", "store-b"), 5)]),
                pb.ReserveRequest(lines=[line(key("rice", "warehouse-c"), 6)]),  # short
            ]
            order = pb.ReserveOrderRequest(legs=legs, idempotency_key="order-1")
            for _ in range(2):  # and a retry of the failed order fails the same way
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.ReserveOrder(order, timeout=CALL_TIMEOUT_S)
                assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                status = rpc_status.from_call(caught.value)
                assert errors.reason_of(status) == "INSUFFICIENT_STOCK"  # like the short leg
                assert errors.answer_class_of(status) is errors.AnswerClass.FINAL
            answer = await stub.GetAvailability(
                pb.GetAvailabilityRequest(keys=[key("rice", loc) for loc in locations])
            )
            assert [lv.reserved for lv in answer.levels] == [0, 0, 0]
            assert [lv.available for lv in answer.levels] == [5, 5, 5]
            fits = pb.ReserveOrderRequest(legs=legs[:2], idempotency_key="order-2")
            placed = await stub.ReserveOrder(fits, timeout=CALL_TIMEOUT_S)
            again = await stub.ReserveOrder(fits, timeout=CALL_TIMEOUT_S)
            assert [r.reservation_id for r in again.reservations] == [
                r.reservation_id for r in placed.reservations
            ]
            answer = await stub.GetAvailability(
                pb.GetAvailabilityRequest(keys=[key("rice", loc) for loc in locations])
            )
            assert [lv.reserved for lv in answer.levels] == [3, 5, 0]

    asyncio.run(run())


def test_owner_paused_inside_a_transaction_is_taken_over_within_its_lease(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGSTOP while one of the shard's sessions is inside a transaction holding a lock on
    its partition rows, for 4x its lease. A flush is one statement now, so it can no longer
    be caught between statements; a checkpoint's row writes can (they hold FOR KEY SHARE,
    which a takeover waits for), so checkpoints run every 0.2 s here. The server ends that
    session after its idle timeout: the takeover does not wait for the zombie to wake, and
    when it wakes, its writes are refused."""
    lease_s = 2.0
    paused_s = 4 * lease_s
    monkeypatch.setenv("INVENTORY_CHECKPOINT_INTERVAL_S", "0.2")
    cluster = start_cluster(database_url, tmp_path, shards=2, lease_s=lease_s)
    zombie = cluster.shards[0]
    try:
        asyncio.run(_paused_inside_a_transaction(cluster, zombie, database_url, paused_s))
    finally:
        cluster.stop()
    log = zombie.log_text()
    given_up = ("flush_failed", "flush_fenced", "partitions_fenced", "partitions_dropped")
    assert any(event in log for event in given_up), log[-3000:]


async def _holding_partition_rows(connection: asyncpg.Connection, application_name: str) -> bool:
    """A session of the process idle inside a transaction that holds a lock on
    ``partitions`` rows (a checkpoint's row writes): a takeover must wait for it."""
    found = await connection.fetchval(
        """SELECT count(*) FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid
            WHERE a.application_name = $1 AND a.state = 'idle in transaction'
              AND l.relation = 'partitions'::regclass""",
        application_name,
    )
    return bool(found)


async def _paused_inside_a_transaction(
    cluster: Cluster, zombie: ServiceProcess, database_url: str, paused_s: float
) -> None:
    by_owner = await owners(database_url)
    locations = [
        loc
        for loc in (f"store-{i}" for i in range(2000))
        if by_owner[partition_of(MERCHANT, loc)][0] == zombie.shard_id
    ][:20]
    # Many keys: every checkpoint writes rows for each, so its transactions last a while.
    keys = [key(f"sku-{n}", loc) for loc in locations for n in range(20)]
    watcher = await asyncpg.connect(database_url)
    async with grpc.aio.insecure_channel(cluster.router.address) as channel:
        router = pb_grpc.InventoryStub(channel)
        for index, k in enumerate(keys):
            await router.SetStock(
                pb.SetStockRequest(key=k, on_hand=1_000_000, idempotency_key=f"seed-{index}"),
                timeout=CALL_TIMEOUT_S,
            )
        stop_writing = asyncio.Event()

        async def writer(worker: int) -> None:  # keeps the zombie's flushes going
            for n in range(100_000):
                if stop_writing.is_set():
                    return
                k = keys[(worker + n) % len(keys)]
                request = pb.ReserveRequest(lines=[line(k, 1)], idempotency_key=f"w{worker}-{n}")
                try:
                    await router.Reserve(request, timeout=2.0)
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.05)

        writers = [asyncio.create_task(writer(worker)) for worker in range(8)]
        try:
            caught = False
            for _ in range(600):  # until the pause lands inside a transaction
                await asyncio.sleep(random.uniform(0.0, 0.02))
                zombie.signal(signal.SIGSTOP)
                await asyncio.sleep(0.05)
                if await _holding_partition_rows(watcher, f"inventory-{zombie.shard_id}"):
                    caught = True
                    break
                zombie.signal(signal.SIGCONT)
            assert caught, "never paused inside a transaction"
            paused_at = time.monotonic()
            stop_writing.set()
            probe_key = keys[0]
            served_after_s = None
            while time.monotonic() - paused_at < paused_s:
                try:
                    await router.Reserve(
                        pb.ReserveRequest(
                            lines=[line(probe_key, 1)], idempotency_key=f"probe-{time.time_ns()}"
                        ),
                        timeout=1.0,
                    )
                    served_after_s = time.monotonic() - paused_at
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.1)
            print(f"served by the new owner {served_after_s} s after the pause")
            assert served_after_s is not None, f"not served within {paused_s} s of the pause"
            new_owner = (await owners(database_url))[partition_of(MERCHANT, probe_key.location_id)]
            assert new_owner[0] != zombie.shard_id
            remaining = paused_s - (time.monotonic() - paused_at)
            await asyncio.sleep(max(remaining, 0.0))
        finally:
            zombie.signal(signal.SIGCONT)
            stop_writing.set()
            await asyncio.gather(*writers, return_exceptions=True)
            await watcher.close()
        await asyncio.sleep(2 * 0.5)  # the zombie wakes, fails its flush, is fenced
        level = await router.GetAvailability(
            pb.GetAvailabilityRequest(keys=[probe_key]), timeout=CALL_TIMEOUT_S
        )
        assert level.levels[0].available >= 0
    await ledger_is_fenced_and_contiguous(database_url)
