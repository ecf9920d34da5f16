"""EventPublisher against real PostgreSQL and Redis: live sends, outages, overflow, catch-up.

The ledger is the outbox: whatever publish() loses (Redis down, buffer overflow, a crash
before published_lsn was written), catch-up republishes from it, and the streams end with
every change exactly once, in id order, the read view at every key's latest version and
published_lsn at the head.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as redis

from inventory_core import (
    PARTITION_COUNT,
    AdjustmentReason,
    AdjustStock,
    AvailabilityChanged,
    ClientCommand,
    Extend,
    InventoryKey,
    Line,
    Partition,
    Reserve,
    Reserved,
    SetStock,
    is_accepted,
)
from persistence.embedded import EmbeddedRedis
from persistence.events import EventPublisher, PublisherLimits
from persistence.ledger import decode_changes
from persistence.migrate import ensure_partitions, migrate
from persistence.readview import asof_key, level_key
from persistence.store import PartitionStore

from ._support import T0_MS, eventually, location_in, stream_ids

pytestmark = pytest.mark.pg

MERCHANT = "m-publisher"
SHARD = "shard-a"
PARTITIONS = (3, 9, 200)
# Quick enough for tests: catch-up and published_lsn every fraction of a second.
FAST = PublisherLimits(
    published_lsn_flush_interval_s=0.1,
    catch_up_interval_s=0.2,
    redis_backoff_s_min=0.02,
    redis_backoff_s_max=0.2,
    redis_command_timeout_s=0.5,
)


@dataclass
class Shard:
    """An owner of PARTITIONS without the loop: apply, flush with events, publish."""

    pool: asyncpg.Pool
    store: PartitionStore
    epochs: dict[int, int]
    cores: dict[int, Partition] = field(default_factory=dict)
    clock_ms: int = T0_MS
    # Each flushed change's encoding as the ledger stored it, and its commit time.
    encoded: dict[AvailabilityChanged, tuple[bytes, int]] = field(default_factory=dict)

    async def write(self, partition: int, command: ClientCommand) -> list[AvailabilityChanged]:
        core = self.cores[partition]
        flushed = core.head_lsn
        step = core.apply(command)
        assert is_accepted(step.outcome), step.outcome
        committed_at_ms = self.clock_ms + 1
        payloads = self.store.encode_changes(step.events, committed_at_ms)
        await self.store.flush(
            step.records,
            {partition: self.epochs[partition]},
            {partition: flushed},
            step.events,
            payloads,
        )
        for event, payload in zip(step.events, payloads, strict=True):
            self.encoded[event] = (payload, committed_at_ms)
        return list(step.events)

    def publish(self, publisher: EventPublisher, events: Sequence[AvailabilityChanged]) -> None:
        """Hand flushed changes to the publisher as the owner does: the ledger's bytes."""
        payloads = [self.encoded[event][0] for event in events]
        committed_at_ms = max((self.encoded[event][1] for event in events), default=0)
        publisher.publish(events, payloads, committed_at_ms)

    async def workload(
        self,
        rounds: int,
        publisher: EventPublisher | None,
        publish_durations_s: list[float] | None = None,
    ) -> int:
        """Writes to every partition; publishes each batch; returns the changes made."""
        made = 0
        for round_ in range(rounds):
            for partition in PARTITIONS:
                for sku in ("sku-1", "sku-2"):
                    self.clock_ms += 1
                    key = InventoryKey(MERCHANT, sku, location_in(MERCHANT, partition))
                    idempotency_key = f"w-{self.clock_ms}"
                    command = (
                        SetStock(key, idempotency_key, 100 + round_, None, self.clock_ms)
                        if round_ % 2 == 0
                        else AdjustStock(
                            key, idempotency_key, -1, AdjustmentReason.SALE, 0, self.clock_ms
                        )
                    )
                    events = await self.write(partition, command)
                    made += len(events)
                    if publisher is not None:
                        started_s = time.perf_counter()
                        self.publish(publisher, events)
                        if publish_durations_s is not None:
                            publish_durations_s.append(time.perf_counter() - started_s)
        return made

    async def reserve_and_extend(self, publisher: EventPublisher | None) -> None:
        """Ends every partition with a record that changes nothing (an Extend)."""
        for partition in PARTITIONS:
            key = InventoryKey(MERCHANT, "sku-1", location_in(MERCHANT, partition))
            core = self.cores[partition]
            reserve = Reserve(MERCHANT, f"r-{partition}", (Line(key, 1),), 60, self.clock_ms)
            events = await self.write(partition, reserve)
            outcome = core.apply(reserve).outcome  # the idempotent answer names the id
            assert isinstance(outcome, Reserved)
            rid = outcome.reservation.reservation_id
            if publisher is not None:
                self.publish(publisher, events)
            extend = Extend(MERCHANT, f"x-{partition}", rid, 120, self.clock_ms)
            assert await self.write(partition, extend) == []


@contextlib.asynccontextmanager
async def shard_on(database_url: str, owner: str = SHARD) -> AsyncIterator[Shard]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    try:
        async with pool.acquire() as connection:
            await migrate(connection)
            await ensure_partitions(connection, PARTITION_COUNT)
        store = PartitionStore(pool)
        owned = await store.acquire(PARTITIONS, owner)
        shard = Shard(pool, store, {o.partition: o.epoch for o in owned})
        shard.cores = await store.load(PARTITIONS)
        yield shard
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def running(publisher: EventPublisher) -> AsyncIterator[EventPublisher]:
    task = asyncio.create_task(publisher.run())
    try:
        yield publisher
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await publisher.close()


async def converged(redis_url: str, shard: Shard) -> bool:
    """Read view == memory for every key; streams == ledger ids; published_lsn == head."""
    client = redis.Redis.from_url(redis_url)
    try:
        for partition, core in shard.cores.items():
            for key, row in core.snapshot().stock.items():
                level = await client.hgetall(
                    level_key(key.merchant_id, key.location_id, key.sku_id)
                )
                seen = [int(level.get(f, -1)) for f in (b"version", b"on_hand", b"reserved")]
                if seen != [row.version, row.on_hand, row.reserved]:
                    return False
            if await stream_ids(client, partition) != await ledger_ids(shard.pool, partition):
                return False
    except redis.RedisError:
        return False
    finally:
        await client.aclose()
    rows = await shard.pool.fetch(
        "SELECT published_lsn, head_lsn FROM partitions WHERE partition = ANY($1::integer[])",
        list(PARTITIONS),
    )
    return all(r["published_lsn"] == r["head_lsn"] for r in rows)


async def ledger_ids(pool: asyncpg.Pool, partition: int) -> list[str]:
    rows = await pool.fetch(
        """SELECT first_lsn, last_lsn, changes FROM ledger_batches
            WHERE partition = $1 ORDER BY last_lsn""",
        partition,
    )
    return [
        f"{lsn}-{change.index}"
        for r in rows
        for lsn, changes in decode_changes(partition, r["first_lsn"], r["last_lsn"], r["changes"])
        for change in changes
    ]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# ---------------------------------------------------------------------------------- tests


def test_live_changes_reach_streams_read_view_and_published_lsn(
    database_url: str, fresh_redis_url: str
) -> None:
    async def main() -> None:
        async with shard_on(database_url) as shard:
            publisher = EventPublisher(fresh_redis_url, shard.pool, SHARD, FAST)
            async with running(publisher):
                await eventually(lambda: _caught_up_once(publisher), what="first catch-up")
                made = await shard.workload(4, publisher)
                await shard.reserve_and_extend(publisher)
                await eventually(lambda: converged(fresh_redis_url, shard), what="convergence")
            stats = publisher.stats
            assert stats.events_published == made + len(PARTITIONS)  # + the reservations
            assert stats.duplicates_skipped == 0
            assert set(stats.lag_ms_by_partition) == set(PARTITIONS)  # sent live
            assert stats.buffer_drops == stats.redis_errors == stats.unexpected_errors == 0

    asyncio.run(main())


def test_publisher_never_blocks_or_raises_while_redis_is_down_then_catches_up(
    database_url: str, tmp_path: Path
) -> None:
    port = closed_port()
    url = f"redis://127.0.0.1:{port}/0"
    limits = PublisherLimits(
        publish_buffer_events_max=20,
        published_lsn_flush_interval_s=0.1,
        catch_up_interval_s=0.2,
        redis_backoff_s_min=0.02,
        redis_backoff_s_max=0.2,
        redis_command_timeout_s=0.5,
    )

    async def main() -> None:
        async with shard_on(database_url) as shard:
            publisher = EventPublisher(url, shard.pool, SHARD, limits)
            durations_s: list[float] = []
            async with running(publisher):
                for _ in range(3):
                    made = await shard.workload(4, publisher, durations_s)
                    assert made > limits.publish_buffer_events_max
                    assert publisher.stats.buffered_events <= limits.publish_buffer_events_max
                    await asyncio.sleep(0.2)
                # Waiting on Redis would take a connect timeout; a log line or a GC pause, not.
                assert max(durations_s) < limits.redis_command_timeout_s / 5
                stats = publisher.stats
                assert stats.buffered_events <= limits.publish_buffer_events_max
                assert stats.buffer_drops > 0 and stats.redis_errors > 0
                assert stats.partitions_needing_catch_up == len(PARTITIONS)
                published = await shard.pool.fetchval("SELECT max(published_lsn) FROM partitions")
                assert published == 0

                with EmbeddedRedis() as server:
                    await asyncio.to_thread(server.start, tmp_path / "redis", port)
                    await shard.workload(1, publisher)  # writes go on while catching up
                    await shard.reserve_and_extend(publisher)
                    await eventually(lambda: converged(url, shard), what="convergence")
                    assert publisher.stats.partitions_needing_catch_up == 0
                    assert publisher.stats.catch_up_records > 0
                    await asyncio.to_thread(server.stop)

    asyncio.run(main())


def test_buffer_holds_publish_buffer_events_max_and_overflow_drops_and_marks(
    database_url: str, fresh_redis_url: str
) -> None:
    limits = PublisherLimits(
        publish_buffer_events_max=6,
        published_lsn_flush_interval_s=0.1,
        catch_up_interval_s=60.0,  # only the overflow may trigger the second catch-up
    )

    async def main() -> None:
        async with shard_on(database_url) as shard:
            publisher = EventPublisher(fresh_redis_url, shard.pool, SHARD, limits)
            batches = []
            for partition in PARTITIONS:
                for sku in ("sku-1", "sku-2"):
                    key = InventoryKey(MERCHANT, sku, location_in(MERCHANT, partition))
                    command = SetStock(key, f"set-{sku}", 3, None, T0_MS)
                    batches.append(await shard.write(partition, command))
            for events in batches:  # exactly at the bound: nothing dropped
                shard.publish(publisher, events)
            assert publisher.stats.buffered_events == 6
            assert publisher.stats.buffer_drops == 0
            key = InventoryKey(MERCHANT, "sku-3", location_in(MERCHANT, PARTITIONS[0]))
            one_more = await shard.write(PARTITIONS[0], SetStock(key, "x", 1, None, T0_MS))
            shard.publish(publisher, one_more)
            assert publisher.stats.buffered_events == 0
            assert publisher.stats.buffer_drops == 7
            assert publisher.stats.partitions_needing_catch_up == len(PARTITIONS)
            async with running(publisher):
                await eventually(lambda: converged(fresh_redis_url, shard), what="convergence")

    asyncio.run(main())


def test_republishing_after_a_crash_adds_no_stream_entries(
    database_url: str, fresh_redis_url: str
) -> None:
    async def main() -> None:
        async with shard_on(database_url) as shard:
            first = EventPublisher(fresh_redis_url, shard.pool, SHARD, FAST)
            async with running(first):
                made = await shard.workload(3, first)
                await eventually(lambda: converged(fresh_redis_url, shard), what="convergence")
            # a crash before published_lsn was written: the next process starts from 0
            await shard.pool.execute("UPDATE partitions SET published_lsn = 0")
            second = EventPublisher(fresh_redis_url, shard.pool, SHARD, FAST)
            async with running(second):
                await eventually(lambda: converged(fresh_redis_url, shard), what="convergence")
            assert second.stats.events_published == 0
            assert second.stats.duplicates_skipped == made

    asyncio.run(main())


def test_partitions_of_another_owner_are_left_to_its_publisher(
    database_url: str, fresh_redis_url: str
) -> None:
    async def main() -> None:
        async with shard_on(database_url, owner="shard-b") as shard:
            await shard.workload(1, None)
            publisher = EventPublisher(fresh_redis_url, shard.pool, SHARD, FAST)
            async with running(publisher):
                await eventually(lambda: _caught_up_once(publisher), what="catch-up")
            client = redis.Redis.from_url(fresh_redis_url)
            try:
                assert await client.dbsize() == 0
            finally:
                await client.aclose()

    asyncio.run(main())


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="publish_buffer_events_max"):
        PublisherLimits(publish_buffer_events_max=0)


async def _caught_up_once(publisher: EventPublisher) -> bool:
    return publisher.stats.catch_ups > 0


def test_a_flush_goes_to_redis_as_one_script_call_and_stamps_as_one_mset(
    database_url: str, tmp_path: Path
) -> None:
    """Counted by a private server (INFO commandstats): every change of one publish() in a
    single EVAL, already encoded; freshness stamps of every partition in one MSET."""
    limits = PublisherLimits(
        published_lsn_flush_interval_s=0.1,
        catch_up_interval_s=60.0,  # the first pass only: nothing else sends
        freshness_interval_s=0.1,
    )

    async def calls(client: redis.Redis) -> dict[str, int]:
        stats = await client.info("commandstats")
        return {c: int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("eval", "mset")}

    async def main() -> None:
        with EmbeddedRedis() as server:
            url = await asyncio.to_thread(server.start, tmp_path / "redis")
            client = redis.Redis.from_url(url)
            try:
                async with shard_on(database_url) as shard:
                    publisher = EventPublisher(url, shard.pool, SHARD, limits)
                    async with running(publisher):
                        await eventually(lambda: _caught_up_once(publisher), what="catch-up")
                        flush = []
                        for partition in PARTITIONS:
                            for sku in ("sku-1", "sku-2"):
                                key = InventoryKey(MERCHANT, sku, location_in(MERCHANT, partition))
                                command = SetStock(key, f"one-{sku}", 5, None, T0_MS)
                                flush += await shard.write(partition, command)
                        before = await calls(client)
                        shard.publish(publisher, flush)
                        await eventually(lambda: converged(url, shard), what="convergence")
                        await asyncio.sleep(0.3)  # a few stamping intervals
                        after = await calls(client)
                    assert publisher.stats.events_published == len(flush) == 6
                    assert after["eval"] - before["eval"] == 1
                    assert after["mset"] - before["mset"] >= 2
                    assert await client.get(asof_key(PARTITIONS[0])) is not None
            finally:
                await client.aclose()
                await asyncio.to_thread(server.stop)

    asyncio.run(main())
