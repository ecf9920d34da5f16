"""Feeds through the router, as real processes (DESIGN section 9).

Gateways stream 10,000 events, a fifth of them duplicates, in shuffled order, while the
owner of one store's partition is killed with SIGKILL; they resend whatever was not
acknowledged, as a gateway keeps its buffer. Afterwards every key's on_hand is exactly the
sum of its distinct events, every event is in the ledger exactly once, and nothing an
acknowledgement said was durable is missing. Bad events are refused one by one, with their
field, and the rest of their request is applied.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from inventory.v1 import inventory_pb2 as pb
from inventory.v1 import inventory_pb2_grpc as pb_grpc

from inventory_core import partition_of
from shard_router.client import InventoryClient
from tests.conftest import Cluster, start_cluster
from tests.e2e.ledger import ingest_records

pytestmark = [pytest.mark.e2e, pytest.mark.pg]

MERCHANT = "m-feed"
STORES = tuple(f"store-{i}" for i in range(6))
SKUS = tuple(f"sku-{i}" for i in range(20))
EVENTS_DISTINCT = 8_000
DUPLICATES = 2_000  # a fifth of the 10,000 delivered
BATCH_EVENTS = 200
GATEWAYS = 4
# The owner of one store's partition is killed once this share of the events is durable.
KILL_AT_FRACTION = 0.3
CALL_TIMEOUT_S = 20.0
SETTLE_S_MAX = 90.0
T0_MS = int(time.time() * 1000) - 3_600_000  # the events happened in the last hour
ACKED = (pb.EVENT_ACK_STATUS_APPLIED, pb.EVENT_ACK_STATUS_DUPLICATE)


@pytest.fixture
def cluster2(database_url: str, tmp_path: Path) -> Iterator[Cluster]:
    cluster = start_cluster(database_url, tmp_path, shards=2)
    try:
        yield cluster
    finally:
        cluster.stop()


def key(sku: str, store: str, merchant: str = MERCHANT) -> pb.InventoryKey:
    return pb.InventoryKey(merchant_id=merchant, sku_id=sku, location_id=store)


def delta(rng: random.Random, index: int) -> pb.FeedEvent:
    kind = rng.choice(
        [pb.FEED_EVENT_KIND_SALE] * 5
        + [pb.FEED_EVENT_KIND_RECEIPT, pb.FEED_EVENT_KIND_RETURN, pb.FEED_EVENT_KIND_ADJUSTMENT]
    )
    quantity = rng.randint(1, 5)
    if kind == pb.FEED_EVENT_KIND_ADJUSTMENT:
        quantity = rng.choice([-1, 1]) * quantity
    return pb.FeedEvent(
        event_id=f"ev-{index:06d}",
        occurred_at_ms=T0_MS + rng.randrange(3_000_000),
        kind=kind,
        key=key(rng.choice(SKUS), rng.choice(STORES)),
        quantity=quantity,
    )


def signed(event: pb.FeedEvent) -> int:
    return -event.quantity if event.kind == pb.FEED_EVENT_KIND_SALE else event.quantity


async def owner_of(database_url: str, store: str) -> str:
    connection = await asyncpg.connect(database_url)
    try:
        owner: str = await connection.fetchval(
            "SELECT owner FROM partitions WHERE partition = $1", partition_of(MERCHANT, store)
        )
        return owner
    finally:
        await connection.close()


async def recorded_event_ids(database_url: str) -> Counter[str]:
    """How many times each event id is in the ledger."""
    records = await ingest_records(database_url)
    return Counter(event.event_id for record in records for event in record.events)


class Gateway:
    """A POS gateway: a buffer of events it drops only when they are acknowledged."""

    def __init__(self, name: str, events: list[pb.FeedEvent]) -> None:
        self.name = name
        self.pending = list(events)
        self.acknowledged: dict[str, int] = {}
        self.failed_acks = 0

    async def requests(
        self, batch: list[pb.FeedEvent], sent: dict[int, list[pb.FeedEvent]]
    ) -> AsyncIterator[pb.IngestRequest]:
        for start in range(0, len(batch), BATCH_EVENTS):
            chunk = batch[start : start + BATCH_EVENTS]
            sequence = len(sent) + 1
            sent[sequence] = chunk
            yield pb.IngestRequest(
                merchant_id=MERCHANT, source="pos", events=chunk, sequence=sequence
            )

    async def run(self, stub: pb_grpc.IngestStub, deadline: float) -> None:
        while self.pending and time.monotonic() < deadline:
            batch, self.pending = self.pending, []
            sent: dict[int, list[pb.FeedEvent]] = {}
            try:
                async for response in stub.Stream(self.requests(batch, sent)):
                    events = sent.pop(response.sequence)
                    if response.HasField("error"):
                        self.pending.extend(events)
                        continue
                    for event, ack in zip(events, response.acks, strict=True):
                        if ack.status in ACKED:
                            self.acknowledged[event.event_id] = ack.status
                        else:
                            assert ack.status == pb.EVENT_ACK_STATUS_FAILED, ack
                            self.failed_acks += 1
                            self.pending.append(event)
            except grpc.aio.AioRpcError:
                pass  # the stream broke: whatever was not acknowledged is sent again
            for events in sent.values():
                self.pending.extend(events)
            if self.pending:
                await asyncio.sleep(0.5)


def test_ten_thousand_shuffled_events_with_duplicates_end_exact_across_a_kill_9(
    cluster2: Cluster, database_url: str
) -> None:
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    rng = random.Random(seed)
    distinct = [delta(rng, i) for i in range(EVENTS_DISTINCT)]
    delivered = distinct + [rng.choice(distinct) for _ in range(DUPLICATES)]
    rng.shuffle(delivered)
    gateways = [Gateway(f"gw-{i}", delivered[i::GATEWAYS]) for i in range(GATEWAYS)]
    killed_at: list[int] = []

    def acknowledged() -> int:
        return len({e for g in gateways for e in g.acknowledged})

    async def run() -> None:
        victim_id = await owner_of(database_url, STORES[0])
        victim = next(s for s in cluster2.shards if s.shard_id == victim_id)
        async with grpc.aio.insecure_channel(cluster2.router.address) as channel:
            stub = pb_grpc.IngestStub(channel)
            deadline = time.monotonic() + SETTLE_S_MAX

            async def kill_midway() -> None:
                while acknowledged() < EVENTS_DISTINCT * KILL_AT_FRACTION:
                    assert time.monotonic() < deadline, "no progress before the kill"
                    await asyncio.sleep(0.01)
                await asyncio.to_thread(victim.kill)
                killed_at.append(acknowledged())

            await asyncio.gather(*(g.run(stub, deadline) for g in gateways), kill_midway())
            assert not [g.name for g in gateways if g.pending], "events never acknowledged"
            await check_levels(pb_grpc.InventoryStub(channel))

    async def check_levels(stub: pb_grpc.InventoryStub) -> None:
        expected: defaultdict[tuple[str, str], int] = defaultdict(int)
        for event in distinct:
            expected[(event.key.sku_id, event.key.location_id)] += signed(event)
        for store in STORES:
            answer = await stub.GetAvailability(
                pb.GetAvailabilityRequest(keys=[key(sku, store) for sku in SKUS]),
                timeout=CALL_TIMEOUT_S,
            )
            for sku, level in zip(SKUS, answer.levels, strict=True):
                assert level.on_hand == expected[(sku, store)], (sku, store)

    asyncio.run(run())
    assert {e for g in gateways for e in g.acknowledged} == {e.event_id for e in distinct}
    (acknowledged_before_kill,) = killed_at
    assert acknowledged_before_kill < EVENTS_DISTINCT, "the owner died after the last event"
    print(
        f"acknowledged before the kill: {acknowledged_before_kill}; FAILED acks resent: "
        f"{sum(g.failed_acks for g in gateways)}"
    )
    seen = asyncio.run(recorded_event_ids(database_url))
    assert set(seen) == {e.event_id for e in distinct}, "an acknowledged event was lost"
    assert [e for e, n in seen.items() if n > 1] == [], "an event was applied twice"


def test_bad_events_are_refused_one_by_one_and_the_rest_of_the_request_applies(
    cluster2: Cluster,
) -> None:
    now_ms = int(time.time() * 1000)
    good = pb.FeedEvent(
        event_id="ok-1",
        occurred_at_ms=now_ms,
        kind=pb.FEED_EVENT_KIND_RECEIPT,
        key=key("sku-a", "store-a"),
        quantity=7,
    )
    other_store = pb.FeedEvent()
    other_store.CopyFrom(good)
    other_store.event_id, other_store.key.location_id = "ok-2", "store-b"
    bad_kind = pb.FeedEvent(event_id="b-1", occurred_at_ms=now_ms, key=key("sku-a", "store-a"))
    bad_kind.quantity = 1
    negative = pb.FeedEvent(
        event_id="b-2",
        occurred_at_ms=now_ms,
        kind=pb.FEED_EVENT_KIND_COUNT,
        key=key("sku-a", "store-a"),
        count=-4,
    )
    no_id = pb.FeedEvent(
        occurred_at_ms=now_ms,
        kind=pb.FEED_EVENT_KIND_SALE,
        key=key("sku-a", "store-a"),
        quantity=1,
    )
    foreign = pb.FeedEvent(
        event_id="b-4",
        occurred_at_ms=now_ms,
        kind=pb.FEED_EVENT_KIND_SALE,
        key=key("sku-a", "store-a", merchant="m-other"),
        quantity=1,
    )

    async def run() -> None:
        async with grpc.aio.insecure_channel(cluster2.router.address) as channel:
            ingest = pb_grpc.IngestStub(channel)
            request = pb.IngestRequest(
                merchant_id=MERCHANT,
                source="pos",
                events=[bad_kind, good, negative, no_id, other_store, foreign],
            )
            answer = await ingest.Send(request, timeout=CALL_TIMEOUT_S)
            got = [(pb.EventAckStatus.Name(a.status), a.field) for a in answer.acks]
            assert got == [
                ("EVENT_ACK_STATUS_REFUSED", "kind"),
                ("EVENT_ACK_STATUS_APPLIED", ""),
                ("EVENT_ACK_STATUS_REFUSED", "count"),
                ("EVENT_ACK_STATUS_REFUSED", "event_id"),
                ("EVENT_ACK_STATUS_APPLIED", ""),
                ("EVENT_ACK_STATUS_REFUSED", "key.merchant_id"),
            ]
            assert all(a.reason for a in answer.acks if a.status == pb.EVENT_ACK_STATUS_REFUSED)
            levels = await pb_grpc.InventoryStub(channel).GetAvailability(
                pb.GetAvailabilityRequest(keys=[good.key, other_store.key]),
                timeout=CALL_TIMEOUT_S,
            )
            assert [level.on_hand for level in levels.levels] == [7, 7]
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await ingest.Send(
                    pb.IngestRequest(merchant_id=MERCHANT, events=[good]), timeout=CALL_TIMEOUT_S
                )
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "source" in (refused.value.details() or "")

    asyncio.run(run())


def test_sales_at_the_till_over_commit_and_the_order_service_lists_the_reservations_at_risk(
    cluster2: Cluster,
) -> None:
    now_ms = int(time.time() * 1000)
    milk, eggs = key("milk", "store-x"), key("eggs", "store-y")

    def event(event_id: str, k: pb.InventoryKey, **fields: int) -> pb.FeedEvent:
        return pb.FeedEvent(event_id=event_id, occurred_at_ms=now_ms, key=k, **fields)

    async def run() -> None:
        async with grpc.aio.insecure_channel(cluster2.router.address) as channel:
            ingest, stub = pb_grpc.IngestStub(channel), pb_grpc.InventoryStub(channel)
            counts = [
                event("count-milk", milk, kind=pb.FEED_EVENT_KIND_COUNT, count=3),
                event("count-eggs", eggs, kind=pb.FEED_EVENT_KIND_COUNT, count=2),
            ]
            await ingest.Send(
                pb.IngestRequest(merchant_id=MERCHANT, source="pos", events=counts),
                timeout=CALL_TIMEOUT_S,
            )
            carts = []
            for index in range(3):
                held = await stub.Reserve(
                    pb.ReserveRequest(
                        lines=[pb.ReservationLine(key=milk, quantity=1)],
                        idempotency_key=f"cart-{index}",
                    ),
                    timeout=CALL_TIMEOUT_S,
                )
                carts.append(held.reservation.reservation_id)
            sales = [
                event("sale-1", milk, kind=pb.FEED_EVENT_KIND_SALE, quantity=2),
                event("sale-2", eggs, kind=pb.FEED_EVENT_KIND_SALE, quantity=1),
            ]
            answer = await ingest.Send(
                pb.IngestRequest(merchant_id=MERCHANT, source="pos", events=sales),
                timeout=CALL_TIMEOUT_S,
            )
            assert [a.status for a in answer.acks] == [pb.EVENT_ACK_STATUS_APPLIED] * 2
            (reported,) = answer.over_committed
            assert reported.key == milk and reported.over_commit.exposure == 2
            listed = await stub.GetOverCommitted(
                pb.GetOverCommittedRequest(
                    merchant_id=MERCHANT, location_ids=["store-x", "store-y"]
                ),
                timeout=CALL_TIMEOUT_S,
            )
            (found,) = listed.keys
            assert found.key == milk
            assert found.over_commit.exposure == 2  # on_hand 1, 3 reserved
            assert list(found.over_commit.reservations_at_risk) == [carts[2], carts[1]]
            levels = await stub.GetAvailability(
                pb.GetAvailabilityRequest(keys=[milk, eggs]), timeout=CALL_TIMEOUT_S
            )
            assert [(lv.available, lv.exposure, lv.sellable) for lv in levels.levels] == [
                (-2, 2, 0),
                (1, 0, 1),
            ]

    asyncio.run(run())


def test_an_expected_delivery_is_incoming_until_its_receipts_arrive(cluster2: Cluster) -> None:
    """A supplier's notice through the client, its receipts through Ingest: the units show as
    incoming (never available) until received, then as on_hand."""
    store = STORES[2]
    eta_ms = int(time.time() * 1000) + 4 * 3_600_000

    async def run() -> None:
        async with InventoryClient(cluster2.router.address) as client:
            await client.set_stock(key("sku-0", store), 5, idempotency_key="take")
            notice = await client.expect_delivery(
                MERCHANT,
                store,
                "asn-77",
                [("sku-0", 24), ("sku-1", 12)],
                eta_ms,
                idempotency_key="asn-77-v1",
            )
            assert [(lv.key.sku_id, lv.incoming, lv.incoming_eta_ms) for lv in notice.levels] == [
                ("sku-0", 24, eta_ms),
                ("sku-1", 12, eta_ms),
            ]
            assert [(lv.on_hand, lv.available) for lv in notice.levels] == [(5, 5), (0, 0)]
            now_ms = int(time.time() * 1000)
            receipts = [
                pb.FeedEvent(
                    event_id=f"asn-77:{sku}",
                    occurred_at_ms=now_ms,
                    kind=pb.FEED_EVENT_KIND_RECEIPT,
                    key=key(sku, store),
                    quantity=units,
                    delivery_id="asn-77",
                )
                for sku, units in (("sku-0", 20), ("sku-1", 12))
            ]
            answer = await client.ingest(MERCHANT, "supplier-1", receipts)
            assert [a.status for a in answer.acks] == [pb.EVENT_ACK_STATUS_APPLIED] * 2
            levels = await client.get_availability([key(sku, store) for sku in ("sku-0", "sku-1")])
            assert [(lv.on_hand, lv.incoming) for lv in levels.levels] == [(25, 4), (12, 0)]
            assert levels.levels[0].incoming_eta_ms == eta_ms
            assert levels.levels[1].incoming_eta_ms == 0

    asyncio.run(run())
