"""The Watch hub over a real EventReader and Redis: what it reads, counted by the server.

A private embedded Redis per test, so ``INFO commandstats`` counts this hub's commands alone:
no watcher, no XREAD (nor any other command); a watcher's changes arrive through the
pre-built XREAD; once the last watcher leaves, the XREADs stop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import redis.asyncio as redis

from inventory_core import InventoryKey
from persistence.embedded import EmbeddedRedis
from persistence.readview import EventReader
from shard_router.router.watch import WatchFilter, WatchHub, WatchLimits
from tests.watch.harness import take, watch

from ._support import apply, change, location_in

MERCHANT = "m-watch"
LIMITS = WatchLimits(read_block_ms=50, heartbeat_interval_s=5.0)
QUIET_S = 0.3  # several read intervals and read blocks of LIMITS


@asynccontextmanager
async def private_redis(directory: Path) -> AsyncIterator[str]:
    with EmbeddedRedis() as server:
        url = await asyncio.to_thread(server.start, directory)
        try:
            yield url
        finally:
            await asyncio.to_thread(server.stop)


async def calls(url: str, command: str) -> int:
    """How many times the server ran ``command`` (INFO commandstats), 0 if never."""
    client = redis.Redis.from_url(url)
    try:
        stats: Any = await client.info("commandstats")
    finally:
        await client.aclose()
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


def test_the_hub_reads_redis_only_while_watched_and_only_what_is_watched(tmp_path: Path) -> None:
    near = location_in(MERCHANT, 5)
    far = location_in(MERCHANT, 700)

    async def main() -> None:
        async with private_redis(tmp_path / "redis") as url:
            reader = EventReader(url)
            try:
                async with WatchHub(reader, LIMITS) as hub:
                    await asyncio.sleep(QUIET_S)
                    assert await calls(url, "xread") == 0
                    assert await calls(url, "eval") == 0, "no last ids read for nobody"

                    narrow, stream = await watch(hub, WatchFilter(MERCHANT, frozenset({near})))
                    for lsn in range(1, 31):  # ids move on: the encoded ids are renewed
                        key = InventoryKey(MERCHANT, f"sku-{lsn}", near)
                        await apply(url, [(change(key, 1, lsn, on_hand=lsn), 0)])
                        if lsn % 3 == 0:
                            await asyncio.sleep(0.03)  # spread over several reads
                    for lsn in range(1, 31):
                        changed = (await take(stream)).change
                        assert (changed.lsn, changed.key.sku_id) == (lsn, f"sku-{lsn}")
                    assert await calls(url, "xread") > 1

                    wide, wide_stream = await watch(hub, WatchFilter(MERCHANT))
                    assert hub.metrics.partitions_watched == 1024
                    far_key = InventoryKey(MERCHANT, "sku-1", far)
                    await apply(url, [(change(far_key, 1, 1, on_hand=4), 0)])
                    changed = (await take(wide_stream)).change
                    assert (changed.partition, changed.after.on_hand) == (700, 4)

                    for subscriber, events in ((narrow, stream), (wide, wide_stream)):
                        await events.aclose()
                        hub.unsubscribe(subscriber)
                    assert hub.metrics.partitions_watched == 0
                    await asyncio.sleep(QUIET_S)  # the read under way ends
                    xreads = await calls(url, "xread")
                    await asyncio.sleep(QUIET_S)
                    assert await calls(url, "xread") == xreads
            finally:
                await reader.close()

    asyncio.run(main())
