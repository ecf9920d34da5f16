"""Which streams the hub reads: only its watchers' partitions, nothing without a watcher.

The fake source keeps the partitions each call named (``asked``), so every test here states
exactly what the hub asked Redis for, and when.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence

from inventory.v1 import events_pb2

from inventory_core import PARTITION_COUNT, partition_of
from shard_router.router.watch import Subscriber, WatchFilter, WatchHub, WatchLimits

from .fake_source import FakeEventSource
from .harness import MERCHANT, Watcher, eventually, take, watch

LIMITS = WatchLimits(read_block_ms=20, heartbeat_interval_s=5.0)
# A read that blocks far longer than any test waits: what arrives must not wait for it.
LONG_BLOCK = WatchLimits(read_block_ms=60_000, heartbeat_interval_s=5.0)
QUIET_S = 0.15  # several read intervals and read blocks of LIMITS


def locations_in_distinct_partitions(count: int) -> list[tuple[str, int]]:
    """``count`` locations of MERCHANT, each with its own partition: (location, partition)."""
    found: dict[int, str] = {}
    index = 0
    while len(found) < count:
        location = f"l{index}"
        found.setdefault(partition_of(MERCHANT, location, PARTITION_COUNT), location)
        index += 1
    return [(location, partition) for partition, location in found.items()]


async def leave(
    hub: WatchHub, subscriber: Subscriber, stream: AsyncGenerator[events_pb2.WatchEvent, None]
) -> None:
    """As the Watch RPC ends: the stream closes, then the subscriber unsubscribes."""
    await stream.aclose()
    hub.unsubscribe(subscriber)


def reads(source: FakeEventSource) -> list[tuple[int, ...]]:
    return source.asked.get("read", [])


async def quiet_reads(source: FakeEventSource) -> int:
    """The reads issued over QUIET_S after the one under way (if any) has ended."""
    await asyncio.sleep(QUIET_S)
    before = len(reads(source))
    await asyncio.sleep(QUIET_S)
    return len(reads(source)) - before


def test_a_hub_without_watchers_asks_the_source_nothing() -> None:
    async def scenario() -> None:
        source = FakeEventSource()
        source.write(MERCHANT, "a", "l1", 1)
        async with WatchHub(source, LIMITS) as hub:
            idle = hub.subscribe(WatchFilter(MERCHANT))  # admitted, stream not started
            assert isinstance(idle, Subscriber)
            await asyncio.sleep(2 * QUIET_S)
            assert source.calls == {}
            assert (hub.metrics.reads, hub.metrics.partitions_watched) == (0, 0)
            hub.unsubscribe(idle)

    asyncio.run(scenario())


def test_reads_start_with_the_first_watcher_and_stop_when_the_last_leaves() -> None:
    async def scenario() -> None:
        source = FakeEventSource()
        (location, partition), _ = locations_in_distinct_partitions(2)
        async with WatchHub(source, LIMITS) as hub:
            subscriber, stream = await watch(hub, WatchFilter(MERCHANT, frozenset({location})))
            # the first watcher's partition started at its stream's last id, read for it alone
            assert source.asked["last_ids"][0] == (partition,)
            source.write(MERCHANT, "a", location, 5)
            assert (await take(stream)).change.after.on_hand == 5
            assert set(reads(source)) == {(partition,)}
            await leave(hub, subscriber, stream)
            assert hub.metrics.partitions_watched == 0
            assert await quiet_reads(source) == 0
            calls = dict(source.calls)
            await asyncio.sleep(QUIET_S)
            assert source.calls == calls, "nothing at all is asked once nobody watches"

    asyncio.run(scenario())


def test_the_hub_reads_the_union_of_its_watchers_partitions_and_narrows_as_they_leave() -> None:
    async def scenario() -> None:
        source = FakeEventSource()
        (first_location, first), (second_location, second) = locations_in_distinct_partitions(2)
        async with WatchHub(source, LIMITS) as hub:
            one, one_stream = await watch(hub, WatchFilter(MERCHANT, frozenset({first_location})))
            two, two_stream = await watch(hub, WatchFilter(MERCHANT, frozenset({second_location})))
            assert source.asked["last_ids"][-2:] == [(second,), (second,)], (
                "the newcomer's partition only: once to start it, once as its barrier"
            )
            both = tuple(sorted((first, second)))
            await eventually(lambda: reads(source)[-1] == both)
            source.write(MERCHANT, "a", second_location, 7)
            assert (await take(two_stream)).change.after.on_hand == 7
            assert not one.pending, "another location's change is not offered"
            await leave(hub, two, two_stream)
            await eventually(lambda: reads(source)[-1] == (first,))
            await asyncio.sleep(QUIET_S)
            assert set(reads(source)[-3:]) == {(first,)}
            await leave(hub, one, one_stream)

    asyncio.run(scenario())


def test_a_merchant_wide_watcher_makes_the_hub_read_every_partition_until_it_leaves() -> None:
    async def scenario() -> None:
        source = FakeEventSource()
        ((location, partition),) = locations_in_distinct_partitions(1)
        async with WatchHub(source, LIMITS) as hub:
            narrow, narrow_stream = await watch(hub, WatchFilter(MERCHANT, frozenset({location})))
            wide, wide_stream = await watch(hub, WatchFilter(MERCHANT))
            every = tuple(range(PARTITION_COUNT))
            await eventually(lambda: reads(source)[-1] == every)
            assert hub.metrics.partitions_watched == PARTITION_COUNT
            # the partitions nobody watched yet were started; the narrow one kept its place
            started = source.asked["last_ids"][-2]
            assert len(started) == PARTITION_COUNT - 1 and partition not in started
            await leave(hub, wide, wide_stream)
            await eventually(lambda: reads(source)[-1] == (partition,))
            assert hub.metrics.partitions_watched == 1
            await leave(hub, narrow, narrow_stream)

    asyncio.run(scenario())


def test_a_new_watcher_does_not_wait_for_the_read_under_way() -> None:
    """The hub blocks in a long read of the first watcher's stream; a second watcher's change
    arrives at once because the read under way is cancelled and the next one names both."""

    async def scenario() -> None:
        source = FakeEventSource()
        (first_location, _), (second_location, second) = locations_in_distinct_partitions(2)
        async with WatchHub(source, LONG_BLOCK) as hub:
            one, one_stream = await watch(hub, WatchFilter(MERCHANT, frozenset({first_location})))
            await eventually(lambda: bool(reads(source)))  # blocked for up to a minute
            two, two_stream = await watch(hub, WatchFilter(MERCHANT, frozenset({second_location})))
            source.write(MERCHANT, "a", second_location, 3)
            async with asyncio.timeout(2.0):
                change = (await take(two_stream)).change
            assert (change.partition, change.after.on_hand) == (second, 3)
            await leave(hub, two, two_stream)
            await leave(hub, one, one_stream)

    asyncio.run(scenario())


def test_watchers_arriving_together_share_the_reads_that_start_their_partitions() -> None:
    arrivals = 50

    async def scenario() -> None:
        source = FakeEventSource()
        source.write(MERCHANT, "a", "l1", 1)
        narrow = [
            WatchFilter(MERCHANT, frozenset({loc}))
            for loc, _ in locations_in_distinct_partitions(20)
        ]
        async with WatchHub(source, LIMITS) as hub:
            joined = await asyncio.gather(*(watch(hub, f) for f in narrow))
            # the first starts its own partition; everyone who arrived meanwhile, together
            assert hub.metrics.watch_reads == 2
            assert len(narrow) - 1 in map(len, source.asked["last_ids"])
            joined += await asyncio.gather(
                *(watch(hub, WatchFilter(MERCHANT)) for _ in range(arrivals))
            )
            assert hub.metrics.watch_reads == 3, "one read for the rest of the partitions"
            assert hub.metrics.subscribers == arrivals + len(narrow)
            for subscriber, stream in joined:
                await leave(hub, subscriber, stream)
            assert hub.metrics.partitions_watched == 0

    asyncio.run(scenario())


def test_an_outage_resyncs_only_the_subscribers_of_a_trimmed_partition() -> None:
    async def scenario() -> None:
        source = FakeEventSource(stream_entries_max=3)
        (trimmed_location, _), (kept_location, _) = locations_in_distinct_partitions(2)
        source.write(MERCHANT, "a", trimmed_location, 1)
        source.write(MERCHANT, "a", kept_location, 1)
        limits = WatchLimits(read_block_ms=20, source_retry_backoff_s_max=0.02)
        async with WatchHub(source, limits) as hub:
            trimmed, trimmed_stream = await watch(
                hub, WatchFilter(MERCHANT, frozenset({trimmed_location}))
            )
            kept, kept_stream = await watch(hub, WatchFilter(MERCHANT, frozenset({kept_location})))
            source.failing = True
            await eventually(lambda: hub.metrics.source_errors > 0)
            for value in range(2, 12):  # more than the stream keeps: the hub's place is gone
                source.write(MERCHANT, "a", trimmed_location, value)
            source.write(MERCHANT, "a", kept_location, 2)
            source.failing = False
            watcher = Watcher()
            async with asyncio.timeout(5):
                while watcher.versions.get(("a", trimmed_location)) != 11:
                    watcher.apply(await take(trimmed_stream))
            assert watcher.kinds()[0] == "resync"
            change = (await take(kept_stream)).change
            assert (change.version, change.after.on_hand) == (2, 2), "no resync: nothing lost"
            assert hub.metrics.resyncs == 1
            await leave(hub, trimmed, trimmed_stream)
            await leave(hub, kept, kept_stream)

    asyncio.run(scenario())


def test_a_subscriber_that_leaves_while_its_partitions_start_is_not_counted() -> None:
    class Gated(FakeEventSource):
        """last_ids answers once the gate opens."""

        gate: asyncio.Event | None = None
        waiting = False

        async def last_ids(self, partitions: Sequence[int] | None = None) -> dict[int, str]:
            assert self.gate is not None
            self.waiting = True
            await self.gate.wait()
            return await super().last_ids(partitions)

    async def scenario() -> None:
        source = Gated()
        source.gate = asyncio.Event()
        ((location, _),) = locations_in_distinct_partitions(1)
        async with WatchHub(source, LIMITS) as hub:
            subscriber = hub.subscribe(WatchFilter(MERCHANT, frozenset({location})))
            assert isinstance(subscriber, Subscriber)
            watching = asyncio.create_task(hub.watch(subscriber))
            await eventually(lambda: source.waiting)
            hub.unsubscribe(subscriber)  # the RPC ended meanwhile
            source.gate.set()
            await watching
            assert not subscriber.watching and hub.metrics.partitions_watched == 0
            assert await quiet_reads(source) == 0

    asyncio.run(scenario())


def test_a_partition_behind_is_read_on_at_once_not_after_the_read_interval() -> None:
    """A read that fills a partition's page (``read_entries_per_partition_max``) is followed
    at once by the next; only a read with room to spare waits ``read_interval_ms_min``
    (here a minute, longer than the test may take). So a hot partition is read as fast as
    the router can, not one page per interval."""
    page = 10
    limits = WatchLimits(
        read_block_ms=60_000,
        heartbeat_interval_s=5.0,
        read_entries_per_partition_max=page,
        read_interval_ms_min=60_000,
    )

    async def scenario() -> None:
        source = FakeEventSource()
        async with WatchHub(source, limits) as hub:
            subscriber, stream = await watch(hub, WatchFilter(MERCHANT, frozenset({"l1"})))
            await eventually(lambda: bool(reads(source)))  # blocked until something comes
            before = len(reads(source))
            changes = 5 * page + 3
            for number in range(changes):  # all appended before the blocked read wakes
                source.write(MERCHANT, f"s{number}", "l1", number + 1)
            await eventually(lambda: hub.metrics.events_read == changes)
            # the blocked read and the 5 after it: 6 pages, the last with room to spare
            assert len(reads(source)) - before == 5
            assert await quiet_reads(source) == 0  # and now the interval holds
            await leave(hub, subscriber, stream)

    asyncio.run(scenario())
