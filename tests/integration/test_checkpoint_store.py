"""Checkpoints written as row versions (migration 0004) against a real PostgreSQL.

What must hold: a checkpoint's rows stay invisible until its short commit; no lock the flush
needs is held while rows are written, and a takeover waits for them; one partition's delta
is written in bounded transactions; after a commit each row keeps one version and a removed
row leaves nothing; a full checkpoint hides and deletes everything older.
"""

from __future__ import annotations

import asyncio
import threading

import asyncpg
import pytest

from inventory_core import Release, limits
from persistence import store as store_module
from persistence.store import FencedOut, PartitionStore

from .test_store import (
    MERCHANT,
    ROWS,
    T0_MS,
    Writer,
    assert_loads_equal,
    key,
    reserve,
    reserve_and_flush,
    run_with_store,
    set_stock,
)

pytestmark = pytest.mark.pg

HOUR_MS = 60 * 60 * 1000


async def versions(pool: asyncpg.Pool, partition: int) -> dict[tuple[str, str], list[int]]:
    """Every stored version lsn of every row of the partition, visible or not."""
    found: dict[tuple[str, str], list[int]] = {}
    for r in await pool.fetch(
        """SELECT table_name, row_key::text AS row_key, checkpoint_lsn FROM partition_rows
            WHERE partition = $1 ORDER BY checkpoint_lsn""",
        partition,
    ):
        found.setdefault((r["table_name"], r["row_key"]), []).append(r["checkpoint_lsn"])
    return found


async def visible_on_hand(pool: asyncpg.Pool, partition: int) -> dict[str, int]:
    rows = await pool.fetch("SELECT sku_id, on_hand FROM stock WHERE partition = $1", partition)
    return {r["sku_id"]: r["on_hand"] for r in rows}


def test_rows_of_a_checkpoint_that_did_not_commit_stay_invisible(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body(pool: asyncpg.Pool, store: PartitionStore) -> None:
        a = await Writer.acquire(store, [3], "a")
        live = a.cores[3]
        await a.run(3, set_stock(key(3, "apple"), 5, "s1"))
        await store.write_checkpoint([live.take_checkpoint()], a.epochs, ROWS)
        await a.run(3, set_stock(key(3, "apple"), 7, "s2"))
        await a.run(3, set_stock(key(3, "pear"), 3, "s3"))

        async def commit_lost(*_: object) -> None:
            raise ConnectionResetError("lost before the commit")

        monkeypatch.setattr(store, "_commit_checkpoint", commit_lost)
        with pytest.raises(ConnectionResetError):
            await store.write_checkpoint([live.take_checkpoint()], a.epochs, ROWS)
        live.checkpoint_failed()

        # Written, but not visible: the checkpoint in force is still the first one.
        stored = await versions(pool, 3)
        (apple_versions,) = [
            v for (table, row_key), v in stored.items() if "apple" in row_key and table == "stock"
        ]
        assert len(apple_versions) == 2 and apple_versions[-1] == live.head_lsn
        assert await visible_on_hand(pool, 3) == {"apple": 5}
        await assert_loads_equal(store, live)

    run_with_store(database_url, body)


def test_after_each_commit_a_row_keeps_one_version_and_a_removed_row_leaves_nothing(
    database_url: str,
) -> None:
    async def body(pool: asyncpg.Pool, store: PartitionStore) -> None:
        a = await Writer.acquire(store, [4], "a")
        live = a.cores[4]
        melon = key(4, "melon")
        t = T0_MS
        for round_ in range(3):
            await a.run(4, set_stock(melon, 10 + round_, f"s{round_}", t + round_))
            await store.write_checkpoint([live.take_checkpoint()], a.epochs, ROWS)
            assert all(len(v) == 1 for v in (await versions(pool, 4)).values())
        held = await reserve_and_flush(a, 4, reserve(melon, 2, "r1", t + 10, ttl_s=30))
        await a.run(4, Release(MERCHANT, "rel1", held.reservation_id, t + 11))
        await store.write_checkpoint([live.take_checkpoint()], a.epochs, ROWS)
        assert any(name == "reservations" for name, _ in await versions(pool, 4))

        # Past retention the reservation and the old answers are forgotten: removals.
        t += limits.idempotency_retention_ms + HOUR_MS
        await a.run(4, set_stock(melon, 20, "s-next-day", t))
        delta = live.take_checkpoint()
        assert delta.tables["reservations"].removals
        await store.write_checkpoint([delta], a.epochs, ROWS)
        stored = await versions(pool, 4)
        assert all(len(v) == 1 for v in stored.values())
        assert not any(held.reservation_id in row_key for _, row_key in stored)
        assert len(stored) == sum(len(rows) for rows in live.snapshot().tables.values())
        await assert_loads_equal(store, live)

    run_with_store(database_url, body)


def test_a_full_checkpoint_hides_then_deletes_every_older_version(database_url: str) -> None:
    async def body(pool: asyncpg.Pool, store: PartitionStore) -> None:
        a = await Writer.acquire(store, [5], "a")
        live = a.cores[5]
        for index in range(30):
            await a.run(5, set_stock(key(5, f"sku-{index}"), index, f"s{index}"))
        await store.write_checkpoint([live.take_checkpoint()], a.epochs, ROWS)
        t = T0_MS + limits.idempotency_retention_ms + HOUR_MS
        await a.run(5, set_stock(key(5, "sku-0"), 99, "s-late", t))
        live.take_checkpoint()
        live.checkpoint_failed()  # that delta was lost: the next one is full
        full = live.take_checkpoint()
        assert full.full
        await store.write_checkpoint([full], a.epochs, rows_per_transaction=7)
        base, lsn = await pool.fetchrow(
            "SELECT checkpoint_base_lsn, checkpoint_lsn FROM partitions WHERE partition = 5"
        )
        assert base == lsn == live.head_lsn
        stored = await versions(pool, 5)
        assert {v for vs in stored.values() for v in vs} == {lsn}
        assert len(stored) == full.row_count
        await assert_loads_equal(store, live)

    run_with_store(database_url, body)


def test_one_partitions_delta_is_written_in_bounded_transactions(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body(pool: asyncpg.Pool, store: PartitionStore) -> None:
        a = await Writer.acquire(store, [6], "a")
        live = a.cores[6]
        records = []
        for index in range(250):
            records += a.apply(6, set_stock(key(6, f"sku-{index}"), 1, f"s{index}"))
        await a.flush(records)
        delta = live.take_checkpoint()
        # Per command: a stock row, an answer, and the key's history (a count, for the feeds).
        assert delta.row_count == 750

        written: list[int] = []
        write_rows = store._write_rows

        async def counted(
            partitions: list[int], columns: list[list[object]], epochs: object
        ) -> None:
            written.append(len(columns[0]))
            await write_rows(partitions, columns, epochs)  # type: ignore[arg-type]

        monkeypatch.setattr(store, "_write_rows", counted)
        await store.write_checkpoint([delta], a.epochs, rows_per_transaction=120)
        assert written == [120, 120, 120, 120, 120, 120, 30]
        await assert_loads_equal(store, live)

    run_with_store(database_url, body)


def test_a_checkpoint_encodes_nothing_on_the_event_loop(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows and the prune's keys are JSON-encoded in a worker thread: encoding a large
    delta on the loop held every reply of the shard for hundreds of ms at 1M keys."""

    async def body(pool: asyncpg.Pool, store: PartitionStore) -> None:
        a = await Writer.acquire(store, [6], "a")
        records = []
        for index in range(50):
            records += a.apply(6, set_stock(key(6, f"sku-{index}"), 1, f"s{index}"))
        await a.flush(records)
        first = a.cores[6].take_checkpoint()  # full: pruned below its base, not by key
        await store.write_checkpoint([first], a.epochs, rows_per_transaction=1000)
        await a.flush(a.apply(6, set_stock(key(6, "sku-1"), 2, "again")))
        delta = a.cores[6].take_checkpoint()
        assert not delta.full and delta.row_count == 3  # its row, its answer, its history

        loop_thread = threading.get_ident()
        on_loop: list[object] = []
        encode = store_module._json

        def watched(data: object) -> str:
            if threading.get_ident() == loop_thread:
                on_loop.append(data)
            return encode(data)

        monkeypatch.setattr(store_module, "_json", watched)
        await store.write_checkpoint([delta], a.epochs, rows_per_transaction=1000)
        assert on_loop == []
        await assert_loads_equal(store, a.cores[6])

    run_with_store(database_url, body)


async def _waiting_on_a_lock(pool: asyncpg.Pool, application_name: str) -> bool:
    waiting = await pool.fetchval(
        """SELECT count(*) FROM pg_stat_activity
            WHERE application_name = $1 AND wait_event_type = 'Lock'""",
        application_name,
    )
    return bool(waiting)


def test_rows_being_written_block_a_takeover_but_never_a_flush(database_url: str) -> None:
    """A checkpoint transaction caught mid-way (its row writes hold FOR KEY SHARE): the
    owner's flush and checkpoint commit go through; a takeover waits until it ends."""

    async def body(pool: asyncpg.Pool, store: PartitionStore) -> None:
        a = await Writer.acquire(store, [2], "a")
        await a.run(2, set_stock(key(2, "rice"), 5, "s1"))
        writing = await asyncpg.connect(database_url)
        taker_pool = await asyncpg.create_pool(
            database_url, min_size=1, max_size=1, server_settings={"application_name": "taker"}
        )
        try:
            transaction = writing.transaction()
            await transaction.start()
            held = await writing.fetchval(
                f"{store_module._EPOCH_HELD} SELECT count(*) FROM held", [2], [a.epochs[2]]
            )
            assert held == 1

            await asyncio.wait_for(a.run(2, set_stock(key(2, "rice"), 6, "s2")), 10)
            await asyncio.wait_for(
                store.write_checkpoint([a.cores[2].take_checkpoint()], a.epochs, ROWS), 10
            )

            taker = PartitionStore(taker_pool)
            takeover = asyncio.create_task(taker.acquire([2], "b"))
            for _ in range(200):
                if await _waiting_on_a_lock(pool, "taker"):
                    break
                await asyncio.sleep(0.05)
            assert await _waiting_on_a_lock(pool, "taker")
            assert not takeover.done()
            await transaction.rollback()
            (owned,) = await asyncio.wait_for(takeover, 10)
            assert owned.epoch == a.epochs[2] + 1
        finally:
            await writing.close()
            await taker_pool.close()

        # The deposed owner's rows never land, not even invisibly.
        a.apply(2, set_stock(key(2, "rice"), 7, "s3"))
        before = await versions(pool, 2)
        with pytest.raises(FencedOut):
            await store.write_checkpoint([a.cores[2].take_checkpoint()], a.epochs, ROWS)
        assert await versions(pool, 2) == before

    run_with_store(database_url, body)
