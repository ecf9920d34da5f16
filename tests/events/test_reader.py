"""EventReader: snapshots of the read view, stream positions, XREAD and XRANGE."""

from __future__ import annotations

import time

import pytest
import redis.asyncio as redis

from inventory_core import PARTITION_COUNT, InventoryKey, partition_of
from persistence.readview import (
    EMPTY_STREAM_ID,
    EventReader,
    ReaderLimits,
    SnapshotTooLarge,
    level_key,
    stream_key,
)

from ._support import apply, change, location_in, run

MERCHANT = "m-reader"


def keys() -> list[InventoryKey]:
    return [
        InventoryKey(MERCHANT, sku, location)
        for location in ("loc-a", "loc-b")
        for sku in ("sku-1", "sku-2", "sku-3")
    ]


async def seed(url: str) -> None:
    await apply(url, [(change(k, 1, 1, on_hand=i), 0) for i, k in enumerate(keys())])
    await apply(url, [(change(keys()[0], 2, 2, on_hand=7, reserved=2, safety_stock=9), 0)])


def test_snapshot_returns_matching_levels_with_partition_and_lsn(fresh_redis_url: str) -> None:
    async def main() -> None:
        await seed(fresh_redis_url)
        await apply(fresh_redis_url, [(change(InventoryKey("other", "sku-1", "loc-a"), 1, 1), 0)])
        reader = EventReader(fresh_redis_url)
        try:
            everything = await reader.snapshot(MERCHANT)
            located = await reader.snapshot(MERCHANT, ["loc-b"])
            narrowed = await reader.snapshot(MERCHANT, ["loc-a"], ["sku-1", "sku-3"])
            unknown = await reader.snapshot("nobody")
        finally:
            await reader.close()
        assert [(lv.key.location_id, lv.key.sku_id) for lv, _, _ in everything] == [
            (k.location_id, k.sku_id) for k in keys()
        ]
        first, partition, lsn = everything[0]
        assert (first.on_hand, first.reserved, first.safety_stock) == (7, 2, 9)
        assert (first.available, first.sellable, first.version, first.exists) == (-4, 0, 2, True)
        assert (partition, lsn) == (partition_of(MERCHANT, "loc-a"), 2)
        assert {lv.key.location_id for lv, _, _ in located} == {"loc-b"}
        assert [lv.key.sku_id for lv, _, _ in narrowed] == ["sku-1", "sku-3"]
        assert unknown == []

    run(main)


def test_a_stale_location_s_levels_are_degraded_and_incoming_shown_in_the_read_view(
    fresh_redis_url: str,
) -> None:
    stale_since_ms = 1_780_000_000_000
    stale = change(
        keys()[0], 1, 1, on_hand=10, reserved=2, stale=(5, stale_since_ms), incoming=(24, 99)
    )

    async def main() -> None:
        await apply(fresh_redis_url, [(stale, 0), (change(keys()[1], 1, 1, on_hand=4), 1)])
        reader = EventReader(fresh_redis_url)
        try:
            found = await reader.snapshot(MERCHANT, ["loc-a"], ["sku-1", "sku-2"])
        finally:
            await reader.close()
        (degraded, _, _), (live, _, _) = found
        assert (degraded.available, degraded.sellable, degraded.degraded) == (8, 3, True)
        assert (degraded.stale_buffer, degraded.stale_since_ms) == (5, stale_since_ms)
        assert (degraded.incoming, degraded.incoming_eta_ms) == (24, 99)
        assert (live.available, live.sellable, live.degraded, live.stale_buffer) == (4, 4, False, 0)

    run(main)


def test_snapshot_beyond_snapshot_keys_max_is_refused(fresh_redis_url: str) -> None:
    async def main() -> None:
        await seed(fresh_redis_url)
        reader = EventReader(fresh_redis_url, ReaderLimits(snapshot_keys_max=5))
        try:
            with pytest.raises(SnapshotTooLarge):
                await reader.snapshot(MERCHANT)
            assert len(await reader.snapshot(MERCHANT, ["loc-a"])) == 3
        finally:
            await reader.close()

    run(main)


def test_snapshot_skips_an_indexed_key_whose_level_is_gone(fresh_redis_url: str) -> None:
    async def main() -> None:
        await seed(fresh_redis_url)
        gone = keys()[1]
        client = redis.Redis.from_url(fresh_redis_url)
        await client.delete(level_key(MERCHANT, gone.location_id, gone.sku_id))
        await client.aclose()
        reader = EventReader(fresh_redis_url)
        try:
            levels = await reader.snapshot(MERCHANT)
            found = await reader.levels([keys()[0], gone])
        finally:
            await reader.close()
        assert len(levels) == 5
        assert found[1] is None
        assert found[0] is not None and found[0][0].version == 2

    run(main)


def test_last_and_first_ids_cover_every_partition_or_the_ones_asked(fresh_redis_url: str) -> None:
    key = InventoryKey(MERCHANT, "sku-1", location_in(MERCHANT, 7))

    async def main() -> None:
        reader = EventReader(fresh_redis_url)
        try:
            assert await reader.last_ids() == dict.fromkeys(range(PARTITION_COUNT), "0-0")
            for start in range(1, 401, 100):
                await apply(
                    fresh_redis_url,
                    [(change(key, v, v), 0) for v in range(start, start + 100)],
                    cap=100,
                )
            last, first = await reader.last_ids(), await reader.first_ids()
            some_last, some_first = await reader.last_ids([9, 7]), await reader.first_ids([7])
            none = await reader.last_ids([])
        finally:
            await reader.close()
        assert some_last == {9: "0-0", 7: "400-0"} and list(some_last) == [9, 7]
        assert some_first == {7: first[7]} and none == {}
        assert last[7] == "400-0"
        assert first[7] != EMPTY_STREAM_ID and first[7] != "1-0", "trimmed: oldest moved on"
        assert {p for p, i in last.items() if i != EMPTY_STREAM_ID} == {7}
        assert {p for p, i in first.items() if i != EMPTY_STREAM_ID} == {7}

    run(main)


def test_read_returns_changes_after_positions_and_waits_at_most_block_ms(
    fresh_redis_url: str,
) -> None:
    a = InventoryKey(MERCHANT, "sku-1", location_in(MERCHANT, 3))
    b = InventoryKey(MERCHANT, "sku-1", location_in(MERCHANT, 9))

    async def main() -> None:
        await apply(fresh_redis_url, [(change(a, v, v), 0) for v in (1, 2, 3)])
        await apply(fresh_redis_url, [(change(b, 1, 5), 0)])
        reader = EventReader(fresh_redis_url)
        try:
            read = await reader.read({3: "1-0", 9: "0-0"}, block_ms=100, count=10)
            started = time.monotonic()
            idle = await reader.read({3: "3-0", 9: "5-0"}, block_ms=200, count=10)
            waited_s = time.monotonic() - started
            nonblocking = await reader.read({3: "3-0"}, block_ms=0, count=10)
            limited = await reader.read({3: "0-0"}, block_ms=0, count=2)
            ranged = await reader.range(3, "1-0", "3-0", count=10)
            nothing = await reader.read({}, block_ms=100, count=10)
        finally:
            await reader.close()
        assert [(p, i, c.version) for p, i, c in read] == [
            (3, "2-0", 2),
            (3, "3-0", 3),
            (9, "5-0", 1),
        ]
        assert read[0][2].key.sku_id == "sku-1" and read[0][2].partition == 3
        assert idle == [] and 0.15 <= waited_s < 2.0
        assert nonblocking == [] and nothing == []
        assert [i for _, i, _ in limited] == ["1-0", "2-0"]
        assert [i for _, i, _ in ranged] == ["2-0", "3-0"]

    run(main)


def test_stream_keys_use_four_digit_partitions() -> None:
    assert stream_key(7) == "inv:events:0007"
    assert level_key("m", "l", "s") == "inv:level:m|l|s"
