"""The hub and a subscriber without gRPC: slow subscribers, coalescing, bounds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator

from inventory.v1 import events_pb2

from inventory_core import CapacityExhausted, InventoryKey, bucket_key
from shard_router.router._watch_token import ResumeToken
from shard_router.router.hot_keys import SplitView
from shard_router.router.watch import Subscriber, WatchFilter, WatchHub, WatchLimits

from .fake_source import FakeEventSource
from .harness import MERCHANT, Watcher, eventually

PENDING_KEYS_MAX = 8
LIMITS = WatchLimits(
    subscriber_pending_keys_max=PENDING_KEYS_MAX, heartbeat_interval_s=5.0, read_block_ms=20
)


async def settle(hub: WatchHub, source: FakeEventSource) -> None:
    """Until the hub has read everything written."""
    await eventually(
        lambda: all(hub.positions.get(p, (0, 0)) >= (lsn, 0) for p, lsn in source.lsns.items())
    )


def subscribe(hub: WatchHub) -> Subscriber:
    subscriber = hub.subscribe(WatchFilter(MERCHANT))
    assert isinstance(subscriber, Subscriber)
    return subscriber


async def take(stream: AsyncGenerator[events_pb2.WatchEvent, None]) -> events_pb2.WatchEvent:
    async with asyncio.timeout(5):
        return await anext(stream)


def test_slow_subscriber_stays_bounded_resyncs_and_does_not_hold_back_a_fast_one() -> None:
    async def scenario() -> None:
        source = FakeEventSource()
        async with WatchHub(source, LIMITS) as hub:
            slow, fast = subscribe(hub), subscribe(hub)
            slow_stream, fast_stream = slow.stream(None), fast.stream(None)
            assert (await take(slow_stream)).snapshot.complete
            fast_watcher = Watcher()
            fast_watcher.apply(await take(fast_stream))
            keys_total = 100
            delivered_at: dict[str, float] = {}

            async def drain_fast() -> None:
                while len(delivered_at) < keys_total:
                    event = await take(fast_stream)
                    fast_watcher.apply(event)
                    if event.HasField("change"):
                        delivered_at[event.change.key.sku_id] = time.monotonic()

            draining = asyncio.create_task(drain_fast())
            written_at: dict[str, float] = {}
            for index in range(keys_total):
                sku = f"s{index}"
                source.write(MERCHANT, sku, "l1", index)
                written_at[sku] = time.monotonic()
                if index % 5 == 4:  # a fast reader keeps up with bursts below the bound
                    await settle(hub, source)
                    assert len(slow.pending) <= PENDING_KEYS_MAX
                    await eventually(lambda: not fast.pending)
            await draining
            assert fast_watcher.versions == source.versions(MERCHANT)
            assert "resync" not in fast_watcher.kinds()
            assert max(delivered_at[s] - written_at[s] for s in written_at) < 1.0
            assert slow.resync_reason == "subscriber_too_slow" and not slow.pending
            resync = await take(slow_stream)
            assert resync.resync.reason == "subscriber_too_slow"
            snapshot = (await take(slow_stream)).snapshot
            assert snapshot.reason == "resync" and snapshot.complete
            assert {(x.key.sku_id, x.key.location_id): x.version for x in snapshot.levels} == (
                source.versions(MERCHANT)
            )
            assert hub.metrics.resyncs >= 1
            await slow_stream.aclose()
            await fast_stream.aclose()

    asyncio.run(scenario())


def test_pending_changes_of_one_key_coalesce_to_the_latest_version() -> None:
    async def scenario() -> None:
        source = FakeEventSource()
        async with WatchHub(source, LIMITS) as hub:
            subscriber = subscribe(hub)
            stream = subscriber.stream(None)
            await take(stream)
            for value in range(50):
                source.write(MERCHANT, "a", "l1", value)
                if value % 5 == 0:
                    await settle(hub, source)
            await settle(hub, source)
            assert len(subscriber.pending) == 1
            change = (await take(stream)).change
            assert (change.version, change.after.on_hand) == (50, 49)
            assert hub.metrics.events_coalesced > 0
            assert not subscriber.pending
            await stream.aclose()

    asyncio.run(scenario())


def test_pending_bound_edge_exactly_full_keeps_changes_one_more_resyncs() -> None:
    async def scenario() -> None:
        source = FakeEventSource()
        async with WatchHub(source, LIMITS) as hub:
            subscriber = subscribe(hub)
            stream = subscriber.stream(None)
            await take(stream)
            for index in range(PENDING_KEYS_MAX):
                source.write(MERCHANT, f"s{index}", "l1", 1)
            await settle(hub, source)
            assert len(subscriber.pending) == PENDING_KEYS_MAX
            assert subscriber.resync_reason is None
            source.write(MERCHANT, "s0", "l1", 2)  # coalesces: still at the bound
            await settle(hub, source)
            assert subscriber.resync_reason is None
            source.write(MERCHANT, "one-more", "l1", 1)
            await settle(hub, source)
            assert subscriber.resync_reason == "subscriber_too_slow"
            assert len(subscriber.pending) == 0
            await stream.aclose()

    asyncio.run(scenario())


def test_subscribers_max_is_a_value_at_the_edge() -> None:
    async def scenario() -> None:
        async with WatchHub(FakeEventSource(), WatchLimits(subscribers_max=3)) as hub:
            admitted = [subscribe(hub) for _ in range(3)]
            assert hub.subscribe(WatchFilter(MERCHANT)) == CapacityExhausted("subscribers_max", 3)
            hub.unsubscribe(admitted[0])
            hub.unsubscribe(admitted[0])  # twice is harmless
            assert hub.metrics.subscribers == 2
            assert isinstance(hub.subscribe(WatchFilter(MERCHANT)), Subscriber)

    asyncio.run(scenario())


def test_a_token_ahead_of_this_hub_never_repeats_what_it_passed() -> None:
    """A client resuming on a router whose hub read less must not see old versions again."""

    async def scenario() -> None:
        source = FakeEventSource()
        for value in range(3):
            source.write(MERCHANT, "a", "l1", value)
        async with WatchHub(source, LIMITS) as hub:
            watching = subscribe(hub)  # keeps the merchant's partitions watched
            watching_stream = watching.stream(None)
            await take(watching_stream)
            await settle(hub, source)
            partition = next(iter(source.lsns))
            hub.positions[partition] = (1, 0)  # as if this hub were behind
            subscriber = subscribe(hub)
            token = ResumeToken(WatchFilter(MERCHANT).fingerprint, {partition: (3, 0)})
            stream = subscriber.stream(token)
            hub._fan_out([(partition, i, e) for _, i, e in source.streams[partition][1:]])
            source.write(MERCHANT, "a", "l1", 9)
            change = (await take(stream)).change
            assert change.version == 4
            await stream.aclose()
            await watching_stream.aclose()

    asyncio.run(scenario())


def test_a_split_key_streams_as_its_total_and_its_buckets_partitions_are_read() -> None:
    home = InventoryKey(MERCHANT, "viral", "store-1")
    buckets = (bucket_key(home, 1), bucket_key(home, 2))

    def write(key: InventoryKey, on_hand: int, **counts: int) -> None:
        source.write(key.merchant_id, key.sku_id, key.location_id, on_hand, **counts)

    def view() -> SplitView:
        split = SplitView(home, (home, *buckets), generation=1, merging=False)
        for key in split.parts:
            split.note(key, source.view[(key.merchant_id, key.sku_id, key.location_id)][0])
        return split

    source = FakeEventSource()

    async def scenario() -> None:
        write(home, 100, allotted=80)
        for bucket in buckets:
            write(bucket, 40)
        async with WatchHub(source, LIMITS) as hub:
            store = hub.subscribe(WatchFilter(MERCHANT, frozenset({"store-1"})))
            assert isinstance(store, Subscriber)
            streams = [store.stream(None)]
            await hub.follow_splits([view()])
            levels = (await take(streams[0])).snapshot.levels
            assert [(x.key.location_id, x.sellable, x.parts) for x in levels] == [
                ("store-1", 100, 3)
            ]
            # The store's subscriber named one partition; the buckets' are read for it too.
            assert hub.metrics.partitions_watched == 3
            everything = subscribe(hub)
            streams.append(everything.stream(None))
            levels = (await take(streams[1])).snapshot.levels
            assert [(x.key.location_id, x.sellable) for x in levels] == [("store-1", 100)]
            write(buckets[0], 40, reserved=5)
            write(buckets[1], 33)  # a commit of 7 at the second bucket
            await settle(hub, source)
            for stream in streams:
                last = None
                while last is None or last.after.reserved != 5 or last.after.on_hand != 93:
                    last = (await take(stream)).change
                    assert last.key.location_id == "store-1", last  # never a bucket
                assert (last.after.sellable, last.after.allotted, last.parts) == (88, 0, 3)
                assert last.version == 1 + 2 + 2
                await stream.aclose()

    asyncio.run(scenario())
