"""PartitionStore against a real PostgreSQL: migrations, the fenced ledger, checkpoints, load.

Every test gets a fresh database (``database_url``), migrated and holding 8 partition rows.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import asyncpg
import pytest

from inventory_core import (
    AdjustmentReason,
    AdjustStock,
    ClientCommand,
    Commit,
    Extend,
    InventoryKey,
    Line,
    Partition,
    Record,
    Release,
    Reservation,
    ReservationState,
    Reserve,
    Reserved,
    SetSafetyStock,
    SetStock,
    is_accepted,
    limits,
    partition_of,
)
from persistence.ledger import MSGPACK
from persistence.migrate import ensure_partitions, migrate, migrations
from persistence.store import FencedOut, PartitionStore

pytestmark = pytest.mark.pg

PARTITIONS = 8
# Rows per checkpoint transaction: small, so that every checkpoint here spans several.
ROWS = 3
MERCHANT = "m1"
T0_MS = 1_700_000_000_000
HOUR_MS = 60 * 60 * 1000


def location_in(partition: int) -> str:
    """A location of MERCHANT whose keys hash to ``partition`` (of PARTITIONS)."""
    for index in range(10_000):
        location = f"loc-{index}"
        if partition_of(MERCHANT, location, PARTITIONS) == partition:
            return location
    raise AssertionError(f"no location in partition {partition}")


def key(partition: int, sku: str) -> InventoryKey:
    return InventoryKey(MERCHANT, sku, location_in(partition))


@contextlib.asynccontextmanager
async def opened(database_url: str) -> AsyncIterator[tuple[asyncpg.Pool, PartitionStore]]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    try:
        async with pool.acquire() as connection:
            await migrate(connection)
            await ensure_partitions(connection, PARTITIONS)
        yield pool, PartitionStore(pool)
    finally:
        await pool.close()


def run_with_store(
    database_url: str, body: Callable[[asyncpg.Pool, PartitionStore], Awaitable[None]]
) -> None:
    async def main() -> None:
        async with opened(database_url) as (pool, store):
            await body(pool, store)

    asyncio.run(main())


@dataclass
class Writer:
    """One owner of some partitions: applies commands in memory and flushes them."""

    store: PartitionStore
    epochs: dict[int, int]
    cores: dict[int, Partition] = field(default_factory=dict)
    flushed: dict[int, int] = field(default_factory=dict)

    @classmethod
    async def acquire(cls, store: PartitionStore, partitions: Sequence[int], name: str) -> Writer:
        owned = await store.acquire(partitions, name)
        writer = cls(store, {o.partition: o.epoch for o in owned})
        for partition, core in (await store.load(partitions)).items():
            writer.cores[partition] = core
            writer.flushed[partition] = core.head_lsn
        return writer

    def apply(self, partition: int, command: ClientCommand) -> list[Record]:
        step = self.cores[partition].apply(command)
        assert is_accepted(step.outcome), step.outcome
        return list(step.records)

    async def flush(self, records: Sequence[Record]) -> None:
        touched = {r.partition for r in records}
        fenced = await self.store.flush(
            records,
            {p: self.epochs[p] for p in touched},
            {p: self.flushed[p] for p in touched},
        )
        if fenced:  # nothing was written: the tests see it as the owner would
            raise FencedOut(fenced)
        for partition in touched:
            self.flushed[partition] = self.cores[partition].head_lsn

    async def run(self, partition: int, command: ClientCommand) -> list[Record]:
        records = self.apply(partition, command)
        await self.flush(records)
        return records


def set_stock(k: InventoryKey, on_hand: int, idem: str, now_ms: int = T0_MS) -> SetStock:
    return SetStock(k, idem, on_hand, None, now_ms)


async def head_of(pool: asyncpg.Pool, partition: int) -> int:
    head = await pool.fetchval("SELECT head_lsn FROM partitions WHERE partition = $1", partition)
    return int(head)


async def ledger_count(pool: asyncpg.Pool, partition: int) -> int:
    count = await pool.fetchval(
        "SELECT coalesce(sum(last_lsn - first_lsn + 1), 0) FROM ledger_batches"
        " WHERE partition = $1",
        partition,
    )
    return int(count)


async def checkpoint_rows(pool: asyncpg.Pool, partition: int) -> tuple[object, ...]:
    """Everything a checkpoint of ``partition`` wrote, comparable."""
    return (
        await pool.fetchval(
            "SELECT checkpoint_lsn FROM partitions WHERE partition = $1", partition
        ),
        [
            tuple(r)
            for r in await pool.fetch(
                "SELECT * FROM stock WHERE partition = $1 ORDER BY sku_id", partition
            )
        ],
        [
            (r["reservation_id"], r["body"])
            for r in await pool.fetch(
                "SELECT reservation_id, body::text AS body FROM reservations"
                " WHERE partition = $1 ORDER BY reservation_id",
                partition,
            )
        ],
        [
            (r["idempotency_key"], r["body"])
            for r in await pool.fetch(
                "SELECT idempotency_key, body::text AS body FROM idempotency"
                " WHERE partition = $1 ORDER BY idempotency_key",
                partition,
            )
        ],
    )


async def assert_loads_equal(store: PartitionStore, live: Partition) -> Partition:
    loaded = (await store.load([live.partition]))[live.partition]
    assert loaded.snapshot() == live.snapshot()
    assert loaded.next_expiry_ms() == live.next_expiry_ms()
    loaded.check_invariants()
    return loaded


# ----------------------------------------------------------------------------- migrations


def test_migrations_apply_once_and_record_their_versions(database_url: str) -> None:
    async def main() -> None:
        connection = await asyncpg.connect(database_url)
        try:
            expected = [m.version for m in migrations()]
            assert await migrate(connection) == expected
            assert await migrate(connection) == []
            recorded = await connection.fetch(
                "SELECT version, name FROM schema_migrations ORDER BY version"
            )
            assert [(r["version"], r["name"]) for r in recorded] == [
                (m.version, m.name) for m in migrations()
            ]
            await ensure_partitions(connection, PARTITIONS)
            await ensure_partitions(connection, PARTITIONS)
            rows = await connection.fetch("SELECT * FROM partitions ORDER BY partition")
            assert [r["partition"] for r in rows] == list(range(PARTITIONS))
            assert {(r["epoch"], r["head_lsn"], r["checkpoint_lsn"]) for r in rows} == {(0, 0, 0)}
        finally:
            await connection.close()

    asyncio.run(main())


def test_concurrent_migrators_apply_each_migration_once(database_url: str) -> None:
    async def one() -> list[int]:
        connection = await asyncpg.connect(database_url)
        try:
            return await migrate(connection)
        finally:
            await connection.close()

    async def main() -> None:
        results = await asyncio.gather(*(one() for _ in range(4)))
        applied = sorted(v for result in results for v in result)
        assert applied == [m.version for m in migrations()]

    asyncio.run(main())


# ---------------------------------------------------------------------------------- flush


def test_flush_appends_records_and_advances_head(database_url: str) -> None:
    async def body(pool: asyncpg.Pool, store: PartitionStore) -> None:
        a = await Writer.acquire(store, [3], "a")
        k = key(3, "apple")
        first = a.apply(3, set_stock(k, 10, "s1")) + a.apply(
            3, AdjustStock(k, "adj1", 5, AdjustmentReason.RECEIPT, T0_MS - 5, T0_MS)
        )
        await a.flush(first)
        assert await head_of(pool, 3) == 2
        second = await a.run(3, SetSafetyStock(k, "ss1", 1, 2, T0_MS + 1))
        assert await head_of(pool, 3) == 3

        stored = await store.ledger(3)
        assert [row.record for row in stored] == first + second
        assert {row.epoch for row in stored} == {a.epochs[3]}
        assert [row.record for row in await store.ledger(3, after_lsn=2)] == second
        # One row per partition per flush, both blobs in the binary format (migration 0005).
        rows = await pool.fetch(
            "SELECT first_lsn, last_lsn, epoch, get_byte(records, 0) AS records,"
            " get_byte(changes, 0) AS changes, recorded_at"
            " FROM ledger_batches WHERE partition = 3 ORDER BY last_lsn"
        )
        assert [tuple(r)[:5] for r in rows] == [
            (1, 2, a.epochs[3], MSGPACK, MSGPACK),
            (3, 3, a.epochs[3], MSGPACK, MSGPACK),
        ]
        assert [round(r["recorded_at"].timestamp() * 1000) for r in rows] == [T0_MS, T0_MS + 1]
        await assert_loads_equal(store, a.cores[3])

    run_with_store(database_url, body)


def test_flush_spanning_two_partitions_commits_both_or_neither(database_url: str) -> None:
    async def body(pool: asyncpg.Pool, store: PartitionStore) -> None:
        a = await Writer.acquire(store, [2, 3], "a")
        batch = a.apply(2, set_stock(key(2, "pear"), 4, "s2")) + a.apply(
            3, set_stock(key(3, "plum"), 6, "s3")
        )
        await a.flush(batch)
        assert (await head_of(pool, 2), await head_of(pool, 3)) == (1, 1)

        # Make partition 3's insert fail (lsn 2 already taken) after partition 2's rows went in.
        await pool.execute(
            "INSERT INTO ledger_batches"
            " (partition, last_lsn, first_lsn, epoch, recorded_at, records, changes)"
            " VALUES (3, 2, 2, 0, now(), '\\x01', '\\x01')"
        )
        failing = a.apply(2, set_stock(key(2, "pear"), 5, "s2b")) + a.apply(
            3, set_stock(key(3, "plum"), 7, "s3b")
        )
        with pytest.raises(asyncpg.UniqueViolationError):
            await a.flush(failing)
        assert (await head_of(pool, 2), await head_of(pool, 3)) == (1, 1)
        assert await ledger_count(pool, 2) == 1

    run_with_store(database_url, body)


def test_flush_refuses_records_that_do_not_follow_the_flushed_head(database_url: str) -> None:
    async def body(pool: asyncpg.Pool, store: PartitionStore) -> None:
        a = await Writer.acquire(store, [3], "a")
        records = a.apply(3, set_stock(key(3, "fig"), 1, "s1"))
        with pytest.raises(AssertionError):
            await store.flush(records, a.epochs, {3: 5})
        assert await ledger_count(pool, 3) == 0

    run_with_store(database_url, body)


# -------------------------------------------------------------------------------- fencing


def test_deposed_owner_flush_is_fenced_and_writes_nothing(database_url: str) -> None:
    async def body(pool: asyncpg.Pool, store: PartitionStore) -> None:
        a = await Writer.acquire(store, [3], "a")
        await a.run(3, set_stock(key(3, "kiwi"), 9, "s1"))
        durable = a.cores[3].snapshot()
        b = await Writer.acquire(store, [3], "b")
        assert b.epochs[3] == a.epochs[3] + 1
        assert (await store.owners())[3] == ("b", b.epochs[3])
        assert (await store.epochs([3])) == {3: b.epochs[3]}

        with pytest.raises(FencedOut) as fenced:
            await a.run(3, set_stock(key(3, "kiwi"), 8, "s2"))
        assert fenced.value.partitions == (3,)
        assert await head_of(pool, 3) == 1
        assert await ledger_count(pool, 3) == 1
        assert b.cores[3].snapshot() == durable
        # The new owner carries on from the durable head.
        await b.run(3, set_stock(key(3, "kiwi"), 7, "s3"))
        assert await head_of(pool, 3) == 2
        assert {row.epoch for row in await store.ledger(3, after_lsn=1)} == {b.epochs[3]}

    run_with_store(database_url, body)


def test_fenced_partition_rolls_back_whole_batch_including_partitions_still_owned(
    database_url: str,
) -> None:
    async def body(pool: asyncpg.Pool, store: PartitionStore) -> None:
        a = await Writer.acquire(store, [2, 3, 5], "a")
        await a.flush(
            a.apply(2, set_stock(key(2, "a"), 1, "s1"))
            + a.apply(3, set_stock(key(3, "b"), 1, "s2"))
        )
        await Writer.acquire(store, [3], "b")
        batch = (
            a.apply(2, set_stock(key(2, "a"), 2, "s3"))
            + a.apply(3, set_stock(key(3, "b"), 2, "s4"))
            + a.apply(5, set_stock(key(5, "c"), 2, "s5"))
        )
        with pytest.raises(FencedOut) as fenced:
            await a.flush(batch)
        assert fenced.value.partitions == (3,)
        assert [await head_of(pool, p) for p in (2, 3, 5)] == [1, 1, 0]
        assert [await ledger_count(pool, p) for p in (2, 3, 5)] == [1, 1, 0]

    run_with_store(database_url, body)


def test_flush_from_a_head_other_than_the_stored_one_is_fenced(database_url: str) -> None:
    """The guard against a flush whose outcome the owner lost (or misremembers)."""

    async def body(pool: asyncpg.Pool, store: PartitionStore) -> None:
        a = await Writer.acquire(store, [3], "a")
        k = key(3, "lime")
        await a.run(3, set_stock(k, 1, "s1"))
        # An "unknown outcome" flush that did commit: head is now 2, the owner believes 1.
        lost = a.apply(3, set_stock(k, 2, "s2"))
        assert await store.flush(lost, a.epochs, {3: 1}) == ()
        assert await head_of(pool, 3) == 2
        stale = Partition(3, 1)
        retry = list(stale.apply(set_stock(k, 3, "s3")).records)
        assert await store.flush(retry, a.epochs, {3: 1}) == (3,)

        # A flush that did not commit: the owner moved its head on, the store did not.
        ahead = Partition(3, 5)
        records = list(ahead.apply(set_stock(k, 4, "s4")).records)
        assert await store.flush(records, a.epochs, {3: 5}) == (3,)
        assert await head_of(pool, 3) == 2
        assert [row.lsn for row in await store.ledger(3)] == [1, 2]

    run_with_store(database_url, body)


# ---------------------------------------------------------------------------- checkpoints


def reserve(k: InventoryKey, quantity: int, idem: str, now_ms: int, ttl_s: int = 60) -> Reserve:
    return Reserve(MERCHANT, idem, (Line(k, quantity),), ttl_s, now_ms)


def states(core: Partition) -> dict[ReservationState, int]:
    counts: dict[ReservationState, int] = {}
    for reservation in core.snapshot().reservations.values():
        counts[reservation.state] = counts.get(reservation.state, 0) + 1
    return counts


async def reserve_and_flush(writer: Writer, partition: int, command: Reserve) -> Reservation:
    step = writer.cores[partition].apply(command)
    assert isinstance(step.outcome, Reserved), step.outcome
    await writer.flush(list(step.records))
    return step.outcome.reservation


def test_checkpoint_then_ledger_tail_loads_equal_to_live(database_url: str) -> None:
    async def body(pool: asyncpg.Pool, store: PartitionStore) -> None:
        a = await Writer.acquire(store, [3], "a")
        live = a.cores[3]
        apple, pear = key(3, "apple"), key(3, "pear")
        t = T0_MS
        await a.flush(
            a.apply(3, set_stock(apple, 20, "s-apple", t))
            + a.apply(3, set_stock(pear, 10, "s-pear", t))
            + a.apply(3, SetSafetyStock(apple, "ss-apple", 1, None, t))
        )
        held = await reserve_and_flush(a, 3, reserve(apple, 2, "r-held", t + 1, ttl_s=3600))
        await a.run(3, Extend(MERCHANT, "x-held", held.reservation_id, 7200, t + 2))
        to_commit = await reserve_and_flush(
            a,
            3,
            Reserve(MERCHANT, "r-commit", (Line(apple, 3), Line(pear, 2)), 60, t + 3),
        )
        await a.run(
            3, Commit(MERCHANT, "c-commit", to_commit.reservation_id, (Line(apple, 2),), t + 4)
        )
        to_expire = await reserve_and_flush(a, 3, reserve(pear, 4, "r-expire", t + 5, ttl_s=30))
        released = await reserve_and_flush(a, 3, reserve(pear, 1, "r-release", t + 6))
        await a.run(3, Release(MERCHANT, "rel", released.reservation_id, t + 7))

        # First checkpoint: loaded from the store, so a delta since lsn 0, at the head.
        first = live.take_checkpoint()
        assert first.lsn == live.head_lsn
        await store.write_checkpoint([first], a.epochs, ROWS)
        await assert_loads_equal(store, live)

        # More work after the checkpoint: the tail, including an expiry by time.
        t += 31_000
        await a.run(3, AdjustStock(pear, "adj-pear", 5, AdjustmentReason.RECEIPT, t - 10, t))
        assert states(live) == {
            ReservationState.ACTIVE: 1,
            ReservationState.COMMITTED: 1,
            ReservationState.EXPIRED: 1,
            ReservationState.RELEASED: 1,
        }
        assert to_expire.reservation_id in live.snapshot().reservations
        await reserve_and_flush(a, 3, reserve(apple, 1, "r-late", t + 1))
        assert (
            await pool.fetchval("SELECT checkpoint_lsn FROM partitions WHERE partition = 3")
        ) == (first.lsn)
        assert await head_of(pool, 3) > first.lsn
        await assert_loads_equal(store, live)

        # An incremental checkpoint of that tail.
        second = live.take_checkpoint()
        assert not second.full and second.lsn == live.head_lsn
        await store.write_checkpoint([second], a.epochs, ROWS)
        await assert_loads_equal(store, live)

        # Past the 24 h retention: old idempotency keys and finished reservations are
        # forgotten, and the incremental delta carries the removals.
        t += limits.idempotency_retention_ms + HOUR_MS
        await a.run(3, set_stock(apple, 30, "s-apple-next-day", t))
        third = live.take_checkpoint()
        assert not third.full
        assert third.tables["idempotency"].removals and third.tables["reservations"].removals
        await store.write_checkpoint([third], a.epochs, ROWS)
        loaded = await assert_loads_equal(store, live)
        assert await pool.fetchval("SELECT count(*) FROM idempotency WHERE partition = 3") == len(
            live.snapshot().idempotency
        )
        assert await pool.fetchval("SELECT count(*) FROM reservations WHERE partition = 3") == len(
            live.snapshot().reservations
        )

        # The loaded partition decides the next command as the live one does.
        follow = reserve(apple, 4, "r-follow", t + 1)
        assert loaded.apply(follow).outcome == live.apply(follow).outcome

    run_with_store(database_url, body)


def test_full_checkpoint_after_a_lost_delta_loads_equal_to_live(database_url: str) -> None:
    async def body(pool: asyncpg.Pool, store: PartitionStore) -> None:
        a = await Writer.acquire(store, [4], "a")
        live = a.cores[4]
        melon = key(4, "melon")
        t = T0_MS
        await a.run(4, set_stock(melon, 10, "s1", t))
        gone = await reserve_and_flush(a, 4, reserve(melon, 2, "r1", t + 1, ttl_s=30))
        await a.run(4, Release(MERCHANT, "rel1", gone.reservation_id, t + 2))
        await store.write_checkpoint([live.take_checkpoint()], a.epochs, ROWS)

        # The next delta (holding removals past retention) is lost...
        t += limits.idempotency_retention_ms + HOUR_MS
        await reserve_and_flush(a, 4, reserve(melon, 3, "r2", t))
        lost = live.take_checkpoint()
        assert lost.tables["idempotency"].removals and lost.tables["reservations"].removals
        live.checkpoint_failed()
        # ...so the next one is full, and must delete what the lost delta would have.
        await a.run(4, set_stock(melon, 12, "s2", t + 1))
        full = live.take_checkpoint()
        assert full.full and full.lsn == live.head_lsn
        await store.write_checkpoint([full], a.epochs, ROWS)
        await assert_loads_equal(store, live)
        rows = await pool.fetch("SELECT reservation_id FROM reservations WHERE partition = 4")
        assert {r["reservation_id"] for r in rows} == set(live.snapshot().reservations)

    run_with_store(database_url, body)


def test_checkpoint_of_two_partitions_loads_each_equal(database_url: str) -> None:
    async def body(pool: asyncpg.Pool, store: PartitionStore) -> None:
        a = await Writer.acquire(store, [1, 6], "a")
        for partition in (1, 6):
            await a.run(partition, set_stock(key(partition, "egg"), 12, f"s{partition}"))
            await reserve_and_flush(
                a, partition, reserve(key(partition, "egg"), 2, f"r{partition}", T0_MS)
            )
        await store.write_checkpoint([a.cores[p].take_checkpoint() for p in (1, 6)], a.epochs, ROWS)
        loaded = await store.load([1, 6])
        assert {p: c.snapshot() for p, c in loaded.items()} == {
            p: a.cores[p].snapshot() for p in (1, 6)
        }

    run_with_store(database_url, body)


def test_deposed_owner_checkpoint_is_fenced_and_changes_nothing(database_url: str) -> None:
    async def body(pool: asyncpg.Pool, store: PartitionStore) -> None:
        a = await Writer.acquire(store, [2, 3], "a")
        for partition in (2, 3):
            await a.run(partition, set_stock(key(partition, "rice"), 5, f"s{partition}"))
        await store.write_checkpoint([a.cores[p].take_checkpoint() for p in (2, 3)], a.epochs, ROWS)
        for partition in (2, 3):
            await reserve_and_flush(
                a, partition, reserve(key(partition, "rice"), 1, f"r{partition}", T0_MS + 1)
            )
        before = {p: await checkpoint_rows(pool, p) for p in (2, 3)}
        await Writer.acquire(store, [3], "b")

        deltas = [a.cores[p].take_checkpoint() for p in (2, 3)]
        with pytest.raises(FencedOut) as fenced:
            await store.write_checkpoint(deltas, a.epochs, ROWS)
        assert fenced.value.partitions == (3,)
        assert {p: await checkpoint_rows(pool, p) for p in (2, 3)} == before

        # A full delta deletes before it writes: a fenced one must not delete either.
        for partition in (2, 3):
            a.cores[partition].checkpoint_failed()
        full = [a.cores[p].take_checkpoint() for p in (2, 3)]
        assert all(d.full for d in full)
        with pytest.raises(FencedOut):
            await store.write_checkpoint(full, a.epochs, ROWS)
        assert {p: await checkpoint_rows(pool, p) for p in (2, 3)} == before

    run_with_store(database_url, body)


def test_loaded_partition_forgets_the_same_finished_reservations_as_live(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "reservations_finished_max", 2)

    async def body(pool: asyncpg.Pool, store: PartitionStore) -> None:
        a = await Writer.acquire(store, [3], "a")
        live = a.cores[3]
        apple = key(3, "apple")
        t = T0_MS
        await a.run(3, set_stock(apple, 100, "s1", t))
        older = await reserve_and_flush(a, 3, reserve(apple, 1, "r-older", t))
        newer = await reserve_and_flush(a, 3, reserve(apple, 1, "r-newer", t))
        # One owner batch stamps one now_ms: the newer reservation finishes first.
        await a.flush(
            a.apply(3, Release(MERCHANT, "rel-newer", newer.reservation_id, t + 1))
            + a.apply(3, Release(MERCHANT, "rel-older", older.reservation_id, t + 1))
        )
        await store.write_checkpoint([live.take_checkpoint()], a.epochs, ROWS)
        loaded = await assert_loads_equal(store, live)

        # A third finished reservation goes past the cap: each evicts its oldest finished one.
        for core in (live, loaded):
            step = core.apply(reserve(apple, 1, "r-third", t + 2))
            assert isinstance(step.outcome, Reserved)
            third = step.outcome.reservation.reservation_id
            core.apply(Release(MERCHANT, "rel-third", third, t + 3))
        assert set(loaded.snapshot().reservations) == set(live.snapshot().reservations)

    run_with_store(database_url, body)
