"""The offline hour, end to end through the router (DESIGN section 9), as real processes.

A store's tills sell while its POS gateway is offline. The shards run with a 3-second
silence threshold (``--feed-stale-after-s``) so that the hour fits a test; the sales rate
window is the real one (the hour before the feed's newest event), which holds every sale
here. In order:

1. the store sells at its tills, heard live, while another store of the merchant keeps
   sending;
2. the store falls silent: GetFeedHealth says stale, reads and Watch show each of its keys
   degraded since then, holding back the tills' last hour of sales;
3. online reservations continue against what is left: exactly available less the buffer is
   admitted, one more unit is refused;
4. the backlog of the offline sales arrives shuffled, with a fifth of the events sent twice
   (and some of step 1's again);
5. afterwards on_hand is exact, nothing is degraded, the keys whose offline sales outran the
   buffer are over-committed with exactly the right reservations at risk (newest first), in
   the Ingest answers and in GetOverCommitted, Watch saw the flags come and go, and the
   ledger holds every event exactly once.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from inventory.v1 import events_pb2
from inventory.v1 import events_pb2_grpc as events_grpc
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc

from persistence.embedded import EmbeddedRedis
from tests.conftest import Cluster, start_cluster
from tests.e2e.ledger import ingest_records

pytestmark = [pytest.mark.e2e, pytest.mark.pg]

MERCHANT = "m-offline"
OFFLINE, LIVE = "store-offline", "store-live"
SKUS = ("sku-0", "sku-1", "sku-2", "sku-3")
ON_HAND = 60
# Units each SKU sells at the till before the outage (the buffer it will hold back) and
# during it (the backlog). sku-0 and sku-1 sell more offline than their buffer covers.
SOLD_BEFORE = {"sku-0": 2, "sku-1": 4, "sku-2": 6, "sku-3": 8}
SOLD_OFFLINE = {"sku-0": 10, "sku-1": 6, "sku-2": 3, "sku-3": 0}
STALE_AFTER_S = 3.0
CALL_TIMEOUT_S = 20.0
WAIT_S_MAX = 30.0
ACKED = (pb.EVENT_ACK_STATUS_APPLIED, pb.EVENT_ACK_STATUS_DUPLICATE)


def key(sku: str, store: str = OFFLINE) -> pb.InventoryKey:
    return pb.InventoryKey(merchant_id=MERCHANT, sku_id=sku, location_id=store)


def sales(prefix: str, sold: dict[str, int], from_ms: int, to_ms: int) -> list[pb.FeedEvent]:
    """One event per unit sold, spread over [from_ms, to_ms)."""
    rng = random.Random(prefix)
    return [
        pb.FeedEvent(
            event_id=f"{prefix}-{sku}-{unit}",
            occurred_at_ms=rng.randrange(from_ms, max(to_ms, from_ms + 1)),
            kind=pb.FEED_EVENT_KIND_SALE,
            key=key(sku),
            quantity=1,
        )
        for sku, units in sold.items()
        for unit in range(units)
    ]


@dataclass
class Store:
    redis: EmbeddedRedis
    redis_dir: Path
    cluster: Cluster


@pytest.fixture
def store(database_url: str, tmp_path: Path) -> Iterator[Store]:
    redis_dir = Path(tempfile.mkdtemp(prefix="inv-offline-redis-"))
    redis = EmbeddedRedis()
    url = redis.start(redis_dir)
    cluster = start_cluster(
        database_url,
        tmp_path,
        shards=2,
        redis_url=url,
        shard_arguments=("--feed-stale-after-s", str(STALE_AFTER_S)),
    )
    try:
        yield Store(redis, redis_dir, cluster)
    finally:
        cluster.stop()
        redis.stop()
        shutil.rmtree(redis_dir, ignore_errors=True)


@dataclass
class Watcher:
    """Every change of the offline store's keys a Watch stream delivered, in order."""

    changes: list[events_pb2.AvailabilityChanged] = field(default_factory=list)
    snapshot_done: asyncio.Event = field(default_factory=asyncio.Event)

    async def follow(self, address: str, stop: asyncio.Event) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = events_grpc.AvailabilityStreamStub(channel)
            call = stub.Watch(events_pb2.WatchRequest(merchant_id=MERCHANT, location_ids=[OFFLINE]))

            async def read() -> None:
                async for message in call:
                    kind = message.WhichOneof("kind")
                    if kind == "snapshot" and message.snapshot.complete:
                        self.snapshot_done.set()
                    elif kind == "change":
                        self.changes.append(message.change)

            reader = asyncio.ensure_future(read())
            await stop.wait()
            call.cancel()
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    def latest(self) -> dict[str, events_pb2.AvailabilityChanged]:
        """Each SKU's newest change (by version) seen so far."""
        found: dict[str, events_pb2.AvailabilityChanged] = {}
        for change in self.changes:
            seen = found.get(change.key.sku_id)
            if seen is None or change.version > seen.version:
                found[change.key.sku_id] = change
        return found


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``check()`` until it is true, for at most WAIT_S_MAX."""
    deadline = time.monotonic() + WAIT_S_MAX
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def test_the_offline_hour_end_to_end(store: Store, database_url: str) -> None:
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    rng = random.Random(seed)
    live_events: list[pb.FeedEvent] = []

    async def run() -> None:
        address = store.cluster.router.address
        async with grpc.aio.insecure_channel(address) as channel:
            inventory = pb_grpc.InventoryStub(channel)
            ingest = pb_grpc.IngestStub(channel)
            # The morning's stock-take at the store, from its POS; the other store's by hand.
            now_ms = int(time.time() * 1000)
            counts = [
                pb.FeedEvent(
                    event_id=f"count-{sku}",
                    occurred_at_ms=now_ms - 50 * 60_000,
                    kind=pb.FEED_EVENT_KIND_COUNT,
                    key=key(sku),
                    count=ON_HAND,
                )
                for sku in SKUS
            ]
            await ingest.Send(
                pb.IngestRequest(merchant_id=MERCHANT, source="pos", events=counts),
                timeout=CALL_TIMEOUT_S,
            )
            for sku in SKUS:
                await inventory.SetStock(
                    pb.SetStockRequest(
                        key=key(sku, LIVE), on_hand=ON_HAND, idempotency_key=f"seed-{sku}"
                    ),
                    timeout=CALL_TIMEOUT_S,
                )
            watcher, stop = Watcher(), asyncio.Event()
            following = asyncio.ensure_future(watcher.follow(address, stop))
            await asyncio.wait_for(watcher.snapshot_done.wait(), WAIT_S_MAX)

            async def send(events: list[pb.FeedEvent], batch: int = 7) -> list[pb.IngestResponse]:
                answers = []
                for start in range(0, len(events), batch):
                    request = pb.IngestRequest(
                        merchant_id=MERCHANT, source="pos", events=events[start : start + batch]
                    )
                    answer = await ingest.Send(request, timeout=CALL_TIMEOUT_S)
                    assert all(a.status in ACKED for a in answer.acks), answer
                    answers.append(answer)
                return answers

            # 1. The tills sell, heard live; the other store keeps sending all along.
            before = sales("before", SOLD_BEFORE, now_ms - 40 * 60_000, now_ms)
            await send(before)
            keep_sending = asyncio.Event()

            async def live_store() -> None:
                index = 0
                while not keep_sending.is_set():
                    index += 1
                    event = pb.FeedEvent(
                        event_id=f"live-{index}",
                        occurred_at_ms=int(time.time() * 1000),
                        kind=pb.FEED_EVENT_KIND_RETURN,
                        key=key(SKUS[index % len(SKUS)], LIVE),
                        quantity=1,
                    )
                    request = pb.IngestRequest(merchant_id=MERCHANT, source="pos", events=[event])
                    answer = await ingest.Send(request, timeout=CALL_TIMEOUT_S)
                    assert answer.acks[0].status == pb.EVENT_ACK_STATUS_APPLIED, answer
                    live_events.append(event)
                    await asyncio.sleep(STALE_AFTER_S / 6)

            live_task = asyncio.ensure_future(live_store())

            # 2. The store falls silent: stale, and degraded in reads and Watch.
            silent_from_ms = int(time.time() * 1000)

            async def offline_is_stale() -> bool:
                health = await inventory.GetFeedHealth(
                    pb.GetFeedHealthRequest(merchant_id=MERCHANT, location_ids=[OFFLINE, LIVE]),
                    timeout=CALL_TIMEOUT_S,
                )
                by_id = {h.location_id: h for h in health.locations}
                live = by_id.get(LIVE)
                assert live is None or not live.stale, "the store still heard from went stale"
                stale: bool = by_id[OFFLINE].stale
                return stale

            await until(offline_is_stale, "the silent store to go stale")
            levels = await read_levels(inventory, OFFLINE)
            stale_since_ms = levels[SKUS[0]].stale_since_ms
            # Silent since its last answer, a few ms before silent_from_ms at most.
            assert stale_since_ms >= silent_from_ms + STALE_AFTER_S * 1000 - 1000
            for sku, level in levels.items():
                assert level.degraded and level.stale_since_ms == stale_since_ms, level
                assert level.stale_buffer == SOLD_BEFORE[sku], level
                assert level.sellable == ON_HAND - 2 * SOLD_BEFORE[sku], level
            assert not any(lv.degraded for lv in (await read_levels(inventory, LIVE)).values())

            async def watch_saw_stale() -> bool:
                latest = watcher.latest()
                return all(sku in latest and latest[sku].reason == "feed_stale" for sku in SKUS)

            await until(watch_saw_stale, "Watch to show the degraded availability")
            for sku, change in watcher.latest().items():
                assert change.after.stale_buffer == SOLD_BEFORE[sku], change
                assert change.after.stale_since_ms == stale_since_ms, change
                assert change.after.sellable == ON_HAND - 2 * SOLD_BEFORE[sku], change

            # 3. Online reservations continue against what is offered: exactly that much.
            held: dict[str, list[tuple[str, int]]] = {sku: [] for sku in SKUS}
            for sku in SKUS:
                for quantity in (5, 1):
                    while True:
                        request = pb.ReserveRequest(
                            idempotency_key=f"online-{sku}-{len(held[sku])}-{quantity}",
                            lines=[pb.ReservationLine(key=key(sku), quantity=quantity)],
                            ttl_s=3600,
                        )
                        try:
                            answer = await inventory.Reserve(request, timeout=CALL_TIMEOUT_S)
                        except grpc.aio.AioRpcError as refused:
                            assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
                            break
                        held[sku].append((answer.reservation.reservation_id, quantity))
                offered = ON_HAND - 2 * SOLD_BEFORE[sku]
                assert sum(q for _, q in held[sku]) == offered, (sku, held[sku])

            # 4. The backlog: the offline sales, shuffled, a fifth sent twice, and some of
            # the sales heard before the outage sent again.
            back_ms = int(time.time() * 1000)
            offline = sales("offline", SOLD_OFFLINE, silent_from_ms, back_ms)
            delivered = offline + rng.sample(offline, len(offline) // 5) + before[::3]
            rng.shuffle(delivered)
            answers = await send(delivered)
            keep_sending.set()
            await live_task

            # 5. Afterwards.
            levels = await read_levels(inventory, OFFLINE)
            over = await inventory.GetOverCommitted(
                pb.GetOverCommittedRequest(merchant_id=MERCHANT, location_ids=[OFFLINE]),
                timeout=CALL_TIMEOUT_S,
            )
            health = await inventory.GetFeedHealth(
                pb.GetFeedHealthRequest(merchant_id=MERCHANT, location_ids=[OFFLINE]),
                timeout=CALL_TIMEOUT_S,
            )

            async def watch_saw_resumed() -> bool:
                latest = watcher.latest()
                return all(
                    latest[sku].version == levels[sku].version
                    and not latest[sku].after.stale_since_ms
                    for sku in SKUS
                )

            await until(watch_saw_resumed, "Watch to show the store live again")
            stop.set()
            await following
            check_afterwards(
                levels=levels, held=held, over=over, answers=answers, health=health, back_ms=back_ms
            )
            # Nothing applied twice: every event of the store in the ledger exactly once.
            records = await ingest_records(database_url)
            seen = Counter(
                e.event_id for r in records for e in r.events if e.key.location_id == OFFLINE
            )
            assert set(seen) == {e.event_id for e in counts + offline + before}
            assert [e for e, n in seen.items() if n > 1] == [], "an event was applied twice"

    asyncio.run(run())
    print(f"stale buffers {SOLD_BEFORE}; offline sales {SOLD_OFFLINE}; live {len(live_events)}")


def check_afterwards(
    *,
    levels: dict[str, pb.StockLevel],
    held: dict[str, list[tuple[str, int]]],
    over: pb.GetOverCommittedResponse,
    answers: list[pb.IngestResponse],
    health: pb.GetFeedHealthResponse,
    back_ms: int,
) -> None:
    """on_hand exact, nothing degraded, the over-commitment reported with the right
    reservations (GetOverCommitted and the Ingest answers), the feed live again."""
    expected_at_risk = {}
    for sku, level in levels.items():
        reserved = ON_HAND - 2 * SOLD_BEFORE[sku]
        on_hand = ON_HAND - SOLD_BEFORE[sku] - SOLD_OFFLINE[sku]
        assert (level.on_hand, level.reserved) == (on_hand, reserved), level
        assert not level.degraded and level.stale_buffer == 0, level
        exposure = max(reserved - on_hand, 0)
        assert level.exposure == exposure, level
        if exposure:
            at_risk, covered = [], 0
            for reservation_id, quantity in reversed(held[sku]):  # newest first
                if covered >= exposure:
                    break
                at_risk.append(reservation_id)
                covered += quantity
            expected_at_risk[sku] = (exposure, at_risk)
    assert set(expected_at_risk) == {"sku-0", "sku-1"}, "the scenario over-commits two keys"
    listed = {
        k.key.sku_id: (k.over_commit.exposure, list(k.over_commit.reservations_at_risk))
        for k in over.keys
    }
    assert listed == expected_at_risk
    # Each answer lists the keys its events left over-committed: the last one naming a key
    # saw its final state (only sales moved it).
    reported: dict[str, tuple[int, list[str]]] = {}
    for answer in answers:
        for k in answer.over_committed:
            at_risk = list(k.over_commit.reservations_at_risk)
            reported[k.key.sku_id] = (k.over_commit.exposure, at_risk)
    assert reported == expected_at_risk
    (location,) = health.locations
    assert not location.stale and location.stale_since_ms == 0
    (pos,) = location.sources
    assert pos.source == "pos" and pos.last_received_at_ms >= back_ms and pos.lag_ms >= 0


async def read_levels(stub: pb_grpc.InventoryStub, store_id: str) -> dict[str, pb.StockLevel]:
    answer = await stub.GetAvailability(
        pb.GetAvailabilityRequest(keys=[key(sku, store_id) for sku in SKUS]),
        timeout=CALL_TIMEOUT_S,
    )
    return {level.key.sku_id: level for level in answer.levels}
