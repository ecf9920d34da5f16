"""The apply script: the read view only moves forward, the stream refuses duplicates.

The hypothesis test is the issue's required one: any permutation with duplicates of one
key's changes (versions 1..n), in any batch split, ends at version n with n's counts.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as redis
from hypothesis import given, settings
from hypothesis import strategies as st

from inventory_core import InventoryKey, partition_of
from persistence.readview import index_key, level_key, stream_key

from ._support import T0_MS, apply, change, run, stream_ids

KEY = InventoryKey("m-hypothesis", "sku-1", "loc-1")
PARTITION = partition_of(KEY.merchant_id, KEY.location_id)


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[int, list[int], list[int], list[tuple[int, int, int]]]:
    """(n, delivery order of versions, batch sizes, counts per version)."""
    n = draw(st.integers(1, 12))
    order = draw(st.permutations(list(range(1, n + 1))))
    duplicates = draw(st.lists(st.integers(1, n), max_size=2 * n))
    delivered = list(order)
    for version in duplicates:
        delivered.insert(draw(st.integers(0, len(delivered))), version)
    sizes = draw(st.lists(st.integers(1, 5), min_size=len(delivered), max_size=len(delivered)))
    counts = draw(
        st.lists(
            st.tuples(st.integers(0, 1000), st.integers(0, 100), st.integers(0, 50)),
            min_size=n,
            max_size=n,
        )
    )
    return n, delivered, sizes, counts


@settings(max_examples=50, deadline=None)
@given(deliveries())
def test_read_view_converges_to_highest_version_under_any_permutation_with_duplicates(
    events_redis_url: str, case: tuple[int, list[int], list[int], list[tuple[int, int, int]]]
) -> None:
    n, delivered, sizes, counts = case
    # lsn 3v: versions and lsns increase together, as in one partition's ledger
    changes = {
        v: change(KEY, v, 3 * v, on_hand=c[0], reserved=c[1], safety_stock=c[2])
        for v, c in enumerate(counts, start=1)
    }

    async def main() -> None:
        client = redis.Redis.from_url(events_redis_url)
        try:
            await client.delete(
                stream_key(PARTITION),
                level_key(KEY.merchant_id, KEY.location_id, KEY.sku_id),
                index_key(KEY.merchant_id),
            )
            position = 0
            for size in sizes:
                batch = delivered[position : position + size]
                position += size
                if batch:
                    await apply(events_redis_url, [(changes[v], 0) for v in batch])
            level = await client.hgetall(level_key(KEY.merchant_id, KEY.location_id, KEY.sku_id))
            on_hand, reserved, safety_stock = counts[n - 1]
            assert level == {
                b"on_hand": str(on_hand).encode(),
                b"reserved": str(reserved).encode(),
                b"safety_stock": str(safety_stock).encode(),
                b"available": str(on_hand - reserved - safety_stock).encode(),
                b"version": str(n).encode(),
                b"partition": str(PARTITION).encode(),
                b"lsn": str(3 * n).encode(),
                b"committed_at_ms": str(T0_MS + 5_000).encode(),
                b"stale_buffer": b"0",
                b"stale_since_ms": b"0",
                b"incoming": b"0",
                b"incoming_eta_ms": b"0",
                b"allotted": b"0",
            }
            members = await client.smembers(index_key(KEY.merchant_id))
            assert members == {f"{KEY.location_id}|{KEY.sku_id}".encode()}
            lsns = [int(i.split("-")[0]) for i in await stream_ids(client, PARTITION)]
            assert lsns == sorted(set(lsns)), "stream ids strictly increase, none repeated"
            assert lsns[0] == 3 * delivered[0]
        finally:
            await client.aclose()

    asyncio.run(main())


def test_older_version_does_not_move_the_read_view_back(fresh_redis_url: str) -> None:
    async def main() -> None:
        await apply(fresh_redis_url, [(change(KEY, 5, 50, on_hand=5), 0)])
        assert await apply(fresh_redis_url, [(change(KEY, 4, 40, on_hand=4), 0)]) == [0, 1, 0]
        client = redis.Redis.from_url(fresh_redis_url)
        try:
            level = await client.hgetall(level_key(KEY.merchant_id, KEY.location_id, KEY.sku_id))
        finally:
            await client.aclose()
        assert (level[b"version"], level[b"on_hand"]) == (b"5", b"5")

    run(main)


def test_republished_changes_do_not_duplicate_stream_entries(fresh_redis_url: str) -> None:
    other = InventoryKey(KEY.merchant_id, "sku-2", KEY.location_id)
    batch = [
        (change(KEY, 1, 1), 0),
        (change(other, 1, 1), 1),  # a second change of the same record: id 1-1
        (change(KEY, 2, 2), 0),
    ]

    async def main() -> None:
        assert await apply(fresh_redis_url, batch) == [3, 0, 3]
        assert await apply(fresh_redis_url, batch) == [0, 3, 0]
        assert await apply(fresh_redis_url, batch[1:]) == [0, 2, 0]
        client = redis.Redis.from_url(fresh_redis_url)
        try:
            ids = await stream_ids(client, PARTITION)
        finally:
            await client.aclose()
        assert ids == ["1-0", "1-1", "2-0"]

    run(main)


def test_stream_is_capped_near_events_stream_length_max(fresh_redis_url: str) -> None:
    cap = 100

    async def main() -> None:
        for start in range(1, 1001, 100):
            batch = [(change(KEY, v, v), 0) for v in range(start, start + 100)]
            await apply(fresh_redis_url, batch, cap=cap)
        client = redis.Redis.from_url(fresh_redis_url)
        try:
            length = await client.xlen(stream_key(PARTITION))
            ids = await stream_ids(client, PARTITION)
        finally:
            await client.aclose()
        # MAXLEN ~ trims whole macro nodes (100 entries each by default): never below the cap
        assert cap <= length <= 3 * cap
        assert ids[-1] == "1000-0"

    run(main)
