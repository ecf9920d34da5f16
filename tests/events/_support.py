"""Builders shared by the event tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as redis
from inventory.v1 import events_pb2

from inventory_core import (
    AvailabilityChanged,
    ChangeReason,
    InventoryKey,
    StockRow,
    partition_of,
)
from persistence.readview import apply_changes, encode_change, stream_key

T = TypeVar("T")
T0_MS = 1_700_000_000_000


def location_in(merchant_id: str, partition: int) -> str:
    """A location of ``merchant_id`` whose keys hash to ``partition``."""
    for index in range(100_000):
        location = f"loc-{index}"
        if partition_of(merchant_id, location) == partition:
            return location
    raise AssertionError(f"no location in partition {partition}")


def change(
    key: InventoryKey,
    version: int,
    lsn: int,
    *,
    on_hand: int = 10,
    reserved: int = 0,
    safety_stock: int = 0,
    stale: tuple[int, int] = (0, 0),
    incoming: tuple[int, int] = (0, 0),
    before: StockRow | None = None,
) -> AvailabilityChanged:
    """A change of ``key`` to these counts; ``stale``: its (stale_buffer, stale_since_ms);
    ``incoming``: its (incoming, incoming_eta_ms)."""
    after = StockRow(on_hand, reserved, safety_stock, version, *stale, *incoming)
    return AvailabilityChanged(
        key=key,
        partition=partition_of(key.merchant_id, key.location_id),
        lsn=lsn,
        reason=ChangeReason.SET_STOCK,
        before=before or StockRow(version=version - 1),
        after=after,
        recorded_at_ms=T0_MS + lsn,
    )


async def apply(
    url: str, changes: Sequence[tuple[AvailabilityChanged, int]], cap: int = 100_000
) -> list[int]:
    """Run the apply script once over (change, index) pairs; [appended, duplicates, written]."""
    client = redis.Redis.from_url(url)
    try:
        encoded = [encode_change(c, index, T0_MS + 5_000) for c, index in changes]
        result = await apply_changes(client, cap, encoded)
        return [result.appended, result.duplicates, result.levels_written]
    finally:
        await client.aclose()


def run(body: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await body()

    return asyncio.run(main())


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout_s: float = 15.0, what: str = "condition"
) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s} s")
        await asyncio.sleep(0.05)


def decode(entry: bytes) -> events_pb2.AvailabilityChanged:
    return events_pb2.AvailabilityChanged.FromString(entry)


async def stream_ids(client: redis.Redis, partition: int) -> list[str]:
    """Every entry id of a partition's stream, oldest first."""
    entries: Any = await client.xrange(stream_key(partition))
    return [entry_id.decode() for entry_id, _ in entries]
